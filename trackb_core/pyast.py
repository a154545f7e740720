"""Python source facts every task family uses: AST comparison, item facts, source cuts.

The task families (:mod:`trackb_core.families`) build instructions from a function's
source and judge answers by comparing ASTs; what more than one family needs lives here,
below them, so that families never import each other.

- Comparing code: :func:`normalised` drops docstrings and decorators, so formatting,
  comments and docstrings never decide whether two functions are the same;
  :func:`dump` is the comparable form.
- Reading an item (a task or dataset row): :func:`item_params`,
  :func:`item_returns_value`, :func:`module_path`.
- Cutting a function's source at AST positions, never with text replaces (the seed's
  ``" == "`` -> ``" != "`` replaces hit strings and comments, field notes §1):
  :func:`strip_docstring`, :func:`complete_stub`.

Nothing here raises on malformed code unless its docstring says so.
"""

from __future__ import annotations

import ast
from typing import Any

from trackb_core import codeblocks
from trackb_core.mutations import ParsedFunction

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef
# Nodes that open a scope of their own: their bodies are not the enclosing function's.
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


# -- text ---------------------------------------------------------------------------------


def python_block(code: str) -> str:
    """``code`` in one fenced ```` ```python ```` block (trailing whitespace dropped)."""
    return f"```python\n{code.rstrip()}\n```"


def short(text: str, limit: int = 80) -> str:
    """``text`` on one line, cut to ``limit`` characters with ``...``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- comparing code -------------------------------------------------------------------------


def has_docstring(body: list[ast.stmt]) -> bool:
    """True if a body's first statement is a string literal (its docstring)."""
    return bool(body) and isinstance(body[0], ast.Expr) \
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)


def docstring_expr(node: ast.AST) -> ast.Expr | None:
    """The docstring statement of a function, class or module node, or None."""
    body = getattr(node, "body", [])
    return body[0] if has_docstring(body) else None


def normalised(node: ast.AST) -> ast.AST:
    """``node`` with every docstring dropped and decorators cleared (modified in place)."""
    for sub in ast.walk(node):
        if isinstance(sub, FunctionNode | ast.ClassDef | ast.Module):
            if has_docstring(sub.body):
                sub.body = sub.body[1:] or [ast.Pass()]
            if isinstance(sub, FunctionNode | ast.ClassDef):
                sub.decorator_list = []
    return node


def dump(node: ast.AST) -> str:
    """A node's structure without positions: equal dumps mean equal code."""
    return ast.dump(node, annotate_fields=False, include_attributes=False)


def functions_named(tree: ast.AST, name: str) -> list[FunctionNode]:
    """Every function (at any depth, methods included) called ``name`` in ``tree``."""
    return [n for n in ast.walk(tree) if isinstance(n, FunctionNode) and n.name == name]


def first_function(source: str) -> FunctionNode | None:
    """The first top-level function of ``source``, or None (no def, or it does not parse)."""
    tree = codeblocks.parses(source)
    if tree is None:
        return None
    found = [n for n in tree.body if isinstance(n, FunctionNode)]
    return found[0] if found else None


def bound_function(code: str, name: str) -> FunctionNode | None:
    """The definition of ``name`` that running ``code`` would leave bound: the last
    top-level ``def name`` (a later one replaces an earlier one), else the last method
    ``name`` of the last top-level class that defines one. None when there is none or the
    code does not parse. Nested defs inside other functions are never bound by running
    the module, so they do not count."""
    tree = codeblocks.parses(code)
    if tree is None:
        return None
    top = [n for n in tree.body if isinstance(n, FunctionNode) and n.name == name]
    if top:
        return top[-1]
    for node in reversed(tree.body):
        if isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, FunctionNode) and n.name == name]
            if methods:
                return methods[-1]
    return None


def restores_original(code: str, original: str) -> bool:
    """True if the definition of the original's name that ``code`` binds
    (:func:`bound_function`) is AST-equal to ``original`` (normalised)."""
    target = first_function(original)
    if target is None:
        return False
    candidate = bound_function(code, target.name)
    return candidate is not None and dump(normalised(candidate)) == dump(normalised(target))


def own_nodes(func: ast.AST):
    """Nodes of ``func``'s body in source order, not descending into nested scopes."""
    stack = list(reversed(func.body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


# -- facts of an item ---------------------------------------------------------------------


def module_path(source_file: str) -> str:
    """``"verl/utils/fs.py"`` -> ``"verl.utils.fs"``; a package ``__init__`` is its folder."""
    parts = source_file.removesuffix(".py").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def item_params(item: dict[str, Any]) -> list[str]:
    """Parameter names of the item's function, without self/cls and without stars."""
    params = item.get("params")
    if not isinstance(params, list):
        node = first_function(str(item.get("source_function", "")))
        params = [] if node is None else [
            a.arg for a in (*node.args.posonlyargs, *node.args.args, node.args.vararg,
                            *node.args.kwonlyargs, node.args.kwarg) if a is not None]
        if params and params[0] in ("self", "cls"):
            params = params[1:]
    return [str(p).lstrip("*") for p in params if str(p).lstrip("*") not in ("self", "cls")]


def item_returns_value(item: dict[str, Any]) -> bool:
    """``item["returns_value"]``, or whether its function has ``return <value>``/``yield``."""
    if isinstance(item.get("returns_value"), bool):
        return item["returns_value"]
    node = first_function(str(item.get("source_function", "")))
    if node is None:
        return False
    stack = list(node.body)
    while stack:
        sub = stack.pop()
        if isinstance(sub, ast.Return) and sub.value is not None \
                or isinstance(sub, ast.Yield | ast.YieldFrom):
            return True
        if not isinstance(sub, SCOPES):
            stack.extend(ast.iter_child_nodes(sub))
    return False


# -- cutting a function's source at AST positions -------------------------------------------


def function_node(source: str) -> FunctionNode:
    """The function defined by ``source`` (one def). Raises ValueError if there is none,
    SyntaxError if ``source`` does not parse."""
    return ParsedFunction.parse(source).node


class Offsets:
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


def strip_docstring(source: str, view: ParsedFunction | None = None) -> str | None:
    """``source`` without its docstring statement; everything else byte-for-byte.

    A body left empty gets ``pass``. Returns ``source`` unchanged if there is no
    docstring, and None if another string statement would become the docstring.
    ``view`` is ``source`` already parsed (parsed here if not given).
    """
    view = view or ParsedFunction.parse(source)
    node = view.node
    doc = docstring_expr(node)
    if doc is None:
        return source
    off = Offsets(source, view)
    start = off.from_ast(doc.lineno, doc.col_offset)
    end = off.from_ast(doc.end_lineno, doc.end_col_offset)
    first_row, last_row = view.line(doc.lineno), view.line(doc.end_lineno)
    first = off.starts[first_row - 1]
    last_line_end = off.starts[last_row - 1] + len(off.lines[last_row - 1])
    tail = source[end:last_line_end]
    owns_lines = not source[first:start].strip() and (
        not tail.strip() or tail.strip().startswith("#"))
    if owns_lines:
        if len(node.body) > 1 and docstring_expr(ast.Module(body=node.body[1:])):
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
    doc = docstring_expr(view.node)
    if doc is None:
        return signature
    return source[: Offsets(source, view).from_ast(doc.end_lineno, doc.end_col_offset)]
