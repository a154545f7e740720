"""``trackb compare``: baseline vs post-SFT, overall and per category.

Reads two ``eval.json`` files (``trackb eval`` or ``trackb score`` outputs) and writes
a report a person can read (``report.md``), the same numbers for machines
(``compare.json``) and a bar chart (``report.png``). The seed's published baseline sits
beside ours for reference only: it came from another dataset and model, so it is
labelled as such and never used for a delta. Small categories get a warning, and
pass rates get 95% Wilson intervals, because with a few dozen items one item moves a
rate by several points.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import ConfigError, InputError
from trackb_core.stage import StageRun, say, stage_run
from trackb_core.store import Store

STAGE = "compare"
SMALL_CATEGORY = 10
# Direction in which a metric gets better (hallucination is the only "lower is better").
OVERALL_METRICS = (
    ("pass_at_1", "pass@1", +1),
    ("pass_at_k", "pass@3", +1),
    ("avg_style_score", "style score", +1),
    ("hallucination_rate", "hallucination rate", -1),
    ("execution_rate", "execution rate", +1),
)
CATEGORY_METRICS = (("pass_at_1", "pass@1"), ("pass_at_k", "pass@3"), ("avg_style", "style"))
# The seed's published baseline (Qwen2.5-Coder-1.5B, its own 46-item test set).
SEED_BASELINE = {
    "pass_at_1": 0.565,
    "pass_at_k": 0.783,
    "avg_style_score": 0.874,
    "hallucination_rate": 0.022,
    "execution_rate": None,
}
# Below this absolute change a metric is reported as unchanged (rounding noise).
EPSILON = 1e-9


class CompareConfig(StageConfig):
    """Compare a baseline evaluation with a post-SFT one, overall and per category.

    Reads two eval.json files written by `trackb eval` or `trackb score` (each URI may
    name the file or the stage folder holding it). Writes report.md (tables of pass@1,
    pass@3, style, hallucination and execution rate: Baseline | Post-SFT | delta, with
    the seed's published baseline for reference, and per category), compare.json (the
    same numbers) and report.png (per-category bars of pass@1 and style).
    """

    baseline: str | None = input_field(
        None, kind="file", filename="eval.json",
        description="The baseline's eval.json, or the eval stage folder holding it.")
    post: str | None = input_field(
        None, kind="file", filename="eval.json",
        description="The post-SFT eval.json, or the eval stage folder holding it.")
    title: str = Field("trackb: baseline vs post-SFT",
                       description="Heading of report.md and of the chart.")


def run(config: CompareConfig, out: Store) -> dict[str, Any]:
    """Write report.md, compare.json and report.png into ``out``; returns the manifest.

    Raises ConfigError if either side is not given, MissingInputError if an eval.json
    is absent, InputError if one is not a seed-compatible eval.json, StoreError if
    ``out`` cannot be written.
    """
    for field in ("baseline", "post"):
        if not getattr(config, field):
            raise ConfigError(f"--{field} is required: the {field} eval.json or its folder")
    with stage_run(STAGE, config, out) as run:
        baseline = _read_eval(run, "baseline")
        post = _read_eval(run, "post")
        comparison = compare(baseline, post)
        run.write_json("compare.json", comparison)
        run.write_text("report.md", render_markdown(comparison, config.title))
        with run.timed("chart"):
            run.write_bytes("report.png", render_png(comparison, config.title))
        run.counts["categories"] = len(comparison["per_category"])
        run.counts["small_categories"] = len(comparison["small_categories"])
        for line in comparison["summary"]:
            say(STAGE, line)
        say(STAGE, f"wrote {out.uri}/report.md")
    return run.manifest


REQUIRED_KEYS = ("pass_at_1", "pass_at_k", "avg_style_score", "hallucination_rate",
                 "per_category", "total_samples")


def _read_eval(run: StageRun, field: str) -> dict[str, Any]:
    raw = run.read_bytes(field)
    where = run.input_uri(field)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--{field}: {where} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InputError(f"--{field}: {where} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(f"--{field}: {where} is not an eval.json (missing {', '.join(missing)})")
    if not isinstance(data["per_category"], dict):
        raise InputError(f"--{field}: {where}: per_category is not a mapping")
    return data


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``rate`` over ``n`` items ((0, 1) if n = 0)."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _delta(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return round(after - before, 4)


def compare(baseline: dict[str, Any], post: dict[str, Any]) -> dict[str, Any]:
    """The comparison of two eval.json dicts (what compare.json holds). Raises nothing."""
    overall = {}
    for key, label, better in OVERALL_METRICS:
        before, after = _num(baseline.get(key)), _num(post.get(key))
        overall[key] = {
            "label": label,
            "higher_is_better": better > 0,
            "baseline": before,
            "post": after,
            "delta": _delta(before, after),
            "seed_baseline": SEED_BASELINE[key],
        }

    per_category = {}
    small = []
    for category in sorted(set(baseline["per_category"]) | set(post["per_category"])):
        sides = {}
        for side, data in (("baseline", baseline), ("post", post)):
            stats = data["per_category"].get(category)
            sides[side] = None if not isinstance(stats, dict) else {
                "count": int(stats.get("count", 0)),
                **{key: _num(stats.get(key)) for key, _ in CATEGORY_METRICS},
            }
        deltas = {
            key: _delta((sides["baseline"] or {}).get(key), (sides["post"] or {}).get(key))
            for key, _ in CATEGORY_METRICS
        }
        counts = [s["count"] for s in sides.values() if s is not None]
        n = min(counts) if counts else 0
        if n < SMALL_CATEGORY:
            small.append(category)
        per_category[category] = {**sides, "delta": deltas, "n": n}

    intervals = {
        side: {
            key: wilson_interval(_num(data.get(key)) or 0.0, int(data.get("total_samples", 0)))
            for key in ("pass_at_1", "pass_at_k")
        }
        for side, data in (("baseline", baseline), ("post", post))
    }
    return {
        "baseline": _describe(baseline),
        "post": _describe(post),
        "overall": overall,
        "per_category": per_category,
        "small_categories": small,
        "wilson_95": intervals,
        "summary": _summary(overall, per_category),
        "seed_baseline_note": "seed's published baseline: for reference, different data/model",
    }


def _describe(data: dict[str, Any]) -> dict[str, Any]:
    extra = data.get("trackb") if isinstance(data.get("trackb"), dict) else {}
    return {
        "tag": data.get("tag"),
        "metric_set": data.get("metric_set", "seed-compatible"),
        "total_samples": data.get("total_samples"),
        "model": extra.get("model"),
        "adapter": extra.get("adapter"),
    }


def _direction(delta: float | None, higher_is_better: bool) -> str:
    if delta is None:
        return "not comparable"
    if abs(delta) <= EPSILON:
        return "unchanged"
    return "improved" if (delta > 0) == higher_is_better else "got worse"


def _summary(overall: dict[str, Any], per_category: dict[str, Any]) -> list[str]:
    lines = []
    for row in overall.values():
        direction = _direction(row["delta"], row["higher_is_better"])
        if row["delta"] is None:
            lines.append(f"{row['label']}: {direction} (missing on one side).")
        elif direction == "unchanged":
            lines.append(f"{row['label']}: unchanged at {row['baseline']:.3f}.")
        else:
            lines.append(f"{row['label']}: {direction}, {row['baseline']:.3f} -> "
                         f"{row['post']:.3f} ({row['delta']:+.3f}).")
    better = sorted(c for c, r in per_category.items() if (r["delta"]["pass_at_1"] or 0) > EPSILON)
    worse = sorted(c for c, r in per_category.items() if (r["delta"]["pass_at_1"] or 0) < -EPSILON)
    lines.append("pass@1 rose in: " + (", ".join(better) or "no category") + "; fell in: "
                 + (", ".join(worse) or "no category") + ".")
    return lines


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _fmt_delta(value: float | None) -> str:
    return "—" if value is None else f"{value:+.3f}"


def render_markdown(comparison: dict[str, Any], title: str = "trackb: baseline vs post-SFT") -> str:
    """``report.md`` for a :func:`compare` result. Raises nothing."""
    base, post = comparison["baseline"], comparison["post"]
    lines = [f"# {title}", ""]
    for name, side in (("Baseline", base), ("Post-SFT", post)):
        who = side["model"] or "(model not recorded)"
        if side["adapter"]:
            who += f" + adapter {side['adapter']}"
        lines.append(f"- **{name}** (tag `{side['tag']}`): {who}, {side['total_samples']} items")
    lines += [
        "",
        "Metrics are **seed-compatible**: computed exactly as the seed's scorer defined them "
        "(pass = code compiles, or style ≥ 0.5 for docstring/explain; pass@3 = any of greedy "
        "+ 2 samples at T=0.6).",
        "",
        "## Overall",
        "",
        "| Metric | Baseline | Post-SFT | Δ | Seed baseline* |",
        "|---|---|---|---|---|",
    ]
    for row in comparison["overall"].values():
        lines.append(f"| {row['label']} | {_fmt(row['baseline'])} | {_fmt(row['post'])} | "
                     f"{_fmt_delta(row['delta'])} | {_fmt(row['seed_baseline'])} |")
    lines += [
        "",
        "\\* Seed baseline: the published Qwen2.5-Coder-1.5B numbers, for reference, "
        "different data/model — not comparable item by item.",
        "",
    ]
    wilson = comparison["wilson_95"]
    for key, label in (("pass_at_1", "pass@1"), ("pass_at_k", "pass@3")):
        (b_lo, b_hi), (p_lo, p_hi) = wilson["baseline"][key], wilson["post"][key]
        overlap = b_lo <= p_hi and p_lo <= b_hi
        lines.append(f"- {label} 95% Wilson interval: baseline [{b_lo:.3f}, {b_hi:.3f}], "
                     f"post-SFT [{p_lo:.3f}, {p_hi:.3f}]"
                     + (" — they overlap: the difference is within noise." if overlap else "."))
    lines += [
        "",
        "## Per category",
        "",
        "| Category | n (base) | n (post) | pass@1 base | pass@1 post | Δ pass@1 | "
        "pass@3 base | pass@3 post | style base | style post | Δ style |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for category, row in comparison["per_category"].items():
        b, p = row["baseline"] or {}, row["post"] or {}
        lines.append(
            f"| {category} | {b.get('count', '—')} | {p.get('count', '—')} | "
            f"{_fmt(b.get('pass_at_1'))} | {_fmt(p.get('pass_at_1'))} | "
            f"{_fmt_delta(row['delta']['pass_at_1'])} | "
            f"{_fmt(b.get('pass_at_k'))} | {_fmt(p.get('pass_at_k'))} | "
            f"{_fmt(b.get('avg_style'))} | {_fmt(p.get('avg_style'))} | "
            f"{_fmt_delta(row['delta']['avg_style'])} |"
        )
    lines.append("")
    for category in comparison["small_categories"]:
        n = comparison["per_category"][category]["n"]
        lines.append(f"> ⚠ **{category}**: n = {n} < {SMALL_CATEGORY} — one item moves its "
                     "rates by ≥ 0.1; read these numbers as anecdotes.")
    if comparison["small_categories"]:
        lines.append("")
    lines += ["## What moved", ""]
    lines += [f"- {line}" for line in comparison["summary"]]
    lines += ["", "![per-category pass@1 and style](report.png)", ""]
    return "\n".join(lines)


def render_png(comparison: dict[str, Any], title: str = "trackb: baseline vs post-SFT") -> bytes:
    """``report.png``: per-category grouped bars (baseline vs post) of pass@1 and style.

    Raises nothing beyond matplotlib's own errors.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(comparison["per_category"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(categories) + 4), 4.2))
    width = 0.38
    positions = range(len(categories))
    for ax, (key, label) in zip(axes, (("pass_at_1", "pass@1"), ("avg_style", "style score")),
                                strict=True):
        for offset, side, colour in ((-width / 2, "baseline", "#9aa5b1"),
                                     (width / 2, "post", "#2f7ed8")):
            values = [((comparison["per_category"][c][side] or {}).get(key) or 0.0)
                      for c in categories]
            ax.bar([x + offset for x in positions], values, width,
                   label="Baseline" if side == "baseline" else "Post-SFT", color=colour)
        ax.set_xticks(list(positions))
        ax.set_xticklabels(
            [f"{c}\n(n={comparison['per_category'][c]['n']})" for c in categories], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    # No "Software" stamp: the same numbers give the same bytes.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
