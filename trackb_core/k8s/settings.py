"""``KubernetesConfig``: everything a cluster needs to run trackb's stages as Jobs.

This one model is the schema shared by the Job builder (:mod:`trackb_core.k8s.jobspec`)
and the Helm chart: the chart's ``values.schema.json`` is generated from
:func:`kubernetes_json_schema`, so there is one set of defaults, not two. Each field's
``description`` is its documentation. Defaults fit a cluster of NVIDIA T4 nodes
(16 GB, fp16 only) with an in-cluster MinIO; the CPU profile (model ``tiny``) uses the
same settings minus the GPUs.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from trackb_core import __version__
from trackb_core.config import StageConfig
from trackb_core.errors import PERMANENT_EXIT_CODES
from trackb_core.stages import STEPS, deadline_doc, resource_keys

# Kubernetes quantities such as 500m, 2, 1.5, 4Gi, 512Mi.
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# RFC 1123 label: namespaces, Secret, ServiceAccount and PVC names.
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _check_quantity(value: str | None) -> str | None:
    if value is not None and not QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    return value


def _check_tolerations(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for item in value:
        unknown = set(item) - TOLERATION_KEYS
        if unknown:
            raise ValueError(f"unknown toleration keys {sorted(unknown)}; allowed: "
                             f"{sorted(TOLERATION_KEYS)}")
    return value


def _check_name(value: str | None) -> str | None:
    if value not in (None, "") and not DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a valid Kubernetes name (lowercase letters, "
                         "digits and '-', at most 63)")
    return value


class ImagesConfig(StageConfig):
    """Container images. A reference is <registry>/<name>:<tag>; a name that already
    carries ':' or '@sha256:' is used as given after the registry."""

    registry: str = Field("ghcr.io/trackb", description="Registry and path prefix of the "
                          "three images; empty for images loaded into the nodes (kind load).")
    tag: str = Field(__version__, description="Tag of all three images; default: trackb's "
                     "version, the tag `make push` and CI's release give them.")
    cpu: str = Field("trackb-cpu", description="Image of extract, the generate client, "
                     "build-dataset, tiny-model, compare and the launcher; also train and "
                     "eval in the CPU profile. No CUDA.")
    trainer: str = Field("trackb-trainer", description="Image of train on GPUs (CUDA 12, "
                         "torch, transformers, peft, trl).")
    vllm: str = Field("trackb-vllm", description="Image of the vLLM teacher server (FROM a "
                      "pinned vllm/vllm-openai), with trackb installed on top: also the "
                      "image of predict-baseline and predict-post on GPUs, where eval's "
                      "backend auto is vLLM's offline engine (LLM + LoRARequest).")
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of every container.")
    pull_secrets: list[str] = Field([], description="Names of docker-registry Secrets for "
                                    "private registries (imagePullSecrets).")

    def ref(self, name: str) -> str:
        """The full image reference for one of the three image names."""
        base = f"{self.registry.rstrip('/')}/{name}" if self.registry else name
        tail = name.rsplit("/", 1)[-1]
        return base if (":" in tail or "@" in tail) else f"{base}:{self.tag}"


class Resources(StageConfig):
    """Requests and limits of one container. Each component's subclass sets defaults."""

    cpu_request: str = Field(description="CPU the scheduler reserves (e.g. 500m).")
    memory_request: str = Field(description="Memory the scheduler reserves (e.g. 1Gi).")
    cpu_limit: str = Field(description="Most CPU the container may use.")
    memory_limit: str = Field(description="Memory at which the container is OOMKilled.")
    ephemeral_storage: str = Field(description="Local disk requested, also the sizeLimit of "
                                   "its /tmp emptyDir.")
    shm_size: str | None = Field(description="sizeLimit of a memory-backed /dev/shm "
                                 "(counts against memory_limit); empty: none (GPU pods only).")
    gpus: int = Field(ge=0, description="nvidia.com/gpu count (GPU profile only; the CPU "
                      "profile never requests GPUs).")

    _q = field_validator("cpu_request", "memory_request", "cpu_limit", "memory_limit",
                         "ephemeral_storage", "shm_size")(_check_quantity)


def _sized(name: str, doc: str, cpu: str, memory: str, cpu_limit: str, memory_limit: str,
           disk: str = "2Gi", shm: str | None = None, gpus: int = 0) -> type[Resources]:
    """A Resources subclass with this component's defaults (descriptions kept)."""
    values = {"cpu_request": cpu, "memory_request": memory, "cpu_limit": cpu_limit,
              "memory_limit": memory_limit, "ephemeral_storage": disk, "shm_size": shm,
              "gpus": gpus}
    fields: dict[str, Any] = {}
    for key, value in values.items():
        info = Resources.model_fields[key]
        fields[key] = (info.annotation, Field(value, description=info.description,
                                              ge=0 if key == "gpus" else None))
    return create_model(name, __base__=Resources, __doc__=doc, **fields)


# The pipeline steps' containers are sized in the step table (trackb_core.stages), one
# field per resources key; these two are not steps.
# 8Gi of host memory: the usual T4 machines (GKE n1-standard-4: about 12 GiB allocatable;
# EKS g4dn.xlarge: about 14 GiB) must hold it beside the generate client and DaemonSets.
VLLMResources = _sized("VLLMResources", "The vLLM teacher server of generate.",
                       "2", "8Gi", "4", "12Gi", disk="4Gi", shm="2Gi", gpus=1)
LauncherResources = _sized("LauncherResources", "The in-cluster launcher (run-all).",
                           "100m", "256Mi", "1", "1Gi", disk="1Gi")


def _step_resources() -> dict[str, Any]:
    """One Resources field per resources key of the step table, with its defaults."""
    fields: dict[str, Any] = {}
    for key, sizing in resource_keys().items():
        name = "".join(part.title() for part in key.split("_")) + "Resources"
        cls = _sized(name, sizing.doc, sizing.cpu, sizing.memory, sizing.cpu_limit,
                     sizing.memory_limit, disk=sizing.disk, shm=sizing.shm, gpus=sizing.gpus)
        fields[key] = (cls, Field(default_factory=cls, description=sizing.doc))
    return fields


ResourcesConfig = create_model(
    "ResourcesConfig", __base__=StageConfig, __doc__="Per-container requests and limits.",
    **_step_resources(),
    vllm=(VLLMResources, Field(default_factory=VLLMResources,
                               description="The vLLM teacher server of generate; gpus must "
                               "equal vllm.tensor_parallel_size.")),
    launcher=(LauncherResources, Field(default_factory=LauncherResources,
                                       description="The in-cluster launcher (run-all).")),
)


NODE_AFFINITY_KEYS = {"requiredDuringSchedulingIgnoredDuringExecution",
                      "preferredDuringSchedulingIgnoredDuringExecution"}


class GPUPlacement(StageConfig):
    """Which nodes a group of GPU pods may run on. Labels and taints differ by platform
    (see the presets in trackb_core.k8s.presets): GPU feature discovery (the NVIDIA GPU
    Operator) labels nvidia.com/gpu.product: Tesla-T4; GKE cloud.google.com/gke-accelerator:
    nvidia-tesla-t4; EKS node.kubernetes.io/instance-type: g4dn.xlarge (Karpenter also
    karpenter.k8s.aws/instance-gpu-name: t4). Nothing is assumed by default: an empty
    selector lets the nvidia.com/gpu request alone pick a node with a free GPU."""

    node_selector: dict[str, str] = Field(
        {}, description="nodeSelector: labels every node must carry (one value per label).")
    gpu_types: list[str] = Field(
        [], description="Acceptable GPU types, any of them: a required nodeAffinity "
        "'<gpu_type_label> In [...]' (e.g. [nvidia-tesla-t4, nvidia-l4] on GKE, [g4dn.xlarge, "
        "g4dn.2xlarge] on EKS); empty: any GPU.")
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product", description="The node label gpu_types are values of "
        "(cloud.google.com/gke-accelerator on GKE, node.kubernetes.io/instance-type or "
        "karpenter.k8s.aws/instance-gpu-name on EKS).")
    node_affinity: dict[str, Any] = Field(
        {}, description="A raw Kubernetes nodeAffinity object (required and/or preferred "
        "terms), for what the fields above cannot say; gpu_types' expression is added to "
        "each of its required terms.")
    tolerations: list[dict[str, Any]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations (Kubernetes toleration objects); the default tolerates the "
        "nvidia.com/gpu taint that GKE, EKS GPU AMIs and the GPU Operator put on GPU nodes.")

    _t = field_validator("tolerations")(_check_tolerations)

    @field_validator("node_affinity")
    @classmethod
    def _affinity(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - NODE_AFFINITY_KEYS
        if unknown:
            raise ValueError(f"unknown nodeAffinity keys {sorted(unknown)}; allowed: "
                             f"{sorted(NODE_AFFINITY_KEYS)}")
        return value


class TeacherPlacement(GPUPlacement):
    """Where the vLLM teacher server runs, when that is not where train and eval run
    (e.g. Qwen3-Coder-30B-A3B on two L4s or A100s, training on T4s). Its GPU count is
    resources.vllm.gpus, equal to vllm.tensor_parallel_size. A native sidecar shares its
    pod's node, so with vllm.serve 'sidecar' the whole generate pod goes to this pool;
    with 'deployment' only the server does (the generate client runs on a CPU node)."""

    own_pool: bool = Field(False, description="Place the vLLM server by these fields; "
                           "false: where the GPU pods go (scheduling.node_selector and the "
                           "rest), these fields unused.")


class SchedulingConfig(GPUPlacement):
    """Where pods run: GPU pods (train, eval, the vLLM server) by the fields below,
    CPU-only pods by cpu_node_selector, the vLLM server on a pool of its own if
    teacher.own_pool."""

    cpu_node_selector: dict[str, str] = Field({}, description="nodeSelector of CPU-only pods.")
    priority_class_name: str | None = Field(None, description="priorityClassName of every "
                                            "pod; empty for the cluster default.")
    teacher: TeacherPlacement = Field(
        default_factory=TeacherPlacement, description="The vLLM teacher server's own GPU "
        "pool (own_pool), with its own selector, GPU types, affinity and tolerations; its "
        "GPU count is resources.vllm.gpus (= vllm.tensor_parallel_size). A native sidecar "
        "shares its pod's node: with vllm.serve 'sidecar' the whole generate pod goes to "
        "this pool; with 'deployment' only the server does.")

    def for_pods(self, *, teacher: bool) -> GPUPlacement:
        """The placement of GPU pods, or of the teacher's pod when ``teacher``."""
        return self.teacher if teacher and self.teacher.own_pool else self


class S3Config(StageConfig):
    """The S3-compatible store the pods read and write. Credentials reach pods only
    through secretKeyRef from an existing Secret (see k8s/secret-template.yaml)."""

    store: str = Field("s3://trackb-artifacts", description="Store root of runs on the "
                       "cluster (s3://bucket/prefix). The pipeline's own 'store' wins when it "
                       "is an s3:// URI; a local path means nothing inside a pod.")
    endpoint_url: str | None = Field(
        "http://minio.minio.svc.cluster.local:9000",
        description="S3 endpoint as seen from pods (TRACKB_S3_ENDPOINT_URL); empty for AWS S3; "
        "https://storage.googleapis.com for GCS (with HMAC keys).")
    region: str = Field("us-east-1", description="AWS_DEFAULT_REGION of the pods.")
    credentials_secret: str | None = Field(
        "trackb-s3", description="Secret holding the access keys (for GCS: HMAC keys); "
        "empty to rely on the pod's identity instead (AWS S3 through IRSA or EKS Pod "
        "Identity; boto3 cannot reach GCS with workload identity).")
    access_key_id_key: str = Field("AWS_ACCESS_KEY_ID",
                                   description="Key of the access key id in that Secret.")
    secret_access_key_key: str = Field("AWS_SECRET_ACCESS_KEY",
                                       description="Key of the secret access key in that Secret.")

    _n = field_validator("credentials_secret")(_check_name)

    @field_validator("store")
    @classmethod
    def _s3(cls, value: str) -> str:
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            raise ValueError("must be an s3://bucket[/prefix] URI")
        return value


class HuggingFaceConfig(StageConfig):
    """Access to the Hugging Face hub for pods that download models."""

    token_secret: str | None = Field("trackb-hf", description="Secret holding the HF token "
                                     "(gated models); empty for public models only.")
    token_key: str = Field("HF_TOKEN", description="Key of the token in that Secret.")
    token_optional: bool = Field(True, description="Start pods even when the Secret is "
                                 "missing (public models need no token).")

    _n = field_validator("token_secret")(_check_name)


class VLLMConfig(StageConfig):
    """The vLLM teacher server used by generate when the teacher is 'openai'."""

    model: str = Field("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", description="Model the server "
                       "loads (hub id or a path in the cache volume); it must fit the GPUs.")
    dtype: Literal["half", "float16", "bfloat16", "float", "float32", "auto"] = Field(
        "half", description="--dtype; T4 (compute 7.5) has no bfloat16, so 'half'.")
    max_model_len: int = Field(8192, ge=256, description="--max-model-len (context length).")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1.0,
                                          description="--gpu-memory-utilization (GPU share).")
    tensor_parallel_size: int = Field(1, ge=1, description="--tensor-parallel-size; equals "
                                      "resources.vllm.gpus.")
    port: int = Field(8000, ge=1024, le=65535, description="Port of the OpenAI-compatible API.")
    startup_seconds: int = Field(1800, ge=60, description="Budget for the model download and "
                                 "load before the startupProbe gives up.")
    serve: Literal["sidecar", "deployment", "external"] = Field(
        "sidecar", description="sidecar: a native sidecar in the generate pod (Kubernetes >= "
        "1.29); deployment: a Deployment + Service the launcher creates, waits for and "
        "always deletes (older clusters); external: no server, generate.base_url names one "
        "(the only choice in the CPU profile).")
    extra_args: list[str] = Field([], description="More vllm serve flags (container args, "
                                  "appended by the image's entrypoint).")
    attention_backend: str = Field(
        "auto", pattern=r"^(auto|default|[A-Z0-9_]+)$",
        description="vllm serve --attention-backend (through TRACKB_VLLM_ATTENTION_BACKEND). "
        "auto: TRITON_ATTN when the server's pool is T4s or names no GPU type (trackb's "
        "default cluster): FlashAttention needs compute capability 8.0 and a T4 is 7.5, so "
        "vLLM must not pick it; on other GPUs vLLM chooses. default: always let vLLM "
        "choose. Otherwise a backend name, e.g. TRITON_ATTN, FLASH_ATTN, FLASHINFER.")


class CacheConfig(StageConfig):
    """The model cache volume at /cache (HF_HOME, pip and trackb caches)."""

    pvc: str | None = Field(None, description="A PersistentVolumeClaim for the cache "
                            "(ReadWriteMany: train and predict-baseline run at once; the "
                            "chart's cacheVolume creates one). With a hub model the run "
                            "starts with warm-cache, which downloads it there once, and the "
                            "steps loading it read it offline. Empty: an emptyDir per pod, "
                            "weights downloaded each time.")
    size_limit: str = Field("50Gi", description="sizeLimit of the emptyDir cache.")

    _n = field_validator("pvc")(_check_name)
    _q = field_validator("size_limit")(_check_quantity)


DeadlinesConfig = create_model(
    "DeadlinesConfig", __base__=StageConfig,
    __doc__="activeDeadlineSeconds per Job: a stage running longer is stopped and failed.",
    **{key: (int, Field(sizing.deadline, ge=60, description=deadline_doc(key)))
       for key, sizing in resource_keys().items()},
    launcher=(int, Field(48 * 3600, ge=60,
                         description="The in-cluster launcher (all stages).")),
)


class JobPolicyConfig(StageConfig):
    """How Jobs retry, fail and clean up."""

    backoff_limit: int = Field(2, ge=0, description="Retries of a failed pod (backoffLimit); "
                               "disruptions (eviction, preemption) do not count.")
    ttl_seconds_after_finished: int = Field(
        86400, ge=0, description="Finished Jobs and pods are deleted after this; the launcher "
        "copies logs to the store before.")
    permanent_exit_codes: list[int] = Field(
        list(PERMANENT_EXIT_CODES), description="Exit codes that fail the Job at once "
        "(podFailurePolicy FailJob): trackb's permanent errors (sysexits 64, 65, 66, 73). A "
        "partitioned step's Job fails whole too: a bad config or input fails every part "
        "alike, so the other parts' pods would only hold GPUs to fail the same way; "
        "finished parts keep their manifests.")
    partition_parallelism: int | None = Field(
        None, ge=1, description="Pods of a partitioned step (extract.partitions, "
        "generate.partitions or eval.partitions > 1: one Indexed Job, a pod per part still "
        "to run) that run at once (parallelism); the rest wait for a pod to finish. A "
        "generate pod has its own vLLM server, a predict-* pod its own GPU, an extract pod "
        "its own CPUs for the sandbox. With Kueue the Job is one "
        "Workload whose pod set counts this many pods: it is admitted when quota for all "
        "of them is free, never in part, so a lower value starts sooner on a busy "
        "ClusterQueue. Empty: every part at once. backoff_limit counts per part "
        "(backoffLimitPerIndex): a failed part is retried alone, the others run on.")
    deadlines: DeadlinesConfig = Field(default_factory=DeadlinesConfig,
                                       description="activeDeadlineSeconds per stage.")

    @field_validator("permanent_exit_codes")
    @classmethod
    def _codes(cls, value: list[int]) -> list[int]:
        if not value or any(not 1 <= code <= 255 for code in value):
            raise ValueError("must be a non-empty list of exit codes 1..255")
        return sorted(set(value))


class SecurityConfig(StageConfig):
    """Pod and container security context (restricted Pod Security Standard)."""

    run_as_user: int = Field(10001, ge=1, description="UID of every container; the images "
                             "create this user.")
    run_as_group: int = Field(10001, ge=1, description="GID of every container.")
    fs_group: int = Field(10001, ge=1, description="Group owning mounted volumes.")
    read_only_root_filesystem: bool = Field(True, description="Mount the image read-only; "
                                            "/tmp and /cache are emptyDir (or the cache PVC).")


class DistributedConfig(StageConfig):
    """Training on several GPUs. GPUs per node: resources.train.gpus (torchrun when > 1)."""

    nodes: int = Field(1, ge=1, description="Nodes training runs on; > 1 makes train an "
                       "Indexed Job with a headless Service for the rendezvous (or a JobSet, "
                       "see gang).")
    master_port: int = Field(29500, ge=1024, le=65535, description="torchrun rendezvous port.")
    gang: Literal["none", "kueue", "jobset"] = Field(
        "none", description="How the nodes of a multi-node training start together. A bare "
        "Indexed Job whose pods are half scheduled holds its GPUs waiting for the rest, "
        "possibly for ever. none: that bare Indexed Job (a cluster with room for all of "
        "them); kueue: the same Job under Kueue (kueue.enabled), which admits a Job's "
        "pods as one Workload, all or nothing on quota (with Kueue's waitForPodsReady also "
        "all or nothing on scheduling); jobset: a JobSet (jobset.x-k8s.io/v1alpha2, the "
        "JobSet controller installed) that restarts every node together when one fails "
        "and makes the rendezvous Service itself; under Kueue too when kueue.enabled.")


class KueueConfig(StageConfig):
    """Kueue (kueue.sigs.k8s.io): quota and fair sharing of a shared GPU cluster. Each
    stage Job (or JobSet) is created suspended with the queue label; Kueue admits it
    when its LocalQueue's ClusterQueue has quota, and unsuspends it. The launcher's own
    Job is not queued: it holds no accelerator, and it must run to submit the stages. A
    partitioned step's Indexed Job is one Workload whose pod set counts its parallelism
    (job.partition_parallelism): admitted for all those pods at once or not at all."""

    enabled: bool = Field(False, description="Submit every stage Job to Kueue: label "
                          "kueue.x-k8s.io/queue-name and spec.suspend true.")
    queue_name: str = Field("trackb", description="The LocalQueue (in kubernetes.namespace) "
                            "the Jobs go to; preflight checks that it exists.")
    priority_class: str | None = Field(
        None, description="A Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-"
        "class): the order of admission and preemption among queued Workloads, apart from "
        "the pods' own priorityClassName; empty: none.")

    _n = field_validator("queue_name", "priority_class")(_check_name)


class StepMetadata(StageConfig):
    """Labels, annotations and tolerations added to pods (and their Jobs)."""

    labels: dict[str, str] = Field({}, description="Labels of the Job and its pods (e.g. a "
                                   "team or cost-center label an admission policy asks for).")
    annotations: dict[str, str] = Field({}, description="Annotations of the Job and its "
                                        "pods.")
    tolerations: list[dict[str, Any]] = Field([], description="Tolerations added to the "
                                              "pods' own (Kubernetes toleration objects).")

    _t = field_validator("tolerations")(_check_tolerations)


class PodMetadataConfig(StageConfig):
    """What a shared cluster asks of each workload: labels, annotations and tolerations
    for every stage, and per step on top (a step's own win on the same key); and the
    steps whose pods an autoscaler or Karpenter must not move, because they hold hours of
    GPU state (safe-to-evict "false", karpenter.sh/do-not-disrupt "true")."""

    all: StepMetadata = Field(default_factory=StepMetadata, description="For every stage "
                              "Job and pod (not the launcher's: see the chart's launcher.*).")
    steps: dict[str, StepMetadata] = Field({}, description="Per step (e.g. train, "
                                           "predict-post), added to 'all'.")
    no_disruption: list[str] = Field(
        ["train", "predict-baseline", "predict-post"], description="Steps whose pods get "
        "cluster-autoscaler.kubernetes.io/safe-to-evict: \"false\" and "
        "karpenter.sh/do-not-disrupt: \"true\": a scale-down or consolidation would "
        "throw away their GPU work (training, model-loaded predictions).")

    @field_validator("steps", "no_disruption")
    @classmethod
    def _known_steps(cls, value: Any) -> Any:
        known = {row.folder for row in STEPS}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown steps {unknown}; steps: {', '.join(sorted(known))}")
        return value


class NetworkConfig(StageConfig):
    """NetworkPolicies: every stage pod refuses ingress (the multi-node rendezvous and
    the vLLM server's clients excepted); eval pods, which execute model-written code,
    reach only DNS and the object store."""

    enabled: bool = Field(True, description="Create a NetworkPolicy beside every pod.")
    store_namespace: str | None = Field("minio", description="Namespace of an in-cluster "
                                        "object store eval pods may reach; empty if external.")
    store_pod_labels: dict[str, str] = Field({}, description="Labels of the object store pods "
                                             "in that namespace; empty: any pod there.")
    store_cidrs: list[str] = Field([], description="IP ranges of an external object store "
                                   "(e.g. the S3 prefix list of the region); 0.0.0.0/0 with "
                                   "store_cidrs_except for a public endpoint whose addresses "
                                   "change (AWS S3 and STS, storage.googleapis.com).")
    store_cidrs_except: list[str] = Field(
        [], description="Ranges cut out of every store_cidrs entry that contains them "
        "(ipBlock except): e.g. the private ranges and 169.254.0.0/16, so 0.0.0.0/0 on the "
        "store ports reaches public endpoints but not the cluster, the VPC or the node's "
        "metadata server.")
    store_ports: list[int] = Field([9000], description="TCP ports of the object store.")
    dns_namespace: str = Field("kube-system", description="Namespace of the cluster DNS.")
    dns_pod_labels: dict[str, str] = Field({"k8s-app": "kube-dns"},
                                           description="Labels of the cluster DNS pods.")
    node_local_dns: str | None = Field(
        None, description="IP of a NodeLocal DNSCache on each node (169.254.20.10), which "
        "pods query instead of the cluster DNS pods; empty: none.")
    pod_identity_agent: bool = Field(
        False, description="Allow the EKS Pod Identity agent (169.254.170.23 and "
        "fd00:ec2::23, TCP 80) to pods with egress locked, which get their AWS credentials "
        "there under EKS Pod Identity.")

    _n = field_validator("store_namespace", "dns_namespace")(_check_name)

    @field_validator("store_cidrs", "store_cidrs_except", "node_local_dns")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        for item in [value] if isinstance(value, str) else value or []:
            try:
                ipaddress.ip_network(item)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or CIDR range: {exc}") from None
        return value


class SandboxConfig(StageConfig):
    """The pods that run model-written code (build-dataset, eval-baseline, eval-post).

    trackb's own sandbox (seccomp, Landlock where the node's kernel has it) holds in any
    pod; these add walls around the whole pod. gVisor (GKE Sandbox: runtime class
    "gvisor") puts a user-space kernel between the code and the node's: the usual choice
    for untrusted code on a shared cluster, and it needs no GPU here, since these pods
    have none. A Localhost seccomp profile narrows what the pod may call further.
    """

    runtime_class_name: str | None = Field(
        None, description="runtimeClassName of code-running pods (e.g. gvisor on GKE "
        "Sandbox); empty: the cluster's default runtime.")
    gvisor: bool = Field(False, description="The runtime class is gVisor: trackb's sandbox "
                         "then counts as meeting its minimum even where seccomp or Landlock "
                         "cannot be applied inside it.")
    seccomp_localhost_profile: str | None = Field(
        None, description="A seccomp profile installed on the nodes (path under the "
        "kubelet's seccomp folder) for code-running containers; empty: RuntimeDefault.")

    _n = field_validator("runtime_class_name")(_check_name)


class LauncherConfig(StageConfig):
    """How long the k8s launcher waits: on a stuck pod before it fails the run, on a
    failing API before it gives up, on another launcher's lease before it takes over."""

    poll_seconds: float = Field(2.0, gt=0, description="Longest wait for a Job event before "
                                "the pods of running stages are inspected again.")
    image_pull_seconds: float = Field(300.0, ge=0, description="Budget for a pod in "
                                      "ErrImagePull / ImagePullBackOff (a slow or flaky "
                                      "registry) before the stage fails.")
    unschedulable_seconds: float = Field(900.0, ge=0, description="Budget for an "
                                         "Unschedulable pod (room for a cluster autoscaler "
                                         "to add a GPU node) before the stage fails.")
    crashloop_restarts: int = Field(3, ge=1, description="Restarts of a crash-looping vLLM "
                                    "server (generate's sidecar, or the Deployment's pod) "
                                    "before the stage fails, naming the likely cause (CUDA "
                                    "out of memory, the startup probe, the last log line). The "
                                    "kubelet restarts a sidecar for ever and no backoffLimit "
                                    "counts it; an unsupported GPU or a driver too old for "
                                    "the image fails at once.")
    crashloop_seconds: float = Field(900.0, ge=0, description="Budget for a crash-looping "
                                     "vLLM server from its first crash seen, when fewer than "
                                     "crashloop_restarts restarts came first (the kubelet's "
                                     "back-off between restarts grows to 5 minutes).")
    pod_creation_seconds: float = Field(900.0, ge=0, description="Budget for a Job that "
                                        "cannot create its pod for a reason that may pass "
                                        "(FailedCreate: an exceeded ResourceQuota that other "
                                        "pods may free, an admission webhook that cannot be "
                                        "reached). A missing PriorityClass or a denial by "
                                        "admission fails at once.")
    multi_attach_seconds: float = Field(900.0, ge=0, description="Budget for a pod waiting "
                                        "for a ReadWriteOnce volume that a pod on another "
                                        "node holds (Multi-Attach error, e.g. a shared cache "
                                        "PVC); longer than the 6 minutes after which "
                                        "Kubernetes detaches a volume from a node that "
                                        "stopped answering.")
    replace_seconds: float = Field(120.0, gt=0, description="Wait for a leftover object of "
                                   "an earlier attempt to be deleted before recreating it.")
    api_retry_seconds: float = Field(300.0, ge=0, description="How long an API call that "
                                     "failed for a passing reason (connection reset, 429, "
                                     "5xx) is retried, with exponential backoff and jitter, "
                                     "before the launcher exits 75 (deleting nothing: a "
                                     "later launcher adopts the run's Jobs).")
    admission_seconds: float = Field(1800.0, ge=0, description="Budget for a stage Job "
                                     "that Kueue keeps suspended (its Workload not admitted: "
                                     "no quota free in the ClusterQueue) before the stage "
                                     "fails, naming the Workload and Kueue's reason. A "
                                     "LocalQueue or ClusterQueue that does not exist fails "
                                     "at once.")
    progress_seconds: float = Field(30.0, gt=0, description="How often the launcher "
                                    "prints each running part of a partitioned step (done/"
                                    "total items, rate, ETA, from its progress.json in the "
                                    "store); the first lines come as soon as a part "
                                    "reports.")
    lease_seconds: int = Field(60, ge=1, description="Duration of the run's Lease: a second "
                               "launcher of the same run id waits, and takes over only after "
                               "the holder has not renewed it for this long (it died); a "
                               "launcher that exits gives the lease up at once.")


class KubernetesConfig(StageConfig):
    """How trackb's stages run on Kubernetes: images, scheduling, storage, vLLM, policy.

    Shared by the Job builder, the launcher and the Helm chart (values.schema.json).
    """

    namespace: str = Field("trackb", description="Namespace of every object.")
    service_account: str = Field("trackb-launcher", description="ServiceAccount of the "
                                 "launcher (bound to the Role in k8s/rbac.yaml).")
    job_service_account: str | None = Field(
        None, description="ServiceAccount of stage pods, e.g. one annotated for IRSA or GKE "
        "workload identity, or associated with an EKS Pod Identity role, to reach the store "
        "without keys (the chart creates it with stageServiceAccount.create); empty: the "
        "namespace default. Its API token is never mounted.")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="GPU or CPU profile. auto: cpu when model is 'tiny' (the CPU "
        "demo), gpu otherwise. The cpu profile runs every stage on the cpu image without "
        "GPUs or GPU node selection.")
    images: ImagesConfig = Field(default_factory=ImagesConfig, description="Container images.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig,
                                       description="Requests and limits per container.")
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig,
                                         description="GPU node selection and tolerations.")
    s3: S3Config = Field(default_factory=S3Config, description="The object store of the pods.")
    huggingface: HuggingFaceConfig = Field(default_factory=HuggingFaceConfig,
                                           description="Hugging Face hub token.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="The vLLM teacher server.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Model cache volume.")
    job: JobPolicyConfig = Field(default_factory=JobPolicyConfig,
                                 description="Retries, deadlines, clean-up.")
    security: SecurityConfig = Field(default_factory=SecurityConfig,
                                     description="Security context of every pod.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Multi-GPU and multi-node training.")
    network: NetworkConfig = Field(default_factory=NetworkConfig,
                                   description="NetworkPolicies (eval egress lock-down).")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig,
                                   description="Pods that run model-written code: runtime "
                                   "class (gVisor) and seccomp profile.")
    kueue: KueueConfig = Field(default_factory=KueueConfig, description="Kueue queueing "
                               "(shared GPU quota).")
    pod_metadata: PodMetadataConfig = Field(default_factory=PodMetadataConfig,
                                            description="Labels, annotations and tolerations "
                                            "per step; no-disruption annotations.")
    budgets: LauncherConfig = Field(default_factory=LauncherConfig,
                                    description="The launcher's waits for stuck pods.")

    _n = field_validator("namespace", "service_account", "job_service_account")(_check_name)

    @model_validator(mode="after")
    def _consistent(self) -> KubernetesConfig:
        if self.distributed.gang == "kueue" and not self.kueue.enabled:
            raise ValueError("distributed.gang 'kueue' needs kueue.enabled (and a LocalQueue "
                             "in kueue.queue_name)")
        if self.vllm.tensor_parallel_size != self.resources.vllm.gpus:
            raise ValueError(f"vllm.tensor_parallel_size ({self.vllm.tensor_parallel_size}) "
                             f"must equal resources.vllm.gpus ({self.resources.vllm.gpus})")
        return self


def kubernetes_json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`KubernetesConfig` (the Helm chart's values schema)."""
    return KubernetesConfig.model_json_schema()
