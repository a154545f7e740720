"""The one Job-spec builder: ``(stage, config, run_id) -> [plain dict, ...]``.

The launcher, ``trackb render`` and the checked-in ``k8s/rendered/`` all come from
here. It is pure: no ``kubernetes`` import, no network, no clock, so every field is
unit-tested and the rendered files are byte-for-byte reproducible.

Each stage is a ConfigMap (the stage's config, exactly as
:func:`trackb_core.pipeline.plan` wires it, as YAML) and a Job running
``python -m jobs.<stage> --config /etc/trackb/config.yaml --out <store>/runs/<id>/<stage>``.
What differs between stages comes from their row of the step table
(:data:`trackb_core.stages.STEPS`): entry module, resources and deadline, GPU or not.
Every stage gets a NetworkPolicy that refuses ingress; the stages that execute
model-written code (``runs_model_code``: build-dataset runs teacher tests, eval runs
model answers) may reach only DNS and the object store (the corpus comes from extract's
snapshot there). Multi-node training adds a headless Service, or is a JobSet
(``distributed.gang``). On a shared cluster each stage's Job and pods carry what its
policies ask (``pod_metadata``), and with Kueue the Job starts suspended in its queue
(``kueue``). The one change to
plan()'s configs: with a vLLM server that the builder creates, the teacher client's
``base_url`` points at that server.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trackb_core import __version__
from trackb_core.config import StageConfig
from trackb_core.errors import EXIT_STAGE_FAILED, ConfigError
from trackb_core.k8s.settings import KubernetesConfig, Resources
from trackb_core.partition import partitions_of
from trackb_core.pipeline import (
    RUN_ID,
    TINY,
    PipelineConfig,
    model_is_path,
    plan,
    steps_for,
    warms_cache,
)
from trackb_core.sandbox import RUNTIME_ENV as SANDBOX_RUNTIME_ENV
from trackb_core.stages import STEPS, Step, step
from trackb_core.store import open_store

MAIN_CONTAINER = "stage"  # the container whose exit code and logs are the stage's
VLLM_CONTAINER = "vllm"
WAIT_CONTAINER = "wait-for-teacher"
LAUNCHER = "launcher"
CONFIG_DIR = "/etc/trackb"
CONFIG_FILE = "config.yaml"
CACHE_DIR = "/cache"
NAME_MAX = 52  # Job names: pods append "-<index>-<5 chars>"; hostnames stay under 63.
# The launcher pod's own Job (name, uid), from the labels the Job controller puts on its
# pods (downward API): the owner of the vLLM server the launcher creates.
LAUNCHER_JOB_ENV = {"TRACKB_LAUNCHER_JOB": "batch.kubernetes.io/job-name",
                    "TRACKB_LAUNCHER_JOB_UID": "batch.kubernetes.io/controller-uid"}
# Kueue: the LocalQueue a Job is submitted to, and the WorkloadPriorityClass it is queued by.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# Pods a cluster autoscaler (scale-down) or Karpenter (consolidation) must leave alone.
NO_DISRUPTION = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                 "karpenter.sh/do-not-disrupt": "true"}
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
# The one replicated Job of a multi-node training's JobSet; its pods are named
# <jobset>-node-<job index>-<pod index>, so a 52-character JobSet name keeps them under 63.
JOBSET_REPLICA = "node"
# Kinds whose object runs a stage (the launcher creates, watches and deletes it).
RUNNER_KINDS = ("Job", "JobSet")
# A partitioned step's Indexed Job: the parts it runs, in completion-index order
# (TRACKB_PARTITIONS="1,3": index 0 runs part 1, index 1 part 3), and the pod's own
# completion index, from the annotation the Job controller puts on each pod. The
# container entry (jobs/_entry.py) turns the two into --partition (pod_partition).
PARTITIONS_ENV = "TRACKB_PARTITIONS"
COMPLETION_INDEX_ENV = "TRACKB_COMPLETION_INDEX"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Waits in the generate pod until the teacher lists its models; exit 75 (EX_TEMPFAIL)
# is retryable, so the Job's backoffLimit decides what happens next.
WAIT_SCRIPT = """\
import os, sys, time, urllib.request
url = os.environ["TEACHER_MODELS_URL"]
deadline = time.monotonic() + int(os.environ["TEACHER_WAIT_SECONDS"])
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200 and b'"data"' in response.read():
                print(f"teacher ready: {url}", flush=True)
                sys.exit(0)
            error = f"HTTP {response.status}"
    except Exception as exc:
        error = str(exc)
    if time.monotonic() > deadline:
        print(f"teacher not ready at {url}: {error}", file=sys.stderr)
        sys.exit(75)
    time.sleep(5)
"""


# -- names, labels, profile ---------------------------------------------------------------
def object_name(run_id: str, part: str) -> str:
    """``trackb-<run_id>-<part>``, shortened with a hash to at most NAME_MAX characters."""
    name = f"trackb-{run_id}-{part}"
    if len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    head = name[: NAME_MAX - len(part) - 8].rstrip("-")
    return f"{head}-{digest}-{part}"


def labels(run_id: str, stage: str) -> dict[str, str]:
    """Recommended labels plus trackb/run-id and trackb/stage."""
    return {
        "app.kubernetes.io/name": "trackb",
        "app.kubernetes.io/instance": f"trackb-{run_id}"[:63].rstrip("-"),
        "app.kubernetes.io/component": stage,
        "app.kubernetes.io/part-of": "trackb",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "trackb",
        "trackb/run-id": run_id,
        "trackb/stage": stage,
    }


def step_metadata(k8s: KubernetesConfig, stage: str
                  ) -> tuple[dict[str, str], dict[str, str], list[dict[str, Any]]]:
    """``(labels, annotations, tolerations)`` the cluster's own policies ask of ``stage``'s
    Job and pods: ``pod_metadata.all``, then the step's own (winning on the same key);
    the launcher's Job gets none. trackb's own labels win over both in the objects."""
    if stage == LAUNCHER:
        return {}, {}, []
    meta = k8s.pod_metadata
    own = meta.steps.get(stage)
    parts = [meta.all, *([own] if own else [])]
    found_labels = {k: v for part in parts for k, v in part.labels.items()}
    annotations = {k: v for part in parts for k, v in part.annotations.items()}
    tolerations = [dict(t) for part in parts for t in part.tolerations]
    return found_labels, annotations, tolerations


def pod_annotations(k8s: KubernetesConfig, stage: str) -> dict[str, str]:
    """The annotations of ``stage``'s pods: :func:`step_metadata`'s and, for the steps in
    ``pod_metadata.no_disruption``, :data:`NO_DISRUPTION`."""
    annotations = dict(step_metadata(k8s, stage)[1])
    if stage in k8s.pod_metadata.no_disruption:
        annotations.update(NO_DISRUPTION)
    return annotations


def queued(k8s: KubernetesConfig, stage: str) -> bool:
    """Whether ``stage``'s Job goes through Kueue (every stage's when enabled, never the
    launcher's: it holds no GPU and must run to submit the stages)."""
    return k8s.kueue.enabled and stage != LAUNCHER


def selector(run_id: str, stage: str) -> dict[str, str]:
    """The labels that pick out one stage's pods."""
    return {"trackb/run-id": run_id, "trackb/stage": stage}


def uses_gpu(config: PipelineConfig) -> bool:
    """Whether the GPU profile applies (accelerator, or auto: not the tiny model)."""
    mode = config.kubernetes.accelerator
    return mode == "gpu" or (mode == "auto" and config.model != TINY)


def cluster_store_uri(config: PipelineConfig) -> str:
    """The store the pods use: the pipeline's ``store`` if s3://, else kubernetes.s3.store."""
    store = str(config.store)
    return store.rstrip("/") if store.startswith("s3://") else config.kubernetes.s3.store


def run_uri(config: PipelineConfig, run_id: str) -> str:
    """``<cluster store>/runs/<run_id>``."""
    return open_store(cluster_store_uri(config)).child(f"runs/{run_id}").uri


def teacher_step() -> Step:
    """The step that asks the teacher (generate)."""
    return next(row for row in STEPS if row.asks_teacher)


def needs_teacher_server(config: PipelineConfig) -> bool:
    """Whether the configured teacher answers from an OpenAI-compatible server."""
    return getattr(config, teacher_step().section).kind.needs_server


def serves_vllm(config: PipelineConfig) -> bool:
    """Whether the teacher step needs a vLLM server that trackb creates.

    Raises ConfigError for a server teacher in the CPU profile with a server to create.
    """
    if not needs_teacher_server(config) or config.kubernetes.vllm.serve == "external":
        return False
    if not uses_gpu(config):
        raise ConfigError("the CPU profile cannot run vLLM: set kubernetes.vllm.serve=external "
                          "(generate.base_url names the server), kubernetes.accelerator=gpu, "
                          "or generate.teacher=reference")
    return True


def teacher_url(config: PipelineConfig, run_id: str) -> str:
    """The base URL the generate client calls."""
    k8s = config.kubernetes
    if not serves_vllm(config):
        return getattr(config, teacher_step().section).base_url
    if k8s.vllm.serve == "sidecar":
        # 127.0.0.1, not localhost: vLLM listens on IPv4 and localhost may resolve to ::1.
        return f"http://127.0.0.1:{k8s.vllm.port}/v1"
    service = object_name(run_id, "vllm")
    return f"http://{service}.{k8s.namespace}.svc:{k8s.vllm.port}/v1"


def _check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id or ""):
        raise ConfigError(f"run id {run_id!r} must be 1-63 lowercase letters, digits or '-', "
                          "starting and ending with a letter or digit")


def stage_configs(config: PipelineConfig, run_id: str) -> dict[str, StageConfig]:
    """Every stage's config as plan() wires it on the cluster store, in run order.

    Raises ConfigError for an invalid run id or a section that sets a wired field.
    """
    _check_run_id(run_id)
    run = open_store(cluster_store_uri(config)).child(f"runs/{run_id}")
    configs = {}
    for row, stage_config in plan(config, run):
        if row.asks_teacher and stage_config.kind.needs_server and serves_vllm(config):
            # Every pod asks its own server (a sidecar) or the one trackb creates: never
            # a list of servers meant for parts run elsewhere.
            update: dict[str, Any] = {"base_url": teacher_url(config, run_id)}
            if getattr(stage_config, "base_urls", None):
                update["base_urls"] = []
            stage_config = stage_config.model_copy(update=update)
        configs[row.folder] = stage_config
    return configs


def stage_uri(config: PipelineConfig, run_id: str, stage: str) -> str:
    """Output URI of ``stage`` in the run."""
    return f"{run_uri(config, run_id)}/{stage}"


# -- pieces -------------------------------------------------------------------------------
def _resources(res: Resources, gpu: bool) -> dict[str, Any]:
    requests = {"cpu": res.cpu_request, "memory": res.memory_request,
                "ephemeral-storage": res.ephemeral_storage}
    limits: dict[str, Any] = {"cpu": res.cpu_limit, "memory": res.memory_limit}
    if gpu and res.gpus:
        # Extended resources: requests must equal limits.
        requests["nvidia.com/gpu"] = str(res.gpus)
        limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _container_security(k8s: KubernetesConfig, code: bool = False) -> dict[str, Any]:
    """The restricted container securityContext; a code-running container (``code``)
    gets the Localhost seccomp profile when one is configured."""
    profile = k8s.sandbox.seccomp_localhost_profile if code else None
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": k8s.security.read_only_root_filesystem,
        "runAsNonRoot": True,
        "runAsUser": k8s.security.run_as_user,
        "runAsGroup": k8s.security.run_as_group,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "Localhost", "localhostProfile": profile} if profile
        else {"type": "RuntimeDefault"},
    }


def _pod_security(k8s: KubernetesConfig) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": k8s.security.run_as_user,
        "runAsGroup": k8s.security.run_as_group,
        "fsGroup": k8s.security.fs_group,
        # Without it the kubelet chowns every file of a volume at each start: minutes on
        # a cache PVC holding model weights. Only a root of another group is fixed.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _s3_env(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if k8s.s3.endpoint_url:
        env.append({"name": "TRACKB_S3_ENDPOINT_URL", "value": k8s.s3.endpoint_url})
    env.append({"name": "AWS_DEFAULT_REGION", "value": k8s.s3.region})
    if k8s.s3.credentials_secret:
        # Only ever through secretKeyRef: no credential is written into a manifest.
        for name, key in (("AWS_ACCESS_KEY_ID", k8s.s3.access_key_id_key),
                          ("AWS_SECRET_ACCESS_KEY", k8s.s3.secret_access_key_key)):
            env.append({"name": name, "valueFrom": {"secretKeyRef": {
                "name": k8s.s3.credentials_secret, "key": key}}})
    return env


def _hf_env(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    hf = k8s.huggingface
    if not hf.token_secret:
        return []
    ref: dict[str, Any] = {"name": hf.token_secret, "key": hf.token_key}
    if hf.token_optional:
        ref["optional"] = True
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}]


def _cache_env() -> list[dict[str, Any]]:
    # The root filesystem is read-only: every tool's cache goes to /tmp or /cache.
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TRACKB_CACHE", "value": f"{CACHE_DIR}/trackb"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]


def _base_mounts(with_config: bool) -> list[dict[str, Any]]:
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    if with_config:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    return mounts


def _volumes(k8s: KubernetesConfig, tmp_size: str, config_map: str | None,
             shm: str | None) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}}]
    if k8s.cache.pvc:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": k8s.cache.pvc}})
    else:
        volumes.append({"name": "cache", "emptyDir": {"sizeLimit": k8s.cache.size_limit}})
    if config_map:
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    if shm:
        # /dev/shm is 64 MB in a pod by default: too small for NCCL, vLLM and DataLoaders.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    return volumes


def _metadata(k8s: KubernetesConfig, name: str, run_id: str, stage: str) -> dict[str, Any]:
    return {"name": name, "namespace": k8s.namespace, "labels": labels(run_id, stage)}


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """An ownerReference to the object ``kind``/``name``: deleting it deletes the owned
    object (the garbage collector). Uids exist only on a cluster, so the launcher adds
    these when it creates objects; rendered manifests carry none.

    ``blockOwnerDeletion`` is false: true would need update on the owner's finalizers
    (OwnerReferencesPermissionEnforcement), a grant the launcher does not need.
    """
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": False}


def _config_map(k8s: KubernetesConfig, name: str, run_id: str, stage: str, key: str,
                text: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(k8s, name, run_id, stage), "data": {key: text}}


def _dump_config(stage_config: StageConfig) -> str:
    import yaml

    return yaml.safe_dump(stage_config.model_dump(mode="json"), sort_keys=False)


def _pod_failure_policy(k8s: KubernetesConfig, launcher: bool = False) -> dict[str, Any]:
    # The launcher's "a stage failed for good" (80) is permanent for the launcher Job: a
    # retry would rerun the failed stage with its own retries, GPU pods each time.
    codes = sorted({*k8s.job.permanent_exit_codes, *((EXIT_STAGE_FAILED,) if launcher else ())})
    return {"rules": [
        # trackb's permanent errors (bad config or input): retrying cannot help. In a
        # partitioned step's Indexed Job too (FailJob, not FailIndex): every part reads
        # the same config and input, so the other parts would fail alike; finished
        # parts keep their manifests for the next launch.
        {"action": "FailJob", "onExitCodes": {"containerName": MAIN_CONTAINER,
                                              "operator": "In", "values": codes}},
        # Eviction, preemption, node drain: not the stage's fault, not a retry spent.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                  "status": "True"}]},
    ]}


def _deadline(k8s: KubernetesConfig, row: Step) -> int:
    return int(getattr(k8s.job.deadlines, row.resources))


def _resources_for(k8s: KubernetesConfig, row: Step) -> Resources:
    return getattr(k8s.resources, row.resources)


def placement(k8s: KubernetesConfig, *, gpu: bool, teacher: bool = False) -> dict[str, Any]:
    """nodeSelector, affinity and tolerations of a pod: a GPU pod's from
    kubernetes.scheduling (the teacher's pool for the vLLM server's pod, when
    ``teacher`` and scheduling.teacher.own_pool), a CPU pod's cpu_node_selector only."""
    if not gpu:
        selector_ = k8s.scheduling.cpu_node_selector
        return {"nodeSelector": dict(selector_)} if selector_ else {}
    pool = k8s.scheduling.for_pods(teacher=teacher)
    spec: dict[str, Any] = {}
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    affinity = copy.deepcopy(pool.node_affinity)
    if pool.gpu_types:
        # Terms of a required nodeAffinity are ORed and their expressions ANDed: the GPU
        # type must hold in every term.
        expression = {"key": pool.gpu_type_label, "operator": "In",
                      "values": list(pool.gpu_types)}
        required = affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
        terms = required.get("nodeSelectorTerms") or [{}]
        for term in terms:
            term["matchExpressions"] = [*term.get("matchExpressions", []), expression]
        required["nodeSelectorTerms"] = terms
    if affinity:
        spec["affinity"] = {"nodeAffinity": affinity}
    if pool.tolerations:
        spec["tolerations"] = [dict(t) for t in pool.tolerations]
    return spec


def _pod_spec(k8s: KubernetesConfig, *, containers: list[dict[str, Any]],
              volumes: list[dict[str, Any]], gpu: bool, restart: str = "Never",
              init_containers: list[dict[str, Any]] | None = None,
              service_account: str | None = None, mount_token: bool = False,
              subdomain: str | None = None, runtime_class: str | None = None,
              teacher: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"restartPolicy": restart}
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    account = service_account if service_account is not None else k8s.job_service_account
    if account:
        spec["serviceAccountName"] = account
    # Stage pods never talk to the Kubernetes API: no token to steal from them.
    spec["automountServiceAccountToken"] = mount_token
    spec["enableServiceLinks"] = False
    if subdomain:
        spec["subdomain"] = subdomain
    spec["securityContext"] = _pod_security(k8s)
    spec.update(placement(k8s, gpu=gpu, teacher=teacher))
    if k8s.scheduling.priority_class_name:
        spec["priorityClassName"] = k8s.scheduling.priority_class_name
    if k8s.images.pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in k8s.images.pull_secrets]
    if init_containers:
        spec["initContainers"] = init_containers
    spec["containers"] = containers
    spec["volumes"] = volumes
    return spec


def _job(k8s: KubernetesConfig, name: str, run_id: str, stage: str, pod: dict[str, Any],
         deadline: int, *, indexed: int = 0, parts: int = 0) -> dict[str, Any]:
    """A Job; ``indexed``: an Indexed Job of that many pods that all run at once (the
    nodes of a training); ``parts``: an Indexed Job of that many parts of a partitioned
    step, at most partition_parallelism at a time, each retried alone."""
    extra_labels, extra_annotations, _ = step_metadata(k8s, stage)
    spec: dict[str, Any] = {}
    if queued(k8s, stage):
        # Kueue unsuspends the Job when its Workload is admitted (quota reserved).
        spec["suspend"] = True
    if indexed:
        spec.update({"completionMode": "Indexed", "completions": indexed,
                     "parallelism": indexed, "backoffLimit": k8s.job.backoff_limit})
    elif parts:
        # Parts are independent: a part that fails is retried alone (backoffLimitPerIndex;
        # no Job-wide backoffLimit, whose API default is then unlimited, so one flaky part
        # cannot spend the others' retries), and the others run on. No maxFailedIndexes:
        # every part runs, the Job fails at the end listing status.failedIndexes, and the
        # next launch runs only the parts without a manifest.
        spec.update({"completionMode": "Indexed", "completions": parts,
                     "parallelism": min(parts, k8s.job.partition_parallelism or parts),
                     "backoffLimitPerIndex": k8s.job.backoff_limit})
    else:
        spec["backoffLimit"] = k8s.job.backoff_limit
    spec.update({
        "activeDeadlineSeconds": deadline,
        "ttlSecondsAfterFinished": k8s.job.ttl_seconds_after_finished,
        "podFailurePolicy": _pod_failure_policy(k8s, launcher=stage == LAUNCHER),
        "template": {"metadata": _pod_metadata(k8s, run_id, stage), "spec": pod},
    })
    metadata = _metadata(k8s, name, run_id, stage)
    metadata["labels"] = {**extra_labels, **metadata["labels"]}
    if queued(k8s, stage):
        metadata["labels"][KUEUE_QUEUE_LABEL] = k8s.kueue.queue_name
        if k8s.kueue.priority_class:
            metadata["labels"][KUEUE_PRIORITY_LABEL] = k8s.kueue.priority_class
    annotations = {**extra_annotations, **_checkov_skips(k8s, pod)}
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def _pod_metadata(k8s: KubernetesConfig, run_id: str, stage: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {**step_metadata(k8s, stage)[0], **labels(run_id, stage)}}
    annotations = pod_annotations(k8s, stage)
    if annotations:
        meta["annotations"] = annotations
    return meta


def _jobset(job: dict[str, Any], k8s: KubernetesConfig) -> dict[str, Any]:
    """A multi-node training's Indexed Job as a JobSet (distributed.gang 'jobset').

    The JobSet controller creates the Job and the headless Service of the rendezvous
    (network.enableDNSHostnames), and treats the nodes as one: a node that fails
    restarts all of them (failurePolicy.maxRestarts, the gang's retries in place of the
    Job's backoffLimit), a permanent error (the Job's podFailurePolicy FailJob) fails
    the whole JobSet at once. Kueue, when enabled, queues the JobSet as one Workload:
    the queue label and suspend move from the Job to it.
    """
    metadata = job["metadata"]
    child = {k: v for k, v in job["spec"].items()
             if k not in ("suspend", "ttlSecondsAfterFinished")}
    # One pod failure fails this Job: the JobSet then restarts every node together.
    child["backoffLimit"] = 0
    spec: dict[str, Any] = {}
    if "suspend" in job["spec"]:
        spec["suspend"] = job["spec"]["suspend"]
    spec.update({
        # Ranks resolve <jobset>-node-0-0.<jobset> before any of them is Ready.
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [JOBSET_REPLICA]},
        "failurePolicy": {"maxRestarts": k8s.job.backoff_limit, "rules": [
            {"name": "permanent-error", "action": "FailJobSet",
             "onJobFailureReasons": ["PodFailurePolicy"]}]},
        "ttlSecondsAfterFinished": k8s.job.ttl_seconds_after_finished,
        "replicatedJobs": [{"name": JOBSET_REPLICA, "replicas": 1, "template": {
            "metadata": {"labels": dict(job["spec"]["template"]["metadata"]["labels"])},
            "spec": child}}],
    })
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": metadata, "spec": spec}


def runner(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The object among a stage's ``objects`` that runs it: its Job or JobSet."""
    return next(o for o in objects if o.get("kind") in RUNNER_KINDS)


# Node label values that mean an NVIDIA T4: GPU feature discovery's Tesla-T4, GKE's
# nvidia-tesla-t4, Karpenter's t4, and EKS's g4dn instance types (one to eight T4s).
T4_LABEL_VALUE = re.compile(r"(?i)(^|[^a-z0-9])t4($|[^a-z0-9])|^g4dn\.")


def teacher_on_t4(k8s: KubernetesConfig) -> bool:
    """Whether the vLLM server's pool is T4s: one of its GPU types or selector values
    names a T4, or it names no GPU type at all (trackb's default cluster is T4s)."""
    pool = k8s.scheduling.for_pods(teacher=True)
    values = [*pool.gpu_types, *pool.node_selector.values()]
    for term in pool.node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution",
                                       {}).get("nodeSelectorTerms", []):
        for expression in term.get("matchExpressions", []):
            if expression.get("operator") == "In":
                values += expression.get("values", [])
    return not values or any(T4_LABEL_VALUE.search(str(value)) for value in values)


def attention_backend(k8s: KubernetesConfig) -> str | None:
    """The vLLM attention backend to force (vllm.attention_backend), or None for vLLM's
    own choice: auto is TRITON_ATTN on T4s (:func:`teacher_on_t4`), since FlashAttention
    needs compute capability 8.0 and a T4 is 7.5."""
    chosen = k8s.vllm.attention_backend
    if chosen == "auto":
        return "TRITON_ATTN" if teacher_on_t4(k8s) else None
    return None if chosen == "default" else chosen


def _attention_env(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    backend = attention_backend(k8s)
    # The entrypoint turns it into `vllm serve --attention-backend` (vLLM's documented
    # way since the attention config moved to the CLI).
    return [{"name": "TRACKB_VLLM_ATTENTION_BACKEND", "value": backend}] if backend else []


def _vllm_container(k8s: KubernetesConfig, *, sidecar: bool) -> dict[str, Any]:
    vllm = k8s.vllm
    port = vllm.port
    container: dict[str, Any] = {
        "name": VLLM_CONTAINER,
        "image": k8s.images.ref(k8s.images.vllm),
        "imagePullPolicy": k8s.images.pull_policy,
    }
    if sidecar:
        # A native sidecar: lives exactly as long as the client; the Job completes
        # when the client exits (Kubernetes >= 1.29).
        container["restartPolicy"] = "Always"
    if vllm.extra_args:
        container["args"] = list(vllm.extra_args)  # appended to `vllm serve` by the image
    container.update({
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        # The image's entrypoint (images/vllm/entrypoint.sh) builds `vllm serve` from
        # these and checks them, exiting 64 (permanent) on a bad value.
        "env": [{"name": "TRACKB_VLLM_MODEL", "value": vllm.model},
                {"name": "TRACKB_VLLM_DTYPE", "value": vllm.dtype},
                {"name": "TRACKB_VLLM_MAX_MODEL_LEN", "value": str(vllm.max_model_len)},
                {"name": "TRACKB_VLLM_GPU_MEMORY_UTILIZATION",
                 "value": str(vllm.gpu_memory_utilization)},
                {"name": "TRACKB_VLLM_TENSOR_PARALLEL_SIZE",
                 "value": str(vllm.tensor_parallel_size)},
                {"name": "TRACKB_VLLM_HOST", "value": "0.0.0.0"},
                {"name": "TRACKB_VLLM_LISTEN_PORT", "value": str(port)},
                *_attention_env(k8s),
                *_hf_env(k8s), *_cache_env(),
                {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
                {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
                {"name": "DO_NOT_TRACK", "value": "1"}],
        "resources": _resources(k8s.resources.vllm, gpu=True),
        # /health answers before the model is loaded: gate on /v1/models instead, with a
        # startup budget long enough for the download (no liveness kill mid-download).
        "startupProbe": {"httpGet": {"path": "/v1/models", "port": port},
                         "periodSeconds": 10, "timeoutSeconds": 5,
                         "failureThreshold": max(1, math.ceil(vllm.startup_seconds / 10))},
        "readinessProbe": {"httpGet": {"path": "/v1/models", "port": port},
                           "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": port},
                          "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5},
        "securityContext": _container_security(k8s),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [*_base_mounts(False)] + (
            [{"name": "dshm", "mountPath": "/dev/shm"}] if k8s.resources.vllm.shm_size else []),
    })
    return container


def _wait_container(k8s: KubernetesConfig, url: str) -> dict[str, Any]:
    return {
        "name": WAIT_CONTAINER,
        "image": k8s.images.ref(k8s.images.cpu),
        "imagePullPolicy": k8s.images.pull_policy,
        "command": ["python", "-c", WAIT_SCRIPT],
        "env": [{"name": "TEACHER_MODELS_URL", "value": url.rstrip("/") + "/models"},
                {"name": "TEACHER_WAIT_SECONDS", "value": str(k8s.vllm.startup_seconds)}],
        "resources": _resources(k8s.resources.generate, gpu=False),
        "securityContext": _container_security(k8s),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _stage_image(k8s: KubernetesConfig, row: Step, on_gpu: bool) -> str:
    """The image of a stage's main container: cpu off the GPU; on it, the vllm image for
    eval's generation (predict-*: trackb and vLLM together, so eval's backend auto is
    vLLM's offline engine with LoRARequest) and the trainer for the rest (train)."""
    if not on_gpu:
        return k8s.images.cpu
    return k8s.images.vllm if row.cli.name == "eval" else k8s.images.trainer


def _check_locked_network(config: PipelineConfig, row: Step) -> None:
    net = config.kubernetes.network
    if not (net.store_namespace or net.store_cidrs):
        raise ConfigError("kubernetes.network: set store_namespace or store_cidrs, or "
                          f"{row.folder} pods cannot reach the object store")


def check_model_source(config: PipelineConfig, row: Step, *, offline: bool) -> None:
    """The one home of the rule for where a pod finds the base model.

    A pod sees the store, its image, /cache (the cache PVC, else an empty emptyDir) and,
    unless ``offline`` (egress locked to the object store), the hub; never the files of
    the machine that launched the run. So: offline pods find the model only in the store
    or on the cache PVC, and a model folder is found only on the cache PVC (or in an
    image that carries it: an absolute path elsewhere is taken on trust).

    Raises ConfigError stating the rule when ``row`` loads a model its pods cannot find.
    """
    model, pvc = config.model, config.kubernetes.cache.pvc
    if model == TINY or not row.loads_model or model.startswith("s3://"):
        return
    if not model_is_path(model):
        if offline and not pvc:
            raise ConfigError(f"{row.folder} pods are offline, so the model must be in the "
                              f"store or on a cache PVC: hub model {model!r} cannot be "
                              "downloaded there; put it in the store (model: s3://...) or set "
                              "kubernetes.cache.pvc (the run's warm-cache step then fills it "
                              "from the hub)")
        return
    in_cache = model.startswith(f"{CACHE_DIR}/")
    if not model.startswith("/") or (in_cache and not pvc):
        raise ConfigError(f"{row.folder} pods do not see this machine's files, so the model "
                          f"must be in the store or on a cache PVC: put {model!r} in the "
                          f"store (model: s3://...) or on kubernetes.cache.pvc (model: "
                          f"{CACHE_DIR}/...)")


# The EKS Pod Identity agent's addresses on every node (IPv4 and IPv6).
POD_IDENTITY_AGENT = ("169.254.170.23/32", "fd00:ec2::23/128")


def _host_cidr(address: str) -> str:
    return str(ipaddress.ip_network(address))  # a bare IP becomes its /32 (or /128)


def _ip_block(cidr: str, excepted: list[str]) -> dict[str, Any]:
    """An ipBlock of ``cidr`` less the ``excepted`` ranges strictly inside it (the API
    refuses an except entry outside its cidr or of the other IP family)."""
    network = ipaddress.ip_network(cidr)
    inside = [str(sub) for sub in map(ipaddress.ip_network, excepted)
              if sub.version == network.version and sub != network
              and sub.subnet_of(network)]  # type: ignore[arg-type]
    return {"ipBlock": {"cidr": cidr, **({"except": inside} if inside else {})}}


def _network_policy(k8s: KubernetesConfig, run_id: str, stage: str, *, locked_egress: bool,
                    ingress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ingress: only ``ingress`` rules (none: refuse all). Egress: DNS and the object
    store when ``locked_egress``, else anything (extract needs PyPI, train the hub)."""
    net = k8s.network
    egress: list[dict[str, Any]] = [{}]
    if locked_egress:
        dns = {"to": [{"namespaceSelector": {"matchLabels": {
                           "kubernetes.io/metadata.name": net.dns_namespace}},
                       "podSelector": {"matchLabels": dict(net.dns_pod_labels)}}],
               "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
        peers: list[dict[str, Any]] = []
        if net.store_namespace:
            peers.append({"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": net.store_namespace}},
                          "podSelector": {"matchLabels": dict(net.store_pod_labels)}})
        peers += [_ip_block(cidr, net.store_cidrs_except) for cidr in net.store_cidrs]
        egress = [dns, {"to": peers,
                        "ports": [{"protocol": "TCP", "port": p} for p in net.store_ports]}]
        if net.node_local_dns:
            egress.append({"to": [{"ipBlock": {"cidr": _host_cidr(net.node_local_dns)}}],
                           "ports": dns["ports"]})
        if net.pod_identity_agent:
            # EKS Pod Identity hands out AWS credentials from a link-local agent on each
            # node: without it boto3 in a locked pod has no credentials for S3.
            egress.append({"to": [{"ipBlock": {"cidr": cidr}} for cidr in POD_IDENTITY_AGENT],
                           "ports": [{"protocol": "TCP", "port": 80}]})
    spec: dict[str, Any] = {"podSelector": {"matchLabels": selector(run_id, stage)},
                            "policyTypes": ["Ingress", "Egress"]}
    if ingress:
        spec["ingress"] = ingress
    spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(k8s, object_name(run_id, f"{stage}-net"), run_id, stage),
            "spec": spec}


# checkov findings that follow from a setting, each with the reason it is accepted.
# They are added only when the setting is in effect.
def _checkov_skips(k8s: KubernetesConfig, pod: dict[str, Any]) -> dict[str, str]:
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    reasons = []
    if any("@sha256:" not in c["image"] for c in containers):
        reasons.append("CKV_K8S_43=images are pinned by release tag from make images; set "
                       "kubernetes.images.* to name@sha256:... to pin digests")
    if k8s.images.pull_policy != "Always":
        reasons.append("CKV_K8S_15=release tags are immutable; IfNotPresent also runs "
                       "images loaded into kind nodes (kubernetes.images.pull_policy)")
    if any("secretKeyRef" in str(c.get("env", "")) for c in containers):
        reasons.append("CKV_K8S_35=boto3 and huggingface_hub read credentials from the "
                       "environment; they come only from secretKeyRef, never the manifest")
    if pod.get("automountServiceAccountToken"):
        reasons.append("CKV_K8S_38=the launcher creates and watches the run's Jobs through "
                       "the API, with the least-privilege Role of k8s/rbac.yaml")
    return {f"checkov.io/skip{i}": reason for i, reason in enumerate(reasons, 1)}


def _stage_command(row: Step, stage_config: StageConfig, out: str, *, gpus: int,
                   nodes: int, master: str, port: int) -> tuple[list[str], list[str]]:
    module = row.cli.job_module
    args = ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--out", out]
    args += [str(getattr(stage_config, name)) for name in row.cli.positional]
    if row.distributed and nodes > 1:
        return (["torchrun"], [f"--nnodes={nodes}", f"--nproc-per-node={gpus}",
                               "--node-rank=$(NODE_RANK)", f"--master-addr={master}",
                               f"--master-port={port}", "-m", module, *args])
    if row.distributed and gpus > 1:
        return (["torchrun"], ["--standalone", f"--nproc-per-node={gpus}", "-m", module, *args])
    return (["python", "-m", module], args)


# -- the builders -------------------------------------------------------------------------
def stage_names(config: PipelineConfig) -> list[str]:
    """The stages (step folders) of ``config`` in run order (tiny-model only for model
    'tiny')."""
    return [row.folder for row in steps_for(config)]


def build_stage(stage: str, config: PipelineConfig, run_id: str,
                parts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every object one stage needs, in creation order: ConfigMap, [headless Service,]
    [NetworkPolicy,] Job (a JobSet for a multi-node training with distributed.gang
    'jobset').

    A partitioned step (its config's ``partitions`` > 1: generate, predict-*) is one
    Indexed Job with a pod per part still to run: ``parts`` (default: all of them), in
    completion-index order (:func:`pod_partition`). Each pod is the whole step's pod
    (generate's with its own vLLM sidecar, predict's with its own GPU) running one part.

    Raises ConfigError for an unknown stage (or tiny-model without model 'tiny'), an
    invalid run id, settings that cannot work on a cluster, or ``parts`` that are not
    parts of the step.
    """
    if stage not in stage_names(config):
        raise ConfigError(f"unknown stage {stage!r} for this config; stages: "
                          f"{', '.join(stage_names(config))}")
    k8s = config.kubernetes
    row = step(stage)
    stage_config = stage_configs(config, run_id)[stage]
    todo = _parts_to_run(config, row, stage_config, parts)
    on_gpu = uses_gpu(config) and row.gpu
    res = _resources_for(k8s, row)
    gpus = res.gpus if on_gpu else 0
    nodes = k8s.distributed.nodes if (row.distributed and on_gpu) else 1
    name = object_name(run_id, stage)
    cm_name = object_name(run_id, f"{stage}-config")
    objects: list[dict[str, Any]] = [
        _config_map(k8s, cm_name, run_id, stage, CONFIG_FILE, _dump_config(stage_config))]

    jobset = nodes > 1 and k8s.distributed.gang == "jobset"
    # A JobSet makes its own headless Service, named after it.
    headless = object_name(run_id, f"{stage}-nodes") if nodes > 1 and not jobset else None
    master = f"{name}-{JOBSET_REPLICA}-0-0.{name}" if jobset else f"{name}-0.{headless}"
    command, args = _stage_command(
        row, stage_config, stage_uri(config, run_id, stage), gpus=gpus, nodes=nodes,
        master=master, port=k8s.distributed.master_port)

    env = [*_s3_env(k8s), *_cache_env()]
    # The hub token goes where models may be downloaded; a GPU step in the CPU profile
    # uses the tiny model built in the run.
    if row.hub and (on_gpu or not row.gpu):
        env += _hf_env(k8s)
    locked = row.runs_model_code and k8s.network.enabled
    check_model_source(config, row, offline=locked)
    if locked:
        _check_locked_network(config, row)
    if locked or (row.loads_model and warms_cache(config)):
        # Egress is locked to the object store, or the warm-cache step filled the cache
        # PVC with the model: never try the hub (no second download, no hub outage).
        env += [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    if row.runs_model_code and k8s.sandbox.gvisor:
        # trackb's sandbox counts gVisor as meeting its minimum isolation.
        env.append({"name": SANDBOX_RUNTIME_ENV, "value": "gvisor"})
    if nodes > 1:
        env.append({"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}})
    if todo is not None:
        env += [{"name": PARTITIONS_ENV, "value": ",".join(map(str, todo))},
                {"name": COMPLETION_INDEX_ENV, "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}}]
    shm = res.shm_size if on_gpu else None
    mounts = _base_mounts(True) + ([{"name": "dshm", "mountPath": "/dev/shm"}] if shm else [])
    main = {
        "name": MAIN_CONTAINER,
        "image": k8s.images.ref(_stage_image(k8s, row, on_gpu)),
        "imagePullPolicy": k8s.images.pull_policy,
        "command": command,
        "args": args,
        "env": env,
        "resources": _resources(res, gpu=on_gpu),
        "securityContext": _container_security(k8s, code=row.runs_model_code),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    if nodes > 1:
        main["ports"] = [{"name": "rendezvous", "containerPort": k8s.distributed.master_port,
                          "protocol": "TCP"}]

    init: list[dict[str, Any]] = []
    pod_gpu = on_gpu
    sidecar = False
    if row.asks_teacher and stage_config.kind.needs_server:
        url = teacher_url(config, run_id)
        if serves_vllm(config) and k8s.vllm.serve == "sidecar":
            init.append(_vllm_container(k8s, sidecar=True))
            # The sidecar shares the pod's node: the whole pod goes to the teacher's pool.
            pod_gpu = sidecar = True
            shm = k8s.resources.vllm.shm_size
        init.append(_wait_container(k8s, url))
    volumes = _volumes(k8s, res.ephemeral_storage, cm_name, shm)

    if headless:
        objects.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(k8s, headless, run_id, stage),
            "spec": {"clusterIP": "None", "selector": selector(run_id, stage),
                     # Ranks must resolve each other before any of them is Ready.
                     "publishNotReadyAddresses": True,
                     "ports": [{"name": "rendezvous", "port": k8s.distributed.master_port,
                                "targetPort": k8s.distributed.master_port,
                                "protocol": "TCP"}]},
        })
    if k8s.network.enabled:
        # Ranks of a multi-node training talk to each other (NCCL picks its ports).
        peers = ([{"from": [{"podSelector": {"matchLabels": selector(run_id, stage)}}]}]
                 if nodes > 1 else None)
        objects.append(_network_policy(k8s, run_id, stage, locked_egress=locked,
                                       ingress=peers))
    pod = _pod_spec(k8s, containers=[main], volumes=volumes, gpu=pod_gpu, teacher=sidecar,
                    init_containers=init, subdomain=headless,
                    runtime_class=k8s.sandbox.runtime_class_name if row.runs_model_code
                    else None)
    extra_tolerations = step_metadata(k8s, stage)[2]
    if extra_tolerations:
        pod["tolerations"] = [*pod.get("tolerations", []), *extra_tolerations]
    job = _job(k8s, name, run_id, stage, pod, _deadline(k8s, row),
               indexed=nodes if nodes > 1 else 0, parts=len(todo) if todo else 0)
    objects.append(_jobset(job, k8s) if jobset else job)
    return objects


def _parts_to_run(config: PipelineConfig, row: Step, stage_config: StageConfig,
                  parts: Sequence[int] | None) -> list[int] | None:
    """The sorted parts of a partitioned step's Job (None: the step is not partitioned).

    Raises ConfigError for parts out of range, none at all, or a partitioned generate
    with the one vLLM Deployment (vllm.serve 'deployment').
    """
    count = partitions_of(stage_config)
    if count <= 1:
        return None
    if (row.asks_teacher and serves_vllm(config)
            and config.kubernetes.vllm.serve == "deployment"):
        # One Deployment is one replica: N parts would queue on one server, which is
        # what partitions are meant to avoid. A sidecar gives each part its own server.
        raise ConfigError(f"{row.section}.partitions > 1 needs a vLLM server per part: "
                          "set kubernetes.vllm.serve=sidecar (each pod of the Indexed Job "
                          "gets its own), or external (generate.base_url names a server "
                          f"with replicas), or {row.section}.partitions=1")
    todo = sorted(set(range(count) if parts is None else parts))
    if not todo or not all(0 <= part < count for part in todo):
        raise ConfigError(f"{row.folder}: parts {todo} are not a non-empty subset of "
                          f"0..{count - 1}")
    return todo


def stage_partitions(config: PipelineConfig, run_id: str, stage: str) -> int:
    """How many parts ``stage`` runs in (1: not partitioned). Raises ConfigError like
    :func:`stage_configs`, KeyError for a stage not in the run."""
    return partitions_of(stage_configs(config, run_id)[stage])


def pod_partition(environ: Mapping[str, str]) -> int | None:
    """The part a pod of a partitioned step's Indexed Job runs: entry
    ``environ[COMPLETION_INDEX_ENV]`` of the list ``environ[PARTITIONS_ENV]``; None when
    the pod is not one (no PARTITIONS_ENV). Raises ConfigError for an index or list that
    does not parse or an index past the list's end."""
    listed = environ.get(PARTITIONS_ENV)
    if not listed:
        return None
    try:
        parts = [int(part) for part in listed.split(",")]
        return parts[int(environ.get(COMPLETION_INDEX_ENV, ""))]
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{COMPLETION_INDEX_ENV}={environ.get(COMPLETION_INDEX_ENV)!r} "
                          f"does not name one of {PARTITIONS_ENV}={listed!r}") from exc


def job_parts(job: Mapping[str, Any]) -> list[int] | None:
    """The parts a partitioned step's Job runs, in completion-index order (from its main
    container's PARTITIONS_ENV); None for any other Job. Raises nothing."""
    for container in job.get("spec", {}).get("template", {}).get("spec", {}).get(
            "containers", []):
        if container.get("name") != MAIN_CONTAINER:
            continue
        for var in container.get("env", []):
            if var.get("name") == PARTITIONS_ENV:
                try:
                    return [int(part) for part in str(var.get("value", "")).split(",")]
                except ValueError:
                    return None
    return None


def build_vllm_service(config: PipelineConfig, run_id: str) -> list[dict[str, Any]]:
    """The fallback teacher server: a Deployment and its Service (vllm.serve=deployment).

    The launcher creates them before generate, waits until ready, and always deletes
    them afterwards. Raises ConfigError for an invalid run id or the CPU profile.
    """
    _check_run_id(run_id)
    if not uses_gpu(config):
        raise ConfigError("the vLLM server needs the GPU profile (kubernetes.accelerator)")
    k8s = config.kubernetes
    name = object_name(run_id, "vllm")
    stage = "vllm"
    pod = _pod_spec(k8s, containers=[_vllm_container(k8s, sidecar=False)],
                    volumes=_volumes(k8s, k8s.resources.vllm.ephemeral_storage, None,
                                     k8s.resources.vllm.shm_size),
                    gpu=True, teacher=True, restart="Always")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(k8s, name, run_id, stage),
        "spec": {
            "replicas": 1,
            # One GPU server at a time: never two pods holding GPUs during a rollout.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector(run_id, stage)},
            "template": {"metadata": {"labels": labels(run_id, stage)}, "spec": pod},
        },
    }
    skips = _checkov_skips(k8s, pod)
    if skips:
        deployment["metadata"]["annotations"] = skips
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(k8s, name, run_id, stage),
        "spec": {"type": "ClusterIP", "selector": selector(run_id, stage),
                 "ports": [{"name": "http", "port": k8s.vllm.port, "targetPort": "http",
                            "protocol": "TCP"}]},
    }
    objects = [deployment, service]
    if k8s.network.enabled:
        # Only the run's generate pod may call the server.
        objects.append(_network_policy(k8s, run_id, stage, locked_egress=False, ingress=[
            {"from": [{"podSelector": {"matchLabels": selector(run_id,
                                                                teacher_step().folder)}}],
             "ports": [{"protocol": "TCP", "port": k8s.vllm.port}]}]))
    return objects


def _launcher_job_env() -> list[dict[str, Any]]:
    """The launcher's own Job, which owns the vLLM server it creates: the server goes
    when the launcher Job does (its TTL, ``helm uninstall``), and a retried launcher pod of
    the same Job reuses it."""
    return [{"name": env, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}}
            for env, label in LAUNCHER_JOB_ENV.items()]


def build_launcher_job(config: PipelineConfig, run_id: str) -> list[dict[str, Any]]:
    """The in-cluster ``run-all --backend k8s``: a ConfigMap with the pipeline and a Job.

    Raises ConfigError for an invalid run id.
    """
    import yaml

    _check_run_id(run_id)
    k8s = config.kubernetes
    name = object_name(run_id, LAUNCHER)
    cm_name = object_name(run_id, f"{LAUNCHER}-config")
    pipeline = config.model_copy(update={"run_id": run_id, "store": cluster_store_uri(config)})
    # Only what differs from the defaults: short to review, and it reloads to the same
    # config (the launcher image carries the same trackb, hence the same defaults).
    text = yaml.safe_dump(pipeline.model_dump(mode="json", exclude_defaults=True),
                          sort_keys=False)
    res = k8s.resources.launcher
    main = {
        "name": MAIN_CONTAINER,
        "image": k8s.images.ref(k8s.images.cpu),
        "imagePullPolicy": k8s.images.pull_policy,
        "command": ["python", "-m", "jobs.run_all"],
        "args": ["--config", f"{CONFIG_DIR}/pipeline.yaml", "--run-id", run_id,
                 "--backend", "k8s"],
        "env": [*_s3_env(k8s), *_cache_env(), *_launcher_job_env()],
        "resources": _resources(res, gpu=False),
        "securityContext": _container_security(k8s),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": _base_mounts(True),
    }
    # The launcher is the one pod that talks to the API: it gets the Role's token.
    pod = _pod_spec(k8s, containers=[main], gpu=False,
                    volumes=_volumes(k8s, res.ephemeral_storage, cm_name, None),
                    service_account=k8s.service_account, mount_token=True)
    objects = [_config_map(k8s, cm_name, run_id, LAUNCHER, "pipeline.yaml", text)]
    if k8s.network.enabled:
        objects.append(_network_policy(k8s, run_id, LAUNCHER, locked_egress=False))
    return [*objects, _job(k8s, name, run_id, LAUNCHER, pod, k8s.job.deadlines.launcher)]


def build_all(config: PipelineConfig, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """Every object of a run, by file stem: each stage, the launcher and (deployment
    mode) the vLLM server. Raises ConfigError like :func:`build_stage`."""
    files = {stage: build_stage(stage, config, run_id) for stage in stage_names(config)}
    files[LAUNCHER] = build_launcher_job(config, run_id)
    if serves_vllm(config) and config.kubernetes.vllm.serve == "deployment":
        files["vllm-server"] = build_vllm_service(config, run_id)
    return files


# -- the namespace and the launcher's RBAC (k8s/namespace.yaml, k8s/rbac.yaml, the chart) --
def required_secrets(k8s: KubernetesConfig) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(Secret name, setting, keys pods read)`` of each Secret without which a run's
    pods do not start or pull: the S3 keys, the hub token unless
    ``huggingface.token_optional``, the imagePullSecrets. Preflight checks that they
    exist; the launcher's Role may read these and no other Secret."""
    found = []
    if k8s.s3.credentials_secret:
        found.append((k8s.s3.credentials_secret, "kubernetes.s3.credentials_secret",
                      (k8s.s3.access_key_id_key, k8s.s3.secret_access_key_key)))
    if k8s.huggingface.token_secret and not k8s.huggingface.token_optional:
        found.append((k8s.huggingface.token_secret, "kubernetes.huggingface.token_secret",
                      (k8s.huggingface.token_key,)))
    found += [(name, "kubernetes.images.pull_secrets", ()) for name in k8s.images.pull_secrets]
    return found


def secret_names(k8s: KubernetesConfig) -> list[str]:
    """The names of :func:`required_secrets`, each once, in config order."""
    return list(dict.fromkeys(name for name, _, _ in required_secrets(k8s)))


def role_rules(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    """One rule per (API group, resource) the launcher calls, from client.RBAC_RULES;
    a kind in client.NAMED_ONLY (Secrets) only for the configured names.

    client.py lists every call it makes; deriving the Role from that list keeps the
    grant exactly what is used (no wildcards). client.py imports the SDK only inside
    functions, so this import keeps the builder pure.
    """
    from trackb_core.k8s.client import NAMED_ONLY
    from trackb_core.k8s.client import RBAC_RULES as CALLS

    rules = []
    for (group, resource), verbs in sorted(CALLS.items()):
        rule: dict[str, Any] = {"apiGroups": [group], "resources": [resource]}
        if (group, resource) in NAMED_ONLY:
            names = secret_names(k8s) if resource == "secrets" else []
            if not names:
                continue  # an empty resourceNames would grant every object of the kind
            rule["resourceNames"] = names
        rules.append({**rule, "verbs": sorted(verbs)})
    return rules


# The rules every config gets: role_rules less those naming configured objects.
RBAC_RULES: tuple[dict[str, Any], ...] = tuple(
    rule for rule in role_rules(KubernetesConfig()) if "resourceNames" not in rule)


def _static_labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "trackb", "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "trackb", "app.kubernetes.io/managed-by": "kubectl"}


def build_namespace(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    """The namespace, enforcing the restricted Pod Security Standard every pod meets."""
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": k8s.namespace,
        "labels": {**_static_labels("namespace"),
                   "pod-security.kubernetes.io/enforce": "restricted",
                   "pod-security.kubernetes.io/warn": "restricted"}}}]


def build_rbac(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    """ServiceAccount, Role (:func:`role_rules`) and RoleBinding of the launcher."""
    meta = {"name": k8s.service_account, "namespace": k8s.namespace,
            "labels": _static_labels(LAUNCHER)}
    return [
        # The token is mounted only into the launcher pod, which asks for it.
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta),
         "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta),
         "rules": role_rules(k8s)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                     "name": k8s.service_account},
         "subjects": [{"kind": "ServiceAccount", "name": k8s.service_account,
                       "namespace": k8s.namespace}]},
    ]
