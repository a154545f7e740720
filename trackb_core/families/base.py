"""The protocol of a task family: what trackb knows about one kind of code task.

A family is one module of :mod:`trackb_core.families` (``bugfix``, ``complete``,
``docstring``, ``explain``, ``unit_test``) holding a subclass of :class:`Family`: how
its task and instruction are built from a function, the reference teacher's answer,
the guidance a teacher model gets, the strict verdict on an answer and the filter
reasons it gives, its format and functional checks, the pass rule and its metrics. Every stage loops over the
registry (:func:`trackb_core.families.all_families`) and keeps no table per category.

The seed-compatible scorer is not here: it scores by the seed's own category rules
(:mod:`trackb_core.seed_metrics`), an unknown family as explain.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trackb_core.mutations import ParsedFunction, Scan
from trackb_core.pyast import FunctionNode
from trackb_core.testrun import hidden_test_verdict


@dataclass(frozen=True)
class FunctionSource:
    """What a family builds a task from: one extracted function.

    ``row`` is its functions.jsonl row (``name``, ``qualname``, ``file``, ``source``,
    ``signature``, ``docstring``, ``args``, ``is_method``, ...), ``view`` its parsed
    source, ``scan`` its body facts. ``mutant`` is the one-site bug the corpus-wide
    assignment gave it (``(buggy_source, mutation)``, or None: no site), and
    ``over_cap`` says its only kinds are already a quarter of all bugs; both are set
    only when a wanted family ``needs_mutants``.
    """

    row: dict[str, Any]
    view: ParsedFunction
    scan: Scan
    mutant: tuple[str, dict[str, Any]] | None = None
    over_cap: bool = False

    @property
    def name(self) -> str:
        return str(self.row["name"])

    @property
    def source(self) -> str:
        return str(self.row["source"])

    @property
    def params(self) -> list[str]:
        """The parameters a docstring or explanation should describe (no self/cls)."""
        names = [a["name"] for a in self.row.get("args", [])]
        if self.row.get("is_method") and names and names[0] in ("self", "cls"):
            names = names[1:]
        return names


@dataclass(frozen=True)
class CheckContext:
    """What a verdict may need besides the answer and its item: the corpus the item's
    module comes from (None: unknown, code cannot run), the CPU seconds a sandboxed
    run's tests may take, whether code may run below the sandbox's minimum isolation,
    and the corpus's execution environment (folders after the corpus on ``sys.path``)."""

    corpus_dir: Path | None = None
    timeout: float = 10.0
    allow_weak_sandbox: bool = False
    python_path: tuple[Path, ...] = ()

    def hidden_tests(self, code: str | None, item: dict[str, Any]) -> dict[str, Any]:
        """:func:`trackb_core.testrun.hidden_test_verdict` of ``code`` on ``item``."""
        return hidden_test_verdict(code, item, self.corpus_dir,
                                   require_minimum=not self.allow_weak_sandbox,
                                   python_path=list(self.python_path))


def hidden_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """eval.json facts of a family checked by hidden tests: how many items have them
    and how the greedy answers' runs ended."""
    statuses: dict[str, int] = {}
    for record in records:
        status = str(record["verdict"].get("hidden"))
        statuses[status] = statuses.get(status, 0) + 1
    return {"with_hidden_tests": len(records) - statuses.get("no_tests", 0),
            "hidden_statuses": dict(sorted(statuses.items()))}


@dataclass(frozen=True)
class Metric:
    """A metric of a family, measured on each item's greedy answer (eval.json section
    ``family``; a name never says *pass*: only the functional check is a pass).

    ``value(record)`` is the metric for one scored item (``record["verdict"]`` is the
    greedy answer's verdict; ``record["has_mutant"]`` whether the item has a mutant), or
    None when the item does not count for it.
    """

    name: str
    value: Callable[[dict[str, Any]], Any]


def verdict_fact(key: str) -> Callable[[dict[str, Any]], Any]:
    """A :class:`Metric` value that reads one fact of the greedy answer's verdict."""
    return lambda record: record["verdict"][key]


class Family(abc.ABC):
    """One task family. Subclasses set every attribute and implement every method.

    Attributes:
        name: the category name in task rows (``row["category"]``).
        answers_with_code: the answer is code (the seed filters require its first block
            to compile; build-dataset also removes near-duplicate response code).
        needs_mutants: building its task needs the function's corpus-wide mutant.
        shows_mutant: its instruction shows the mutant, so the mutation kinds of its
            rows are the bug mix extract and the dataset card report.
        runs_code: its verdict runs code in the sandbox (scored a few at a time).
        uses_hidden_tests: its task rows carry the function's hidden tests
            (``hidden_tests``, derived by :mod:`trackb_core.difftest` at extract): its
            functional check or its reference answer uses them.
        guidance: the format guidance a teacher model gets besides the instruction
            (part of the teacher prompt template: a change must bump
            ``openai_teacher.TEACHER_PROMPT_VERSION``).
        pass_rule: what a pass means, in words (eval.json ``correct_means``): the
            functional check, or why the family has none yet.
        seed_reasons: the seed filter reasons :meth:`seed_reason` can return.
        filter_reasons: the strict filter reasons :meth:`filter` can return, without
            the ``strict:`` prefix.
        metrics: its metrics on the greedy answer (eval.json headline, section family).
        facts: verdict facts reported in eval.json's ``families`` block without intervals.
    """

    name: str
    answers_with_code: bool
    needs_mutants: bool = False
    shows_mutant: bool = False
    runs_code: bool = False
    uses_hidden_tests: bool = False
    guidance: str
    pass_rule: str
    seed_reasons: tuple[str, ...] = ()
    filter_reasons: tuple[str, ...]
    metrics: tuple[Metric, ...]
    facts: tuple[str, ...] = ()

    @abc.abstractmethod
    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        """This family's fields of the task for ``source`` (``instruction`` at least), or
        the reason it has none, ``"<name>_<why>"``. Deterministic; may raise
        RecursionError or MemoryError on a function nested too deeply to walk."""

    @abc.abstractmethod
    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        """The reference teacher's answer, derived from the task's own ``source``
        function (parsed: ``function``): ``(answer, None)``, or ``(None, reason)`` when
        the source holds none. Raises nothing."""

    @abc.abstractmethod
    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        """The measured facts of ``response`` to ``item`` (a task or dataset row): the
        same facts decide "kept as gold" (:meth:`filter`) and "counted as correct"
        (:meth:`passes`). Never raises on a malformed response."""

    @abc.abstractmethod
    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """``(reason, facts)`` of the strict filter on a :meth:`verdict`: reason None
        keeps the row, else one of :attr:`filter_reasons`; ``facts`` are what the
        manifest and the card aggregate (keys prefixed with the family's name)."""

    @abc.abstractmethod
    def format_check(self, verdict: dict[str, Any]) -> bool:
        """Whether the answer has the form the instruction asks for (its code parses and
        keeps the signature, its docstring has the sections, its explanation is prose
        about the function), whatever its content. Reported as ``format_ok``; never a
        pass."""

    @abc.abstractmethod
    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        """Whether the answer is shown to be right (tests run on it, or the original it
        must restore): the only thing eval reports as a *pass*. None where nothing can
        show it for this family or item (prose; no tests could run), which leaves the item
        out of the pass metrics rather than counting it either way."""

    def passes(self, verdict: dict[str, Any]) -> bool:
        """Whether a :meth:`verdict` counts as a pass (:attr:`pass_rule`): its functional
        check holds."""
        return self.functional_check(verdict) is True

    def seed_reason(self, response: str) -> str | None:
        """The seed filters' family-specific verdict (one of :attr:`seed_reasons`), or
        None. The generic seed filters (length, placeholders, a compiling code block
        when :attr:`answers_with_code`) run before it."""
        return None

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """More facts for eval.json's ``families`` block of this family (e.g. how many
        items could be executed), from the scored ``records``."""
        return {}
