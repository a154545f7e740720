"""A good citizen of a shared GPU cluster (issue 14): Kueue, JobSet, per-step metadata.

With ``kubernetes.kueue.enabled`` every stage Job carries Kueue's queue label and is
created suspended; Kueue admits it (unsuspends it) when its ClusterQueue has quota. The
launcher takes a suspended Job as waiting, and reads the Workload Kueue made for it: one
that stays inadmissible fails the stage after ``admission_seconds``, naming the Workload
and Kueue's reason; a queue that does not exist fails it at once. A multi-node training
renders as a JobSet (``distributed.gang: jobset``), which the launcher creates, watches by
its status conditions and deletes.

The emulator has no Kueue and no JobSet controller: :class:`FakeKueue` and
:class:`FakeJobSetController` play them (Workloads with Kueue's own condition messages;
a JobSet that runs its stage and says Completed). Budgets run on a clock only the test
moves (tests/k8s/test_stuck_states.py's pattern).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from k8s_launch import HANG_GUARD, BackgroundLoop, launch_within, wait_until
from test_launcher import BUDGETS, NAMESPACE, pipeline, run_store
from test_stuck_states import HOURS, LONG, Background, ManualClock, gpu_pipeline

from trackb_core.config import build_config
from trackb_core.errors import ConfigError
from trackb_core.k8s import diagnose, jobspec
from trackb_core.k8s.client import OUTSIDE_ROLE, RBAC_RULES
from trackb_core.k8s.jobspec import KUEUE_QUEUE_LABEL, NO_DISRUPTION
from trackb_core.k8s.launcher import StageFailed
from trackb_core.k8s.settings import KubernetesConfig
from trackb_core.pipeline import PipelineConfig

QUEUE = "team-gpu"
# Kueue's own words (QuotaReserved False), as `kubectl describe workload` shows them.
NO_QUOTA = ("couldn't assign flavors to pod set main: insufficient unused quota for "
            "nvidia.com/gpu in flavor t4, 1 more needed")
NO_CLUSTER_QUEUE = "ClusterQueue cluster-gpu doesn't exist"
# Every budget hours long, admission's too: only the test's clock can run one out.
PATIENT = LONG.model_copy(update={"admission_seconds": HOURS})


def queued(config: PipelineConfig, **kueue: Any) -> PipelineConfig:
    """``config`` with Kueue enabled on LocalQueue QUEUE (and ``kueue`` settings)."""
    data = config.model_dump(mode="json")
    data["kubernetes"]["kueue"] = {"enabled": True, "queue_name": QUEUE, **kueue}
    return build_config(PipelineConfig, data)


def rendered(config: PipelineConfig, run_id: str = "r1") -> dict[str, list[dict]]:
    return jobspec.build_all(config, run_id)


def cluster_config(**kubernetes: Any) -> PipelineConfig:
    """A GPU pipeline (hub model, cache PVC) with these kubernetes settings."""
    return build_config(PipelineConfig, {
        "store": "s3://bucket/trackb", "corpus": "/corpus", "model": "Qwen/Qwen2.5-Coder-1.5B",
        "kubernetes": {"cache": {"pvc": "trackb-cache"}, **kubernetes}})


# -- rendered objects ---------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: pipeline("/corpus", "bucket", "r1"), lambda: cluster_config()],
    ids=["cpu-demo", "gpu-cluster"])
def test_with_kueue_every_stage_job_carries_the_queue_label_and_starts_suspended(make):
    config = queued(make(), priority_class="batch-low")
    files = rendered(config)
    stages = [name for name in files if name != jobspec.LAUNCHER]
    assert set(stages) >= set(jobspec.stage_names(config))
    for stage in stages:
        for job in (o for o in files[stage] if o["kind"] == "Job"):
            assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == QUEUE
            assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch-low"
            assert job["spec"]["suspend"] is True
            # Kueue reads the Job's label, never the pods'.
            assert KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    # The launcher holds no GPU and must run to submit the stages: never queued.
    launcher = jobspec.runner(files[jobspec.LAUNCHER])
    assert KUEUE_QUEUE_LABEL not in launcher["metadata"]["labels"]
    assert "suspend" not in launcher["spec"]


def test_without_kueue_no_job_is_labelled_for_a_queue_or_suspended():
    for objects in rendered(cluster_config()).values():
        for obj in objects:
            assert KUEUE_QUEUE_LABEL not in obj["metadata"]["labels"]
            assert "suspend" not in obj.get("spec", {})


def test_a_multi_node_training_renders_as_one_jobset_that_kueue_queues_whole():
    import kubernetes_validate

    config = cluster_config(distributed={"nodes": 3, "gang": "jobset"},
                            kueue={"enabled": True, "queue_name": QUEUE})
    objects = jobspec.build_stage("train", config, "r1")
    assert [o["kind"] for o in objects] == ["ConfigMap", "NetworkPolicy", "JobSet"], \
        "the JobSet makes the rendezvous Service itself"
    jobset = jobspec.runner(objects)
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    name = jobset["metadata"]["name"]
    spec = jobset["spec"]
    assert jobset["metadata"]["labels"][KUEUE_QUEUE_LABEL] == QUEUE and spec["suspend"] is True
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    assert spec["failurePolicy"]["maxRestarts"] == config.kubernetes.job.backoff_limit
    assert spec["failurePolicy"]["rules"][0]["action"] == "FailJobSet"
    (replicated,) = spec["replicatedJobs"]
    child = replicated["template"]["spec"]
    assert (child["parallelism"], child["completions"], child["completionMode"]) == (
        3, 3, "Indexed")
    assert child["backoffLimit"] == 0, "a failed node restarts the gang, not itself"
    assert "suspend" not in child and KUEUE_QUEUE_LABEL not in replicated["template"][
        "metadata"]["labels"], "Kueue queues the JobSet, not its Jobs"
    pod = child["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert f"--master-addr={name}-node-0-0.{name}" in args and "--nnodes=3" in args
    assert "subdomain" not in pod, "the JobSet sets the subdomain of its Service"
    assert len(f"{name}-node-0-0") <= 63
    # Ranks reach each other: the NetworkPolicy admits the stage's own pods.
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {
        "matchLabels": jobspec.selector("r1", "train")}}]}]
    # No JobSet schema ships with Kubernetes; the Job inside it is validated as one.
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": f"{name}-node-0", "namespace": "trackb"}, "spec": child}
    for version in ("1.30.0", "1.35.0"):
        kubernetes_validate.validate(job, version, strict=True)


def test_kueue_gang_keeps_the_indexed_job_and_its_service_under_one_workload():
    config = cluster_config(distributed={"nodes": 2, "gang": "kueue"},
                            kueue={"enabled": True, "queue_name": QUEUE})
    objects = jobspec.build_stage("train", config, "r1")
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    job = jobspec.runner(objects)
    # Kueue admits a Job's pods (parallelism 2) as one Workload: all or nothing.
    assert job["spec"]["parallelism"] == 2 and job["spec"]["suspend"] is True


def test_the_kueue_gang_without_kueue_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="kueue.enabled"):
        KubernetesConfig.model_validate({"distributed": {"nodes": 2, "gang": "kueue"}})


def test_per_step_labels_annotations_and_tolerations_reach_the_job_and_its_pods():
    spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"}
    config = cluster_config(pod_metadata={
        "all": {"labels": {"team": "ml", "trackb/stage": "not-this"},
                "annotations": {"owner": "ml-platform"}},
        "steps": {"train": {"labels": {"team": "ml-train"}, "tolerations": [spot]}}})
    files = rendered(config)
    train, extract = jobspec.runner(files["train"]), jobspec.runner(files["extract"])
    for stage, job in (("train", train), ("extract", extract)):
        for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
            # trackb's own labels win: its selectors must keep picking its pods.
            assert meta["labels"]["trackb/stage"] == stage
            assert meta["annotations"]["owner"] == "ml-platform"
    assert train["metadata"]["labels"]["team"] == "ml-train"
    assert extract["metadata"]["labels"]["team"] == "ml"
    assert spot in train["spec"]["template"]["spec"]["tolerations"]
    gpu_taint = config.kubernetes.scheduling.tolerations[0]
    assert gpu_taint in train["spec"]["template"]["spec"]["tolerations"], "added, not replaced"
    assert spot not in extract["spec"]["template"]["spec"].get("tolerations", [])
    launcher = jobspec.runner(files[jobspec.LAUNCHER])
    assert "team" not in launcher["metadata"]["labels"]


def test_training_pods_ask_autoscalers_and_karpenter_not_to_move_them():
    files = rendered(cluster_config())
    for stage in ("train", "predict-baseline", "predict-post"):
        pod_meta = jobspec.runner(files[stage])["spec"]["template"]["metadata"]
        assert pod_meta["annotations"] == NO_DISRUPTION
    for stage in ("extract", "eval-post", "compare"):
        pod_meta = jobspec.runner(files[stage])["spec"]["template"]["metadata"]
        assert not set(NO_DISRUPTION) & set(pod_meta.get("annotations", {}))
    none = rendered(cluster_config(pod_metadata={"no_disruption": []}))
    assert "annotations" not in jobspec.runner(none["train"])["spec"]["template"]["metadata"]


def test_an_unknown_step_in_pod_metadata_is_refused_naming_it():
    with pytest.raises(ValueError, match="trian"):
        KubernetesConfig.model_validate({"pod_metadata": {"steps": {"trian": {}}}})


# -- diagnosis of a Workload (pure) ---------------------------------------------------------
def workload(name: str, *conditions: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": list(conditions)}}


def test_a_workload_waiting_for_quota_may_wait_its_budget():
    (found,) = diagnose.queued_job("Job j", [workload("job-j-1a2b3", {
        "type": "QuotaReserved", "status": "False", "reason": "Pending",
        "message": NO_QUOTA})], LONG)
    assert found.where == "Workload job-j-1a2b3" and found.budget == LONG.admission_seconds
    assert found.cause == f"not admitted by Kueue (QuotaReserved Pending): {NO_QUOTA}"


def test_an_admitted_workload_is_no_finding_and_no_kueue_at_all_fails_at_once():
    admitted = workload("w", {"type": "Admitted", "status": "True"},
                        {"type": "QuotaReserved", "status": "True"})
    assert diagnose.queued_job("Job j", [admitted], LONG) == []
    (none,) = diagnose.queued_job("Job j", None, LONG)
    assert none.budget is diagnose.NOW and "install Kueue" in none.cause
    (missing,) = diagnose.queued_job("Job j", [], LONG)
    assert missing.budget == LONG.admission_seconds


# -- the launcher against the emulator ----------------------------------------------------
def put(emulator, group: str, version: str, plural: str, obj: dict[str, Any]) -> None:
    """Store a custom object as if its controller had written it."""
    import kmock

    meta = obj["metadata"]
    emulator.handler.objects[kmock.resource(group, version, plural), meta.get("namespace"),
                             meta["name"]] = obj


def local_queue(emulator, name: str = QUEUE) -> None:
    put(emulator, "kueue.x-k8s.io", "v1beta1", "localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"clusterQueue": "cluster-gpu"}})


class FakeKueue(BackgroundLoop):
    """Plays Kueue: a Workload per queued Job (owned by it), pending with ``message``
    until the Job's stage is in ``admit``; then Admitted and the Job unsuspended."""

    def __init__(self, emulator, controller, message: str = NO_QUOTA,
                 reason: str = "Pending") -> None:
        self.emulator, self.controller = emulator, controller
        self.message, self.reason = message, reason
        self.admit: set[str] = set()
        self.workloads: dict[str, str] = {}  # Job name -> its Workload's name
        super().__init__("fake-kueue")

    def step(self) -> None:
        jobs, _ = self.controller.kube.list_jobs(NAMESPACE, {})
        for job in jobs:
            meta, spec = job["metadata"], job.get("spec", {})
            if KUEUE_QUEUE_LABEL not in meta.get("labels", {}) or not spec.get("suspend"):
                continue
            name = self.workloads.setdefault(meta["name"],
                                             f"job-{meta['name']}-{uuid.uuid4().hex[:5]}")
            admitted = meta["labels"]["trackb/stage"] in self.admit
            condition = ({"type": "Admitted", "status": "True", "reason": "Admitted"}
                         if admitted else {"type": "QuotaReserved", "status": "False",
                                           "reason": self.reason, "message": self.message})
            put(self.emulator, "kueue.x-k8s.io", "v1beta1", "workloads", {
                "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                "metadata": {"name": name, "namespace": NAMESPACE,
                             "labels": {"kueue.x-k8s.io/job-uid": meta.get("uid", "")},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                  "name": meta["name"],
                                                  "uid": meta.get("uid", ""),
                                                  "controller": True}]},
                "spec": {"queueName": meta["labels"][KUEUE_QUEUE_LABEL]},
                "status": {"conditions": [condition]}})
            if admitted:
                self.controller.batch.patch_namespaced_job(
                    meta["name"], NAMESPACE, {"spec": {"suspend": False}},
                    _preload_content=False)


def heard(said: list[str], text: str) -> bool:
    return any(text in line for line in list(said))


def test_a_suspended_job_waits_for_admission_then_runs_to_the_end(
        emulator, controller, bucket, stdlib_corpus, launcher_said):
    run_id = "kueue-admit"
    config = queued(pipeline(stdlib_corpus, bucket, run_id))
    local_queue(emulator)
    with controller(config, run_id, fake=lambda s: True) as ctl, \
            FakeKueue(emulator, ctl) as kueue:
        launch = Background(config, run_id, emulator.client(), PATIENT, ManualClock())
        wait_until(lambda: heard(launcher_said, NO_QUOTA) or launch.done(),
                   "the launcher says why extract waits")
        assert not launch.done(), launch.outcome
        assert ctl.started == [], "no pod before Kueue admits the Job"
        kueue.admit.update(jobspec.stage_names(config))
        outcome = launch.result()
    assert not ctl.errors and not kueue.errors, (ctl.errors + kueue.errors)[0]
    assert isinstance(outcome, str) and outcome.endswith("report.md"), outcome
    assert set(kueue.workloads) == {f"trackb-{run_id}-{s}" for s in jobspec.stage_names(config)}
    assert heard(launcher_said, f"queued in Kueue's LocalQueue {QUEUE}")
    # extract and tiny-model are queued at once: whichever Workload the launcher reads
    # first is the one it names
    assert [line for line in launcher_said if "Workload job-trackb-kueue-admit-" in line
            and f"not admitted by Kueue (QuotaReserved Pending): {NO_QUOTA}" in line]
    calls = emulator.calls()
    assert ("kueue.x-k8s.io", "workloads", "list") in calls
    granted = {**RBAC_RULES, **OUTSIDE_ROLE}
    for group, resource, verb in calls:
        assert verb in granted.get((group, resource), ()), (group, resource, verb)


def test_a_workload_that_stays_inadmissible_fails_by_name_after_its_budget(
        emulator, controller, bucket, stdlib_corpus, launcher_said):
    run_id = "kueue-noquota"
    config = queued(pipeline(stdlib_corpus, bucket, run_id))
    local_queue(emulator)
    clock = ManualClock()
    with controller(config, run_id, fake=lambda s: True) as ctl, \
            FakeKueue(emulator, ctl) as kueue:
        launch = Background(config, run_id, emulator.client(), PATIENT, clock)
        wait_until(lambda: heard(launcher_said, NO_QUOTA) or launch.done(),
                   "the launcher says why extract waits")
        assert not launch.done(), f"failed before its budget: {launch.outcome}"
        clock.advance(HOURS)
        error = launch.result()
    assert not kueue.errors, kueue.errors[0]
    assert isinstance(error, StageFailed), error
    message = str(error)
    workload_name = kueue.workloads[f"trackb-{run_id}-extract"]
    assert message == (f"extract: Workload {workload_name} cannot start: not admitted by "
                       f"Kueue (QuotaReserved Pending): {NO_QUOTA} "
                       f"(for over {HOURS:.0f}s)")
    assert "\n" not in message
    # The stuck Job is deleted: it would take the quota the moment some frees up.
    assert emulator.client().get("Job", NAMESPACE, f"trackb-{run_id}-extract") is None


def test_a_queue_that_does_not_exist_fails_at_once_with_hours_of_budget_left(
        emulator, controller, bucket, stdlib_corpus):
    run_id = "kueue-noqueue"
    config = queued(pipeline(stdlib_corpus, bucket, run_id))
    local_queue(emulator)  # the LocalQueue is there; the ClusterQueue behind it is not
    with controller(config, run_id, fake=lambda s: True) as ctl, \
            FakeKueue(emulator, ctl, NO_CLUSTER_QUEUE, "Inadmissible") as kueue:
        error, _ = launch_within(HANG_GUARD, config, run_id, emulator.client(), PATIENT,
                                 clock=ManualClock())
    assert not kueue.errors, kueue.errors[0]
    assert isinstance(error, StageFailed), error
    assert str(error).startswith("extract: Workload job-trackb-kueue-noqueue-extract-")
    assert str(error).endswith(f"cannot start: Inadmissible: {NO_CLUSTER_QUEUE}; create the "
                               "queue or set kubernetes.kueue.queue_name to an existing "
                               "LocalQueue")


def test_preflight_refuses_a_missing_local_queue_before_creating_anything(
        emulator, controller, bucket, stdlib_corpus):
    run_id = "kueue-nolocal"
    config = queued(pipeline(stdlib_corpus, bucket, run_id))
    with controller(config, run_id, fake=lambda s: True):
        error, _ = launch_within(HANG_GUARD, config, run_id, emulator.client(), BUDGETS)
    assert isinstance(error, ConfigError), error
    assert f"LocalQueue {QUEUE} (kubernetes.kueue.queue_name) does not exist" in str(error)
    jobs, _ = emulator.client().list_jobs(NAMESPACE, {"trackb/run-id": run_id})
    assert jobs == []


class FakeJobSetController(BackgroundLoop):
    """Plays the JobSet controller for the run's JobSets: runs the stage as its pods
    would (FakeJobController._run_stage), then sets the JobSet's Completed condition."""

    def __init__(self, emulator, controller, run_id: str) -> None:
        self.emulator, self.controller, self.run_id = emulator, controller, run_id
        self.seen: list[dict[str, Any]] = []
        self._done: set[str] = set()
        self._lock = threading.Lock()
        super().__init__("fake-jobset")

    def step(self) -> None:
        from kubernetes import client as k8s

        api = k8s.CustomObjectsApi(self.controller.batch.api_client)
        data = api.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", NAMESPACE,
                                                 "jobsets")
        for jobset in data.get("items", []):
            name = jobset["metadata"]["name"]
            if name in self._done or jobset.get("spec", {}).get("suspend"):
                continue
            self._done.add(name)
            self.seen.append(jobset)
            child = jobset["spec"]["replicatedJobs"][0]["template"]
            stage = jobset["metadata"]["labels"]["trackb/stage"]
            self.controller._run_stage(stage, child)
            put(self.emulator, "jobset.x-k8s.io", "v1alpha2", "jobsets", {
                **jobset, "status": {"conditions": [
                    {"type": "Completed", "status": "True", "reason": "AllJobsCompleted",
                     "message": "jobset completed successfully"}]}})


def test_the_launcher_creates_a_multi_node_jobset_and_finishes_when_it_completes(
        emulator, controller, bucket, stdlib_corpus):
    run_id = "jobset-train"
    base = gpu_pipeline(stdlib_corpus, bucket, run_id).model_dump(mode="json")
    base["kubernetes"]["distributed"] = {"nodes": 2, "gang": "jobset"}
    config = build_config(PipelineConfig, base)
    with controller(config, run_id, fake=lambda s: True) as ctl, \
            FakeJobSetController(emulator, ctl, run_id) as jobsets:
        outcome, _ = launch_within(HANG_GUARD, config, run_id, emulator.client(), BUDGETS)
    assert not ctl.errors and not jobsets.errors, (ctl.errors + jobsets.errors)[0]
    assert isinstance(outcome, str) and outcome.endswith("report.md"), outcome
    assert [j["metadata"]["name"] for j in jobsets.seen] == [f"trackb-{run_id}-train"]
    assert "train" not in ctl.started, "train ran as the JobSet, not as a Job"
    assert run_store(bucket, run_id).child("train").exists("manifest.json")
    assert ("jobset.x-k8s.io", "jobsets", "create") in emulator.calls()



def test_preflight_reports_the_local_queue_check_as_skipped_when_it_may_not_read_it(
        emulator, bucket, stdlib_corpus):
    from trackb_core.k8s.preflight import preflight

    config = queued(pipeline(stdlib_corpus, bucket, "kueue-403"))
    emulator.provide(config)
    emulator.forbidden.add("localqueues")
    findings = [str(f) for f in preflight(config, "kueue-403", emulator.client())]
    assert f"skipped: cannot check LocalQueue {QUEUE} (forbidden)" in findings
    assert not [f for f in findings if f.startswith("error")], findings
