"""trackb compare: report.md / compare.json / report.png from two eval.json files.

The eval.json fixtures are written by hand to the contract (settings, headline metrics
with CIs, per-category metrics, per-item flags), so every expected number here follows
from them.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from trackb_core.compare import (
    SEED_N,
    CompareConfig,
    compare,
    higher_is_better,
    render_markdown,
    render_png,
    run,
    settings_differences,
)
from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.metrics import METRIC_VERSION
from trackb_core.stats import mcnemar_exact, paired_bootstrap_delta, wilson_interval
from trackb_core.store import LocalStore

COMPLETE = [f"c{i:02d}" for i in range(12)]
BUGFIX = [f"b{i:02d}" for i in range(6)]


def entry(value, low, high, n, section=None):
    data = {"value": value, "ci": [low, high], "n": n}
    if section:
        data["section"] = section
    return data


def unavailable(reason, section=None):
    data = {"value": None, "ci": None, "n": 0, "reason": reason}
    if section:
        data["section"] = section
    return data


def item(item_id, category, functional, seed_pass, fraction):
    # two items per source function: the bootstrap must resample them together
    return {"id": item_id, "category": category, "group": f"fn-{item_id[0]}{int(item_id[1:]) // 2}",
            "seed_pass_at_1": seed_pass, "seed_pass_at_k": seed_pass,
            "functional": functional, "functional_fraction": fraction}


def baseline_items():
    items = [item(i, "complete", i in ("c00", "c01"), False, 0.0) for i in COMPLETE]
    items += [item(i, "bugfix", False, False, 0.0) for i in BUGFIX]
    return items + [item("b99", "bugfix", False, False, 0.0)]  # not scored post-SFT


def post_items():
    # functional: c02..c06 newly pass (b = 0, c = 5); seed pass: c00..c07 (b = 0, c = 8)
    items = [item(i, "complete", i <= "c06", i <= "c07", 1 / 3) for i in COMPLETE]
    items += [item(i, "bugfix", False, False, 0.0) for i in BUGFIX]
    return items + [item("e00", "explain", True, True, 1.0)]  # not scored in the baseline


# What eval writes as "settings" (trackb_core.evaluate._score): both sides alike but the
# adapter and the tag.
SETTINGS = {
    "dataset": {"sha256": "ab" * 32, "items": 20, "items_sha256": "cd" * 32,
                "max_items": 60},
    "sampling": {"max_new_tokens": 1024, "n_samples": 3, "temperature": 0.6, "top_p": 0.95,
                 "seed": 42, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                 "stop_tokens": ["<|im_end|>", "<|im_start|>"], "seed_view_tokens": 384},
    "backend": "hf", "dtype": "float16", "device": "cuda",
    "model": "Qwen/Qwen2.5-Coder-1.5B", "adapter": None,
    "corpus": {"needed": True, "available": True, "sha256": "ef" * 32},
    "scorer": {"metric_version": METRIC_VERSION, "n_boot": 1000, "bootstrap_seed": 0,
               "sandbox_timeout": 10.0},
    "tag": "baseline",
}


def eval_json(tag, items, headline, per_category):
    settings = dict(copy.deepcopy(SETTINGS), tag=tag,
                    adapter=None if tag == "baseline" else "runs/demo/train")
    return {"tag": tag, "metric_version": METRIC_VERSION, "n_items": len(items),
            "settings": settings, "headline": headline, "seed_compatible": {},
            "functional": {}, "families": {},
            "budget": {"known": True, "all": {"n": len(items), "greedy_truncated": 0.1,
                                              "samples_truncated": 0.2},
                       "per_category": {"complete": {"n": 12, "greedy_truncated": 0.25,
                                                     "samples_truncated": 0.5}}},
            "per_category": per_category, "items": items, "trackb": {}}


BASELINE = eval_json("baseline", baseline_items(), {
    "seed_pass_at_1": entry(0.105, 0.0, 0.263, 19, "seed"),
    "seed_hallucination_rate": entry(0.053, 0.0, 0.158, 19, "seed"),
    "functional_pass_greedy": entry(0.105, 0.0, 0.263, 19, "functional"),
    "functional_pass_at_3": unavailable("unbiased pass@3 needs at least 3 samples",
                                        "functional"),
    "bugfix_exact_fix": entry(0.0, 0.0, 0.35, 7, "family"),
    "truncated_rate": entry(0.1, 0.0, 0.3, 19, "budget"),
}, {
    "complete": {"functional_pass_greedy": entry(0.167, 0.0, 0.417, 12)},
    "bugfix": {"functional_pass_greedy": entry(0.0, 0.0, 0.35, 7)},
})
POST = eval_json("post_sft", post_items(), {
    "seed_pass_at_1": entry(0.474, 0.263, 0.684, 19, "seed"),
    "seed_hallucination_rate": entry(0.0, 0.0, 0.0, 19, "seed"),
    "functional_pass_greedy": entry(0.421, 0.211, 0.632, 19, "functional"),
    "functional_pass_at_3": entry(0.5, 0.3, 0.7, 19, "functional"),
    "bugfix_exact_fix": entry(0.0, 0.0, 0.39, 6, "family"),
    "truncated_rate": entry(0.05, 0.0, 0.2, 19, "budget"),
}, {
    "complete": {"functional_pass_greedy": entry(0.583, 0.333, 0.833, 12)},
    "bugfix": {"functional_pass_greedy": entry(0.0, 0.0, 0.39, 6)},
    "explain": {"functional_pass_greedy": entry(1.0, 0.21, 1.0, 1)},
})


@pytest.fixture
def eval_dirs(tmp_path):
    base = tmp_path / "eval_baseline"
    post = tmp_path / "eval_post"
    for folder, data in ((base, BASELINE), (post, POST)):
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps(data))
    return base, post


def table_rows(text, heading):
    """The rows (cells) of the first table from ``heading`` on, without its header row."""
    section = heading + text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        if set(line) <= {"|", "-"}:
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]


WITH_CI = re.compile(r"^-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]$")
CHANGE_WITH_CI = re.compile(r"^[+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]$")


def test_compare_writes_all_outputs(tmp_path, eval_dirs):
    base, post = eval_dirs
    out = LocalStore(tmp_path / "compare")
    # one side as a folder, the other as the file: both forms resolve
    manifest = run(CompareConfig(baseline=str(base), post=str(post / "eval.json")), out)
    assert set(manifest["outputs"]) == {"report.md", "compare.json", "report.png"}
    assert out.exists("manifest.json")
    assert manifest["counts"]["paired_items"] == 18
    png = out.get_bytes("report.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    data = json.loads(out.get_text("compare.json"))
    assert set(data["per_category"]) == {"bugfix", "complete", "explain"}
    assert data["headline"]["seed_pass_at_1"]["baseline"]["ci"] == [0.0, 0.263]


def test_every_headline_number_in_the_report_carries_its_ci():
    text = render_markdown(compare(BASELINE, POST))
    rows = table_rows(text, "## Headline metrics")
    assert [r[0].split(" (")[0] for r in rows] == list(BASELINE["headline"])
    for row in rows:
        for cell in row[3:5]:  # baseline, post-SFT
            assert WITH_CI.match(cell) or cell.startswith("n/a ("), row
    pass_at_3 = next(r for r in rows if r[0] == "functional_pass_at_3")
    assert pass_at_3[3] == "n/a (unbiased pass@3 needs at least 3 samples)"
    assert pass_at_3[4] == "0.500 [0.300, 0.700]"
    # the paired changes carry theirs too
    for row in table_rows(text, "## Paired test"):
        assert CHANGE_WITH_CI.match(row[2]), row
    # per category: every value with its CI, every paired change with its CI
    for category in ("complete", "bugfix"):
        section = text.split(f"### {category}", 1)[1]
        for row in table_rows(section, "| Metric |"):
            assert all(WITH_CI.match(c) or c == "—" for c in row[2:4]), row
        paired = table_rows(section, "| Paired change")
        assert len(paired) == 4  # functional, its share of samples, seed pass@1, pass@3
        for row in paired:
            assert CHANGE_WITH_CI.match(row[2]), row


def test_paired_test_matches_items_by_id_with_mcnemar_and_bootstrap():
    result = compare(BASELINE, POST, n_boot=500, seed=3)
    assert result["pairing"] == {"matched": 18, "baseline_only": 1, "post_only": 1}
    by_id = {i["id"]: i for i in POST["items"]}
    pairs = [(b, by_id[b["id"]]) for b in sorted(BASELINE["items"], key=lambda i: i["id"])
             if b["id"] in by_id]
    before = [float(b["functional"]) for b, _ in pairs]
    after = [float(p["functional"]) for _, p in pairs]
    groups = [b["group"] for b, _ in pairs]

    greedy = result["paired"]["functional"]
    assert greedy["n"] == 18
    assert greedy["mcnemar"] == {"b": 0, "c": 5, "p_value": 0.0625}
    assert greedy["mcnemar"] == mcnemar_exact([bool(v) for v in before],
                                              [bool(v) for v in after])
    expected = paired_bootstrap_delta(before, after, groups, n_boot=500, seed=3)
    assert greedy["delta"] == pytest.approx(5 / 18) == pytest.approx(expected["delta"])
    assert greedy["ci"] == pytest.approx(expected["ci"])
    assert greedy["baseline_mean"] == pytest.approx(2 / 18)
    assert result["paired"]["seed_pass_at_1"]["mcnemar"]["c"] == 8
    # a fraction gets the bootstrap but no McNemar test
    assert result["paired"]["functional_fraction"]["mcnemar"] is None
    assert result["paired"]["functional_fraction"]["delta"] == pytest.approx(4 / 18)
    # per category, on that category's pairs only
    complete = result["per_category"]["complete"]["paired"]["functional"]
    assert complete["n"] == 12 and complete["mcnemar"]["c"] == 5
    assert result["per_category"]["explain"]["paired"] == {}  # nothing to pair

    text = render_markdown(result)
    assert "18 items scored on both sides (1 only in the baseline, 1 only in post-SFT" in text
    row = next(r for r in table_rows(text, "## Paired test")
               if r[0].startswith("functional pass, greedy"))
    assert row[1] == "18" and row[3] == "0.0625 (b=0, c=5)"


def test_summary_calls_a_change_from_the_clustered_paired_interval():
    result = compare(BASELINE, POST)
    summary = result["summary"]
    for field, test in result["paired"].items():
        line = next(line for line in summary if line.startswith(test["label"]))
        excludes_zero = test["ci"][0] > 0 or test["ci"][1] < 0
        assert line.endswith("improved (by the paired CI)." if excludes_zero
                             else "no significant change (by the paired CI)."), field
    greedy = next(line for line in summary if line.startswith("functional pass, greedy"))
    assert "McNemar p = 0.0625 (b = 0, c = 5)" in greedy  # shown beside, not the verdict
    assert any("1 only in the baseline" in line for line in summary)


def test_changes_clustered_in_one_function_are_not_called_significant():
    # Eight items of ONE source function flip to pass. McNemar, which treats them as
    # eight independent items, says p = 0.0078; but they are one function's worth of
    # evidence, and the bootstrap over functions leaves 0 inside the interval.
    base_items, post_items = [], []
    for number in range(40):
        group = "fn-one" if number < 8 else f"fn-{number}"
        common = {"id": f"i{number:02d}", "category": "complete", "group": group,
                  "seed_pass_at_1": False, "seed_pass_at_k": False,
                  "functional_fraction": None}
        base_items.append({**common, "functional": False})
        post_items.append({**common, "functional": number < 8})
    base = dict(BASELINE, items=base_items)
    post = dict(POST, items=post_items)
    test = compare(base, post, n_boot=2000)["paired"]["functional"]
    assert test["mcnemar"]["p_value"] < 0.01
    assert test["ci"][0] <= 0.0
    line = next(line for line in compare(base, post, n_boot=2000)["summary"]
                if line.startswith("functional pass, greedy"))
    assert line.endswith("no significant change (by the paired CI).")


def test_seed_published_numbers_sit_beside_ours_for_reference():
    result = compare(BASELINE, POST)
    reference = result["headline"]["seed_pass_at_1"]["seed_published"]
    assert reference["baseline"] == 0.565 and reference["post_sft"] == 0.804
    assert reference["baseline_ci"] == list(wilson_interval(0.565, SEED_N))
    assert result["headline"]["functional_pass_greedy"]["seed_published"] is None
    text = render_markdown(result)
    rows = {r[0].split(" (")[0]: r for r in table_rows(text, "## Headline metrics")}
    low, high = wilson_interval(0.565, SEED_N)
    assert rows["seed_pass_at_1"][5] == f"0.565 [{low:.3f}, {high:.3f}]"
    assert rows["seed_pass_at_1"][6].startswith("0.804 [")
    assert rows["seed_hallucination_rate"][5].startswith("0.022 [")
    assert rows["seed_hallucination_rate"][6] == "—"  # never published
    assert rows["functional_pass_greedy"][5:] == ["—", "—"]
    assert "for reference only" in text
    # per category: the seed's published baseline pass@1 and its n
    bugfix = {r[0]: r for r in table_rows(text, "### bugfix")}
    seed_row = bugfix["seed published baseline pass@1* (the seed's items)"]
    assert seed_row[1] == "6" and seed_row[2].startswith("0.167 [")


def test_n_per_category_and_warning_only_below_ten():
    result = compare(BASELINE, POST)
    assert result["per_category"]["complete"]["n"] == {"baseline": 12, "post": 12}
    assert result["per_category"]["bugfix"]["n"] == {"baseline": 7, "post": 6}
    assert result["small_categories"] == ["bugfix", "explain"]
    text = render_markdown(result)
    warnings = [line for line in text.splitlines() if line.startswith("> ⚠")]
    assert len(warnings) == 2
    assert "**bugfix**" in warnings[0] and "**explain**" in warnings[1]
    assert "### complete (n = 12 baseline, 12 post-SFT)" in text
    assert "### explain (n = 0 baseline, 1 post-SFT)" in text


def test_lower_is_better_metrics():
    assert not higher_is_better("seed_hallucination_rate")
    assert not higher_is_better("truncated_rate")
    assert higher_is_better("functional_pass_greedy")
    text = render_markdown(compare(BASELINE, POST))
    assert "| seed_hallucination_rate (lower is better) |" in text
    assert "| truncated_rate (lower is better) |" in text


def test_chart_handles_missing_intervals_and_one_sided_categories():
    comparison = compare(BASELINE, POST)
    comparison["per_category"]["bugfix"]["metrics"]["functional_pass_greedy"]["post"]["ci"] = None
    png = render_png(comparison)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


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


def test_old_or_broken_eval_json_is_input_error_and_leaves_no_manifest(tmp_path, eval_dirs):
    base, _ = eval_dirs
    bad = tmp_path / "bad.json"
    out = LocalStore(tmp_path / "compare")
    old_shape = {"tag": "x", "pass_at_1": 0.5, "pass_at_k": 0.6, "per_category": {},
                 "total_samples": 46}
    bad.write_text(json.dumps(old_shape))
    with pytest.raises(InputError, match="no 'metric_version' key"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    bad.write_text(json.dumps({**POST, "metric_version": 2}))
    with pytest.raises(InputError, match="metric_version is 2"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    bad.write_text(json.dumps({key: v for key, v in POST.items() if key != "settings"}))
    with pytest.raises(InputError, match="no 'settings' key"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    bad.write_text(json.dumps({key: v for key, v in POST.items() if key != "items"}))
    with pytest.raises(InputError, match="no 'items' key"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        run(CompareConfig(baseline=str(base), post=str(bad)), out)
    assert not out.exists("manifest.json")


def test_missing_inputs(tmp_path, eval_dirs):
    base, _ = eval_dirs
    out = LocalStore(tmp_path / "compare")
    with pytest.raises(MissingInputError, match="--post"):
        run(CompareConfig(baseline=str(base), post=str(tmp_path / "nowhere")), out)
    with pytest.raises(ConfigError, match="--post is required"):
        run(CompareConfig(baseline=str(base)), out)
    assert not out.exists("manifest.json")


# -- comparable runs -------------------------------------------------------------------------

def flat_fields(settings, prefix=""):
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            yield from flat_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def changed(settings, dotted):
    """``settings`` with the field ``dotted`` (a.b) set to a value it never has."""
    changed = copy.deepcopy(settings)
    *parents, last = dotted.split(".")
    holder = changed
    for name in parents:
        holder = holder[name]
    old = holder[last]
    if isinstance(old, bool):
        holder[last] = not old
    elif isinstance(old, int | float):
        holder[last] = old + 1
    elif isinstance(old, list):
        holder[last] = old[:-1]
    else:
        holder[last] = f"{old}-other"
    return changed


COMPARED_FIELDS = [f for f in flat_fields(SETTINGS) if f.split(".")[0] not in
                   ("model", "adapter", "tag")]


@pytest.mark.parametrize("field", COMPARED_FIELDS)
def test_compare_refuses_evaluations_that_differ_in_a_recorded_setting(tmp_path, field):
    base_dir, post_dir = tmp_path / "base", tmp_path / "post"
    for folder in (base_dir, post_dir):
        folder.mkdir()
    (base_dir / "eval.json").write_text(json.dumps(BASELINE))
    (post_dir / "eval.json").write_text(json.dumps(
        dict(POST, settings=changed(POST["settings"], field))))
    out = LocalStore(tmp_path / "compare")
    with pytest.raises(InputError) as raised:
        run(CompareConfig(baseline=str(base_dir), post=str(post_dir)), out)
    lines = [line.strip() for line in str(raised.value).splitlines()]
    assert [line for line in lines if line.startswith(f"{field}:")], lines
    assert sum(":" in line and "baseline" in line and "post-SFT" in line
               for line in lines) == 1  # one line for the one difference
    assert "--allow-mismatch" in str(raised.value)
    assert not out.exists("manifest.json")


def test_every_compared_setting_is_covered_by_a_refusal_test():
    assert {"dataset.sha256", "dataset.items_sha256", "sampling.max_new_tokens",
            "sampling.top_k", "sampling.repetition_penalty", "sampling.seed", "backend",
            "dtype", "device", "corpus.available", "corpus.sha256",
            "scorer.metric_version", "scorer.bootstrap_seed"} <= set(COMPARED_FIELDS)


def test_the_model_and_adapter_under_test_and_the_tag_may_differ():
    post_settings = dict(copy.deepcopy(BASELINE["settings"]), model="other/model",
                         adapter="runs/x/train", tag="post_sft")
    assert settings_differences(BASELINE["settings"], post_settings) == []


def test_a_setting_one_side_lacks_counts_as_a_difference():
    lacking = copy.deepcopy(POST["settings"])
    del lacking["dtype"]
    assert settings_differences(BASELINE["settings"], lacking) == [
        'dtype: baseline "float16", post-SFT (not recorded)']


def test_allow_mismatch_compares_anyway_and_the_report_says_so(tmp_path, eval_dirs):
    base, _ = eval_dirs
    post_dir = tmp_path / "post_other"
    post_dir.mkdir()
    settings = changed(changed(POST["settings"], "dtype"), "corpus.available")
    (post_dir / "eval.json").write_text(json.dumps(dict(POST, settings=settings)))
    out = LocalStore(tmp_path / "compare")
    run(CompareConfig(baseline=str(base), post=str(post_dir), allow_mismatch=True), out)
    data = json.loads(out.get_text("compare.json"))
    assert data["settings_mismatches"] == [
        "corpus.available: baseline true, post-SFT false",
        'dtype: baseline "float16", post-SFT "float16-other"']
    report = out.get_text("report.md")
    assert "These evaluations were not made alike" in report.split("## Paired test")[0]
    assert "`dtype: baseline \"float16\", post-SFT \"float16-other\"`" in report


def test_report_shows_the_truncation_rates_of_both_sides():
    text = render_markdown(compare(BASELINE, POST))
    rows = {r[0]: r for r in table_rows(text, "## Answers cut at the token budget")}
    assert rows["complete"][1:] == ["0.250", "0.250", "0.500", "0.500"]
    assert "max new tokens: baseline 1024, post-SFT 1024" in text
