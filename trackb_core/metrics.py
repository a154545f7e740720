"""The one scorer of ``trackb eval`` and ``trackb score``: seed-compatible metrics beside
honest ones, each headline number with a 95% interval, each name saying what it measures.

One scorer serves both commands so that a number computed from generations made
elsewhere means the same as one computed here. :func:`score_all` builds eval.json's
metrics in labelled sections:

- **seed** (:mod:`trackb_core.seed_metrics`, kept byte-for-byte as ``seed_compatible``):
  the rules of ``shared/docs/seed-metrics.md`` to the letter, quirks included (unknown
  categories scored as explain, only the first code block checked, pass@3 as "any of 3"
  rather than the unbiased estimator, style as the best of 3), scored on each answer's
  *seed view*: its first 384 tokens (:data:`trackb_core.generation.SEED_VIEW_TOKENS`),
  exactly what the seed's 384-token generation would have produced. They are what the
  published baseline (pass@1 0.565, pass@3 0.783, style 0.874, hallucination 0.022)
  measured, and changing them would make our numbers incomparable with it.
- **functional**: the only metrics named *pass*. An answer passes when its family's
  functional check (:meth:`trackb_core.families.Family.functional_check`) shows it right:
  a bugfix that restores the original exactly, unit tests that pass on the original and
  catch its mutant (hidden tests for completions come with the next scorer version).
  Items whose family has no such check (docstring, explain, complete for now), or whose
  check could not run, are left out and the ``n`` says how many were measured: greedy
  pass@1 and Chen et al.'s unbiased pass@k (k = 1, 3) over the samples.
- **format**: whether an answer has the form its instruction asks for (code that parses
  and keeps the signature, a docstring with its sections, prose that is not a code
  echo), per family; never a pass.
- **family**: what each family's verdict measures on the greedy answer
  (:attr:`trackb_core.families.Family.metrics`): bugfix exact fix / site restored,
  complete exact match and edit similarity, unit_test consistency with the original and
  mutant kill, docstring Args coverage, explain parameter coverage.
- **budget**: the share of greedy answers cut at ``max_new_tokens`` (lower is better),
  overall and per family.

Every interval resamples whole source functions (:func:`item_group`), because the up to
five tasks of one function are not independent, and a rate's interval is widened to its
Wilson interval so it never collapses at 0/n or n/n (:func:`trackb_core.stats.proportion_ci`).
One bootstrap seed (:data:`BOOTSTRAP_SEED`) serves eval and score. ``items`` carries
per-item flags so ``compare`` can pair baseline and post-SFT (paired bootstrap clustered
by source function, McNemar beside: :mod:`trackb_core.stats`). A category no family
knows is scored by the seed block (as explain) and is n/a everywhere else.
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
from trackb_core.stats import pass_at_k, proportion_ci


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

# 3: functional pass (tests or an exact fix) replaces the "strict pass"; format, budget and
# seed-view scoring; Wilson-widened intervals; unknown categories n/a outside the seed block.
METRIC_VERSION = 3
UNBIASED_KS = (1, 3)
# One seed for every bootstrap, whichever command scores: the same predictions give the
# same intervals from `trackb eval` and `trackb score`.
BOOTSTRAP_SEED = 0
N_BOOT = 1000
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


def pass_rules() -> dict[str, str]:
    """What a functional pass means, per category (each family's
    :attr:`~trackb_core.families.Family.pass_rule`)."""
    return {family.name: family.pass_rule for family in families.all_families()}


def _family(category: str) -> families.Family:
    try:
        return families.get(category)
    except ValueError as exc:
        raise InputError(f"no check for category {category!r}; "
                         f"known: {', '.join(families.names())}") from exc


def verdict(category: str, response: str, item: dict[str, Any], corpus_dir: Path | None, *,
            timeout: float = 10.0) -> dict[str, Any]:
    """The measured facts of one ``response`` to ``item`` (its family's verdict).

    Families that run code (unit_test) run it in the sandbox with ``timeout`` seconds
    per run. Raises InputError for an unknown category.
    """
    return _family(category).verdict(response, item, CheckContext(corpus_dir, timeout))


def functional_pass(category: str, response: str, item: dict[str, Any],
                    corpus_dir: Path | None) -> bool | None:
    """Whether ``response`` is shown right for ``item`` (its family's functional check:
    True/False), or None where nothing can show it (no check for the family yet, or its
    tests could not run here). Code runs in the sandbox.

    Raises InputError for an unknown category.
    """
    family = _family(category)
    return family.functional_check(verdict(category, response, item, corpus_dir))


def _answers(prediction: dict[str, Any], where: str) -> dict[str, Any]:
    """The answers of one prediction row, checked: ``{"all": [greedy, *samples],
    "seed": the same cut at the seed's budget (or the whole answers), "truncated":
    [bool, ...] or None}``. Raises InputError if the row is malformed."""
    answers = [*responses_for(prediction, 1, where), *(prediction.get("samples") or [])]
    view = prediction.get("seed_view")
    if view is None:
        seed = answers
    else:
        seed = [*responses_for(view, 1, f"{where} (seed_view)"), *(view.get("samples") or [])]
        if len(seed) != len(answers):
            raise InputError(f"prediction for {where}: seed_view has {len(seed)} answers, "
                             f"the prediction {len(answers)}")
    truncated = prediction.get("truncated")
    if truncated is not None:
        if not isinstance(truncated, dict) or not isinstance(truncated.get("greedy"), bool) \
                or not isinstance(truncated.get("samples"), list) \
                or not all(isinstance(t, bool) for t in truncated["samples"]) \
                or len(truncated["samples"]) != len(answers) - 1:
            raise InputError(f"prediction for {where}: 'truncated' must be "
                             '{"greedy": bool, "samples": [bool per sample]}')
        truncated = [truncated["greedy"], *truncated["samples"]]
    return {"all": answers, "seed": seed, "truncated": truncated}


def _validated_answers(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]]
                       ) -> dict[str, dict[str, Any]]:
    """``{id: _answers(...)}`` for every item. Raises InputError like score_seed."""
    if not items:
        raise InputError("no test items to score")
    found = {}
    for item in items:
        if "id" not in item:
            raise InputError("a test item has no 'id' field")
        item_id = str(item["id"])
        if item_id not in predictions:
            raise InputError(f"no prediction for test item {item_id!r}")
        found[item_id] = _answers(predictions[item_id], f"item {item_id!r}")
    return found


def _known(category: Any) -> bool:
    return isinstance(category, str) and category in families.names()


def _all_verdicts(ordered: list[dict[str, Any]], answers: dict[str, dict[str, Any]],
                  context: CheckContext, workers: int | None
                  ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(item id, response): verdict}`` for items of a known family, each distinct
    answer checked once.

    Answers of families that run code (unit tests) run in sandboxes, a few at a time
    (each sandbox is its own process, so threads are enough to overlap them).
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    sandboxed: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
    for item in ordered:
        item_id, category = str(item["id"]), item.get("category")
        if not _known(category):
            continue
        for response in answers[item_id]["all"]:
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


def _item_records(ordered: list[dict[str, Any]], answers: dict[str, dict[str, Any]],
                  seeds: dict[str, dict[str, Any]],
                  verdicts: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    records = []
    for item in ordered:
        item_id = str(item["id"])
        category = item.get("category")
        known = _known(category)
        greedy, *samples = answers[item_id]["all"]
        truncated = answers[item_id]["truncated"]
        seed_row = seeds[item_id]
        record: dict[str, Any] = {
            "id": item_id,
            "category": category if isinstance(category, str) else str(category),
            "known_family": known,
            "group": item_group(item),
            "seed_pass_at_1": seed_row["pass1"],
            "seed_pass_at_k": seed_row["passk"],
            "seed_style": seed_row["style"],
            "hallucinated": seed_row["hallucinated"],
            "n_samples": len(samples),
            "truncated": None if truncated is None else truncated[0],
            "samples_truncated": (None if truncated is None or not samples
                                  else sum(truncated[1:]) / len(samples)),
            "has_mutant": has_mutant(item),
            "functional": None, "functional_n": 0, "functional_correct": 0,
            "functional_fraction": None, "functional_at_3": None,
            "format_ok": None, "verdict": None,
        }
        if known:
            family = families.get(category)
            greedy_facts = verdicts[(item_id, greedy)]
            checked = [c for s in samples
                       if (c := family.functional_check(verdicts[(item_id, s)])) is not None]
            n, correct = len(checked), sum(checked)
            record.update({
                "functional": family.functional_check(greedy_facts),
                "functional_n": n,
                "functional_correct": correct,
                # c / n is the unbiased pass@1 of this item; None without checked samples
                "functional_fraction": correct / n if n else None,
                "functional_at_3": pass_at_k(n, correct, 3) if n >= 3 else None,
                "format_ok": bool(family.format_check(greedy_facts)),
                "verdict": greedy_facts,
            })
        records.append(record)
    return records


class _Estimator:
    """Means with grouped bootstrap intervals (Wilson-widened for rates), all with the
    same settings."""

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
        low, high = proportion_ci(values, groups, n_boot=self.n_boot, seed=self.seed)
        return {"value": sum(values) / len(values), "ci": [low, high], "n": len(values)}


Measure = tuple[str, str, Callable[[dict[str, Any]], Any], str | None]


def _seed_measures(seed_k: int, min_samples: int) -> list[Measure]:
    """(name, section, value of a record, reason it is unavailable) of the seed block's
    per-item metrics; they apply to every item, unknown categories included."""
    seed_k_reason = None if seed_k == SEED_K else (
        f"the seed's pass@3 needs 2 samples per item besides the greedy answer; "
        f"the predictions have {min_samples}")
    return [
        ("seed_pass_at_1", "seed", lambda r: r["seed_pass_at_1"], None),
        ("seed_pass_at_3", "seed", lambda r: r["seed_pass_at_k"], seed_k_reason),
        ("seed_style_score", "seed", lambda r: r["seed_style"], None),
        ("seed_hallucination_rate", "seed", lambda r: r["hallucinated"], None),
    ]


def _honest_measures(min_samples: int) -> list[Measure]:
    """The measures of items of a known family: functional pass, format, budget."""
    def unbiased_reason(k: int) -> str | None:
        if min_samples >= k:
            return None
        return (f"unbiased pass@{k} needs at least {k} samples per item at one temperature; "
                f"the predictions have {min_samples}")

    return [
        ("functional_pass_greedy", "functional", lambda r: r["functional"], None),
        ("functional_pass_at_1", "functional", lambda r: r["functional_fraction"],
         unbiased_reason(1)),
        ("functional_pass_at_3", "functional", lambda r: r["functional_at_3"],
         unbiased_reason(3)),
        ("functional_checked_share", "functional",
         lambda r: r["functional"] is not None if r["known_family"] else None, None),
        ("format_ok", "format", lambda r: r["format_ok"], None),
        ("truncated_rate", "budget", lambda r: r["truncated"], None),
    ]


def score_all(items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]], tag: str,
              *, corpus_dir: Path | None, n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED,
              temperature: float | None = None, sandbox_timeout: float = 10.0,
              workers: int | None = None, allow_weak_sandbox: bool = False,
              python_path: tuple[Path, ...] = ()) -> dict[str, Any]:
    """eval.json's metrics (all but its ``settings`` and ``trackb`` keys) of
    ``predictions`` over ``items``.

    ``predictions`` maps item id -> ``{"greedy": str, "samples": [str, ...]}``, optionally
    with ``"seed_view"`` (the same answers cut at the seed's 384 tokens: the seed block
    scores these) and ``"truncated"`` (``{"greedy": bool, "samples": [bool]}``: which
    answers hit the token budget); the samples are drawn at ``temperature`` (recorded,
    not used). Returns ``{"tag", "metric_version", "n_items", "headline",
    "seed_compatible", "functional", "families", "budget", "per_category", "items"}``:

    - ``seed_compatible`` is :func:`seed_summary` with ``k = min(3, 1 + fewest samples)``;
    - ``headline[name] = {"value", "ci": [lo, hi], "n", "section"}`` (seed metrics add
      ``seed_key``, their field in ``seed_compatible``); a metric that cannot be computed
      (too few samples for pass@k, no items it applies to) has value and ci None and a
      ``reason``;
    - intervals are 95% bootstrap intervals over ``n_boot`` replicates, resampling
      source functions (:func:`item_group`), seeded by ``seed``, widened for rates to
      their Wilson interval;
    - ``items`` holds, per item, the flags a paired comparison needs.

    Code answers run in the sandbox (``corpus_dir`` holds the modules they import,
    ``python_path`` the corpus's execution environment), unit tests ``sandbox_timeout``
    CPU seconds each, up to ``workers`` at once. Raises InputError if
    there are no items, an item has no id or no prediction, or a prediction is malformed.
    """
    answers = _validated_answers(items, predictions)
    ordered = sorted(items, key=lambda it: str(it["id"]))
    min_samples = min(len(a["all"]) - 1 for a in answers.values())
    seed_k = min(SEED_K, 1 + min_samples)
    seed_view = {item_id: {"greedy": a["seed"][0], "samples": a["seed"][1:]}
                 for item_id, a in answers.items()}
    seeds = seed_rows(items, seed_view, seed_k)
    seed_compatible = seed_summary(seeds, tag, seed_k)
    context = CheckContext(corpus_dir, sandbox_timeout, allow_weak_sandbox, python_path)
    verdicts = _all_verdicts(ordered, answers, context, workers)
    records = _item_records(ordered, answers, {r["id"]: r for r in seeds}, verdicts)
    estimate = _Estimator(n_boot, seed)
    known = [r for r in records if r["known_family"]]
    truncation_known = any(r["truncated"] is not None for r in records)

    headline: dict[str, dict[str, Any]] = {}
    seed_measures = _seed_measures(seed_k, min_samples)
    honest = _honest_measures(min_samples)
    for name, section, value, unavailable in seed_measures:
        headline[name] = {**estimate(records, value, unavailable), "section": section}
    headline["seed_execution_rate"] = {
        **estimate([r for r in records if r["category"] in SEED_CODE_CATEGORIES],
                   lambda r: r["seed_pass_at_1"]),
        "section": "seed"}
    for name, key in SEED_HEADLINE_KEYS.items():
        headline[name]["seed_key"] = key
    for name, section, value, unavailable in honest:
        if name == "truncated_rate" and not truncation_known:
            unavailable = "the predictions do not say which answers hit the token budget"
        headline[name] = {**estimate(known, value, unavailable), "section": section}
    for family in families.all_families():
        mine = [r for r in known if r["category"] == family.name]
        absent = None if mine else f"no {family.name} items"
        headline[f"{family.name}_format_ok"] = {
            **estimate(mine, lambda r: r["format_ok"], absent), "section": "format"}
        for metric in family.metrics:
            headline[f"{family.name}_{metric.name}"] = {
                **estimate(mine, metric.value, absent), "section": "family"}

    present = sorted({r["category"] for r in records})
    per_category: dict[str, dict[str, Any]] = {}
    for category in present:
        mine = [r for r in records if r["category"] == category]
        entry = {name: estimate(mine, value, unavailable)
                 for name, _, value, unavailable in seed_measures}
        if _known(category):
            for name, _, value, unavailable in honest:
                if name == "truncated_rate" and not truncation_known:
                    unavailable = "the predictions do not say which answers hit the budget"
                entry[name] = estimate(mine, value, unavailable)
            for metric in families.get(category).metrics:
                entry[metric.name] = estimate(mine, metric.value)
        else:
            why = (f"unknown category {category!r}: no family checks it (the seed block "
                   "scores it as explain)")
            for name, _, _, _ in honest:
                entry[name] = estimate(mine, lambda r: None, why)
        per_category[category] = entry

    return {
        "tag": tag,
        "metric_version": METRIC_VERSION,
        "n_items": len(records),
        "headline": headline,
        "seed_compatible": seed_compatible,
        "functional": _functional_section(known, per_category, headline, min_samples,
                                          temperature),
        "families": {c: _family_facts(c, [r for r in known if r["category"] == c])
                     for c in present if _known(c)},
        "budget": _budget_section(records, truncation_known),
        "per_category": per_category,
        "items": records,
    }


FUNCTIONAL_NAMES = ("functional_pass_greedy", "functional_pass_at_1", "functional_pass_at_3")


def _functional_section(records: list[dict[str, Any]], per_category: dict[str, Any],
                        headline: dict[str, Any], min_samples: int,
                        temperature: float | None) -> dict[str, Any]:
    return {
        "n_samples": min_samples,
        "temperature": temperature,
        **{name: headline[name]["value"] for name in FUNCTIONAL_NAMES},
        "n": {name: headline[name]["n"] for name in FUNCTIONAL_NAMES},
        "unavailable": {name: headline[name]["reason"] for name in FUNCTIONAL_NAMES
                        if headline[name]["value"] is None},
        "pass_means": pass_rules(),
        "per_category": {
            category: {"n": sum(r["category"] == category for r in records),
                       "checked": sum(r["category"] == category and r["functional"]
                                      is not None for r in records),
                       **{name: metrics[name]["value"] for name in FUNCTIONAL_NAMES}}
            for category, metrics in per_category.items() if _known(category)
        },
    }


def _budget_section(records: list[dict[str, Any]], known: bool) -> dict[str, Any]:
    """Per category (and ``all``): the share of greedy answers and of samples cut at the
    token budget; None where the predictions do not say."""
    def rates(mine: list[dict[str, Any]]) -> dict[str, Any]:
        greedy = [float(r["truncated"]) for r in mine if r["truncated"] is not None]
        samples = [r["samples_truncated"] for r in mine if r["samples_truncated"] is not None]
        return {"n": len(mine),
                "greedy_truncated": _mean(greedy) if greedy else None,
                "samples_truncated": _mean(samples) if samples else None}

    categories = sorted({r["category"] for r in records})
    return {"known": known,
            "all": rates(records),
            "per_category": {c: rates([r for r in records if r["category"] == c])
                             for c in categories}}


def _family_facts(category: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``{metric: mean, ..., "n"}`` on the greedy answers of one category's ``records``:
    the family's metrics, its facts (without intervals), format and functional pass,
    and whatever else the family reports (:meth:`~trackb_core.families.Family.summary`)."""
    family = families.get(category)
    facts: dict[str, Any] = {}
    for metric in family.metrics:
        counted = [float(v) for r in records if (v := metric.value(r)) is not None]
        facts[metric.name] = sum(counted) / len(counted) if counted else None
    for fact in family.facts:
        facts[fact] = _mean([float(r["verdict"][fact]) for r in records])
    facts["format_ok"] = _mean([float(r["format_ok"]) for r in records])
    checked = [float(r["functional"]) for r in records if r["functional"] is not None]
    facts["functional_pass_greedy"] = _mean(checked) if checked else None
    facts["functional_checked"] = len(checked)
    facts["n"] = len(records)
    facts.update(family.summary(records))
    return facts


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
