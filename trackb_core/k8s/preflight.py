"""Preflight: what would stop a run on Kubernetes, found before its first Job.

Without it a bad setting shows up only when the stage that needs it starts: a missing
cache PVC or a model a pod cannot find hours into a run, after training. Preflight makes
every check it can without creating anything (its only POSTs are
SelfSubjectAccessReviews, which create nothing) and reports each as a finding:

- ``error``: the run cannot work as configured; trackb refuses to start it (exit 64);
- ``warning``: it may still work, or only later (a GPU pool that autoscales from zero);
- ``skipped``: this identity may not make the check (403), so nothing is known.

The checks, in order: every stage's objects build (the builder's rules, such as where a
pod finds the model); the launcher may make each call it makes (client.RBAC_RULES); the
Secrets and the cache PVC the pods mount exist; the cluster-scoped PriorityClass and
RuntimeClass exist (best-effort: the launcher's Role is namespaced); a node matches the
GPU node selector; with Kueue, the LocalQueue the Jobs go to exists.

``trackb preflight`` prints the findings; ``run-all --backend k8s`` calls :func:`check`
before its first Job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from trackb_core.errors import ConfigError
from trackb_core.k8s import jobspec
from trackb_core.k8s.client import Forbidden, KubeClient
from trackb_core.pipeline import (
    PipelineConfig,
    dependencies,
    is_hub_model,
    steps_for,
    warms_cache,
)
from trackb_core.stage import say
from trackb_core.stages import step

Level = Literal["error", "warning", "skipped"]

# Access modes with which one node (or one pod) at a time may mount a volume.
SINGLE_NODE_MODES = ("ReadWriteOnce", "ReadWriteOncePod")
# Cluster-scoped kinds a config names: kind -> (plural, setting).
CLUSTER_OBJECTS = {
    "PriorityClass": ("priorityclasses", "kubernetes.scheduling.priority_class_name"),
    "RuntimeClass": ("runtimeclasses", "kubernetes.sandbox.runtime_class_name"),
}


@dataclass(frozen=True)
class Finding:
    """One result of preflight: its level and a one-line message."""

    level: Level
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def preflight(config: PipelineConfig, run_id: str, client: KubeClient) -> list[Finding]:
    """Every finding about running ``config`` as ``run_id`` with ``client``'s identity
    in ``kubernetes.namespace``; creates nothing.

    Raises UnavailableError when the API server cannot be reached, and the SDK's
    ApiException for an API error other than 403 (forbidden) and 404 (absent).
    """
    return [*_builds(config, run_id), *_permissions(config, client),
            *_secrets(config, client), *_cache_volume(config, client),
            *_cluster_objects(config, client), *_gpu_nodes(config, client),
            *_kueue_queue(config, client)]


def check(config: PipelineConfig, run_id: str, client: KubeClient) -> list[Finding]:
    """Preflight before a run: says each warning and skipped check, and returns the
    findings when none is an error.

    Raises ConfigError (exit 64) with one line per error, and what :func:`preflight`
    raises.
    """
    findings = preflight(config, run_id, client)
    for finding in findings:
        if finding.level != "error":
            say("preflight", str(finding))
    errors = [f.message for f in findings if f.level == "error"]
    if errors:
        raise ConfigError(f"preflight found {len(errors)} error(s), so nothing was created:"
                          + "".join(f"\n  {message}" for message in errors))
    return findings


# -- the checks ---------------------------------------------------------------------------
def _builds(config: PipelineConfig, run_id: str) -> list[Finding]:
    """Each builder error once, naming the stages it stops unless it stops them all or
    names its one stage itself."""
    builders: dict[str, Callable[[PipelineConfig, str], object]] = {
        stage: partial(jobspec.build_stage, stage) for stage in jobspec.stage_names(config)}
    builders["vllm-server"] = _build_vllm_server
    stopped: dict[str, list[str]] = {}
    for name, build in builders.items():
        try:
            build(config, run_id)
        except ConfigError as exc:
            stopped.setdefault(str(exc), []).append(name)
    stages = set(jobspec.stage_names(config))
    findings = [Finding("error", message if set(names) >= stages or (
                            len(names) == 1 and names[0] in message)
                        else f"{', '.join(names)}: {message}")
                for message, names in stopped.items()]
    model = config.model
    if (jobspec.model_is_path(model) and model.startswith("/")
            and not model.startswith(f"{jobspec.CACHE_DIR}/")):
        # check_model_source takes such a path on trust: a custom image may carry it.
        findings.append(Finding("warning", f"model {model} is a folder outside "
                                f"{jobspec.CACHE_DIR}: pods find it only if their image holds "
                                "it; else put it in the store (model: s3://...) or on the "
                                "cache PVC"))
    return findings


def _build_vllm_server(config: PipelineConfig, run_id: str) -> None:
    if jobspec.serves_vllm(config) and config.kubernetes.vllm.serve == "deployment":
        jobspec.build_vllm_service(config, run_id)


def _permissions(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """A SelfSubjectAccessReview for each grant of the launcher's Role."""
    namespace = config.kubernetes.namespace
    findings = []
    for rule in jobspec.role_rules(config.kubernetes):
        group, resource = rule["apiGroups"][0], rule["resources"][0]
        for verb in rule["verbs"]:
            for name in rule.get("resourceNames", [None]):
                try:
                    allowed = client.access_review(namespace, group, resource, verb, name)
                except Forbidden:
                    return [Finding("skipped", "cannot review the launcher's permissions "
                                    "(SelfSubjectAccessReview forbidden)")]
                if not allowed:
                    what = f"{resource} {name}" if name else resource
                    findings.append(Finding("error", f"the launcher may not {verb} {what} "
                                            f"in namespace {namespace}"))
    return findings


def _secrets(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """The Secrets pods read (and pull images with) exist and hold the keys pods read."""
    namespace = config.kubernetes.namespace
    uses: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for name, setting, keys in jobspec.required_secrets(config.kubernetes):
        uses.setdefault(name, []).append((setting, keys))
    findings = []
    for name, settings in uses.items():
        try:
            secret = client.read("Secret", name, namespace)
        except Forbidden:
            findings.append(Finding("skipped", f"cannot check Secret {name} (forbidden)"))
            continue
        if secret is None:
            where = ", ".join(dict.fromkeys(setting for setting, _ in settings))
            findings.append(Finding("error", f"Secret {name} ({where}) does not exist in "
                                    f"namespace {namespace}"))
            continue
        data = secret.get("data") or {}
        findings += [Finding("error", f"Secret {name} ({setting}) has no key {key}")
                     for setting, keys in settings for key in keys if key not in data]
    return findings


def _cache_volume(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """The cache PVC exists, the warm-cache step can write the model into it, and it is
    not single-node while pods on several nodes mount it. A hub model without it is
    downloaded by every pod that loads it."""
    k8s = config.kubernetes
    if not k8s.cache.pvc:
        loaders = [s for s in jobspec.stage_names(config) if step(s).loads_model]
        if is_hub_model(config.model) and jobspec.uses_gpu(config) and len(loaders) > 1:
            return [Finding("warning", f"{', '.join(loaders)} each download {config.model} "
                            "into a cache that ends with the pod: set kubernetes.cache.pvc "
                            "(ReadWriteMany; the chart's cacheVolume creates one) and the "
                            "run's warm-cache step downloads it once")]
        return []
    try:
        pvc = client.read("PersistentVolumeClaim", k8s.cache.pvc, k8s.namespace)
    except Forbidden:
        return [Finding("skipped", f"cannot check PersistentVolumeClaim {k8s.cache.pvc} "
                        "(forbidden)")]
    if pvc is None:
        return [Finding("error", f"PersistentVolumeClaim {k8s.cache.pvc} (kubernetes.cache.pvc) "
                        f"does not exist in namespace {k8s.namespace} (the chart creates it "
                        "with cacheVolume.create)")]
    modes = (pvc.get("spec") or {}).get("accessModes") or []
    if warms_cache(config) and modes and set(modes) == {"ReadOnlyMany"}:
        # The hub model is not in the store: the warm-cache step must write it there.
        return [Finding("error", f"PersistentVolumeClaim {k8s.cache.pvc} is ReadOnlyMany, "
                        f"but the warm-cache step writes {config.model} into it; use a "
                        "ReadWriteMany volume")]
    if not modes or not set(modes) <= set(SINGLE_NODE_MODES):
        return []
    together = _concurrent_gpu_pods(config)
    if not together:
        return []
    return [Finding("warning", f"PersistentVolumeClaim {k8s.cache.pvc} is {'/'.join(modes)} "
                    f"but {together} may run at once on different nodes: a second pod waits "
                    "in Multi-Attach until the first ends; use a ReadWriteMany volume")]


def _concurrent_gpu_pods(config: PipelineConfig) -> str:
    """Which GPU pods may run at the same time ('' if none): GPU stages neither of which
    waits for the other, or the nodes of a multi-node training."""
    if not jobspec.uses_gpu(config):
        return ""
    needs = dependencies(config)

    def upstream(stage: str) -> set[str]:
        found: set[str] = set()
        todo = list(needs[stage])
        while todo:
            current = todo.pop()
            if current not in found:
                found.add(current)
                todo += needs[current]
        return found

    gpu = [row.folder for row in steps_for(config) if row.gpu]
    pairs = [f"{a} and {b}" for i, a in enumerate(gpu) for b in gpu[i + 1:]
             if a not in upstream(b) and b not in upstream(a)]
    if config.kubernetes.distributed.nodes > 1:
        pairs.insert(0, f"the {config.kubernetes.distributed.nodes} nodes of a training")
    return "; ".join(pairs)


def _cluster_objects(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """The PriorityClass and RuntimeClass the pods name exist (best-effort)."""
    k8s = config.kubernetes
    names = {"PriorityClass": k8s.scheduling.priority_class_name,
             "RuntimeClass": k8s.sandbox.runtime_class_name}
    findings = []
    for kind, name in names.items():
        if not name:
            continue
        plural, setting = CLUSTER_OBJECTS[kind]
        try:
            found = client.read(kind, name)
        except Forbidden:
            findings.append(Finding("skipped", f"cannot check {kind} {name} (forbidden): the "
                                    "launcher's namespaced Role cannot read cluster-scoped "
                                    f"objects; a ClusterRole with get on {plural} lets it"))
            continue
        if found is None:
            findings.append(Finding("error", f"{kind} {name} ({setting}) does not exist in "
                                    "the cluster"))
    return findings


def _kueue_queue(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """With Kueue, the LocalQueue of kubernetes.kueue.queue_name exists in the namespace:
    a Job queued to a missing one stays suspended for ever."""
    k8s = config.kubernetes
    if not k8s.kueue.enabled:
        return []
    name = k8s.kueue.queue_name
    try:
        found = client.read("LocalQueue", name, k8s.namespace)
    except Forbidden:
        return [Finding("skipped", f"cannot check LocalQueue {name} (forbidden)")]
    if found is None:
        return [Finding("error", f"LocalQueue {name} (kubernetes.kueue.queue_name) does not "
                        f"exist in namespace {k8s.namespace}, or Kueue is not installed: "
                        "create it (pointing at a ClusterQueue with GPU quota) or set "
                        "kubernetes.kueue.enabled to false")]
    return []


def _gpu_nodes(config: PipelineConfig, client: KubeClient) -> list[Finding]:
    """A node matches the GPU pods' placement (selector and GPU types), and the teacher
    pool's when it has its own; none is only a warning (a pool that autoscales from zero
    has no node until a pod asks for one)."""
    if not (jobspec.uses_gpu(config) and any(row.gpu for row in steps_for(config))):
        return []
    scheduling = config.kubernetes.scheduling
    pools: list[tuple[str, Any]] = [("kubernetes.scheduling", scheduling)]
    if scheduling.teacher.own_pool and jobspec.serves_vllm(config):
        pools.append(("kubernetes.scheduling.teacher", scheduling.teacher))
    findings = []
    for setting, pool in pools:
        try:
            nodes = client.list_nodes(pool.node_selector)
        except Forbidden:
            return [Finding("skipped", "cannot list nodes (forbidden): the launcher's "
                            "namespaced Role cannot read cluster-scoped objects; a ClusterRole "
                            "with list on nodes lets it")]
        if pool.gpu_types:
            nodes = [node for node in nodes if node.get("metadata", {}).get("labels", {}).get(
                pool.gpu_type_label) in pool.gpu_types]
        if nodes:
            continue
        labels = ", ".join(f"{k}={v}" for k, v in sorted(pool.node_selector.items()))
        if pool.gpu_types:
            labels = ", ".join(filter(None, [labels, f"{pool.gpu_type_label} in "
                                             f"{'|'.join(pool.gpu_types)}"]))
            what = f"{setting}.node_selector and gpu_types"
        else:
            what = f"{setting}.node_selector"
        findings.append(Finding("warning", f"no node matches {what} ({labels or 'any labels'}): "
                                "GPU pods stay Pending until one joins (fine for a pool that "
                                "autoscales from zero; the launcher waits "
                                "kubernetes.budgets.unschedulable_seconds)"))
    return findings
