"""The one scorer of ``trackb eval`` and ``trackb score``: seed-compatible metrics beside
honest ones, each headline number with a 95% bootstrap interval.

One scorer serves both commands so that a number computed from generations made
elsewhere means the same as one computed here. :func:`score_all` builds eval.json's
metrics in three labelled sections:

- **seed** (:mod:`trackb_core.seed_metrics`, kept byte-for-byte as ``seed_compatible``):
  the rules of ``shared/docs/seed-metrics.md`` to the letter, quirks included (unknown
  categories scored as explain, only the first code block checked, pass@3 as "any of 3"
  rather than the unbiased estimator, style as the best of 3). They are what the
  published baseline (pass@1 0.565, pass@3 0.783, style 0.874, hallucination 0.022)
  measured, and changing them would make our numbers incomparable with it.
- **unbiased**: Chen et al.'s pass@k (k = 1, 3) over the ``n`` samples drawn at one
  temperature, plus greedy pass@1, where "correct" is :func:`strict_pass`, the item's
  family's strict check (:meth:`trackb_core.families.Family.passes`) instead of
  "compiles".
- **execution**: what each family's verdict measures on the greedy answer
  (:attr:`trackb_core.families.Family.metrics`): bugfix exact/site fix, complete
  parses/keeps signature/not an echo/exact match/edit similarity, unit_test pass against
  the original and mutant kill (executable items only), docstring Args coverage,
  explain parameter coverage.

Every interval resamples whole source functions (:func:`item_group`), because the up to
five tasks of one function are not independent; ``items`` carries per-item flags so
``compare`` can pair baseline and post-SFT (McNemar, paired bootstrap:
:mod:`trackb_core.stats`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trackb_core import families
from trackb_core.errors import InputError
from trackb_core.families import CheckContext
from trackb_core.seed_metrics import (
    SEED_CODE_CATEGORIES,
    SEED_K,
    responses_for,
    seed_rows,
    seed_summary,
)
from trackb_core.stats import bootstrap_ci, pass_at_k


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
UNBIASED_KS = (1, 3)
# One seed for every bootstrap, whichever command scores: the same predictions give the
# same intervals from `trackb eval` and `trackb score`.
BOOTSTRAP_SEED = 0
# Most unit-test sandboxes run at once: each is a child process, and the machines that
# score are often small.
MAX_SANDBOX_WORKERS = 4

# Headline name of each seed metric -> its field in ``seed_compatible``.
SEED_HEADLINE_KEYS = {
    "seed_pass_at_1": "pass_at_1",
    "seed_pass_at_3": "pass_at_k",
    "seed_style_score": "avg_style_score",
    "seed_hallucination_rate": "hallucination_rate",
    "seed_execution_rate": "execution_rate",
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


def strict_pass_rules() -> dict[str, str]:
    """What "correct" means for the unbiased pass@k and greedy pass@1, per category
    (each family's :attr:`~trackb_core.families.Family.pass_rule`)."""
    return {family.name: family.pass_rule for family in families.all_families()}


def _family(category: str) -> families.Family:
    try:
        return families.get(category)
    except ValueError as exc:
        raise InputError(f"no strict check for category {category!r}; "
                         f"known: {', '.join(families.names())}") from exc


def verdict(category: str, response: str, item: dict[str, Any], corpus_dir: Path | None, *,
            timeout: float = 10.0) -> dict[str, Any]:
    """The measured facts of one ``response`` to ``item`` (its family's verdict).

    Families that run code (unit_test) run it in the sandbox with ``timeout`` seconds
    per run. Raises InputError for an unknown category.
    """
    return _family(category).verdict(response, item, CheckContext(corpus_dir, timeout))


def passes(category: str, facts: dict[str, Any]) -> bool:
    """Whether a :func:`verdict` counts as a strict pass (:func:`strict_pass_rules`).

    Raises InputError for an unknown category.
    """
    return _family(category).passes(facts)


def strict_pass(category: str, response: str, item: dict[str, Any],
                corpus_dir: Path | None) -> bool:
    """The "strict pass" behind the unbiased pass@k and greedy pass@1: the item's
    family's verdict on ``response`` and its pass rule (:func:`strict_pass_rules`).
    Code runs in the sandbox (not executable = not passed).

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
        if category not in families.names():
            raise InputError(f"test item {item_id!r} has category {category!r}; the strict "
                             f"metrics know {', '.join(families.names())}")
        prediction = predictions[item_id]
        responses_for(prediction, 1, f"item {item_id!r}")  # raises if malformed
        found[item_id] = [prediction["greedy"], *(prediction.get("samples") or [])]
    return found


def _all_verdicts(ordered: list[dict[str, Any]], responses: dict[str, list[str]],
                  context: CheckContext, workers: int | None
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(item id, response): verdict}``, each distinct answer checked once.

    Answers of families that run code (unit tests) run in sandboxes, a few at a time
    (each sandbox is its own process, so threads are enough to overlap them).
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    sandboxed: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    for item in ordered:
        item_id, category = str(item["id"]), item["category"]
        for response in responses[item_id]:
            key = (item_id, response)
            if key in found or key in sandboxed:
                continue
            if families.get(category).runs_code:
                sandboxed[key] = (item, response)
            else:
                found[key] = families.get(category).verdict(response, item, context)
    if sandboxed:
        workers = workers or min(MAX_SANDBOX_WORKERS, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(
                lambda job: families.get(job[0]["category"]).verdict(job[1], job[0], context),
                sandboxed.values())
            found.update(zip(sandboxed, results, strict=True))
    return found


def _item_records(ordered: list[dict[str, Any]], responses: dict[str, list[str]],
                  seeds: dict[str, dict[str, Any]],
                  verdicts: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for item in ordered:
        item_id, category = str(item["id"]), item["category"]
        greedy, *samples = responses[item_id]
        greedy_facts = verdicts[(item_id, greedy)]
        n = len(samples)
        correct = sum(passes(category, verdicts[(item_id, s)]) for s in samples)
        seed_row = seeds[item_id]
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
              *, corpus_dir: Path | None, n_boot: int = 1000, seed: int = BOOTSTRAP_SEED,
              temperature: float | None = None, sandbox_timeout: float = 10.0,
              workers: int | None = None, allow_weak_sandbox: bool = False
              ) -> dict[str, Any]:
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
    seeds = seed_rows(items, predictions, seed_k)
    seed_compatible = seed_summary(seeds, tag, seed_k)
    context = CheckContext(corpus_dir, sandbox_timeout, allow_weak_sandbox)
    verdicts = _all_verdicts(ordered, responses, context, workers)
    records = _item_records(ordered, responses, {r["id"]: r for r in seeds}, verdicts)
    estimate = _Estimator(n_boot, seed)

    headline: dict[str, dict[str, Any]] = {}
    general = _general_metrics(seed_k, min_samples)
    for name, section, value, unavailable in general:
        headline[name] = {**estimate(records, value, unavailable), "section": section}
    headline["seed_execution_rate"] = {
        **estimate([r for r in records if r["category"] in SEED_CODE_CATEGORIES],
                   lambda r: r["seed_pass_at_1"]),
        "section": "seed"}
    for name, key in SEED_HEADLINE_KEYS.items():
        headline[name]["seed_key"] = key
    for family in families.all_families():
        mine = [r for r in records if r["category"] == family.name]
        for metric in family.metrics:
            headline[f"{family.name}_{metric.name}"] = {
                **estimate(mine, metric.value, None if mine else f"no {family.name} items"),
                "section": "execution"}

    present = sorted({r["category"] for r in records})
    per_category: dict[str, dict[str, Any]] = {}
    for category in present:
        mine = [r for r in records if r["category"] == category]
        per_category[category] = {
            name: estimate(mine, value, unavailable) for name, _, value, unavailable in general}
        for metric in families.get(category).metrics:
            per_category[category][metric.name] = estimate(mine, metric.value)

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
        "correct_means": strict_pass_rules(),
        "per_category": {
            category: {"n": sum(r["category"] == category for r in records),
                       **{name: metrics[name]["value"] for name in names}}
            for category, metrics in per_category.items()
        },
    }


def _execution_facts(category: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{metric: mean, ..., "n"}`` on the greedy answers of one category's ``records``:
    the family's metrics, its facts (without intervals), the strict pass and whatever
    else the family reports (:meth:`~trackb_core.families.Family.summary`)."""
    family = families.get(category)
    facts: dict[str, Any] = {}
    for metric in family.metrics:
        counted = [float(v) for r in records if (v := metric.value(r)) is not None]
        facts[metric.name] = sum(counted) / len(counted) if counted else None
    for fact in family.facts:
        facts[fact] = _mean([float(r["verdict"][fact]) for r in records])
    facts["strict_pass"] = _mean([float(r["greedy_pass"]) for r in records])
    facts["n"] = len(records)
    facts.update(family.summary(records))
    return facts


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
