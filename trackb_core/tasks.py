"""Tasks from extracted functions: every registered task family, per function.

What a task of each family looks like lives in its module of
:mod:`trackb_core.families`; this module runs them over a corpus' functions. Every
instruction is self-sufficient: it shows the code it talks about in a
```` ```python ```` block and says exactly what to return. Code is rewritten only at
positions located with the AST, never with text replaces: the seed's ``" == "`` ->
``" != "`` replaces hit strings, comments and docstrings (field notes §1). Bugs come
from :mod:`trackb_core.mutations`, one site per function, balanced across the corpus
(computed once when a wanted family needs them).

Rows: ``{"id": f"{function_id}-{category}", "category", "instruction",
"source_function", "source_file", "function_id", "function_name", "qualname",
"signature", "params", "returns_value", "line", "end_line", "decorators"}``; bugfix
rows add ``"buggy_source"`` and ``"mutation"`` (``{"kind", "line", "before",
"after"}``), and so do unit_test rows whose function has a mutant (so generated tests
can be checked to catch it).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from trackb_core import families
from trackb_core.families import Family, FunctionSource
from trackb_core.mutations import Assignment, ParsedFunction, assign_mutations


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
    assignment: Assignment | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """``(tasks, skipped_by_reason)`` for ``functions`` (rows of ``functions.jsonl``).

    Tasks come in function order, then in the families' registration order
    (:func:`trackb_core.families.names`). The same input and seed always give the same
    tasks. ``parsed`` (function id -> its parsed function, as extract keeps them) saves
    parsing each source again; any function missing from it is parsed here. A function
    whose source does not parse, or is nested too deeply to walk, is skipped and counted
    per category (``{category}_unparsable`` / ``{category}_too_deep``); so is one whose
    source holds a code fence (``{category}_fence_in_source``), and each family counts
    its own skips. ``assignment`` is the corpus-wide choice of mutants
    (:func:`~trackb_core.mutations.assign_mutations`) when ``functions`` is one part of
    a corpus built part by part; default: assigned here over ``functions``. Raises
    ValueError for an unknown category.
    """
    wanted = families.resolve(categories)
    with paused_gc():
        return _build_tasks(functions, wanted, seed, parsed or {}, assignment)


def _build_tasks(functions: list[dict[str, Any]], wanted: list[Family], seed: int,
                 parsed: Mapping[str, ParsedFunction], assignment: Assignment | None = None,
                 ) -> tuple[list[dict[str, Any]], dict[str, int]]:
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
    if assignment is None and any(family.needs_mutants for family in wanted):
        mutable = {fid: views[fid] for fid in views if "```" not in views[fid].source}
        assignment = assign_mutations(mutable, seed)
    elif assignment is None:
        assignment = Assignment({}, frozenset())

    tasks: list[dict[str, Any]] = []
    for fn in functions:
        if fn["id"] in unusable:
            for family in wanted:
                skip(f"{family.name}_{unusable[fn['id']]}")
            continue
        view = views[fn["id"]]
        try:
            scan = view.scan
        except (RecursionError, MemoryError):
            for family in wanted:
                skip(f"{family.name}_too_deep")
            continue
        source = FunctionSource(fn, view, scan, assignment.mutants.get(fn["id"]),
                                fn["id"] in assignment.over_cap)
        for family in wanted:
            if "```" in fn["source"]:
                # The code would close its own fence and garble the instruction.
                skip(f"{family.name}_fence_in_source")
                continue
            try:
                built = family.build_task(source)
            except (RecursionError, MemoryError):
                built = f"{family.name}_too_deep"
            if isinstance(built, str):
                skip(built)
                continue
            tasks.append({"id": f"{fn['id']}-{family.name}", "category": family.name,
                          **_common_fields(source), **built})
    return tasks, dict(sorted(skipped.items()))


def _common_fields(source: FunctionSource) -> dict[str, Any]:
    fn = source.row
    return {
        "source_function": fn["source"],
        "source_file": fn["file"],
        "function_id": fn["id"],
        "function_name": fn["name"],
        "qualname": fn["qualname"],
        "signature": fn["signature"],
        "params": source.params,
        "returns_value": source.scan.returns_value,
        "line": fn["line"],
        "end_line": fn["end_line"],
        "decorators": list(fn.get("decorators", [])),
    }
