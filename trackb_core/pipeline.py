"""``trackb run-all``: every step of a run in order, wired from the one step table.

The pipeline only wires steps together: for each row of :data:`trackb_core.stages.STEPS`
it takes the step's section of :class:`PipelineConfig`, fills its input fields with the
outputs of earlier steps (:func:`plan`), and, on this machine, calls the step's
command (:func:`run_pipeline`). A step whose manifest already records the same config
and input hashes is skipped as cached. The CLI chooses where the steps run: here, or
as Kubernetes Jobs (:mod:`trackb_core.k8s.launcher`, from the same :func:`plan`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field, create_model, field_validator

from trackb_core.config import StageConfig
from trackb_core.corpus import CORPUS_HELP, CorpusSetting
from trackb_core.errors import ConfigError
from trackb_core.k8s.settings import KubernetesConfig
from trackb_core.stage import MANIFEST, cached_manifest, say
from trackb_core.stages import STEPS, BaseModelRef, Input, Output, Setting, Step, sections
from trackb_core.store import Store, open_store

RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TINY = "tiny"


class PipelineSettings(StageConfig):
    """The settings of a whole run, besides each step's options."""

    run_id: str | None = Field(None, description="Run id; the run lives in <store>/runs/<run_id>/. "
                               "Default: the current UTC time (YYYYMMDD-HHMMSS).")
    store: str = Field(".", description="Store root: a local path, file:// or s3://bucket/prefix.")
    backend: Literal["local", "k8s"] = Field(
        "local", description="Where stages run: local = this machine, one after another; "
        "k8s = Kubernetes Jobs (settings in 'kubernetes', cluster from kubeconfig or the "
        "pod's service account).")
    corpus: CorpusSetting = Field("pypi:verl==0.9.1", description=CORPUS_HELP)
    model: str = Field(TINY, description="Base model to fine-tune and evaluate: a hub id, a "
                       "local folder or store URI, or 'tiny' to build a tiny model from the "
                       "corpus inside the run (CPU demo).")

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, value: str | None) -> str | None:
        if value is not None and not RUN_ID.match(value):
            raise ValueError("must be 1-63 lowercase letters, digits or '-', starting and "
                             "ending with a letter or digit")
        return value


def _section_fields() -> dict[str, Any]:
    """One field per section of the step table (its command's config), then kubernetes."""
    fields: dict[str, Any] = {}
    for section, steps in sections().items():
        _, cls = steps[0].cli.load()
        folders = " and ".join(s.folder for s in steps)
        note = " (the same for each)" if len(steps) > 1 else ""
        if any(s.when == "tiny_model" for s in steps):
            note += " (model: tiny only)"
        fields[section] = (cls, Field(default_factory=cls,
                                      description=f"{folders} options{note}."))
    fields["kubernetes"] = (KubernetesConfig, Field(
        default_factory=KubernetesConfig, description="Cluster settings of the k8s backend "
        "and of trackb render (one schema with the Helm chart)."))
    return fields


PipelineConfig = create_model(
    "PipelineConfig", __base__=PipelineSettings, **_section_fields(),
    __doc__="The whole pipeline. Each section holds its steps' options (the step table, "
            "trackb_core.stages.STEPS); the pipeline wires the input fields (corpus, tasks, "
            "responses, dataset, model, adapter) itself.")


def model_is_path(model: str) -> bool:
    """Whether ``model`` names a folder (or a non-s3 URI) rather than a hub id "org/name"
    or an s3:// store URI; the same reading as trackb_core.train.looks_like_path, without
    looking at this machine's disk."""
    if model.startswith("s3://"):
        return False
    return "://" in model or model.startswith(("/", ".", "~")) or model.count("/") != 1


def is_hub_model(model: str) -> bool:
    """Whether ``model`` is a hub id "org/name" (not 'tiny', a folder or a store URI)."""
    return model != TINY and not model.startswith("s3://") and not model_is_path(model)


def warms_cache(config: PipelineSettings) -> bool:
    """Whether the run starts with the warm-cache step: the model is a hub id and the
    cluster's model cache is a volume that outlives a pod (kubernetes.cache.pvc). Then
    the steps that load the model wait for it and load it offline from that cache."""
    k8s = getattr(config, "kubernetes", None)
    return bool(k8s is not None and k8s.cache.pvc) and is_hub_model(config.model)


def new_run_id(config: PipelineSettings) -> str:
    """``config.run_id``, or the current UTC time as ``YYYYMMDD-HHMMSS``."""
    return config.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def steps_for(config: PipelineSettings) -> list[Step]:
    """The steps of ``config``'s run, in run order (tiny-model only for model 'tiny',
    warm-cache only when :func:`warms_cache`)."""
    runs = {"always": True, "tiny_model": config.model == TINY,
            "model_cache": warms_cache(config)}
    return [s for s in STEPS if runs[s.when]]


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


def _resolve(ref: Input, config: PipelineSettings, run: Store) -> str | None:
    if isinstance(ref, Output):
        return run.child(ref.step).uri
    if isinstance(ref, Setting):
        return getattr(config, ref.name)
    if isinstance(ref, BaseModelRef):
        return run.child(ref.builder).uri if config.model == TINY else config.model
    return None


def step_config(step: Step, config: PipelineSettings, run: Store) -> StageConfig:
    """``step``'s config in the run at ``run``: its section (or its command's defaults)
    with the inputs wired and the step's fixed fields set. A config with a ``run_name``
    field (the experiment-tracking run) left empty gets the run id: the name of the run's
    folder, ``runs/<run_id>``. Raises ConfigError (see :func:`_wired`)."""
    if step.section is not None:
        section = getattr(config, step.section)
    else:
        section = step.cli.load()[1]()
    if getattr(section, "partition", None) is not None:
        # One part alone would never be merged, and the step would run again each time.
        raise ConfigError(f"{step.section}.partition is set by the run for each part of "
                          f"the step; set {step.section}.partitions instead")
    inputs = {name: _resolve(ref, config, run) for name, ref in step.inputs.items()}
    wired = _wired(section, **inputs).model_copy(update=dict(step.fixed))
    if "run_name" in type(wired).model_fields and wired.run_name is None:
        wired = wired.model_copy(update={"run_name": run.uri.rstrip("/").rsplit("/", 1)[-1]})
    return wired


def plan(config: PipelineSettings, run: Store) -> list[tuple[Step, StageConfig]]:
    """``(step, config)`` for every step of the run at ``run``, in the order they run.

    Raises ConfigError if a section sets a field the pipeline wires.
    """
    return [(step, step_config(step, config, run)) for step in steps_for(config)]


def dependencies(config: PipelineSettings) -> dict[str, list[str]]:
    """For each step of the run, the steps whose outputs it reads, in run order."""
    order = [s.folder for s in steps_for(config)]
    found: dict[str, list[str]] = {}
    for step in steps_for(config):
        needs = set()
        for ref in step.inputs.values():
            if isinstance(ref, Output):
                needs.add(ref.step)
            elif isinstance(ref, BaseModelRef) and config.model == TINY:
                needs.add(ref.builder)
            elif isinstance(ref, BaseModelRef) and ref.warmer in order:
                needs.add(ref.warmer)  # the model is read from the cache it fills
        found[step.folder] = sorted(needs, key=order.index)
    return found


def run_step(step: Step, stage_config: StageConfig, out: Store) -> dict:
    """Run one step here: its command's runner; returns the manifest."""
    module, _ = step.cli.load()
    return getattr(module, step.cli.runner)(stage_config, out)


def run_pipeline(config: PipelineSettings,
                 runner: Callable[[Step, StageConfig, Store], dict] = run_step) -> str:
    """Run every step of ``config`` not already done, on this machine, one after
    another; returns the report's URI.

    Raises whatever the failing step raises (a TrackbError); the steps before it keep
    their outputs and manifests, so rerunning the same run id resumes there.
    """
    run_id = new_run_id(config)
    root = open_store(config.store)
    run = root.child(f"runs/{run_id}")
    run.check_writable()
    say("run-all", f"run {run_id} in {run.uri}")
    run.put_text("pipeline.yaml", dump_yaml(config.model_copy(update={"run_id": run_id})))

    started = time.perf_counter()
    for step, stage_config in plan(config, run):
        out = run.child(step.folder)
        if cached_manifest(stage_config, out) is not None:
            say(step.folder, "cached: manifest matches this config and these inputs; skipped")
            continue
        if out.exists(MANIFEST):
            say(step.folder, "config or inputs changed since its last run: running again")
        else:
            say(step.folder, "running")
        manifest = runner(step, stage_config, out)
        say(step.folder, f"done in {manifest['timings']['total_seconds']:.1f}s")
    say("run-all", f"finished in {time.perf_counter() - started:.1f}s")
    return report_uri(run)


def report_uri(run: Store) -> str:
    """Where a run's report is: ``report.md`` of its last step (compare)."""
    return run.child(STEPS[-1].folder).child("report.md").uri


def dump_yaml(config: PipelineSettings) -> str:
    """The pipeline config as YAML (every field, in declaration order)."""
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
