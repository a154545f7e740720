"""Finding and checking the code in a model's answer.

:func:`seed_code_blocks` (and :func:`first_code`, the block every check reads) reproduces the seed scorer's extraction *exactly*, quirks
included (see ``shared/docs/seed-metrics.md``): the dataset's baseline filters and the
seed-compatible metrics must agree with the published numbers' definition.
"""

from __future__ import annotations

import ast
import re
import threading
import warnings

# The fence tag must be absent or exactly "python", and a newline must follow it.
SEED_FENCE = re.compile(r"```(?:python)?\s*\n(.*?)```", re.DOTALL)
SEED_CODE_MARKERS = ("def ", "class ", "import ", "return ", "assert ")


def seed_code_blocks(response: str) -> list[str]:
    """The code blocks the seed scorer sees in ``response`` (only the first is checked).

    Fenced blocks win; with none, a response mentioning code keywords is one block.
    """
    fenced = SEED_FENCE.findall(response)
    if fenced:
        return [b.strip() for b in fenced if b.strip()]
    if any(marker in response for marker in SEED_CODE_MARKERS):
        return [response.strip()]
    return []


def compiles(code: str) -> bool:
    """True if ``compile(code, "<eval>", "exec")`` raises no SyntaxError (seed's check)."""
    try:
        compile(code, "<eval>", "exec")
    except SyntaxError:
        return False
    except (ValueError, OverflowError, RecursionError, MemoryError):
        # null bytes, huge literals, deep nesting: not valid code for our purposes
        return False
    return True


# CPython 3.11 before 3.11.8 keeps the AST converter's recursion counter in one global
# (python/cpython#106905): two parses that interleave in threads (scoring runs verdicts in
# a thread pool; a GC callback or finaliser can switch threads mid-conversion) raise
# SystemError "AST constructor recursion depth mismatch". One lock makes parses take turns.
_AST_LOCK = threading.Lock()


def syntax_tree(source: str | bytes, mode: str = "exec") -> ast.AST:
    """``ast.parse(source, mode=mode)``, safe to call from several threads at once.

    Warnings about old code (invalid escape sequences) are silenced. Raises SyntaxError,
    ValueError (null bytes), RecursionError or MemoryError (too deeply nested).
    """
    with _AST_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, mode=mode)


def parses(code: str) -> ast.Module | None:
    """The module AST of ``code``, or None if it does not parse."""
    try:
        return syntax_tree(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def first_code(response: str) -> str | None:
    """The first code block of ``response`` (the seed's extraction), or None if none."""
    blocks = seed_code_blocks(str(response or ""))
    return blocks[0] if blocks else None
