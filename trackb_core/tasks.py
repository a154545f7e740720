"""Five task families built from extracted functions, with deterministic instructions.

Every instruction is self-sufficient: it shows the code it talks about in a
```` ```python ```` block and says exactly what to return. Code is rewritten only at
positions located with the AST and :mod:`tokenize`, never with text replaces: the
seed's ``" == "`` -> ``" != "`` replaces hit strings, comments and docstrings (field
notes §1).

Rows: ``{"id": f"{function_id}-{category}", "category", "instruction",
"source_function", "source_file", "function_id", "function_name"}``; bugfix rows add
``"mutation"`` and ``"buggy_source"``.
"""

from __future__ import annotations

import ast
import io
import random
import tokenize
from dataclasses import dataclass
from typing import Any

CATEGORIES = ("docstring", "explain", "bugfix", "complete", "unit_test")

# Each comparison operator and the one that negates its meaning.
FLIPS: dict[type[ast.cmpop], tuple[str, str]] = {
    ast.Eq: ("==", "!="),
    ast.NotEq: ("!=", "=="),
    ast.Lt: ("<", ">="),
    ast.GtE: (">=", "<"),
    ast.Gt: (">", "<="),
    ast.LtE: ("<=", ">"),
    ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"),
    ast.In: ("in", "not in"),
    ast.NotIn: ("not in", "in"),
}
_OP_WORDS = {"is", "not", "in"}
_OP_SYMBOLS = {"==", "!=", "<", ">", "<=", ">="}


def build_tasks(
    functions: list[dict[str, Any]], categories: list[str] | tuple[str, ...], seed: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(tasks, skipped_by_reason)`` for ``functions`` (rows of ``functions.jsonl``).

    Tasks come in function order, then in :data:`CATEGORIES` order. The same input and
    seed always give the same tasks. Raises ValueError for an unknown category.
    """
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown task categories {unknown}; choose from {list(CATEGORIES)}")
    wanted = [c for c in CATEGORIES if c in set(categories)]
    builders = {
        "docstring": _docstring_task,
        "explain": _explain_task,
        "bugfix": _bugfix_task,
        "complete": _complete_task,
        "unit_test": _unit_test_task,
    }
    tasks: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for fn in functions:
        for category in wanted:
            if "```" in fn["source"]:
                # The code would close its own fence and garble the instruction.
                reason = f"{category}_fence_in_source"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            built = builders[category](fn, seed)
            if isinstance(built, str):
                skipped[built] = skipped.get(built, 0) + 1
                continue
            tasks.append({
                "id": f"{fn['id']}-{category}",
                "category": category,
                "source_function": fn["source"],
                "source_file": fn["file"],
                "function_id": fn["id"],
                "function_name": fn["name"],
                **built,
            })
    return tasks, dict(sorted(skipped.items()))


# -- the five families -------------------------------------------------------------------


def _fenced(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _docstring_task(fn: dict[str, Any], seed: int) -> dict[str, Any] | str:
    stripped = strip_docstring(fn["source"])
    if stripped is None:
        return "docstring_unstrippable"
    node = function_node(fn["source"])
    sections = []
    if _documented_params(fn):
        sections.append("an `Args:` section describing each parameter")
    if _returns_value(node):
        sections.append("a `Returns:` section describing the return value")
    if _raises(node):
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


def _explain_task(fn: dict[str, Any], seed: int) -> dict[str, Any]:
    instruction = (
        f"Explain the Python function `{fn['name']}` below.\n\n"
        f"{_fenced(fn['source'])}\n\n"
        "Answer in structured markdown with these sections: **Purpose** (what the "
        "function does and why), **Parameters** (each parameter and its role, or \"none\"), "
        "**Returns** (the return value, or \"nothing\"), and **Behaviour** (the main steps, "
        "edge cases and any exceptions raised)."
    )
    return {"instruction": instruction}


def _bugfix_task(fn: dict[str, Any], seed: int) -> dict[str, Any] | str:
    mutant = inject_bug(fn["source"], seed, fn["id"])
    if mutant is None:
        return "bugfix_no_site"
    buggy_source, mutation = mutant
    instruction = (
        f"The Python function `{fn['name']}` below contains exactly one bug.\n\n"
        f"{_fenced(buggy_source)}\n\n"
        "Find the bug and explain in one or two sentences what is wrong and why. Then "
        "give the whole corrected function in one ```python block."
    )
    return {"instruction": instruction, "buggy_source": buggy_source, "mutation": mutation}


def _complete_task(fn: dict[str, Any], seed: int) -> dict[str, Any]:
    stub = complete_stub(fn["source"], fn["signature"])
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


def _unit_test_task(fn: dict[str, Any], seed: int) -> dict[str, Any] | str:
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
    return {"instruction": instruction}


# -- source rewriting ---------------------------------------------------------------------


def function_node(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function defined by ``source`` (one def). Raises ValueError if there is none."""
    tree = ast.parse(source)
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        raise ValueError("source does not start with a function definition")
    return tree.body[0]


class _Offsets:
    """Absolute character offsets in ``source`` for AST (byte) and tokenize positions."""

    def __init__(self, source: str):
        self.lines = source.split("\n")
        self.starts = [0]
        for line in self.lines[:-1]:
            self.starts.append(self.starts[-1] + len(line) + 1)

    def from_ast(self, lineno: int, byte_col: int) -> int:
        line = self.lines[lineno - 1]
        chars = len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))
        return self.starts[lineno - 1] + chars

    def from_token(self, row: int, col: int) -> int:
        return self.starts[row - 1] + col


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def strip_docstring(source: str) -> str | None:
    """``source`` without its docstring statement; everything else byte-for-byte.

    A body left empty gets ``pass``. Returns ``source`` unchanged if there is no
    docstring, and None if the result would not parse (not seen in practice).
    """
    node = function_node(source)
    doc = _docstring_expr(node)
    if doc is None:
        return source
    off = _Offsets(source)
    start = off.from_ast(doc.lineno, doc.col_offset)
    end = off.from_ast(doc.end_lineno, doc.end_col_offset)
    first = off.starts[doc.lineno - 1]
    last_line_end = off.starts[doc.end_lineno - 1] + len(off.lines[doc.end_lineno - 1])
    tail = source[end:last_line_end]
    owns_lines = not source[first:start].strip() and (
        not tail.strip() or tail.strip().startswith("#"))
    if owns_lines:
        indent = source[first:start]
        keep = [] if len(node.body) > 1 else [indent + "pass"]
        lines = off.lines[: doc.lineno - 1] + keep + off.lines[doc.end_lineno:]
        result = "\n".join(lines)
    else:
        # `def f(): "doc"; x = 1` -- the docstring shares its line; `pass` keeps it valid.
        result = source[:start] + "pass" + source[end:]
    try:
        if _docstring_expr(function_node(result)) is not None:
            return None
    except (SyntaxError, ValueError):
        return None
    return result


def complete_stub(source: str, signature: str) -> str:
    """The signature plus the docstring (if any) of ``source``: what ``complete`` shows."""
    doc = _docstring_expr(function_node(source))
    if doc is None:
        return signature
    off = _Offsets(source)
    return source[: off.from_ast(doc.end_lineno, doc.end_col_offset)]


@dataclass(frozen=True)
class CompareSite:
    """One comparison operator in a function's source, located to the character."""

    start: int  # absolute character offsets of the operator token(s)
    end: int
    line: int  # 1-based line in the source
    before: str  # the operator as written ("not in" may span spaces)
    after: str


def comparison_sites(source: str) -> list[CompareSite]:
    """Every comparison operator in ``source`` that has a flipped counterpart.

    Located with the AST (which operands it sits between) and rewritten at the token
    the tokenizer finds between them, so strings and comments are never touched.
    """
    tree = ast.parse(source)
    off = _Offsets(source)
    tokens = [
        t for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if (t.type == tokenize.OP and t.string in _OP_SYMBOLS)
        or (t.type == tokenize.NAME and t.string in _OP_WORDS)
    ]
    token_spans = [(off.from_token(*t.start), off.from_token(*t.end), t) for t in tokens]
    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if type(op) not in FLIPS:
                continue
            left, right = operands[i], operands[i + 1]
            lo = off.from_ast(left.end_lineno, left.end_col_offset)
            hi = off.from_ast(right.lineno, right.col_offset)
            found = [(s, e, t) for s, e, t in token_spans if s >= lo and e <= hi]
            if not found:
                continue
            before, after = FLIPS[type(op)]
            written = " ".join(t.string for _, _, t in found)
            rows = {t.start[0] for _, _, t in found}
            if written != before or len(rows) != 1:
                continue  # not the shape expected (e.g. `is` and `not` on two lines)
            sites.append(CompareSite(found[0][0], found[-1][1], found[0][2].start[0],
                                     before, after))
    return sorted(sites, key=lambda s: s.start)


def inject_bug(source: str, seed: int, function_id: str) -> tuple[str, dict[str, Any]] | None:
    """``(buggy_source, mutation)`` with one comparison flipped, or None if no site.

    The site is drawn from ``seed`` and ``function_id`` (stable across runs and
    machines); the mutant always parses and its AST differs from the original's.
    """
    sites = comparison_sites(source)
    if not sites:
        return None
    rng = random.Random(f"{seed}:{function_id}:bugfix")
    order = list(range(len(sites)))
    rng.shuffle(order)
    original = ast.dump(ast.parse(source))
    lines = source.split("\n")
    for index in order:
        site = sites[index]
        mutant = source[: site.start] + site.after + source[site.end:]
        try:
            changed = ast.dump(ast.parse(mutant)) != original
        except SyntaxError:
            continue
        if not changed:
            continue
        mutation = {
            "kind": "comparison_flip",
            "line": site.line,
            "before": lines[site.line - 1],
            "after": mutant.split("\n")[site.line - 1],
            "op_before": site.before,
            "op_after": site.after,
        }
        return mutant, mutation
    return None


# -- facts the instructions depend on ----------------------------------------------------


def module_path(source_file: str) -> str:
    """``"verl/utils/fs.py"`` -> ``"verl.utils.fs"``; a package ``__init__`` is its folder."""
    parts = source_file.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _own_nodes(node: ast.AST):
    """Nodes of a function body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                          | ast.Lambda):
            stack.extend(ast.iter_child_nodes(child))


def _returns_value(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Return) and n.value is not None)
        or isinstance(n, ast.Yield | ast.YieldFrom)
        for n in _own_nodes(node)
    )


def _raises(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Raise) for n in _own_nodes(node))


def _documented_params(fn: dict[str, Any]) -> list[str]:
    names = [a["name"] for a in fn.get("args", [])]
    if fn.get("is_method") and names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def _join_words(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]
