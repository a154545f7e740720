"""The one table of commands and pipeline steps: every row is wired everywhere it must be."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from trackb_core.k8s.settings import KubernetesConfig
from trackb_core.pipeline import PipelineConfig, dependencies, plan, steps_for
from trackb_core.stages import COMMANDS, STEPS, Output, command, resource_keys, sections
from trackb_core.store import LocalStore

ROOT = Path(__file__).parents[1]
SCHEMA = json.loads((ROOT / "helm" / "trackb" / "values.schema.json").read_text())
RENDERED = ROOT / "k8s" / "rendered"
# A hub model and a cache PVC: the runs that start with warm-cache.
WARMED = PipelineConfig.model_validate({"model": "Qwen/Qwen2.5-Coder-1.5B", "kubernetes": {
    "cache": {"pvc": "model-cache"}}})


def resolve(ref: dict) -> dict:
    """A values-schema node with its ``$ref`` followed."""
    while "$ref" in ref:
        ref = SCHEMA["$defs"][ref["$ref"].rsplit("/", 1)[-1]]
    return ref


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_its_job_entry_running_that_command(cmd):
    assert importlib.util.find_spec(cmd.job_module) is not None, cmd.job_module
    source = (ROOT / (cmd.job_module.replace(".", "/") + ".py")).read_text()
    assert f'run_command("{cmd.name}")' in source
    module, config_class = cmd.load()
    assert callable(getattr(module, cmd.runner))
    assert all(field in config_class.model_fields for field in cmd.positional)


@pytest.mark.parametrize("row", STEPS, ids=lambda s: s.folder)
def test_every_step_has_a_job_entry_manifest_resources_and_values_schema_entry(row):
    cmd = command(row.command)
    assert importlib.util.find_spec(cmd.job_module) is not None
    if row.when == "model_cache":
        # No checked-in config has a hub model and a cache PVC: the builder makes its Job.
        from trackb_core.k8s.jobspec import build_stage

        objects = build_stage(row.folder, WARMED, "demo")
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "Job"] == [
            f"trackb-demo-{row.folder}"]
    else:
        # The checked-in manifests (trackb render) hold the step's Job.
        rendered = RENDERED / "demo" / f"{row.folder}.yaml"
        assert rendered.is_file(), rendered
        assert f"name: trackb-demo-{row.folder}\n" in rendered.read_text()
    # Its resources and deadline keys exist in the cluster settings...
    k8s = KubernetesConfig()
    assert row.resources in type(k8s.resources).model_fields
    assert row.resources in type(k8s.job.deadlines).model_fields
    # ...and in the Helm chart's values schema, as does its config section.
    kubernetes = resolve(SCHEMA["properties"]["kubernetes"])["properties"]
    resources = resolve(kubernetes["resources"])["properties"]
    deadlines = resolve(resolve(kubernetes["job"])["properties"]["deadlines"])["properties"]
    assert row.resources in resources and row.resources in deadlines
    if row.section is not None:
        assert row.section in SCHEMA["properties"]["pipeline"]["properties"]
        assert PipelineConfig.model_fields[row.section].annotation is cmd.load()[1]
    # Every input it names is a field of its command's config, wired from an earlier step.
    fields = cmd.load()[1].model_fields
    earlier = [s.folder for s in STEPS[: STEPS.index(row)]]
    for name, ref in row.inputs.items():
        assert name in fields, (row.folder, name)
        if isinstance(ref, Output):
            assert ref.step in earlier, (row.folder, ref.step)


def test_the_tables_steps_are_the_folders_plan_produces(tmp_path):
    run = LocalStore(tmp_path).child("runs/x")
    tiny = PipelineConfig(model="tiny")
    real = PipelineConfig(model="Qwen/Qwen2.5-Coder-1.5B")
    assert [row.folder for row, _ in plan(tiny, run)] == \
        [row.folder for row in STEPS if row.when in ("always", "tiny_model")]
    assert [row.folder for row, _ in plan(real, run)] == \
        [row.folder for row in STEPS if row.when == "always"]
    assert [row.folder for row, _ in plan(WARMED, run)] == \
        [row.folder for row in STEPS if row.when in ("always", "model_cache")]
    for config in (tiny, real, WARMED):
        assert [row.folder for row in steps_for(config)] == list(dependencies(config))
    for row, config in plan(tiny, run):
        assert type(config) is row.cli.load()[1]
        for field, value in row.fixed.items():
            assert getattr(config, field) == value


def test_run_all_names_the_tracking_run_after_the_run_id(tmp_path):
    from trackb_core.config import load_yaml

    run = LocalStore(tmp_path).child("runs/demo-7")
    configs = {row.folder: config for row, config in plan(PipelineConfig(model="tiny"), run)}
    assert configs["train"].run_name == "demo-7"
    chosen = PipelineConfig.model_validate({"model": "tiny", "train": {"run_name": "mine"}})
    assert {row.folder: c for row, c in plan(chosen, run)}["train"].run_name == "mine"
    # The demo config sets the effective batch, not the old grad_accum.
    demo = PipelineConfig.model_validate(load_yaml(ROOT / "jobs/configs/demo.yaml"))
    assert (demo.train.batch_size, demo.train.effective_batch) == (4, 16)


def test_sections_resources_and_folders_are_consistent():
    folders = [row.folder for row in STEPS]
    assert len(set(folders)) == len(folders)
    keys = resource_keys()  # raises if two steps share a key with different sizing
    assert set(keys) == {row.resources for row in STEPS}
    assert set(sections()) <= set(PipelineConfig.model_fields)
    names = [cmd.name for cmd in COMMANDS]
    assert len(set(names)) == len(names)
    assert {row.command for row in STEPS} <= set(names)
    with pytest.raises(KeyError):
        command("nope")


@pytest.mark.parametrize(("model", "pvc", "warms"), [
    ("Qwen/Qwen2.5-Coder-1.5B", "model-cache", True),
    ("Qwen/Qwen2.5-Coder-1.5B", None, False),  # an emptyDir cache ends with the pod
    ("s3://bucket/models/qwen", "model-cache", False),  # read from the store
    ("/cache/models/qwen", "model-cache", False),  # already a folder on the cache
    ("tiny", "model-cache", False),  # built in the run
])
def test_a_run_warms_the_cache_only_for_a_hub_model_and_a_cache_pvc(model, pvc, warms):
    config = PipelineConfig.model_validate({"model": model, "kubernetes": {"cache": {
        "pvc": pvc}}})
    assert ("warm-cache" in [row.folder for row in steps_for(config)]) is warms


def test_the_steps_that_load_the_model_wait_for_the_cache_to_be_warm():
    needs = dependencies(WARMED)
    assert needs["warm-cache"] == []  # it starts with the run
    for row in steps_for(WARMED):
        assert ("warm-cache" in needs[row.folder]) is row.loads_model, row.folder
