"""The one scorer of ``trackb eval`` and ``trackb score``: seed-compatible metrics beside
honest ones, each headline number with a 95% bootstrap interval.

One scorer serves both commands so that a number computed from generations made
elsewhere means the same as one computed here. :func:`score_all` builds eval.json's
metrics in three labelled sections:

- **seed** (:func:`score_seed`, kept byte-for-byte as ``seed_compatible``): the rules of
  ``shared/docs/seed-metrics.md`` to the letter, quirks included (unknown categories
  scored as explain, only the first code block checked, pass@3 as "any of 3" rather
  than the unbiased estimator, style as the best of 3). They are what the published
  baseline (pass@1 0.565, pass@3 0.783, style 0.874, hallucination 0.022) measured, and
  changing them would make our numbers incomparable with it.
- **unbiased**: Chen et al.'s pass@k (k = 1, 3) over the ``n`` samples drawn at one
  temperature, plus greedy pass@1, where "correct" is :func:`strict_pass`, an
  execution/AST check per category (:mod:`trackb_core.checks`) instead of "compiles".
- **execution**: what those checks measure on the greedy answer: bugfix exact/site fix,
  complete parses/keeps signature/not an echo/exact match/edit similarity, unit_test
  pass against the original and mutant kill (executable items only), docstring Args
  coverage, explain parameter coverage.

Every interval resamples whole source functions (:func:`item_group`), because the up to
five tasks of one function are not independent; ``items`` carries per-item flags so
``compare`` can pair baseline and post-SFT (McNemar, paired bootstrap:
:mod:`trackb_core.stats`).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trackb_core import checks
from trackb_core.codeblocks import compiles, parses, seed_code_blocks
from trackb_core.errors import InputError
from trackb_core.stats import bootstrap_ci, pass_at_k
from trackb_core.tasks import CATEGORIES, CODE_CATEGORIES

METRIC_SET = "seed-compatible"
MAX_FAILURES = 20
FAILURE_TEXT_CHARS = 500

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
BUGFIX_WORDS = ("bug", "fix", "issue", "error", "incorrect", "wrong")
EXPLAIN_WORDS = ("function", "method", "returns", "takes", "parameter", "argument", "input",
                 "output")


def hallucinates(response: str) -> bool:
    """True if ``response`` matches any of the seed's placeholder regexes."""
    return any(p.search(response) for p in HALLUCINATION_PATTERNS)


def _first_block(response: str) -> str | None:
    blocks = seed_code_blocks(response)
    return blocks[0] if blocks else None


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
    block = _first_block(response)
    if block is None:
        return {"has_code": False, "syntax_ok": False, "has_function": False}
    return {
        "has_code": True,
        "syntax_ok": compiles(block),
        "has_function": _defines_function(block, hints.get("expected_name")),
    }


def _bugfix_checks(response: str, hints: dict[str, Any]) -> dict[str, bool]:
    lowered = response.lower()
    block = _first_block(response)
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
    block = _first_block(response)
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
    if scored_as in CODE_CATEGORIES:
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


def _seed_rows(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]], k: int
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
    return _seed_summary(_seed_rows(items, predictions, k), tag, k)


def _seed_summary(rows: list[dict[str, Any]], tag: str, k: int) -> dict[str, Any]:
    code_rows = [r for r in rows if r["category"] in CODE_CATEGORIES]
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


def index_predictions(rows: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    """``{id: row}`` from ``predictions.jsonl`` rows. Raises InputError on a missing or
    repeated id."""
    found: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(rows, 1):
        if "id" not in row:
            raise InputError(f"{where}: prediction {number} has no 'id' field")
        key = str(row["id"])
        if key in found:
            raise InputError(f"{where}: prediction id {key!r} appears twice")
        found[key] = row
    return found


# -- the honest metrics ---------------------------------------------------------------------

METRIC_VERSION = 2
SEED_K = 3  # the seed's pass@3: the greedy answer and the first two samples
UNBIASED_KS = (1, 3)
# Most unit-test sandboxes run at once: each is a child process, and the machines that
# score are often small.
MAX_SANDBOX_WORKERS = 4

# What "correct" means for the unbiased pass@k and greedy pass@1, per category.
STRICT_PASS_RULES = {
    "bugfix": "the answer's code restores the original function exactly (exact_fix) or at "
              "least its mutated site (site_fix)",
    "complete": "the answer's code parses, keeps the signature and is not an echo of the stub "
                "(parses & keeps_signature & not_echo)",
    "unit_test": "the tests run and pass against the original function and, where the item "
                 "has a mutant that was run, fail against it (passes_original & kills_mutant); "
                 "tests that cannot be executed do not pass",
    "docstring": "Google style, an Args: entry for every parameter (args_coverage 1.0) and a "
                 "Returns:/Yields: section when the function returns a value",
    "explain": "every parameter named (param_coverage 1.0) and what the function returns said "
               "when it returns a value (mentions_return)",
}

# Headline name of each seed metric -> its field in ``seed_compatible``.
SEED_HEADLINE_KEYS = {
    "seed_pass_at_1": "pass_at_1",
    "seed_pass_at_3": "pass_at_k",
    "seed_style_score": "avg_style_score",
    "seed_hallucination_rate": "hallucination_rate",
    "seed_execution_rate": "execution_rate",
}

_PURE_VERDICTS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "bugfix": checks.bugfix_verdict,
    "complete": checks.complete_verdict,
    "docstring": checks.docstring_verdict,
    "explain": checks.explain_verdict,
}


def item_group(item: dict[str, Any]) -> str:
    """The resampling group of a test item: its source function.

    ``item["function_id"]`` when present, else ``sha256:`` + the hash of the
    whitespace-normalised ``source_function``, else the item's own id. Raises nothing.
    """
    function_id = item.get("function_id")
    if function_id not in (None, ""):
        return str(function_id)
    source = item.get("source_function")
    if isinstance(source, str) and source.strip():
        normalised = " ".join(source.split())
        return "sha256:" + hashlib.sha256(normalised.encode()).hexdigest()[:16]
    return f"item:{item.get('id')}"


def has_mutant(item: dict[str, Any]) -> bool:
    """True if the item carries a mutant of its function (``buggy_source``)."""
    return bool(item.get("buggy_source"))


def verdict(category: str, response: str, item: dict[str, Any], corpus_dir: Path | None, *,
            timeout: float = 10.0) -> dict[str, Any]:
    """The measured facts of one ``response`` to ``item`` (:mod:`trackb_core.checks`).

    unit_test answers run in the sandbox with ``timeout`` seconds per run; the other
    categories are pure AST/text checks. Raises InputError for an unknown category.
    """
    if category == "unit_test":
        return checks.unit_test_verdict(response, item, corpus_dir, timeout=timeout)
    if category not in _PURE_VERDICTS:
        raise InputError(f"no strict check for category {category!r}; "
                         f"known: {', '.join(CATEGORIES)}")
    return _PURE_VERDICTS[category](response, item)


def passes(category: str, facts: dict[str, Any]) -> bool:
    """Whether a :func:`verdict` counts as a strict pass (:data:`STRICT_PASS_RULES`).

    Raises InputError for an unknown category.
    """
    if category == "bugfix":
        return bool(facts["exact_fix"] or facts["site_fix"])
    if category == "complete":
        return bool(facts["parses"] and facts["keeps_signature"] and facts["not_echo"])
    if category == "unit_test":
        # kills_mutant is None when there was no mutant to run (none, or it could not be
        # placed in the module): the item then asks only for passing the original
        return facts.get("passes_original") is True and facts.get("kills_mutant") is not False
    if category == "docstring":
        return bool(facts["google_style"] and facts["args_coverage"] == 1.0
                    and facts["has_returns"])
    if category == "explain":
        return bool(facts["param_coverage"] == 1.0 and facts["mentions_return"])
    raise InputError(f"no strict check for category {category!r}; "
                     f"known: {', '.join(CATEGORIES)}")


def strict_pass(category: str, response: str, item: dict[str, Any],
                corpus_dir: Path | None) -> bool:
    """The "strict pass" behind the unbiased pass@k and greedy pass@1.

    - bugfix: the fix restores the original exactly or at least the mutated site;
    - complete: the code parses, keeps the signature and is not an echo of the stub;
    - unit_test: the tests pass against the original and, where the item has a mutant
      that could be run, kill it (run in the sandbox; not executable = not passed);
    - docstring: Google style, every parameter under Args:, Returns: when needed;
    - explain: every parameter named, the return value described when there is one.

    Raises InputError for an unknown category.
    """
    return passes(category, verdict(category, response, item, corpus_dir))


def _validated_responses(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]]
                         ) -> dict[str, list[str]]:
    """``{id: [greedy, *samples]}`` for every item. Raises InputError like score_seed."""
    if not items:
        raise InputError("no test items to score")
    found = {}
    for item in items:
        if "id" not in item:
            raise InputError("a test item has no 'id' field")
        item_id = str(item["id"])
        if item_id not in predictions:
            raise InputError(f"no prediction for test item {item_id!r}")
        category = item.get("category")
        if category not in CATEGORIES:
            raise InputError(f"test item {item_id!r} has category {category!r}; the strict "
                             f"metrics know {', '.join(CATEGORIES)}")
        prediction = predictions[item_id]
        responses_for(prediction, 1, f"item {item_id!r}")  # raises if malformed
        found[item_id] = [prediction["greedy"], *(prediction.get("samples") or [])]
    return found


def _all_verdicts(ordered: list[dict[str, Any]], responses: dict[str, list[str]],
                  corpus_dir: Path | None, timeout: float, workers: int | None
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(item id, response): verdict}``, each distinct answer checked once.

    Unit tests run in sandboxes, a few at a time (each sandbox is its own process, so
    threads are enough to overlap them).
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    sandboxed: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    for item in ordered:
        item_id, category = str(item["id"]), item["category"]
        for response in responses[item_id]:
            key = (item_id, response)
            if key in found or key in sandboxed:
                continue
            if category == "unit_test":
                sandboxed[key] = (item, response)
            else:
                found[key] = verdict(category, response, item, corpus_dir)
    if sandboxed:
        workers = workers or min(MAX_SANDBOX_WORKERS, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(
                lambda job: verdict("unit_test", job[1], job[0], corpus_dir, timeout=timeout),
                sandboxed.values())
            found.update(zip(sandboxed, results, strict=True))
    return found


def _item_records(ordered: list[dict[str, Any]], responses: dict[str, list[str]],
                  seed_rows: dict[str, dict[str, Any]],
                  verdicts: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for item in ordered:
        item_id, category = str(item["id"]), item["category"]
        greedy, *samples = responses[item_id]
        greedy_facts = verdicts[(item_id, greedy)]
        n = len(samples)
        correct = sum(passes(category, verdicts[(item_id, s)]) for s in samples)
        seed_row = seed_rows[item_id]
        records.append({
            "id": item_id,
            "category": category,
            "group": item_group(item),
            "seed_pass_at_1": seed_row["pass1"],
            "seed_pass_at_k": seed_row["passk"],
            "seed_style": seed_row["style"],
            "hallucinated": seed_row["hallucinated"],
            "greedy_pass": passes(category, greedy_facts),
            "n_samples": n,
            "n_correct": correct,
            # c / n is the unbiased pass@1 of this item; None without samples
            "pass_fraction": correct / n if n else None,
            "pass_at_3": pass_at_k(n, correct, 3) if n >= 3 else None,
            "has_mutant": has_mutant(item),
            "verdict": greedy_facts,
        })
    return records


def _unit_test_executable(record: dict[str, Any]) -> bool:
    return record["verdict"].get("status") != "not_executable"


def _kills_mutant(record: dict[str, Any]) -> bool | None:
    """Whether the greedy tests kill the item's mutant; None where that cannot count: no
    mutant, tests not executable, or the original passed but the mutant could not be run.
    Tests that fail the original count as not killing it."""
    facts = record["verdict"]
    if not record["has_mutant"] or not _unit_test_executable(record):
        return None
    if facts.get("passes_original") is True and facts.get("kills_mutant") is None:
        return None
    return facts.get("kills_mutant") is True


# Execution metrics on the greedy answer: (category, metric, value of one record or None
# when the record does not count for the metric).
_EXECUTION_METRICS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("bugfix", "exact_fix", lambda r: r["verdict"]["exact_fix"]),
    ("bugfix", "site_fix", lambda r: r["verdict"]["site_fix"]),
    ("complete", "parses", lambda r: r["verdict"]["parses"]),
    ("complete", "keeps_signature", lambda r: r["verdict"]["keeps_signature"]),
    ("complete", "not_echo", lambda r: r["verdict"]["not_echo"]),
    ("complete", "exact_match", lambda r: r["verdict"]["exact_match"]),
    ("complete", "edit_similarity", lambda r: r["verdict"]["edit_similarity"]),
    ("unit_test", "passes_original",
     lambda r: r["verdict"].get("passes_original") is True if _unit_test_executable(r)
     else None),
    ("unit_test", "kills_mutant", lambda r: _kills_mutant(r)),
    ("docstring", "args_coverage", lambda r: r["verdict"]["args_coverage"]),
    ("explain", "param_coverage", lambda r: r["verdict"]["param_coverage"]),
)
# Reported in "execution" too, without intervals: the parts of the strict pass.
_EXTRA_EXECUTION_FACTS = {
    "bugfix": ("parses",),
    "docstring": ("google_style", "has_returns", "ok"),
    "explain": ("mentions_return", "ok"),
}


class _Estimator:
    """Means with grouped bootstrap intervals, all with the same settings."""

    def __init__(self, n_boot: int, seed: int):
        self.n_boot, self.seed = n_boot, seed

    def __call__(self, records: list[dict[str, Any]], value: Callable[[dict[str, Any]], Any],
                 unavailable: str | None = None) -> dict[str, Any]:
        """``{"value", "ci", "n"}`` of ``value`` over the records it applies to (not None);
        value and ci None, with ``reason``, when ``unavailable`` says why or none apply."""
        if unavailable:
            return {"value": None, "ci": None, "n": 0, "reason": unavailable}
        pairs = [(float(v), r["group"]) for r in records if (v := value(r)) is not None]
        if not pairs:
            return {"value": None, "ci": None, "n": 0, "reason": "no items to measure"}
        values, groups = [v for v, _ in pairs], [g for _, g in pairs]
        low, high = bootstrap_ci(values, groups, n_boot=self.n_boot, seed=self.seed)
        return {"value": sum(values) / len(values), "ci": [low, high], "n": len(values)}


def _general_metrics(seed_k: int, min_samples: int
                     ) -> list[tuple[str, str, Callable[[dict[str, Any]], Any], str | None]]:
    """(name, section, value of a record, reason it is unavailable) for the metrics that
    apply to every category."""
    seed_k_reason = None if seed_k == SEED_K else (
        f"the seed's pass@3 needs 2 samples per item besides the greedy answer; "
        f"the predictions have {min_samples}")

    def unbiased_reason(k: int) -> str | None:
        if min_samples >= k:
            return None
        return (f"unbiased pass@{k} needs at least {k} samples per item at one temperature; "
                f"the predictions have {min_samples}")

    return [
        ("seed_pass_at_1", "seed", lambda r: r["seed_pass_at_1"], None),
        ("seed_pass_at_3", "seed", lambda r: r["seed_pass_at_k"], seed_k_reason),
        ("seed_style_score", "seed", lambda r: r["seed_style"], None),
        ("seed_hallucination_rate", "seed", lambda r: r["hallucinated"], None),
        ("greedy_pass_at_1", "unbiased", lambda r: r["greedy_pass"], None),
        ("pass_at_1", "unbiased", lambda r: r["pass_fraction"], unbiased_reason(1)),
        ("pass_at_3", "unbiased", lambda r: r["pass_at_3"], unbiased_reason(3)),
    ]


def score_all(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]], tag: str,
              *, corpus_dir: Path | None, n_boot: int = 1000, seed: int = 0,
              temperature: float | None = None, sandbox_timeout: float = 10.0,
              workers: int | None = None) -> dict[str, Any]:
    """eval.json's metrics (all but its ``trackb`` key) of ``predictions`` over ``items``.

    ``predictions`` maps item id -> ``{"greedy": str, "samples": [str, ...]}``; the
    samples are the ``n`` answers drawn at ``temperature`` (recorded, not used). Returns
    ``{"tag", "metric_version", "n_items", "headline", "seed_compatible", "unbiased",
    "execution", "per_category", "items"}``:

    - ``seed_compatible`` is :func:`score_seed` with ``k = min(3, 1 + fewest samples)``;
    - ``headline[name] = {"value", "ci": [lo, hi], "n", "section"}`` (seed metrics add
      ``seed_key``, their field in ``seed_compatible``); a metric that
      cannot be computed (too few samples for pass@k, no items of its category) has
      value and ci None and a ``reason``;
    - intervals are 95% bootstrap intervals over ``n_boot`` replicates, resampling
      source functions (:func:`item_group`), seeded by ``seed``;
    - ``items`` holds, per item, the flags a paired comparison needs.

    unit_test answers run in the sandbox (``corpus_dir`` holds the modules they import),
    ``sandbox_timeout`` seconds each, up to ``workers`` at once. Raises InputError if
    there are no items, an item has no id, an unknown category or no prediction, or a
    prediction is malformed.
    """
    responses = _validated_responses(items, predictions)
    ordered = sorted(items, key=lambda it: str(it["id"]))
    min_samples = min(len(r) - 1 for r in responses.values())
    seed_k = min(SEED_K, 1 + min_samples)
    seed_rows = _seed_rows(items, predictions, seed_k)
    seed_compatible = _seed_summary(seed_rows, tag, seed_k)
    verdicts = _all_verdicts(ordered, responses, corpus_dir, sandbox_timeout, workers)
    records = _item_records(ordered, responses, {r["id"]: r for r in seed_rows}, verdicts)
    estimate = _Estimator(n_boot, seed)

    headline: dict[str, dict[str, Any]] = {}
    general = _general_metrics(seed_k, min_samples)
    for name, section, value, unavailable in general:
        headline[name] = {**estimate(records, value, unavailable), "section": section}
    headline["seed_execution_rate"] = {
        **estimate([r for r in records if r["category"] in CODE_CATEGORIES],
                   lambda r: r["seed_pass_at_1"]),
        "section": "seed"}
    for name, key in SEED_HEADLINE_KEYS.items():
        headline[name]["seed_key"] = key
    for category, metric, value in _EXECUTION_METRICS:
        mine = [r for r in records if r["category"] == category]
        headline[f"{category}_{metric}"] = {
            **estimate(mine, value, None if mine else f"no {category} items"),
            "section": "execution"}

    present = sorted({r["category"] for r in records})
    per_category: dict[str, dict[str, Any]] = {}
    for category in present:
        mine = [r for r in records if r["category"] == category]
        per_category[category] = {
            name: estimate(mine, value, unavailable) for name, _, value, unavailable in general}
        for owner, metric, value in _EXECUTION_METRICS:
            if owner == category:
                per_category[category][metric] = estimate(mine, value)

    return {
        "tag": tag,
        "metric_version": METRIC_VERSION,
        "n_items": len(records),
        "headline": headline,
        "seed_compatible": seed_compatible,
        "unbiased": _unbiased_section(records, per_category, headline, min_samples,
                                      temperature),
        "execution": {c: _execution_facts(c, [r for r in records if r["category"] == c])
                      for c in present},
        "per_category": per_category,
        "items": records,
    }


def _unbiased_section(records: list[dict[str, Any]], per_category: dict[str, Any],
                      headline: dict[str, Any], min_samples: int,
                      temperature: float | None) -> dict[str, Any]:
    names = ("pass_at_1", "pass_at_3", "greedy_pass_at_1")
    return {
        "n_samples": min_samples,
        "temperature": temperature,
        **{name: headline[name]["value"] for name in names},
        "unavailable": {name: headline[name]["reason"] for name in names
                        if headline[name]["value"] is None},
        "correct_means": STRICT_PASS_RULES,
        "per_category": {
            category: {"n": sum(r["category"] == category for r in records),
                       **{name: metrics[name]["value"] for name in names}}
            for category, metrics in per_category.items()
        },
    }


def _execution_facts(category: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{metric: mean, ..., "n"}`` on the greedy answers of one category's ``records``."""
    facts: dict[str, Any] = {}
    for owner, metric, value in _EXECUTION_METRICS:
        if owner == category:
            counted = [float(v) for r in records if (v := value(r)) is not None]
            facts[metric] = sum(counted) / len(counted) if counted else None
    for metric in _EXTRA_EXECUTION_FACTS.get(category, ()):
        facts[metric] = _mean([float(r["verdict"][metric]) for r in records])
    facts["strict_pass"] = _mean([float(r["greedy_pass"]) for r in records])
    facts["n"] = len(records)
    if category == "unit_test":
        executable = [r for r in records if _unit_test_executable(r)]
        statuses: dict[str, int] = {}
        for r in records:
            status = str(r["verdict"].get("status"))
            statuses[status] = statuses.get(status, 0) + 1
        facts.update({
            "n_executable": len(executable),
            "not_executable": len(records) - len(executable),
            "n_with_mutant": sum(r["has_mutant"] for r in executable),
            "statuses": dict(sorted(statuses.items())),
        })
    return facts
