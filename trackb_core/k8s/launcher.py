"""``trackb run-all --backend k8s``: every stage as a Kubernetes Job, in dependency order.

The launcher reads top to bottom as one loop, after a preflight (:mod:`preflight`) that
refuses, before anything is created, what would fail later:

1. a stage is *ready* when the stages it reads from are done; a ready stage whose
   manifest exists in the store and verifies is skipped as cached (so a rerun of a
   failed run id resumes at the failed stage);
2. otherwise its objects (from the one Job builder, :mod:`trackb_core.k8s.jobspec`)
   are created, replacing leftovers of an earlier attempt;
3. the run's Jobs are listed, then watched from the list's resourceVersion for at most
   ``poll_seconds`` (a 410 Gone or a watch that cannot be read just ends the round),
   until one is Complete or Failed; each round the pods of running
   stages (and the events of a Job without pods) are inspected
   (:mod:`trackb_core.k8s.diagnose`), so a stuck state fails the run with its name and
   likely cause (Unschedulable, ImagePullBackOff, a crash-looping vLLM sidecar, a quota,
   a Multi-Attach volume past its budget; a missing PriorityClass, an admission denial,
   a driver too old for the image at once; a Job Kueue keeps suspended, from its
   Workload: waiting for quota past its budget, a missing queue at once) instead of
   hanging: a Job's backoffLimit
   never fires for a pod that never starts, nor for a sidecar the kubelet restarts;
4. when a Job ends, its pods' logs and termination reasons are copied to
   ``runs/<id>/<stage>/_k8s/`` in the store before TTL deletes them; a failure stops
   the run with one line naming the stage and the cause.

Staying alive (nothing here ever throws GPU hours away by accident):

- one launcher drives a run at a time: it holds the run's Lease (:mod:`lease`); a second
  one waits until the holder gives it up or stops renewing it (it died);
- a stage whose Job is still running, with the same objects and inputs (the
  ``trackb/config-hash`` annotation), is adopted, never recreated: a restarted launcher
  picks up where the last one was;
- API calls that fail for a passing reason are retried with backoff and jitter, and a
  broken watch is re-established from the last resourceVersion;
- signals have one meaning each: Ctrl-C at an interactive terminal cancels the run
  (deletes its active Jobs, exit 130); SIGTERM (eviction, drain, helm upgrade, kill), a
  Ctrl-C without a terminal and a lost lease delete nothing (exit 143, or 75);
  ``trackb delete`` is the explicit cancel;
- a failed stage exits 80, which the launcher Job's podFailurePolicy does not retry; its
  running siblings are left to finish, for a rerun to adopt.

Ownership (what goes away by itself): a stage's ConfigMap, Service and NetworkPolicy are
owned by its Job (created before it, owned once it exists), so the Job's deletion or TTL
removes them. The vLLM server (deployment mode) is owned by the in-cluster launcher's
Job, so a launcher Job that is deleted (TTL, ``helm uninstall``) takes it along; a laptop
launcher has no Job, so the server is owned by the run's Lease, which outlives a dead
launcher: such a server stays until ``trackb delete`` (or a rerun, which reuses it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trackb_core.config import build_config
from trackb_core.errors import (
    EXIT_INTERRUPTED,
    EXIT_STAGE_FAILED,
    EXIT_TERMINATED,
    ConfigError,
    MissingInputError,
    Terminated,
    TrackbError,
    UnavailableError,
)
from trackb_core.k8s import diagnose, jobspec, preflight
from trackb_core.k8s.client import (
    RETRIED_STATUSES,
    KubeClient,
    WatchExpired,
    connect,
    wait_deleted,
)
from trackb_core.k8s.lease import (
    PIPELINE_ANNOTATION,
    STORE_ANNOTATION,
    LeaseLost,
    RunLease,
    lease_name,
)
from trackb_core.k8s.settings import LauncherConfig
from trackb_core.partition import (
    describe_progress,
    part_name,
    part_store,
    partitions_of,
    read_progress,
    unfinished_parts,
)
from trackb_core.pipeline import PipelineConfig, dependencies, dump_yaml, report_uri
from trackb_core.stage import MANIFEST, cached_manifest, say
from trackb_core.stages import step as step_row
from trackb_core.store import Store, open_store

K8S_FOLDER = "_k8s"
# Conditions of an ended Job (Complete, Failed) or JobSet (Completed, Failed).
COMPLETE = ("Complete", "Completed")
ENDED = (*COMPLETE, "Failed")
# A stage Job's annotation: the hash of its objects and inputs (see _config_hash).
CONFIG_HASH = "trackb/config-hash"


class StageFailed(TrackbError):
    """A stage's Job failed or its pod cannot start; the message names stage and cause
    ("<stage>: <cause>"). Exit code 80, which the launcher Job's podFailurePolicy does not
    retry: its retries would only rerun the failed stage with its own retries."""

    exit_code = EXIT_STAGE_FAILED

    @property
    def stage(self) -> str:
        return str(self).split(":", 1)[0]


class Interrupted(TrackbError):
    """Ctrl-C at a terminal: the run is cancelled, its active Jobs deleted."""

    exit_code = EXIT_INTERRUPTED


class Detached(TrackbError):
    """This launcher stopped (SIGTERM, a lost lease) and deleted nothing: the run's Jobs
    go on, and a launcher of the same run id started later adopts them."""

    exit_code = EXIT_TERMINATED


@dataclass
class _Active:
    """One stage whose Job is running."""

    stage: str
    job: str
    objects: list[dict[str, Any]]
    uid: str | None = None  # tells this Job from an earlier attempt's of the same name
    kind: str = "Job"  # or JobSet (a multi-node training, distributed.gang 'jobset')
    queued: bool = False  # created suspended, for Kueue to admit (kubernetes.kueue)
    started: float = field(default_factory=time.monotonic)
    first_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    told: set[str] = field(default_factory=set)
    streaming: set[str] = field(default_factory=set)
    # A partitioned step's Indexed Job: the parts it runs (in completion-index order) of
    # how many; when the parts' progress was last printed (time.monotonic).
    parts: list[int] | None = None
    count: int = 1
    progress_at: float | None = None


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
    configs: dict[str, Any] = field(default_factory=dict)  # stage -> its StageConfig
    # Seconds on a monotonic clock: every budget is measured on it (tests inject one).
    clock: Callable[[], float] = time.monotonic


def run_on_kubernetes(config: PipelineConfig, run_id: str, api: KubeClient | None = None,
                      budgets: LauncherConfig | None = None,
                      clock: Callable[[], float] = time.monotonic,
                      cancel_on_interrupt: bool = False) -> str:
    """Run every stage of ``config`` not already done as Jobs; returns the report's URI.

    ``api`` is a :class:`trackb_core.k8s.client.KubeClient` (default: kubeconfig, else
    in-cluster). ``cancel_on_interrupt``: Ctrl-C deletes the run's active Jobs (a person
    at a terminal); otherwise nothing is ever deleted on a signal. Raises StageFailed
    naming the stage and cause (exit 80: not worth a retry), Interrupted on Ctrl-C,
    Detached when this launcher stops and leaves the run's Jobs to a later one (SIGTERM,
    a lost lease), ConfigError for settings that cannot run, UnavailableError if the API
    stays down past ``api_retry_seconds``.
    """

    client = api or connect()
    budgets = budgets or config.kubernetes.budgets
    client.retry.seconds = budgets.api_retry_seconds
    # Everything that can be known before the first Job is checked before it.
    preflight.check(config, run_id, client)
    store = open_store(jobspec.run_uri(config, run_id))
    store.check_writable()
    run = _Run(config, run_id, client, budgets, store, config.kubernetes.namespace,
               clock=clock)
    configs = run.configs = jobspec.stage_configs(config, run_id)
    needs = dependencies(config)
    order = jobspec.stage_names(config)
    say("run-all", f"run {run_id} on Kubernetes (namespace {run.namespace}) in {store.uri}")
    pipeline_yaml = dump_yaml(config.model_copy(update={"run_id": run_id}))
    lease = RunLease(client, run.namespace, run_id, budgets.lease_seconds, clock=clock,
                     annotations={STORE_ANNOTATION: store.uri,
                                  PIPELINE_ANNOTATION: pipeline_yaml})
    lease.acquire()
    started = time.perf_counter()
    done: set[str] = set()
    finished_cleanly = False
    try:
        store.put_text("pipeline.yaml", pipeline_yaml)
        while len(done) < len(order):
            lease.check()
            for stage in order:
                if stage in done or stage in run.active or not set(needs[stage]) <= done:
                    continue
                if cached_manifest(configs[stage], store.child(stage)) is not None:
                    say(stage, "cached: manifest matches this config and these inputs; skipped")
                    done.add(stage)
                    continue
                todo = _parts_to_run(run, stage)
                if todo == []:
                    say(stage, "every part is done (manifests match): merging them")
                    _merge(run, stage)
                    done.add(stage)
                    continue
                _start(run, stage, [store.child(need) for need in needs[stage]], todo)
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
        finished_cleanly = True
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            raise _detached(run, "interrupted (not from an interactive terminal)",
                            exit_code=EXIT_INTERRUPTED) from None
        names = _cancel(run)
        _cleanup_vllm(run)
        raise Interrupted("cancelled: deleted Jobs " + (", ".join(names) or "(none)") +
                          f"; rerun with --run-id {run_id} to resume") from None
    except Terminated:
        raise _detached(run, "terminated (SIGTERM)") from None
    except LeaseLost as exc:
        raise _detached(run, str(exc), exit_code=exc.exit_code) from None
    except StageFailed as exc:
        # The failed stage's Job, if still there (a pod that cannot start), is deleted:
        # it holds a request the scheduler cannot meet. Running siblings go on, and a
        # rerun adopts them.
        stuck = run.active.pop(exc.stage, None)
        if stuck is not None:
            _delete_job(run, stuck)
        if jobspec.teacher_step().folder not in run.active:
            _cleanup_vllm(run)  # no stage needs the server any more
        _say_left_running(run)
        raise
    except BaseException:
        _say_left_running(run)
        raise
    finally:
        if finished_cleanly:
            _cleanup_vllm(run)
        lease.release()
        for thread in run.threads:
            thread.join(timeout=2)
    say("run-all", f"finished in {time.perf_counter() - started:.1f}s")
    return report_uri(store)


def _say_left_running(run: _Run) -> None:
    if run.active:
        say("run-all", "left running: " + ", ".join(
            f"{a.stage} (Job {a.job})" for a in run.active.values()) +
            f"; a rerun of run {run.run_id} adopts them, `trackb delete {run.run_id}` "
            "cancels them")


def _detached(run: _Run, why: str, exit_code: int = EXIT_TERMINATED) -> Detached:
    """This launcher stops; the run's Jobs go on for a later launcher to adopt."""
    running = ", ".join(a.job for a in run.active.values()) or "(none)"
    error = Detached(f"{why}: deleted nothing; Jobs still running: {running}; a launcher "
                     f"of run {run.run_id} started later adopts them")
    error.exit_code = exit_code
    return error


# -- partitioned steps --------------------------------------------------------------------
def _parts_to_run(run: _Run, stage: str) -> list[int] | None:
    """The parts of a partitioned step without a matching manifest (a finished part is
    never redone); None for a step that is not partitioned."""
    config = run.configs[stage]
    count = partitions_of(config)
    if count <= 1:
        return None
    return unfinished_parts(config, run.store.child(stage))


def _merge(run: _Run, stage: str) -> None:
    """Write a partitioned step's output and manifest from its finished parts: the step
    command's merger (generate.merge, evaluate.merge), run here in the launcher.

    Here rather than in a Job of its own: the merge is cheap I/O (read the parts' files,
    write the step's), the launcher already reads and writes the store (manifests, the
    pods' logs), and a pod would cost a start (scheduling, an image pull, a Kueue
    admission) for seconds of work. It is idempotent and writes the manifest last, so a
    launcher that dies mid-merge leaves no step manifest and the next one merges again
    (the parts' manifests still match: nothing is regenerated).

    Raises StageFailed naming the stage when the merge fails (a part missing or unreadable).
    """
    row = step_row(stage)
    module, _ = row.cli.load()
    try:
        getattr(module, row.cli.merger)(run.configs[stage], run.store.child(stage))
    except TrackbError as exc:
        raise StageFailed(_one_line(f"{stage}: merging its parts failed: {exc}")) from exc


def _report_progress(run: _Run, active: _Active) -> None:
    """Print each running part's progress (done/total, rate, ETA, from its progress.json)
    at most every ``progress_seconds``; the first time as soon as one part reports."""
    if active.parts is None:
        return
    now = time.monotonic()
    if active.progress_at is not None and now - active.progress_at < run.budgets.progress_seconds:
        return
    out = run.store.child(active.stage)
    lines = []
    for part in active.parts:
        progress = read_progress(part_store(out, part, active.count))
        if progress is not None:
            lines.append(f"{part_name(part, active.count)}: {describe_progress(progress)}")
    if lines:
        active.progress_at = now
        for line in lines:
            say(active.stage, line)


def _index_list(text: str | None) -> list[int]:
    """A Job's ``status.failedIndexes`` / ``completedIndexes`` ("1,3-5") as indexes."""
    found: list[int] = []
    for chunk in (text or "").split(","):
        low, _, high = chunk.strip().partition("-")
        if low.isdigit():
            found += range(int(low), int(high if high.isdigit() else low) + 1)
    return found


# -- starting a stage ---------------------------------------------------------------------
def _start(run: _Run, stage: str, upstream: list[Store], todo: list[int] | None = None) -> None:
    """Create the stage's objects, or adopt its Job when an earlier launcher of this run
    left it running with the same objects and the same inputs. ``todo``: the parts of a
    partitioned step still to run (its Indexed Job runs only those)."""
    objects = jobspec.build_stage(stage, run.config, run.run_id, parts=todo)
    job = jobspec.runner(objects)
    kind, queued = job["kind"], jobspec.queued(run.config.kubernetes, stage)
    # A partitioned step's hash is that of the Job for all its parts: a relaunch adopts
    # the running Job whichever of its parts finished since (and so need no pod now).
    digest = _config_hash(objects if todo is None else
                          jobspec.build_stage(stage, run.config, run.run_id), upstream)
    job["metadata"].setdefault("annotations", {})[CONFIG_HASH] = digest
    count = partitions_of(run.configs[stage]) if stage in run.configs else 1
    live = _adoptable(run, job["metadata"]["name"], digest, kind)
    serves = (stage == jobspec.teacher_step().folder and jobspec.serves_vllm(run.config)
              and run.config.kubernetes.vllm.serve == "deployment")
    if serves:
        _start_vllm(run, reuse=live is not None)
    if live is not None:
        uid = live["metadata"].get("uid")
        run.active[stage] = _Active(stage, job["metadata"]["name"], objects, uid=uid,
                                    kind=kind, queued=queued, count=count,
                                    parts=jobspec.job_parts(live) if todo is not None
                                    else None)
        say(stage, f"adopted the running {kind} {job['metadata']['name']} (uid {uid}) of an "
            "earlier launcher: same objects, same inputs")
        # The earlier launcher may have died between creating the Job and owning the rest.
        _own_by_job(run, stage, objects, live)
        return
    # An old manifest must not outlive a new attempt that fails before the stage starts.
    run.store.child(stage).delete(MANIFEST)
    # The builder lists the Job last, and it is created last: its pod mounts the ConfigMap
    # (created after the Job, it could be missing when the pod starts: a FailedMount that
    # diagnosis takes as permanent), and a code-running pod must not run a moment before
    # its NetworkPolicy exists. So the others are owned only once the Job exists, by a
    # patch of their ownerReferences (a Job created suspended, then resumed, would avoid
    # the patch, but with Kueue spec.suspend is Kueue's to flip).
    created = [_create_or_replace(run, obj, digest) for obj in objects]
    job = jobspec.runner(created)
    run.active[stage] = _Active(stage, job["metadata"]["name"], objects,
                                uid=job["metadata"].get("uid"), kind=kind, queued=queued,
                                parts=todo, count=count)
    parts = ("" if todo is None else f" for parts {', '.join(map(str, todo))} of {count}"
             " (an Indexed Job)")
    say(stage, f"{kind} {job['metadata']['name']} created{parts}" + (
        f" (queued in Kueue's LocalQueue {run.config.kubernetes.kueue.queue_name})"
        if queued else ""))
    _own_by_job(run, stage, objects, job)


def _own_by_job(run: _Run, stage: str, objects: list[dict[str, Any]],
                job: dict[str, Any]) -> None:
    """Make the stage's Job the owner of its other objects (ConfigMap, Service,
    NetworkPolicy), so that deleting the Job, or its TTL after it finished, removes them
    too. Best effort: an object left unowned is still removed by ``trackb delete``."""
    meta = job["metadata"]
    if not meta.get("uid"):
        # A real API server returns the uid with the created object; read it back anyway.
        meta = (run.client.get(job["kind"], run.namespace, meta["name"]) or {}).get(
            "metadata") or {}
    if not meta.get("uid"):
        say(stage, f"Job {job['metadata']['name']} has no uid yet: its other objects stay "
            f"unowned (`trackb delete {run.run_id}` removes them)")
        return
    owner = jobspec.owner_reference(job["apiVersion"], job["kind"], meta["name"], meta["uid"])
    for obj in objects:
        if obj["kind"] != job["kind"]:
            _set_owner(run, stage, obj, owner)


def _set_owner(run: _Run, stage: str, obj: dict[str, Any], owner: dict[str, Any]) -> None:
    """Replace ``obj``'s ownerReferences with ``owner`` (a merge patch replaces the list
    whole, so a former owner, e.g. an earlier launcher, is dropped)."""
    name = obj["metadata"]["name"]
    try:
        run.client.patch(obj["kind"], run.namespace, name,
                         {"metadata": {"ownerReferences": [owner]}})
    except run.client.ApiException as exc:
        say(stage, f"could not make {owner['kind']} {owner['name']} the owner of "
            f"{obj['kind']} {name}: {_api_message(exc)}; `trackb delete {run.run_id}` "
            "removes it")


def _config_hash(objects: list[dict[str, Any]], upstream: list[Store]) -> str:
    """What a stage's Job would do: its objects and the manifests of the stages it reads
    (a Job started before an upstream stage was redone must not be adopted)."""
    digest = hashlib.sha256(json.dumps(objects, sort_keys=True).encode())
    for folder in upstream:
        digest.update(b"\0" + folder.uri.encode() + b"\0")
        digest.update(folder.get_bytes(MANIFEST) if folder.exists(MANIFEST) else b"")
    return digest.hexdigest()


def _adoptable(run: _Run, name: str, digest: str, kind: str = "Job") -> dict[str, Any] | None:
    """The live Job (or JobSet) ``name`` if it carries ``digest`` (not finished, not being
    deleted)."""
    job = run.client.get(kind, run.namespace, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None
    if (job["metadata"].get("annotations") or {}).get(CONFIG_HASH) != digest:
        return None
    ended = any(c.get("status") == "True" and c.get("type") in ENDED
                for c in (job.get("status") or {}).get("conditions", []))
    return None if ended else job


def _create_or_replace(run: _Run, obj: dict[str, Any],
                       digest: str | None = None) -> dict[str, Any]:
    """The object as the API created it (with its uid)."""
    try:
        return run.client.create(obj)
    except run.client.ApiException as exc:
        if exc.status != 409:
            raise StageFailed(f"{obj['metadata'].get('labels', {}).get('trackb/stage', '?')}: "
                              f"cannot create {obj['kind']} {obj['metadata']['name']}: "
                              f"{_api_message(exc)}") from exc
        name = obj["metadata"]["name"]
        if obj["kind"] in jobspec.RUNNER_KINDS and digest is not None:
            # A create that timed out after the server made the Job, retried: it is ours.
            live = _adoptable(run, name, digest, obj["kind"])
            if live is not None:
                return live
        # A leftover of an earlier attempt (a failed Job, its ConfigMap): replace it, so
        # the new attempt runs with the current config.
        run.client.delete(obj["kind"], run.namespace, name)
        wait_deleted(run.client, obj["kind"], run.namespace, name, run.budgets.replace_seconds)
        return run.client.create(obj)


def _start_vllm(run: _Run, reuse: bool = False) -> None:
    """Deployment mode: create the teacher server and wait until it is ready. ``reuse``:
    the generate Job was adopted, so the server it talks to is kept if it exists."""
    objects = jobspec.build_vllm_service(run.config, run.run_id)
    owner = _server_owner(run)
    for obj in objects:
        if owner is not None:
            obj["metadata"]["ownerReferences"] = [owner]
        if not (reuse and run.client.get(obj["kind"], run.namespace, obj["metadata"]["name"])):
            _create_or_replace(run, obj)
        elif owner is not None:
            # Kept for the adopted generate Job: this launcher is its owner now, or the
            # server would go with the earlier launcher's Job.
            _set_owner(run, jobspec.teacher_step().folder, obj, owner)
    name = objects[0]["metadata"]["name"]
    budget = run.config.kubernetes.vllm.startup_seconds
    say(jobspec.teacher_step().folder,
        f"waiting up to {budget}s for the vLLM Deployment {name}")
    deadline = run.clock() + budget
    while True:
        deployment = run.client.get("Deployment", run.namespace, name) or {}
        if ((deployment.get("status") or {}).get("readyReplicas") or 0) >= 1:
            return
        if run.clock() > deadline:
            raise StageFailed(_one_line(f"{jobspec.teacher_step().folder}: the vLLM Deployment {name} was not ready "
                                        f"after {budget}s: {_vllm_pod_state(run)}"))
        time.sleep(run.budgets.poll_seconds)


def _server_owner(run: _Run) -> dict[str, Any] | None:
    """What the vLLM server dies with when its launcher is gone without deleting it.

    In a cluster: the launcher's own Job (its pod's labels, jobspec.LAUNCHER_JOB_ENV), not
    its pod: a retried launcher pod of the same Job reuses the server, and the Job goes
    (TTL, ``helm uninstall``, ``trackb delete``) only when no launcher of it is left. From
    a laptop there is no pod: the run's Lease, which outlives a dead launcher (it records
    the run), so the server stays until ``trackb delete`` deletes the Lease; a launcher of
    the same run started later reuses it meanwhile. None: the Lease has no uid (never on
    a real cluster).
    """
    job, uid = (os.environ.get(env) for env in jobspec.LAUNCHER_JOB_ENV)
    if job and uid:
        return jobspec.owner_reference("batch/v1", "Job", job, uid)
    lease = run.client.get("Lease", run.namespace, lease_name(run.run_id)) or {}
    uid = (lease.get("metadata") or {}).get("uid")
    if not uid:
        return None
    return jobspec.owner_reference(lease.get("apiVersion") or "coordination.k8s.io/v1",
                                   "Lease", lease_name(run.run_id), uid)


def _vllm_pod_state(run: _Run) -> str:
    """Why the server is not ready, as far as its pods tell (the same diagnosis as a
    stage's pods: a crash loop names its likely cause)."""
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, "vllm"))
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        found = [f for f in diagnose.pod_findings(pod, run.budgets, *_evidence(run, pod))
                 if f.budget != diagnose.SAY_ONLY]
        if found:
            return f"{found[0].where} {found[0].cause}"
        scheduled = next((c for c in status.get("conditions", [])
                          if c.get("type") == "PodScheduled"), {})
        if scheduled.get("status") == "False":
            return f"pod {name} {scheduled.get('reason', '')}: {scheduled.get('message', '')}"
        for container in diagnose.container_statuses(status):
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
                if active.kind == "Job" and active.job not in listed]
        finished = (_finished(run, jobs) + _finished(run, gone, deleted=True)
                    + _finished_jobsets(run))
        if finished:
            return finished
        for stage in list(run.active):
            _inspect_pods(run, run.active[stage])
            _report_progress(run, run.active[stage])
        # Leave the watch after poll_seconds even while events flow, so that stuck
        # pods are inspected on time.
        finished = _watch_round(run, selector)
        if finished:
            return finished


def _watch_round(run: _Run, selector: dict[str, str]) -> list[tuple[str, str | None]]:
    """Watch the run's Jobs from the last resourceVersion for one round (poll_seconds).

    A watch that breaks (connection reset, 429, 5xx) is re-established from the last
    resourceVersion seen after a backoff; a 410 Gone ends the round (the caller lists
    again). Raises UnavailableError once the client's retry budget is spent.
    """
    # The round's length is a cadence in real time (how often pods are inspected), not a
    # budget: it stays on the real clock.
    deadline = time.monotonic() + run.budgets.poll_seconds
    started, attempt = None, 0
    while time.monotonic() <= deadline:
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
                    return []
            return []  # the server ended the watch: the next round lists again
        except WatchExpired:
            return []  # 410 Gone: the next round lists again and watches from there
        except (UnavailableError, run.client.ApiException) as exc:
            if isinstance(exc, run.client.ApiException) and exc.status not in RETRIED_STATUSES:
                raise
            started = run.client.retry.clock() if started is None else started
            if not run.client.retry.wait(attempt, started, None):
                raise UnavailableError(f"the watch of run {run.run_id}'s Jobs keeps "
                                       f"failing: {exc}") from exc
            attempt += 1
    return []


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
        if any(kind in conditions for kind in COMPLETE):
            finished.append((active.stage, None))
        elif "Failed" in conditions:
            failed = conditions["Failed"]
            indexes = _index_list(job.get("status", {}).get("failedIndexes"))
            cause = _failure_cause(run, active, failed, indexes)
            if active.parts is not None and indexes:
                names = [part_name(active.parts[i], active.count) for i in indexes
                         if i < len(active.parts)]
                cause = (f"{', '.join(names)} failed (a rerun runs only the parts without "
                         f"a manifest): {cause}")
            finished.append((active.stage, cause))
    return finished


def _finished_jobsets(run: _Run) -> list[tuple[str, str | None]]:
    """The active JobSets that ended (status conditions Completed or Failed) or are gone.

    The watch sees Jobs only (a JobSet's child Jobs are not the stage's), so a JobSet is
    read once a round: it ends at most poll_seconds after its last Job.
    """
    jobsets = [a for a in run.active.values() if a.kind == "JobSet"]
    found = [run.client.get("JobSet", run.namespace, a.job) for a in jobsets]
    return (_finished(run, [j for j in found if j is not None])
            + _finished(run, [{"metadata": {"name": a.job}}
                              for a, j in zip(jobsets, found, strict=True) if j is None],
                        deleted=True))


def _inspect_pods(run: _Run, active: _Active) -> None:
    """Say once what is stuck in the stage's pods (or its Job, while it has none); raise
    StageFailed when a state outlasts its budget, at once when no wait can fix it."""
    now = run.clock()
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, active.stage))
    found: list[diagnose.Finding] = []
    for pod in pods:
        _stream_logs(run, active, pod)
        found += diagnose.pod_findings(pod, run.budgets, *_evidence(run, pod))
    if not pods:
        # Only the Job's events say why it made no pod (quota, PriorityClass, admission).
        events = run.client.object_events(run.namespace, active.kind, active.job)
        found += diagnose.job_without_pods(active.job, active.uid, events, run.budgets)
        if active.queued:
            # Suspended until Kueue admits it: waiting, unless its Workload says otherwise.
            workloads = run.client.list_workloads(run.namespace, active.kind, active.job,
                                                  active.uid)
            found += diagnose.queued_job(f"{active.kind} {active.job}", workloads,
                                         run.budgets)
    for finding in found:
        if finding.budget is diagnose.NOW:
            raise _stuck(run, active, finding.where, finding.cause)
        _tell(active, f"{finding.state}:{finding.where}", f"{finding.where} {finding.cause}")
        if _past(active, (finding.where, finding.state), now, finding.budget):
            raise _stuck(run, active, finding.where,
                         f"{finding.cause} (for over {finding.budget:.0f}s)")


def _evidence(run: _Run, pod: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """What diagnose.pod_findings asks for about ``pod``: its events, and the previous
    log of each crashed container (nothing for a pod that is doing well)."""
    name = pod["metadata"]["name"]
    events = run.client.pod_events(run.namespace, name) if diagnose.wants_events(pod) else []
    previous = {container: run.client.previous_log(run.namespace, name, container,
                                                   tail_lines=diagnose.LOG_TAIL)
                for container in diagnose.crashed(pod)}
    return events, previous


def _past(active: _Active, key: tuple[str, str], now: float, budget: float) -> bool:
    first = active.first_seen.setdefault(key, now)
    return now - first >= budget


def _tell(active: _Active, key: str, message: str) -> None:
    if key not in active.told:
        active.told.add(key)
        say(active.stage, message)


def _stuck(run: _Run, active: _Active, where: str, cause: str) -> StageFailed:
    """The stage's failure, ``where`` ('pod <name>', 'Job <name>') stuck for ``cause``,
    with its pods' logs and status saved to the store first."""
    cause = _one_line(cause)
    _save_k8s(run, active, cause)
    return StageFailed(f"{active.stage}: {where} cannot start: {cause}")


def _failure_cause(run: _Run, active: _Active, condition: dict[str, Any],
                   indexes: list[int] | None = None) -> str:
    """The most specific reason a Job failed: a pod's termination (one of the failed
    ``indexes`` of an Indexed Job, when given), else the Job's."""
    job_reason = f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}"
    pods = run.client.list_pods(run.namespace, jobspec.selector(run.run_id, active.stage))
    if indexes:
        pods = [pod for pod in pods if _pod_index(pod) in indexes] or pods
    for pod in reversed(pods):  # the latest attempt first
        status = pod.get("status", {})
        if status.get("reason") == "Evicted":
            return _one_line(f"Evicted: {status.get('message', '')} (job {job_reason})")
        for container in diagnose.container_statuses(status):
            terminated = container.get("state", {}).get("terminated") or {}
            code = terminated.get("exitCode")
            if terminated and code not in (0, None):
                last = (terminated.get("message") or "").strip().splitlines()[-1:] or [""]
                # A GPU failure is named, not just quoted (the log's tail is the message).
                known = diagnose.gpu_cause(terminated.get("message") or "",
                                           vllm=container["name"] == jobspec.VLLM_CONTAINER)
                last = [known[0]] if known else last
                reason = terminated.get("reason") or "Error"
                return _one_line(f"{reason} (exit {code}) in container {container['name']}"
                                 f"{': ' + last[0] if last[0] else ''}; job {job_reason}")
    return _one_line(job_reason)


def _pod_index(pod: dict[str, Any]) -> int | None:
    """The completion index of a pod of an Indexed Job (None for other pods)."""
    value = (pod.get("metadata", {}).get("annotations") or {}).get(
        jobspec.COMPLETION_INDEX_ANNOTATION)
    return int(value) if str(value).isdigit() else None


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
    if active.parts is not None:
        _merge(run, stage)
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
        summary: dict[str, Any] = {"job": active.job, "cause": cause, "pods": []}
        events = []
        for pod in pods:
            name = pod["metadata"]["name"]
            spec = pod.get("spec", {})
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                text = run.client.pod_log(run.namespace, name, container["name"])
                if text:
                    folder.put_text(f"{name}.{container['name']}.log", text)
            # A crashed container's own account is in the log of its run before this one.
            for container in diagnose.crashed(pod):
                text = run.client.previous_log(run.namespace, name, container)
                if text:
                    folder.put_text(f"{name}.{container}.previous.log", text)
            status = pod.get("status", {})
            statuses = diagnose.container_statuses(status)
            summary["pods"].append({
                "name": name, "phase": status.get("phase"), "reason": status.get("reason"),
                "message": status.get("message"),
                "containers": {c["name"]: c.get("state", {}) for c in statuses},
                "restarts": {c["name"]: {"restartCount": c["restartCount"],
                                         "lastState": c.get("lastState", {})}
                             for c in statuses if c.get("restartCount")},
            })
            if cause is not None:
                events += run.client.pod_events(run.namespace, name)
        if cause is not None and not pods:
            events += run.client.object_events(run.namespace, active.kind, active.job)
        if cause is not None:
            # Why a stuck pod or a Job without pods is stuck is often only in its events.
            summary["events"] = [
                {"object": f"{(e.get('involvedObject') or {}).get('kind')}/"
                           f"{(e.get('involvedObject') or {}).get('name')}",
                 "type": e.get("type"), "reason": e.get("reason"),
                 "message": e.get("message"), "count": e.get("count")} for e in events]
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
    """Delete every active Job (the user cancelled the run); their names."""
    names = [active.job for active in list(run.active.values()) if _delete_job(run, active)]
    run.active.clear()
    return names


def _delete_job(run: _Run, active: _Active) -> bool:
    try:
        run.client.delete(active.kind, run.namespace, active.job)
        say(active.stage, f"{active.kind} {active.job} deleted")
        return True
    except Exception as exc:
        say(active.stage, f"could not delete {active.kind} {active.job}: {exc}")
        return False


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", exc))


# -- status, logs, delete -----------------------------------------------------------------
def run_config(run_id: str, namespace: str, api: KubeClient | None = None) -> PipelineConfig:
    """The pipeline of ``run_id`` as its launcher recorded it on the run's Lease, so that
    ``trackb status/logs/delete RUN_ID`` need no config file. Raises MissingInputError
    when no launcher of that run ever started in ``namespace``, ConfigError when the
    recorded pipeline is not valid here (another trackb version), UnavailableError."""
    import yaml

    client = api or connect()
    lease = client.get("Lease", namespace, lease_name(run_id))
    text = ((lease or {}).get("metadata", {}).get("annotations") or {}).get(PIPELINE_ANNOTATION)
    if not text:
        raise MissingInputError(f"no run {run_id!r} in namespace {namespace} (no Lease "
                                f"{lease_name(run_id)} recording its pipeline): check the "
                                "run id and --namespace, or pass the run's --config")
    return build_config(PipelineConfig, yaml.safe_load(text),
                        source=f"the pipeline recorded on Lease {lease_name(run_id)}")


def status(config: PipelineConfig, run_id: str,
           api: KubeClient | None = None) -> list[dict[str, Any]]:
    """One row per stage: ``{"stage", "store", "job"}`` (store: done / not done, or
    'unknown' when the store cannot be read from here; job: the Job's state on the
    cluster, or 'none'); a partitioned step's row adds ``"partitions"``: one
    ``{"part", "state"}`` per part (:func:`partition_states`). Raises ConfigError,
    UnavailableError."""

    client = api or connect()
    namespace = config.kubernetes.namespace
    jobs, _ = client.list_jobs(namespace, {"trackb/run-id": run_id})
    by_stage = {j["metadata"].get("labels", {}).get("trackb/stage"): j for j in jobs}
    try:
        store: Store | None = open_store(jobspec.run_uri(config, run_id))
    except TrackbError as exc:
        say("status", f"cannot read the store ({exc}): its column says unknown")
        store = None
    rows: list[dict[str, Any]] = []
    for stage in jobspec.stage_names(config):
        job = by_stage.get(stage)
        row: dict[str, Any] = {"stage": stage, "store": _store_state(store, stage),
                               "job": _job_state(job) if job else "none"}
        count = jobspec.stage_partitions(config, run_id, stage)
        if count > 1:
            pods = client.list_pods(namespace, jobspec.selector(run_id, stage)) if job else []
            row["partitions"] = partition_states(
                count, store.child(stage) if store is not None else None, job, pods)
        rows.append(row)
    return rows


def partition_states(count: int, out: Store | None, job: dict[str, Any] | None,
                     pods: list[dict[str, Any]]) -> list[dict[str, str]]:
    """``{"part": "part-00001-of-00004", "state": ...}`` for each part of a partitioned
    step whose output folder is ``out`` (None: the store is out of reach), Indexed Job
    ``job`` (None: there is none) and its ``pods``. A state is ``done`` (the part's
    manifest exists), ``failed: <cause>`` (its index is in the Job's failedIndexes; the
    cause from its pod's termination), ``running[: <progress>]`` (its pod runs; progress
    from its progress.json), or ``pending`` (``unknown`` when neither store nor Job
    tells). Raises nothing for an unreadable store (its parts say unknown)."""
    listed = jobspec.job_parts(job) if job else None
    index_of = {part: i for i, part in enumerate(listed or [])}
    failed = set(_index_list((job or {}).get("status", {}).get("failedIndexes")))
    by_index: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        index = _pod_index(pod)
        if index is not None:
            by_index.setdefault(index, []).append(pod)
    states = []
    for part in range(count):
        name = part_name(part, count)
        state = _folder_state(part_store(out, part, count)) if out is not None else "unknown"
        if state == "done":
            states.append({"part": name, "state": "done"})
            continue
        index = index_of.get(part)
        mine = by_index.get(index, []) if index is not None else []
        if index in failed:
            state = "failed: " + (_pod_cause(mine) or "its pods failed past the retries")
        elif any(p.get("status", {}).get("phase") in ("Running", "Pending") for p in mine):
            progress = read_progress(part_store(out, part, count)) if out is not None else None
            state = "running" + (f": {describe_progress(progress)}" if progress else "")
        elif index is not None:
            state = "pending"
        elif state == "not done":
            state = "pending" if job is None else "not in the Job"
        states.append({"part": name, "state": state})
    return states


def _pod_cause(pods: list[dict[str, Any]]) -> str | None:
    """Why the latest failed pod of ``pods`` ended: its main container's termination
    (reason, exit code, last line of the message), or the pod's own reason."""
    for pod in reversed(pods):
        status_ = pod.get("status", {})
        if status_.get("phase") != "Failed":
            continue
        for container in diagnose.container_statuses(status_):
            terminated = container.get("state", {}).get("terminated") or {}
            if terminated and terminated.get("exitCode") not in (0, None):
                last = (terminated.get("message") or "").strip().splitlines()[-1:] or [""]
                return _one_line(f"{terminated.get('reason') or 'Error'} (exit "
                                 f"{terminated['exitCode']}) in pod {pod['metadata']['name']}"
                                 + (f": {last[0]}" if last[0] else ""))
        if status_.get("reason"):
            return _one_line(f"{status_['reason']}: {status_.get('message', '')}")
    return None


def _store_state(store: Store | None, stage: str) -> str:
    # An in-cluster MinIO is out of a laptop's reach: the Jobs still tell the story.
    return "unknown" if store is None else _folder_state(store.child(stage))


def _folder_state(folder: Store) -> str:
    try:
        return "done" if folder.exists(MANIFEST) else "not done"
    except TrackbError:
        return "unknown"


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
    NetworkPolicies, the vLLM server); the store is left alone. An in-cluster launcher
    goes first, and its pod is waited for (up to 2 minutes), so that it starts no Job
    after the others were listed. Returns 'Kind/name' of what was deleted. Raises
    ConfigError, UnavailableError."""

    client = api or connect()
    namespace = config.kubernetes.namespace
    deleted = []
    jobs, _ = client.list_jobs(namespace, {"trackb/run-id": run_id})
    # An in-cluster launcher first, and until its pod is gone: between this list and its
    # SIGTERM it could still create the next stage's Job (helm uninstall's pre-delete
    # hook relies on no GPU Job being left).
    launchers = [j for j in jobs
                 if j["metadata"].get("labels", {}).get("trackb/stage") == jobspec.LAUNCHER]
    for job in launchers:
        if client.delete("Job", namespace, job["metadata"]["name"]):
            deleted.append(f"Job/{job['metadata']['name']}")
    if launchers:
        _wait_pods_gone(client, namespace, {"trackb/run-id": run_id,
                                            "trackb/stage": jobspec.LAUNCHER})
        jobs, _ = client.list_jobs(namespace, {"trackb/run-id": run_id})
    for job in jobs:
        if job["metadata"]["name"] in {j["metadata"]["name"] for j in launchers}:
            continue
        if client.delete("Job", namespace, job["metadata"]["name"]):
            deleted.append(f"Job/{job['metadata']['name']}")
    # The other objects have fixed names: build them instead of listing (the Role then
    # needs no list on them).
    for objects in jobspec.build_all(config, run_id).values():
        for obj in objects:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if kind != "Job" and client.delete(kind, namespace, name):
                deleted.append(f"{kind}/{name}")
    if client.delete("Lease", namespace, lease_name(run_id)):
        deleted.append(f"Lease/{lease_name(run_id)}")
    return deleted


def _wait_pods_gone(client: KubeClient, namespace: str, selector: dict[str, str],
                    seconds: float = 120.0) -> None:
    """Block until no pod matches ``selector`` (a deleted Job's pods end after their
    grace period; the launcher's exits at once on SIGTERM). Past ``seconds`` it says so
    and returns: deleting the rest is still worth doing."""
    deadline = time.monotonic() + seconds
    while client.list_pods(namespace, selector):
        if time.monotonic() > deadline:
            say("delete", f"the launcher pod is still there after {seconds:.0f}s; deleting "
                "the run's Jobs anyway (run `trackb delete` again if one appears)")
            return
        time.sleep(0.5)
