"""Quality filters for gold responses: the seed's baseline set and a strict set.

The build-dataset stage calls :func:`check_row` on every response row and keeps the row
when the verdict's ``reason`` is None. ``facts`` carry what was measured (fix rates,
unit-test outcomes) for the manifest and the dataset card, rejected rows included.

Filter sets (``FILTER_SETS``):

- ``seed`` reproduces the seed's filters exactly, as a named baseline.
- ``strict`` = every seed filter, then the per-category checks of
  :mod:`trackb_core.checks` (the same functions the eval metrics use), so a gold answer
  is kept only if it would itself count as correct.

Rejection reasons (the card lists them by these names):

``seed:unknown_category``
    the category is not one of the five task families.
``seed:too_short`` / ``seed:too_long``
    the stripped response is shorter than ``min_chars`` / longer than ``max_chars``.
``seed:placeholder``
    the seed's placeholder regexes match (TODO, TBD, ``<insert ...>``, ``your_...``,
    ``some_module``, foo ... bar).
``seed:no_code_block`` / ``seed:code_does_not_compile``
    complete, bugfix, unit_test: no code block, or the first one does not compile.
``seed:no_test_function`` / ``seed:no_assert``
    unit_test: no ``def test_`` / no ``assert`` in the response.
``seed:no_triple_quote``
    docstring: no triple quote in the response.
``strict:truncated``
    the teacher stopped at its token limit (``finish_reason == "length"``).
``strict:placeholder``
    placeholder content beyond the seed's regexes: ``path.to.module``-style names,
    "your code here" or "rest of the code" comments, a function whose body is ``...``.
``strict:bugfix_unparsable`` / ``strict:bugfix_not_restored``
    the fix does not parse / restores neither the original function (exact fix) nor
    the mutated site (site fix). Facts: ``bugfix_exact_fix``, ``bugfix_site_fix``.
``strict:complete_unparsable`` / ``strict:complete_signature_changed`` / ``strict:complete_echo``
    the completion does not parse / changes the function's name or arguments / only
    echoes the stub (signature, docstring, ``pass``, ``...``). Facts:
    ``complete_exact_match``, ``complete_edit_similarity``.
``strict:docstring_not_google`` / ``strict:docstring_args_incomplete`` / ``strict:docstring_no_returns``
    no one-line summary or no ``Args:`` section for a function with parameters / a
    parameter has no ``Args:`` entry / no ``Returns:``/``Yields:`` for a function that
    returns a value. Fact: ``docstring_args_coverage``.
``strict:explain_params_missing`` / ``strict:explain_no_return``
    a parameter is not named / the return value is not described. Fact:
    ``explain_param_coverage``.
``strict:unit_test_unparsable`` / ``strict:unit_test_no_tests``
    the tests do not parse / have no ``test_*`` function with an assert.
``strict:unit_test_not_executable``
    the function cannot be run here (no corpus, its module does not import, e.g. a
    heavy dependency is missing): counted, never kept on a guess.
``strict:unit_test_failed`` / ``strict:unit_test_error`` / ``strict:unit_test_timeout``
    against the original function a test fails / the tests do not import or the
    sandbox killed them / they do not finish within ``sandbox_timeout``.
``strict:unit_test_misses_mutant``
    the tests pass on the original and also on the function's mutant (they would not
    catch the bug). Facts: ``unit_test_status``, ``unit_test_kills_mutant``,
    ``unit_test_tests``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackb_core import checks, codeblocks
from trackb_core.errors import ConfigError
from trackb_core.tasks import CATEGORIES, CODE_CATEGORIES

FILTER_SETS = ("seed", "strict")

SEED_REASONS = ("unknown_category", "too_short", "too_long", "placeholder", "no_code_block",
                "code_does_not_compile", "no_test_function", "no_assert", "no_triple_quote")
STRICT_REASONS = (
    "truncated", "placeholder", "bugfix_unparsable", "bugfix_not_restored",
    "complete_unparsable", "complete_signature_changed", "complete_echo",
    "docstring_not_google", "docstring_args_incomplete", "docstring_no_returns",
    "explain_params_missing", "explain_no_return", "unit_test_unparsable",
    "unit_test_no_tests", "unit_test_not_executable", "unit_test_failed", "unit_test_error",
    "unit_test_timeout", "unit_test_misses_mutant",
)
# Every reason check_row can return, in the order the filters run.
REASONS = tuple(f"seed:{r}" for r in SEED_REASONS) + tuple(f"strict:{r}" for r in STRICT_REASONS)


@dataclass
class FilterContext:
    """What the filters need besides the row. Raises ConfigError for an unknown set."""

    min_chars: int
    max_chars: int
    corpus_dir: Path | None
    filter_set: str = "strict"
    sandbox_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.filter_set not in FILTER_SETS:
            raise ConfigError(f"unknown filter set {self.filter_set!r}; choose from "
                              f"{list(FILTER_SETS)}")


@dataclass
class FilterVerdict:
    """``reason`` None keeps the row; ``facts`` are measured details (see module doc)."""

    reason: str | None
    facts: dict[str, Any] = field(default_factory=dict)


def seed_reason(row: dict[str, Any], min_chars: int, max_chars: int) -> str | None:
    """The seed filters' verdict, unprefixed (``"too_short"``), or None if the row passes."""
    response = str(row.get("response", "")).strip()
    category = row.get("category")
    if category not in CATEGORIES:
        return "unknown_category"
    if len(response) < min_chars:
        return "too_short"
    if len(response) > max_chars:
        return "too_long"
    # imported here: metrics will import checks, which this module imports
    from trackb_core.metrics import hallucinates

    if hallucinates(response):
        return "placeholder"
    if category in CODE_CATEGORIES:
        blocks = codeblocks.seed_code_blocks(response)
        if not blocks:
            return "no_code_block"
        if not codeblocks.compiles(blocks[0]):
            return "code_does_not_compile"
    if category == "unit_test":
        if "def test_" not in response:
            return "no_test_function"
        if "assert" not in response:
            return "no_assert"
    if category == "docstring" and '"""' not in response and "'''" not in response:
        return "no_triple_quote"
    return None


def _bugfix(response: str, row: dict, ctx: FilterContext) -> tuple[str | None, dict]:
    verdict = checks.bugfix_verdict(response, row)
    facts = {"bugfix_exact_fix": verdict["exact_fix"], "bugfix_site_fix": verdict["site_fix"]}
    if not verdict["parses"]:
        return "bugfix_unparsable", facts
    if not (verdict["exact_fix"] or verdict["site_fix"]):
        return "bugfix_not_restored", facts
    return None, facts


def _complete(response: str, row: dict, ctx: FilterContext) -> tuple[str | None, dict]:
    verdict = checks.complete_verdict(response, row)
    facts = {"complete_exact_match": verdict["exact_match"],
             "complete_edit_similarity": verdict["edit_similarity"]}
    if not verdict["parses"]:
        return "complete_unparsable", facts
    if not verdict["keeps_signature"]:
        return "complete_signature_changed", facts
    if not verdict["not_echo"]:
        return "complete_echo", facts
    return None, facts


def _docstring(response: str, row: dict, ctx: FilterContext) -> tuple[str | None, dict]:
    verdict = checks.docstring_verdict(response, row)
    facts = {"docstring_args_coverage": round(verdict["args_coverage"], 4)}
    if not verdict["google_style"]:
        return "docstring_not_google", facts
    if verdict["args_coverage"] < 1.0:
        return "docstring_args_incomplete", facts
    if not verdict["has_returns"]:
        return "docstring_no_returns", facts
    return None, facts


def _explain(response: str, row: dict, ctx: FilterContext) -> tuple[str | None, dict]:
    verdict = checks.explain_verdict(response, row)
    facts = {"explain_param_coverage": round(verdict["param_coverage"], 4)}
    if verdict["param_coverage"] < 1.0:
        return "explain_params_missing", facts
    if not verdict["mentions_return"]:
        return "explain_no_return", facts
    return None, facts


UNIT_TEST_REASONS = {
    "unparsable": "unit_test_unparsable", "no_tests": "unit_test_no_tests",
    "not_executable": "unit_test_not_executable", "failed": "unit_test_failed",
    "error": "unit_test_error", "timeout": "unit_test_timeout",
}


def _unit_test(response: str, row: dict, ctx: FilterContext) -> tuple[str | None, dict]:
    verdict = checks.unit_test_verdict(response, row, ctx.corpus_dir,
                                       timeout=ctx.sandbox_timeout)
    facts = {"unit_test_status": verdict["status"],
             "unit_test_kills_mutant": verdict["kills_mutant"],
             "unit_test_tests": verdict["tests"],
             "unit_test_reason": verdict["reason"]}
    if verdict["status"] != "passed":
        return UNIT_TEST_REASONS.get(verdict["status"], "unit_test_error"), facts
    if verdict["kills_mutant"] is False:
        return "unit_test_misses_mutant", facts
    return None, facts


STRICT_CHECKS = {"bugfix": _bugfix, "complete": _complete, "docstring": _docstring,
                 "explain": _explain, "unit_test": _unit_test}


def check_row(row: dict[str, Any], ctx: FilterContext) -> FilterVerdict:
    """Run ``ctx.filter_set``'s filters on one response row, cheapest first.

    The first failing filter names the reason (``"seed:too_short"``,
    ``"strict:bugfix_not_restored"``, see the module docstring); None keeps the row.
    Raises nothing for a malformed response.
    """
    reason = seed_reason(row, ctx.min_chars, ctx.max_chars)
    if reason:
        return FilterVerdict(f"seed:{reason}")
    if ctx.filter_set == "seed":
        return FilterVerdict(None)
    response = str(row.get("response", ""))
    if row.get("finish_reason") == "length":
        return FilterVerdict("strict:truncated")
    if checks.has_placeholder(response):
        return FilterVerdict("strict:placeholder")
    reason, facts = STRICT_CHECKS[row["category"]](response, row, ctx)
    return FilterVerdict(f"strict:{reason}" if reason else None, facts)
