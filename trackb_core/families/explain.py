"""The ``explain`` family: explain what a function does, in structured markdown.

- Task: the function as it is; the instruction asks for **Purpose**, **Parameters**,
  **Returns** and **Behaviour** sections.
- Reference answer: a deterministic explanation built from the function's AST and its
  docstring (:func:`explain_function`).
- Verdict, on the answer's **prose**: its text without code blocks and without lines of
  the function's own source (so an echo of the code has none). ``substantive`` = the
  prose has at least :data:`MIN_EXPLAIN_WORDS` different words; ``param_coverage`` =
  share of parameters the prose names as whole words; ``mentions_return`` = when the
  function returns a value, some line of prose mentions a return/yield word with content
  beyond "nothing"/"None" (True when it returns nothing). ``ok`` (the format check) needs
  all three: an empty answer or an echo of the code is never an explanation.
- Strict filter reasons: ``explain_params_missing`` / ``explain_no_return``; fact
  ``explain_param_coverage``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from typing import Any

from trackb_core.families.base import CheckContext, Family, FunctionSource, Metric, verdict_fact
from trackb_core.pyast import (
    FunctionNode,
    item_params,
    item_returns_value,
    own_nodes,
    python_block,
    short,
)

# -- the verdict ----------------------------------------------------------------------

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


_FENCED = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)


def prose_of(response: str, source: str) -> str:
    """The explanation's prose: ``response`` without fenced code blocks and without lines
    of ``source`` (the function itself, pasted unfenced)."""
    code_lines = {line.strip() for line in str(source or "").split("\n") if line.strip()}
    text = _FENCED.sub("\n", str(response or ""))
    return "\n".join(line for line in text.split("\n") if line.strip() not in code_lines)


def explain_verdict(response: str, item: dict) -> dict:
    """``{"substantive", "param_coverage", "mentions_return", "ok"}`` for an explanation
    (see the module docstring): judged on its prose only. Raises nothing."""
    text = prose_of(response, str(item.get("source_function") or ""))
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


# -- the reference answer --------------------------------------------------------------


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _code(node: ast.AST, limit: int = 60) -> str:
    return f"`{short(ast.unparse(node), limit)}`"


def explain_function(func: FunctionNode) -> str:
    """A deterministic markdown explanation of ``func`` built from its AST and docstring."""
    nodes = list(own_nodes(func))
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


class Explain(Family):
    name = "explain"
    answers_with_code = False
    guidance = ("Explain in markdown: a **Purpose** line, then **Parameters**, **Returns** and "
                "**Behavior** bullets. At most 250 words; do not repeat the code.")
    pass_rule = ("none: an explanation is prose, nothing runs it; its form is reported as "
                 "format_ok (substantive prose, not an echo of the code, every parameter "
                 "named, the return value described when there is one)")
    filter_reasons = ("explain_params_missing", "explain_no_return")
    metrics = (Metric("param_coverage", verdict_fact("param_coverage")),)
    facts = ("mentions_return", "ok")

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        instruction = (
            f"Explain the Python function `{source.name}` below.\n\n"
            f"{python_block(source.source)}\n\n"
            "Answer in structured markdown with these sections: **Purpose** (what the "
            "function does and why), **Parameters** (each parameter and its role, or \"none\"), "
            "**Returns** (the return value, or \"nothing\"), and **Behaviour** (the main steps, "
            "edge cases and any exceptions raised)."
        )
        return {"instruction": instruction}

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        return explain_function(function), None

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        return explain_verdict(response, item)

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"explain_param_coverage": round(verdict["param_coverage"], 4)}
        if verdict["param_coverage"] < 1.0:
            return "explain_params_missing", facts
        if not verdict["mentions_return"]:
            return "explain_no_return", facts
        return None, facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return bool(verdict["ok"])

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        return None  # prose about code: nothing to run


FAMILY = Explain()
