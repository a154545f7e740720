"""Experiment tracking: TensorBoard always, MLflow and W&B when the environment configures
them, one tracking run per trackb run id that train opens and eval's metrics join.

MLflow is real (mlflow-skinny, a local file:// tracking store). wandb is not installed in
the test environment (its wheel brings a Go service and an HTTP stack), so W&B is a
stand-in module that records the calls trackb makes to wandb's public API.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from trackb_core import tracking
from trackb_core.errors import ConfigError
from trackb_core.tracking import (
    check_configured,
    flat_metrics,
    log_eval_metrics,
    mlflow_key,
    run_name,
    train_values,
    wandb_run_id,
)

TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT",
                "WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "TRACKB_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    """No tracking configuration from the developer's shell."""
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tensorboard_is_always_on_and_the_others_when_the_environment_says_so(fake_wandb):
    assert check_configured({}) == ["tensorboard"]
    assert check_configured({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == [
        "tensorboard", "mlflow"]
    assert check_configured({"WANDB_PROJECT": "p", "WANDB_MODE": "offline"}) == [
        "tensorboard", "wandb"]
    assert check_configured({"WANDB_PROJECT": "p", "WANDB_API_KEY": "k"}) == [
        "tensorboard", "wandb"]
    assert check_configured({"WANDB_PROJECT": "p", "WANDB_MODE": "disabled"}) == ["tensorboard"]
    assert check_configured({"WANDB_API_KEY": "k"}) == ["tensorboard"]  # no project: off


def test_a_half_configured_or_missing_backend_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="neither WANDB_API_KEY nor WANDB_MODE=offline"):
        check_configured({"WANDB_PROJECT": "p"})
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb is not installed: pip install wandb"):
        check_configured({"WANDB_PROJECT": "p", "WANDB_MODE": "offline"})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match="mlflow is not installed: pip install mlflow-skinny"):
        check_configured({"MLFLOW_TRACKING_URI": "file:///tmp/x"})


def test_run_name_prefers_the_config_then_the_run_id_environment():
    assert run_name("mine", "s3://b/runs/x/train", {"TRACKB_RUN_ID": "env"}) == "mine"
    assert run_name(None, "s3://b/runs/x/train", {"TRACKB_RUN_ID": "env"}) == "env"
    assert run_name(None, "s3://b/runs/x/train", {}) == "s3://b/runs/x/train"


def test_wandb_run_ids_are_the_name_or_a_stable_readable_hash():
    assert wandb_run_id("demo-2024_1") == "demo-2024_1"
    odd = wandb_run_id("s3://bucket/runs/demo/train")
    assert odd == wandb_run_id("s3://bucket/runs/demo/train")  # stable
    assert odd.startswith("s3-bucket-runs-demo-train-") and len(odd) <= 64
    assert wandb_run_id("x" * 80) != wandb_run_id("x" * 81)


def test_metrics_are_flattened_numeric_leaves_under_a_prefix():
    metrics = {"pass@1": {"all": 0.5, "explain": 1}, "n": 60, "backend": "hf",
               "greedy": True, "ci": None}
    assert flat_metrics(metrics, "eval") == {"eval/pass@1/all": 0.5,
                                             "eval/pass@1/explain": 1.0, "eval/n": 60.0}
    assert mlflow_key("eval/pass@1/all") == "eval/pass_at_1/all"
    assert mlflow_key("a:b?c") == "a_b_c"
    assert train_values({"loss": 2.0, "train_loss": 1.5, "train_runtime": 3, "epoch": 1}) == {
        "train/loss": 2.0, "train/mean_loss": 1.5, "train/runtime": 3.0, "train/epoch": 1.0}


def test_eval_metrics_go_to_tensorboard_when_given_a_folder(clean_env, tmp_path):
    from test_train import _tensorboard_scalars

    told = log_eval_metrics("run-1", {"pass@1": {"all": 0.25}}, "eval_post",
                            tensorboard_dir=tmp_path / "tb", step=3)
    assert told == {"run_name": "run-1", "tensorboard": {"logdir": "tb"}}
    assert _tensorboard_scalars(tmp_path / "tb") == {"eval_post/pass@1/all": [(3, 0.25)]}


class FakeWandbRun:
    """Records what trackb asks of a wandb Run."""

    def __init__(self, **init):
        self.init = init
        self.id = init["id"]
        self.config: dict = {}
        self.axes: dict[str, str | None] = {}
        self.rows: list[dict] = []
        self.finished = False

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, row):
        self.rows.append(dict(row))

    def finish(self):
        self.finished = True


class _FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        assert allow_val_change  # a resumed run may see a changed config
        super().update(values)


@pytest.fixture
def fake_wandb(monkeypatch):
    import trl.trainer.sft_trainer  # noqa: F401 - imported before wandb seems installed

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", loader=None)
    module.runs = []

    def init(**kwargs):
        run = FakeWandbRun(**kwargs)
        run.config = _FakeConfig()
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_train_and_eval_log_to_the_same_mlflow_and_wandb_run(tiny_model_dir, tmp_path,
                                                             clean_env, fake_wandb):
    from mlflow import MlflowClient
    from test_train import make_rows, write_jsonl

    from trackb_core.store import open_store
    from trackb_core.train import TrainConfig, run

    uri = (tmp_path / "mlruns").as_uri()
    for name, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "trackb-test",
                        # MLflow 3 refuses a file store unless told it is meant.
                        "MLFLOW_ALLOW_FILE_STORE": "true",
                        "WANDB_PROJECT": "trackb", "WANDB_MODE": "offline",
                        "TRACKB_RUN_ID": "tracked-run"}.items():
        clean_env.setenv(name, value)
    write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=1.0,
                         batch_size=4, effective_batch=4, save_steps=0)
    manifest = run(config, open_store(str(tmp_path / "train")))

    told = manifest["tracking"]
    assert told["run_name"] == "tracked-run"
    assert told["wandb"] == {"project": "trackb", "run_id": "tracked-run", "mode": "offline"}
    assert told["mlflow"]["experiment"] == "trackb-test"
    client = MlflowClient(tracking_uri=uri)
    mlflow_run = client.get_run(told["mlflow"]["run_id"])
    assert mlflow_run.info.run_name == "tracked-run"
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.lora_r"] == "16"
    assert json.loads(mlflow_run.data.params["train.target_modules"]) == config.target_modules
    losses = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    # metrics.json keeps 6 decimals; rounding both sides again would flip at a boundary
    assert [m.step for m in losses] == [p["step"] for p in metrics["train_loss"]]
    assert [m.value for m in losses] == pytest.approx(
        [p["loss"] for p in metrics["train_loss"]], abs=1e-6)

    (trained,) = fake_wandb.runs
    assert trained.init == {"project": "trackb", "entity": None, "id": "tracked-run",
                            "name": "tracked-run", "resume": "allow", "mode": "offline"}
    assert trained.config["train.learning_rate"] == config.learning_rate
    assert trained.axes == {"train/step": None, "train/*": "train/step"}
    steps = [row["train/step"] for row in trained.rows if "train/loss" in row]
    assert steps == [1, 2] and trained.finished

    # Eval, later, in another process: its metrics join the same runs.
    eval_told = log_eval_metrics("tracked-run", {"pass@1": {"all": 0.5}, "backend": "hf"},
                                 "eval_post")
    assert eval_told["mlflow"]["run_id"] == mlflow_run.info.run_id
    after = client.get_run(mlflow_run.info.run_id)
    assert after.data.metrics["eval_post/pass_at_1/all"] == 0.5
    assert "train/loss" in after.data.metrics
    _, evaluated = fake_wandb.runs
    assert evaluated.init["id"] == "tracked-run" and evaluated.init["resume"] == "allow"
    assert evaluated.rows == [{"eval_post/pass@1/all": 0.5, "eval_post/step": 0}]
    assert evaluated.finished
    # One MLflow run per run name, not one per stage.
    experiment = client.get_experiment_by_name("trackb-test")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_configured_tracker_that_is_missing_stops_training_before_it_starts(
        tiny_model_dir, tmp_path, clean_env):
    from test_train import make_rows, write_jsonl

    from trackb_core.store import open_store
    from trackb_core.train import TrainConfig, run

    clean_env.setenv("WANDB_PROJECT", "trackb")
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setitem(sys.modules, "wandb", None)
    write_jsonl(tmp_path / "train.jsonl", make_rows(2))
    with pytest.raises(ConfigError, match="pip install wandb"):
        run(TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir)),
            open_store(str(tmp_path / "out")))
    assert not Path(tmp_path / "out" / "manifest.json").exists()


def test_only_this_module_imports_the_tracking_packages():
    root = Path(tracking.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "tracking.py":
            continue
        text = path.read_text()
        for package in ("mlflow", "wandb", "tensorboard"):
            assert f"import {package}" not in text and f"from {package}" not in text, (
                path, package)
