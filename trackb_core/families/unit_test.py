"""The ``unit_test`` family: write pytest tests for a function of the corpus.

- Task: the function and the import it lives under (``from <module> import <top>``);
  a nested function has no import path and is skipped (``unit_test_not_importable``).
  Rows of a function that has a mutant carry it (``buggy_source``, ``mutation``), not
  shown to the model: a checker asks whether the tests catch that bug.
- Reference answer: the function's hidden tests, derived from the original by
  differential execution (:mod:`trackb_core.difftest`); none where it has none
  (``no_reference_unit_test``).
- Verdict (:func:`unit_test_verdict`): the tests run in the sandbox
  (:mod:`trackb_core.testrun`) against the original function and, where the item has a
  mutant, against the mutant.
- Strict filter reasons: ``unit_test_unparsable`` / ``unit_test_no_tests`` /
  ``unit_test_not_executable`` (counted, never kept on a guess) / ``unit_test_failed``
  / ``unit_test_error`` / ``unit_test_timeout`` / ``unit_test_misses_mutant`` (they
  pass on the original and on the mutant) / ``unit_test_unverified`` (they pass, but
  there was no mutant to check them against: passing alone proves nothing); facts
  ``unit_test_status``,
  ``unit_test_kills_mutant``, ``unit_test_tests``, ``unit_test_reason``.
- Seed filters: ``no_test_function`` / ``no_assert``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from trackb_core.codeblocks import first_code, parses
from trackb_core.corpus import import_root
from trackb_core.families.base import CheckContext, Family, FunctionSource, Metric
from trackb_core.pyast import FunctionNode, module_path, python_block
from trackb_core.testrun import (
    Budget,
    corpus_names,
    kills_of,
    run_against,
    scaled_budget,
    side_status,
    timeout_reason,
)

# The verdict's status -> the strict filter's reason for rejecting it.
STATUS_REASONS = {
    "unparsable": "unit_test_unparsable", "no_tests": "unit_test_no_tests",
    "not_executable": "unit_test_not_executable", "failed": "unit_test_failed",
    "error": "unit_test_error", "timeout": "unit_test_timeout",
}


# -- the verdict ----------------------------------------------------------------------


def _test_functions(tree: ast.Module) -> list[FunctionNode]:
    found = [n for n in tree.body if isinstance(n, FunctionNode) and n.name.startswith("test_")]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and cls.name.startswith("Test"):
            found += [n for n in cls.body
                      if isinstance(n, FunctionNode) and n.name.startswith("test_")]
    return found


def _asserts(function: FunctionNode) -> bool:
    """An ``assert``, or a ``with pytest.raises(...)`` (an assertion about an exception)."""
    for node in ast.walk(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr == "raises":
                    return True
    return False


def _verdict(status: str, reason: str, passes: bool | None = None, kills: bool | None = None,
             tests: int = 0, isolation: str | None = None, mutant_status: str | None = None
             ) -> dict:
    return {"status": status, "passes_original": passes, "kills_mutant": kills,
            "tests": tests, "reason": reason, "isolation": isolation,
            "mutant_status": mutant_status}


def unit_test_verdict(response: str, item: dict, corpus_dir: Path | None, *,
                      timeout: float = 10.0, allow_weak_sandbox: bool = False,
                      python_path: tuple[Path, ...] = ()) -> dict:
    """Run a unit_test response's tests in the sandbox against the item's function.

    Returns ``{"status", "passes_original", "kills_mutant", "tests", "reason",
    "isolation", "mutant_status"}``. The status is about the run against the original:
    ``passed`` (every test case passed), ``failed`` (a case failed or raised), ``error``
    (the tests did not import, the sandbox killed the run, or it sent no single
    well-formed report), ``timeout`` (importing the module or the tests ran out of CPU
    time, or the wall-clock backstop fired twice: neither a pass nor a failure),
    ``not_executable`` (no corpus, an item whose ``source_file`` is not a file inside
    it, the module does not import here, e.g. a missing heavy dependency, the tests need
    a library that is not installed or only fixtures the runner lacks, or the sandbox
    cannot reach its minimum isolation here), ``no_tests`` (no ``test_*`` function with
    an ``assert`` or ``pytest.raises``), ``unparsable``. When the original passes and
    the item has ``buggy_source``, the tests run again on the module with the function
    replaced by the mutant: ``kills_mutant`` is True if a case fails or raises there (a
    real assertion failure or error), False if all pass, None when that run timed out or
    could not run (``mutant_status`` says which). ``tests`` counts cases run on the
    original; ``isolation`` is the sandbox's level
    (:attr:`trackb_core.sandbox.Isolation.level`). ``timeout`` is the CPU seconds the
    tests may take on each side; ``python_path`` the corpus's execution environment.

    Both runs see the same files (:func:`trackb_core.testrun.run_against`). Never
    raises: a malformed response, item or report is a verdict too. Below the sandbox's
    minimum isolation nothing runs (``not_executable``) unless ``allow_weak_sandbox``.
    """
    try:
        return _unit_test_verdict(response, item, corpus_dir, Budget(test_cpu=timeout),
                                  not allow_weak_sandbox, list(python_path))
    except Exception as exc:  # noqa: BLE001 - a checker bug must cost one item, no more
        return _verdict("error", f"the checker failed: {type(exc).__name__}: {exc}"[:300])


def _unit_test_verdict(response: str, item: dict, corpus_dir: Path | None, budget: Budget,
                       require_minimum: bool, python_path: list[Path]) -> dict:
    code = first_code(str(response or ""))
    tree = parses(code) if code is not None else None
    if tree is None:
        return _verdict("unparsable", "no code block" if code is None else "does not parse")
    hidden = item.get("hidden_tests") if isinstance(item, dict) else None
    if corpus_dir is not None and isinstance(hidden, dict) \
            and str(hidden.get("code", "")).strip() == code.strip() \
            and isinstance(item.get("buggy_source"), str):
        # the function's own hidden tests, validated at extract against this very
        # function and its mutant (trackb_core.difftest): nothing a run could add
        return _verdict("passed", f"{hidden.get('cases')} passed; the function's hidden "
                                  "tests, validated at extract", passes=True, kills=True,
                        tests=int(hidden.get("cases") or 0), mutant_status="failed")
    if not any(_asserts(f) for f in _test_functions(tree)):
        return _verdict("no_tests", "no test_* function with an assert")
    if not isinstance(item, dict):
        return _verdict("not_executable", "the item is not a mapping")
    if corpus_dir is None:
        return _verdict("not_executable", "no corpus")
    corpus = Path(corpus_dir).resolve()
    original = run_against(code, item, corpus, budget, require_minimum=require_minimum,
                           python_path=python_path)
    if isinstance(original, str):
        return _verdict("not_executable", original)
    isolation = original["sandbox"].isolation.level
    side = side_status(original)
    if side == "below_minimum":
        return _verdict("not_executable", f"isolation: {original['failure']}",
                        isolation=isolation)
    if side == "timeout":
        return _verdict("timeout", timeout_reason(original, budget), isolation=isolation)
    if original["outcome"] == "error":
        return _verdict("error", str(original["failure"])[:300], passes=False,
                        isolation=isolation)
    failure = original["failure"]
    # several corpora: the module and its names live under its corpus's own folder
    corpus, source_file = import_root(corpus, str(item.get("source_file")))
    module = module_path(source_file)
    if original["outcome"] == "import_module":
        return _verdict("not_executable", f"import {module} failed: {failure['error']}"
                        + (f": {failure['name']}" if failure.get("name") else
                           f": {failure['message'][:120]}"), isolation=isolation)
    if original["outcome"] == "import_tests":
        if failure["error"] == "ModuleNotFoundError" \
                and not corpus_names(corpus, failure.get("name")):
            return _verdict("not_executable", f"the tests need {failure['name']!r}, "
                                              "which is not installed here",
                            isolation=isolation)
        return _verdict("error", f"the tests do not import: {failure['error']}: "
                                 f"{failure['message'][:160]}", passes=False,
                        isolation=isolation)
    results = original["results"]
    if not results:
        why = "; ".join(f"{name}: {what}" for name, what in original["skipped"][:3])
        return _verdict("not_executable", f"no runnable test case ({why or 'none found'})",
                        isolation=isolation)
    bad = [r for r in results if r[1] != "passed"]
    if bad:
        name, kind, message = bad[0]
        return _verdict("failed", f"{len(bad)}/{len(results)} failed on the original; "
                                  f"{name}: {kind}: {message}", passes=False,
                        tests=len(results), isolation=isolation)

    buggy = item.get("buggy_source")
    if not isinstance(buggy, str) or not buggy.strip():
        return _verdict("passed", f"{len(results)} passed", passes=True, tests=len(results),
                        isolation=isolation)
    # The mutant gets what the original needed, scaled: a slower machine or a busy one
    # changes CPU time little, and a mutant that loops is a timeout, never a kill.
    mutant_budget = scaled_budget(budget, original)
    mutant = run_against(code, item, corpus, mutant_budget, function_source=buggy,
                         require_minimum=require_minimum, python_path=python_path)
    if isinstance(mutant, str):
        return _verdict("passed", f"{len(results)} passed; mutant not run: {mutant}",
                        passes=True, tests=len(results), isolation=isolation,
                        mutant_status="not_run")
    kills, mutant_side = kills_of(mutant, len(results))
    detail = {True: f"{sum(r[1] in ('failed', 'error') for r in mutant['results'])} failed "
                    "on the mutant", False: "all pass on the mutant",
              None: f"mutant not judged: {mutant_side}"}[kills]
    return _verdict("passed", f"{len(results)} passed; {detail}", passes=True, kills=kills,
                    tests=len(results), isolation=isolation, mutant_status=mutant_side)


def executable(record: dict[str, Any]) -> bool:
    """Whether a scored item's greedy tests could be executed here at all."""
    return record["verdict"].get("status") != "not_executable"


def kills_mutant(record: dict[str, Any]) -> bool | None:
    """Whether the greedy tests kill the item's mutant; None where that cannot count: no
    mutant, tests not executable, or the original passed but the mutant could not be run.
    Tests that fail the original count as not killing it."""
    facts = record["verdict"]
    if not record["has_mutant"] or not executable(record):
        return None
    if facts.get("passes_original") is True and facts.get("kills_mutant") is None:
        return None
    return facts.get("kills_mutant") is True


class UnitTest(Family):
    name = "unit_test"
    answers_with_code = True
    needs_mutants = True
    runs_code = True
    uses_hidden_tests = True
    guidance = ("Write self-contained pytest tests in one ```python block: import what you "
                "test, name the functions test_..., use plain assert statements.")
    pass_rule = ("the tests run and pass against the original function and fail against "
                 "its mutant (passes_original & kills_mutant); items whose tests cannot run, "
                 "or whose mutant could not be run, are left out")
    seed_reasons = ("no_test_function", "no_assert")
    filter_reasons = (*STATUS_REASONS.values(), "unit_test_misses_mutant",
                      "unit_test_unverified")
    metrics = (
        # Not a pass: a test that asserts nothing is consistent with any function.
        Metric("consistent_with_original",
               lambda r: r["verdict"].get("passes_original") is True
               if executable(r) else None),
        Metric("kills_mutant", kills_mutant),
    )

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        qualname = source.row["qualname"]
        if "<locals>" in qualname:
            return "unit_test_not_importable"  # a nested function has no import path
        # in a run of several corpora the file sits under its corpus's key folder
        module = module_path(source.row["file"].removeprefix(
            f"{source.row['corpus']}/" if source.row.get("corpus") else ""))
        top = qualname.split(".")[0]
        where = "" if top == qualname else \
            f" (`{source.name}` is a method of class `{top}`)"
        instruction = (
            f"Write pytest unit tests for the Python function `{qualname}` below, defined "
            f"in module `{module}`{where}.\n\n"
            f"{python_block(source.source)}\n\n"
            f"Import it with `from {module} import {top}`. Write test functions named "
            "`def test_...` that use plain `assert` statements and cover normal use and "
            "edge cases. Return the tests in one ```python block."
        )
        row: dict[str, Any] = {"instruction": instruction}
        if source.mutant is not None:
            # Not shown to the model: lets a checker ask whether the tests catch this bug.
            row["buggy_source"], row["mutation"] = source.mutant[0], dict(source.mutant[1])
        return row

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        hidden = task.get("hidden_tests")
        if isinstance(hidden, dict) and isinstance(hidden.get("code"), str):
            # tests derived from the original by differential execution, validated to
            # pass on it and to catch its mutant and a stub (trackb_core.difftest)
            return python_block(hidden["code"].rstrip("\n")), None
        return None, "no_reference_unit_test"

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        return unit_test_verdict(response, item, context.corpus_dir, timeout=context.timeout,
                                 allow_weak_sandbox=context.allow_weak_sandbox,
                                 python_path=context.python_path)

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"unit_test_status": verdict["status"],
                 "unit_test_kills_mutant": verdict["kills_mutant"],
                 "unit_test_tests": verdict["tests"],
                 "unit_test_reason": verdict["reason"],
                 "unit_test_isolation": verdict.get("isolation")}
        if verdict["status"] != "passed":
            return STATUS_REASONS.get(verdict["status"], "unit_test_error"), facts
        if verdict["kills_mutant"] is False:
            return "unit_test_misses_mutant", facts
        if verdict["kills_mutant"] is None:
            # Passing alone proves nothing (a test that asserts nothing passes, and a run
            # can claim it passed): gold tests must also catch the function's mutant.
            return "unit_test_unverified", facts
        return None, facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return verdict.get("status") not in ("unparsable", "no_tests")

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        status = verdict.get("status")
        if status == "not_executable":
            return None
        if status != "passed":
            return False  # no tests, tests that fail the original or cannot import
        # Passing alone proves nothing (a test that asserts nothing passes): without a
        # mutant run to catch, nothing is shown either way.
        kills = verdict.get("kills_mutant")
        return None if kills is None else bool(kills)

    def seed_reason(self, response: str) -> str | None:
        if "def test_" not in response:
            return "no_test_function"
        if "assert" not in response:
            return "no_assert"
        return None

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        ran = [r for r in records if executable(r)]
        statuses: dict[str, int] = {}
        for r in records:
            status = str(r["verdict"].get("status"))
            statuses[status] = statuses.get(status, 0) + 1
        mutant: dict[str, int] = {}
        for r in records:
            side = r["verdict"].get("mutant_status")
            if side is not None:
                mutant[str(side)] = mutant.get(str(side), 0) + 1
        return {
            "n_executable": len(ran),
            "not_executable": len(records) - len(ran),
            "n_with_mutant": sum(r["has_mutant"] for r in ran),
            # per side: how the runs on the original and on the mutant ended (a timeout
            # on either side is neither a pass nor a kill)
            "statuses": dict(sorted(statuses.items())),
            "mutant_statuses": dict(sorted(mutant.items())),
        }


FAMILY = UnitTest()
