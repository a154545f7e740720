"""The chart as a whole: the helm fetch, lint, rendering, schema validation, values docs
and the single schema shared with trackb's pydantic models."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from . import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    ROOT,
    find,
    helm_binary,
    render,
    run_helm,
    validate_for_kubernetes,
)

sys.path.insert(0, str(ROOT / "scripts"))
import fetch_helm  # noqa: E402
import gen_values_schema  # noqa: E402

sys.path.pop(0)

CI_IDS = [p.stem for p in CI_VALUES]


def _settings_or_skip():
    try:
        from trackb_core.k8s.settings import KubernetesConfig
    except ImportError as exc:
        pytest.skip(f"trackb_core.k8s.settings is not there yet: {exc}")
    return KubernetesConfig


# ------------------------------------------------------------------ the helm binary


def test_fetch_is_idempotent_and_gives_a_working_helm():
    helm = helm_binary()  # fetches on first use
    bin_dir = fetch_helm.ensure_tools()
    before = {p.name: p.stat().st_mtime_ns for p in bin_dir.iterdir()}
    started = time.perf_counter()
    assert fetch_helm.ensure_tools() == bin_dir
    assert time.perf_counter() - started < 5, "a second fetch must not download again"
    assert {p.name: p.stat().st_mtime_ns for p in bin_dir.iterdir()} == before
    if Path(helm).parent == bin_dir:
        assert (bin_dir / "kubectl").exists()
    version = run_helm("version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v"), version.stderr


def test_ci_values_files_exist():
    assert {"default-values", "minio-values", "gpu-values"} <= set(CI_IDS)


# ------------------------------------------------------------------ lint and render


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=["chart-defaults", *CI_IDS])
def test_helm_lint_strict(values):
    args = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_rendered_object_validates_against_pinned_kubernetes_schemas(values):
    objects = render(values)
    assert objects, "helm template rendered nothing"
    validate_for_kubernetes(objects)


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_object_is_labelled_namespaced_and_named_within_63_chars(values):
    for obj in render(values):
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        if obj["kind"] != "PriorityClass":  # cluster-scoped
            assert meta["namespace"] == NAMESPACE
        labels = meta["labels"]
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"]
        assert all(len(str(v)) <= 63 for v in labels.values())


def test_long_names_are_truncated_to_63_chars_without_a_trailing_dash():
    long = "x" * 40 + "-" + "y" * 40
    objects = render(CHART / "ci" / "minio-values.yaml", sets=(f"fullnameOverride={long}",))
    for obj in objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and not name.endswith("-") and "--" not in name, name
    names = {o["kind"] + "/" + o["metadata"]["name"] for o in objects}
    assert len(names) == len(objects), "truncation made two objects share a name"


def test_defaults_render_no_launcher_and_no_minio():
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "Role", "RoleBinding", "ServiceAccount"]


@pytest.mark.parametrize(("sets", "message"), [
    (("launcher.enabled=true", "pipeline.store=/data"), "/pipeline/store"),
    (("launcher.enabled=true", "kubernetes.s3.store=/data"), "store"),
    (("minio.enabled=true", "kubernetes.s3.credentials_secret="), "credentials_secret"),
    (("minio.enabled=true", "minio.bucket=Bad_Bucket"), "bucket"),
    (("minio.image.tag=latest",), "tag"),
    (("launcher.runId=Not_A_Run_Id",), "runId"),
    (("nonsense=1",), "nonsense"),
    (("kubernetes.nonsense=1",), "nonsense"),
    (("kubernetes.images.pull_policy=Sometimes",), "pull_policy"),
    (("pipeline.train.nonsense=1",), "nonsense"),
])
def test_bad_values_fail_at_render_time_naming_the_key(sets, message):
    args = ["template", "demo", str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode != 0, f"{sets} rendered"
    assert message in result.stderr, result.stderr


def test_notes_say_what_to_do_next():
    result = run_helm("install", "demo", str(CHART), "--namespace", NAMESPACE,
                      "--dry-run=client", "--values", str(CHART / "ci" / "default-values.yaml"))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} get jobs -l trackb/run-id=demo -w" in notes
    assert "trackb status demo" in notes
    assert "s3://trackb-artifacts/team-a/runs/demo/compare/report.md" in notes
    minio = run_helm("install", "demo", str(CHART), "--namespace", NAMESPACE,
                     "--dry-run=client", "--values", str(CHART / "ci" / "minio-values.yaml"))
    minio_notes = minio.stdout.split("NOTES:", 1)[1]
    assert "DEV ONLY" in minio_notes and "port-forward" in minio_notes
    assert "create secret generic trackb-minio-root" in minio_notes


# ------------------------------------------------------------------ values.yaml documentation


def _block_keys(node, path=()):
    """(dotted path, line) of every key in block-style mappings of a composed YAML node."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style:
        for key, value in node.value:
            here = (*path, key.value)
            yield ".".join(here), key.start_mark.line
            yield from _block_keys(value, here)


def test_every_values_key_has_a_helm_docs_comment():
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    keys = list(_block_keys(yaml.compose(text)))
    assert len(keys) > 30
    undocumented = []
    for dotted, line in keys:
        block = []
        i = line - 1
        while i >= 0 and lines[i].lstrip().startswith("#"):
            block.append(lines[i].strip())
            i -= 1
        if not any(c.startswith("# -- ") and len(c) > 8 for c in block):
            undocumented.append(dotted)
    assert not undocumented, f"keys without a '# --' comment: {undocumented}"


def _schema_paths(schema, defs, path=()):
    if "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    for name, sub in schema.get("properties", {}).items():
        yield ".".join((*path, name))
        if sub.get("type") == "object" and "properties" in sub:
            yield from _schema_paths(sub, defs, (*path, name))


def test_chart_only_values_and_their_schema_have_the_same_keys():
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    schema = {"properties": gen_values_schema.CHART_ONLY}

    def value_paths(node, path=()):
        for key, value in node.items():
            yield ".".join((*path, key))
            if isinstance(value, dict) and value and key not in ("requests", "limits"):
                yield from value_paths(value, (*path, key))

    chart_only = {k: v for k, v in values.items() if k in gen_values_schema.CHART_ONLY}
    assert set(chart_only) == set(gen_values_schema.CHART_ONLY)
    assert set(value_paths(chart_only)) == set(_schema_paths(schema, {}))


def test_values_yaml_validates_against_the_schema():
    import jsonschema

    from trackb_core.config import merge

    _settings_or_skip()
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(values)
    for path in CI_VALUES:
        merged = merge(values, yaml.safe_load(path.read_text(encoding="utf-8")))
        jsonschema.Draft202012Validator(schema).validate(merged)


# ------------------------------------------------------------------ one schema, no drift


def test_generated_schema_and_values_blocks_are_up_to_date():
    _settings_or_skip()
    assert (CHART / "values.schema.json").read_text(encoding="utf-8") == \
        gen_values_schema.schema_text(), "run: python scripts/gen_values_schema.py"
    values = (CHART / "values.yaml").read_text(encoding="utf-8")
    assert gen_values_schema.render_values(values) == values, \
        "run: python scripts/gen_values_schema.py"


def test_values_kubernetes_defaults_equal_kubernetes_config_defaults():
    kubernetes_config = _settings_or_skip()
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["kubernetes"] == kubernetes_config().model_dump(mode="json")
    # ... and the section is a valid KubernetesConfig as it stands.
    assert kubernetes_config.model_validate(values["kubernetes"]) == kubernetes_config()


def test_values_pipeline_section_is_pipeline_config_defaults():
    from trackb_core.pipeline import PipelineConfig

    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["pipeline"]
    defaults = PipelineConfig().model_dump(mode="json")
    passed = set(PipelineConfig.model_fields) - set(gen_values_schema.PIPELINE_SKIPPED)
    assert set(values) == passed
    for key, value in values.items():
        if key in gen_values_schema.PIPELINE_STAGES:
            assert value == {}, f"pipeline.{key}: overrides only; defaults live in trackb"
        elif key == "store":
            assert value == "", "the store is required in a cluster; no local default"
        else:
            assert value == defaults[key], key


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_rendered_pipeline_yaml_is_a_valid_pipeline_config(values):
    from trackb_core.pipeline import PipelineConfig

    kubernetes_config = _settings_or_skip()
    configmaps = find(render(values), "ConfigMap", "pipeline")
    assert len(configmaps) == 1
    data = yaml.safe_load(configmaps[0]["data"]["pipeline.yaml"])
    settings = kubernetes_config.model_validate(data["kubernetes"])
    assert settings.namespace == NAMESPACE
    if "kubernetes" not in PipelineConfig.model_fields:
        data.pop("kubernetes")  # until PipelineConfig carries the Kubernetes settings
    config = PipelineConfig.model_validate(data)
    assert config.store.startswith("s3://")


def test_schema_rejects_pipeline_keys_the_pipeline_wires():
    _settings_or_skip()
    result = run_helm("template", "demo", str(CHART), "--set", "pipeline.train.dataset=s3://x")
    assert result.returncode != 0 and "dataset" in result.stderr, result.stderr
    ok = run_helm("template", "demo", str(CHART), "--set", "pipeline.train.epochs=1")
    assert ok.returncode == 0, ok.stderr
