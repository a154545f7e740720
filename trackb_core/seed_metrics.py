"""The seed-compatible metrics, exactly as ``shared/docs/seed-metrics.md`` defines them.

These are the rules of the scorer behind the seed's published numbers (pass@1 0.565,
pass@3 0.783, style 0.874, hallucination 0.022), quirks included: its own checks per
category (an unknown category, a new task family included, is scored as **explain**),
only the first code block checked, pass@3 as "any of 3" rather than the unbiased
estimator, style as the best of 3, the execution rate over complete, bugfix and
unit_test only. They are what the published baseline measured, and changing them would
make trackb's numbers incomparable with it, so this module knows nothing of
:mod:`trackb_core.families`: the honest metrics (:mod:`trackb_core.metrics`) stand
beside these, never instead.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

from trackb_core.codeblocks import compiles, first_code, parses
from trackb_core.errors import InputError
from trackb_core.placeholders import hallucinates

# The seed's categories whose answer is code: pass = the first block compiles, and the
# execution rate is taken over them.
SEED_CODE_CATEGORIES = ("complete", "bugfix", "unit_test")
SEED_K = 3  # the seed's pass@3: the greedy answer and the first two samples

METRIC_SET = "seed-compatible"
MAX_FAILURES = 20
FAILURE_TEXT_CHARS = 500

BUGFIX_WORDS = ("bug", "fix", "issue", "error", "incorrect", "wrong")
EXPLAIN_WORDS = ("function", "method", "returns", "takes", "parameter", "argument", "input",
                 "output")


def _defines_function(code: str, expected_name: str | None) -> bool:
    tree = parses(code)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if expected_name is None or node.name == expected_name:
                return True
    return False


def _docstring_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    return {
        "has_triple_quotes": '"""' in response or "'''" in response,
        "long_enough": len(response.strip()) > 30,
        "has_args": ("Args:" in response or "Parameters:" in response or "Params:" in response)
        or not hints.get("has_args", True),
        "has_returns": ("Returns:" in response or "Return:" in response)
        or not hints.get("has_return", True),
        "has_raises": "Raises:" in response or not hints.get("has_exceptions", False),
    }


def _complete_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    block = first_code(response)
    if block is None:
        return {"has_code": False, "syntax_ok": False, "has_function": False}
    return {
        "has_code": True,
        "syntax_ok": compiles(block),
        "has_function": _defines_function(block, hints.get("expected_name")),
    }


def _bugfix_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    lowered = response.lower()
    block = first_code(response)
    return {
        "mentions_fix": any(word in lowered for word in BUGFIX_WORDS),
        "enough_words": len(response.split()) > 15,
        "has_code": block is not None,
        "syntax_ok": block is not None and compiles(block),
    }


def _explain_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    lowered = response.lower()
    stripped = response.strip()
    return {
        "enough_words": len(response.split()) >= 20,
        "mentions_behaviour": any(word in lowered for word in EXPLAIN_WORDS),
        "structured": len(response.split("\n")) > 2 or "**" in response or "- " in response,
        "not_only_code": not (stripped.startswith("```") and stripped.endswith("```")),
    }


def _unit_test_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    block = first_code(response)
    return {
        "has_test_def": "def test_" in response or "def test" in response,
        "has_assert": "assert" in response,
        "has_import": "import " in response,
        "has_code": block is not None,
        "syntax_ok": block is not None and compiles(block),
    }


CHECKS: dict[str, Callable[[str, dict[str, Any]], dict[str, bool]]] = {
    "docstring": _docstring_checks,
    "complete": _complete_checks,
    "bugfix": _bugfix_checks,
    "explain": _explain_checks,
    "unit_test": _unit_test_checks,
}


def score_response(category: str, response: str, hints: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """``{"checks", "style", "passed"}`` for one response under the seed's rules.

    An unknown category is scored as explain. Raises nothing.
    """
    hints = hints if isinstance(hints, dict) else {}
    scored_as = category if category in CHECKS else "explain"
    checks = CHECKS[scored_as](response, hints)
    style = sum(checks.values()) / len(checks)
    if scored_as in SEED_CODE_CATEGORIES:
        passed = checks["syntax_ok"]
    else:
        passed = style >= 0.5
    return {"checks": checks, "style": style, "passed": passed}


def responses_for(prediction: Any, k: int, where: str) -> list[str]:
    """``[greedy] + samples[:k-1]`` from a prediction record. Raises InputError if malformed."""
    if not isinstance(prediction, dict) or not isinstance(prediction.get("greedy"), str):
        raise InputError(f"prediction for {where} has no string 'greedy' field")
    samples = prediction.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
        raise InputError(f"prediction for {where}: 'samples' must be a list of strings")
    return [prediction["greedy"], *samples[: max(k - 1, 0)]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def seed_rows(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]], k: int
              ) -> list[dict[str, Any]]:
    """One row per item, in id order, with the seed's per-item facts (see :func:`score_seed`).

    Raises InputError as :func:`score_seed` documents.
    """
    if not items:
        raise InputError("no test items to score")
    for item in items:
        if "id" not in item:
            raise InputError("a test item has no 'id' field")
    ordered = sorted(items, key=lambda it: str(it["id"]))

    rows = []
    for item in ordered:
        item_id = str(item["id"])
        if item_id not in predictions:
            raise InputError(f"no prediction for test item {item_id!r}")
        category = str(item.get("category", ""))
        responses = responses_for(predictions[item_id], k, f"item {item_id!r}")
        scored = [score_response(category, r, item.get("hints")) for r in responses]
        best_style = 0.0  # the seed's running maximum starts at 0
        for s in scored:
            best_style = max(best_style, s["style"])
        rows.append({
            "id": item_id,
            "category": category,
            "pass1": scored[0]["passed"],
            "passk": any(s["passed"] for s in scored),
            "style": best_style,
            "hallucinated": hallucinates(responses[0]),
            "greedy": responses[0],
            "checks": scored[0]["checks"],
        })
    return rows


def score_seed(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]], tag: str,
               k: int = 3) -> dict[str, Any]:
    """The seed-compatible metrics of ``predictions`` over the test ``items``.

    ``predictions`` maps item id -> ``{"greedy": str, "samples": [str, ...]}``; an item's
    responses are the greedy one plus the first ``k - 1`` samples. Items are scored in
    id order so the (at most 20) failure records are stable.

    Raises InputError if there are no items, an item has no id, an item has no
    prediction, or a prediction is malformed.
    """
    return seed_summary(seed_rows(items, predictions, k), tag, k)


def seed_summary(rows: list[dict[str, Any]], tag: str, k: int) -> dict[str, Any]:
    """The seed-compatible JSON block (see the spec's "Output keys") of :func:`seed_rows`."""
    code_rows = [r for r in rows if r["category"] in SEED_CODE_CATEGORIES]
    per_category = {}
    for category in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == category]
        per_category[category] = {
            "count": len(mine),
            "pass_at_1": _mean([float(r["pass1"]) for r in mine]),
            "pass_at_k": _mean([float(r["passk"]) for r in mine]),
            "avg_style": round(_mean([r["style"] for r in mine]), 4),
            "hallucination_rate": _mean([float(r["hallucinated"]) for r in mine]),
        }
    failures = [
        {
            "id": r["id"],
            "category": r["category"],
            "greedy": r["greedy"][:FAILURE_TEXT_CHARS],
            "checks": r["checks"],
            "style": round(_style_of(r["checks"]), 4),
        }
        for r in rows
        if not r["pass1"]
    ][:MAX_FAILURES]

    return {
        "tag": tag,
        "metric_set": METRIC_SET,
        "total_samples": len(rows),
        "k": k,
        "pass_at_1": _mean([float(r["pass1"]) for r in rows]),
        "pass_at_k": _mean([float(r["passk"]) for r in rows]),
        "avg_style_score": _mean([r["style"] for r in rows]),
        "hallucination_rate": _mean([float(r["hallucinated"]) for r in rows]),
        "execution_rate": _mean([float(r["pass1"]) for r in code_rows]),
        "per_category": per_category,
        "failures": failures,
    }


def _style_of(checks: dict[str, bool]) -> float:
    return sum(checks.values()) / len(checks)
