"""``trackb compare``: baseline vs post-SFT, overall and per category, with the paired test.

Reads two ``eval.json`` files of the current metric version (``trackb eval`` or
``trackb score`` outputs, built by :func:`trackb_core.metrics.score_all`) and writes a
report a person can read (``report.md``), the same numbers for machines
(``compare.json``) and bar charts with CI whiskers (``report.png``).

First it checks that the two are comparable: every recorded setting (eval.json
``settings``: the test split's sha256 and items, sampling, token budget, backend, dtype,
device, corpus availability, scorer) must match, except the model and adapter under
test and the tag; each difference is one line of the refusal (``--allow-mismatch``
compares anyway, and the report says so at the top). If one side lacked the corpus,
for instance, all its unit tests would silently count as not executable.

What it reports, and why:

- every headline metric of both sides with its 95% bootstrap CI (as eval.json carries
  it): with a few dozen items one item moves a rate by several points, so a number
  without its interval would mislead;
- the paired test on the items both sides scored (matched by id): the paired bootstrap
  CI of the change, resampling whole source functions
  (:func:`trackb_core.stats.paired_bootstrap_delta`), gives the verdict (improved /
  got worse where the interval excludes 0), because the up to five items of one
  function are not independent; McNemar's exact p-value
  (:func:`trackb_core.stats.mcnemar_exact`), which assumes they are, is shown beside it.
  Two overlapping intervals do not show "no change"; the paired test is the one that can;
- the share of answers cut at the token budget, per side and family;
- per category, n and a warning where n < 10;
- the seed's published numbers in a side column, for reference only: they came from
  another dataset and model (and the post-SFT ones likely from a more lenient scorer,
  field notes §1), so they are never used for a delta.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import ConfigError, InputError
from trackb_core.metrics import METRIC_VERSION
from trackb_core.stage import StageRun, say, stage_run
from trackb_core.stats import mcnemar_exact, paired_bootstrap_delta, wilson_interval
from trackb_core.store import Store

STAGE = "compare"
SMALL_CATEGORY = 10
# Settings that may differ between the two sides: what is under test, and its name.
UNDER_TEST = ("model", "adapter", "tag")
# Per-item fields of eval.json "items" the paired test runs on: (field, label). The
# verdict is the paired bootstrap's; booleans also get McNemar's test beside it.
PAIRED_FIELDS = (
    ("functional", "functional pass, greedy (tests run on the answer)"),
    ("functional_fraction", "functional pass, share of samples"),
    ("format_ok", "format ok, greedy (form only, not correctness)"),
    ("seed_pass_at_1", "seed-compatible pass@1 (compiles / looks right)"),
    ("seed_pass_at_k", "seed-compatible pass@3 (compiles / looks right)"),
)
# The seed's published numbers (shared/seed/track-b-sft.md; Qwen2.5-Coder-1.5B, its own
# 46-item test set, n per category from shared/docs/field-notes.md §1), keyed by the
# seed-compatible field they correspond to. Post-SFT hallucination was not published.
SEED_N = 46
SEED_PUBLISHED = {
    "pass_at_1": {"label": "pass@1", "baseline": 0.565, "post_sft": 0.804},
    "pass_at_k": {"label": "pass@3", "baseline": 0.783, "post_sft": 0.848},
    "avg_style_score": {"label": "style score", "baseline": 0.874, "post_sft": 0.848},
    "hallucination_rate": {"label": "hallucination rate", "baseline": 0.022, "post_sft": None},
}
# Seed baseline pass@1 per category and its n; post-SFT per category was not published.
SEED_PUBLISHED_PER_CATEGORY = {
    "bugfix": {"pass_at_1": 0.167, "n": 6},
    "complete": {"pass_at_1": 0.455, "n": 11},
    "docstring": {"pass_at_1": 0.400, "n": 15},
    "explain": {"pass_at_1": 1.000, "n": 13},
    "unit_test": {"pass_at_1": 1.000, "n": 1},
}
SEED_NOTE = ("seed's published numbers: for reference only — another dataset and model, "
             "and the post-SFT figures exist only as prose, likely from a more lenient scorer")
# Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER_WORDS = ("hallucination", "echo_rate", "placeholder", "truncated")


class CompareConfig(StageConfig):
    """Compare a baseline evaluation with a post-SFT one: CIs, paired test, per category.

    Reads two eval.json files (the current metric_version) written by `trackb eval` or
    `trackb score` (each URI may name the file or the stage folder holding it) and
    refuses them, one line per difference, unless every recorded setting matches except
    the model/adapter under test and the tag (test split sha256 and items, sampling,
    token budget, backend, dtype, device, corpus availability, scorer version).
    Writes report.md (every headline metric of both sides with its 95% CI and the seed's
    published numbers beside them for reference; the paired test on items matched by
    id: the paired bootstrap CI of the change, clustered by source function, gives the
    verdict, McNemar's exact p-value beside it, overall and per category; truncation
    rates; n per category with a warning below 10), compare.json (the same numbers) and
    report.png (bars per category and metric with CI whiskers).
    """

    baseline: str | None = input_field(
        None, kind="file", filename="eval.json",
        description="The baseline's eval.json, or the eval stage folder holding it.")
    post: str | None = input_field(
        None, kind="file", filename="eval.json",
        description="The post-SFT eval.json, or the eval stage folder holding it.")
    title: str = Field("trackb: baseline vs post-SFT",
                       description="Heading of report.md and of the chart.")
    n_boot: int = Field(1000, ge=1, description="Bootstrap resamples of the paired CIs.")
    seed: int = Field(0, description="Seed of the paired bootstrap.")
    allow_mismatch: bool = Field(
        False, description="Compare even when recorded settings differ (other than the "
        "model/adapter); the report then lists every difference at the top.")


def run(config: CompareConfig, out: Store) -> dict[str, Any]:
    """Write report.md, compare.json and report.png into ``out``; returns the manifest.

    Raises ConfigError if either side is not given, MissingInputError if an eval.json
    is absent, InputError if one is not a version-2 eval.json, StoreError if ``out``
    cannot be written.
    """
    for field in ("baseline", "post"):
        if not getattr(config, field):
            raise ConfigError(f"--{field} is required: the {field} eval.json or its folder")
    with stage_run(STAGE, config, out) as run:
        baseline = _read_eval(run, "baseline")
        post = _read_eval(run, "post")
        mismatches = settings_differences(baseline["settings"], post["settings"])
        if mismatches and not config.allow_mismatch:
            raise InputError(
                "the two evaluations were not made alike, so their numbers are not "
                "comparable:\n" + "\n".join(f"  {line}" for line in mismatches)
                + "\nrerun one side with the other's settings, or pass --allow-mismatch "
                  "(the report will say so)")
        comparison = compare(baseline, post, n_boot=config.n_boot, seed=config.seed,
                             mismatches=mismatches)
        run.write_json("compare.json", comparison)
        run.write_text("report.md", render_markdown(comparison, config.title))
        with run.timed("chart"):
            run.write_bytes("report.png", render_png(comparison, config.title))
        run.counts["categories"] = len(comparison["per_category"])
        run.counts["small_categories"] = len(comparison["small_categories"])
        run.counts["paired_items"] = comparison["pairing"]["matched"]
        for line in comparison["summary"]:
            say(STAGE, line)
        say(STAGE, f"wrote {out.uri}/report.md")
    return run.manifest


# -- reading ------------------------------------------------------------------------------

def _read_eval(run: StageRun, field: str) -> dict[str, Any]:
    raw = run.read_bytes(field)
    where = run.input_uri(field)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--{field}: {where} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InputError(f"--{field}: {where} is not a JSON object")
    check_eval(data, f"--{field}: {where}")
    return data


def check_eval(data: dict[str, Any], where: str) -> None:
    """Raise InputError naming the first problem if ``data`` is not a version-2 eval.json."""
    if "metric_version" not in data:
        raise InputError(f"{where} has no 'metric_version' key: an eval.json from before "
                         f"metric version {METRIC_VERSION}; score it again with `trackb score`")
    if data["metric_version"] != METRIC_VERSION:
        raise InputError(f"{where}: metric_version is {data['metric_version']!r}, compare "
                         f"reads {METRIC_VERSION}")
    for key, kind in (("headline", dict), ("per_category", dict), ("items", list),
                      ("settings", dict)):
        if key not in data:
            raise InputError(f"{where} has no {key!r} key")
        if not isinstance(data[key], kind):
            raise InputError(f"{where}: {key!r} is not a {kind.__name__}")
    for name, entry in data["headline"].items():
        if not isinstance(entry, dict) or "value" not in entry or "ci" not in entry:
            raise InputError(f"{where}: headline metric {name!r} needs 'value' and 'ci'")
    for number, item in enumerate(data["items"], 1):
        if not isinstance(item, dict) or "id" not in item:
            raise InputError(f"{where}: items[{number}] has no 'id'")


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def settings_differences(baseline: dict[str, Any], post: dict[str, Any]) -> list[str]:
    """One line per recorded setting that differs between two eval.json ``settings``
    (nested settings by dotted name: ``sampling.max_new_tokens``), the model/adapter
    under test and the tag excepted; a setting one side lacks counts as differing.
    Raises nothing."""
    before, after = _flatten(baseline), _flatten(post)

    def show(side: dict[str, Any], name: str) -> str:
        return json.dumps(side[name]) if name in side else "(not recorded)"

    lines = []
    for name in sorted(set(before) | set(after)):
        if name.split(".")[0] in UNDER_TEST:
            continue
        if name not in before or name not in after or before[name] != after[name]:
            lines.append(f"{name}: baseline {show(before, name)}, "
                         f"post-SFT {show(after, name)}")
    return lines


# -- numbers ------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _ci(entry: dict[str, Any] | None) -> list[float] | None:
    ci = (entry or {}).get("ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_num(v) is not None for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def _side(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    side = {"value": _num(entry.get("value")), "ci": _ci(entry), "n": entry.get("n")}
    if side["value"] is None and entry.get("reason"):
        side["reason"] = str(entry["reason"])
    return side


def higher_is_better(name: str) -> bool:
    """False for metrics where a drop is an improvement (hallucination and the like)."""
    return not any(word in name for word in LOWER_IS_BETTER_WORDS)


def seed_key(name: str, data: dict[str, Any] | None = None) -> str | None:
    """The seed-compatible field a headline metric corresponds to, or None.

    A headline of section "seed" names its seed-compatible field (``pass_at_1``) with
    or without a ``seed_`` prefix, or records it as ``seed_key``.
    """
    if isinstance(data, dict) and data.get("seed_key") in SEED_PUBLISHED:
        return data["seed_key"]
    if isinstance(data, dict) and data.get("section") not in (None, "seed"):
        return None
    bare = name.removeprefix("seed_")
    aliases = {"pass_at_3": "pass_at_k", "style": "avg_style_score",
               "style_score": "avg_style_score", "hallucination": "hallucination_rate"}
    bare = aliases.get(bare, bare)
    return bare if bare in SEED_PUBLISHED else None


def _seed_reference(key: str | None) -> dict[str, Any] | None:
    if key is None:
        return None
    published = SEED_PUBLISHED[key]
    proportion = key != "avg_style_score"  # style is a mean of fractions, not a rate
    reference = {"label": published["label"], "n": SEED_N}
    for side in ("baseline", "post_sft"):
        value = published[side]
        reference[side] = value
        reference[f"{side}_ci"] = (list(wilson_interval(value, SEED_N))
                                   if proportion and value is not None else None)
    return reference


def compare(baseline: dict[str, Any], post: dict[str, Any], *, n_boot: int = 1000,
            seed: int = 0, mismatches: list[str] | None = None) -> dict[str, Any]:
    """The comparison of two eval.json dicts (what compare.json holds); ``mismatches``
    are the settings differences it was allowed to go ahead with
    (:func:`settings_differences`), listed in the result and at the top of the report.

    Raises nothing (inputs are checked by :func:`check_eval`).
    """
    headline = {}
    names = list(baseline["headline"]) + [n for n in post["headline"]
                                          if n not in baseline["headline"]]
    for name in names:
        before = _side(baseline["headline"].get(name))
        after = _side(post["headline"].get(name))
        entry = baseline["headline"].get(name) or post["headline"].get(name)
        values = (before or {}).get("value"), (after or {}).get("value")
        headline[name] = {
            "section": entry.get("section"),
            "higher_is_better": higher_is_better(name),
            "baseline": before,
            "post": after,
            "difference": (None if None in values else round(values[1] - values[0], 6)),
            "seed_published": _seed_reference(seed_key(name, entry)),
        }

    base_items = {str(i["id"]): i for i in baseline["items"]}
    post_items = {str(i["id"]): i for i in post["items"]}
    matched = sorted(set(base_items) & set(post_items))
    pairs = [(base_items[i], post_items[i]) for i in matched]
    paired = paired_tests(pairs, n_boot=n_boot, seed=seed)

    counts = {"baseline": Counter(str(i.get("category", "")) for i in baseline["items"]),
              "post": Counter(str(i.get("category", "")) for i in post["items"])}
    categories = sorted(set(baseline["per_category"]) | set(post["per_category"])
                        | set(counts["baseline"]) | set(counts["post"]))
    per_category = {}
    small = []
    for category in categories:
        sides = {side: (data["per_category"].get(category) or {})
                 for side, data in (("baseline", baseline), ("post", post))}
        metric_names = list(sides["baseline"]) + [m for m in sides["post"]
                                                  if m not in sides["baseline"]]
        n = {side: counts[side].get(category, 0) for side in ("baseline", "post")}
        # a category scored on one side only is as small as that side's count
        present = [count for count in n.values() if count > 0]
        smallest = min(present) if present else 0
        if smallest < SMALL_CATEGORY:
            small.append(category)
        per_category[category] = {
            "n": n,
            "small": smallest < SMALL_CATEGORY,
            "metrics": {
                metric: {"baseline": _side(sides["baseline"].get(metric)),
                         "post": _side(sides["post"].get(metric)),
                         "higher_is_better": higher_is_better(metric)}
                for metric in metric_names
            },
            "paired": paired_tests([p for p in pairs
                                    if str(p[0].get("category", "")) == category],
                                   n_boot=n_boot, seed=seed),
            "seed_published": SEED_PUBLISHED_PER_CATEGORY.get(category),
        }

    pairing = {"matched": len(matched),
               "baseline_only": len(set(base_items) - set(post_items)),
               "post_only": len(set(post_items) - set(base_items))}
    return {
        "metric_version": METRIC_VERSION,
        "settings_mismatches": list(mismatches or []),
        "settings": {k: v for k, v in baseline["settings"].items() if k not in UNDER_TEST},
        "baseline": _describe(baseline),
        "post": _describe(post),
        "headline": headline,
        "paired": paired,
        "pairing": pairing,
        "per_category": per_category,
        "small_categories": small,
        "summary": _summary(headline, paired, per_category, pairing),
        "seed_published_note": SEED_NOTE,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "confidence": 0.95},
    }


def _group(item: dict[str, Any]) -> str:
    return str(item.get("group") or item["id"])


def paired_tests(pairs: list[tuple[dict[str, Any], dict[str, Any]]], *, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Per paired field: ``{"label", "n", "baseline_mean", "post_mean", "delta", "ci",
    "mcnemar"}`` over the (baseline, post) item pairs where both sides carry it.

    ``mcnemar`` (``{"b", "c", "p_value"}``) only for boolean fields. Groups for the
    bootstrap are the baseline item's ``group`` (its source function). Raises nothing.
    """
    results = {}
    for field, label in PAIRED_FIELDS:
        usable = [(b, p) for b, p in pairs
                  if _pair_value(b.get(field)) is not None
                  and _pair_value(p.get(field)) is not None]
        if not usable:
            continue
        before = [_pair_value(b[field]) for b, _ in usable]
        after = [_pair_value(p[field]) for _, p in usable]
        boolean = all(isinstance(b[field], bool) and isinstance(p[field], bool)
                      for b, p in usable)
        delta = paired_bootstrap_delta(before, after, [_group(b) for b, _ in usable],
                                       n_boot=n_boot, seed=seed)
        results[field] = {
            "label": label,
            "n": len(usable),
            "baseline_mean": sum(before) / len(before),
            "post_mean": sum(after) / len(after),
            "delta": delta["delta"],
            "ci": [float(v) for v in delta["ci"]],
            "mcnemar": (mcnemar_exact([bool(v) for v in before], [bool(v) for v in after])
                        if boolean else None),
        }
    return results


def _pair_value(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return _num(value)


def _describe(data: dict[str, Any]) -> dict[str, Any]:
    settings = data["settings"]
    sampling = settings.get("sampling") if isinstance(settings.get("sampling"), dict) else {}
    budget = data.get("budget") if isinstance(data.get("budget"), dict) else {}
    per_category = budget.get("per_category") if isinstance(budget.get("per_category"),
                                                            dict) else {}
    return {
        "tag": data.get("tag"),
        "n_items": data.get("n_items", len(data["items"])),
        "model": settings.get("model"),
        "adapter": settings.get("adapter"),
        "backend": settings.get("backend"),
        "dtype": settings.get("dtype"),
        "n_samples": sampling.get("n_samples"),
        "temperature": sampling.get("temperature"),
        "max_new_tokens": sampling.get("max_new_tokens"),
        "truncated": {category: (rates or {}).get("greedy_truncated")
                      for category, rates in per_category.items()},
        "truncated_samples": {category: (rates or {}).get("samples_truncated")
                              for category, rates in per_category.items()},
    }


def _verdict(test: dict[str, Any], higher: bool = True) -> str:
    """From the paired bootstrap interval of the change (clustered by source function):
    a change only where the interval excludes 0."""
    low, high = test["ci"]
    if not (low > 0 or high < 0):
        return "no significant change"
    return "improved" if (test["delta"] > 0) == higher else "got worse"


def _summary(headline: dict[str, Any], paired: dict[str, Any], per_category: dict[str, Any],
             pairing: dict[str, int]) -> list[str]:
    lines = []
    for test in paired.values():
        mcnemar = test["mcnemar"]
        lines.append(
            f"{test['label']}: change {test['delta']:+.3f} "
            f"[{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}]"
            + (f", McNemar p = {mcnemar['p_value']:.3g} (b = {mcnemar['b']}, "
               f"c = {mcnemar['c']})" if mcnemar else "")
            + f" over {test['n']} paired items: {_verdict(test)} (by the paired CI).")
    if not paired:
        lines.append("No paired test: the two evaluations share no scored item ids.")
    if pairing["baseline_only"] or pairing["post_only"]:
        lines.append(f"Unpaired items: {pairing['baseline_only']} only in the baseline, "
                     f"{pairing['post_only']} only in post-SFT (left out of the paired test).")
    primary = PAIRED_FIELDS[0][0]
    moved = {"improved": [], "got worse": []}
    for category, row in per_category.items():
        test = row["paired"].get(primary)
        if test is not None and _verdict(test) in moved:
            moved[_verdict(test)].append(category)
    lines.append(f"Per category ({PAIRED_FIELDS[0][1]}), 95% paired CI excluding 0: "
                 "improved in " + (", ".join(moved["improved"]) or "no category")
                 + "; got worse in " + (", ".join(moved["got worse"]) or "no category") + ".")
    return lines


# -- report.md ----------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _with_ci(side: dict[str, Any] | None) -> str:
    """``0.565 [0.420, 0.700]``; a value without its interval is marked, not hidden."""
    if side is None:
        return "—"
    if side.get("value") is None:
        return f"n/a ({side['reason']})" if side.get("reason") else "—"
    ci = side.get("ci")
    if ci is None:
        return f"{side['value']:.3f} [CI missing]"
    return f"{side['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _delta_with_ci(test: dict[str, Any]) -> str:
    return f"{test['delta']:+.3f} [{test['ci'][0]:+.3f}, {test['ci'][1]:+.3f}]"


def _p(test: dict[str, Any]) -> str:
    mcnemar = test.get("mcnemar")
    if not mcnemar:
        return "— (not pass/fail)"
    return f"{mcnemar['p_value']:.3g} (b={mcnemar['b']}, c={mcnemar['c']})"


def _paired_table(paired: dict[str, Any]) -> list[str]:
    lines = ["| Paired change (post − baseline) | n pairs | Change [95% paired CI] | "
             "McNemar exact p |",
             "|---|---|---|---|"]
    for test in paired.values():
        lines.append(f"| {test['label']} | {test['n']} | {_delta_with_ci(test)} | "
                     f"{_p(test)} |")
    return lines


def _seed_cell(reference: dict[str, Any] | None, side: str) -> str:
    if reference is None or reference.get(side) is None:
        return "—"
    ci = reference.get(f"{side}_ci")
    return (f"{reference[side]:.3f}" if ci is None
            else f"{reference[side]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")


def _n_of(*sides: dict[str, Any] | None) -> str:
    ns = [str(s["n"]) for s in sides
          if s is not None and s.get("n") is not None and s.get("value") is not None]
    return " / ".join(ns) if ns else "—"


def render_markdown(comparison: dict[str, Any], title: str = "trackb: baseline vs post-SFT") -> str:
    """``report.md`` for a :func:`compare` result. Raises nothing."""
    lines = [f"# {title}", ""]
    mismatches = comparison.get("settings_mismatches") or []
    if mismatches:
        lines += ["> ⚠ **These evaluations were not made alike** (compared anyway with "
                  "`--allow-mismatch`): their differences below can move the numbers as "
                  "much as the training did.", ">"]
        lines += [f"> - `{line}`" for line in mismatches]
        lines.append("")
    for name, key in (("Baseline", "baseline"), ("Post-SFT", "post")):
        side = comparison[key]
        who = side["model"] or "(model not recorded)"
        if side["adapter"]:
            who += f" + adapter {side['adapter']}"
        facts = [f"{side['n_items']} items"]
        for label, field in (("backend", "backend"), ("dtype", "dtype"),
                             ("max new tokens", "max_new_tokens")):
            if side.get(field) is not None:
                facts.append(f"{label} {side[field]}")
        if side.get("n_samples") is not None:
            facts.append(f"{side['n_samples']} samples at T = {side['temperature']}")
        lines.append(f"- **{name}** (tag `{side['tag']}`): {who}; " + ", ".join(facts))
    boot = comparison["bootstrap"]
    lines += [
        "",
        "Every number is shown with its 95% confidence interval `[low, high]`: bootstrap "
        "intervals resampling whole source functions, widened for rates to their Wilson "
        "interval (eval.json), and for the paired changes a paired bootstrap "
        f"({boot['n_boot']} resamples, seed {boot['seed']}), which gives the verdict. "
        "Sections: **seed** = the seed's own lenient definitions (pass = compiles or looks "
        "right), scored on the first 384 tokens; **functional** = the only *pass*: tests "
        "run on the answer: a completion's or a fix's hidden tests, a unit test's run on "
        "the original and its mutant (items nothing can check are left out, see n); **format** = the answer has the asked-for form; **family** = each family's "
        "own measures; **budget** = answers cut at the token budget.",
        "",
        "## Paired test (same items, matched by id)",
        "",
    ]
    pairing = comparison["pairing"]
    lines.append(f"{pairing['matched']} items scored on both sides"
                 + (f" ({pairing['baseline_only']} only in the baseline, "
                    f"{pairing['post_only']} only in post-SFT: left out)"
                    if pairing["baseline_only"] or pairing["post_only"] else "") + ".")
    lines.append("")
    if comparison["paired"]:
        lines += _paired_table(comparison["paired"])
    else:
        lines.append("No paired test: the two evaluations share no scored item ids.")
    lines += [
        "",
        "## Headline metrics",
        "",
        "| Metric | Section | n (base / post) | Baseline [95% CI] | Post-SFT [95% CI] | "
        "Seed published baseline* | Seed published post-SFT* |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in comparison["headline"].items():
        reference = row["seed_published"]
        lines.append(
            f"| {name}{'' if row['higher_is_better'] else ' (lower is better)'} | "
            f"{row['section'] or '—'} | {_n_of(row['baseline'], row['post'])} | "
            f"{_with_ci(row['baseline'])} | {_with_ci(row['post'])} | "
            f"{_seed_cell(reference, 'baseline')} | {_seed_cell(reference, 'post_sft')} |")
    lines += [
        "",
        f"\\* {comparison['seed_published_note']}. Their intervals are Wilson intervals "
        f"over the seed's {SEED_N} items (style has none: it is not a rate).",
        "",
        "## Per category",
        "",
    ]
    for category, row in comparison["per_category"].items():
        n = row["n"]
        lines.append(f"### {category} (n = {n['baseline']} baseline, {n['post']} post-SFT)")
        lines.append("")
        if row["small"]:
            lines.append(f"> ⚠ **{category}**: n < {SMALL_CATEGORY} — one item moves its "
                         "rates by more than 0.1; read these numbers as anecdotes.")
            lines.append("")
        lines += ["| Metric | n (base / post) | Baseline [95% CI] | Post-SFT [95% CI] |",
                  "|---|---|---|---|"]
        for metric, cell in row["metrics"].items():
            lines.append(f"| {metric}{'' if cell['higher_is_better'] else ' (lower is better)'}"
                         f" | {_n_of(cell['baseline'], cell['post'])} | "
                         f"{_with_ci(cell['baseline'])} | {_with_ci(cell['post'])} |")
        reference = row["seed_published"]
        if reference:
            low, high = wilson_interval(reference["pass_at_1"], reference["n"])
            lines.append(f"| seed published baseline pass@1* (the seed's items) | "
                         f"{reference['n']} | {reference['pass_at_1']:.3f} "
                         f"[{low:.3f}, {high:.3f}] | — |")
        lines.append("")
        if row["paired"]:
            lines += _paired_table(row["paired"]) + [""]
    lines += _truncation_table(comparison)
    lines += ["## What moved", ""]
    lines += [f"- {line}" for line in comparison["summary"]]
    lines += ["", "![per-category metrics with 95% CI whiskers](report.png)", ""]
    return "\n".join(lines)


def _truncation_table(comparison: dict[str, Any]) -> list[str]:
    """Per family, the share of greedy answers and of samples cut at the token budget."""
    base, post = comparison["baseline"], comparison["post"]
    categories = sorted(set(base.get("truncated") or {}) | set(post.get("truncated") or {}))
    if not categories:
        return []
    lines = ["## Answers cut at the token budget", "",
             f"max new tokens: baseline {base.get('max_new_tokens')}, post-SFT "
             f"{post.get('max_new_tokens')}. A cut answer is scored as it is; a high rate "
             "means the budget, not the model, decided the score.", "",
             "| Family | Baseline greedy | Post-SFT greedy | Baseline samples | "
             "Post-SFT samples |", "|---|---|---|---|---|"]
    for category in categories:
        cells = [_fmt((side.get(key) or {}).get(category))
                 for key in ("truncated", "truncated_samples") for side in (base, post)]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines + [""]


# -- report.png ---------------------------------------------------------------------------

def render_png(comparison: dict[str, Any], title: str = "trackb: baseline vs post-SFT") -> bytes:
    """``report.png``: per metric, grouped bars (baseline vs post) per category, with
    95% CI whiskers. Raises nothing beyond matplotlib's own errors."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(comparison["per_category"])
    metrics: list[str] = []
    for row in comparison["per_category"].values():
        metrics += [m for m in row["metrics"] if m not in metrics]
    metrics = metrics or ["(no per-category metrics)"]
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(max(4.5 * columns, 1.4 * len(categories) * columns / 2),
                                      3.6 * rows))
    width = 0.38
    positions = list(range(len(categories)))
    for index, metric in enumerate(metrics):
        ax = axes[index // columns][index % columns]
        top = 1.0
        for offset, side, colour, name in ((-width / 2, "baseline", "#9aa5b1", "Baseline"),
                                           (width / 2, "post", "#2f7ed8", "Post-SFT")):
            values, lower, upper, missing = [], [], [], []
            for category in categories:
                cell = (comparison["per_category"][category]["metrics"].get(metric) or {})
                side_cell = cell.get(side) or {}
                value = side_cell.get("value")
                ci = side_cell.get("ci")
                values.append(value or 0.0)
                if value is None and cell.get(side) is not None:
                    missing.append(positions[categories.index(category)] + offset)
                if value is not None and ci is not None:
                    lower.append(max(0.0, value - ci[0]))
                    upper.append(max(0.0, ci[1] - value))
                    top = max(top, ci[1])
                else:
                    lower.append(0.0)
                    upper.append(0.0)
            ax.bar([x + offset for x in positions], values, width, label=name, color=colour,
                   yerr=[lower, upper], capsize=3, error_kw={"elinewidth": 1})
            for x in missing:  # measured as unavailable, not zero
                ax.text(x, 0.02, "n/a", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{c}\n(n={comparison['per_category'][c]['n']['post']})"
                            for c in categories], fontsize=7)
        ax.set_ylim(0, top * 1.05)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for index in range(len(metrics), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"{title} (whiskers: 95% CI)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.6 * rows)))  # room for the suptitle
    buffer = io.BytesIO()
    # No "Software" stamp: the same numbers give the same bytes.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
