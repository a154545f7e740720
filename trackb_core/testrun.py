"""Running tests in the sandbox against one module of the corpus.

A test file (model- or teacher-written) runs in :func:`trackb_core.sandbox.run_python`
against the module that defines an item's function: as the corpus has it, or with that
function's lines replaced (by its mutant, or by a candidate answer). The sandbox tree
holds the module and ``__init__.py`` files along its path that only extend
``__path__`` to a **view** of the corpus (:func:`corpus_view`): every file of the corpus
but the module under test, read-only. So the original and the mutant runs see the same
files in the same places, and a test cannot tell them apart by reading the corpus copy
of the module: only by running the function.

:data:`TEST_RUNNER` runs inside the sandbox: it imports the module under test (its
import failing means the function cannot be executed here), then the tests, then each
test case, and writes one report to the run's report pipe (never to stdout, so printing
cannot forge it). It supports module-level ``test_*`` functions, ``Test*`` classes with
no-argument constructors, ``pytest.mark.parametrize`` and the ``tmp_path``/``tmpdir``
fixtures, without pytest. :func:`parse_report` accepts exactly one well-formed report;
anything else is an error, never a verdict.
"""

from __future__ import annotations

import ast
import atexit
import hashlib
import json
import os
import shutil
import tempfile
import textwrap
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trackb_core.codeblocks import parses
from trackb_core.corpus import import_root
from trackb_core.pyast import (
    bound_function,
    dump,
    first_function,
    functions_named,
    module_path,
    restores_original,
)
from trackb_core.sandbox import remove_tree, run_python

# The test file's module name in the sandbox tree.
TEST_MODULE = "test_generated"
# A corpus file larger than this is not put in a view (source corpora hold small files).
VIEW_FILE_BYTES = 1 << 20
RESULT_KINDS = ("passed", "failed", "error", "timeout")

# What every script run in the sandbox by trackb starts with: a CPU-time budget (SIGPROF
# counts CPU time, so a busy machine changes nothing), the CPU time spent, and the peak
# address space (the child's own /proc status is readable in the sandbox).
RUNNER_PRELUDE = r"""
import resource, signal

class Budget(BaseException):
    "The CPU-time budget ran out."

def on_budget(signum, frame):
    raise Budget()

signal.signal(signal.SIGPROF, on_budget)

def budget(seconds):
    signal.setitimer(signal.ITIMER_PROF, max(seconds, 0.001) if seconds else 0)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def vm_peak_kb():
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
"""

TEST_RUNNER = RUNNER_PRELUDE + r"""
import asyncio, importlib, inspect, itertools, json, os, pathlib, sys
import tempfile

def report(payload):
    os.write(REPORT_FD, (json.dumps(payload) + "\n").encode())

def text(exc):
    try:
        return str(exc)[:300]
    except BaseException:
        return "(unprintable)"

def failure(stage, exc):
    return {"stage": stage, "error": type(exc).__name__,
            "name": str(getattr(exc, "name", "") or "") or None, "message": text(exc)}

started = cpu()
try:
    budget(IMPORT_CPU)
    importlib.import_module(MODULE)
    budget(0)
except Budget:
    report({"stage": "import_timeout", "error": "Budget", "name": None,
            "message": f"importing {MODULE} took over {IMPORT_CPU} CPU seconds"})
    raise SystemExit(0)
except BaseException as exc:
    budget(0)
    report(failure("import_module", exc))
    raise SystemExit(0)
import_cpu = cpu() - started
vm_peak = vm_peak_kb()
phase = cpu()
try:
    budget(TEST_CPU)
    tests = importlib.import_module(TEST_MODULE)
    budget(0)
except BaseException as exc:
    budget(0)
    report(failure("import_tests", exc))
    raise SystemExit(0)

FIXTURES = {"tmp_path": lambda: pathlib.Path(tempfile.mkdtemp()), "tmpdir": tempfile.mkdtemp}

def parameter_sets(function):
    sets = [{}]
    for mark in reversed(getattr(function, "pytestmark", [])):
        if getattr(mark, "name", "") != "parametrize" or len(mark.args) < 2:
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for value in mark.args[1]:
            if type(value).__name__ == "ParameterSet":  # pytest.param(...)
                values = tuple(value.values)
            elif len(names) == 1:
                values = (value,)
            else:
                values = tuple(value)
            rows.append(dict(zip(names, values)))
        sets = [{**a, **b} for a, b in itertools.product(sets, rows)]
    return sets

def cases_of(name, function, skipped):
    wanted = [p for p in inspect.signature(function).parameters.values()
              if p.default is inspect.Parameter.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    sets = parameter_sets(function)
    for index, params in enumerate(sets):
        missing = [p.name for p in wanted if p.name not in params and p.name not in FIXTURES]
        if missing:
            skipped.append([name, "needs fixture " + ", ".join(missing)])
            continue
        def call(function=function, params=params):
            kwargs = dict(params)
            for p in wanted:
                if p.name not in kwargs:
                    kwargs[p.name] = FIXTURES[p.name]()
            outcome = function(**kwargs)
            if inspect.iscoroutine(outcome):
                asyncio.run(outcome)
        yield (name if len(sets) == 1 else f"{name}[{index}]"), call

cases, skipped = [], []
for name, value in sorted(vars(tests).items()):
    if name.startswith("test_") and inspect.isfunction(value) \
            and value.__module__ == TEST_MODULE:
        cases.extend(cases_of(name, value, skipped))
    elif name.startswith("Test") and inspect.isclass(value) and value.__module__ == TEST_MODULE:
        try:
            instance = value()
        except BaseException as exc:
            skipped.append([name, "cannot construct: " + type(exc).__name__])
            continue
        for attribute in sorted(dir(value)):
            if attribute.startswith("test_") and callable(getattr(instance, attribute)):
                cases.extend(cases_of(f"{name}.{attribute}", getattr(instance, attribute),
                                      skipped))

# One CPU budget for every case together: a case that exhausts it is a timeout, and so
# is every case after it (they get no time left).
results, spent = [], []
for name, call in cases:
    left = TEST_CPU - (cpu() - phase)
    before = cpu()
    if left <= 0:
        results.append([name, "timeout", "no CPU time left"])
        spent.append(0.0)
        continue
    try:
        budget(left)
        call()
        budget(0)
        results.append([name, "passed", ""])
    except Budget:
        results.append([name, "timeout", f"over the {TEST_CPU:g} CPU-second budget"])
    except AssertionError as exc:
        budget(0)
        results.append([name, "failed", ("AssertionError: " + text(exc))[:200]])
    except BaseException as exc:
        budget(0)
        results.append([name, "error", (type(exc).__name__ + ": " + text(exc))[:200]])
    spent.append(round(cpu() - before, 4))
report({"stage": "ran", "results": results, "skipped": skipped, "cpu": spent,
        "import_cpu": round(import_cpu, 4), "vm_peak_kb": vm_peak})
"""


def _extend_path_line(corpus_package: Path) -> str:
    return f"__path__.append({str(corpus_package)!r})\n"


def _with_path_extension(text: str, corpus_package: Path) -> str:
    """A package ``__init__`` that also finds its submodules in the corpus: the line goes
    after the docstring and ``from __future__`` imports, which must stay first."""
    tree = parses(text)
    insert_at = 0
    if tree is not None:
        for index, node in enumerate(tree.body):
            if (index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) \
                    or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                insert_at = node.end_lineno
                continue
            break
    lines = text.split("\n")
    return "\n".join([*lines[:insert_at], _extend_path_line(corpus_package).rstrip("\n"),
                      *lines[insert_at:]])


def locate(file_text: str, item: dict) -> tuple[int, int] | str:
    """``(line, end_line)`` of the item's function in ``file_text``, or why not found.

    Uses the item's ``line``/``end_line`` and checks that those lines hold the item's
    ``source_function`` (AST-equal), so a different corpus version is caught."""
    tree = parses(str(item.get("source_function", "")))
    if tree is None:
        return "source_function does not parse"
    want = dump(tree)
    lines = file_text.split("\n")

    def holds(start: int, end: int) -> bool:
        if not 1 <= start <= end <= len(lines):
            return False
        segment = parses(textwrap.dedent("\n".join(lines[start - 1:end])))
        return segment is not None and dump(segment) == want

    line, end_line = item.get("line"), item.get("end_line")
    if isinstance(line, int) and isinstance(end_line, int) and holds(line, end_line):
        return line, end_line
    module = parses(file_text)
    name = str(item.get("function_name") or "")
    for node in functions_named(module, name) if module is not None and name else []:
        if holds(node.lineno, node.end_lineno):
            return node.lineno, node.end_lineno
    return "the function is not in source_file (a different corpus version?)"


def module_files(corpus: Path, source_file: str, file_text: str) -> dict[str, str]:
    """The sandbox tree: the module and path-extending ``__init__.py`` files above it, so a
    package's (possibly heavy) ``__init__`` does not run and sibling modules still import."""
    parts = source_file.split("/")
    files: dict[str, str] = {}
    for depth in range(1, len(parts)):
        package = "/".join(parts[:depth])
        files[f"{package}/__init__.py"] = _extend_path_line(corpus / package)
    if parts[-1] == "__init__.py" and len(parts) > 1:
        files[source_file] = _with_path_extension(file_text, corpus / "/".join(parts[:-1]))
    else:
        files[source_file] = file_text
    return files


def replace_function(file_text: str, span: tuple[int, int], source: str) -> str:
    """``file_text`` with lines ``span`` (a function, 1-based inclusive) replaced by
    ``source``, re-indented to where the function stood."""
    line, end_line = span
    lines = file_text.split("\n")
    first = lines[line - 1]
    indent = first[: len(first) - len(first.lstrip())]
    body = textwrap.indent(textwrap.dedent(source).rstrip("\n"), indent).split("\n")
    return "\n".join([*lines[: line - 1], *body, *lines[end_line:]])


def parse_report(data: bytes) -> dict[str, Any] | str:
    """The one report a run wrote to its report pipe, checked for shape, or why there is
    none: no report, several (the tests wrote one of their own), or a malformed one.
    Raises nothing."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    if not lines:
        return "no report"
    if len(lines) > 1:
        return f"{len(lines)} reports (the tests wrote to the report channel)"
    try:
        payload = json.loads(lines[0])
    except (ValueError, RecursionError):
        return "a malformed report"
    if not isinstance(payload, dict) or payload.get("stage") not in (
            "ran", "import_module", "import_tests", "import_timeout"):
        return "a malformed report"
    if payload["stage"] != "ran":
        for key in ("error", "message"):
            if not isinstance(payload.get(key), str):
                return "a malformed report"
        if payload.get("name") is not None and not isinstance(payload["name"], str):
            return "a malformed report"
        return payload
    results, skipped = payload.get("results"), payload.get("skipped")
    spent = payload.get("cpu", [])
    if not isinstance(results, list) or not isinstance(skipped, list) \
            or not isinstance(spent, list) or not isinstance(payload.get("import_cpu", 0.0),
                                                               int | float) \
            or not isinstance(payload.get("vm_peak_kb") or 0, int):
        return "a malformed report"
    for entry in [*results, *skipped]:
        if not isinstance(entry, list) or not all(isinstance(x, str) for x in entry):
            return "a malformed report"
    if any(len(r) != 3 or r[1] not in RESULT_KINDS for r in results) \
            or any(len(s) != 2 for s in skipped) \
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in spent):
        return "a malformed report"
    return payload


@dataclass(frozen=True)
class Budget:
    """What one sandboxed test run may spend. CPU seconds, not wall-clock ones, decide
    verdicts (a process's CPU time barely changes when the machine is busy): importing the
    module under test gets ``import_cpu``, the tests together ``test_cpu``. The wall clock
    is only a backstop, ``wall_factor`` times the CPU budgets plus ``wall_slack``; a run
    that hits it is retried once with four times as much before it counts as a timeout.
    ``memory_mb`` is the address-space limit of the run (measured per module by
    :mod:`trackb_core.difftest`, else :data:`IMPORT_MEMORY_MB`)."""

    import_cpu: float = 60.0
    test_cpu: float = 10.0
    memory_mb: int = 0
    wall_factor: float = 3.0
    wall_slack: float = 10.0

    def wall(self) -> float:
        return self.wall_factor * (self.import_cpu + self.test_cpu) + self.wall_slack


# The address space importing a module may take: CUDA builds of torch reserve several GiB
# of virtual memory at import, which is not memory in use. Test runs of a changed
# function get the import's measured peak plus TEST_MEMORY_MB. What any run may keep
# resident is RESIDENT_MB, watched by the parent (and the pod's memory limit outside).
IMPORT_MEMORY_MB = 16384
TEST_MEMORY_MB = 1024
RESIDENT_MB = 3072


def run_tests(files: dict[str, str], module: str, view: Path, budget: Budget,
              require_minimum: bool = True, python_path: list[Path] | None = None) -> dict:
    """``{"outcome", "results", "skipped", "failure", "sandbox", "cpu", "import_cpu"}`` of
    one sandboxed run.

    ``files`` is the sandbox tree (:func:`module_files` plus the test file as
    ``TEST_MODULE.py``), ``module`` the dotted name imported first, ``view`` the corpus
    view on ``sys.path`` (then ``python_path``, e.g. the corpus's execution environment).
    ``outcome`` is ``ran`` (``results``: ``[name, passed|failed|error|timeout, message]``
    per case, ``cpu`` the CPU seconds of each), ``timeout`` (the wall-clock backstop
    fired twice), ``error`` (the sandbox killed the run, or no single well-formed report
    came back: ``failure`` says why), ``below_minimum`` (the sandbox could not reach its
    minimum isolation; nothing ran), ``import_timeout`` (importing the module under test
    took more than ``budget.import_cpu``), ``import_module`` or ``import_tests``
    (``failure`` says what did not import).
    """
    runner = (f"MODULE = {module!r}\nTEST_MODULE = {TEST_MODULE!r}\n"
              f"IMPORT_CPU = {float(budget.import_cpu)!r}\nTEST_CPU = {float(budget.test_cpu)!r}\n"
              + TEST_RUNNER)
    cpu_limit = int(budget.import_cpu + budget.test_cpu) + 5
    result = None
    for wall in (budget.wall(), 4 * budget.wall()):
        result = run_python(runner, files=files, timeout=wall, cpu_seconds=cpu_limit,
                            memory_mb=budget.memory_mb or IMPORT_MEMORY_MB,
                            resident_mb=RESIDENT_MB,
                            python_path=[view], library_path=python_path, report=True,
                            require_minimum=require_minimum)
        if result.status != "timeout":
            break
    outcome: dict[str, Any] = {"sandbox": result, "results": [], "skipped": [], "failure": None,
                               "cpu": [], "import_cpu": None, "vm_peak_kb": None}
    if result.status == "timeout":
        outcome["outcome"] = "timeout"
        return outcome
    if result.status == "below_minimum":
        outcome.update(outcome="below_minimum", failure=result.reason)
        return outcome
    payload = parse_report(result.report)
    if isinstance(payload, str):
        why = payload if result.status in ("ok", "failed") else \
            f"sandbox {result.status}: {result.reason or payload}"
        outcome.update(outcome="error", failure=why)
    elif payload["stage"] == "ran":
        outcome.update(outcome="ran", results=payload["results"], skipped=payload["skipped"],
                       cpu=payload.get("cpu", []), import_cpu=payload.get("import_cpu"),
                       vm_peak_kb=payload.get("vm_peak_kb"))
    else:
        outcome.update(outcome=payload["stage"], failure=payload)
    return outcome


def run_against(tests: str, item: dict, corpus: Path, budget: Budget, *,
                function_source: str | None = None, require_minimum: bool = True,
                python_path: list[Path] | None = None) -> dict | str:
    """Run the test file ``tests`` in the sandbox against the module of ``item``'s
    function: as the corpus has it, or (``function_source``) with the function's lines
    replaced by that source (a mutant, a stub, a candidate answer).

    Returns :func:`run_tests`' outcome, or why nothing can run: an item whose
    ``source_file`` is not a ``.py`` file inside ``corpus``, a nested function (no
    import path), or a function no longer where ``line``/``end_line`` say. Raises
    nothing else than OSError from reading the corpus.
    """
    if "<locals>" in str(item.get("qualname", "")):
        return "a nested function has no import path"
    source_file = corpus_file(item)
    if source_file is None:
        return ("source_file is not a .py path inside the corpus: "
                f"{str(item.get('source_file'))[:120]!r}")
    # several corpora: each imports from its own folder of the snapshot
    corpus, source_file = import_root(Path(corpus).resolve(), source_file)
    path = corpus / source_file
    if not path.is_file() or path.is_symlink():
        return f"source file not in corpus: {source_file!r}"
    file_text = path.read_text(encoding="utf-8", errors="replace")
    if function_source is not None:
        span = locate(file_text, item)
        if isinstance(span, str):
            return span
        file_text = replace_function(file_text, span, function_source)
    view = corpus_view(corpus, source_file)
    files = {**module_files(view, source_file, file_text), f"{TEST_MODULE}.py": tests}
    return run_tests(files, module_path(source_file), view, budget, require_minimum,
                     python_path)


def corpus_file(item: dict) -> str | None:
    """The item's ``source_file`` if it is a relative ``.py`` path inside the corpus."""
    value = item.get("source_file")
    if not isinstance(value, str) or not value.endswith(".py"):
        return None
    parts = Path(value).parts
    if not parts or Path(value).is_absolute() or ".." in parts or "\x00" in value:
        return None
    return value


def side_status(outcome: dict) -> str:
    """One run's outcome in a word: ``passed`` (every case passed), ``failed`` (a case
    failed or raised, or the module or the tests did not import), ``timeout`` (a CPU
    budget ran out, or the wall-clock backstop fired twice), ``below_minimum``,
    ``error`` (the sandbox killed it or no report came back), ``no_cases``."""
    kind = outcome["outcome"]
    if kind in ("timeout", "import_timeout"):
        return "timeout"
    if kind in ("below_minimum", "error"):
        return kind
    if kind in ("import_module", "import_tests"):
        return "failed"
    results = outcome["results"]
    if not results:
        return "no_cases"
    if any(r[1] in ("failed", "error") for r in results):
        return "failed"
    if any(r[1] == "timeout" for r in results):
        return "timeout"
    return "passed"


def kills_of(mutant: dict, cases: int) -> tuple[bool | None, str]:
    """``(kills, status)`` of a run on a mutant: a kill only on a real assertion failure
    or error (a case, or the module failing to import), never on a timeout; None when
    the run timed out or could not run."""
    status = side_status(mutant)
    if status == "failed":
        return True, status
    if status == "passed":
        return len(mutant["results"]) != cases, status
    return None, status


def scaled_budget(budget: Budget, original: dict) -> Budget:
    """The budget for a run of the same tests on a changed function, from what the
    original's run measured: ten times its tests' CPU time (at least one second, no more
    than ``budget`` allows), and the address space its import reached plus
    :data:`TEST_MEMORY_MB`."""
    measured = sum(x for x in original.get("cpu") or [] if isinstance(x, int | float))
    peak_kb = original.get("vm_peak_kb")
    memory = (int(peak_kb) // 1024 + TEST_MEMORY_MB) if isinstance(peak_kb, int) and peak_kb \
        else budget.memory_mb
    return replace(budget, test_cpu=min(budget.test_cpu, max(1.0, 10 * measured)),
                   memory_mb=memory)


def timeout_reason(outcome: dict, budget: Budget) -> str:
    if outcome["outcome"] == "import_timeout":
        return f"importing the module took over {budget.import_cpu:g} CPU seconds"
    if outcome["outcome"] == "timeout":
        return f"no result within {budget.wall():g} s of wall-clock time, twice"
    return f"the tests took over {budget.test_cpu:g} CPU seconds"


# -- hidden tests ------------------------------------------------------------------------

HIDDEN_STATUSES = ("passed", "failed", "no_tests", "not_executable", "timeout")


def candidate_function(code: str, name: str) -> str | None:
    """The source of the definition of ``name`` that running ``code`` binds, from its
    ``def`` line (decorators stay the corpus's), dedented; None when there is none."""
    node = bound_function(code, name)
    if node is None:
        return None
    lines = code.split("\n")[node.lineno - 1:node.end_lineno]
    return textwrap.dedent("\n".join(lines)) + "\n"


def hidden_test_verdict(code: str | None, item: dict, corpus: Path | None, *,
                        require_minimum: bool = True, python_path: list[Path] | None = None
                        ) -> dict[str, Any]:
    """Run the item's hidden tests (``item["hidden_tests"]``, validated by
    :mod:`trackb_core.difftest`) on an answer's code: the definition of the function's
    name that the code binds replaces the function in its module.

    Returns ``{"hidden": status, "hidden_reason": why}``; status is ``passed``, ``failed``
    (a case failed or raised, the code has no such function or does not parse, the
    module does not import with it, or it ran out of CPU time), ``no_tests`` (the item
    has none), ``not_executable`` (no corpus, the sandbox cannot run here, or the tests
    do not pass on the original in this environment) or ``timeout`` (on the original, or
    the wall-clock backstop fired twice: neither a pass nor a failure). An answer that
    restores the original exactly passes without a run: the tests were validated on that
    very function at extract. For any other, the tests run on the original first, once
    per item and process: its CPU time (ten times, at least a second) and import
    footprint (plus :data:`TEST_MEMORY_MB`) are the candidate's budget. Raises nothing.
    """
    hidden = item.get("hidden_tests") if isinstance(item, dict) else None
    if not isinstance(hidden, dict) or not isinstance(hidden.get("code"), str):
        return {"hidden": "no_tests", "hidden_reason": "the item has no hidden tests"}
    if corpus is None:
        return {"hidden": "not_executable", "hidden_reason": "no corpus"}
    original = str(item.get("source_function", ""))
    target = first_function(original)
    candidate = candidate_function(code or "", target.name) if target is not None else None
    if candidate is None:
        return {"hidden": "failed", "hidden_reason": "no definition of the function"}
    if restores_original(code or "", original):
        # the function the tests were validated on at extract (they pass on it, fail on
        # its mutant and a stub): nothing a run could add
        return {"hidden": "passed", "hidden_reason": "the original function, exactly"}
    try:
        reference = _reference_run(hidden["code"], item, Path(corpus), require_minimum,
                                   python_path)
        if isinstance(reference, str):
            return {"hidden": "timeout" if reference.startswith("timeout") else
                    "not_executable", "hidden_reason": reference}
        budget = scaled_budget(Budget(test_cpu=REFERENCE_CPU), reference)
        run = run_against(hidden["code"], item, Path(corpus), budget,
                          function_source=candidate, require_minimum=require_minimum,
                          python_path=python_path)
    except Exception as exc:  # noqa: BLE001 - a checker bug must cost one item, no more
        return {"hidden": "not_executable",
                "hidden_reason": f"the checker failed: {type(exc).__name__}: {exc}"[:300]}
    if isinstance(run, str):
        return {"hidden": "not_executable", "hidden_reason": run}
    if run["outcome"] in ("below_minimum",):
        return {"hidden": "not_executable", "hidden_reason": str(run["failure"])}
    if run["outcome"] in ("timeout", "import_timeout"):
        return {"hidden": "timeout", "hidden_reason": timeout_reason(run, budget)}
    if run["outcome"] == "error":
        return {"hidden": "failed", "hidden_reason": str(run["failure"])[:300]}
    status = side_status(run)
    if status == "passed" and len(run["results"]) != int(hidden.get("cases") or 0):
        status = "failed"
    if status == "timeout":  # the candidate's own cases ran out of CPU time
        return {"hidden": "failed", "hidden_reason": timeout_reason(run, budget)}
    bad = [r for r in run["results"] if r[1] != "passed"]
    why = f"{bad[0][0]}: {bad[0][1]}: {bad[0][2]}"[:300] if bad else (
        f"{len(run['results'])} passed" if status == "passed" else str(run["failure"])[:300])
    return {"hidden": "passed" if status == "passed" else "failed", "hidden_reason": why}


# CPU seconds the hidden tests may take on the original (where budgets are measured).
REFERENCE_CPU = 30.0
_REFERENCES: dict[str, dict | str] = {}
_REFERENCE_LOCK = threading.Lock()


def _reference_run(tests: str, item: dict, corpus: Path, require_minimum: bool,
                   python_path: list[Path] | None) -> dict | str:
    """The hidden tests run on the original, once per process and item: the run whose
    CPU time and import footprint size every candidate's budget here (measured on this
    machine, not stored with the item), or why the tests cannot judge here: they do not
    pass on the original in this environment (``not executable: ...``) or it timed out
    (``timeout: ...``)."""
    key = hashlib.sha256(json.dumps([str(corpus), item.get("source_file"), item.get("line"),
                                     tests, [str(p) for p in python_path or []]]).encode()
                         ).hexdigest()
    with _REFERENCE_LOCK:
        if key in _REFERENCES:
            return _REFERENCES[key]
    budget = Budget(test_cpu=REFERENCE_CPU)
    run = run_against(tests, item, corpus, budget, require_minimum=require_minimum,
                      python_path=python_path)
    if isinstance(run, str):
        found: dict | str = f"not executable: {run}"
    elif run["outcome"] in ("timeout", "import_timeout") or side_status(run) == "timeout":
        found = f"timeout: on the original, {timeout_reason(run, budget)}"
    elif side_status(run) != "passed":
        found = ("not executable: the hidden tests do not pass on the original here "
                 f"({side_status(run)}: {str(run['failure'] or run['results'][:1])[:160]})")
    else:
        found = run
    with _REFERENCE_LOCK:
        _REFERENCES[key] = found
    return found


def hidden_functional(verdict: dict[str, Any]) -> bool | None:
    """The functional check a family with hidden tests reports: True (they pass), False
    (they fail), None (no tests, or they could not run: never a pass)."""
    status = verdict.get("hidden")
    return True if status == "passed" else False if status == "failed" else None


# -- the corpus view ----------------------------------------------------------------------

_VIEWS: dict[tuple[str, str], Path] = {}
_VIEW_ROOT: list[Path] = []
_VIEW_LOCK = threading.Lock()  # verdicts run in threads; one view is built once


def _view_root() -> Path:
    if not _VIEW_ROOT:
        _VIEW_ROOT.append(Path(tempfile.mkdtemp(prefix="trackb-views-")))
        atexit.register(remove_tree, _VIEW_ROOT[0])
    return _VIEW_ROOT[0]


def corpus_view(corpus: Path, exclude: str | None) -> Path:
    """A read-only copy of ``corpus`` without the file ``exclude`` (the module under
    test; None: every file), made of hard links where the file system allows (copies
    elsewhere), cached for the life of the process. Symbolic links are left out.

    Raises ValueError if ``exclude`` is absolute or leaves the corpus.
    """
    relative = Path(exclude) if exclude is not None else None
    if relative is not None and (relative.is_absolute() or ".." in relative.parts
                                 or not relative.parts):
        raise ValueError(f"not a path inside the corpus: {exclude!r}")
    corpus = Path(corpus).resolve()
    key = (str(corpus), relative.as_posix() if relative is not None else "\0")
    with _VIEW_LOCK:
        if key in _VIEWS and _VIEWS[key].is_dir():
            return _VIEWS[key]
        return _build_view(corpus, relative, key)


def _build_view(corpus: Path, relative: Path | None, key: tuple[str, str]) -> Path:
    name = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    target = _view_root() / name
    if target.is_dir():  # built by another process that shares the root (forked workers)
        _VIEWS[key] = target
        return target
    staging = _view_root() / f".{name}-{os.getpid()}"
    remove_tree(staging)
    stack = [Path(".")]
    while stack:
        folder = stack.pop()
        (staging / folder).mkdir(parents=True, exist_ok=True)
        try:
            entries = list(os.scandir(corpus / folder))
        except OSError:
            continue
        for entry in entries:
            rel = folder / entry.name
            if entry.is_symlink() or rel == relative:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(rel)
            elif entry.is_file(follow_symlinks=False):
                try:
                    if entry.stat().st_size > VIEW_FILE_BYTES:
                        continue
                    try:
                        os.link(entry.path, staging / rel)
                    except OSError:
                        shutil.copyfile(entry.path, staging / rel)
                except OSError:
                    continue
    try:
        staging.rename(target)
    except OSError:
        # Forked workers share the view root: another process built the same view (same
        # key, same files) first. Use it; never remove one that may be in use.
        if not target.is_dir():
            raise
        remove_tree(staging)
    _VIEWS[key] = target
    return target


def corpus_names(corpus: Path, name: str | None) -> bool:
    """True if the top-level module ``name`` comes from the corpus (not a missing library)."""
    if not name:
        return False
    top = name.split(".")[0]
    return (corpus / top).is_dir() or (corpus / f"{top}.py").is_file()
