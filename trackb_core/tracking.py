"""Experiment tracking: TensorBoard always, MLflow and Weights & Biases when configured.

The one module that imports tensorboard, mlflow or wandb (always inside a function, as
mlflow alone takes seconds to import). Configuration and credentials come from the
environment only, never from a config file or the command line:

* TensorBoard: always on; the train stage writes event files to ``OUT/tensorboard/``.
* MLflow: on when ``MLFLOW_TRACKING_URI`` is set; experiment ``MLFLOW_EXPERIMENT_NAME``
  (default ``trackb``); credentials as MLflow reads them (``MLFLOW_TRACKING_TOKEN``,
  ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).
* Weights & Biases: on when ``WANDB_PROJECT`` is set together with ``WANDB_API_KEY``
  or ``WANDB_MODE=offline`` (``WANDB_ENTITY`` and ``WANDB_DIR`` as wandb reads them).

One tracking run per run name, which is the trackb run id (:func:`run_name`): MLflow
finds the newest run of that name in the experiment or creates it, and W&B derives the
run's id from the name (:func:`wandb_run_id`) and resumes it if it exists. So a train
run resumed after a kill continues its tracking run, and :func:`log_eval_metrics`
adds eval's metrics to the run that trained the adapter.

A backend that is configured but not installed is a ConfigError with the install
command, raised by :func:`check_configured` before any work is done.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trackb_core.errors import ConfigError

RUN_ID_ENV = "TRACKB_RUN_ID"
DEFAULT_EXPERIMENT = "trackb"
# The folder under a stage's output holding its TensorBoard event files.
TENSORBOARD = "tensorboard"
# transformers' end-of-training log keys, renamed under the "train/" prefix: its mean
# loss must not land on the per-step loss curve.
_TRAIN_KEYS = {"train_loss": "mean_loss"}
_INSTALL = {"tensorboard": "pip install tensorboard", "mlflow": "pip install mlflow-skinny",
            "wandb": "pip install wandb"}


def run_name(configured: str | None, fallback: str,
             environ: Mapping[str, str] | None = None) -> str:
    """The tracking run's name: ``configured``, else ``$TRACKB_RUN_ID``, else ``fallback``."""
    env = os.environ if environ is None else environ
    return configured or env.get(RUN_ID_ENV) or fallback


def _installed(module: str) -> bool:
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module object without a spec
        return False


def check_configured(environ: Mapping[str, str] | None = None) -> list[str]:
    """The backends the environment turns on, TensorBoard first.

    Raises ConfigError if one of them is not installed, or if ``WANDB_PROJECT`` is set
    without ``WANDB_API_KEY`` or ``WANDB_MODE=offline`` (wandb would stop to ask for a
    login).
    """
    env = os.environ if environ is None else environ
    backends = ["tensorboard"]
    if env.get("MLFLOW_TRACKING_URI"):
        backends.append("mlflow")
    mode = env.get("WANDB_MODE", "").lower()
    if env.get("WANDB_PROJECT") and mode != "disabled":
        if not env.get("WANDB_API_KEY") and mode != "offline":
            raise ConfigError("WANDB_PROJECT is set but neither WANDB_API_KEY nor "
                              "WANDB_MODE=offline: set one of them, or unset WANDB_PROJECT")
        backends.append("wandb")
    for backend in backends:
        if not _installed(backend):
            raise ConfigError(f"experiment tracking with {backend} is configured by the "
                              f"environment but {backend} is not installed: "
                              f"{_INSTALL[backend]}")
    return backends


def wandb_run_id(name: str) -> str:
    """The W&B run id of run ``name``: the name itself where W&B allows it (letters,
    digits, '-' and '_', at most 64 characters), else a readable prefix and a hash."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return name
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[-48:]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}".lstrip("-")


def flat_metrics(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Numeric leaves of ``values`` (nested mappings joined by '/') under ``prefix/``.

    Booleans, strings and None are left out: they are not metrics.
    """
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class _TensorBoard:
    name = TENSORBOARD

    def __init__(self, logdir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"TensorBoard logs need tensorboard: {_INSTALL['tensorboard']}"
                              ) from exc
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def describe(self) -> dict[str, Any]:
        return {"logdir": self.logdir.name}

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, name: str, params: Mapping[str, Any], env: Mapping[str, str]):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        self.experiment = env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(self.experiment))
        runs = self.client.search_runs([experiment_id], filter_string=_run_name_filter(name),
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            known = set(runs[0].data.params)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            known = set()
        # MLflow params cannot change once logged: only new ones are added (the manifest
        # holds each stage's full config).
        fresh = [Param(k, v) for k, v in _param_strings(params).items() if k not in known]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def describe(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "run_id": self.run_id}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_key(key: str) -> str:
    """``key`` in the characters MLflow allows in a metric name ("pass@1" ->
    "pass_at_1"); TensorBoard and W&B keep the original."""
    key = re.sub(r"[^/\w.\- ]", "_", key.replace("@", "_at_"))
    return re.sub(r"/{2,}", "/", key).strip("/") or "_"


def _run_name_filter(name: str) -> str:
    if "'" not in name:
        return f"attributes.run_name = '{name}'"
    if '"' not in name:
        return f'attributes.run_name = "{name}"'
    raise ConfigError(f"run name {name!r} has both quote characters; MLflow cannot search it")


def _param_strings(params: Mapping[str, Any]) -> dict[str, str]:
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for key, value in params.items()}


class _Wandb:
    name = "wandb"

    def __init__(self, name: str, params: Mapping[str, Any], env: Mapping[str, str]):
        import wandb

        self.project = env["WANDB_PROJECT"]
        self.mode = "offline" if env.get("WANDB_MODE", "").lower() == "offline" else "online"
        self.run = wandb.init(project=self.project, entity=env.get("WANDB_ENTITY") or None,
                              id=wandb_run_id(name), name=name, resume="allow", mode=self.mode)
        if params:
            self.run.config.update(dict(params), allow_val_change=True)
        self.axes: set[str] = set()

    def log(self, values: dict[str, float], step: int) -> None:
        # Each prefix ("train", "eval") gets its own step axis: W&B's own step only grows,
        # and eval's metrics come after training's last step.
        row = dict(values)
        for prefix in sorted({key.split("/", 1)[0] for key in values}):
            axis = f"{prefix}/step"
            if axis not in self.axes:
                self.run.define_metric(axis)
                self.run.define_metric(f"{prefix}/*", step_metric=axis)
                self.axes.add(axis)
            row[axis] = step
        self.run.log(row)

    def describe(self) -> dict[str, Any]:
        return {"project": self.project, "run_id": self.run.id, "mode": self.mode}

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The open backends of one tracking run; log to all of them at once."""

    def __init__(self, name: str, backends: list[Any]):
        self.name = name
        self.backends = backends

    def log(self, values: dict[str, float], step: int) -> None:
        """Log numeric ``values`` (already prefixed) at ``step`` to every backend."""
        if values:
            for backend in self.backends:
                backend.log(values, step)

    def describe(self) -> dict[str, Any]:
        """For the manifest: the run name and, per backend, where its data went (no URIs:
        a tracking URI may carry credentials)."""
        return {"run_name": self.name, **{b.name: b.describe() for b in self.backends}}

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_tracker(name: str, *, tensorboard_dir: Path | None,
                 params: Mapping[str, Any] | None = None,
                 environ: Mapping[str, str] | None = None) -> Tracker:
    """Open (or resume) tracking run ``name`` on every configured backend; TensorBoard
    writes to ``tensorboard_dir`` (None: no TensorBoard). ``params`` (a config) are
    recorded once per run.

    Raises ConfigError (see :func:`check_configured`); backend errors (an unreachable
    MLflow server) propagate.
    """
    env = os.environ if environ is None else environ
    wanted = check_configured(env)
    backends: list[Any] = []
    try:
        if tensorboard_dir is not None:
            backends.append(_TensorBoard(tensorboard_dir))
        if "mlflow" in wanted:
            backends.append(_MLflow(name, params or {}, env))
        if "wandb" in wanted:
            backends.append(_Wandb(name, params or {}, env))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return Tracker(name, backends)


def train_values(logs: Mapping[str, Any]) -> dict[str, float]:
    """A transformers training log as ``train/...`` metrics (``train_loss``, the mean
    over the run, becomes ``train/mean_loss``; other ``train_`` prefixes are dropped)."""
    renamed = {_TRAIN_KEYS.get(key, key.removeprefix("train_")): value
               for key, value in logs.items()}
    return flat_metrics(renamed, "train")


def training_callback(name: str, *, tensorboard_dir: Path,
                      params: Mapping[str, Any] | None = None,
                      environ: Mapping[str, str] | None = None):
    """A TrainerCallback logging training to tracking run ``name`` from the main process.

    The backends open when training begins. A run resumed from a checkpoint first
    writes the restored log history to TensorBoard, so ``tensorboard_dir`` covers the
    whole run (MLflow and W&B already hold the steps logged before the interruption).
    The open tracker is the callback's ``tracker``: :meth:`Tracker.describe` says where
    the logs went. Raises ConfigError now if a configured backend is not installed.
    """
    from transformers import TrainerCallback

    check_configured(environ)

    class TrackTraining(TrainerCallback):
        tracker: Tracker | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.tracker = open_tracker(name, tensorboard_dir=tensorboard_dir, params=params,
                                        environ=environ)
            if state.global_step:
                for backend in self.tracker.backends:
                    if isinstance(backend, _TensorBoard):
                        for entry in state.log_history:
                            backend.log(train_values(entry), int(entry.get("step", 0)))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.tracker is not None:
                self.tracker.log(train_values(logs or {}), state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.tracker is not None:
                self.tracker.close()

    return TrackTraining()


def log_eval_metrics(run_name: str, metrics: Mapping[str, Any], prefix: str = "eval", *,
                     tensorboard_dir: Path | None = None, step: int = 0,
                     environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Log eval's ``metrics`` (numeric leaves of a nested mapping, keys joined by '/',
    under ``prefix/``) to tracking run ``run_name``: the MLflow and W&B runs the train
    stage made under that name (created if there are none), and TensorBoard event files
    in ``tensorboard_dir`` if given.

    Returns :meth:`Tracker.describe` (which backends got them). Raises ConfigError (see
    :func:`check_configured`); backend errors propagate.
    """
    tracker = open_tracker(run_name, tensorboard_dir=tensorboard_dir, environ=environ)
    try:
        tracker.log(flat_metrics(metrics, prefix), step)
    finally:
        tracker.close()
    return tracker.describe()
