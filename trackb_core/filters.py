"""Quality filters for gold responses: the seed's baseline set and a strict set.

The build-dataset stage calls :func:`check_row` on every response row and keeps the row
when the verdict's ``reason`` is None. ``facts`` carry what was measured (fix rates,
unit-test outcomes) for the manifest and the dataset card, rejected rows included.

Filter sets (``FILTER_SETS``):

- ``seed`` reproduces the seed's filters exactly, as a named baseline.
- ``strict`` = every seed filter, then the row's family's verdict
  (:meth:`trackb_core.families.Family.verdict`, the same one the eval metrics use), so a
  gold answer is kept only if it would itself count as correct.

Rejection reasons (the card lists them by these names; :func:`reasons` lists them all):

``seed:unknown_category``
    the category is not a registered task family.
``seed:too_short`` / ``seed:too_long``
    the stripped response is shorter than ``min_chars`` / longer than ``max_chars``.
``seed:placeholder``
    the seed's placeholder regexes match (TODO, TBD, ``<insert ...>``, ``your_...``,
    ``some_module``, foo ... bar).
``seed:no_code_block`` / ``seed:code_does_not_compile``
    a family whose answer is code: no code block, or the first one does not compile.
``seed:<family reason>``
    the family's own seed filter (:attr:`Family.seed_reasons`): unit_test
    ``no_test_function`` / ``no_assert``, docstring ``no_triple_quote``.
``strict:truncated``
    the teacher stopped at its token limit (``finish_reason == "length"``).
``strict:placeholder``
    placeholder content beyond the seed's regexes: ``path.to.module``-style names,
    "your code here" or "rest of the code" comments, a function whose body is ``...``.
``strict:<family reason>``
    the family's strict verdict (:attr:`Family.filter_reasons`, each documented in its
    module of :mod:`trackb_core.families`), e.g. ``bugfix_not_restored``,
    ``complete_echo``, ``docstring_args_incomplete``, ``explain_params_missing``,
    ``unit_test_misses_mutant``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackb_core import codeblocks, families
from trackb_core.errors import ConfigError
from trackb_core.families import CheckContext
from trackb_core.placeholders import hallucinates, has_placeholder

FILTER_SETS = ("seed", "strict")

# The filters every family goes through, in the order they run.
SEED_REASONS = ("unknown_category", "too_short", "too_long", "placeholder", "no_code_block",
                "code_does_not_compile")
STRICT_REASONS = ("truncated", "placeholder")


def reasons() -> tuple[str, ...]:
    """Every reason :func:`check_row` can return with the registered families, seed
    filters first, each set in the order its filters run."""
    seed = [*SEED_REASONS, *(r for f in families.all_families() for r in f.seed_reasons)]
    strict = [*STRICT_REASONS, *(r for f in families.all_families() for r in f.filter_reasons)]
    return tuple(f"seed:{r}" for r in seed) + tuple(f"strict:{r}" for r in strict)


@dataclass
class FilterContext:
    """What the filters need besides the row. Raises ConfigError for an unknown set."""

    min_chars: int
    max_chars: int
    corpus_dir: Path | None
    filter_set: str = "strict"
    sandbox_timeout: float = 10.0
    allow_weak_sandbox: bool = False
    python_path: tuple[Path, ...] = ()  # the corpus's execution environment

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
    try:
        family = families.get(row.get("category"))
    except ValueError:
        return "unknown_category"
    if len(response) < min_chars:
        return "too_short"
    if len(response) > max_chars:
        return "too_long"
    if hallucinates(response):
        return "placeholder"
    if family.answers_with_code:
        blocks = codeblocks.seed_code_blocks(response)
        if not blocks:
            return "no_code_block"
        if not codeblocks.compiles(blocks[0]):
            return "code_does_not_compile"
    return family.seed_reason(response)


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
    if has_placeholder(response):
        return FilterVerdict("strict:placeholder")
    family = families.get(row["category"])
    verdict = family.verdict(response, row, CheckContext(ctx.corpus_dir, ctx.sandbox_timeout,
                                                         ctx.allow_weak_sandbox,
                                                         ctx.python_path))
    reason, facts = family.filter(verdict)
    return FilterVerdict(f"strict:{reason}" if reason else None, facts)
