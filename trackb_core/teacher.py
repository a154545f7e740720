"""Teachers: whatever writes the gold response for a task, behind one small interface.

Two teachers exist:

* :class:`ReferenceTeacher` derives the answer from the task's own source function
  (its docstring, the original code, the mutation that made the bug, AST facts). No
  network, no model, fully deterministic: the CPU demo and the tests run on it.
* :class:`~trackb_core.openai_teacher.OpenAITeacher` asks any OpenAI-compatible chat server (vLLM in production)
  with bounded concurrency, retries with backoff on transient failures, and rejects
  truncated answers instead of keeping them (the seed kept them silently).

Every answer is a :class:`TeacherResult`; a task a teacher cannot or should not answer
comes back with ``status`` "skipped" or "rejected" and a ``reason``, never dropped
silently, so the generate stage can count it.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

OK, SKIPPED, REJECTED = "ok", "skipped", "rejected"


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

    @property
    def ok(self) -> bool:
        return self.status == OK


class Teacher(Protocol):
    """Answers tasks. ``answer_all`` yields one result per task, in any order."""

    name: str
    model: str

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]: ...


# ------------------------------------------------------------------------------------
# Reference teacher: gold from the source itself
# ------------------------------------------------------------------------------------


class ReferenceTeacher:
    """Gold answers derived from each task's ``source_function``; no network.

    docstring -> the function's own docstring; complete -> the original function;
    bugfix -> what the mutation changed and why it is wrong, then the original;
    explain -> a structured explanation from AST facts and the docstring;
    unit_test -> skipped (there is no reference test).
    """

    name = "reference"
    model = "reference"

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]:
        for task in tasks:
            yield self.answer(task)

    def answer(self, task: dict[str, Any]) -> TeacherResult:
        """The reference answer for one task row (never raises on odd source)."""
        task_id = str(task["id"])
        category = task.get("category")
        source = str(task.get("source_function") or "").strip("\n")
        if category == "unit_test":
            return self._skip(task_id, "no_reference_unit_test")
        builder = {
            "docstring": _reference_docstring,
            "complete": _reference_complete,
            "bugfix": _reference_bugfix,
            "explain": _reference_explain,
        }.get(str(category))
        if builder is None:
            return self._skip(task_id, "unknown_category")
        func = _function_node(source)
        if func is None:
            return self._skip(task_id, "unparsable_source")
        response, reason = builder(task, source, func)
        if response is None:
            return self._skip(task_id, str(reason))
        return TeacherResult(id=task_id, status=OK, response=response, finish_reason="stop",
                             model=self.model)

    def _skip(self, task_id: str, reason: str) -> TeacherResult:
        return TeacherResult(id=task_id, status=SKIPPED, reason=reason, model=self.model)


def _function_node(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


def _python_block(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _reference_docstring(task, source, func) -> tuple[str | None, str | None]:
    doc = ast.get_docstring(func)
    if not doc or not doc.strip():
        return None, "no_reference_docstring"
    return _python_block(render_docstring(doc)), None


def render_docstring(doc: str) -> str:
    """``doc`` as a triple-quoted docstring literal (multi-line ones close on their own line)."""
    doc = doc.strip()
    quote = "'''" if '"""' in doc else '"""'
    prefix = "r" if "\\" in doc and not doc.endswith("\\") else ""
    if "\n" in doc:
        return f"{prefix}{quote}{doc}\n{quote}"
    # a closing quote right after a quote character would end the literal early
    pad = " " if doc.endswith(quote[0]) or doc.endswith("\\") else ""
    return f"{prefix}{quote}{doc}{pad}{quote}"


def _reference_complete(task, source, func) -> tuple[str | None, str | None]:
    return _python_block(source), None


# -- bugfix ------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|==|!=|<=|>=|\*\*|//|->|\S")
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "is", "is not", "in", "not in"}
_BOUNDARY_PAIRS = {frozenset({"<", "<="}), frozenset({">", ">="})}
# trackb_core.mutations kinds whose operators are fixed: (correct, buggy). A token diff
# of `is not` -> `is` would only see a `not` go missing.
_KIND_OPERATORS = {
    "is_not_to_is": ("is not", "is"),
    "not_in_to_in": ("not in", "in"),
    "lte_to_lt": ("<=", "<"),
    "gte_to_gt": (">=", ">"),
    "is_to_is_not": ("is", "is not"),
    "in_to_not_in": ("in", "not in"),
    "lt_to_lte": ("<", "<="),
    "gt_to_gte": (">", ">="),
}


def _reference_bugfix(task, source, func) -> tuple[str | None, str | None]:
    mutation = task.get("mutation")
    if not isinstance(mutation, dict):
        return None, "no_mutation"
    return describe_mutation(mutation, source, task.get("buggy_source")) + "\n\n" + (
        "Fixed function:\n\n" + _python_block(source)
    ), None


def describe_mutation(mutation: dict[str, Any], source: str, buggy_source: str | None) -> str:
    """A short explanation of what a mutation changed and why the result is wrong."""
    line_no = int(mutation.get("line") or 0)
    before = str(mutation.get("before", ""))
    after = str(mutation.get("after", ""))
    good_line = _line(source, line_no) or before
    bad_line = _line(buggy_source or "", line_no) or after
    # before/after may be whole lines or just the changed fragment: narrow lines down
    kind = str(mutation.get("kind", ""))
    if kind in _KIND_OPERATORS:
        good, bad = _KIND_OPERATORS[kind]
    elif mutation.get("op_before") and mutation.get("op_after"):
        good, bad = str(mutation["op_before"]).strip(), str(mutation["op_after"]).strip()
    elif before.strip() and before.strip() != good_line.strip():
        good, bad = before.strip(), after.strip()
    else:
        good, bad = _changed_fragment(good_line, bad_line)
    where = f"Line {line_no}" if line_no else "The changed line"
    what, why = _explain_change(good, bad, good_line, bad_line, kind)
    head = f"The bug is on line {line_no}: `{short(bad_line)}`." if line_no else (
        f"The bug is in `{short(bad_line)}`.")
    return f"{head}\n{where} {what}: {why} The fix restores `{short(good_line)}`."


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 1 <= number <= len(lines) else ""


def _changed_fragment(good_line: str, bad_line: str) -> tuple[str, str]:
    a, b = _TOKEN.findall(good_line), _TOKEN.findall(bad_line)
    codes = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
             if op[0] != "equal"]
    if not codes:
        return good_line.strip(), bad_line.strip()
    i1, j1 = codes[0][1], codes[0][3]
    i2, j2 = codes[-1][2], codes[-1][4]
    return " ".join(a[i1:i2]), " ".join(b[j1:j2])


def _explain_change(good: str, bad: str, good_line: str, bad_line: str,
                    kind: str = "") -> tuple[str, str]:
    if bad_line.lstrip().startswith("#") and good_line.lstrip().startswith("return"):
        return ("has its `return` statement commented out",
                "the function falls through and returns `None` instead of the computed value.")
    returned = good_line.strip().removeprefix("return").strip()
    if kind == "return_value_removed" or (
            bad_line.strip() == "return" and good_line.strip().startswith("return ")):
        return (f"returns nothing where it should return `{short(returned, 60)}`",
                "a bare `return` gives the caller `None` instead of the computed value.")
    if good in _COMPARISONS and bad in _COMPARISONS:
        if frozenset({good, bad}) in _BOUNDARY_PAIRS:
            return (f"compares with `{bad}` where the logic needs `{good}`",
                    "the boundary case where both sides are equal is handled the wrong way "
                    "(an off-by-one error).")
        return (f"compares with `{bad}` where the logic needs `{good}`",
                "the test is inverted, so the wrong branch runs.")
    if {good, bad} == {"and", "or"}:
        return (f"joins the conditions with `{bad}` where the logic needs `{good}`",
                "the combined condition holds in the wrong cases.")
    if {good, bad} == {"True", "False"}:
        return (f"uses `{bad}` where the logic needs `{good}`",
                "the flag is flipped, so callers see the opposite behavior.")
    good_tokens, bad_tokens = good.split(), bad.split()
    if "not" in good_tokens and [t for t in good_tokens if t != "not"] == bad_tokens:
        return ("drops a `not`", "the condition is inverted, so the wrong branch runs.")
    if kind == "off_by_one" or re.search(r"[+-]\s*1\b", f"{good} {bad}"):
        if not bad:
            what = f"drops the `{good}`"
        elif not good:
            what = f"adds a `{bad}`"
        else:
            what = f"reads `{bad}` where the logic needs `{good}`"
        return what, "the value is off by one, so an index, count or bound is shifted."
    return (f"reads `{bad}` where the correct code is `{good}`",
            "this changes what the function computes, so its result is wrong.")


def short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- explain -------------------------------------------------------------------------

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``func``'s body in source order, not descending into nested scopes."""
    stack = list(reversed(func.body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _code(node: ast.AST, limit: int = 60) -> str:
    return f"`{short(ast.unparse(node), limit)}`"


def _reference_explain(task, source, func) -> tuple[str | None, str | None]:
    return explain_function(func), None


def explain_function(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """A deterministic markdown explanation of ``func`` built from its AST and docstring."""
    nodes = list(_own_nodes(func))
    is_async = isinstance(func, ast.AsyncFunctionDef)
    is_generator = any(isinstance(n, ast.Yield | ast.YieldFrom) for n in nodes)
    kind = ("async " if is_async else "") + ("generator " if is_generator else "") + "function"

    doc = ast.get_docstring(func)
    if doc and doc.strip():
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        purpose = f"The {kind} `{func.name}`: {summary}"
    else:
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", func.name).replace("_", " ").strip().lower()
        purpose = f"The {kind} `{func.name}` has no docstring; judging by its name it deals with: {words}."

    lines = [f"**Purpose:** {purpose}", "", "**Parameters:**"]
    lines += _parameter_bullets(func.args) or ["- none (it takes no arguments)"]
    lines += ["", f"**Returns:** {_returns_line(func, nodes, is_generator)}", "", "**Behavior:**"]
    lines += _behavior_bullets(func, nodes, is_async, is_generator)
    return "\n".join(lines)


def _parameter_bullets(args: ast.arguments) -> list[str]:
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    bullets = []
    for index, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if index == 0 and arg.arg in ("self", "cls") and arg.annotation is None:
            bullets.append(f"- `{arg.arg}`: the {'instance' if arg.arg == 'self' else 'class'} "
                           "the method is called on")
            continue
        bullets.append(_param(arg.arg, arg.annotation, default))
    if args.vararg:
        bullets.append(_param("*" + args.vararg.arg, args.vararg.annotation, None,
                              "extra positional arguments"))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        bullets.append(_param(arg.arg, arg.annotation, default, "keyword-only"))
    if args.kwarg:
        bullets.append(_param("**" + args.kwarg.arg, args.kwarg.annotation, None,
                              "extra keyword arguments"))
    return bullets


def _param(name: str, annotation, default, note: str = "") -> str:
    parts = [f"type {_code(annotation)}" if annotation is not None else "no type annotation"]
    parts.append(f"default {_code(default)}" if default is not None else "required"
                 if not name.startswith("*") else "optional")
    if note:
        parts.append(note)
    return f"- `{name}`: " + ", ".join(parts)


def _returns_line(func, nodes: list[ast.AST], is_generator: bool) -> str:
    annotation = f"{_code(func.returns)}. " if func.returns is not None else ""
    if is_generator:
        yielded = _unique(_code(n.value) for n in nodes
                          if isinstance(n, ast.Yield | ast.YieldFrom) and n.value is not None)
        what = f"yielding {', '.join(yielded[:4])}" if yielded else "yielding values"
        return f"{annotation}A generator {what}."
    returned = _unique(_code(n.value) if n.value is not None else "`None`"
                       for n in nodes if isinstance(n, ast.Return))
    if returned:
        more = f" (and {len(returned) - 4} more)" if len(returned) > 4 else ""
        return f"{annotation}Returns {' or '.join(returned[:4])}{more}."
    if annotation:
        return annotation.strip()
    return "Nothing explicitly (the function returns `None`)."


def _behavior_bullets(func, nodes: list[ast.AST], is_async: bool, is_generator: bool) -> list[str]:
    bullets: list[str] = []
    if is_async:
        awaited = _unique(_code(n.value) for n in nodes if isinstance(n, ast.Await))
        detail = f", awaiting {', '.join(awaited[:3])}" if awaited else ""
        bullets.append(f"- Runs as a coroutine (`async def`){detail}.")
    if is_generator:
        bullets.append("- Produces its results lazily with `yield`.")
    for node in nodes:
        if isinstance(node, ast.For | ast.AsyncFor):
            bullets.append(f"- Loops over {_code(node.iter)} (as {_code(node.target, 30)}).")
        elif isinstance(node, ast.While):
            bullets.append(f"- Repeats while {_code(node.test)} holds.")
    conditions = [n for n in nodes if isinstance(n, ast.If)]
    for node in conditions[:3]:
        bullets.append(f"- Branches on {_code(node.test)}.")
    if len(conditions) > 3:
        bullets.append(f"- Checks {len(conditions) - 3} more conditions.")
    for node in nodes:
        if isinstance(node, ast.Match):
            bullets.append(f"- Matches on {_code(node.subject)}.")
        elif isinstance(node, ast.With | ast.AsyncWith):
            managers = ", ".join(_code(item.context_expr) for item in node.items)
            bullets.append(f"- Uses the context manager {managers}.")
        elif isinstance(node, ast.Assert):
            bullets.append(f"- Asserts {_code(node.test)}.")
    caught = _unique(_code(h.type) if h.type is not None else "any exception"
                     for n in nodes if isinstance(n, ast.Try | ast.TryStar) for h in n.handlers)
    if caught:
        bullets.append(f"- Catches {', '.join(caught)}.")
    raised = _unique(
        (_code(n.exc.func) if isinstance(n.exc, ast.Call) else _code(n.exc))
        if n.exc is not None else "the current exception again (bare `raise`)"
        for n in nodes if isinstance(n, ast.Raise))
    if raised:
        bullets.append(f"- Raises {', '.join(raised)}.")
    calls = _unique(_code(n.func, 40) for n in nodes
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name | ast.Attribute))
    if calls:
        more = f" and {len(calls) - 8} more" if len(calls) > 8 else ""
        bullets.append(f"- Calls {', '.join(calls[:8])}{more}.")
    nested = [n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if nested:
        bullets.append(f"- Defines the nested function(s) {', '.join(f'`{n}`' for n in nested)}.")
    if not bullets:
        bullets.append("- Runs straight-line code: no loops, branches, calls or exceptions.")
    return bullets
