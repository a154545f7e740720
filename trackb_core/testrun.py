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
from pathlib import Path
from typing import Any

from trackb_core.codeblocks import parses
from trackb_core.pyast import dump, functions_named
from trackb_core.sandbox import remove_tree, run_python

# The test file's module name in the sandbox tree.
TEST_MODULE = "test_generated"
# A corpus file larger than this is not put in a view (source corpora hold small files).
VIEW_FILE_BYTES = 1 << 20
RESULT_KINDS = ("passed", "failed", "error")

TEST_RUNNER = r"""
import asyncio, importlib, inspect, itertools, json, os, pathlib, sys, tempfile

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

try:
    importlib.import_module(MODULE)
except BaseException as exc:
    report(failure("import_module", exc))
    raise SystemExit(0)
try:
    tests = importlib.import_module(TEST_MODULE)
except BaseException as exc:
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

results = []
for name, call in cases:
    try:
        call()
        results.append([name, "passed", ""])
    except AssertionError as exc:
        results.append([name, "failed", ("AssertionError: " + text(exc))[:200]])
    except BaseException as exc:
        results.append([name, "error", (type(exc).__name__ + ": " + text(exc))[:200]])
report({"stage": "ran", "results": results, "skipped": skipped})
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
            "ran", "import_module", "import_tests"):
        return "a malformed report"
    if payload["stage"] != "ran":
        for key in ("error", "message"):
            if not isinstance(payload.get(key), str):
                return "a malformed report"
        if payload.get("name") is not None and not isinstance(payload["name"], str):
            return "a malformed report"
        return payload
    results, skipped = payload.get("results"), payload.get("skipped")
    if not isinstance(results, list) or not isinstance(skipped, list):
        return "a malformed report"
    for entry in [*results, *skipped]:
        if not isinstance(entry, list) or not all(isinstance(x, str) for x in entry):
            return "a malformed report"
    if any(len(r) != 3 or r[1] not in RESULT_KINDS for r in results) \
            or any(len(s) != 2 for s in skipped):
        return "a malformed report"
    return payload


def run_tests(files: dict[str, str], module: str, view: Path, timeout: float,
              require_minimum: bool = True) -> dict:
    """``{"outcome", "results", "skipped", "failure", "sandbox"}`` of one sandboxed run.

    ``files`` is the sandbox tree (:func:`module_files` plus the test file as
    ``TEST_MODULE.py``), ``module`` the dotted name imported first, ``view`` the corpus
    view on ``sys.path``. ``outcome`` is ``ran`` (``results``: ``[name,
    passed|failed|error, message]`` per case), ``timeout``, ``error`` (the sandbox
    killed the run, or no single well-formed report came back: ``failure`` says why),
    ``below_minimum`` (the sandbox could not reach its minimum isolation; nothing ran),
    ``import_module`` or ``import_tests`` (``failure`` says what did not import).
    """
    runner = f"MODULE = {module!r}\nTEST_MODULE = {TEST_MODULE!r}\n" + TEST_RUNNER
    result = run_python(runner, files=files, timeout=timeout, python_path=[view],
                        report=True, require_minimum=require_minimum)
    outcome: dict[str, Any] = {"sandbox": result, "results": [], "skipped": [], "failure": None}
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
        outcome.update(outcome="ran", results=payload["results"], skipped=payload["skipped"])
    else:
        outcome.update(outcome=payload["stage"], failure=payload)
    return outcome


# -- the corpus view ----------------------------------------------------------------------

_VIEWS: dict[tuple[str, str], Path] = {}
_VIEW_ROOT: list[Path] = []
_VIEW_LOCK = threading.Lock()  # verdicts run in threads; one view is built once


def _view_root() -> Path:
    if not _VIEW_ROOT:
        _VIEW_ROOT.append(Path(tempfile.mkdtemp(prefix="trackb-views-")))
        atexit.register(remove_tree, _VIEW_ROOT[0])
    return _VIEW_ROOT[0]


def corpus_view(corpus: Path, exclude: str) -> Path:
    """A read-only copy of ``corpus`` without the file ``exclude`` (the module under
    test), made of hard links where the file system allows (copies elsewhere), cached
    for the life of the process. Symbolic links are left out.

    Raises ValueError if ``exclude`` is absolute or leaves the corpus.
    """
    relative = Path(exclude)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"not a path inside the corpus: {exclude!r}")
    corpus = Path(corpus).resolve()
    key = (str(corpus), relative.as_posix())
    with _VIEW_LOCK:
        if key in _VIEWS and _VIEWS[key].is_dir():
            return _VIEWS[key]
        return _build_view(corpus, relative, key)


def _build_view(corpus: Path, relative: Path, key: tuple[str, str]) -> Path:
    name = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    target = _view_root() / name
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
    remove_tree(target)
    staging.rename(target)
    _VIEWS[key] = target
    return target


def corpus_names(corpus: Path, name: str | None) -> bool:
    """True if the top-level module ``name`` comes from the corpus (not a missing library)."""
    if not name:
        return False
    top = name.split(".")[0]
    return (corpus / top).is_dir() or (corpus / f"{top}.py").is_file()
