"""``trackb run-all``: every stage in order, on one machine, resumable by run id.

The pipeline only wires stages together: it fills each stage config's input fields
with the upstream stage's output folder and calls the stage's ``run``. A stage whose
manifest already records the same config and input hashes is skipped as cached.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from trackb_core.compare import CompareConfig
from trackb_core.config import StageConfig
from trackb_core.dataset import DatasetConfig
from trackb_core.errors import ConfigError
from trackb_core.evaluate import EvalConfig
from trackb_core.extract import ExtractConfig
from trackb_core.generate import GenerateConfig
from trackb_core.k8s.settings import KubernetesConfig
from trackb_core.stage import MANIFEST, cached_manifest, say
from trackb_core.store import Store, open_store
from trackb_core.tinymodel import TinyModelConfig
from trackb_core.train import TrainConfig

RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TINY = "tiny"


class PipelineConfig(StageConfig):
    """The whole pipeline. Each section holds that stage's options; the pipeline wires
    the input fields (corpus, tasks, responses, dataset, model, adapter) itself."""

    run_id: str | None = Field(None, description="Run id; the run lives in <store>/runs/<run_id>/. "
                               "Default: the current UTC time (YYYYMMDD-HHMMSS).")
    store: str = Field(".", description="Store root: a local path, file:// or s3://bucket/prefix.")
    backend: Literal["local", "k8s"] = Field(
        "local", description="Where stages run: local = this machine, one after another; "
        "k8s = Kubernetes Jobs (settings in 'kubernetes', cluster from kubeconfig or the "
        "pod's service account).")
    corpus: str = Field("pypi:verl==0.9.1", description="The corpus: a folder of .py files or "
                        "pypi:NAME==VERSION.")
    model: str = Field(TINY, description="Base model to fine-tune and evaluate: a hub id, a "
                       "local folder or store URI, or 'tiny' to build a tiny model from the "
                       "corpus inside the run (CPU demo).")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="extract options.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig,
                                     description="generate options.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig,
                                   description="build-dataset options.")
    tiny_model: TinyModelConfig = Field(default_factory=TinyModelConfig,
                                        description="tiny-model options (model: tiny only).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="train options.")
    eval: EvalConfig = Field(default_factory=EvalConfig,
                             description="eval options, used for baseline and post-SFT alike.")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig,
                                         description="Cluster settings of the k8s backend "
                                         "and of trackb render (one schema with the Helm chart).")

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, value: str | None) -> str | None:
        if value is not None and not RUN_ID.match(value):
            raise ValueError("must be 1-63 lowercase letters, digits or '-', starting and "
                             "ending with a letter or digit")
        return value


def _wired(section: StageConfig, **inputs: Any) -> StageConfig:
    """``section`` with its input fields set by the pipeline.

    Raises ConfigError if the user set one of those fields: it would be ignored.
    """
    input_names = {
        name for name, info in type(section).model_fields.items()
        if isinstance(info.json_schema_extra, dict) and "input" in info.json_schema_extra
    }
    fields = type(section).model_fields
    clash = sorted(
        name for name in section.model_fields_set & input_names & set(inputs)
        if getattr(section, name) != fields[name].get_default(call_default_factory=True)
    )
    if clash:
        raise ConfigError(f"{type(section).__name__}: {', '.join(clash)} is wired by the "
                          "pipeline; set the top-level 'corpus' or 'model' instead")
    return section.model_copy(update=inputs)


def plan(config: PipelineConfig, run: Store) -> list[tuple[str, str, StageConfig]]:
    """``(folder, module, config)`` for every stage, in the order they run."""
    uri = lambda folder: run.child(folder).uri  # noqa: E731
    stages: list[tuple[str, str, StageConfig]] = [
        ("extract", "extract", _wired(config.extract, corpus=config.corpus)),
        ("generate", "generate", _wired(config.generate, tasks=uri("extract"))),
        ("build-dataset", "dataset", _wired(config.dataset, responses=uri("generate"))),
    ]
    model = config.model
    if model == TINY:
        stages.append(("tiny-model", "tinymodel", _wired(config.tiny_model, corpus=config.corpus)))
        model = uri("tiny-model")
    dataset = uri("build-dataset")
    stages += [
        ("train", "train", _wired(config.train, dataset=dataset, model=model)),
        ("eval-baseline", "evaluate",
         _wired(config.eval, dataset=dataset, model=model, adapter=None).model_copy(
             update={"tag": "baseline"})),
        ("eval-post", "evaluate",
         _wired(config.eval, dataset=dataset, model=model, adapter=uri("train")).model_copy(
             update={"tag": "post_sft"})),
        ("compare", "compare", CompareConfig(baseline=uri("eval-baseline"), post=uri("eval-post"))),
    ]
    return stages


def run_pipeline(config: PipelineConfig,
                 runner: Callable[[str, StageConfig, Store], dict] | None = None) -> str:
    """Run every stage of ``config`` not already done; returns the report's URI.

    Raises whatever the failing stage raises (a TrackbError); the stages before it
    keep their outputs and manifests, so rerunning the same run id resumes there.
    """
    import importlib

    run_id = config.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if config.backend == "k8s":
        from trackb_core.k8s.launcher import run_on_kubernetes

        return run_on_kubernetes(config, run_id)
    root = open_store(config.store)
    run = root.child(f"runs/{run_id}")
    run.check_writable()
    say("run-all", f"run {run_id} in {run.uri}")
    run.put_text("pipeline.yaml", _dump_yaml(config.model_copy(update={"run_id": run_id})))

    def default_runner(module: str, stage_config: StageConfig, out: Store) -> dict:
        return importlib.import_module(f"trackb_core.{module}").run(stage_config, out)

    runner = runner or default_runner
    started = time.perf_counter()
    for folder, module, stage_config in plan(config, run):
        out = run.child(folder)
        if cached_manifest(stage_config, out) is not None:
            say(folder, "cached: manifest matches this config and these inputs; skipped")
            continue
        if out.exists(MANIFEST):
            say(folder, "config or inputs changed since its last run: running again")
        else:
            say(folder, "running")
        manifest = runner(module, stage_config, out)
        say(folder, f"done in {manifest['timings']['total_seconds']:.1f}s")
    say("run-all", f"finished in {time.perf_counter() - started:.1f}s")
    return run.child("compare").child("report.md").uri


def _dump_yaml(config: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
