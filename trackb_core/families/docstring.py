"""The ``docstring`` family: write a Google-style docstring for a function.

- Task: the function with its docstring removed (cut at AST positions, everything else
  byte for byte); the instruction names the sections the function needs (``Args:``
  when it has parameters, ``Returns:`` when it returns a value, ``Raises:`` when it
  raises). A function whose next string statement would read as the docstring once
  it is removed is skipped (``docstring_unstrippable``).
- Reference answer: the function's own docstring as a triple-quoted literal (none:
  ``no_reference_docstring``).
- Verdict: Google style = a docstring literal (in the code block, or a triple-quoted
  string) whose first line is a one-line summary, and an ``Args:`` (or
  ``Arguments:``/``Parameters:``) section when the function has parameters;
  ``args_coverage`` = share of parameters (self/cls excluded) with a ``name:`` or
  ``name (type):`` entry in that section; ``has_returns`` = a ``Returns:``/``Yields:``
  section when the function returns or yields a value (True when it does not).
  Without a docstring literal nothing is Google style, so text that merely lacks
  sections to miss never passes.
- Strict filter reasons: ``docstring_not_google`` / ``docstring_args_incomplete`` /
  ``docstring_no_returns``; fact ``docstring_args_coverage``.
- Seed filter: ``no_triple_quote`` (no triple quote in the response).
"""

from __future__ import annotations

import ast
import re
from typing import Any

from trackb_core.codeblocks import first_code, parses
from trackb_core.families.base import CheckContext, Family, FunctionSource, Metric, verdict_fact
from trackb_core.pyast import (
    FunctionNode,
    has_docstring,
    item_params,
    item_returns_value,
    python_block,
    strip_docstring,
)

ARGS_HEADERS = ("args", "arguments", "parameters")
RETURNS_HEADERS = ("returns", "yields")
_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]{1,30}):\s*$")
_ENTRY = re.compile(r"^\s*\*{0,2}([A-Za-z_]\w*)\s*(\([^)]*\))?\s*:")
_TRIPLE = re.compile(r'("""|\'\'\')(.*?)(\1|$)', re.DOTALL)


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


def _join_words(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def docstring_literal(response: str) -> str | None:
    """The docstring literal in a response's code, or a triple-quoted string in its text."""
    code = first_code(response)
    if code is not None:
        tree = parses(code)
        if tree is not None:
            if has_docstring(tree.body):
                return tree.body[0].value.value
            for node in ast.walk(tree):
                if isinstance(node, FunctionNode | ast.ClassDef) and has_docstring(node.body):
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


def docstring_verdict(response: str, item: dict[str, Any]) -> dict[str, Any]:
    """``{"has_docstring", "google_style", "args_coverage", "has_returns", "ok"}`` for a
    docstring answer (see the module docstring). Raises nothing."""
    literal = docstring_literal(response)
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


class Docstring(Family):
    name = "docstring"
    answers_with_code = False
    guidance = ("Answer with only the docstring: a triple-quoted Google-style docstring "
                "(summary, Args:, Returns:, Raises: when relevant) in one ```python block.")
    pass_rule = ("none: a docstring is prose, nothing runs it; its form is reported as "
                 "format_ok (Google style, an Args: entry for every parameter, a "
                 "Returns:/Yields: section when the function returns a value)")
    seed_reasons = ("no_triple_quote",)
    filter_reasons = ("docstring_not_google", "docstring_args_incomplete",
                      "docstring_no_returns")
    metrics = (Metric("args_coverage", verdict_fact("args_coverage")),)
    facts = ("google_style", "has_returns", "ok")

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        stripped = strip_docstring(source.source, source.view)
        if stripped is None:
            return "docstring_unstrippable"
        sections = []
        if source.params:
            sections.append("an `Args:` section describing each parameter")
        if source.scan.returns_value:
            sections.append("a `Returns:` section describing the return value")
        if source.scan.raises:
            sections.append("a `Raises:` section listing the exceptions it raises")
        if sections:
            body = ", then " + _join_words(sections)
        else:
            body = ", then a short description of what it does"
        instruction = (
            f"Write a Google-style docstring for the Python function `{source.name}` below "
            "(any docstring it had was removed).\n\n"
            f"{python_block(stripped)}\n\n"
            f"The docstring must start with a one-line summary{body}. Return only the "
            'docstring, as a triple-quoted string ("""..."""), in one ```python block.'
        )
        return {"instruction": instruction}

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        doc = ast.get_docstring(function)
        if not doc or not doc.strip():
            return None, "no_reference_docstring"
        return python_block(render_docstring(doc)), None

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        return docstring_verdict(response, item)

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"docstring_args_coverage": round(verdict["args_coverage"], 4)}
        if not verdict["google_style"]:
            return "docstring_not_google", facts
        if verdict["args_coverage"] < 1.0:
            return "docstring_args_incomplete", facts
        if not verdict["has_returns"]:
            return "docstring_no_returns", facts
        return None, facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return bool(verdict["ok"])

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        return None  # prose about code: nothing to run

    def seed_reason(self, response: str) -> str | None:
        if '"""' not in response and "'''" not in response:
            return "no_triple_quote"
        return None


FAMILY = Docstring()
