"""Placeholder content in an answer: the seed's hallucination regexes and stricter ones.

The seed's six regexes (:data:`HALLUCINATION_PATTERNS`, ``shared/docs/seed-metrics.md``)
are defined here once: the seed-compatible metrics count them as its "hallucination
rate" (:func:`hallucinates`), the seed filters reject on them, and the strict filters
reject on them and on :data:`EXTRA_PLACEHOLDERS` (:func:`has_placeholder`).
"""

from __future__ import annotations

import ast
import re

from trackb_core.codeblocks import first_code, parses
from trackb_core.pyast import FunctionNode, has_docstring

# Case-insensitive, and "." does not cross newlines: "foo" and "bar" on one line only.
HALLUCINATION_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"<\s*insert.*?>",
        r"\bTODO\b",
        r"\bTBD\b",
        r"\byour_[a-zA-Z_]+\b",
        r"\bsome_module\b",
        r"\bfoo\b.*\b(bar|baz)\b",
    )
)

# Beyond the seed's regexes: stand-ins a teacher writes instead of real code or real
# import paths.
EXTRA_PLACEHOLDERS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\bpath\.to\.\w+",
    r"\bmy_module\b",
    r"#\s*(your|add|insert|implement|put)\b[^\n]*\bhere\b",
    r"#\s*\.\.\.\s*(rest|remaining|existing|other)\b",
    r"\.\.\.\s*#\s*(rest|remaining|existing|other|same)\b",
    r"#\s*(rest|remainder) of (the )?(code|function|implementation)",
))


def hallucinates(response: str) -> bool:
    """True if ``response`` matches any of the seed's placeholder regexes."""
    return any(p.search(response) for p in HALLUCINATION_PATTERNS)


def _ellipsis_only_function(text: str) -> bool:
    code = first_code(text)
    tree = parses(code) if code else None
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, FunctionNode):
            body = node.body[1:] if has_docstring(node.body) else node.body
            if body and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                            and s.value.value is Ellipsis for s in body):
                return True
    return False


def has_placeholder(text: str) -> bool:
    """True if ``text`` holds placeholder content: the seed's regexes (TODO, TBD,
    ``<insert ...>``, ``your_...``, ...), ``path.to.module``-style names, "your code
    here" comments, elided-code comments, or a function whose body is only ``...``."""
    text = str(text or "")
    if hallucinates(text):
        return True
    if any(p.search(text) for p in EXTRA_PLACEHOLDERS):
        return True
    return _ellipsis_only_function(text)
