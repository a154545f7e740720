"""Teachers: whatever writes the gold response for a task, behind one small interface.

Two teachers exist:

* :class:`ReferenceTeacher` derives the answer from the task's own source function,
  as its family says (:meth:`trackb_core.families.Family.reference_answer`: the
  docstring, the original code, the mutation that made the bug, AST facts). No
  network, no model, fully deterministic: the CPU demo and the tests run on it.
* :class:`~trackb_core.openai_teacher.OpenAITeacher` asks any OpenAI-compatible chat
  server (vLLM in production) with bounded concurrency, retries with backoff on
  transient failures, and rejects truncated answers instead of keeping them (the seed
  kept them silently).

The generate stage drives both through :class:`Teacher` alone. Code that has a
teacher's config but no teacher (the Job builder, the dataset card) reads what it
needs from :data:`TEACHER_KINDS`, never from the teacher's name.

Every answer is a :class:`TeacherResult`; a task a teacher cannot or should not answer
comes back with ``status`` "skipped" or "rejected" and a ``reason``, never dropped
silently, so the generate stage can count it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from trackb_core import families
from trackb_core.pyast import first_function

OK, SKIPPED, REJECTED = "ok", "skipped", "rejected"


@dataclass(frozen=True)
class TeacherKind:
    """What is known about a kind of teacher before one is made.

    ``derives_from_source``: answers come from the task's own source (no model, no
    sampling settings). ``needs_server``: answers come from an OpenAI-compatible server,
    which a cluster run may have to start (a vLLM sidecar or Deployment).
    """

    derives_from_source: bool
    needs_server: bool


# GenerateConfig.teacher -> its kind.
TEACHER_KINDS = {
    "reference": TeacherKind(derives_from_source=True, needs_server=False),
    "openai": TeacherKind(derives_from_source=False, needs_server=True),
}


@dataclass(frozen=True)
class TeacherResult:
    """One task's outcome: a response (status "ok") or why there is none."""

    id: str
    status: str  # "ok" | "skipped" (teacher has no answer) | "rejected" (answer unusable)
    response: str | None = None
    reason: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""
    attempts: int = 1
    # every candidate when the teacher was asked for several (the first is ``response``)
    candidates: tuple[str, ...] = ()
    # a rejection a later run may not repeat (retries ran out on a timeout, 429, 5xx or
    # a dropped connection): not cached
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK


class Teacher(Protocol):
    """Answers tasks. The generate stage uses nothing else of a teacher.

    - ``connect(progress)``: wait until the teacher can answer (a server may load for
      minutes), saying what it waits for through ``progress``; returns the model that
      will answer (also ``model`` afterwards). Raises UnavailableError, ConfigError.
    - ``identity()``: what decides whether an earlier answer is reusable (the cache key
      holds it), or None when answers are free and deterministic and never cached.
    - ``sampling()``: the request settings an answer depends on (empty: none).
    - ``describe()``: what the manifest records of the teacher besides its name, model
      and sampling (where it ran, the prompt template version).
    - ``run_counts()``: what this run cost and survived (retries, tokens), for the
      manifest's counts.
    - ``answer_all(tasks)``: one result per task, in any order.
    """

    name: str
    model: str

    def connect(self, progress: Callable[[str], None]) -> str: ...

    def identity(self) -> dict[str, Any] | None: ...

    def sampling(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...

    def run_counts(self) -> dict[str, Any]: ...

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]: ...


# ------------------------------------------------------------------------------------
# Reference teacher: gold from the source itself
# ------------------------------------------------------------------------------------


class ReferenceTeacher:
    """Gold answers derived from each task's ``source_function``; no network.

    Each family says how (:meth:`~trackb_core.families.Family.reference_answer`):
    docstring -> the function's own docstring; complete -> the original function;
    bugfix -> what the mutation changed and why it is wrong, then the original;
    explain -> a structured explanation from AST facts and the docstring;
    unit_test -> skipped (there is no reference test).
    """

    name = "reference"
    model = "reference"

    def connect(self, progress: Callable[[str], None]) -> str:
        return self.model  # nothing to wait for

    def identity(self) -> None:
        return None  # free and deterministic: recomputed, never cached

    def sampling(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {}

    def run_counts(self) -> dict[str, Any]:
        return {}

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]:
        for task in tasks:
            yield self.answer(task)

    def answer(self, task: dict[str, Any]) -> TeacherResult:
        """The reference answer for one task row (never raises on odd source)."""
        task_id = str(task["id"])
        try:
            family = families.get(str(task.get("category")))
        except ValueError:
            return self._skip(task_id, "unknown_category")
        source = str(task.get("source_function") or "").strip("\n")
        func = first_function(source)
        if func is None:
            return self._skip(task_id, "unparsable_source")
        response, reason = family.reference_answer(task, source, func)
        if response is None:
            return self._skip(task_id, str(reason))
        return TeacherResult(id=task_id, status=OK, response=response, finish_reason="stop",
                             model=self.model)

    def _skip(self, task_id: str, reason: str) -> TeacherResult:
        return TeacherResult(id=task_id, status=SKIPPED, reason=reason, model=self.model)
