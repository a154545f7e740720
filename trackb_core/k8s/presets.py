"""Platform presets: the one table behind ``helm/trackb/ci/<name>-values.yaml`` and
``jobs/configs/cluster-<name>.yaml``.

Each preset says how trackb runs as shipped on one kind of cluster: which node labels
and taints its GPU nodes carry, how pods reach the store (keys in a Secret, or a cloud
identity on a chart-created ServiceAccount), the egress that needs, and container sizes
that fit the platform's usual T4 machine. ``scripts/gen_presets.py`` writes both files of
every preset from this table (``make presets``); a test fails when they are stale, so
the chart values and the pipeline configs cannot drift apart.

The two files hold the same ``kubernetes:`` section. The values file adds what only the
chart has (the ServiceAccounts' annotations, the launcher) and ``pipeline:``; the config
file is a whole pipeline config for ``trackb run-all --backend k8s`` from a laptop, whose
stage ServiceAccount the chart (or an administrator) creates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VALUES_DIR = ROOT / "helm" / "trackb" / "ci"
CONFIGS_DIR = ROOT / "jobs" / "configs"
GENERATOR = "scripts/gen_presets.py"
# The name the stage pods' ServiceAccount gets where a preset gives them a cloud identity.
STAGE_ACCOUNT = "trackb-stages"
STORE = "s3://trackb-artifacts"
# Settings are emptied with "", never null: in a values file Helm reads null as "delete
# this key", and the chart's default (the in-cluster MinIO) would come back.

# Egress of the pods that run model-written code, for a store behind a public endpoint
# whose addresses change (AWS S3 and STS, storage.googleapis.com): HTTPS anywhere except
# private, carrier-grade NAT and link-local ranges, so not the cluster, the VPC or the
# node's metadata server (which would hand out the node's credentials).
PUBLIC_HTTPS_ONLY = {
    "store_namespace": "",
    "store_cidrs": ["0.0.0.0/0"],
    "store_cidrs_except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                           "169.254.0.0/16"],
    "store_ports": [443],
}

# What every preset runs: the seed corpus, Qwen2.5-Coder-1.5B read from the store
# (eval pods are offline: a hub id cannot be fetched into their empty cache), a vLLM
# teacher as a native sidecar of generate, fp16 training (T4 has no bfloat16).
PIPELINE: dict[str, Any] = {
    "corpus": "pypi:verl==0.9.1",
    "model": f"{STORE}/models/qwen2.5-coder-1.5b",
    "generate": {"teacher": "openai"},
    "train": {"precision": "fp16"},
}


@dataclass(frozen=True)
class Machine:
    """A platform's usual T4 node: what pods may request on it (allocatable, less the
    usual DaemonSets), so every GPU pod of the preset fits one."""

    name: str
    cpu: float
    memory_gib: float


@dataclass(frozen=True)
class Preset:
    """One platform: the shared kubernetes section, the chart-only values, the docs."""

    name: str
    title: str
    doc: str
    kubernetes: dict[str, Any]
    machine: Machine
    # Node label keys by which this platform's GPU pods may be placed: the presets' test
    # checks that the rendered GPU pods use these and no other platform's.
    gpu_labels: frozenset[str]
    chart: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    install: str = ""

    @property
    def values_path(self) -> Path:
        return VALUES_DIR / f"{self.name}-values.yaml"

    @property
    def config_path(self) -> Path:
        return CONFIGS_DIR / f"cluster-{self.name}.yaml"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` deep-merged onto a copy of ``base`` (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _sizes(gpu_limit: str, vllm_limit: str | None = None) -> dict[str, Any]:
    """Memory limits of the GPU containers on the platform's machine: train and eval
    (their 4Gi requests, and vLLM's 8Gi, fit every machine here), and the vLLM server's
    if its default (12Gi) does not fit beside the generate client's 2Gi."""
    sizes: dict[str, Any] = {"train": {"memory_limit": gpu_limit},
                             "eval": {"memory_limit": gpu_limit}}
    if vllm_limit:
        sizes["vllm"] = {"memory_limit": vllm_limit}
    return sizes


GKE_T4 = {
    "accelerator": "gpu",
    "job_service_account": STAGE_ACCOUNT,
    "scheduling": {
        # GKE labels its GPU nodes by accelerator and taints them nvidia.com/gpu=present.
        "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                         "effect": "NoSchedule"}],
    },
    # n1-standard-4 + T4: 15 GB, about 12.4 GiB allocatable, less GKE's DaemonSets.
    "resources": _sizes("10Gi", vllm_limit="10Gi"),
    # GCS speaks S3 only with HMAC keys (boto3 cannot sign with workload identity): the
    # keys are in the Secret trackb-gcs-hmac, as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    "s3": {"store": STORE, "endpoint_url": "https://storage.googleapis.com", "region": "auto",
           "credentials_secret": "trackb-gcs-hmac"},
    "network": PUBLIC_HTTPS_ONLY,
}

GKE = Preset(
    name="gke",
    title="GKE with a T4 node pool (n1-standard-4 + nvidia-tesla-t4), the store in GCS.",
    doc="GPU pods select GKE's cloud.google.com/gke-accelerator label and tolerate its "
        "nvidia.com/gpu=present taint. The store is a GCS bucket through its S3 endpoint "
        "with HMAC keys (Secret trackb-gcs-hmac: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). "
        "Stage pods run as the chart's trackb-stages ServiceAccount, annotated for workload "
        "identity: a Google identity for the pods' own Google API calls (the store still "
        "needs the HMAC keys). Code-running pods reach only DNS and public HTTPS.",
    kubernetes=GKE_T4,
    machine=Machine("n1-standard-4 + 1 T4", cpu=3.9, memory_gib=12.0),
    gpu_labels=frozenset({"cloud.google.com/gke-accelerator"}),
    chart={"stageServiceAccount": {"create": True, "annotations": {
        "iam.gke.io/gcp-service-account": "trackb-stages@my-project.iam.gserviceaccount.com"}}},
    install="kubectl -n trackb create secret generic trackb-gcs-hmac "
            "--from-literal=AWS_ACCESS_KEY_ID=GOOG... --from-literal=AWS_SECRET_ACCESS_KEY=...",
)

GKE_TEACHER_POOL = Preset(
    name="gke-teacher-pool",
    title="GKE: the seed's teacher, Qwen3-Coder-30B-A3B-Instruct, on two A100s with tensor "
          "parallelism 2; training and eval on T4s.",
    doc="As ci/gke-values.yaml, plus a teacher pool: the generate pod (its vLLM sidecar "
        "shares the pod's node) selects an A100 pool (a2-highgpu-2g or a2-ultragpu-2g) and "
        "asks two GPUs, bfloat16 (A100 has it); train and eval stay on the T4 pool. With "
        "vllm.serve 'deployment' only the server would go there.",
    kubernetes=_merge(GKE_T4, {
        "scheduling": {"teacher": {
            "own_pool": True,
            "gpu_types": ["nvidia-tesla-a100", "nvidia-a100-80gb"],
            "gpu_type_label": "cloud.google.com/gke-accelerator",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                             "effect": "NoSchedule"}],
        }},
        # 30B MoE in bfloat16 is about 61 GB of weights: two 40 GB A100s leave room for
        # the KV cache. Host memory of a2-highgpu-2g is 170 GB.
        "resources": {"vllm": {"gpus": 2, "cpu_request": "4", "cpu_limit": "8",
                               "memory_request": "32Gi", "memory_limit": "64Gi",
                               "shm_size": "8Gi", "ephemeral_storage": "8Gi"}},
        "vllm": {"model": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "dtype": "bfloat16",
                 "tensor_parallel_size": 2, "max_model_len": 16384},
    }),
    machine=Machine("n1-standard-4 + 1 T4", cpu=3.9, memory_gib=12.0),
    gpu_labels=frozenset({"cloud.google.com/gke-accelerator"}),
    chart=GKE.chart,
    install=GKE.install,
)

EKS = Preset(
    name="eks",
    title="EKS with g4dn (T4) nodes, the store in AWS S3 through IRSA or EKS Pod Identity.",
    doc="GPU pods require a g4dn instance type (node.kubernetes.io/instance-type; with "
        "Karpenter, gpu_type_label karpenter.k8s.aws/instance-gpu-name and gpu_types [t4] "
        "say the same) and tolerate nvidia.com/gpu. Stage pods and the launcher reach S3 "
        "with no keys: their ServiceAccounts carry the IRSA role annotation (for EKS Pod "
        "Identity drop the annotations and associate the role with trackb-stages and "
        "trackb-launcher in AWS). Code-running pods reach DNS (NodeLocal DNSCache too), "
        "public HTTPS (S3, STS) and the Pod Identity agent, not the VPC or IMDS.",
    kubernetes={
        "accelerator": "gpu",
        "job_service_account": STAGE_ACCOUNT,
        "scheduling": {
            "gpu_types": ["g4dn.xlarge", "g4dn.2xlarge", "g4dn.4xlarge", "g4dn.8xlarge"],
            "gpu_type_label": "node.kubernetes.io/instance-type",
        },
        # g4dn.xlarge: 16 GiB, about 14 GiB allocatable.
        "resources": _sizes("12Gi"),
        # AWS S3: no endpoint, credentials from the pod's identity.
        "s3": {"store": STORE, "endpoint_url": "", "region": "us-east-1",
               "credentials_secret": ""},
        "network": {**PUBLIC_HTTPS_ONLY, "node_local_dns": "169.254.20.10",
                    "pod_identity_agent": True},
    },
    machine=Machine("g4dn.xlarge", cpu=3.9, memory_gib=14.0),
    gpu_labels=frozenset({"node.kubernetes.io/instance-type"}),
    chart={
        "serviceAccount": {"annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/trackb"}},
        "stageServiceAccount": {"create": True, "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/trackb"}},
    },
)

EKS_KARPENTER = Preset(
    name="eks-karpenter",
    title="EKS with Karpenter T4 nodes, the store in AWS S3 through EKS Pod Identity.",
    doc="As ci/eks-values.yaml, but GPU pods require Karpenter's "
        "karpenter.k8s.aws/instance-gpu-name: t4 (any g4dn size Karpenter picks), and pods "
        "get their AWS role from EKS Pod Identity: no annotation on the ServiceAccounts; "
        "associate the role with trackb-stages and trackb-launcher in AWS (aws eks "
        "create-pod-identity-association). Code-running pods may reach the Pod Identity "
        "agent (169.254.170.23, TCP 80) and nothing else link-local.",
    kubernetes=_merge(EKS.kubernetes, {"scheduling": {
        "gpu_types": ["t4"], "gpu_type_label": "karpenter.k8s.aws/instance-gpu-name"}}),
    machine=EKS.machine,
    gpu_labels=frozenset({"karpenter.k8s.aws/instance-gpu-name"}),
    chart={"stageServiceAccount": {"create": True}},
)

GPU_OPERATOR = Preset(
    name="gpu-operator",
    title="Any cluster with the NVIDIA GPU Operator (GPU feature discovery) and T4 nodes, "
          "the store in an in-cluster MinIO.",
    doc="GPU pods select GPU feature discovery's nvidia.com/gpu.product: Tesla-T4 and "
        "tolerate nvidia.com/gpu. The store is MinIO in namespace minio, with keys in the "
        "Secret trackb-s3 (k8s/secret-template.yaml); code-running pods reach only DNS and "
        "MinIO's pods. For AWS S3 instead, take kubernetes.s3 and kubernetes.network from "
        "ci/eks-values.yaml.",
    kubernetes={
        "accelerator": "gpu",
        "scheduling": {"node_selector": {"nvidia.com/gpu.product": "Tesla-T4"}},
        # Sized for a 16 GiB, 4-CPU T4 node, the smallest usual one.
        "resources": _sizes("12Gi"),
        "s3": {"store": STORE, "endpoint_url": "http://minio.minio.svc.cluster.local:9000",
               "credentials_secret": "trackb-s3"},
        "network": {"store_namespace": "minio", "store_ports": [9000]},
    },
    machine=Machine("16 GiB, 4-CPU node + 1 T4", cpu=3.9, memory_gib=14.0),
    gpu_labels=frozenset({"nvidia.com/gpu.product"}),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (GKE, GKE_TEACHER_POOL, EKS, EKS_KARPENTER,
                                                   GPU_OPERATOR)}


def _dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=100)


def _comment(text: str) -> str:
    import textwrap

    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 88))


def values_data(preset: Preset) -> dict[str, Any]:
    """The chart values of ``preset``: chart-only keys, the launcher, kubernetes, pipeline."""
    return {**copy.deepcopy(preset.chart), "launcher": {"enabled": True},
            "kubernetes": copy.deepcopy(preset.kubernetes),
            "pipeline": _merge(PIPELINE, preset.pipeline)}


def config_data(preset: Preset) -> dict[str, Any]:
    """The pipeline config of ``preset`` (``trackb run-all --backend k8s``)."""
    return {"store": STORE, **_merge(PIPELINE, preset.pipeline),
            "kubernetes": copy.deepcopy(preset.kubernetes)}


def values_text(preset: Preset) -> str:
    """``helm/trackb/ci/<name>-values.yaml``."""
    rel = preset.values_path.relative_to(ROOT)
    head = (f"# helm install trackb helm/trackb -n trackb -f {rel}\n"
            "# (after kubectl apply -f k8s/namespace.yaml; README: Run on a GPU cluster)\n"
            + _comment(preset.title) + "#\n" + _comment(preset.doc)
            + (f"# Before: {preset.install}\n" if preset.install else "")
            + f"# Generated from trackb_core/k8s/presets.py by {GENERATOR}; do not edit.\n")
    return head + _dump(values_data(preset))


def config_text(preset: Preset) -> str:
    """``jobs/configs/cluster-<name>.yaml``."""
    rel = preset.config_path.relative_to(ROOT)
    head = (f"# trackb run-all --config {rel} --backend k8s --run-id {preset.name}\n#\n"
            + _comment(preset.title) + "#\n" + _comment(preset.doc)
            + (_comment(f"The ServiceAccount {STAGE_ACCOUNT} must exist: the chart creates "
                        f"it (helm install -f {preset.values_path.relative_to(ROOT)} "
                        "--set launcher.enabled=false).")
               if preset.kubernetes.get("job_service_account") else "")
            + f"# Generated from trackb_core/k8s/presets.py by {GENERATOR}; do not edit.\n")
    return head + _dump(config_data(preset))


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    files: dict[Path, str] = {}
    for preset in PRESETS.values():
        files[preset.values_path] = values_text(preset)
        files[preset.config_path] = config_text(preset)
    return files
