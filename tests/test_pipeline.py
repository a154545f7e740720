"""End to end: run-all on a small real corpus with a tiny model, on CPU."""

from __future__ import annotations

import json

import pytest
import yaml

from trackb_core.cli import main
from trackb_core.config import build_config
from trackb_core.pipeline import PipelineConfig, plan, run_pipeline, run_step, steps_for
from trackb_core.store import LocalStore

pytestmark = pytest.mark.integration


def small_config(corpus, store, run_id: str) -> PipelineConfig:
    """The demo's shape, shrunk to run in about a minute on 2 cores."""
    return build_config(PipelineConfig, {
        "run_id": run_id,
        "store": str(store),
        "corpus": str(corpus),
        "model": "tiny",
        "extract": {"max_functions": 40},
        "tiny_model": {"pretrain_seconds": 5.0},
        "train": {"epochs": 1, "max_length": 512},
        "eval": {"max_items": 12, "max_new_tokens": 48, "n_samples": 2},
    })


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, stdlib_corpus):
    store = tmp_path_factory.mktemp("store")
    config = small_config(stdlib_corpus, store, "e2e")
    report = run_pipeline(config)
    return config, store, report


def test_run_all_writes_a_report_with_both_columns_per_category(finished_run):
    config, store, report = finished_run
    run = store / "runs" / "e2e"
    text = (run / "compare" / "report.md").read_text()
    assert report.endswith("compare/report.md")
    test_rows = [json.loads(line) for line in (run / "build-dataset" / "test.jsonl").open()]
    categories = {row["category"] for row in test_rows}
    assert categories, "the test split is empty"
    assert "Baseline" in text and "Post-SFT" in text
    for category in categories:
        assert category in text
    compare = json.loads((run / "compare" / "compare.json").read_text())
    assert compare
    for row in steps_for(config):
        manifest = json.loads((run / row.folder / "manifest.json").read_text())
        assert manifest["fingerprint"] and manifest["inputs"] is not None
        # Every manifest says what walls model-written code ran behind, if any ran.
        assert "sandbox" in manifest
    assert (run / "pipeline.yaml").exists()


def test_rerun_of_same_run_id_is_all_cached_and_fast(finished_run, capsys):
    config, store, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in (store / "runs" / "e2e").rglob("manifest.json")}
    run_pipeline(config)
    err = capsys.readouterr().err
    # Fast because nothing runs again: every stage is cached and no manifest is rewritten.
    assert err.count("cached:") == len(steps_for(config)), err
    after = {p: p.stat().st_mtime_ns for p in (store / "runs" / "e2e").rglob("manifest.json")}
    assert before == after


def test_changed_config_reruns_the_first_stage_that_differs(finished_run, capsys):
    config, store, _ = finished_run
    changed = config.model_copy(update={"dataset": config.dataset.model_copy(
        update={"max_response_chars": config.dataset.max_response_chars - 1})})
    # Only see which stages would run: stop the runner at the first stage it is asked for.
    asked = []

    def runner(step, stage_config, out):
        asked.append(step.folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(changed, runner=runner)
    assert asked == ["build-dataset"]
    err = capsys.readouterr().err
    assert err.count("cached:") == 2  # extract, generate
    assert "[build-dataset] config or inputs changed since its last run: running again" in err


def test_same_seed_and_corpus_give_byte_identical_data(finished_run, tmp_path):
    config, store, _ = finished_run
    other = LocalStore(tmp_path).child("runs/again")
    for step, stage_config in plan(config.model_copy(update={"run_id": "again"}), other):
        if step.folder in ("extract", "generate", "build-dataset"):
            run_step(step, stage_config, other.child(step.folder))
    first = store / "runs" / "e2e"
    for rel in ("extract/tasks.jsonl", "build-dataset/train.jsonl", "build-dataset/test.jsonl"):
        assert (first / rel).read_bytes() == (tmp_path / "runs" / "again" / rel).read_bytes(), rel


def test_no_source_function_on_both_sides(finished_run):
    _, store, _ = finished_run
    run = store / "runs" / "e2e" / "build-dataset"
    train = [json.loads(line) for line in (run / "train.jsonl").open()]
    test = [json.loads(line) for line in (run / "test.jsonl").open()]
    assert not {r["function_id"] for r in train} & {r["function_id"] for r in test}
    assert not {r["source_function"] for r in train} & {r["source_function"] for r in test}


def test_run_all_cli_prints_where_the_report_is(finished_run, tmp_path):
    config, store, _ = finished_run
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["run-all", "--config", str(path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "report: " in result.output and "report.md" in result.output
