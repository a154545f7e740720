"""trackb compare: report.md / compare.json / report.png from two eval.json files."""

from __future__ import annotations

import json

import pytest

from trackb_core.compare import CompareConfig, compare, render_markdown, run, wilson_interval
from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.store import LocalStore


def eval_json(tag, overall, per_category, total=46):
    p1, pk, style, hall, exe = overall
    return {
        "tag": tag, "metric_set": "seed-compatible", "total_samples": total, "k": 3,
        "pass_at_1": p1, "pass_at_k": pk, "avg_style_score": style,
        "hallucination_rate": hall, "execution_rate": exe,
        "per_category": {
            c: {"count": n, "pass_at_1": a, "pass_at_k": b, "avg_style": s,
                "hallucination_rate": 0.0}
            for c, (n, a, b, s) in per_category.items()
        },
        "failures": [],
        "trackb": {"model": "tiny", "adapter": None if tag == "baseline" else "train/adapter"},
    }


BASELINE = eval_json("baseline", (0.4, 0.6, 0.7, 0.1, 0.3), {
    "complete": (12, 0.25, 0.5, 0.6),
    "docstring": (15, 0.4, 0.6, 0.7),
    "bugfix": (6, 0.0, 0.1667, 0.5),
})
# "explain" only on the post side, "bugfix" only on the baseline side.
POST = eval_json("post_sft", (0.6, 0.6, 0.65, 0.0, 0.5), {
    "complete": (12, 0.5, 0.75, 0.8),
    "docstring": (15, 0.2, 0.6, 0.6),
    "explain": (13, 1.0, 1.0, 0.9),
})


@pytest.fixture
def eval_dirs(tmp_path):
    base = tmp_path / "eval_baseline"
    post = tmp_path / "eval_post"
    for folder, data in ((base, BASELINE), (post, POST)):
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps(data))
    return base, post


def test_compare_writes_all_outputs_with_every_category_on_both_sides(tmp_path, eval_dirs):
    base, post = eval_dirs
    out = LocalStore(tmp_path / "compare")
    # one side as a folder, the other as the file: both forms resolve
    manifest = run(CompareConfig(baseline=str(base), post=str(post / "eval.json")), out)
    assert set(manifest["outputs"]) == {"report.md", "compare.json", "report.png"}
    assert out.exists("manifest.json")

    report = out.get_text("report.md")
    assert "| Metric | Baseline | Post-SFT | Δ | Seed baseline* |" in report
    assert "for reference, different data/model" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith("| ") and line.count("|") == 12}
    for category in ("bugfix", "complete", "docstring", "explain"):
        cells = [c.strip() for c in rows[category].split("|")[1:-1]]
        assert len(cells) == 11  # n both sides, pass@1/pass@3/style both sides, deltas
    complete = [c.strip() for c in rows["complete"].split("|")[1:-1]]
    assert complete[:6] == ["complete", "12", "12", "0.250", "0.500", "+0.250"]
    # a category absent on one side shows a dash, not a zero
    bugfix = [c.strip() for c in rows["bugfix"].split("|")[1:-1]]
    assert bugfix[2] == "—" and bugfix[4] == "—"

    png = out.get_bytes("report.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    data = json.loads(out.get_text("compare.json"))
    assert set(data["per_category"]) == {"bugfix", "complete", "docstring", "explain"}
    assert data["per_category"]["explain"]["baseline"] is None
    assert data["per_category"]["explain"]["post"]["pass_at_1"] == 1.0
    assert data["overall"]["pass_at_1"]["delta"] == pytest.approx(0.2)
    assert data["overall"]["pass_at_1"]["seed_baseline"] == 0.565
    assert data["overall"]["execution_rate"]["seed_baseline"] is None


def test_overall_table_values_and_seed_reference():
    text = render_markdown(compare(BASELINE, POST))
    assert "| pass@1 | 0.400 | 0.600 | +0.200 | 0.565 |" in text
    assert "| pass@3 | 0.600 | 0.600 | +0.000 | 0.783 |" in text
    assert "| style score | 0.700 | 0.650 | -0.050 | 0.874 |" in text
    assert "| hallucination rate | 0.100 | 0.000 | -0.100 | 0.022 |" in text
    assert "| execution rate | 0.300 | 0.500 | +0.200 | — |" in text


def test_small_category_warning_only_below_ten():
    result = compare(BASELINE, POST)
    assert result["small_categories"] == ["bugfix"]
    text = render_markdown(result)
    warnings = [line for line in text.splitlines() if line.startswith("> ⚠")]
    assert len(warnings) == 1 and "bugfix" in warnings[0] and "n = 6" in warnings[0]


def test_summary_states_direction_with_hallucination_lower_is_better():
    summary = compare(BASELINE, POST)["summary"]
    assert "pass@1: improved, 0.400 -> 0.600 (+0.200)." in summary
    assert "pass@3: unchanged at 0.600." in summary
    assert "style score: got worse, 0.700 -> 0.650 (-0.050)." in summary
    assert "hallucination rate: improved, 0.100 -> 0.000 (-0.100)." in summary
    assert "pass@1 rose in: complete; fell in: docstring." in summary


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0.5, 46)
    assert lo == pytest.approx(0.3612, abs=1e-4) and hi == pytest.approx(0.6388, abs=1e-4)
    assert wilson_interval(0.0, 10)[0] == 0.0
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_compare_is_deterministic(tmp_path, eval_dirs):
    base, post = eval_dirs
    outputs = []
    for name in ("a", "b"):
        out = LocalStore(tmp_path / name)
        run(CompareConfig(baseline=str(base), post=str(post)), out)
        outputs.append([out.get_bytes(k) for k in ("report.md", "compare.json", "report.png")])
    assert outputs[0] == outputs[1]


def test_not_an_eval_json_is_input_error_and_leaves_no_manifest(tmp_path, eval_dirs):
    base, _ = eval_dirs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tag": "x"}))
    out = LocalStore(tmp_path / "compare")
    with pytest.raises(InputError, match="missing pass_at_1"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    assert not out.exists("manifest.json")
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)


def test_missing_inputs(tmp_path, eval_dirs):
    base, _ = eval_dirs
    out = LocalStore(tmp_path / "compare")
    with pytest.raises(MissingInputError, match="--post"):
        run(CompareConfig(baseline=str(base), post=str(tmp_path / "nowhere")), out)
    with pytest.raises(ConfigError, match="--post is required"):
        run(CompareConfig(baseline=str(base)), out)
    assert not out.exists("manifest.json")
