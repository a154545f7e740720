"""Reference unit tests by differential execution: what the corpus's own code does, as tests.

For a function the sandbox can call (a module-level function, a ``staticmethod`` or a
``classmethod``, not async, not a generator, whose module imports in the sandbox), one
sandboxed run per module (:data:`DERIVE_RUNNER`) draws inputs for each target, calls the
original on them and records what it did: the value it returned (when it has a literal
form), the exception it raised (a built-in one), and how it changed a mutable argument.
Inputs come from annotations, defaults and parameter names (:func:`value_pools`),
combined by a generator seeded from the function's id, so a rerun derives the same
tests. Each call runs twice on fresh copies; a call whose two outcomes differ (time,
randomness, identity) is dropped.

The recorded calls become a plain-``assert`` test file (:func:`test_file`), which is kept
only if, run in the sandbox like any other test (:mod:`trackb_core.testrun`), it passes on
the original, **kills the function's mutant** (a real assertion failure or error, not a
timeout) and **fails on a trivial body** (the signature returning ``None``): tests a stub
passes are no hidden tests. Kept tests are the reference teacher's ``unit_test`` answer
and the hidden tests of the function's ``complete`` and ``bugfix`` items.

Corpus code is untrusted: it runs only in the sandbox, under CPU-time budgets, so a busy
machine does not change which calls are kept.
"""

from __future__ import annotations

import ast
import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackb_core import testrun
from trackb_core.codeblocks import parses
from trackb_core.pyast import first_function, module_path
from trackb_core.sandbox import run_python
from trackb_core.testrun import (
    IMPORT_MEMORY_MB,
    RESIDENT_MB,
    TEST_MEMORY_MB,
    Budget,
)

# Calls tried per target and tests kept per function (more rarely adds a kill and
# always costs run time on every candidate at eval).
MAX_CALLS = 48
MAX_CASES = 8
# The longest literal (repr) a test may hold: an argument or a result.
MAX_LITERAL = 300
VERSION = 2  # bump when derived tests change for the same corpus and seed
# CPU seconds one call may take, all calls of one target together, importing a module,
# and a module's derived tests together when they are checked in a fresh run.
CALL_CPU = 0.5
TARGET_CPU = 4.0
IMPORT_CPU = 60.0
VALIDATE_CPU = 30.0
# Modules imported in one derivation run: their heavy imports (torch) are paid once. A run
# that fails as a whole (a module's import kills the interpreter) is split in halves.
MODULES_PER_RUN = 32

# Values drawn for a parameter, by what its annotation or name says it is.
POOLS: dict[str, list[str]] = {
    "int": ["0", "1", "2", "3", "-1", "7", "10", "100"],
    "float": ["0.0", "1.0", "0.5", "-2.5", "3.75", "100.0"],
    "bool": ["True", "False"],
    "str": ["''", "'a'", "'abc'", "'hello world'", "'Foo_bar-1'", "'x.y.z'", "'  pad  '",
            "'path/to/file.txt'", "'123'", "'A'"],
    "bytes": ["b''", "b'abc'", "b'\\x00\\xff'"],
    "list": ["[]", "[1, 2, 3]", "[3, 1, 2]", "['a', 'b']", "[0]", "[1, 1, 2]", "[[1, 2], [3]]"],
    "tuple": ["()", "(1, 2)", "('a', 1)", "(1, 2, 3)"],
    "dict": ["{}", "{'a': 1}", "{'a': 1, 'b': 2}", "{'x': 'y'}", "{'a': {'b': 1}}"],
    "set": ["set()", "{1, 2}", "{'a'}"],
    "none": ["None"],
    # small tensors, written as they are in a test: torch.tensor(<list>, dtype=...)
    "tensor": ["torch.tensor([1.0, 2.0, 3.0])", "torch.tensor([[1.0, -1.0], [0.5, 2.0]])",
               "torch.tensor([1, 0, 1])", "torch.tensor([[1, 1, 0], [1, 0, 0]])",
               "torch.tensor([True, False, True])", "torch.tensor([[0.5, 1.5, -2.0]])",
               "torch.tensor([2, 3, 4])", "torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])"],
}
# Parameter names (whole name, prefix or suffix) and the pools they suggest.
NAME_HINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tensor|tensors|logits|mask|attention_mask|input_ids|labels|log_probs|logprobs|log_prob|"
     "old_log_prob|probs|rewards|advantages|position_ids|hidden_states|response_mask|"
     "token_level_rewards|token_level_scores|entropy|loss_mask|ids", ("tensor",)),
    ("n|num|count|size|length|len|idx|index|step|steps|k|i|j|dim|depth|level|batch_size|"
     "world_size|rank|seed|width|height|total|limit|offset|start|end|stop|max|min|epoch",
     ("int",)),
    ("name|path|prefix|suffix|text|string|s|key|label|sep|fmt|pattern|word|line|msg|"
     "message|url|mode|dtype|device|tag|char|file|filename|dir|folder|model|token|role",
     ("str",)),
    ("is|has|use|enable|enabled|disable|flag|verbose|strict|allow|should|do|with|return",
     ("bool",)),
    ("items|values|xs|lst|list|seq|sequence|array|arr|nums|numbers|elements|keys|names|"
     "lines|tokens|ids|shape|sizes|lengths", ("list", "tuple")),
    ("config|cfg|kwargs|mapping|d|dct|dict|params|options|opts|state|data|meta|info",
     ("dict",)),
    ("ratio|rate|prob|p|alpha|beta|gamma|temperature|scale|factor|eps|weight|lr|x|y|value|"
     "val|score", ("float", "int")),
)
_ANNOTATION_POOLS = {
    "int": ("int",), "float": ("float", "int"), "bool": ("bool",), "str": ("str",),
    "bytes": ("bytes",), "list": ("list",), "List": ("list",), "Sequence": ("list", "tuple"),
    "Iterable": ("list", "tuple"), "tuple": ("tuple",), "Tuple": ("tuple",),
    "dict": ("dict",), "Dict": ("dict",), "Mapping": ("dict",), "set": ("set",),
    "Set": ("set",), "None": ("none",), "Optional": ("none",), "Any": (),
    "Tensor": ("tensor",),
}
# Types whose values tests name as literals.
LITERAL_TYPES = ("NoneType", "bool", "int", "float", "str", "bytes", "list", "tuple", "dict",
                 "set", "frozenset")
# Exceptions a test may expect (a corpus-defined one cannot be named without importing it).
EXPECTABLE = ("ValueError", "TypeError", "KeyError", "IndexError", "ZeroDivisionError",
              "AssertionError", "AttributeError", "RuntimeError", "NotImplementedError",
              "OverflowError", "LookupError", "ArithmeticError", "StopIteration")


def _annotation_kinds(annotation: str | None) -> tuple[str, ...]:
    if not annotation:
        return ()
    tree = parses(annotation.strip())
    if tree is None:
        return ()
    kinds: list[str] = []
    for node in ast.walk(tree):
        name = node.id if isinstance(node, ast.Name) else \
            node.attr if isinstance(node, ast.Attribute) else \
            "None" if isinstance(node, ast.Constant) and node.value is None else None
        for kind in _ANNOTATION_POOLS.get(name or "", ()):
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


def _name_kinds(name: str) -> tuple[str, ...]:
    words = name.lower().strip("_").split("_")
    for pattern, kinds in NAME_HINTS:
        options = pattern.split("|")
        if name.lower().strip("_") in options or words[0] in options or words[-1] in options:
            return kinds
    return ()


def value_pools(arg: dict[str, Any]) -> list[str]:
    """Python literals (source text) to try for one parameter (an extract ``args`` entry:
    ``name``, ``annotation``, ``default``), most plausible first: its default, then the
    pools its annotation names, else those its name suggests, else a mix of all."""
    kinds = _annotation_kinds(arg.get("annotation")) or _name_kinds(str(arg.get("name", "")))
    values: list[str] = []
    default = arg.get("default")
    if isinstance(default, str) and _literal(default) is not None:
        values.append(default)
    for kind in kinds or ("int", "str", "list", "float", "dict", "bool", "none"):
        values += [v for v in POOLS[kind] if v not in values]
    return values


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


@dataclass(frozen=True)
class Target:
    """A function the derivation run may call: its functions.jsonl row's id, how to reach
    it from its module (``Name`` or ``Class.name``), and the calls to try (each
    ``(positional literals, keyword literals)``, as source text)."""

    function_id: str
    qualname: str
    calls: tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...]


def callable_target(row: dict[str, Any]) -> str | None:
    """Why a functions.jsonl row cannot be called by a derivation run, or None if it can:
    a module-level function (other decorators are kept: the module binds what they
    return), or a method of a module-level class (an instance method is called on an
    instance made without ``__init__``, ``Class.__new__(Class)``: methods that need
    what ``__init__`` sets fail on it and get no tests); not async, not a generator, no
    property or context manager."""
    qualname = str(row.get("qualname", ""))
    parts = qualname.split(".")
    if "<locals>" in parts or len(parts) > 2:
        return "nested"
    decorators = [str(d) for d in row.get("decorators") or []]
    if {"property", "contextmanager", "asynccontextmanager", "overload"} & {
            d.split(".")[-1].split("(")[0] for d in decorators}:
        return "decorated"  # what it returns is no value a test can name
    if row.get("is_async"):
        return "async"
    tree = parses(str(row.get("source", "")))
    node = first_function(str(row.get("source", ""))) if tree is not None else None
    if node is None:
        return "unparsable"
    if any(isinstance(n, ast.Yield | ast.YieldFrom) for n in ast.walk(node)):
        return "generator"
    return None


def instance_method(row: dict[str, Any]) -> bool:
    """Whether a functions.jsonl row is a method called on an instance (not a
    ``staticmethod`` or ``classmethod``)."""
    decorators = {str(d) for d in row.get("decorators") or []}
    return "." in str(row.get("qualname", "")) and not {"staticmethod",
                                                         "classmethod"} & decorators


def plan_calls(row: dict[str, Any], seed: int = 0, limit: int = MAX_CALLS
               ) -> tuple[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], ...]:
    """The calls to try on a function: a seeded, deterministic sample of the product of
    its parameters' :func:`value_pools` (defaults left out half the time), first the one
    call made of each parameter's most plausible value."""
    import random  # noqa: PLC0415 - only the planner draws

    params = [a for a in row.get("args") or [] if a.get("kind") in ("arg", "posonly", "kwonly")]
    decorators = {str(d) for d in row.get("decorators") or []}
    if "." in str(row.get("qualname", "")) and params and "staticmethod" not in decorators:
        params = params[1:]  # self or cls: given by the call
    pools = [value_pools(a) for a in params]
    digest = hashlib.sha256(f"{seed}:{row.get('id')}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    seen: set[tuple] = set()
    calls = []
    for attempt in range(limit * 4):
        if len(calls) >= limit:
            break
        positional: list[str] = []
        keywords: list[tuple[str, str]] = []
        skipped = False  # once a parameter is left to its default, the rest go by name
        for arg, pool in zip(params, pools, strict=True):
            if arg.get("default") is not None and arg.get("kind") != "posonly" \
                    and attempt and rng.random() < 0.5:
                skipped = True
                continue
            value = pool[0] if attempt == 0 else rng.choice(pool)
            if arg.get("kind") == "kwonly" or skipped:
                keywords.append((str(arg["name"]), value))
            else:
                positional.append(value)
        key = (tuple(positional), tuple(keywords))
        if key not in seen:
            seen.add(key)
            calls.append(key)
    return tuple(calls)


DERIVE_RUNNER = testrun.RUNNER_PRELUDE + r"""
import copy, importlib, importlib.util, inspect, json, math, os, sys
SAME_HELPER
# Names the call texts use. They are trackb's own pools or defaults that are literals
# (checked on the host); torch needs the real builtins to build a tensor.
SAFE = {"set": set, "frozenset": frozenset}
KINDS = (type(None), bool, int, float, str, bytes, list, tuple, dict, set, frozenset)
TENSOR_DTYPES = ("float32", "float64", "int64", "int32", "bool")

def is_tensor(value):
    return type(value).__name__ == "Tensor" and type(value).__module__.startswith("torch")

def literal(value, depth=0):
    if is_tensor(value):
        try:
            return (str(value.dtype).split(".")[-1] in TENSOR_DTYPES and value.numel() <= 50
                    and not value.requires_grad and value.device.type == "cpu"
                    and (not value.is_floating_point() or bool(value.isfinite().all())))
        except BaseException:
            return False
    if type(value) not in KINDS or depth > 6:
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return len(value) <= 50 and all(literal(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= 50 and all(literal(k, depth + 1) and literal(v, depth + 1)
                                        for k, v in value.items())
    return True

def text(value):
    "Source text that rebuilds value (tensors included, at any depth)."
    if is_tensor(value):
        return (f"torch.tensor({value.tolist()!r}, dtype=torch."
                f"{str(value.dtype).split('.')[-1]})")
    if isinstance(value, frozenset):
        return "frozenset(" + (text(set(value)) if value else "") + ")"
    if isinstance(value, set):
        return "{" + ", ".join(text(v) for v in value) + "}" if value else "set()"
    if isinstance(value, list):
        return "[" + ", ".join(text(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{text(k)}: {text(v)}" for k, v in value.items()) + "}"
    return repr(value)

def resolve(module, qualname, bare=False):
    owner, _, name = qualname.rpartition(".")
    if not owner:
        return getattr(module, name)
    cls = getattr(module, owner)
    if not bare:
        return getattr(cls, name)
    method = getattr(cls, name)
    return lambda *args, **kwargs: method(cls.__new__(cls), *args, **kwargs)

import tempfile

HOME = os.getcwd()  # the sandbox folder: the variant files are there

def call(function, positional, keywords):
    "(kind, value, positional args after the call), or None when over budget."
    # each call in a fresh empty folder: files an earlier call left (a folder made by
    # the original) must not make the mutant fail where a test run alone would not
    os.chdir(tempfile.mkdtemp())
    args = [eval(v, SAFE) for v in positional]
    kwargs = {k: eval(v, SAFE) for k, v in keywords}
    budget(CALL_CPU)
    try:
        value = function(*args, **kwargs)
        budget(0)
        return "return", value, args
    except Budget:
        return None
    except BaseException as exc:
        budget(0)
        return "raise", type(exc).__name__, args

def agrees(got, want):
    "Whether a run matches a recorded one, as the written test would judge it."
    if got is None:
        return None  # over budget: tells nothing
    if got[0] != want[0]:
        return False
    if got[0] == "raise":
        return got[1] == want[1]
    try:
        if not _same(got[1], want[1]):
            return False
        return all(_same(got[2][i], want[2][i]) for i in want[3])
    except BaseException:
        return False

def load_variant(name, path, original):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=getattr(original, "__path__", None))
    variant = importlib.util.module_from_spec(spec)
    sys.modules[name] = variant
    try:
        spec.loader.exec_module(variant)
    finally:
        sys.modules[name] = original
    return variant

def derive(entry):
    if "torch." in json.dumps(entry["targets"]) and "torch" not in SAFE:
        try:
            import torch
            SAFE["torch"] = torch
        except BaseException:
            pass
    started = cpu()
    try:
        budget(IMPORT_CPU)
        module = importlib.import_module(entry["module"])
        budget(0)
    except Budget:
        return {"stage": "import_timeout", "import_cpu": round(cpu() - started, 3)}
    except BaseException as exc:
        budget(0)
        return {"stage": "import_module", "error": type(exc).__name__,
                "name": str(getattr(exc, "name", "") or "") or None,
                "message": str(exc)[:200], "import_cpu": round(cpu() - started, 3)}
    out = {"stage": "ran", "import_cpu": round(cpu() - started, 3), "vm_peak_kb": vm_peak_kb(),
           "results": {}}
    for target in entry["targets"]:
        try:
            function = resolve(module, target["qualname"], target["bare"])
        except BaseException:
            out["results"][target["id"]] = {"skipped": "not found on the module"}
            continue
        if not callable(function) or inspect.iscoroutinefunction(function) \
                or inspect.isgeneratorfunction(function):
            out["results"][target["id"]] = {"skipped": "not a plain callable"}
            continue
        variants = {}
        for kind in ("mutant", "stub"):
            try:
                budget(IMPORT_CPU)
                path = os.path.join(HOME, target[kind])
                variants[kind] = resolve(load_variant(entry["module"], path, module),
                                         target["qualname"], target["bare"])
                budget(0)
            except BaseException:
                budget(0)
                variants[kind] = None
        kept, spent = [], 0.0
        for positional, keywords in target["calls"]:
            if len(kept) >= 3 * MAX_CASES or spent > TARGET_CPU:
                break
            before = cpu()
            try:
                first = call(function, positional, keywords)
                second = call(function, positional, keywords) if first else None
            except BaseException:
                first = second = None
            spent += cpu() - before
            if first is None or second is None:
                continue
            originals = [eval(v, SAFE) for v in positional]
            changed = [i for i, (was, now) in enumerate(zip(originals, first[2]))
                       if (isinstance(was, (list, dict, set)) or is_tensor(was))
                       and text(was) != text(now)]
            record = (first[0], first[1], first[2], changed)
            if agrees(second, record) is not True:
                continue  # not deterministic
            if first[0] == "return" and not literal(first[1]):
                continue
            if first[0] == "raise" and first[1] not in EXPECTABLE:
                continue
            if any(not literal(first[2][i]) for i in changed):
                continue
            kills = {}
            for kind, variant in variants.items():
                if variant is None:
                    kills[kind] = None
                    continue
                before = cpu()
                try:
                    verdict = agrees(call(variant, positional, keywords), record)
                except BaseException:
                    verdict = False
                spent += cpu() - before
                kills[kind] = None if verdict is None else not verdict
            kept.append({"args": list(positional), "kwargs": [list(k) for k in keywords],
                         "kind": first[0],
                         "value": text(first[1]) if first[0] == "return" else first[1],
                         "changed": [[i, text(first[2][i])] for i in changed],
                         "kills_mutant": kills["mutant"], "kills_stub": kills["stub"]})
        out["results"][target["id"]] = {"cases": kept, "cpu": round(spent, 3)}
    return out

reports = {}
corpus_tops = {entry["module"].split(".")[0] for entry in MODULES}
for entry in MODULES:
    loaded = set(sys.modules)
    reports[entry["module"]] = derive(entry)
    # the next module imports as in a fresh process: none of the corpus's modules loaded
    # (third-party ones, torch, stay: importing them again would change nothing)
    for name in [n for n in sys.modules if n not in loaded]:
        if name.split(".")[0] in corpus_tops:
            del sys.modules[name]
os.write(REPORT_FD, (json.dumps(reports) + "\n").encode())
"""


# -- composing a test file ------------------------------------------------------------

_SAME = '''

def _same(got, want, tol=1e-9):
    """Equal, floats within tol relative (another order of the same arithmetic); tensors
    of the same dtype and shape with equal values (float32 within 1e-5)."""
    if type(want).__name__ == "Tensor":
        return (type(got).__name__ == "Tensor" and got.dtype == want.dtype
                and tuple(got.shape) == tuple(want.shape)
                and _same(got.tolist(), want.tolist(), 1e-5 if want.is_floating_point() else 0))
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return abs(got - want) <= tol * max(1.0, abs(want))
    if isinstance(want, (list, tuple)) and type(got) is type(want):
        return len(got) == len(want) and all(_same(g, w, tol) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k], tol) for k in want)
    return type(got) is type(want) and got == want
'''


def _call_text(callee: str, case: dict[str, Any], names: dict[int, str]) -> str:
    args = [names.get(i, value) for i, value in enumerate(case["args"])]
    args += [f"{key}={value}" for key, value in case["kwargs"]]
    return f"{callee}({', '.join(args)})"


def test_file(module: str, qualname: str, cases: list[dict[str, Any]],
              bare: bool = False) -> str:
    """A plain-``assert`` test file for the recorded ``cases`` of ``module.qualname``:
    one ``test_*`` function per case; no pytest needed. ``bare``: an instance method,
    called on ``Class.__new__(Class)``."""
    top = qualname.split(".")[0]
    name = qualname.split(".")[-1].lstrip("_") or "function"
    uses_torch = "torch." in json.dumps(cases)
    lines = [*(["import torch", ""] if uses_torch else []), f"from {module} import {top}",
             _SAME.rstrip("\n")]
    for index, case in enumerate(cases):
        changed = {int(i): value for i, value in case.get("changed") or []}
        names = {i: f"arg{i}" for i in changed}
        body = [f"    arg{i} = {case['args'][i]}" for i in sorted(changed)]
        call = _call_text(qualname, case, names)
        if bare:
            call = call.replace("(", f"({top}.__new__({top})" + (", " if case["args"] or
                                                                  case["kwargs"] else ""), 1)
        if case["kind"] == "raise":
            body += ["    try:", f"        {call}", f"    except {case['value']}:",
                     "        pass", "    else:",
                     f"        raise AssertionError('expected {case['value']}')"]
        else:
            body += [f"    result = {call}", f"    assert _same(result, {case['value']}), result"]
        body += [f"    assert _same(arg{i}, {value}), arg{i}" for i, value in sorted(changed.items())]
        lines += ["", "", f"def test_{name}_{index}():", *body]
    return "\n".join(lines) + "\n"


def _usable(case: dict[str, Any]) -> bool:
    texts = [*case["args"], *(v for _, v in case["kwargs"]), str(case["value"]),
             *(v for _, v in case.get("changed") or [])]
    return all(len(t) <= MAX_LITERAL for t in texts)


def choose_cases(cases: list[dict[str, Any]], limit: int = MAX_CASES) -> list[dict[str, Any]]:
    """At most ``limit`` recorded cases: first those that tell the original from its
    mutant, then from the stub, then distinct results; no more than a third raising (a
    file of expected exceptions is passed by a body that only raises). Empty unless the
    chosen cases catch both the mutant and the stub."""
    usable = [c for c in cases if _usable(c)]
    ranked = sorted(usable, key=lambda c: (not c.get("kills_mutant"), not c.get("kills_stub"),
                                           c["kind"] != "return"))
    chosen: list[dict[str, Any]] = []
    values: set[str] = set()
    raising = 0
    for case in ranked:
        if len(chosen) >= limit:
            break
        useful = case.get("kills_mutant") or case.get("kills_stub") or case["value"] not in values
        if not useful:
            continue
        if case["kind"] == "raise":
            if 3 * (raising + 1) > limit:
                continue
            raising += 1
        values.add(str(case["value"]))
        chosen.append(case)
    if not any(c.get("kills_mutant") for c in chosen) \
            or not any(c.get("kills_stub") for c in chosen):
        return []
    if all(c["kind"] == "raise" for c in chosen):
        return []
    return chosen


def stub_of(source: str) -> str | None:
    """The trivial body a hidden test must reject: the function's own signature (and
    docstring) returning ``None``; None when the body shares the ``def`` line."""
    node = first_function(source)
    if node is None or not node.body or node.body[0].lineno == node.lineno:
        return None
    lines = source.split("\n")
    first = node.body[0]
    documented = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str)
    head_end = first.end_lineno if documented else first.lineno - 1
    indent = " " * first.col_offset
    return "\n".join([*lines[:head_end], f"{indent}return None"]) + "\n"


# -- deriving and validating --------------------------------------------------------------


@dataclass
class Derived:
    """What :func:`derive_tests` found: ``tests`` (function id -> its hidden tests:
    ``code``, ``cases``, ``version``: nothing that depends on the machine),
    ``reasons`` (function id -> why it has none) and ``modules`` (source file ->
    ``imported``, ``missing NAME``, ``import timeout`` or ``error KIND``)."""

    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)

    def counts(self, functions: list[dict[str, Any]]) -> dict[str, Any]:
        """The manifest's and card's summary: how many functions have tests, why the
        others do not, and the share of functions whose module imports in the sandbox."""
        reasons: dict[str, int] = {}
        for why in self.reasons.values():
            reasons[why] = reasons.get(why, 0) + 1
        imported = sum(self.modules.get(str(f.get("file")), "") == "imported" for f in functions)
        missing: dict[str, int] = {}
        for f in functions:
            status = self.modules.get(str(f.get("file")), "")
            if status.startswith("missing "):
                name = status.removeprefix("missing ")
                missing[name] = missing.get(name, 0) + 1
        return {
            "functions_with_tests": len(self.tests),
            "cases": sum(t["cases"] for t in self.tests.values()),
            "without_tests": dict(sorted(reasons.items())),
            "modules_tried": len(self.modules),
            "modules_imported": sum(s == "imported" for s in self.modules.values()),
            "functions_importable": imported,
            "importable_share": round(imported / len(functions), 4) if functions else None,
            "missing_modules": dict(sorted(missing.items(), key=lambda kv: (-kv[1], kv[0]))[:10]),
        }


def _module_status(report: dict[str, Any]) -> str:
    stage = report.get("stage")
    if stage == "ran":
        return "imported"
    if stage == "import_timeout":
        return "import timeout"
    if report.get("error") == "ModuleNotFoundError" and report.get("name"):
        return f"missing {str(report['name']).split('.')[0]}"
    return f"error {report.get('error') or stage}"


def derive_batch(corpus: Path, modules: dict[str, list[dict[str, Any]]],
                 mutants: dict[str, str], *, seed: int = 0, require_minimum: bool = True,
                 python_path: list[Path] | None = None) -> dict[str, dict[str, Any]]:
    """One sandboxed run that imports each module of ``modules`` (source file -> the
    rows to call there, maybe none) and records its targets' calls, checking each
    recorded call on the function's mutant and stub loaded as the same module: source
    file -> the runner's report (``stage`` ``ran``, ``import_cpu``, ``vm_peak_kb`` and
    ``results`` per function id; or why the module did not import, or
    ``{"stage": "error", "message"}`` when the run itself failed). Several modules share
    one process (the corpus's heavy imports are paid once): this is corpus code only,
    and every kept test is checked again in a run of its own (:func:`derive_tests`).
    Raises nothing for what the corpus code does; OSError if the corpus cannot be read.
    """
    corpus = Path(corpus).resolve()
    view = testrun.corpus_view(corpus, None)
    files: dict[str, str] = {}
    entries = []
    n_targets = 0
    for source_file, rows in sorted(modules.items()):
        file_text = (corpus / source_file).read_text(encoding="utf-8", errors="replace")
        files.update(testrun.module_files(view, source_file, file_text))
        targets = []
        for row in rows:
            item = {"qualname": row["qualname"], "function_name": row["name"],
                    "line": row["line"], "end_line": row["end_line"],
                    "source_function": row["source"]}
            try:
                span = testrun.locate(file_text, item)
                stub = stub_of(row["source"])
            except (RecursionError, MemoryError):
                continue  # nested too deeply to walk: no target, no tests
            if isinstance(span, str) or stub is None:
                continue
            paths = {}
            for kind, source in (("mutant", mutants[row["id"]]), ("stub", stub)):
                paths[kind] = f"_variants/{row['id']}-{kind}.py"
                files[paths[kind]] = testrun.replace_function(file_text, span, source)
            targets.append({"id": row["id"], "qualname": row["qualname"],
                            "bare": instance_method(row), "calls": plan_calls(row, seed),
                            **paths})
        n_targets += len(targets)
        entries.append({"module": module_path(source_file), "file": source_file,
                        "targets": targets})
    runner = ("import json\n" f"MODULES = json.loads({json.dumps(entries)!r})\n"
              f"IMPORT_CPU = {IMPORT_CPU!r}\nCALL_CPU = {CALL_CPU!r}\n"
              f"TARGET_CPU = {TARGET_CPU!r}\nMAX_CASES = {MAX_CASES!r}\n"
              f"EXPECTABLE = {EXPECTABLE!r}\n"
              + DERIVE_RUNNER.replace("SAME_HELPER", _SAME))
    cpu = IMPORT_CPU * len(entries) + (TARGET_CPU + 2 * IMPORT_CPU) * n_targets + 5
    budget = Budget()
    result = run_python(runner, files=files, timeout=budget.wall_factor * cpu + budget.wall_slack,
                        cpu_seconds=int(cpu) + 2, memory_mb=IMPORT_MEMORY_MB,
                        resident_mb=RESIDENT_MB,
                        disk_mb=256, python_path=[view], library_path=python_path, report=True,
                        require_minimum=require_minimum)
    failed = {"stage": "error", "message": f"sandbox {result.status}: {result.reason}"[:300]}
    if result.status == "below_minimum":
        failed = {"stage": "below_minimum", "message": result.reason}
    lines = [line for line in result.report.split(b"\n") if line.strip()]
    try:
        reports = json.loads(lines[0]) if len(lines) == 1 else None
    except ValueError:
        reports = None
    if not isinstance(reports, dict):
        return {entry["file"]: failed for entry in entries}
    return {entry["file"]: reports.get(entry["module"]) if isinstance(
        reports.get(entry["module"]), dict) else failed for entry in entries}


def _validation_file(module: str,
                     chosen: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]) -> str:
    """One test file holding every function's tests of a module, each test named
    ``test_<n>_...`` after the function's index, to check them all in one fresh run."""
    parts = []
    for index, (row, cases) in enumerate(chosen.values()):
        code = test_file(module, row["qualname"], cases, instance_method(row))
        parts.append(code.replace("def test_", f"def test_{index}_"))
    return "\n\n".join(parts)


def module_batches(files: Iterable[str]) -> list[list[str]]:
    """The derivation runs :func:`derive_tests` makes for functions in ``files`` (source
    files, repeats allowed): the files that are modules, sorted, :data:`MODULES_PER_RUN`
    at a time. A module's imports and calls share a process with the others of its run
    (its import CPU, what an earlier import left behind), so a partitioned extract
    gives each part whole runs (:func:`trackb_core.extract.file_parts`): the union of
    whole runs regroups into the same runs, all full but the last. Raises nothing."""
    names = sorted({str(f) for f in files
                    if testrun.corpus_file({"source_file": str(f)}) is not None})
    return [names[i:i + MODULES_PER_RUN] for i in range(0, len(names), MODULES_PER_RUN)]


def derive_tests(functions: list[dict[str, Any]], mutants: dict[str, str], corpus: Path, *,
                 seed: int = 0, workers: int = 2, require_minimum: bool = True,
                 python_path: list[Path] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Derived:
    """Hidden tests for ``functions`` (functions.jsonl rows) whose corpus-wide mutant is
    in ``mutants`` (function id -> buggy source).

    Every function's module is imported in the sandbox (so the share that imports is
    measured), :data:`MODULES_PER_RUN` modules per run (:func:`derive_batch`), ``workers``
    runs at a time. A function's cases are chosen (:func:`choose_cases`) and written as a
    test file (:func:`test_file`); a module's test files then run together, once, in a
    fresh sandbox exactly as hidden tests run later, and a function whose cases do not
    all pass there has none. ``progress(done, total)`` is called as runs finish.
    Deterministic for a corpus and ``seed``. Raises nothing for what the corpus code
    does; OSError if the corpus cannot be read.
    """
    derived = Derived()
    by_module: dict[str, list[dict[str, Any]]] = {}
    rows_by_id = {row["id"]: row for row in functions}
    for row in functions:
        source_file = str(row.get("file"))
        if testrun.corpus_file({"source_file": source_file}) is None:
            derived.reasons[row["id"]] = "not_a_module"
            continue
        targets = by_module.setdefault(source_file, [])
        try:
            why = callable_target(row) if row["id"] in mutants else "no_mutant"
        except (RecursionError, MemoryError):
            why = "too_deep"
        if why is not None:
            derived.reasons[row["id"]] = why
        else:
            targets.append(row)
    batches = module_batches(by_module)
    lock = threading.Lock()
    done = [0]

    def reports_of(batch: list[str]) -> dict[str, dict[str, Any]]:
        reports = derive_batch(corpus, {name: by_module[name] for name in batch}, mutants,
                               seed=seed, require_minimum=require_minimum,
                               python_path=python_path)
        whole = {str(r.get("stage")) for r in reports.values()}
        if len(batch) > 1 and whole <= {"error"}:
            # the run died as a whole: find the module that did it by halves
            half = len(batch) // 2
            return {**reports_of(batch[:half]), **reports_of(batch[half:])}
        return reports

    def one_batch(batch: list[str]) -> None:
        try:
            reports = reports_of(batch)
            for source_file in batch:
                _check_module(source_file, by_module[source_file], reports[source_file])
        except (OSError, RecursionError, MemoryError, ValueError) as exc:
            # odd corpus content must cost its tests, never the stage
            with lock:
                for source_file in batch:
                    derived.modules.setdefault(source_file, f"error {type(exc).__name__}")
                    for row in by_module[source_file]:
                        if row["id"] not in derived.tests:
                            derived.reasons.setdefault(row["id"], "checker_error")
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(batches))

    def _check_module(source_file: str, rows: list[dict[str, Any]],
                      report: dict[str, Any]) -> None:
        status = _module_status(report)
        with lock:
            derived.modules[source_file] = status
        if report.get("stage") != "ran":
            with lock:
                for row in rows:
                    derived.reasons[row["id"]] = "module_" + status.split()[0]
            return
        results = report.get("results") if isinstance(report.get("results"), dict) else {}
        chosen: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for row in rows:
            found = results.get(row["id"])
            cases = choose_cases(found.get("cases") or []) if isinstance(found, dict) else []
            if cases:
                chosen[row["id"]] = (row, cases)
            else:
                with lock:
                    derived.reasons[row["id"]] = "no_call_tells_apart" if isinstance(
                        found, dict) and found.get("cases") else "no_recordable_call"
        if not chosen:
            return
        peak_mb = int(report.get("vm_peak_kb") or 0) // 1024
        memory = TEST_MEMORY_MB + peak_mb if peak_mb else 0
        module = module_path(source_file)
        first = rows_by_id[next(iter(chosen))]
        item = {"source_file": source_file, "qualname": first["qualname"]}
        run = testrun.run_against(_validation_file(module, chosen), item, corpus,
                                  Budget(test_cpu=VALIDATE_CPU, memory_mb=memory),
                                  require_minimum=require_minimum, python_path=python_path)
        outcomes: dict[int, list[str]] = {}
        if not isinstance(run, str) and run["outcome"] == "ran":
            for name, kind, _ in run["results"]:
                outcomes.setdefault(int(name.split("_")[1]), []).append(kind)
        for index, (function_id, (row, cases)) in enumerate(chosen.items()):
            ran = outcomes.get(index, [])
            with lock:
                if len(ran) != len(cases) or any(kind != "passed" for kind in ran):
                    derived.reasons[function_id] = "fails_in_a_fresh_run"
                    continue
                # nothing measured goes in: rows must not depend on the machine (budgets
                # are measured where the tests run: testrun.hidden_test_verdict)
                derived.tests[function_id] = {
                    "code": test_file(module, row["qualname"], cases, instance_method(row)),
                    "cases": len(cases), "version": VERSION}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one_batch, batches))
    return derived
