"""``kubernetes.vllm.serve: deployment`` end to end against the API emulator.

In this mode the launcher creates the teacher server (a Deployment, its Service and
NetworkPolicy) before generate, waits until the Deployment is ready, runs generate
against it and always deletes the server again: on success (as soon as generate ends,
since the server holds a GPU that train and eval need), when generate fails, and when
the server never becomes ready. The fake Job controller (conftest.py) plays the Job
controller; :class:`FakeDeploymentController` below plays the Deployment controller by
marking the server ready (``status.readyReplicas``). Every stage's result is faked:
there is no vLLM here. Every launch runs in a thread guarded against hangs; no assertion
depends on the machine's speed.
"""

from __future__ import annotations

from typing import Any

import pytest
from k8s_launch import HANG_GUARD, BackgroundLoop, launch_within

from trackb_core.config import build_config
from trackb_core.k8s import jobspec
from trackb_core.k8s.launcher import Interrupted, LauncherConfig, StageFailed
from trackb_core.pipeline import PipelineConfig

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

NAMESPACE = "trackb-test"
BUDGETS = LauncherConfig(poll_seconds=0.2, image_pull_seconds=1.5, unschedulable_seconds=1.5,
                         replace_seconds=10)
SERVER_KINDS = ("Deployment", "Service", "NetworkPolicy")
CONTROLLER_AGENT = "trackb-fake-controller"  # as in conftest.py: left out of calls()


def vllm_pipeline(corpus, bucket: str, run_id: str, startup_seconds: int | None = None
                  ) -> PipelineConfig:
    """The GPU profile with an openai teacher served by a Deployment."""
    config = build_config(PipelineConfig, {
        "run_id": run_id, "store": f"s3://{bucket}/trackb", "corpus": str(corpus),
        "model": "tiny", "backend": "k8s", "generate": {"teacher": "openai"},
        "kubernetes": {"namespace": NAMESPACE, "accelerator": "gpu",
                       "vllm": {"serve": "deployment"}},
    })
    if startup_seconds is not None:
        # Below the schema's minimum (60 s) on purpose: a test cannot wait a minute.
        k8s = config.kubernetes
        vllm = k8s.vllm.model_copy(update={"startup_seconds": startup_seconds})
        config = config.model_copy(update={"kubernetes": k8s.model_copy(update={"vllm": vllm})})
    return config


def server_objects(config, run_id: str) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"])
            for o in jobspec.build_vllm_service(config, run_id)]


def remaining(client, config, run_id: str) -> list[str]:
    """'Kind/name' of the vLLM server's objects still in the emulator."""
    return [f"{kind}/{name}" for kind, name in server_objects(config, run_id)
            if client.get(kind, NAMESPACE, name) is not None]


def launch(config, run_id, client, budgets=BUDGETS, **kwargs):
    """``(report URI or exception, seconds)``, guarded against hangs."""
    return launch_within(HANG_GUARD, config, run_id, client, budgets, **kwargs)


class FakeDeploymentController(BackgroundLoop):
    """Marks the run's vLLM Deployment ready (readyReplicas 1) once it exists, unless
    ``ready`` is False (a server that never starts)."""

    def __init__(self, emulator, config, run_id: str, ready: bool = True):
        from kubernetes import client as k8s

        api = k8s.ApiClient(k8s.Configuration(host=emulator.url))
        api.user_agent = CONTROLLER_AGENT  # so that Emulator.calls() leaves it out
        self.apps = k8s.AppsV1Api(api)
        self.kube = emulator.client()
        self.kube.api_client.user_agent = CONTROLLER_AGENT
        self.name = jobspec.object_name(run_id, "vllm")
        self.ready = ready
        self.readied = 0  # how many times a new Deployment was marked ready
        super().__init__("fake-deployments")

    def step(self) -> None:
        deployment = self.kube.get("Deployment", NAMESPACE, self.name)
        status = (deployment or {}).get("status") or {}
        if deployment is not None and self.ready and not status.get("readyReplicas"):
            self.apps.patch_namespaced_deployment(
                self.name, NAMESPACE,
                {"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}},
                _preload_content=False)
            self.readied += 1


class Recorder:
    """Wraps the launcher's client: what it created, in order, and what the vLLM server
    looked like at the moment each Job was created."""

    def __init__(self, client, config, run_id: str):
        self.client = client
        self.name = jobspec.object_name(run_id, "vllm")
        self.created: list[tuple[str, str]] = []  # (kind, stage label)
        self.server_at_job: dict[str, dict | None] = {}  # stage -> Deployment then
        create = client.create

        def recording_create(obj: dict[str, Any]) -> dict[str, Any]:
            stage = obj["metadata"].get("labels", {}).get("trackb/stage", "?")
            if obj["kind"] == "Job":
                self.server_at_job[stage] = client.get("Deployment", NAMESPACE, self.name)
            self.created.append((obj["kind"], stage))
            return create(obj)

        client.create = recording_create

    def index(self, kind: str, stage: str) -> int:
        return self.created.index((kind, stage))


def _run(emulator, controller, bucket, corpus, run_id, *, behaviour=None, ready=True,
         startup_seconds=None, budgets=BUDGETS, client=None, **kwargs):
    config = vllm_pipeline(corpus, bucket, run_id, startup_seconds)
    client = client or emulator.client()
    recorder = Recorder(client, config, run_id)
    with controller(config, run_id, behaviour=behaviour, fake=lambda stage: True) as ctl, \
            FakeDeploymentController(emulator, config, run_id, ready=ready) as server:
        outcome, seconds = launch(config, run_id, client, budgets, **kwargs)
    assert not ctl.errors, ctl.errors[0]
    assert not server.errors, server.errors[0]
    return config, ctl, server, recorder, outcome, seconds


def test_server_is_created_waited_for_used_and_deleted_after_generate(
        emulator, controller, bucket, stdlib_corpus, capsys):
    config, ctl, server, rec, report, _ = _run(emulator, controller, bucket, stdlib_corpus,
                                               "vdep")
    assert isinstance(report, str), report
    assert report.endswith("compare/report.md")
    assert server.readied == 1
    # Deployment, Service and NetworkPolicy first, then generate's own objects.
    server_kinds = [kind for kind, stage in rec.created if stage == "vllm"]
    assert server_kinds == list(SERVER_KINDS)
    assert max(rec.index(kind, "vllm") for kind in SERVER_KINDS) \
        < rec.index("ConfigMap", "generate") < rec.index("Job", "generate")
    # generate's Job was created only once the server was ready...
    at_generate = rec.server_at_job["generate"]
    assert at_generate is not None and at_generate["status"]["readyReplicas"] == 1
    # ...and points at the Service.
    job = next(o for o in jobspec.build_stage("generate", config, "vdep") if o["kind"] == "Job")
    wait_env = {e["name"]: e.get("value")
                for c in job["spec"]["template"]["spec"]["initContainers"]
                for e in c.get("env", [])}
    url = f"http://trackb-vdep-vllm.{NAMESPACE}.svc:8000/v1"
    assert wait_env["TEACHER_MODELS_URL"] == f"{url}/models"
    assert jobspec.stage_configs(config, "vdep")["generate"].base_url == url
    # The server holds a GPU: it is gone before the GPU stages start, not at the run's end.
    assert rec.server_at_job["train"] is None
    assert rec.server_at_job["predict-baseline"] is None
    assert remaining(emulator.client(), config, "vdep") == []
    assert "waiting up to 1800s for the vLLM Deployment trackb-vdep-vllm" \
        in capsys.readouterr().err
    # What the launcher called for the server is granted by the Role.
    from trackb_core.k8s.client import OUTSIDE_ROLE, RBAC_RULES

    calls = emulator.calls()
    assert {("apps", "deployments", "create"), ("apps", "deployments", "get"),
            ("apps", "deployments", "delete"), ("", "services", "delete")} <= calls
    for group, resource, verb in calls:
        assert verb in {**RBAC_RULES, **OUTSIDE_ROLE}.get((group, resource), ()), \
            (group, resource, verb)


def test_failed_generate_still_deletes_the_server(emulator, controller, bucket,
                                                  stdlib_corpus):
    config, ctl, _, rec, error, _ = _run(emulator, controller, bucket, stdlib_corpus,
                                         "vfail", behaviour={"generate": "fail"})
    assert isinstance(error, StageFailed), error
    message = str(error)
    assert "\n" not in message, "the cause must reach the user as one line"
    assert message.startswith("generate: Error (exit 65) in container stage: "
                              "trackb: no usable rows in responses.jsonl"), message
    assert ("Job", "generate") in rec.created
    assert "build-dataset" not in ctl.started
    assert remaining(emulator.client(), config, "vfail") == []


UNSCHEDULABLE_POD = {
    "metadata": {"name": "trackb-vslow-vllm-5d9c-x2x7q"},
    "spec": {"containers": [{"name": "vllm"}]},
    "status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available:\n3 Insufficient nvidia.com/gpu."}]}}


@pytest.mark.parametrize("server_pod, cause", [
    (None, "no pod was created"),
    (UNSCHEDULABLE_POD, "pod trackb-vslow-vllm-5d9c-x2x7q Unschedulable: 0/3 nodes are "
     "available: 3 Insufficient nvidia.com/gpu."),
])
def test_server_never_ready_fails_within_its_budget_and_is_deleted(
        emulator, controller, bucket, stdlib_corpus, server_pod, cause):
    client = emulator.client()
    if server_pod is not None:
        # The server's pod as the ReplicaSet controller would have made it (the fake Job
        # controller would garbage-collect a real one: it has no Job).
        list_pods = client.list_pods

        def with_server_pod(namespace, selector):
            pods = list_pods(namespace, selector)
            return pods + [server_pod] if selector.get("trackb/stage") == "vllm" else pods

        client.list_pods = with_server_pod
    config, ctl, server, rec, error, seconds = _run(
        emulator, controller, bucket, stdlib_corpus, "vslow", ready=False, startup_seconds=1,
        client=client)
    assert isinstance(error, StageFailed), error
    message = str(error)
    assert "\n" not in message, "the cause must reach the user as one line"
    assert message.startswith("generate: the vLLM Deployment trackb-vslow-vllm was not "
                              f"ready after 1s: {cause}"), message
    assert seconds >= 1  # the startup budget ran out first
    assert server.readied == 0
    # generate never started against a server that is not there.
    assert ("Job", "generate") not in rec.created and "generate" not in ctl.started
    assert remaining(emulator.client(), config, "vslow") == []


def test_ctrl_c_at_a_terminal_while_waiting_for_the_server_deletes_it(emulator, controller, bucket,
                                                        stdlib_corpus):
    client = emulator.client()
    get = client.get
    polls = {"n": 0}

    def interrupted_get(kind, namespace, name):
        found = get(kind, namespace, name)
        if kind == "Deployment" and found is not None:
            polls["n"] += 1
            if polls["n"] == 2:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C while waiting
        return found

    client.get = interrupted_get
    config, ctl, _, rec, error, _ = _run(
        emulator, controller, bucket, stdlib_corpus, "vctrlc", ready=False,
        startup_seconds=30, client=client, cancel_on_interrupt=True)
    assert isinstance(error, Interrupted) and error.exit_code == 130, error
    assert "generate" not in ctl.started
    client.get = get
    assert remaining(emulator.client(), config, "vctrlc") == []


def test_gpu_quantities_are_strings(bucket, stdlib_corpus):
    """The client validates bodies: a quantity must be a string (``"1"``, not 1)."""
    config = vllm_pipeline(stdlib_corpus, bucket, "vq")
    for obj in jobspec.build_vllm_service(config, "vq"):
        for container in obj["spec"].get("template", {}).get("spec", {}).get("containers", []):
            for part in container["resources"].values():
                assert all(isinstance(value, str) for value in part.values()), part
