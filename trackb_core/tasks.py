"""Five task families built from extracted functions, with deterministic instructions.

Every instruction is self-sufficient: it shows the code it talks about in a
```` ```python ```` block and says exactly what to return. Code is rewritten only at
positions located with the AST, never with text replaces: the seed's ``" == "`` ->
``" != "`` replaces hit strings, comments and docstrings (field notes §1). Bugs come
from :mod:`trackb_core.mutations`, one site per function, balanced across the corpus.

Rows: ``{"id": f"{function_id}-{category}", "category", "instruction",
"source_function", "source_file", "function_id", "function_name", "qualname",
"signature", "params", "returns_value", "line", "end_line", "decorators"}``; bugfix
rows add ``"buggy_source"`` and ``"mutation"`` (``{"kind", "line", "before",
"after"}``), and so do unit_test rows whose function has a mutant (so generated tests
can be checked to catch it).
"""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from trackb_core.mutations import (  # noqa: F401  (inject_bug: the one-function API)
    Assignment,
    ParsedFunction,
    Scan,
    assign_mutations,
    inject_bug,
)

CATEGORIES = ("docstring", "explain", "bugfix", "complete", "unit_test")
# The families whose answer is code (its first block must compile, the seed said).
CODE_CATEGORIES = ("complete", "bugfix", "unit_test")


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a loop that builds many acyclic objects.

    Extract keeps every file's AST alive while it builds rows; each full collection
    would walk those hundreds of thousands of nodes again, which made extract 2-3x
    slower than parsing. ASTs and rows hold no reference cycles, so nothing is lost.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_tasks(
    functions: list[dict[str, Any]], categories: list[str] | tuple[str, ...], seed: int,
    *, parsed: Mapping[str, ParsedFunction] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(tasks, skipped_by_reason)`` for ``functions`` (rows of ``functions.jsonl``).

    Tasks come in function order, then in :data:`CATEGORIES` order. The same input and
    seed always give the same tasks. ``parsed`` (function id -> its parsed function,
    as extract keeps them) saves parsing each source again; any function missing from
    it is parsed here. A function whose source does not parse, or is nested too deeply
    to walk, is skipped and counted per category (``{category}_unparsable`` /
    ``{category}_too_deep``). Raises ValueError for an unknown category.
    """
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown task categories {unknown}; choose from {list(CATEGORIES)}")
    wanted = [c for c in CATEGORIES if c in set(categories)]
    with paused_gc():
        return _build_tasks(functions, wanted, seed, parsed or {})


def _build_tasks(functions: list[dict[str, Any]], wanted: list[str], seed: int,
                 parsed: Mapping[str, ParsedFunction]
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    builders = {
        "docstring": _docstring_task,
        "explain": _explain_task,
        "bugfix": _bugfix_task,
        "complete": _complete_task,
        "unit_test": _unit_test_task,
    }
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    views: dict[str, ParsedFunction] = {}
    unusable: dict[str, str] = {}
    for fn in functions:
        view = parsed.get(fn["id"])
        try:
            views[fn["id"]] = view if view is not None else ParsedFunction.parse(fn["source"])
        except (SyntaxError, ValueError):
            unusable[fn["id"]] = "unparsable"
        except (RecursionError, MemoryError):
            unusable[fn["id"]] = "too_deep"
    mutable = {fid: views[fid] for fid in views
               if "```" not in views[fid].source}
    assignment = assign_mutations(mutable, seed) if {"bugfix", "unit_test"} & set(wanted)         else Assignment({}, frozenset())

    tasks: list[dict[str, Any]] = []
    for fn in functions:
        if fn["id"] in unusable:
            for category in wanted:
                skip(f"{category}_{unusable[fn['id']]}")
            continue
        view = views[fn["id"]]
        try:
            scan = view.scan
        except (RecursionError, MemoryError):
            for category in wanted:
                skip(f"{category}_too_deep")
            continue
        for category in wanted:
            if "```" in fn["source"]:
                # The code would close its own fence and garble the instruction.
                skip(f"{category}_fence_in_source")
                continue
            try:
                built = builders[category](fn, view, scan, assignment)
            except (RecursionError, MemoryError):
                built = f"{category}_too_deep"
            if isinstance(built, str):
                skip(built)
                continue
            tasks.append({"id": f"{fn['id']}-{category}", "category": category,
                          **_common_fields(fn, scan), **built})
    return tasks, dict(sorted(skipped.items()))


def _common_fields(fn: dict[str, Any], scan: Scan) -> dict[str, Any]:
    return {
        "source_function": fn["source"],
        "source_file": fn["file"],
        "function_id": fn["id"],
        "function_name": fn["name"],
        "qualname": fn["qualname"],
        "signature": fn["signature"],
        "params": _documented_params(fn),
        "returns_value": scan.returns_value,
        "line": fn["line"],
        "end_line": fn["end_line"],
        "decorators": list(fn.get("decorators", [])),
    }


# -- the five families -------------------------------------------------------------------


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _docstring_task(fn: dict[str, Any], view: ParsedFunction, scan: Scan,
                    assignment: Assignment) -> dict[str, Any] | str:
    stripped = strip_docstring(fn["source"], view)
    if stripped is None:
        return "docstring_unstrippable"
    sections = []
    if _documented_params(fn):
        sections.append("an `Args:` section describing each parameter")
    if scan.returns_value:
        sections.append("a `Returns:` section describing the return value")
    if scan.raises:
        sections.append("a `Raises:` section listing the exceptions it raises")
    if sections:
        body = ", then " + _join_words(sections)
    else:
        body = ", then a short description of what it does"
    instruction = (
        f"Write a Google-style docstring for the Python function `{fn['name']}` below "
        "(any docstring it had was removed).\n\n"
        f"{_fenced(stripped)}\n\n"
        f"The docstring must start with a one-line summary{body}. Return only the "
        'docstring, as a triple-quoted string ("""..."""), in one ```python block.'
    )
    return {"instruction": instruction}


def _explain_task(fn: dict[str, Any], view: ParsedFunction, scan: Scan,
                  assignment: Assignment) -> dict[str, Any]:
    instruction = (
        f"Explain the Python function `{fn['name']}` below.\n\n"
        f"{_fenced(fn['source'])}\n\n"
        "Answer in structured markdown with these sections: **Purpose** (what the "
        "function does and why), **Parameters** (each parameter and its role, or \"none\"), "
        "**Returns** (the return value, or \"nothing\"), and **Behaviour** (the main steps, "
        "edge cases and any exceptions raised)."
    )
    return {"instruction": instruction}


def _bugfix_task(fn: dict[str, Any], view: ParsedFunction, scan: Scan,
                 assignment: Assignment) -> dict[str, Any] | str:
    mutant = assignment.mutants.get(fn["id"])
    if mutant is None:
        return "bugfix_no_site"
    if fn["id"] in assignment.over_cap:
        return "bugfix_kind_cap"  # its only kinds are already a quarter of all bugs
    buggy_source, mutation = mutant
    instruction = (
        f"The Python function `{fn['name']}` below contains exactly one bug.\n\n"
        f"{_fenced(buggy_source)}\n\n"
        "Find the bug and explain in one or two sentences what is wrong and why. Then "
        "give the whole corrected function in one ```python block."
    )
    return {"instruction": instruction, "buggy_source": buggy_source,
            "mutation": dict(mutation)}


def _complete_task(fn: dict[str, Any], view: ParsedFunction, scan: Scan,
                   assignment: Assignment) -> dict[str, Any]:
    stub = complete_stub(fn["source"], fn["signature"], view)
    given = "signature and docstring are" if fn.get("docstring") is not None \
        else "signature is"
    instruction = (
        f"Complete the Python function `{fn['name']}` below: its {given} given, "
        "the body is missing.\n\n"
        f"{_fenced(stub)}\n\n"
        "Write the body. Return the whole function (signature"
        f"{', docstring' if fn.get('docstring') is not None else ''} and body) in one "
        "```python block."
    )
    return {"instruction": instruction}


def _unit_test_task(fn: dict[str, Any], view: ParsedFunction, scan: Scan,
                    assignment: Assignment) -> dict[str, Any] | str:
    qualname = fn["qualname"]
    if "<locals>" in qualname:
        return "unit_test_not_importable"  # a nested function has no import path
    module = module_path(fn["file"])
    top = qualname.split(".")[0]
    where = "" if top == qualname else f" (`{fn['name']}` is a method of class `{top}`)"
    instruction = (
        f"Write pytest unit tests for the Python function `{qualname}` below, defined "
        f"in module `{module}`{where}.\n\n"
        f"{_fenced(fn['source'])}\n\n"
        f"Import it with `from {module} import {top}`. Write test functions named "
        "`def test_...` that use plain `assert` statements and cover normal use and "
        "edge cases. Return the tests in one ```python block."
    )
    row: dict[str, Any] = {"instruction": instruction}
    mutant = assignment.mutants.get(fn["id"])
    if mutant is not None:
        # Not shown to the model: lets a checker ask whether the tests catch this bug.
        row["buggy_source"], row["mutation"] = mutant[0], dict(mutant[1])
    return row


# -- source rewriting ---------------------------------------------------------------------


def function_node(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function defined by ``source`` (one def). Raises ValueError if there is none,
    SyntaxError if ``source`` does not parse."""
    return ParsedFunction.parse(source).node


class _Offsets:
    """Absolute character offsets in a function's source for its AST positions."""

    def __init__(self, source: str, view: ParsedFunction):
        self.view = view
        self.lines = source.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def from_ast(self, lineno: int, byte_col: int) -> int:
        """The character offset of a (line, byte column) position of the view's tree."""
        row = self.view.line(lineno)
        line = self.lines[row - 1]
        col = self.view.col(byte_col)
        chars = col if line.isascii() else len(
            line.encode("utf-8")[:col].decode("utf-8", errors="ignore"))
        return self.starts[row - 1] + chars


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def strip_docstring(source: str, view: ParsedFunction | None = None) -> str | None:
    """``source`` without its docstring statement; everything else byte-for-byte.

    A body left empty gets ``pass``. Returns ``source`` unchanged if there is no
    docstring, and None if another string statement would become the docstring.
    ``view`` is ``source`` already parsed (parsed here if not given).
    """
    view = view or ParsedFunction.parse(source)
    node = view.node
    doc = _docstring_expr(node)
    if doc is None:
        return source
    off = _Offsets(source, view)
    start = off.from_ast(doc.lineno, doc.col_offset)
    end = off.from_ast(doc.end_lineno, doc.end_col_offset)
    first_row, last_row = view.line(doc.lineno), view.line(doc.end_lineno)
    first = off.starts[first_row - 1]
    last_line_end = off.starts[last_row - 1] + len(off.lines[last_row - 1])
    tail = source[end:last_line_end]
    owns_lines = not source[first:start].strip() and (
        not tail.strip() or tail.strip().startswith("#"))
    if owns_lines:
        if len(node.body) > 1 and _docstring_expr(ast.Module(body=node.body[1:])):
            return None  # the next string statement would read as the docstring
        # Whole lines holding only the docstring go: what is left parses as before.
        indent = source[first:start]
        keep = [] if len(node.body) > 1 else [indent + "pass"]
        return "\n".join(off.lines[: first_row - 1] + keep + off.lines[last_row:])
    # `def f(): "doc"; x = 1` -- the docstring shares its line; `pass` keeps it valid.
    result = source[:start] + "pass" + source[end:]
    try:
        ParsedFunction.parse(result)
    except (SyntaxError, ValueError):
        return None
    return result


def complete_stub(source: str, signature: str, view: ParsedFunction | None = None) -> str:
    """The signature plus the docstring (if any) of ``source``: what ``complete`` shows."""
    view = view or ParsedFunction.parse(source)
    doc = _docstring_expr(view.node)
    if doc is None:
        return signature
    return source[: _Offsets(source, view).from_ast(doc.end_lineno, doc.end_col_offset)]


# -- facts the instructions depend on ----------------------------------------------------


def module_path(source_file: str) -> str:
    """``"verl/utils/fs.py"`` -> ``"verl.utils.fs"``; a package ``__init__`` is its folder."""
    parts = source_file.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _documented_params(fn: dict[str, Any]) -> list[str]:
    names = [a["name"] for a in fn.get("args", [])]
    if fn.get("is_method") and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def _join_words(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]
