"""``KubernetesConfig``: everything a cluster needs to run trackb's stages as Jobs.

This one model is the schema shared by the Job builder (:mod:`trackb_core.k8s.jobspec`)
and the Helm chart: the chart's ``values.schema.json`` is generated from
:func:`kubernetes_json_schema`, so there is one set of defaults, not two. Each field's
``description`` is its documentation. Defaults fit a cluster of NVIDIA T4 nodes
(16 GB, fp16 only) with an in-cluster MinIO; the CPU profile (model ``tiny``) uses the
same settings minus the GPUs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from trackb_core import __version__
from trackb_core.config import StageConfig
from trackb_core.errors import PERMANENT_EXIT_CODES
from trackb_core.stages import deadline_doc, resource_keys

# Kubernetes quantities such as 500m, 2, 1.5, 4Gi, 512Mi.
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
# RFC 1123 label: namespaces, Secret, ServiceAccount and PVC names.
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _check_quantity(value: str | None) -> str | None:
    if value is not None and not QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
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
    tag: str = Field(__version__, description="Tag of all three images (make images tags "
                     "them from git describe).")
    cpu: str = Field("trackb-cpu", description="Image of extract, the generate client, "
                     "build-dataset, tiny-model, compare and the launcher; also train and "
                     "eval in the CPU profile. No CUDA.")
    trainer: str = Field("trackb-trainer", description="Image of train and eval on GPUs "
                         "(CUDA 12, torch, transformers, peft, trl).")
    vllm: str = Field("trackb-vllm", description="Image of the vLLM teacher server "
                      "(FROM a pinned vllm/vllm-openai).")
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
VLLMResources = _sized("VLLMResources", "The vLLM teacher server of generate.",
                       "2", "12Gi", "4", "14Gi", disk="4Gi", shm="2Gi", gpus=1)
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


class SchedulingConfig(StageConfig):
    """Where GPU pods run. Labels and taints differ by platform, so both are settings:
    NVIDIA GPU feature discovery labels nvidia.com/gpu.product; GKE uses
    cloud.google.com/gke-accelerator: nvidia-tesla-t4."""

    node_selector: dict[str, str] = Field(
        {"nvidia.com/gpu.product": "Tesla-T4"},
        description="nodeSelector of GPU pods (train, eval, vLLM).")
    tolerations: list[dict[str, Any]] = Field(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="Tolerations of GPU pods (Kubernetes toleration objects).")
    cpu_node_selector: dict[str, str] = Field({}, description="nodeSelector of CPU-only pods.")
    priority_class_name: str | None = Field(None, description="priorityClassName of every "
                                            "pod; empty for the cluster default.")

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in value:
            unknown = set(item) - TOLERATION_KEYS
            if unknown:
                raise ValueError(f"unknown toleration keys {sorted(unknown)}; allowed: "
                                 f"{sorted(TOLERATION_KEYS)}")
        return value


class S3Config(StageConfig):
    """The S3-compatible store the pods read and write. Credentials reach pods only
    through secretKeyRef from an existing Secret (see k8s/secret-template.yaml)."""

    store: str = Field("s3://trackb-artifacts", description="Store root of runs on the "
                       "cluster (s3://bucket/prefix). The pipeline's own 'store' wins when it "
                       "is an s3:// URI; a local path means nothing inside a pod.")
    endpoint_url: str | None = Field(
        "http://minio.minio.svc.cluster.local:9000",
        description="S3 endpoint as seen from pods (TRACKB_S3_ENDPOINT_URL); empty for AWS S3.")
    region: str = Field("us-east-1", description="AWS_DEFAULT_REGION of the pods.")
    credentials_secret: str | None = Field(
        "trackb-s3", description="Secret holding the access keys; empty to rely on the "
        "pod's identity (IRSA, workload identity) instead.")
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


class CacheConfig(StageConfig):
    """The model cache volume at /cache (HF_HOME, pip and trackb caches)."""

    pvc: str | None = Field(None, description="An existing PersistentVolumeClaim for the "
                            "cache (ReadWriteMany when train and eval-baseline share it); "
                            "empty: an emptyDir per pod, weights downloaded each time.")
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
        "(podFailurePolicy FailJob): trackb's permanent errors (sysexits 64, 65, 66, 73).")
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
                       "Indexed Job with a headless Service for the rendezvous.")
    master_port: int = Field(29500, ge=1024, le=65535, description="torchrun rendezvous port.")


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
                                   "(e.g. the S3 prefix list of the region).")
    store_ports: list[int] = Field([9000], description="TCP ports of the object store.")
    dns_namespace: str = Field("kube-system", description="Namespace of the cluster DNS.")
    dns_pod_labels: dict[str, str] = Field({"k8s-app": "kube-dns"},
                                           description="Labels of the cluster DNS pods.")

    _n = field_validator("store_namespace", "dns_namespace")(_check_name)


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
        None, description="ServiceAccount of stage pods (e.g. one bound to an IAM role for "
        "S3); empty: the namespace default. Its API token is never mounted.")
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
    budgets: LauncherConfig = Field(default_factory=LauncherConfig,
                                    description="The launcher's waits for stuck pods.")

    _n = field_validator("namespace", "service_account", "job_service_account")(_check_name)

    @model_validator(mode="after")
    def _consistent(self) -> KubernetesConfig:
        if self.vllm.tensor_parallel_size != self.resources.vllm.gpus:
            raise ValueError(f"vllm.tensor_parallel_size ({self.vllm.tensor_parallel_size}) "
                             f"must equal resources.vllm.gpus ({self.resources.vllm.gpus})")
        return self


def kubernetes_json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`KubernetesConfig` (the Helm chart's values schema)."""
    return KubernetesConfig.model_json_schema()
