"""Where pods run (kubernetes.scheduling): no platform label assumed, GPU-type lists and
raw nodeAffinity, a teacher pool of its own, the vLLM attention backend on T4s, and the
egress that code-running pods need for a cloud store."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from trackb_core.config import build_config, load_yaml, merge, parse_dotted_overrides
from trackb_core.k8s.jobspec import attention_backend, build_stage, build_vllm_service, placement
from trackb_core.k8s.settings import KubernetesConfig
from trackb_core.pipeline import PipelineConfig

ROOT = Path(__file__).parents[2]
GPU = ROOT / "jobs" / "configs" / "cluster-gpu.yaml"
RUN = "place"


def k8s(**values) -> KubernetesConfig:
    return KubernetesConfig.model_validate(values)


def config(*sets: str) -> PipelineConfig:
    return build_config(PipelineConfig, merge(load_yaml(GPU), parse_dotted_overrides(list(sets))))


def pod(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] in ("Job", "Deployment"))["spec"]["template"][
        "spec"]


def vllm_env(spec: dict) -> dict:
    vllm = next(c for c in [*spec.get("initContainers", []), *spec["containers"]]
                if c["name"] == "vllm")
    return {e["name"]: e.get("value") for e in vllm["env"]}


def test_by_default_gpu_pods_only_tolerate_the_gpu_taint():
    assert placement(KubernetesConfig(), gpu=True) == {"tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    assert placement(KubernetesConfig(), gpu=False) == {}


def test_gpu_types_become_a_required_node_affinity_in_every_term():
    spec = placement(k8s(scheduling={
        "gpu_types": ["nvidia-tesla-t4", "nvidia-l4"],
        "gpu_type_label": "cloud.google.com/gke-accelerator",
        "node_affinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [
                    {"key": "spot", "operator": "DoesNotExist"}]}}]}}), gpu=True)
    affinity = spec["affinity"]["nodeAffinity"]
    gpu = {"key": "cloud.google.com/gke-accelerator", "operator": "In",
           "values": ["nvidia-tesla-t4", "nvidia-l4"]}
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [t["matchExpressions"][-1] for t in terms] == [gpu, gpu]
    assert [t["matchExpressions"][0]["values"] for t in terms] == [["a"], ["b"]]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 1
    assert "nodeSelector" not in spec


def test_the_settings_are_not_changed_by_building_a_pod():
    settings = k8s(scheduling={"gpu_types": ["t4"], "node_affinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}})
    placement(settings, gpu=True)
    placement(settings, gpu=True)
    assert settings.scheduling.node_affinity == {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}


@pytest.mark.parametrize("bad", [{"node_affinity": {"requiredDuringScheduling": {}}},
                                 {"tolerations": [{"keey": "x"}]},
                                 {"teacher": {"tolerations": [{"keey": "x"}]}}])
def test_placement_settings_are_checked(bad):
    with pytest.raises(ValidationError):
        k8s(scheduling=bad)


def test_a_teacher_pool_moves_the_sidecar_pod_and_leaves_train_on_t4s():
    cfg = config("kubernetes.scheduling.teacher.own_pool=true",
                 "kubernetes.scheduling.teacher.node_selector={pool: a100}",
                 "kubernetes.resources.vllm.gpus=2", "kubernetes.vllm.tensor_parallel_size=2")
    generate = pod(build_stage("generate", cfg, RUN))
    assert generate["nodeSelector"] == {"pool": "a100"}
    assert vllm_env(generate)["TRACKB_VLLM_TENSOR_PARALLEL_SIZE"] == "2"
    assert pod(build_stage("train", cfg, RUN))["nodeSelector"] == {
        "nvidia.com/gpu.product": "Tesla-T4"}


def test_without_own_pool_the_teacher_fields_are_unused():
    cfg = config("kubernetes.scheduling.teacher.node_selector={pool: a100}")
    assert pod(build_stage("generate", cfg, RUN))["nodeSelector"] == {
        "nvidia.com/gpu.product": "Tesla-T4"}


def test_a_teacher_deployment_goes_to_the_pool():
    cfg = config("kubernetes.vllm.serve=deployment", "kubernetes.scheduling.teacher.own_pool=true",
                 "kubernetes.scheduling.teacher.gpu_types=[NVIDIA-A100-SXM4-80GB]")
    server = pod(build_vllm_service(cfg, RUN))
    expression = server["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]
    assert expression["values"] == ["NVIDIA-A100-SXM4-80GB"]
    assert "TRACKB_VLLM_ATTENTION_BACKEND" not in vllm_env(server)
    client = pod(build_stage("generate", cfg, RUN))
    assert "affinity" not in client and "nodeSelector" not in client


@pytest.mark.parametrize(("scheduling", "backend"), [
    ({}, "TRITON_ATTN"),  # no GPU type named: trackb's default cluster is T4s
    ({"node_selector": {"nvidia.com/gpu.product": "Tesla-T4"}}, "TRITON_ATTN"),
    ({"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}}, "TRITON_ATTN"),
    ({"gpu_types": ["g4dn.xlarge"], "gpu_type_label": "node.kubernetes.io/instance-type"},
     "TRITON_ATTN"),
    ({"gpu_types": ["t4"], "gpu_type_label": "karpenter.k8s.aws/instance-gpu-name"},
     "TRITON_ATTN"),
    ({"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}, None),
    ({"teacher": {"own_pool": True, "gpu_types": ["nvidia-a100-80gb"]}}, None),
    ({"gpu_types": ["nvidia-l4"], "teacher": {"own_pool": True}}, "TRITON_ATTN"),
])
def test_vllm_on_t4s_gets_the_triton_attention_backend(scheduling, backend):
    assert attention_backend(k8s(scheduling=scheduling)) == backend


def test_an_explicit_attention_backend_wins():
    on_t4 = {"node_selector": {"nvidia.com/gpu.product": "Tesla-T4"}}
    assert attention_backend(k8s(scheduling=on_t4, vllm={"attention_backend": "default"})) is None
    assert attention_backend(k8s(vllm={"attention_backend": "FLASHINFER"})) == "FLASHINFER"
    with pytest.raises(ValidationError):
        k8s(vllm={"attention_backend": "triton; rm -rf"})


def test_the_sidecar_on_t4s_says_so_in_its_environment():
    env = vllm_env(pod(build_stage("generate", config(), RUN)))
    assert env["TRACKB_VLLM_ATTENTION_BACKEND"] == "TRITON_ATTN"


def test_public_store_egress_excepts_only_ranges_inside_it():
    cfg = config("kubernetes.network.store_namespace=", "kubernetes.network.store_cidrs="
                 "[0.0.0.0/0, 203.0.113.0/24, '::/0']",
                 "kubernetes.network.store_cidrs_except=[10.0.0.0/8, 203.0.113.0/24]",
                 "kubernetes.network.node_local_dns=169.254.20.10")
    policy = next(o for o in build_stage("build-dataset", cfg, RUN)
                  if o["kind"] == "NetworkPolicy")
    blocks = [peer["ipBlock"] for rule in policy["spec"]["egress"] for peer in rule["to"]
              if "ipBlock" in peer]
    assert blocks[:3] == [{"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "203.0.113.0/24"]},
                          {"cidr": "203.0.113.0/24"}, {"cidr": "::/0"}]
    assert blocks[3] == {"cidr": "169.254.20.10/32"}
    assert not any(b["cidr"].startswith("169.254.170") for b in blocks)  # agent: off


@pytest.mark.parametrize("bad", [{"store_cidrs": ["10.0.0.0/33"]},
                                 {"store_cidrs_except": ["nope"]},
                                 {"node_local_dns": "169.254.20"}])
def test_network_ranges_are_checked(bad):
    with pytest.raises(ValidationError, match="not an IP address or CIDR range"):
        k8s(network=bad)


def test_preflight_warns_when_no_node_has_an_accepted_gpu_type_or_the_teacher_pool(emulator):
    pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
    from trackb_core.k8s.preflight import preflight

    emulator.put("", "nodes", {"metadata": {"name": "t4-1", "labels": {
        "node.kubernetes.io/instance-type": "g4dn.xlarge"}}})
    eks = load_yaml(ROOT / "jobs" / "configs" / "cluster-eks.yaml")
    cfg = build_config(PipelineConfig, merge(eks, parse_dotted_overrides([
        "kubernetes.scheduling.teacher.own_pool=true",
        "kubernetes.scheduling.teacher.gpu_type_label=node.kubernetes.io/instance-type",
        "kubernetes.scheduling.teacher.gpu_types=[g5.12xlarge, p4d.24xlarge]",
        "kubernetes.resources.vllm.gpus=2", "kubernetes.vllm.tensor_parallel_size=2"])))
    warnings = [f.message for f in preflight(cfg, RUN, emulator.client())
                if f.level == "warning"]
    assert warnings == [
        "no node matches kubernetes.scheduling.teacher.node_selector and gpu_types "
        "(node.kubernetes.io/instance-type in g5.12xlarge|p4d.24xlarge): GPU pods stay "
        "Pending until one joins (fine for a pool that autoscales from zero; the launcher "
        "waits kubernetes.budgets.unschedulable_seconds)"]
