"""Per-category checks of a response against its task: pure functions, shared.

The dataset's strict filters (:mod:`trackb_core.filters`) and the honest eval metrics
(:mod:`trackb_core.metrics`) call the same functions, so "kept as gold" and "counted
as correct" mean the same thing. Every ``*_verdict(response, item)`` takes a task or
dataset row (``source_function``, ``function_name``, ``signature``, ``params``,
``returns_value``, and for bugfix ``buggy_source`` + ``mutation``) and returns a dict
of measured facts; none raises on a malformed response.

Code is taken from the response's first code block (:func:`codeblocks.seed_code_blocks`:
the first fenced block, or the whole response when it has no fence but looks like
code). Code is compared as ASTs after normalising: docstrings are dropped, decorators
ignored, and formatting and comments never reach the AST. The function compared is
the one in the response named like the original (a method may come inside its class).

- bugfix: ``exact_fix`` = the original function restored; ``site_fix`` = at least the
  mutated site restored (the smallest expression/statement that differs between the
  original and the mutant reads as in the original again, and the mutant's version is
  gone), other edits allowed. An exact fix is also a site fix.
- complete: ``parses``; ``keeps_signature`` = a function of that name with the same
  arguments (names, defaults, annotations) as ``item["signature"]``; ``not_echo`` = the
  body has a statement beyond the docstring, ``pass``, ``...`` and ``raise
  NotImplementedError``; ``exact_match`` = AST-equal to the original;
  ``edit_similarity`` = difflib ratio over the tokens of both functions, normalised by
  :func:`ast.unparse` (docstrings dropped), in [0, 1].
- docstring: Google style = a one-line summary first, and an ``Args:`` (or
  ``Arguments:``/``Parameters:``) section when the function has parameters;
  ``args_coverage`` = share of parameters (self/cls excluded) with a ``name:`` or
  ``name (type):`` entry in that section; ``has_returns`` = a ``Returns:``/``Yields:``
  section when the function returns or yields a value (True when it does not).
- explain: ``param_coverage`` = share of parameters named as whole words;
  ``mentions_return`` = when the function returns a value, some line mentions a
  return/yield word with content beyond "nothing"/"None"; True when it returns nothing.
- unit_test: the tests run in :mod:`trackb_core.sandbox` against the original function
  and, where the item has a mutant, against the mutant (see :func:`unit_test_verdict`).
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import textwrap
from pathlib import Path
from typing import Any

from trackb_core import codeblocks

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef

# -- shared helpers ----------------------------------------------------------------------


def first_code(response: str) -> str | None:
    """The first code block of ``response`` (seed extraction), or None if there is none."""
    blocks = codeblocks.seed_code_blocks(str(response or ""))
    return blocks[0] if blocks else None


def _has_docstring(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[0], ast.Expr) \
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)


def normalised(node: ast.AST) -> ast.AST:
    """``node`` with every docstring dropped and decorators cleared (modified in place)."""
    for sub in ast.walk(node):
        if isinstance(sub, FunctionNode | ast.ClassDef | ast.Module):
            if _has_docstring(sub.body):
                sub.body = sub.body[1:] or [ast.Pass()]
            if isinstance(sub, FunctionNode | ast.ClassDef):
                sub.decorator_list = []
    return node


def _dump(node: ast.AST) -> str:
    return ast.dump(node, annotate_fields=False, include_attributes=False)


def _functions_named(tree: ast.AST, name: str) -> list[FunctionNode]:
    return [n for n in ast.walk(tree) if isinstance(n, FunctionNode) and n.name == name]


def _original_function(original: str) -> FunctionNode | None:
    tree = codeblocks.parses(original)
    if tree is None:
        return None
    found = [n for n in tree.body if isinstance(n, FunctionNode)]
    return found[0] if found else None


def _candidates(code: str, name: str) -> list[FunctionNode]:
    tree = codeblocks.parses(code)
    return [] if tree is None else _functions_named(tree, name)


# -- bugfix ------------------------------------------------------------------------------


def restores_original(code: str, original: str) -> bool:
    """True if ``code`` defines the function of ``original`` AST-equal to it (normalised)."""
    target = _original_function(original)
    if target is None:
        return False
    want = _dump(normalised(target))
    return any(_dump(normalised(c)) == want for c in _candidates(code, target.name))


def _difference(a: Any, b: Any, path_a: list, path_b: list
                ) -> tuple[list[ast.AST], list[ast.AST]] | None:
    """The AST ancestors (outermost first) of the first place ``a`` and ``b`` differ.

    Each path ends with the smallest node that differs as a whole: the node whose
    type, list length or primitive field differs (operators count as their owner).
    """
    if type(a) is not type(b):
        if isinstance(a, ast.expr | ast.stmt) and isinstance(b, ast.expr | ast.stmt):
            return [*path_a, a], [*path_b, b]  # a whole node swapped: `not x` -> `x`
        return path_a, path_b  # an operator or a missing value: its owner differs
    if isinstance(a, ast.AST):
        if isinstance(a, ast.operator | ast.boolop | ast.cmpop | ast.unaryop
                      | ast.expr_context):
            return None  # same type: same operator
        for field in a._fields:
            value_a, value_b = getattr(a, field, None), getattr(b, field, None)
            if isinstance(value_a, list) and isinstance(value_b, list):
                if len(value_a) != len(value_b):
                    return [*path_a, a], [*path_b, b]
                for x, y in zip(value_a, value_b, strict=True):
                    found = _difference(x, y, [*path_a, a], [*path_b, b])
                    if found:
                        return found
            elif isinstance(value_a, ast.AST) and isinstance(value_b, ast.AST):
                found = _difference(value_a, value_b, [*path_a, a], [*path_b, b])
                if found:
                    return found
            elif isinstance(value_a, ast.AST) or isinstance(value_b, ast.AST) \
                    or value_a != value_b:
                return [*path_a, a], [*path_b, b]
        return None
    return None if a == b else (path_a, path_b)


def _anchor(chain: list[ast.AST]) -> ast.AST:
    """The site to compare, given the ancestors of a difference (the differing node last):
    the whole expression of the innermost statement holding it (``x == y`` of ``if x ==
    y:``), or that statement itself when the statement is what differs."""
    statements = [i for i, n in enumerate(chain) if isinstance(n, ast.stmt)]
    if not statements:
        return chain[-1]
    inner = statements[-1]
    if inner + 1 < len(chain) and isinstance(chain[inner + 1], ast.expr):
        return chain[inner + 1]
    return chain[inner]


def _site_pair(original: FunctionNode, buggy: FunctionNode) -> tuple[str, str] | None:
    found = _difference(original, buggy, [], [])
    if not found:
        return None
    path_o, path_b = found
    return _dump(_anchor(path_o)), _dump(_anchor(path_b))


def _count_dumps(node: ast.AST) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.expr | ast.stmt):
            key = _dump(sub)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.split("\n")]


def restores_site(code: str, original: str, buggy: str, mutation: dict) -> bool:
    """True if ``code`` reverts the mutated site of ``buggy`` to read as in ``original``.

    The site is the smallest whole expression (or simple statement) that differs between
    the normalised original and mutant. Restored means ``code``'s function of that name
    holds the original's site at least as often as the original does and the mutant's
    site no more often than the original does; edits elsewhere are allowed. When the two
    do not parse or do not differ, falls back to the changed line of ``mutation``
    (whitespace-collapsed ``before`` present, ``after`` gone). An exact restore is
    always a site restore. Raises nothing.
    """
    if restores_original(code, original):
        return True
    target = _original_function(original)
    mutant = _original_function(buggy)
    if target is None:
        return False
    candidates = _candidates(code, target.name)
    if not candidates:
        return False
    pair = None
    if mutant is not None:
        pair = _site_pair(normalised(target), normalised(mutant))
    if pair is None:
        before = " ".join(str((mutation or {}).get("before", "")).split())
        after = " ".join(str((mutation or {}).get("after", "")).split())
        if not before or before == after:
            return False
        original_lines = _lines(original)
        for candidate in candidates:
            lines = _lines(ast.get_source_segment(code, candidate) or "")
            if lines.count(before) >= original_lines.count(before) \
                    and lines.count(after) <= original_lines.count(after):
                return True
        return False
    site_original, site_buggy = pair
    in_original = _count_dumps(target)
    for candidate in candidates:
        counts = _count_dumps(normalised(candidate))
        if counts.get(site_original, 0) >= in_original.get(site_original, 0) \
                and counts.get(site_buggy, 0) <= in_original.get(site_buggy, 0):
            return True
    return False


def bugfix_verdict(response: str, item: dict) -> dict:
    """``{"parses", "exact_fix", "site_fix"}`` for a bugfix ``response`` to ``item``."""
    code = first_code(response)
    if code is None or codeblocks.parses(code) is None:
        return {"parses": False, "exact_fix": False, "site_fix": False}
    original = str(item.get("source_function", ""))
    exact = restores_original(code, original)
    site = exact or restores_site(code, original, str(item.get("buggy_source", "")),
                                  item.get("mutation") or {})
    return {"parses": True, "exact_fix": exact, "site_fix": site}


# -- complete ----------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _signature_args(item: dict) -> tuple[str, str] | None:
    """``(name, dumped arguments)`` of the item's signature (or its original function)."""
    signature = str(item.get("signature") or "").rstrip()
    node = None
    if signature:
        node = _original_function(signature + "\n    pass\n")
    if node is None:
        node = _original_function(str(item.get("source_function", "")))
    if node is None:
        return None
    return node.name, _dump(node.args)


def _is_trivial(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True  # a docstring, `...`, or a bare string
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _comparable_text(code: str, name: str | None) -> str:
    """Code as compared for similarity: the named function, unparsed without docstrings
    (formatting and comments gone); whitespace-collapsed text when it does not parse."""
    tree = codeblocks.parses(code)
    if tree is None:
        return " ".join(code.split())
    found = _functions_named(tree, name) if name else []
    node = found[0] if found else tree
    try:
        return ast.unparse(normalised(node))
    except (ValueError, RecursionError):
        return " ".join(code.split())


def edit_similarity(code: str, original: str, name: str | None = None) -> float:
    """difflib ratio, in [0, 1], of the tokens of ``code`` and ``original`` (normalised)."""
    if not code.strip() or not original.strip():
        return 0.0
    a = _TOKEN.findall(_comparable_text(code, name))
    b = _TOKEN.findall(_comparable_text(original, name))
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def complete_verdict(response: str, item: dict) -> dict:
    """``{"parses", "keeps_signature", "not_echo", "exact_match", "edit_similarity"}``."""
    code = first_code(response)
    original = str(item.get("source_function", ""))
    name = str(item.get("function_name") or "") or None
    verdict = {"parses": False, "keeps_signature": False, "not_echo": False,
               "exact_match": False,
               "edit_similarity": round(edit_similarity(code or "", original, name), 4)}
    if code is None or codeblocks.parses(code) is None:
        return verdict
    verdict["parses"] = True
    wanted = _signature_args(item)
    if wanted is None:
        return verdict
    wanted_name, wanted_args = wanted
    candidates = _candidates(code, wanted_name)
    keeping = [c for c in candidates if _dump(c.args) == wanted_args]
    verdict["keeps_signature"] = bool(keeping)
    verdict["not_echo"] = any(not all(_is_trivial(s) for s in c.body)
                              for c in (keeping or candidates))
    verdict["exact_match"] = restores_original(code, original)
    return verdict


# -- docstring ---------------------------------------------------------------------------

ARGS_HEADERS = ("args", "arguments", "parameters")
RETURNS_HEADERS = ("returns", "yields")
_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]{1,30}):\s*$")
_ENTRY = re.compile(r"^\s*\*{0,2}([A-Za-z_]\w*)\s*(\([^)]*\))?\s*:")


def item_params(item: dict) -> list[str]:
    """Parameter names of the item's function, without self/cls and without stars."""
    params = item.get("params")
    if not isinstance(params, list):
        node = _original_function(str(item.get("source_function", "")))
        params = [] if node is None else [
            a.arg for a in (*node.args.posonlyargs, *node.args.args, node.args.vararg,
                            *node.args.kwonlyargs, node.args.kwarg) if a is not None]
        if params and params[0] in ("self", "cls"):
            params = params[1:]
    return [str(p).lstrip("*") for p in params if str(p).lstrip("*") not in ("self", "cls")]


def item_returns_value(item: dict) -> bool:
    """``item["returns_value"]``, or whether its function has ``return <value>``/``yield``."""
    if isinstance(item.get("returns_value"), bool):
        return item["returns_value"]
    node = _original_function(str(item.get("source_function", "")))
    if node is None:
        return False
    stack = list(node.body)
    while stack:
        sub = stack.pop()
        if isinstance(sub, ast.Return) and sub.value is not None \
                or isinstance(sub, ast.Yield | ast.YieldFrom):
            return True
        if not isinstance(sub, FunctionNode | ast.ClassDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(sub))
    return False


_TRIPLE = re.compile(r'("""|\'\'\')(.*?)(\1|$)', re.DOTALL)


def docstring_text(response: str) -> str:
    """The docstring a response gives: the string literal of its code, or its text."""
    found = _docstring_literal(response)
    return found if found is not None else str(response or "")


def _docstring_literal(response: str) -> str | None:
    """The docstring literal in a response's code, or a triple-quoted string in its text."""
    code = first_code(response)
    if code is not None:
        tree = codeblocks.parses(code)
        if tree is not None:
            if _has_docstring(tree.body):
                return tree.body[0].value.value
            for node in ast.walk(tree):
                if isinstance(node, FunctionNode | ast.ClassDef) and _has_docstring(node.body):
                    return node.body[0].value.value
    found = _TRIPLE.search(str(response or ""))
    if found:
        return found.group(2)
    return None


def _sections(lines: list[str]) -> dict[str, list[str]]:
    """``{lower-cased header: its lines}`` for Google-style sections."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    header_indent = 0
    for line in lines:
        header = _SECTION.match(line)
        indent = len(line) - len(line.lstrip())
        if header:
            current = sections.setdefault(header.group(1).strip().lower(), [])
            header_indent = indent
            continue
        if current is not None:
            if line.strip() and indent <= header_indent:
                current = None  # dedented text ends the section
                continue
            current.append(line)
    return sections


def documented_args(section: list[str]) -> list[str]:
    """Names with an entry (``name:`` / ``name (type):``) at the section's entry indent."""
    entries = [line for line in section if line.strip()]
    if not entries:
        return []
    entry_indent = min(len(line) - len(line.lstrip()) for line in entries)
    names = []
    for line in entries:
        if len(line) - len(line.lstrip()) != entry_indent:
            continue
        match = _ENTRY.match(line)
        if match:
            names.append(match.group(1))
    return names


def docstring_verdict(response: str, item: dict) -> dict:
    """``{"has_docstring", "google_style", "args_coverage", "has_returns", "ok"}`` for a
    docstring answer. Without a docstring literal (in code or triple quotes) nothing is
    Google style, so text that merely lacks sections to miss never passes."""
    literal = _docstring_literal(response)
    text = literal if literal is not None else str(response or "")
    lines = text.expandtabs().split("\n")
    content = [line.strip() for line in lines if line.strip()]
    summary = bool(content) and not _SECTION.match(content[0]) and len(content[0]) >= 3
    sections = _sections(lines)
    params = item_params(item)
    args_section = next((sections[h] for h in ARGS_HEADERS if h in sections), None)
    if params:
        named = set(documented_args(args_section or []))
        coverage = sum(p in named for p in params) / len(params)
    else:
        coverage = 1.0
    google = literal is not None and summary and (not params or args_section is not None)
    has_returns = (not item_returns_value(item)) or any(h in sections for h in RETURNS_HEADERS)
    return {"has_docstring": literal is not None, "google_style": google,
            "args_coverage": coverage, "has_returns": has_returns,
            "ok": google and coverage == 1.0 and has_returns}


# -- explain -----------------------------------------------------------------------------

_RETURN_WORD = re.compile(r"\b(returns?|returned|returning|yields?|yielded|yielding)\b",
                          re.IGNORECASE)
_NOTHING = re.compile(r"\b(nothing|none|no value|no return value|n/a|not return)\b",
                      re.IGNORECASE)
_MARKUP = re.compile(r"[*_`#>:\-.()\[\]]+")


def _says_something(text: str) -> bool:
    """True if ``text`` holds a word beyond return words and "nothing"/"None" phrases."""
    rest = _NOTHING.sub(" ", _RETURN_WORD.sub(" ", _MARKUP.sub(" ", text)))
    return len(re.findall(r"[A-Za-z0-9_]+", rest)) >= 1


# An explanation says something: at least this many different words of two letters or
# more (a function without parameters or return value would otherwise pass on anything,
# an empty answer or "the the the" included).
MIN_EXPLAIN_WORDS = 6


def explain_verdict(response: str, item: dict) -> dict:
    """``{"substantive", "param_coverage", "mentions_return", "ok"}`` for an explanation:
    it has at least :data:`MIN_EXPLAIN_WORDS` different words, names every parameter and,
    when the function returns a value, says something about it."""
    text = str(response or "")
    words = {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z]+", text)}
    substantive = len(words) >= MIN_EXPLAIN_WORDS
    params = item_params(item)
    if params:
        named = sum(bool(re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", text)) for p in params)
        coverage = named / len(params)
    else:
        coverage = 1.0
    if item_returns_value(item):
        # sentences: "Takes x. Returns nothing." says nothing about a return value
        lines = [part for part in re.split(r"\n|(?<=[.!?;])\s+", text) if part.strip()]
        mentions = False
        for i, line in enumerate(lines):
            if not _RETURN_WORD.search(line):
                continue
            said = line
            if not _says_something(line) and i + 1 < len(lines):
                said = lines[i + 1]  # a "**Returns**" heading: its text is on the next line
            if _says_something(said):
                mentions = True
                break
    else:
        mentions = True
    return {"substantive": substantive, "param_coverage": coverage,
            "mentions_return": mentions, "ok": substantive and coverage == 1.0 and mentions}


# -- placeholders ------------------------------------------------------------------------

# Beyond the seed's hallucination regexes (metrics.HALLUCINATION_PATTERNS, the one copy):
# stand-ins a teacher writes instead of real code or real import paths.
EXTRA_PLACEHOLDERS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\bpath\.to\.\w+",
    r"\bmy_module\b",
    r"#\s*(your|add|insert|implement|put)\b[^\n]*\bhere\b",
    r"#\s*\.\.\.\s*(rest|remaining|existing|other)\b",
    r"\.\.\.\s*#\s*(rest|remaining|existing|other|same)\b",
    r"#\s*(rest|remainder) of (the )?(code|function|implementation)",
))


def _ellipsis_only_function(text: str) -> bool:
    code = first_code(text)
    tree = codeblocks.parses(code) if code else None
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, FunctionNode):
            body = node.body[1:] if _has_docstring(node.body) else node.body
            if body and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                            and s.value.value is Ellipsis for s in body):
                return True
    return False


def has_placeholder(text: str) -> bool:
    """True if ``text`` holds placeholder content: the seed's regexes (TODO, TBD,
    ``<insert ...>``, ``your_...``, ...), ``path.to.module``-style names, "your code
    here" comments, elided-code comments, or a function whose body is only ``...``."""
    # imported here: metrics imports this module, and the patterns live there once
    from trackb_core.metrics import HALLUCINATION_PATTERNS

    text = str(text or "")
    if any(p.search(text) for p in HALLUCINATION_PATTERNS):
        return True
    if any(p.search(text) for p in EXTRA_PLACEHOLDERS):
        return True
    return _ellipsis_only_function(text)



# -- unit_test ---------------------------------------------------------------------------

TEST_MODULE = "test_generated"
REPORT_MARKER = "\x1etrackb-tests "

# Runs in the sandbox: import the module under test (its import failing means the
# function cannot be executed here), then the generated tests, then each test case.
# Supports module-level ``test_*`` functions, ``Test*`` classes with no-argument
# constructors, ``pytest.mark.parametrize`` and the ``tmp_path``/``tmpdir`` fixtures.
TEST_RUNNER = r"""
import asyncio, importlib, inspect, itertools, json, pathlib, sys, tempfile, traceback

def report(payload):
    sys.stdout.flush()
    print(MARKER + json.dumps(payload), flush=True)

def failure(stage, exc):
    return {"stage": stage, "error": type(exc).__name__, "name": getattr(exc, "name", None),
            "message": str(exc)[:300]}

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
        results.append([name, "failed", ("AssertionError: " + str(exc))[:200]])
    except BaseException as exc:
        results.append([name, "error", (type(exc).__name__ + ": " + str(exc))[:200]])
report({"stage": "ran", "results": results, "skipped": skipped})
"""


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


def _module_of(source_file: str) -> str:
    parts = source_file.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _extend_path_line(corpus_package: Path) -> str:
    return f"__path__.append({str(corpus_package)!r})\n"


def _with_path_extension(text: str, corpus_package: Path) -> str:
    """A package ``__init__`` that also finds its submodules in the corpus: the line goes
    after the docstring and ``from __future__`` imports, which must stay first."""
    tree = codeblocks.parses(text)
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


def _locate(file_text: str, item: dict) -> tuple[int, int] | str:
    """``(line, end_line)`` of the item's function in ``file_text``, or why not found.

    Uses the item's ``line``/``end_line`` and checks that those lines hold the item's
    ``source_function`` (AST-equal), so a different corpus version is caught."""
    tree = codeblocks.parses(str(item.get("source_function", "")))
    if tree is None:
        return "source_function does not parse"
    want = _dump(tree)
    lines = file_text.split("\n")

    def holds(start: int, end: int) -> bool:
        if not 1 <= start <= end <= len(lines):
            return False
        segment = codeblocks.parses(textwrap.dedent("\n".join(lines[start - 1:end])))
        return segment is not None and _dump(segment) == want

    line, end_line = item.get("line"), item.get("end_line")
    if isinstance(line, int) and isinstance(end_line, int) and holds(line, end_line):
        return line, end_line
    module = codeblocks.parses(file_text)
    name = str(item.get("function_name") or "")
    for node in _functions_named(module, name) if module is not None and name else []:
        if holds(node.lineno, node.end_lineno):
            return node.lineno, node.end_lineno
    return "the function is not in source_file (a different corpus version?)"


def _module_files(corpus: Path, source_file: str, file_text: str) -> dict[str, str]:
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


def _mutated(file_text: str, span: tuple[int, int], buggy: str) -> str:
    line, end_line = span
    lines = file_text.split("\n")
    first = lines[line - 1]
    indent = first[: len(first) - len(first.lstrip())]
    body = textwrap.indent(textwrap.dedent(buggy).rstrip("\n"), indent).split("\n")
    return "\n".join([*lines[: line - 1], *body, *lines[end_line:]])


def _run_tests(files: dict[str, str], module: str, corpus: Path, timeout: float) -> dict:
    """``{"outcome", "results", "skipped", "failure", "sandbox"}`` of one sandboxed run."""
    from trackb_core.sandbox import run_python

    runner = (f"MODULE = {module!r}\nTEST_MODULE = {TEST_MODULE!r}\n"
              f"MARKER = {REPORT_MARKER!r}\n" + TEST_RUNNER)
    result = run_python(runner, files=files, timeout=timeout, python_path=[corpus])
    reports = [line[len(REPORT_MARKER):] for line in result.stdout.split("\n")
               if line.startswith(REPORT_MARKER)]
    outcome: dict[str, Any] = {"sandbox": result, "results": [], "skipped": [], "failure": None}
    if result.status == "timeout":
        outcome["outcome"] = "timeout"
    elif not reports:
        outcome["outcome"] = "error"
    else:
        payload = json.loads(reports[-1])
        if payload["stage"] == "ran":
            outcome.update(outcome="ran", results=payload["results"], skipped=payload["skipped"])
        else:
            outcome.update(outcome=payload["stage"], failure=payload)
    return outcome


def _corpus_names(corpus: Path, name: str | None) -> bool:
    """True if the top-level module ``name`` comes from the corpus (not a missing library)."""
    if not name:
        return False
    top = name.split(".")[0]
    return (corpus / top).is_dir() or (corpus / f"{top}.py").is_file()


def _verdict(status: str, reason: str, passes: bool | None = None, kills: bool | None = None,
             tests: int = 0) -> dict:
    return {"status": status, "passes_original": passes, "kills_mutant": kills,
            "tests": tests, "reason": reason}


def unit_test_verdict(response: str, item: dict, corpus_dir: Path | None, *,
                      timeout: float = 10.0) -> dict:
    """Run a unit_test response's tests in the sandbox against the item's function.

    Returns ``{"status", "passes_original", "kills_mutant", "tests", "reason"}``. The
    status is about the run against the original: ``passed`` (every test case passed),
    ``failed`` (a case failed or raised), ``error`` (the tests did not import, or the
    sandbox killed the run), ``timeout``, ``not_executable`` (no corpus, the module does
    not import here, e.g. a missing heavy dependency, the tests need a library that is
    not installed or only fixtures the runner lacks), ``no_tests`` (no ``test_*``
    function with an ``assert`` or ``pytest.raises``), ``unparsable``. When the original
    passes and the item has ``buggy_source``, the tests run again on the module with the
    function replaced by the mutant: ``kills_mutant`` is True if any case fails, errors
    or times out there (None when not run). ``tests`` counts cases run on the original.

    The sandbox tree holds the module (lines ``line..end_line`` of ``source_file``
    replaced for the mutant run), ``__init__.py`` files along its path that only extend
    ``__path__`` to the corpus (so package inits do not run and siblings import), and
    the corpus on ``sys.path``, read-only. Raises nothing for a bad response.
    """
    code = first_code(response)
    tree = codeblocks.parses(code) if code is not None else None
    if tree is None:
        return _verdict("unparsable", "no code block" if code is None else "does not parse")
    if not any(_asserts(f) for f in _test_functions(tree)):
        return _verdict("no_tests", "no test_* function with an assert")
    if corpus_dir is None:
        return _verdict("not_executable", "no corpus")
    corpus = Path(corpus_dir).resolve()
    source_file = str(item.get("source_file") or "")
    if "<locals>" in str(item.get("qualname", "")):
        return _verdict("not_executable", "a nested function has no import path")
    path = corpus / source_file
    if not source_file or not path.is_file():
        return _verdict("not_executable", f"source file not in corpus: {source_file!r}")
    file_text = path.read_text(encoding="utf-8", errors="replace")
    module = _module_of(source_file)

    files = {**_module_files(corpus, source_file, file_text), f"{TEST_MODULE}.py": code}
    original = _run_tests(files, module, corpus, timeout)
    if original["outcome"] == "timeout":
        return _verdict("timeout", f"no result within {timeout:g} s", passes=False)
    if original["outcome"] == "error":
        sandbox = original["sandbox"]
        return _verdict("error", f"sandbox {sandbox.status}: {sandbox.reason or 'no report'}",
                        passes=False)
    failure = original["failure"]
    if original["outcome"] == "import_module":
        return _verdict("not_executable", f"import {module} failed: {failure['error']}"
                        + (f": {failure['name']}" if failure.get("name") else
                           f": {failure['message'][:120]}"))
    if original["outcome"] == "import_tests":
        if failure["error"] == "ModuleNotFoundError" \
                and not _corpus_names(corpus, failure.get("name")):
            return _verdict("not_executable", f"the tests need {failure['name']!r}, "
                                              "which is not installed here")
        return _verdict("error", f"the tests do not import: {failure['error']}: "
                                 f"{failure['message'][:160]}", passes=False)
    results = original["results"]
    if not results:
        why = "; ".join(f"{name}: {what}" for name, what in original["skipped"][:3])
        return _verdict("not_executable", f"no runnable test case ({why or 'none found'})")
    bad = [r for r in results if r[1] != "passed"]
    if bad:
        name, kind, message = bad[0]
        return _verdict("failed", f"{len(bad)}/{len(results)} failed on the original; "
                                  f"{name}: {kind}: {message}", passes=False,
                        tests=len(results))

    buggy = item.get("buggy_source")
    if not buggy:
        return _verdict("passed", f"{len(results)} passed", passes=True, tests=len(results))
    span = _locate(file_text, item)
    if isinstance(span, str):
        return _verdict("passed", f"{len(results)} passed; mutant not run: {span}",
                        passes=True, tests=len(results))
    mutant_files = {**files, **_module_files(corpus, source_file,
                                             _mutated(file_text, span, str(buggy)))}
    mutant = _run_tests(mutant_files, module, corpus, timeout)
    if mutant["outcome"] == "ran":
        caught = [r for r in mutant["results"] if r[1] != "passed"]
        kills = bool(caught) or len(mutant["results"]) != len(results)
        detail = f"{len(caught)} failed on the mutant" if kills else "all pass on the mutant"
    else:
        kills, detail = True, f"the mutant run ended in {mutant['outcome']}"
    return _verdict("passed", f"{len(results)} passed; {detail}", passes=True, kills=kills,
                    tests=len(results))
