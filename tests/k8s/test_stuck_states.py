"""Stuck states that no Job policy ends, each named within its budget (issue 13).

A crash-looping vLLM sidecar, a Job that cannot create its pod, a volume held by a pod
on another node, a driver too old for the image: Kubernetes keeps trying for ever, and
without a diagnosis the run would wait for the stage's deadline, hours. The fake
controller (conftest.py) puts each state in the API emulator: pod and Job statuses,
events, the crashed run's log.

The launcher's clock is a :class:`ManualClock` only the test moves, and every budget is
hours long. A state with a budget is said at once, the launcher keeps looking without
failing, and the stage fails only once the test moves the clock past the budget; a
permanent state fails the run with the clock never moved. No assertion depends on the
machine's speed.
"""

from __future__ import annotations

import json
import threading

import pytest
from k8s_launch import HANG_GUARD, launch_within, wait_until
from test_launcher import BUDGETS, NAMESPACE, pipeline, run_store

from trackb_core.config import build_config
from trackb_core.k8s import diagnose
from trackb_core.k8s.client import RBAC_RULES
from trackb_core.k8s.launcher import StageFailed
from trackb_core.pipeline import PipelineConfig

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

HOURS = 4 * 3600.0
# Every budget hours long: only the test's clock can run one out.
LONG = BUDGETS.model_copy(update={
    "image_pull_seconds": HOURS, "unschedulable_seconds": HOURS, "crashloop_seconds": HOURS,
    "crashloop_restarts": 1000, "pod_creation_seconds": HOURS, "multi_attach_seconds": HOURS})


def gpu_pipeline(corpus, bucket: str, run_id: str) -> PipelineConfig:
    """The GPU profile: generate asks an openai teacher served by a vLLM sidecar in its
    pod, and GPU pods share a cache PVC."""
    return build_config(PipelineConfig, {
        "run_id": run_id, "store": f"s3://{bucket}/trackb", "corpus": str(corpus),
        "model": "tiny", "backend": "k8s", "extract": {"max_functions": 30},
        "generate": {"teacher": "openai"},
        "kubernetes": {"namespace": NAMESPACE, "accelerator": "gpu",
                       "cache": {"pvc": "trackb-cache"}},
    })


class ManualClock:
    """The launcher's clock (seconds); it moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Background:
    """The launcher in a thread (guarded against hangs), so the test can watch it and
    move its clock meanwhile."""

    def __init__(self, config, run_id: str, client, budgets, clock) -> None:
        self.outcome = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       args=(config, run_id, client, budgets, clock))
        self.thread.start()

    def _run(self, config, run_id, client, budgets, clock) -> None:
        try:
            self.outcome, _ = launch_within(HANG_GUARD, config, run_id, client, budgets,
                                            clock=clock)
        except BaseException as exc:  # noqa: B036 - the hang guard's failure, for the test
            self.outcome = exc

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self):
        self.thread.join(HANG_GUARD + 30)
        assert self.done(), "the launcher hung"
        return self.outcome


def count_inspections(client, stage: str) -> dict[str, int]:
    """How often the launcher has listed ``stage``'s pods (once per inspection round)."""
    seen = {"rounds": 0}
    list_pods = client.list_pods

    def counted(namespace, selector):
        if selector.get("trackb/stage") == stage:
            seen["rounds"] += 1
        return list_pods(namespace, selector)

    client.list_pods = counted
    return seen


def one_line_failure(error) -> str:
    assert isinstance(error, StageFailed), error
    message = str(error)
    assert "\n" not in message, "the cause must reach the user as one line"
    return message


def saved_status(bucket: str, run_id: str, stage: str) -> tuple[dict, list[str]]:
    """The stage's status.json and the names of what else was saved beside it."""
    folder = run_store(bucket, run_id).child(f"{stage}/_k8s")
    return json.loads(folder.get_text("status.json")), folder.list()


BUDGETED = [
    # behaviour, stage, GPU profile, said at once, named in the failure
    ("vllm-crashloop-oom", "generate", True, "CrashLoopBackOff: the vLLM server (container "
     "vllm) restarted 2 times (last: Error, exit 1); likely CUDA out of memory: "
     "torch.OutOfMemoryError: CUDA out of memory.", "lower kubernetes.vllm.max_model_len"),
    ("vllm-crashloop-probe", "generate", True, "CrashLoopBackOff: the vLLM server (container "
     "vllm) restarted 1 time (last: Error, exit 137); likely the startup probe failed",
     "raise it if the model download or load is slow"),
    ("no-pods-quota", "extract", False, "FailedCreate (ResourceQuota exceeded): Error "
     "creating: pods", "exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1"),
    ("multi-attach", "train", True, 'Multi-Attach: Multi-Attach error for volume "pvc-3f1c2a" '
     "Volume is already used by pod(s) trackb-other-train-00001",
     "use a ReadWriteMany PVC for kubernetes.cache.pvc, or do not run the stages that "
     "mount it in parallel"),
]


@pytest.mark.parametrize("behaviour, stage, gpu, said, named", BUDGETED,
                         ids=[row[0] for row in BUDGETED])
def test_a_stuck_state_with_a_budget_is_said_at_once_and_fails_once_the_clock_passes_it(
        emulator, controller, bucket, stdlib_corpus, launcher_said, behaviour, stage, gpu,
        said, named):
    run_id = behaviour
    config = (gpu_pipeline if gpu else pipeline)(stdlib_corpus, bucket, run_id)
    clock = ManualClock()
    client = emulator.client()
    inspected = count_inspections(client, stage)

    def heard_it() -> bool:
        return any(said in line for line in list(launcher_said))

    with controller(config, run_id, behaviour={stage: behaviour}, fake=lambda s: True) as ctl:
        launch = Background(config, run_id, client, LONG, clock)
        wait_until(lambda: heard_it() or launch.done(), f"the launcher says {said!r}")
        assert not launch.done(), launch.outcome
        # Hours of budget left on the launcher's clock: it looks again and again, and waits.
        seen = inspected["rounds"]
        wait_until(lambda: inspected["rounds"] >= seen + 3 or launch.done(),
                   "the launcher inspects the stuck stage again")
        assert not launch.done(), f"failed before its budget: {launch.outcome}"
        clock.advance(HOURS)
        message = one_line_failure(launch.result())
    assert not ctl.errors, ctl.errors[0]
    assert message.startswith(f"{stage}: "), message
    assert " cannot start: " in message and said in message and named in message
    assert message.endswith(f"(for over {HOURS:.0f}s)"), message
    status, files = saved_status(bucket, run_id, stage)
    assert status["cause"] and status["cause"] in message
    if behaviour != "vllm-crashloop-oom":  # named by events: the probe, quota, the volume
        assert status["events"], "the events that named the state are saved with it"
    if behaviour.startswith("vllm-"):
        # The crashed run's own log, not only the one after the restart.
        previous = [f for f in files if f.endswith(".vllm.previous.log")]
        assert previous, files
        log = run_store(bucket, run_id).child(f"{stage}/_k8s").get_text(previous[0])
        assert log == emulator.previous_logs[previous[0].split(".")[0], "vllm"]
        restarts = status["pods"][0]["restarts"]["vllm"]
        assert restarts["lastState"]["terminated"]["reason"] == "Error"
    # What the diagnosis read over HTTP (events, previous logs) the Role grants.
    calls = emulator.calls()
    read = {("", "events", "list")} | ({("", "pods/log", "get")} if behaviour.startswith(
        "vllm-") else set())
    assert read <= calls
    for group, resource, verb in read:
        assert verb in RBAC_RULES[group, resource], (group, resource, verb)


PERMANENT = [
    # behaviour, stage, GPU profile, named in the failure
    ("vllm-crashloop-gpu", "generate", True, "CrashLoopBackOff: the vLLM server (container "
     "vllm) restarted 1 time (last: Error, exit 1); likely unsupported GPU: ValueError: "
     "Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your "
     "Tesla T4 GPU has compute capability 7.5.; for vLLM on a GPU older than compute "
     "capability 8.0 (T4) set kubernetes.vllm.dtype=half"),
    ("no-pods-priorityclass", "extract", False, "FailedCreate (missing PriorityClass): Error "
     "creating: pods \"trackb-no-pods-priorityclass-extract-00001\" is forbidden: no "
     "PriorityClass with name trackb-gpu was found; create it or set "
     "kubernetes.scheduling.priority_class_name to an existing one"),
    ("no-pods-webhook", "extract", False, "FailedCreate (rejected by admission): Error "
     'creating: admission webhook "validate.kyverno.svc-fail" denied the request'),
    ("driver-too-old", "train", True, "container stage: CUDA driver too old: the node's "
     "NVIDIA driver is too old for the image (it needs CUDA >= 12.4): nvidia-container-cli: "
     "requirement error: unsatisfied condition: cuda>=12.4, please update your driver"),
    ("driver-too-old-log", "train", True, "container stage: CUDA driver too old: the node's "
     "NVIDIA driver is too old for the image: RuntimeError: CUDA error: CUDA driver version "
     "is insufficient for CUDA runtime version"),
]


@pytest.mark.parametrize("behaviour, stage, gpu, named", PERMANENT,
                         ids=[row[0] for row in PERMANENT])
def test_a_permanent_stuck_state_fails_at_once_with_hours_of_budget_left(
        emulator, controller, bucket, stdlib_corpus, behaviour, stage, gpu, named):
    run_id = behaviour
    config = (gpu_pipeline if gpu else pipeline)(stdlib_corpus, bucket, run_id)
    with controller(config, run_id, behaviour={stage: behaviour}, fake=lambda s: True) as ctl:
        # The clock never moves: no budget can run out, so a failure is the diagnosis's.
        error, _ = launch_within(HANG_GUARD, config, run_id, emulator.client(), LONG,
                                 clock=ManualClock())
    assert not ctl.errors, ctl.errors[0]
    message = one_line_failure(error)
    where = "Job" if behaviour.startswith("no-pods") else "pod"
    assert message.startswith(f"{stage}: {where} trackb-{run_id}-{stage}"), message
    assert f" cannot start: {named}" in message, message
    assert "for over" not in message
    status, files = saved_status(bucket, run_id, stage)
    assert status["cause"] in message
    if where == "Job":
        assert status["pods"] == []
        assert [e["reason"] for e in status["events"]] == ["FailedCreate"]
    else:
        # The container that could not run: its state as the kubelet gave it.
        assert status["pods"][0]["containers"], status
    if behaviour.startswith("vllm-"):
        assert any(f.endswith(".vllm.previous.log") for f in files), files


def test_a_sidecar_past_its_restart_budget_fails_without_waiting_for_the_clock(
        emulator, controller, bucket, stdlib_corpus):
    run_id = "restarts"
    config = gpu_pipeline(stdlib_corpus, bucket, run_id)
    budgets = LONG.model_copy(update={"crashloop_restarts": 2})  # the fake restarted twice
    with controller(config, run_id, behaviour={"generate": "vllm-crashloop-oom"},
                    fake=lambda s: True) as ctl:
        error, _ = launch_within(HANG_GUARD, config, run_id, emulator.client(), budgets,
                                 clock=ManualClock())
    assert not ctl.errors, ctl.errors[0]
    message = one_line_failure(error)
    assert "CrashLoopBackOff: the vLLM server (container vllm) restarted 2 times" in message
    assert "likely CUDA out of memory" in message and "for over" not in message


# -- the vLLM Deployment's pods, and the rules on their own --------------------------------
CRASHING_SERVER_POD = {
    "metadata": {"name": "trackb-d-vllm-5d9c-x2x7q"},
    "spec": {"containers": [{"name": "vllm"}]},  # a Deployment's pod: restartPolicy Always
    "status": {"phase": "Running", "containerStatuses": [{
        "name": "vllm", "ready": False, "restartCount": 4,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}


def test_the_vllm_deployment_names_its_crash_loop_like_the_sidecar():
    from trackb_core.k8s.launcher import _Run, _vllm_pod_state

    class Stub:
        def list_pods(self, namespace, selector):
            return [CRASHING_SERVER_POD] if selector.get("trackb/stage") == "vllm" else []

        def pod_events(self, namespace, pod):
            return []

        def previous_log(self, namespace, pod, container, tail_lines=None):
            return "INFO loading\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n"

    run = _Run(config=None, run_id="d", client=Stub(), budgets=LONG, store=None,
               namespace="ns")
    state = _vllm_pod_state(run)
    assert state.startswith("pod trackb-d-vllm-5d9c-x2x7q CrashLoopBackOff: the vLLM server "
                            "(container vllm) restarted 4 times (last: Error, exit 1); likely "
                            "CUDA out of memory: torch.OutOfMemoryError"), state


def _failed_create(message: str, uid: str = "u-2") -> dict:
    return {"reason": "FailedCreate", "message": message, "lastTimestamp": "2025-05-02T10:00Z",
            "involvedObject": {"kind": "Job", "name": "trackb-r-extract", "uid": uid}}


def test_failed_creates_of_an_earlier_attempts_job_of_the_same_name_are_not_this_jobs():
    old = _failed_create("Error creating: pods \"x\" is forbidden: no PriorityClass with "
                         "name gone was found", uid="u-1")
    assert diagnose.job_without_pods("trackb-r-extract", "u-2", [old], LONG) == []


def test_a_webhook_that_cannot_be_reached_waits_its_budget_instead_of_failing_at_once():
    unreachable = _failed_create('Internal error occurred: failed calling webhook '
                                 '"validate.kyverno.svc": context deadline exceeded')
    (finding,) = diagnose.job_without_pods("trackb-r-extract", "u-2", [unreachable], LONG)
    assert finding.budget == LONG.pod_creation_seconds
    assert finding.cause.startswith("FailedCreate: Internal error occurred")


def test_a_sidecar_that_restarted_once_and_is_ready_again_is_not_crash_looping():
    pod = {"metadata": {"name": "p"},
           "spec": {"restartPolicy": "Never", "initContainers": [
               {"name": "vllm", "restartPolicy": "Always"}], "containers": [{"name": "stage"}]},
           "status": {"phase": "Running", "initContainerStatuses": [{
               "name": "vllm", "ready": True, "restartCount": 1,
               "state": {"running": {}},
               "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}
    assert diagnose.crashed(pod) == ["vllm"]  # its previous log is still worth keeping
    assert diagnose.pod_findings(pod, LONG, [], {"vllm": "CUDA out of memory"}) == []


def test_a_stage_container_is_never_taken_for_a_crash_loop():
    # restartPolicy Never: the Job's own backoffLimit and podFailurePolicy count its exits.
    pod = {"metadata": {"name": "p"}, "spec": {"restartPolicy": "Never",
                                               "containers": [{"name": "stage"}]},
           "status": {"phase": "Running", "containerStatuses": [{
               "name": "stage", "ready": False, "restartCount": 1, "state": {"running": {}},
               "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}
    assert diagnose.crashed(pod) == [] and diagnose.pod_findings(pod, LONG) == []


def test_a_multi_attach_event_of_a_pod_that_started_since_is_old_news():
    pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "stage"}]},
           "status": {"phase": "Pending", "containerStatuses": [
               {"name": "stage", "state": {"running": {}}}]}}
    event = {"reason": "FailedAttachVolume", "message": 'Multi-Attach error for volume "v"'}
    assert not diagnose.wants_events(pod)
    assert diagnose.pod_findings(pod, LONG, [event]) == []
