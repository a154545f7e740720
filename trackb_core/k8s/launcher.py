"""``trackb run-all --backend k8s``: every stage as a Kubernetes Job, in dependency order.

The launcher reads top to bottom as one loop:

1. a stage is *ready* when the stages it reads from are done; a ready stage whose
   manifest exists in the store and verifies is skipped as cached (so a rerun of a
   failed run id resumes at the failed stage);
2. otherwise its objects (from the one Job builder, :mod:`trackb_core.k8s.jobspec`)
   are created, replacing leftovers of an earlier attempt;
3. the run's Jobs are listed, then watched from the list's resourceVersion for at most
   ``poll_seconds`` (a 410 Gone or a watch that cannot be read just ends the round),
   until one is Complete or Failed; each round the pods of running
   stages are inspected, so a pod stuck in Pending fails the run with the reason
   (Unschedulable, ImagePullBackOff past its budget, at once on permanent causes)
   instead of hanging: a Job's backoffLimit never fires for a pod that never starts;
4. when a Job ends, its pods' logs and termination reasons are copied to
   ``runs/<id>/<stage>/_k8s/`` in the store before TTL deletes them; a failure stops
   the run with one line naming the stage and the cause.

Ctrl-C deletes the run's active Jobs and exits 130.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trackb_core.errors import ConfigError, MissingInputError, TrackbError
from trackb_core.k8s import jobspec
from trackb_core.k8s.client import KubeClient, WatchExpired, connect, wait_deleted
from trackb_core.k8s.settings import LauncherConfig
from trackb_core.pipeline import PipelineConfig, dependencies, dump_yaml, report_uri
from trackb_core.stage import MANIFEST, cached_manifest, say
from trackb_core.store import Store, open_store

# Waiting reasons no retry can fix: fail the stage at once.
PERMANENT_WAITING = ("InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull")
IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff")
# Registry answers that mean the image will never be pulled as configured.
PERMANENT_PULL_MESSAGES = ("not found", "manifest unknown", "unauthorized", "denied",
                           "repository does not exist")
K8S_FOLDER = "_k8s"


class StageFailed(TrackbError):
    """A stage's Job failed or its pod cannot start; the message names stage and cause."""


class Interrupted(TrackbError):
    """Ctrl-C: the run's active Jobs were deleted."""

    exit_code = 130


@dataclass
class _Active:
    """One stage whose Job is running."""

    stage: str
    job: str
    objects: list[dict[str, Any]]
    uid: str | None = None  # tells this Job from an earlier attempt's of the same name
    started: float = field(default_factory=time.monotonic)
    first_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    told: set[str] = field(default_factory=set)
    streaming: set[str] = field(default_factory=set)


@dataclass
class _Run:
    """Everything the loop needs about one run."""

    config: PipelineConfig
    run_id: str
    client: KubeClient
    budgets: LauncherConfig
    store: Store
    namespace: str
    resource_version: str = ""
    active: dict[str, _Active] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    # Seconds on a monotonic clock: every budget is measured on it (tests inject one).
    clock: Callable[[], float] = time.monotonic


def run_on_kubernetes(config: PipelineConfig, run_id: str, api: KubeClient | None = None,
                      budgets: LauncherConfig | None = None,
                      clock: Callable[[], float] = time.monotonic) -> str:
    """Run every stage of ``config`` not already done as Jobs; returns the report's URI.

    ``api`` is a :class:`trackb_core.k8s.client.KubeClient` (default: kubeconfig, else
    in-cluster). Raises StageFailed naming the stage and cause, Interrupted on Ctrl-C,
    ConfigError for settings that cannot run, UnavailableError if the API is down.
    """

    client = api or connect()
    store = open_store(jobspec.run_uri(config, run_id))
    store.check_writable()
    run = _Run(config, run_id, client, budgets or config.kubernetes.budgets, store,
               config.kubernetes.namespace, clock=clock)
    configs = jobspec.stage_configs(config, run_id)
    needs = dependencies(config)
    order = jobspec.stage_names(config)
    say("run-all", f"run {run_id} on Kubernetes (namespace {run.namespace}) in {store.uri}")
    store.put_text("pipeline.yaml", dump_yaml(config.model_copy(update={"run_id": run_id})))
    started = time.perf_counter()
    done: set[str] = set()
    try:
        while len(done) < len(order):
            for stage in order:
                if stage in done or stage in run.active or not set(needs[stage]) <= done:
                    continue
                if cached_manifest(configs[stage], store.child(stage)) is not None:
                    say(stage, "cached: manifest matches this config and these inputs; skipped")
                    done.add(stage)
                    continue
                _start(run, stage)
            if not run.active:
                if not set(order) - done:
                    break
                if not any(set(needs[s]) <= done for s in set(order) - done):
                    raise ConfigError(f"stages {', '.join(sorted(set(order) - done))} wait on "
                                      "stages that never run; check the stage wiring")
                continue  # only cached stages this round: their dependents may be ready
            for stage, cause in _wait_for_finish(run):
                if stage == jobspec.teacher_step().folder:
                    # Deployment mode: the server holds a GPU that train and eval need.
                    _cleanup_vllm(run)
                _finish(run, stage, cause)
                done.add(stage)
    except KeyboardInterrupt:
        names = _cancel(run)
        raise Interrupted("interrupted: deleted Jobs " + (", ".join(names) or "(none)") +
                          f"; rerun with --run-id {run_id} to resume") from None
    except BaseException:
        _cancel(run)
        raise
    finally:
        _cleanup_vllm(run)
        for thread in run.threads:
            thread.join(timeout=2)
    say("run-all", f"finished in {time.perf_counter() - started:.1f}s")
    return report_uri(store)


# -- starting a stage ---------------------------------------------------------------------
def _start(run: _Run, stage: str) -> None:
    if stage == jobspec.teacher_step().folder and jobspec.serves_vllm(run.config) \
            and run.config.kubernetes.vllm.serve == "deployment":
        _start_vllm(run)
    objects = jobspec.build_stage(stage, run.config, run.run_id)
    # An old manifest must not outlive a new attempt that fails before the stage starts.
    run.store.child(stage).delete(MANIFEST)
    created = [_create_or_replace(run, obj) for obj in objects]
    job = next(o for o in created if o.get("kind") == "Job")
    run.active[stage] = _Active(stage, job["metadata"]["name"], objects,
                                uid=job["metadata"].get("uid"))
    say(stage, f"Job {job['metadata']['name']} created")


def _create_or_replace(run: _Run, obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the API created it (with its uid)."""
    try:
        return run.client.create(obj)
    except run.client.ApiException as exc:
        if exc.status != 409:
            raise StageFailed(f"{obj['metadata'].get('labels', {}).get('trackb/stage', '?')}: "
                              f"cannot create {obj['kind']} {obj['metadata']['name']}: "
                              f"{_api_message(exc)}") from exc
        # A leftover of an earlier attempt (a failed Job, its ConfigMap): replace it, so
        # the new attempt runs with the current config.
        name = obj["metadata"]["name"]
        run.client.delete(obj["kind"], run.namespace, name)
        wait_deleted(run.client, obj["kind"], run.namespace, name, run.budgets.replace_seconds)
        return run.client.create(obj)


def _start_vllm(run: _Run) -> None:
    """Deployment mode: create the teacher server and wait until it is ready."""
    objects = jobspec.build_vllm_service(run.config, run.run_id)
    for obj in objects:
        _create_or_replace(run, obj)
    name = objects[0]["metadata"]["name"]
    budget = run.config.kubernetes.vllm.startup_seconds
    say(jobspec.teacher_step().folder,
        f"waiting up to {budget}s for the vLLM Deployment {name}")
    deadline = time.monotonic() + budget
    while True:
        deployment = run.client.get("Deployment", run.namespace, name) or {}
        if ((deployment.get("status") or {}).get("readyReplicas") or 0) >= 1:
            return
        if time.monotonic() > deadline:
            raise StageFailed(_one_line(f"{jobspec.teacher_step().folder}: the vLLM Deployment {name} was not ready "
                                        f"after {budget}s: {_vllm_pod_state(run)}"))
        time.sleep(run.budgets.poll_seconds)


def _vllm_pod_state(run: _Run) -> str:
    """Why the server is not ready, as far as its pods tell."""
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, "vllm"))
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        scheduled = next((c for c in status.get("conditions", [])
                          if c.get("type") == "PodScheduled"), {})
        if scheduled.get("status") == "False":
            return f"pod {name} {scheduled.get('reason', '')}: {scheduled.get('message', '')}"
        for container in _container_statuses(status):
            waiting = container.get("state", {}).get("waiting") or {}
            if waiting:
                return (f"pod {name} container {container['name']}: "
                        f"{waiting.get('reason', '')}: {waiting.get('message', '')}")
        return f"pod {name} is {status.get('phase') or 'Pending'}, not ready (startup probe)"
    return "no pod was created (check the Deployment's events and quota)"


def _cleanup_vllm(run: _Run) -> None:
    # The server holds a GPU: always delete it, whatever happened to the run.
    try:
        if not (jobspec.serves_vllm(run.config)
                and run.config.kubernetes.vllm.serve == "deployment"):
            return
        for obj in jobspec.build_vllm_service(run.config, run.run_id):
            run.client.delete(obj["kind"], run.namespace, obj["metadata"]["name"])
    except Exception as exc:  # clean-up must not hide the run's own error
        say("run-all", f"could not delete the vLLM server: {exc}")


# -- waiting ------------------------------------------------------------------------------
def _wait_for_finish(run: _Run) -> list[tuple[str, str | None]]:
    """Block until at least one active stage's Job ends: ``[(stage, None | cause)]``.

    Raises StageFailed when a pod of an active stage is stuck past its budget.
    """
    selector = {"trackb/run-id": run.run_id}
    while True:
        # List every round, then watch from there: a Job that ended before the watch
        # opened, or while a watch could not be read (a slow or restarted API server),
        # is seen here instead of never.
        jobs, run.resource_version = run.client.list_jobs(run.namespace, selector)
        listed = {job.get("metadata", {}).get("name") for job in jobs}
        gone = [{"metadata": {"name": active.job}} for active in run.active.values()
                if active.job not in listed]
        finished = _finished(run, jobs) + _finished(run, gone, deleted=True)
        if finished:
            return finished
        for stage in list(run.active):
            _inspect_pods(run, run.active[stage])
        # Leave the watch after poll_seconds even while events flow, so that stuck
        # pods are inspected on time.
        deadline = time.monotonic() + run.budgets.poll_seconds
        try:
            for kind, job in run.client.watch_jobs(run.namespace, selector,
                                                    run.resource_version,
                                                    run.budgets.poll_seconds):
                version = job.get("metadata", {}).get("resourceVersion")
                if version:
                    run.resource_version = version
                finished = _finished(run, [job], deleted=kind == "DELETED")
                if finished:
                    return finished
                if time.monotonic() > deadline:
                    break
        except WatchExpired:
            pass  # 410 Gone: the next round lists again and watches from there


def _finished(run: _Run, jobs: list[dict[str, Any]],
              deleted: bool = False) -> list[tuple[str, str | None]]:
    by_name = {a.job: a for a in run.active.values()}
    finished = []
    for job in jobs:
        meta = job.get("metadata", {})
        active = by_name.get(meta.get("name"))
        if active is None or (active.uid and meta.get("uid") not in (None, active.uid)):
            continue  # not ours, or the replaced Job of an earlier attempt
        if deleted:
            finished.append((active.stage, "its Job was deleted while running "
                             "(kubectl delete or trackb delete?)"))
            continue
        conditions = {c.get("type"): c for c in job.get("status", {}).get("conditions", [])
                      if c.get("status") == "True"}
        if "Complete" in conditions:
            finished.append((active.stage, None))
        elif "Failed" in conditions:
            failed = conditions["Failed"]
            finished.append((active.stage, _failure_cause(run, active, failed)))
    return finished


def _inspect_pods(run: _Run, active: _Active) -> None:
    """Say what is happening to the stage's pods; raise StageFailed when one is stuck."""
    now = run.clock()
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, active.stage))
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status", {})
        _stream_logs(run, active, pod)
        if status.get("reason") == "Evicted":
            _tell(active, f"evicted:{name}", f"pod {name} Evicted: {status.get('message', '')}")
        for container in _container_statuses(status):
            terminated = container.get("state", {}).get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                _tell(active, f"oom:{name}", f"pod {name}: container {container['name']} "
                      "OOMKilled (raise its memory limit in kubernetes.resources)")
        if status.get("phase") != "Pending":
            continue
        scheduled = next((c for c in status.get("conditions", [])
                          if c.get("type") == "PodScheduled"), {})
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            message = scheduled.get("message", "")
            cause = f"Unschedulable: {message}"
            _tell(active, f"unsched:{name}", f"pod {name} {cause}")
            if _past(active, (name, "Unschedulable"), now, run.budgets.unschedulable_seconds):
                raise _stuck(run, active, pod, f"{cause} (for over "
                             f"{run.budgets.unschedulable_seconds:.0f}s)")
        for container in _container_statuses(status):
            waiting = container.get("state", {}).get("waiting") or {}
            reason, message = waiting.get("reason", ""), waiting.get("message", "")
            where = f"container {container['name']}: {reason}: {message}".rstrip(": ")
            if reason in PERMANENT_WAITING:
                raise _stuck(run, active, pod, where)
            if reason in IMAGE_PULL_WAITING:
                if any(text in message.lower() for text in PERMANENT_PULL_MESSAGES):
                    raise _stuck(run, active, pod, where)
                _tell(active, f"pull:{name}", f"pod {name} {where}")
                if _past(active, (name, "ImagePull"), now, run.budgets.image_pull_seconds):
                    raise _stuck(run, active, pod, f"{where} (for over "
                                 f"{run.budgets.image_pull_seconds:.0f}s)")
            if reason == "ContainerCreating":
                for event in run.client.pod_events(run.namespace, name):
                    text = event.get("message", "")
                    if event.get("reason") == "FailedMount" and "not found" in text:
                        raise _stuck(run, active, pod, f"FailedMount: {text}")


def _container_statuses(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]


def _past(active: _Active, key: tuple[str, str], now: float, budget: float) -> bool:
    first = active.first_seen.setdefault(key, now)
    return now - first >= budget


def _tell(active: _Active, key: str, message: str) -> None:
    if key not in active.told:
        active.told.add(key)
        say(active.stage, message)


def _stuck(run: _Run, active: _Active, pod: dict[str, Any], cause: str) -> StageFailed:
    cause = _one_line(cause)
    _save_k8s(run, active, cause)
    return StageFailed(f"{active.stage}: pod {pod['metadata']['name']} cannot start: {cause}")


def _failure_cause(run: _Run, active: _Active, condition: dict[str, Any]) -> str:
    """The most specific reason a Job failed: a pod's termination, else the Job's."""
    job_reason = f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}"
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, active.stage))
    for pod in reversed(pods):  # the latest attempt first
        status = pod.get("status", {})
        if status.get("reason") == "Evicted":
            return _one_line(f"Evicted: {status.get('message', '')} (job {job_reason})")
        for container in _container_statuses(status):
            terminated = container.get("state", {}).get("terminated") or {}
            code = terminated.get("exitCode")
            if terminated and code not in (0, None):
                last = (terminated.get("message") or "").strip().splitlines()[-1:] or [""]
                reason = terminated.get("reason") or "Error"
                return _one_line(f"{reason} (exit {code}) in container {container['name']}"
                                 f"{': ' + last[0] if last[0] else ''}; job {job_reason}")
    return _one_line(job_reason)


def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(": ")


# -- finishing ----------------------------------------------------------------------------
def _finish(run: _Run, stage: str, cause: str | None) -> None:
    active = run.active.pop(stage)
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, stage))
    if not active.streaming:
        # A pod that started and ended between two inspections still gets its log shown.
        for pod in pods:
            _stream_logs(run, active, pod)
    _save_k8s(run, active, cause, pods)
    if cause is not None:
        raise StageFailed(f"{stage}: {cause}")
    say(stage, f"done in {time.monotonic() - active.started:.1f}s")


def _save_k8s(run: _Run, active: _Active, cause: str | None,
              pods: list[dict[str, Any]] | None = None) -> None:
    """Copy the stage's pod logs and termination states to the store (TTL deletes them).

    Done before dependents start: they hash this folder as their input.
    """
    folder = run.store.child(active.stage).child(K8S_FOLDER)
    try:
        if pods is None:
            pods = run.client.list_pods(run.namespace,
                                        jobspec.selector(run.run_id, active.stage))
        summary = {"job": active.job, "cause": cause, "pods": []}
        for pod in pods:
            name = pod["metadata"]["name"]
            spec = pod.get("spec", {})
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                text = run.client.pod_log(run.namespace, name, container["name"])
                if text:
                    folder.put_text(f"{name}.{container['name']}.log", text)
            status = pod.get("status", {})
            summary["pods"].append({
                "name": name, "phase": status.get("phase"), "reason": status.get("reason"),
                "message": status.get("message"),
                "containers": {c["name"]: c.get("state", {})
                               for c in _container_statuses(status)},
            })
        folder.put_text("status.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except TrackbError as exc:  # losing logs must not hide the stage's own outcome
        say(active.stage, f"could not copy pod logs to the store: {exc}")


def _stream_logs(run: _Run, active: _Active, pod: dict[str, Any]) -> None:
    """Follow the main container's log in a thread once it has started."""
    name = pod["metadata"]["name"]
    if name in active.streaming:
        return
    state = next((c.get("state", {}) for c in pod.get("status", {}).get("containerStatuses", [])
                  if c.get("name") == jobspec.MAIN_CONTAINER), {})
    if not (state.get("running") or state.get("terminated")):
        return
    active.streaming.add(name)

    def follow() -> None:
        try:
            for line in run.client.follow_log(run.namespace, name, jobspec.MAIN_CONTAINER):
                say(active.stage, line)
        except Exception as exc:  # a broken log stream is not a failed stage
            say(active.stage, f"(log stream of {name} ended: {exc})")

    thread = threading.Thread(target=follow, name=f"logs-{name}", daemon=True)
    thread.start()
    run.threads.append(thread)


def _cancel(run: _Run) -> list[str]:
    names = []
    for active in list(run.active.values()):
        try:
            run.client.delete("Job", run.namespace, active.job)
            names.append(active.job)
            say(active.stage, f"Job {active.job} deleted")
        except Exception as exc:
            say(active.stage, f"could not delete Job {active.job}: {exc}")
    run.active.clear()
    return names


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", exc))


# -- status, logs, delete -----------------------------------------------------------------
def status(config: PipelineConfig, run_id: str,
           api: KubeClient | None = None) -> list[dict[str, str]]:
    """One row per stage: ``{"stage", "store", "job"}`` (store: done / not done; job:
    the Job's state on the cluster, or 'none'). Raises ConfigError, UnavailableError."""

    client = api or connect()
    store = open_store(jobspec.run_uri(config, run_id))
    jobs, _ = client.list_jobs(config.kubernetes.namespace, {"trackb/run-id": run_id})
    by_stage = {j["metadata"].get("labels", {}).get("trackb/stage"): j for j in jobs}
    rows = []
    for stage in jobspec.stage_names(config):
        job = by_stage.get(stage)
        rows.append({"stage": stage,
                     "store": "done" if store.child(stage).exists(MANIFEST) else "not done",
                     "job": _job_state(job) if job else "none"})
    return rows


def _job_state(job: dict[str, Any]) -> str:
    status_ = job.get("status", {})
    for condition in status_.get("conditions", []):
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            reason = condition.get("reason")
            return condition["type"].lower() + (f" ({reason})" if reason else "")
    if status_.get("active"):
        return "running"
    return "pending"


def logs(config: PipelineConfig, run_id: str, stage: str,
         api: KubeClient | None = None) -> str:
    """The stage's logs: from its pods if they still exist, else the copy in the store.

    Raises ConfigError for an unknown stage, MissingInputError if neither exists.
    """

    if stage not in jobspec.stage_names(config):
        raise ConfigError(f"unknown stage {stage!r}; stages: "
                          f"{', '.join(jobspec.stage_names(config))}")
    client = api or connect()
    namespace = config.kubernetes.namespace
    parts = []
    for pod in client.list_pods(namespace, jobspec.selector(run_id, stage)):
        text = client.pod_log(namespace, pod["metadata"]["name"], jobspec.MAIN_CONTAINER)
        parts.append(f"--- pod {pod['metadata']['name']} ---\n{text}")
    if parts:
        return "\n".join(parts)
    folder = open_store(jobspec.run_uri(config, run_id)).child(stage).child(K8S_FOLDER)
    saved = sorted(key for key in folder.list() if key.endswith(".log"))
    if not saved:
        raise MissingInputError(f"no pods and no saved logs for {stage} of run {run_id}")
    return "\n".join(f"--- {key} (saved) ---\n{folder.get_text(key)}" for key in saved)


def delete(config: PipelineConfig, run_id: str, api: KubeClient | None = None) -> list[str]:
    """Delete every object of the run (Jobs with their pods, ConfigMaps, Services,
    NetworkPolicies, the vLLM server); the store is left alone. Returns 'Kind/name'
    of what was deleted. Raises ConfigError, UnavailableError."""

    client = api or connect()
    namespace = config.kubernetes.namespace
    deleted = []
    jobs, _ = client.list_jobs(namespace, {"trackb/run-id": run_id})
    for job in jobs:
        if client.delete("Job", namespace, job["metadata"]["name"]):
            deleted.append(f"Job/{job['metadata']['name']}")
    # The other objects have fixed names: build them instead of listing (the Role then
    # needs no list on them).
    for objects in jobspec.build_all(config, run_id).values():
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if kind != "Job" and client.delete(kind, namespace, name):
                deleted.append(f"{kind}/{name}")
    return deleted
