"""The platform presets (trackb_core/k8s/presets.py -> ci/<name>-values.yaml and
jobs/configs/cluster-<name>.yaml): generated files up to date, and for each preset the
stage Jobs built from the pipeline in the chart's ConfigMap (what the in-cluster
launcher builds) placed by that platform's labels only, fitting its usual T4 machine,
valid for Kubernetes 1.30 and 1.35, and clean under checkov. helm lint --strict and the
schema validation of the chart's own objects run for every ci/*.yaml in test_chart.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from trackb_core.config import build_config, load_yaml
from trackb_core.k8s import presets
from trackb_core.k8s.jobspec import T4_LABEL_VALUE, build_all
from trackb_core.pipeline import PipelineConfig

from . import CI_VALUES, NAMESPACE, ROOT, find, one, render, validate_for_kubernetes

PRESETS = list(presets.PRESETS.values())
IDS = [p.name for p in PRESETS]
RUN = "preset"
# Every platform's GPU label keys: a pod of one preset must carry none of another's.
ALL_GPU_LABELS = frozenset().union(*(p.gpu_labels for p in PRESETS))


def pipeline_from_chart(preset: presets.Preset) -> PipelineConfig:
    """The pipeline config the chart's ConfigMap hands the launcher."""
    configmap = one(render(preset.values_path), "ConfigMap", "pipeline")
    return build_config(PipelineConfig, yaml.safe_load(configmap["data"]["pipeline.yaml"]))


def stage_objects(preset: presets.Preset, *sets: str) -> list[dict[str, Any]]:
    """Every object the launcher creates for a run of the preset (plus ``sets``)."""
    from trackb_core.config import merge, parse_dotted_overrides

    config = pipeline_from_chart(preset)
    if sets:
        data = merge(config.model_dump(mode="json", exclude_defaults=True),
                     parse_dotted_overrides(list(sets)))
        config = build_config(PipelineConfig, data)
    return [obj for objects in build_all(config, RUN).values() for obj in objects]


def pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs of the Jobs and Deployments, by their trackb/stage label."""
    return {o["metadata"]["labels"]["trackb/stage"]: o["spec"]["template"]["spec"]
            for o in objects if o["kind"] in ("Job", "Deployment")}


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def gpus(spec: dict[str, Any]) -> int:
    return sum(int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
               for c in containers(spec))


def placement_labels(spec: dict[str, Any]) -> dict[str, set[str]]:
    """Label key -> values the pod's nodeSelector and nodeAffinity name."""
    found: dict[str, set[str]] = {}
    for key, value in spec.get("nodeSelector", {}).items():
        found.setdefault(key, set()).add(value)
    affinity = spec.get("affinity", {}).get("nodeAffinity", {})
    terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get(
        "nodeSelectorTerms", [])
    terms += [p["preference"] for p in
              affinity.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    for term in terms:
        for expression in term.get("matchExpressions", []):
            found.setdefault(expression["key"], set()).update(expression.get("values", []))
    return found


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


UNITS = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
         "k": 1e3, "M": 1e6, "G": 1e9}


def quantity(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()
    return float(number) * UNITS[unit]


def pod_needs(spec: dict[str, Any], kind: str, resource: str) -> float:
    """What the pod asks of its node: its containers plus native sidecars, or a plain
    init container if that is more (Kubernetes' effective request)."""
    def amount(c: dict[str, Any]) -> float:
        return quantity(c["resources"].get(kind, {}).get(resource, "0"))
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    steady = sum(amount(c) for c in [*spec["containers"], *sidecars])
    inits = [amount(c) for c in spec.get("initContainers", []) if c not in sidecars]
    return max([steady, *inits])


# ---------------------------------------------------------------- one source


def test_generated_preset_files_are_up_to_date():
    stale = [str(path.relative_to(ROOT)) for path, text in presets.outputs().items()
             if not path.is_file() or path.read_text(encoding="utf-8") != text]
    assert stale == [], f"run `make presets`: {stale}"


def test_every_preset_is_a_ci_values_file_and_a_cluster_config():
    assert {p.values_path for p in PRESETS} <= set(CI_VALUES)  # lint + schemas in test_chart
    for preset in PRESETS:
        first = preset.config_path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(f"# trackb run-all --config jobs/configs/cluster-{preset.name}")


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_values_file_and_cluster_config_hold_the_same_kubernetes_settings(preset):
    from_config = build_config(PipelineConfig, load_yaml(preset.config_path)).kubernetes
    from_chart = pipeline_from_chart(preset).kubernetes
    assert from_chart.namespace == NAMESPACE  # the one thing the chart fills in
    assert from_chart.model_dump(exclude={"namespace"}) == \
        from_config.model_dump(exclude={"namespace"})


# ---------------------------------------------------------------- placement


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_gpu_pods_are_placed_by_the_platforms_labels_only(preset):
    specs = pods(stage_objects(preset))
    gpu_pods = {stage: spec for stage, spec in specs.items() if gpus(spec)}
    assert {"train", "predict-baseline", "predict-post", "generate"} <= set(gpu_pods)
    for stage, spec in gpu_pods.items():
        labels = placement_labels(spec)
        assert labels, f"{stage}: a GPU pod with no GPU node placement"
        # Helm merges maps: a default selector key would survive next to the preset's.
        assert set(labels) <= preset.gpu_labels, f"{stage}: {sorted(labels)}"
        assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu"}
    for stage, spec in specs.items():
        if not gpus(spec):
            assert not set(placement_labels(spec)) & ALL_GPU_LABELS, stage
            assert "tolerations" not in spec, stage


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_train_and_eval_land_on_t4s(preset):
    specs = pods(stage_objects(preset))
    for stage in ("train", "predict-baseline", "predict-post"):
        values = set().union(*placement_labels(specs[stage]).values())
        assert values and all(T4_LABEL_VALUE.search(v) for v in values), (stage, values)


def test_the_teacher_pool_preset_puts_vllm_on_two_a100s_and_training_on_t4s():
    specs = pods(stage_objects(presets.PRESETS["gke-teacher-pool"]))
    generate = specs["generate"]
    label = "cloud.google.com/gke-accelerator"
    # The native sidecar shares its pod's node: the whole generate pod goes to the pool.
    assert placement_labels(generate) == {label: {"nvidia-tesla-a100", "nvidia-a100-80gb"}}
    assert "nodeSelector" not in generate
    vllm = next(c for c in generate["initContainers"] if c["name"] == "vllm")
    assert env(vllm)["TRACKB_VLLM_TENSOR_PARALLEL_SIZE"] == "2"
    assert env(vllm)["TRACKB_VLLM_MODEL"] == "Qwen/Qwen3-Coder-30B-A3B-Instruct"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "TRACKB_VLLM_ATTENTION_BACKEND" not in env(vllm)  # vLLM picks FlashAttention
    for stage in ("train", "predict-baseline", "predict-post"):
        assert specs[stage]["nodeSelector"] == {label: "nvidia-tesla-t4"}, stage
        assert "affinity" not in specs[stage] and gpus(specs[stage]) == 1


def test_a_teacher_deployment_goes_to_the_pool_and_its_client_to_a_cpu_node():
    specs = pods(stage_objects(presets.PRESETS["gke-teacher-pool"],
                               "kubernetes.vllm.serve=deployment"))
    assert set(placement_labels(specs["vllm"])["cloud.google.com/gke-accelerator"]) == {
        "nvidia-tesla-a100", "nvidia-a100-80gb"}
    assert gpus(specs["vllm"]) == 2
    assert gpus(specs["generate"]) == 0 and not placement_labels(specs["generate"])


@pytest.mark.parametrize("preset", [p for p in PRESETS
                                    if not p.kubernetes["scheduling"].get("teacher")],
                         ids=lambda p: p.name)
def test_vllm_on_t4s_uses_the_triton_attention_backend(preset):
    generate = pods(stage_objects(preset))["generate"]
    vllm = next(c for c in generate["initContainers"] if c["name"] == "vllm")
    assert env(vllm)["TRACKB_VLLM_ATTENTION_BACKEND"] == "TRITON_ATTN"


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_every_t4_pod_fits_the_platforms_usual_machine(preset):
    machine = preset.machine
    teacher_pool = bool(preset.kubernetes["scheduling"].get("teacher", {}).get("own_pool"))
    for stage, spec in pods(stage_objects(preset)).items():
        if not gpus(spec) or (teacher_pool and stage == "generate"):
            continue
        for kind in ("requests", "limits"):
            memory = pod_needs(spec, kind, "memory") / 2**30
            assert memory <= machine.memory_gib, f"{stage} {kind} {memory} GiB > {machine}"
        assert pod_needs(spec, "requests", "cpu") <= machine.cpu, (stage, machine)


# ---------------------------------------------------------------- identity and egress


def test_gke_stage_pods_use_the_annotated_service_account_and_gcs_hmac_keys():
    preset = presets.PRESETS["gke"]
    account = one(render(preset.values_path), "ServiceAccount", "stages")
    assert account["metadata"]["name"] == presets.STAGE_ACCOUNT
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert account["automountServiceAccountToken"] is False
    for stage, spec in pods(stage_objects(preset)).items():
        launcher = stage == "launcher"  # the launcher has its own account, with the Role
        assert spec["serviceAccountName"] == ("trackb-launcher" if launcher
                                              else presets.STAGE_ACCOUNT), stage
        assert spec["automountServiceAccountToken"] is launcher
        main = spec["containers"][0]
        assert env(main)["TRACKB_S3_ENDPOINT_URL"] == "https://storage.googleapis.com"
        assert env(main)["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "trackb-gcs-hmac"


def test_eks_pods_reach_s3_with_their_role_and_no_keys():
    preset = presets.PRESETS["eks"]
    objects = render(preset.values_path)
    for component in ("stages", "launcher"):
        account = one(objects, "ServiceAccount", component)
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    for stage, spec in pods(stage_objects(preset)).items():
        assert spec["serviceAccountName"] == ("trackb-launcher" if stage == "launcher"
                                              else presets.STAGE_ACCOUNT), stage
        names = env(spec["containers"][0])
        assert "TRACKB_S3_ENDPOINT_URL" not in names and "AWS_ACCESS_KEY_ID" not in names


def test_eks_pod_identity_needs_no_annotation_on_either_service_account():
    objects = render(presets.PRESETS["eks-karpenter"].values_path)
    for component in ("stages", "launcher"):
        assert "annotations" not in one(objects, "ServiceAccount", component)["metadata"]


def test_eks_code_running_pods_reach_s3_sts_the_pod_identity_agent_and_node_local_dns():
    objects = stage_objects(presets.PRESETS["eks"])
    policies = {o["metadata"]["labels"]["trackb/stage"]: o["spec"] for o in objects
                if o["kind"] == "NetworkPolicy"}
    for stage in ("build-dataset", "eval-baseline", "eval-post"):
        egress = policies[stage]["egress"]
        blocks = {(peer["ipBlock"]["cidr"], tuple(peer["ipBlock"].get("except", ())),
                   port["port"]) for rule in egress for peer in rule["to"] if "ipBlock" in peer
                  for port in rule["ports"]}
        public = ("0.0.0.0/0", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                "100.64.0.0/10", "169.254.0.0/16"), 443)
        assert public in blocks  # S3 and STS; not the VPC, nor IMDS at 169.254.169.254
        assert ("169.254.170.23/32", (), 80) in blocks and ("fd00:ec2::23/128", (), 80) in blocks
        assert ("169.254.20.10/32", (), 53) in blocks
    assert policies["train"]["egress"] == [{}]  # not code-running: the hub, PyPI


# ---------------------------------------------------------------- schemas and policy


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_stage_objects_validate_against_kubernetes_130_and_135(preset):
    validate_for_kubernetes(stage_objects(preset))


def _checkov() -> str | None:
    candidates = [os.environ.get("TRACKB_CHECKOV", ""),
                  str(ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"),
                  shutil.which("checkov") or ""]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_checkov_finds_no_failed_checks_in_any_preset(tmp_path):
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed: run k8s/checkov.sh once")
    for preset in PRESETS:
        for name, objects in (("chart", render(preset.values_path)),
                              ("stages", stage_objects(preset))):
            (tmp_path / f"{preset.name}-{name}.yaml").write_text(
                yaml.safe_dump_all(objects, sort_keys=False))
    result = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--output",
         "json"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "LOG_LEVEL": "ERROR"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"], Path(c.get("file_path", "")).name)
              for report in reports if isinstance(report, dict)
              for c in report.get("results", {}).get("failed_checks", [])]
    assert sum(r.get("summary", {}).get("resource_count", 0) for r in reports
               if isinstance(r, dict)) > 4 * len(PRESETS)
    assert failed == [], failed


def test_the_chart_renders_no_stage_service_account_unless_asked():
    assert not find(render(), "ServiceAccount", "stages")


@pytest.mark.parametrize("values", ["default-values", "gke-values", "eks-values"])
def test_the_chart_launcher_carries_the_builders_checkov_reasons(values):
    from trackb_core.k8s.jobspec import build_launcher_job

    path = presets.VALUES_DIR / f"{values}.yaml"
    configmap = one(render(path), "ConfigMap", "pipeline")
    config = build_config(PipelineConfig, yaml.safe_load(configmap["data"]["pipeline.yaml"]))
    built = build_launcher_job(config, RUN)[-1]["metadata"]["annotations"]
    chart = one(render(path), "Job", "launcher")["metadata"]["annotations"]
    assert {k: v for k, v in chart.items() if k.startswith("checkov.io/")} == built
