"""Why a stage's pod or Job is stuck, named from the API's own dicts.

A Job's backoffLimit and podFailurePolicy act only on containers that ran and exited.
A pod that never starts, a Job that cannot create its pod, and a native sidecar (the
kubelet restarts it for ever, so no policy ever sees it fail) end nothing by
themselves: the stage would wait for its activeDeadlineSeconds, hours. The launcher
(:mod:`trackb_core.k8s.launcher`) lists the pods, reads the events and previous logs
these functions ask for (:func:`wants_events`, :func:`crashed`) and times each state on
its own clock; this module only reads what it is given, so every rule is a test on dicts.

A Job that Kueue keeps suspended has no pod either: its Workload's conditions say why
(:func:`queued_job`).

Each stuck state is a :class:`Finding`: what is stuck, a one-line cause that starts with
the state's name (and says the fix where one is known), and how long it may last: a
budget in seconds from :class:`~trackb_core.k8s.settings.LauncherConfig`, :data:`NOW`
(no wait can fix it: fail at once) or :data:`SAY_ONLY` (the Job's own policy ends it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from trackb_core.k8s.jobspec import VLLM_CONTAINER
from trackb_core.k8s.settings import LauncherConfig

NOW: float | None = None  # a Finding's budget when no wait can fix it
SAY_ONLY = math.inf  # a Finding's budget when the Job's own policy ends the state

# Waiting reasons no retry can fix: fail the stage at once.
PERMANENT_WAITING = ("InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull")
IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff")
# Registry answers that mean the image will never be pulled as configured.
PERMANENT_PULL_MESSAGES = ("not found", "manifest unknown", "unauthorized", "denied",
                           "repository does not exist")
# Before any container of a pod starts: the kubelet says ContainerCreating, or
# PodInitializing when the pod has init containers (volumes are mounted then).
NOT_STARTED = ("ContainerCreating", "PodInitializing")

# The node's NVIDIA driver is older than the CUDA the image was built for, as the
# container runtime says it when it refuses to start the container (nvidia-container-cli
# checks the image's NVIDIA_REQUIRE_CUDA) and as CUDA and torch say it from inside.
DRIVER_TOO_OLD = ("unsatisfied condition: cuda>=", "please update your driver",
                  "CUDA driver version is insufficient for CUDA runtime version",
                  "NVIDIA driver on your system is too old")
# The GPU lacks what the image or the model needs: kernels for its architecture, or
# bfloat16 (compute capability 8.0; a T4 has 7.5).
UNSUPPORTED_GPU = ("no kernel image is available for execution on the device",
                   "is only supported on GPUs with compute capability",
                   "is not compatible with the current PyTorch installation")
# torch's allocator, and vLLM when the weights leave no room for the KV cache.
CUDA_OOM = ("CUDA out of memory", "OutOfMemoryError", "No available memory for the cache blocks")
LOG_TAIL = 200  # lines of a crashed container's previous log worth reading for its cause
QUOTE_MAX = 300  # characters of one quoted log line or message kept in a cause


@dataclass(frozen=True)
class Finding:
    """One stuck state of a pod or Job."""

    where: str  # what is stuck: "pod <name>" or "Job <name>"
    state: str  # the state's name; with ``where``, the key its budget is timed by
    cause: str  # one line, starting with the state's name
    budget: float | None  # seconds it may last; NOW: fail at once; SAY_ONLY: only say it


# -- what the launcher should read for a pod ----------------------------------------------
def wants_events(pod: dict[str, Any]) -> bool:
    """Whether the pod's events may say why it is stuck: it is scheduled but no container
    has started (a volume: FailedMount, Multi-Attach), or a container keeps crashing (the
    startup probe)."""
    status = pod.get("status") or {}
    if crashed(pod):
        return True
    return (status.get("phase") == "Pending" and not _unschedulable(status)
            and _nothing_started(status))


def crashed(pod: dict[str, Any]) -> list[str]:
    """Containers the kubelet restarts for ever that have restarted: their previous log
    says why they crashed."""
    return [c["name"] for c in container_statuses(pod.get("status") or {})
            if (c.get("restartCount") or 0) > 0 and _restarts_forever(pod, c["name"])]


# -- pods -----------------------------------------------------------------------------------
def pod_findings(pod: dict[str, Any], budgets: LauncherConfig,
                 events: list[dict[str, Any]] | None = None,
                 previous_logs: dict[str, str] | None = None) -> list[Finding]:
    """Every stuck state of one pod. ``events``: the pod's events (read when
    :func:`wants_events`); ``previous_logs``: container name -> the log of its crashed
    run (for each of :func:`crashed`)."""
    events, previous_logs = events or [], previous_logs or {}
    where = f"pod {pod['metadata']['name']}"
    status = pod.get("status") or {}
    found = []
    if status.get("reason") == "Evicted":
        found.append(Finding(where, "Evicted", f"Evicted: {status.get('message', '')}",
                             SAY_ONLY))
    for container in container_statuses(status):
        name = container["name"]
        terminated = (container.get("state") or {}).get("terminated") or {}
        if terminated.get("reason") == "OOMKilled":
            found.append(Finding(where, f"OOMKilled:{name}", f"container {name} OOMKilled "
                                 "(raise its memory limit in kubernetes.resources)", SAY_ONLY))
        driver = _driver_in_status(container)
        if driver:
            found.append(Finding(where, "CUDA driver too old", f"container {name}: {driver}",
                                 NOW))
    for name in crashed(pod):
        container = next(c for c in container_statuses(status) if c["name"] == name)
        finding = crash_loop(where, container, budgets, events, previous_logs.get(name, ""))
        if finding:
            found.append(finding)
    if status.get("phase") == "Pending":
        found += _pending(where, status, budgets, events)
    return found


def _pending(where: str, status: dict[str, Any], budgets: LauncherConfig,
             events: list[dict[str, Any]]) -> list[Finding]:
    scheduled = _unschedulable(status)
    if scheduled:
        return [Finding(where, "Unschedulable", f"Unschedulable: {scheduled.get('message', '')}",
                        budgets.unschedulable_seconds)]
    found = []
    for container in container_statuses(status):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason, message = waiting.get("reason", ""), waiting.get("message", "")
        cause = f"container {container['name']}: {reason}: {message}".rstrip(": ")
        if reason in PERMANENT_WAITING:
            found.append(Finding(where, reason, cause, NOW))
        elif reason in IMAGE_PULL_WAITING:
            permanent = any(text in message.lower() for text in PERMANENT_PULL_MESSAGES)
            # One budget for the pod's pulls: the same registry serves all its images.
            found.append(Finding(where, "ImagePull", cause,
                                 NOW if permanent else budgets.image_pull_seconds))
    if not _nothing_started(status):
        return found
    for event in _latest_first(events):
        text = event.get("message", "")
        if event.get("reason") == "FailedMount" and "not found" in text:
            # A ConfigMap, Secret or PVC the pod mounts does not exist: trackb creates
            # its ConfigMaps before the Job, so nobody else will.
            found.append(Finding(where, "FailedMount", f"FailedMount: {text}", NOW))
            break
    for event in _latest_first(events):
        text = event.get("message", "")
        if event.get("reason") == "FailedAttachVolume" and "Multi-Attach" in text:
            # Waits: the pod holding the volume may end (a stage before this one), and
            # Kubernetes detaches a volume from a node that stopped answering after 6 min.
            found.append(Finding(where, "Multi-Attach", f"Multi-Attach: {_clip(text)}: a "
                                 "ReadWriteOnce volume attaches to one node at a time; use a "
                                 "ReadWriteMany PVC for kubernetes.cache.pvc, or do not run "
                                 "the stages that mount it in parallel",
                                 budgets.multi_attach_seconds))
            break
    return found


def crash_loop(where: str, container: dict[str, Any], budgets: LauncherConfig,
               events: list[dict[str, Any]], previous_log: str) -> Finding | None:
    """A container the kubelet restarts for ever (the vLLM sidecar, a Deployment's pod)
    that keeps crashing: CrashLoopBackOff with its likely cause. Its budget is
    ``crashloop_restarts`` restarts or ``crashloop_seconds``, whichever comes first; an
    unsupported GPU or a too-old driver fails at once (the pod stays on its node, so
    every restart meets the same GPU)."""
    name = container["name"]
    restarts = int(container.get("restartCount") or 0)
    waiting = (container.get("state") or {}).get("waiting") or {}
    last = (container.get("lastState") or {}).get("terminated") or {}
    if not (waiting.get("reason") == "CrashLoopBackOff"
            or (restarts and last and not container.get("ready"))):
        return None
    why, permanent = likely_crash_cause(name, last, events, previous_log)
    who = "the vLLM server (container vllm)" if name == VLLM_CONTAINER else f"container {name}"
    ended = (f" (last: {last.get('reason') or 'Error'}, exit {last.get('exitCode')})"
             if last else "")
    times = "1 time" if restarts == 1 else f"{restarts} times"
    cause = f"CrashLoopBackOff: {who} restarted {times}{ended}; likely {why}"
    over = restarts >= budgets.crashloop_restarts
    return Finding(where, "CrashLoopBackOff", cause,
                   NOW if permanent or over else budgets.crashloop_seconds)


def likely_crash_cause(container: str, terminated: dict[str, Any],
                       events: list[dict[str, Any]], previous_log: str) -> tuple[str, bool]:
    """``(why, permanent)`` a container crashed, most specific first: a GPU failure in its
    log or termination message, the kernel's OOM killer, the startup probe (pod events),
    else the last line it wrote."""
    text = f"{previous_log}\n{terminated.get('message') or ''}"
    gpu = gpu_cause(text, vllm=container == VLLM_CONTAINER)
    if gpu:
        return gpu
    if terminated.get("reason") == "OOMKilled":
        return ("OOMKilled: the container passed its memory limit (raise it in "
                "kubernetes.resources)", False)
    probe = _startup_probe_failure(events, container)
    if probe:
        return (f"the startup probe failed ({probe}): the server did not answer within "
                "kubernetes.vllm.startup_seconds; raise it if the model download or load "
                "is slow", False)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        return f"its last log line: {_clip(lines[-1].strip())}", False
    return "no log (see the pod's events)", False


def gpu_cause(text: str, vllm: bool = False) -> tuple[str, bool] | None:
    """``(cause, permanent)`` for a GPU failure named in a log or termination message:
    a driver too old for the image, an unsupported GPU, CUDA out of memory; else None."""
    line = _matching_line(text, DRIVER_TOO_OLD)
    if line:
        need = re.search(r"cuda>=\s*([0-9.]+)", line, re.IGNORECASE)
        wants = f" (it needs CUDA >= {need.group(1)})" if need else ""
        return (f"CUDA driver too old: the node's NVIDIA driver is too old for the "
                f"image{wants}: {line}; run on nodes with a newer driver "
                "(kubernetes.scheduling.node_selector) or use an image built for an older "
                "CUDA", True)
    line = _matching_line(text, UNSUPPORTED_GPU)
    if line:
        fix = ("for vLLM on a GPU older than compute capability 8.0 (T4) set "
               "kubernetes.vllm.dtype=half, else run on newer GPUs" if vllm else
               "run on GPUs the image supports")
        return (f"unsupported GPU: {line}; {fix} (kubernetes.scheduling.node_selector)", True)
    line = _matching_line(text, CUDA_OOM)
    if line:
        fix = ("lower kubernetes.vllm.max_model_len or gpu_memory_utilization, pick a "
               "smaller or quantized kubernetes.vllm.model, or use more GPUs "
               "(tensor_parallel_size)" if vllm else
               "the stage needs more GPU memory than the GPU has")
        return f"CUDA out of memory: {line}; {fix}", False
    return None


def _driver_in_status(container: dict[str, Any]) -> str | None:
    """The runtime's or CUDA's word that the driver is too old, in a container status:
    waiting (RunContainerError, CreateContainerError), terminated (StartError) or a
    termination message (FallbackToLogsOnError puts the log's tail there)."""
    state, last = container.get("state") or {}, container.get("lastState") or {}
    for part in (state.get("waiting"), state.get("terminated"), last.get("terminated")):
        if part and _matching_line(part.get("message") or "", DRIVER_TOO_OLD):
            cause = gpu_cause(part["message"])
            return cause[0] if cause else None
    return None


def _startup_probe_failure(events: list[dict[str, Any]], container: str) -> str | None:
    for event in _latest_first(events):
        text = event.get("message", "")
        path = (event.get("involvedObject") or {}).get("fieldPath") or ""
        if path and f"{{{container}}}" not in path:
            continue  # another container's probe
        if (event.get("reason") == "Unhealthy" and text.startswith("Startup probe failed")) \
                or (event.get("reason") == "Killing" and "failed startup probe" in text):
            return _clip(text)
    return None


# -- Jobs without pods ----------------------------------------------------------------------
def job_without_pods(job: str, uid: str | None, events: list[dict[str, Any]],
                     budgets: LauncherConfig) -> list[Finding]:
    """Why a Job has no pod, from its FailedCreate events (the Job controller's word; the
    pod was never made, so no pod says anything). ``uid``: the Job's, so that events of
    an earlier attempt's Job of the same name are left out."""
    failed = [e for e in _latest_first(events) if e.get("reason") == "FailedCreate"
              and _about(e, "Job", job, uid)]
    if not failed:
        return []
    where, text = f"Job {job}", one_line(failed[0].get("message", ""))
    lowered = text.lower()
    if "exceeded quota" in lowered:
        # Waits: another workload ending frees the quota, and the Job controller keeps
        # trying to create the pod.
        return [Finding(where, "ResourceQuota", f"FailedCreate (ResourceQuota exceeded): "
                        f"{text}; waiting for other pods in the namespace to free it",
                        budgets.pod_creation_seconds)]
    if "no priorityclass with name" in lowered:
        # A cluster-scoped object trackb does not create: nothing here will add it.
        return [Finding(where, "PriorityClass", f"FailedCreate (missing PriorityClass): "
                        f"{text}; create it or set kubernetes.scheduling.priority_class_name "
                        "to an existing one", NOW)]
    if "denied the request" in lowered or "forbidden" in lowered:
        # An admission webhook or policy (Pod Security, LimitRange) answered no: it says
        # the same to every retry of the same pod.
        return [Finding(where, "admission", f"FailedCreate (rejected by admission): {text}; "
                        "change the setting it names or ask the cluster's admin", NOW)]
    # Anything else may pass (a webhook that cannot be reached, an API server timeout).
    return [Finding(where, "FailedCreate", f"FailedCreate: {text}",
                    budgets.pod_creation_seconds)]


# -- Jobs Kueue holds suspended ---------------------------------------------------------------
# Kueue's word for a queue that is not there: the LocalQueue the Job names, or the
# ClusterQueue behind it ("LocalQueue trackb doesn't exist"). Nothing here will make one.
MISSING_QUEUE = ("doesn't exist", "does not exist", "not found")


def queued_job(where: str, workloads: list[dict[str, Any]] | None,
               budgets: LauncherConfig) -> list[Finding]:
    """Why a Job (or JobSet) ``where`` that Kueue holds suspended has not started, from
    the Workloads Kueue made for it (None: the cluster serves no Workloads at all).

    A Workload waiting for quota (QuotaReserved False: "couldn't assign flavors to pod
    set main: insufficient unused quota ...") may wait ``admission_seconds``: other
    workloads ending free the quota. A queue that does not exist, or no Kueue at all,
    fails at once: the Job would stay suspended for ever.
    """
    if workloads is None:
        return [Finding(where, "Kueue", "suspended for Kueue (kubernetes.kueue.enabled), but "
                        "this cluster serves no Kueue Workloads: install Kueue or set "
                        "kubernetes.kueue.enabled to false", NOW)]
    if not workloads:
        return [Finding(where, "no Workload", "suspended for Kueue, which made no Workload "
                        "for it yet (is Kueue running, and managing this namespace's Jobs?)",
                        budgets.admission_seconds)]
    workload = _latest_created(workloads)
    name = f"Workload {workload['metadata']['name']}"
    conditions = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions")
                  or []}
    if (conditions.get("Admitted") or {}).get("status") == "True":
        return []  # Kueue unsuspends the Job next
    pending = next((conditions[t] for t in ("QuotaReserved", "Admitted")
                    if (conditions.get(t) or {}).get("status") == "False"), None)
    if pending is None:
        return [Finding(name, "queued", "queued in Kueue, not yet considered for admission",
                        budgets.admission_seconds)]
    text = one_line(pending.get("message") or "")
    reason = pending.get("reason") or "Pending"
    if reason == "Inadmissible" and any(m in text.lower() for m in MISSING_QUEUE):
        return [Finding(name, "Inadmissible", f"Inadmissible: {text}; create the queue or "
                        "set kubernetes.kueue.queue_name to an existing LocalQueue", NOW)]
    return [Finding(name, reason, f"not admitted by Kueue ({pending.get('type')} {reason}): "
                    f"{text}", budgets.admission_seconds)]


def _latest_created(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return max(objects, key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "")


# -- helpers ----------------------------------------------------------------------------------
def container_statuses(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers' statuses (the vLLM sidecar is one) and the containers'."""
    return [*(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or [])]


def one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(": ")


def _restarts_forever(pod: dict[str, Any], container: str) -> bool:
    """A native sidecar (an init container with restartPolicy Always), or a container of
    a pod that always restarts (a Deployment's): no Job policy sees it fail."""
    spec = pod.get("spec") or {}
    if any(c.get("name") == container and c.get("restartPolicy") == "Always"
           for c in spec.get("initContainers") or []):
        return True
    return (spec.get("restartPolicy") or "Always") == "Always" and any(
        c.get("name") == container for c in spec.get("containers") or [])


def _unschedulable(status: dict[str, Any]) -> dict[str, Any]:
    """The PodScheduled condition when it says Unschedulable, else {}."""
    scheduled = next((c for c in status.get("conditions") or []
                      if c.get("type") == "PodScheduled"), {})
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return scheduled
    return {}


def _nothing_started(status: dict[str, Any]) -> bool:
    """No container has run yet: each waits in ContainerCreating or PodInitializing (or
    has no status yet)."""
    for container in container_statuses(status):
        state = container.get("state") or {}
        if "running" in state or "terminated" in state:
            return False
        if (state.get("waiting") or {}).get("reason", NOT_STARTED[0]) not in NOT_STARTED:
            return False
    return True


def _about(event: dict[str, Any], kind: str, name: str, uid: str | None) -> bool:
    involved = event.get("involvedObject") or {}
    return (involved.get("kind") == kind and involved.get("name") == name
            and (not uid or not involved.get("uid") or involved.get("uid") == uid))


def _latest_first(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def when(event: dict[str, Any]) -> str:
        return (event.get("lastTimestamp") or event.get("eventTime")
                or (event.get("metadata") or {}).get("creationTimestamp") or "")

    return sorted(events, key=when, reverse=True)


def _matching_line(text: str, needles: tuple[str, ...]) -> str | None:
    """The last line of ``text`` holding one of ``needles`` (the one nearest the end)."""
    lowered = [needle.lower() for needle in needles]
    for line in reversed(text.splitlines()):
        if any(needle in line.lower() for needle in lowered):
            return _clip(line.strip())
    return None


def _clip(text: str) -> str:
    text = one_line(text)
    return text if len(text) <= QUOTE_MAX else text[:QUOTE_MAX - 3] + "..."
