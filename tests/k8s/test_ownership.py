"""Who owns what a run creates, against the API emulator.

A stage's ConfigMap, NetworkPolicy and (multi-node training) headless Service are owned
by the stage's Job, so that deleting the Job, or its TTL after it finished, removes them
with it. The vLLM server of deployment mode is owned by what dies with its launcher: the
launcher's own Job in a cluster, the run's Lease from a laptop. The emulator gives every
created object a uid, as an API server does (conftest.py); garbage collection itself is
the cluster's, not played here: these tests check the references it acts on. And
``trackb delete`` (helm uninstall's pre-delete hook) stops the launcher before it deletes
the stage Jobs.
"""

from __future__ import annotations

import pytest
from k8s_launch import HANG_GUARD, launch_within
from test_launcher_vllm_deployment import FakeDeploymentController

from trackb_core.config import build_config
from trackb_core.k8s import jobspec, launcher
from trackb_core.k8s.launcher import LauncherConfig
from trackb_core.k8s.lease import RunLease, lease_name
from trackb_core.pipeline import PipelineConfig
from trackb_core.store import open_store

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

NAMESPACE = "trackb-test"
BUDGETS = LauncherConfig(poll_seconds=0.2, image_pull_seconds=1.5, unschedulable_seconds=1.5,
                         replace_seconds=10)


def cpu_pipeline(corpus, bucket: str, run_id: str) -> PipelineConfig:
    return build_config(PipelineConfig, {
        "run_id": run_id, "store": f"s3://{bucket}/trackb", "corpus": str(corpus),
        "model": "tiny", "backend": "k8s", "kubernetes": {"namespace": NAMESPACE}})


def gpu_pipeline(run_id: str, **kubernetes) -> PipelineConfig:
    """The GPU profile with a hub model and an openai teacher (nothing runs: the tests
    start single stages or the server)."""
    return build_config(PipelineConfig, {
        "run_id": run_id, "store": "s3://unused/trackb", "corpus": "/corpus",
        "model": "Qwen/Qwen2.5-Coder-1.5B", "backend": "k8s",
        "generate": {"teacher": "openai"},
        "kubernetes": {"namespace": NAMESPACE, "accelerator": "gpu", **kubernetes}})


def a_run(emulator, config, run_id: str, tmp_path) -> launcher._Run:
    """What the launcher's loop holds, with a local store (no stage runs here)."""
    return launcher._Run(config, run_id, emulator.client(), BUDGETS,
                         open_store(str(tmp_path / "store")), NAMESPACE)


def listed(emulator, plural: str, run_id: str) -> list[dict]:
    """The run's objects of one namespaced core/networking kind, read with the SDK."""
    import json

    from kubernetes import client as k8s

    api = k8s.ApiClient(k8s.Configuration(host=emulator.url))
    method = {"configmaps": k8s.CoreV1Api(api).list_namespaced_config_map,
              "services": k8s.CoreV1Api(api).list_namespaced_service,
              "networkpolicies": k8s.NetworkingV1Api(api).list_namespaced_network_policy,
              }[plural]
    items = json.loads(method(NAMESPACE, _preload_content=False).data)["items"]
    return [o for o in items if o["metadata"].get("labels", {}).get("trackb/run-id") == run_id]


def job_owner(job: dict) -> list[dict]:
    meta = job["metadata"]
    return [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
             "uid": meta["uid"], "controller": True, "blockOwnerDeletion": False}]


def test_after_a_run_every_configmap_and_networkpolicy_is_owned_by_its_stage_job(
        emulator, controller, bucket, stdlib_corpus):
    config = cpu_pipeline(stdlib_corpus, bucket, "owned")
    with controller(config, "owned", fake=lambda stage: True) as ctl:
        report, _ = launch_within(HANG_GUARD, config, "owned", emulator.client(), BUDGETS)
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(report, str), report
    jobs, _ = emulator.client().list_jobs(NAMESPACE, {"trackb/run-id": "owned"})
    by_stage = {j["metadata"]["labels"]["trackb/stage"]: j for j in jobs}
    assert set(by_stage) == set(jobspec.stage_names(config))
    owned = listed(emulator, "configmaps", "owned") + listed(emulator, "networkpolicies", "owned")
    assert len(owned) == 2 * len(by_stage)
    for obj in owned:
        job = by_stage[obj["metadata"]["labels"]["trackb/stage"]]
        assert obj["metadata"].get("ownerReferences") == job_owner(job), obj["metadata"]


def test_a_multi_node_training_service_is_owned_by_the_training_job(emulator, tmp_path):
    config = gpu_pipeline("nodes", distributed={"nodes": 2})
    run = a_run(emulator, config, "nodes", tmp_path)
    launcher._start(run, "train", [])
    job = run.client.get("Job", NAMESPACE, jobspec.object_name("nodes", "train"))
    services = listed(emulator, "services", "nodes")
    assert [s["metadata"]["name"] for s in services] == [
        jobspec.object_name("nodes", "train-nodes")]
    for obj in services + listed(emulator, "configmaps", "nodes"):
        assert obj["metadata"]["ownerReferences"] == job_owner(job)


def test_an_adopted_job_owns_the_objects_a_launcher_that_died_left_unowned(
        emulator, tmp_path):
    # An earlier launcher created the objects and the Job, then died before owning them.
    config = gpu_pipeline("orphans")
    run = a_run(emulator, config, "orphans", tmp_path)
    objects = jobspec.build_stage("build-dataset", config, "orphans")
    objects[-1]["metadata"]["annotations"] = {
        launcher.CONFIG_HASH: launcher._config_hash(objects, [])}
    for obj in objects:
        run.client.create(obj)
    assert all("ownerReferences" not in o["metadata"]
               for o in listed(emulator, "configmaps", "orphans"))

    launcher._start(run, "build-dataset", [])

    job = run.client.get("Job", NAMESPACE, jobspec.object_name("orphans", "build-dataset"))
    assert run.active["build-dataset"].uid == job["metadata"]["uid"]  # adopted, not replaced
    owned = listed(emulator, "configmaps", "orphans") + listed(
        emulator, "networkpolicies", "orphans")
    assert len(owned) == 2
    assert all(o["metadata"]["ownerReferences"] == job_owner(job) for o in owned)


def server(emulator, config, run_id: str, tmp_path, reuse: bool = False) -> list[dict]:
    """Start the vLLM server as the launcher does before generate; its objects."""
    run = a_run(emulator, config, run_id, tmp_path)
    with FakeDeploymentController(emulator, config, run_id):
        launcher._start_vllm(run, reuse=reuse)
    return [run.client.get(o["kind"], NAMESPACE, o["metadata"]["name"])
            for o in jobspec.build_vllm_service(config, run_id)]


def test_a_laptop_launchers_vllm_server_is_owned_by_the_runs_lease(emulator, tmp_path):
    config = gpu_pipeline("laptop", vllm={"serve": "deployment"})
    lease = RunLease(emulator.client(), NAMESPACE, "laptop", 30)
    lease.acquire()
    try:
        uid = emulator.client().get("Lease", NAMESPACE, lease_name("laptop"))["metadata"]["uid"]
        objects = server(emulator, config, "laptop", tmp_path)
    finally:
        lease.release()
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "NetworkPolicy"]
    for obj in objects:
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "name": lease_name("laptop"), "uid": uid, "controller": True,
            "blockOwnerDeletion": False}]


def test_an_in_cluster_launchers_vllm_server_is_owned_by_the_launcher_job_and_taken_over(
        emulator, tmp_path, monkeypatch):
    config = gpu_pipeline("inside", vllm={"serve": "deployment"})
    monkeypatch.setenv("TRACKB_LAUNCHER_JOB", "trackb-launcher-1")
    monkeypatch.setenv("TRACKB_LAUNCHER_JOB_UID", "uid-1")
    first = server(emulator, config, "inside", tmp_path)
    assert {o["metadata"]["ownerReferences"][0]["uid"] for o in first} == {"uid-1"}
    assert first[0]["metadata"]["ownerReferences"][0]["name"] == "trackb-launcher-1"
    # A new launcher Job (helm upgrade) reusing the server for an adopted generate Job
    # becomes its only owner: the server must not go with the previous launcher Job.
    monkeypatch.setenv("TRACKB_LAUNCHER_JOB", "trackb-launcher-2")
    monkeypatch.setenv("TRACKB_LAUNCHER_JOB_UID", "uid-2")
    second = server(emulator, config, "inside", tmp_path, reuse=True)
    assert [o["metadata"]["uid"] for o in second] == [o["metadata"]["uid"] for o in first]
    for obj in second:
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "batch/v1", "kind": "Job", "name": "trackb-launcher-2",
            "uid": "uid-2", "controller": True, "blockOwnerDeletion": False}]


def test_delete_stops_the_launcher_before_it_deletes_the_stage_jobs(emulator):
    # What helm uninstall's pre-delete hook runs: a launcher left alive could create the
    # next stage's Job after the list of Jobs to delete was taken.
    import kmock

    config = gpu_pipeline("gone")
    client = emulator.client()
    launcher_job = jobspec.build_launcher_job(config, "gone")[-1]
    train = jobspec.build_stage("train", config, "gone")[-1]
    for obj in (launcher_job, train):
        client.create(obj)
    labels = launcher_job["spec"]["template"]["metadata"]["labels"]
    emulator.put("", "pods", {"metadata": {"name": "launcher-pod", "namespace": NAMESPACE,
                                           "labels": labels}})
    order = []
    plain_delete = client.delete

    def recording_delete(kind: str, namespace: str, name: str) -> bool:
        pods = [p["metadata"]["name"] for p in client.list_pods(NAMESPACE, {
            "trackb/run-id": "gone", "trackb/stage": "launcher"})]
        order.append((kind, name, pods))
        if name == launcher_job["metadata"]["name"]:
            # The launcher exits on SIGTERM: its pod goes (here: at once).
            emulator.handler.objects[kmock.resource("", "v1", "pods"), NAMESPACE,
                                     "launcher-pod"].delete()
        return plain_delete(kind, namespace, name)

    client.delete = recording_delete
    deleted = launcher.delete(config, "gone", api=client)
    jobs = [(name, pods) for kind, name, pods in order if kind == "Job"]
    assert jobs[0] == (launcher_job["metadata"]["name"], ["launcher-pod"])
    assert jobs[1] == (train["metadata"]["name"], [])  # after the launcher pod was gone
    assert deleted[:2] == [f"Job/{launcher_job['metadata']['name']}",
                           f"Job/{train['metadata']['name']}"]
