"""A Kubernetes API over HTTP (kmock's emulator) and a fake Job controller.

There is no cluster here (field notes §7). kmock's ``KubernetesEmulator`` stores
objects and serves create/get/list/watch/patch/delete over real HTTP, so the launcher
talks to it through the official ``kubernetes`` client exactly as to a cluster. What a
cluster would do by itself (start a Job's pod, run it, mark the Job Complete or Failed,
garbage-collect pods of deleted Jobs) is played by :class:`FakeJobController`, which
runs each stage's real code for the fast stages and writes the result into the store.

The benchmark (benchmarks/bench_launcher.py) reuses these classes.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from k8s_launch import BackgroundLoop

from trackb_core.errors import TrackbError

# Stages cheap enough to really run inside a test; the others get a fake-but-valid
# result written through trackb_core.stage (same manifest, same fingerprint rules).
REAL_STAGES = ("extract", "generate", "build-dataset")
# What downstream stages read from a faked stage (compare reads both eval.json files).
FAKE_OUTPUTS = {"extract": ["functions.jsonl", "tasks.jsonl"], "generate": ["responses.jsonl"],
                "build-dataset": ["train.jsonl", "test.jsonl"],
                "predict-baseline": ["predictions.jsonl"], "predict-post": ["predictions.jsonl"],
                "eval-baseline": ["eval.json"], "eval-post": ["eval.json"],
                "compare": ["report.md"]}
# Pod behaviours that leave the container waiting: (reason, message) as the kubelet says.
WAITING = {
    "image-pull": ("ImagePullBackOff", 'Back-off pulling image "x": i/o timeout'),
    "invalid-image": ("InvalidImageName", 'couldn\'t parse image name "x::y"'),
    "missing-secret": ("CreateContainerConfigError", 'secret "trackb-s3" not found'),
}
RESOURCES = (("batch", "v1", "jobs"), ("", "v1", "pods"), ("", "v1", "events"),
             ("", "v1", "configmaps"), ("", "v1", "services"), ("apps", "v1", "deployments"),
             ("networking.k8s.io", "v1", "networkpolicies"))
CONTROLLER_AGENT = "trackb-fake-controller"
LOG_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")


class Emulator:
    """kmock's KubernetesEmulator on a free port, served from a background event loop."""

    def __init__(self) -> None:
        self.logs: dict[str, str] = {}  # pod name -> its log text
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")

    def _serve(self) -> None:
        import kmock

        async def main() -> None:
            async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as srv:
                # Lists of a kind nobody created yet must be empty, not 404: declare kinds.
                for group, version, plural in RESOURCES:
                    emulator.resources[kmock.resource(group, version, plural)] = {}
                # Pod logs are a subresource the emulator does not store: serve them here.
                emulator["get", LOG_PATH] << self._serve_log
                self.handler = emulator
                self.url = str(srv.url).rstrip("/")
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def _serve_log(self, request: Any) -> bytes:
        match = LOG_PATH.search(request.url.path)
        return self.logs.get(match.group(2), "").encode() if match else b""

    def calls(self, exclude_agent: str = CONTROLLER_AGENT) -> set[tuple[str, str, str]]:
        """``(API group, resource[/subresource], verb)`` of every request served so far,
        except those of the fake controller: what a Role must grant the launcher."""
        verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create",
                 "DELETE": "delete"}
        found = set()
        for request in list(self.handler):
            if request.resource is None or request.headers.get("User-Agent") == exclude_agent:
                continue
            verb = verbs.get(getattr(request.action, "name", ""), str(request.method).lower())
            plural = request.resource.plural + (f"/{request.subresource}"
                                                if request.subresource else "")
            found.add((request.resource.group or "", plural, verb))
        return found

    def client(self):
        from trackb_core.k8s.client import for_host

        return for_host(self.url)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


def _gone(exc: Exception) -> bool:
    """A 404: the object was deleted between our list and our call."""
    return getattr(exc, "status", None) == 404


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeJobController(BackgroundLoop):
    """Plays the Job controller and kubelet for every Job in ``namespace``.

    ``behaviour`` maps a stage to what its pod does: ``ok`` (default: run the stage),
    ``image-pull`` (stuck in ImagePullBackOff), ``invalid-image``, ``missing-secret``,
    ``unschedulable``, ``oom`` (OOMKilled, Job fails), ``evicted`` or ``fail`` (the stage
    exits 65 with a message).
    ``completed`` records (stage, perf_counter time) when a Job is marked Complete.
    """

    def __init__(self, emulator: Emulator, config, run_id: str,
                 behaviour: dict[str, str] | None = None,
                 fake: Callable[[str], bool] = lambda stage: stage not in REAL_STAGES):
        from kubernetes import client as k8s  # the test's own Job controller

        self.emulator = emulator
        self.config = config
        self.run_id = run_id
        self.namespace = config.kubernetes.namespace
        self.behaviour = behaviour or {}
        self.fake = fake
        api = k8s.ApiClient(k8s.Configuration(host=emulator.url))
        api.user_agent = CONTROLLER_AGENT  # so that Emulator.calls() leaves it out
        self.batch = k8s.BatchV1Api(api)
        self.core = k8s.CoreV1Api(api)
        self.kube = emulator.client()
        self.kube.api_client.user_agent = CONTROLLER_AGENT
        self.completed: list[tuple[str, float]] = []
        self.started: list[str] = []
        super().__init__("fake-controller")

    # -- the control loop (every 50 ms: like a real controller, not instantaneous) --------
    def step(self) -> None:
        jobs, _ = self.kube.list_jobs(self.namespace, {"trackb/run-id": self.run_id})
        self._collect_garbage({j["metadata"]["name"] for j in jobs})
        for job in jobs:
            if "startTime" not in job.get("status", {}):
                self._patch_job(job["metadata"]["name"], {"startTime": _now()})
                threading.Thread(target=self._run_job, args=(job,), daemon=True).start()

    def _collect_garbage(self, job_names: set[str]) -> None:
        # Background propagation: pods of a deleted Job go away.
        pods = self.kube.list_pods(self.namespace, {"trackb/run-id": self.run_id})
        for pod in pods:
            if pod["metadata"]["labels"].get("job-name") not in job_names:
                self.core.delete_namespaced_pod(pod["metadata"]["name"], self.namespace,
                                                _preload_content=False)

    def _run_job(self, job: dict[str, Any]) -> None:
        try:
            self._run_job_inner(job)
        except Exception as exc:
            # After the test the emulator is gone, and the launcher may delete a Job (Ctrl-C,
            # a sibling's failure) while its pod runs: neither is news.
            if not (self._stop.is_set() or _gone(exc)):
                self.errors.append(traceback.format_exc())

    def _run_job_inner(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        stage = job["metadata"]["labels"]["trackb/stage"]
        self.started.append(stage)
        template = job["spec"]["template"]
        pod_name = f"{name}-{len(self.started):05d}"
        self.core.create_namespaced_pod(self.namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": self.namespace,
                         "creationTimestamp": _now(),
                         "labels": {**template["metadata"]["labels"], "job-name": name}},
            "spec": template["spec"]}, _preload_content=False)
        behaviour = self.behaviour.get(stage, "ok")
        if behaviour == "unschedulable":
            self._patch_pod(pod_name, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
            return
        if behaviour in WAITING:
            reason, message = WAITING[behaviour]
            self._patch_pod(pod_name, {"phase": "Pending", "containerStatuses": [{
                "name": "stage", "ready": False, "restartCount": 0, "image": "x",
                "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}]})
            return
        self._patch_pod(pod_name, {"phase": "Running", "startTime": _now(),
                                   "containerStatuses": [self._state("running", {})]})
        if behaviour == "evicted":
            self._patch_pod(pod_name, {"phase": "Failed", "reason": "Evicted",
                                       "message": "The node was low on resource: memory."})
            self._patch_job(name, {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                 "message": "Job has reached the specified backoff limit"}]})
            return
        if behaviour == "oom":
            self.emulator.logs[pod_name] = "loading model\n"
            self._end(name, pod_name, stage, exit_code=137, reason="OOMKilled", message="",
                      job_reason=("BackoffLimitExceeded", "Job has reached the specified "
                                  "backoff limit"))
            return
        if behaviour == "fail":
            self.emulator.logs[pod_name] = f"[{stage}] starting\ntrackb: no usable rows\n"
            self._end(name, pod_name, stage, exit_code=65, reason="Error",
                      message="trackb: no usable rows in responses.jsonl",
                      job_reason=("PodFailurePolicy", "Container stage for pod "
                                  f"{pod_name} failed with exit code 65 matching FailJob rule"))
            return
        try:
            self._run_stage(stage, job)
        except TrackbError as exc:
            self.emulator.logs[pod_name] = f"trackb: {exc}\n"
            self._end(name, pod_name, stage, exit_code=exc.exit_code, reason="Error",
                      message=f"trackb: {exc}", job_reason=("PodFailurePolicy", str(exc)))
            return
        self.emulator.logs[pod_name] = f"[{stage}] running\n[{stage}] wrote manifest.json\n"
        self._end(name, pod_name, stage, exit_code=0, reason="Completed", message="")

    def _run_stage(self, stage: str, job: dict[str, Any]) -> None:
        """Run the stage as its pod would: config from the Job's ConfigMap, --out from args."""
        import yaml

        from trackb_core.k8s import jobspec
        from trackb_core.pipeline import run_step
        from trackb_core.stage import stage_run
        from trackb_core.stages import step
        from trackb_core.store import open_store

        container = job["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        out = open_store(args[args.index("--out") + 1])
        volume = next(v for v in job["spec"]["template"]["spec"]["volumes"]
                      if "configMap" in v)
        config_map = self.kube.get("ConfigMap", self.namespace, volume["configMap"]["name"])
        expected = jobspec.stage_configs(self.config, self.run_id)[stage]
        stage_config = type(expected).model_validate(
            yaml.safe_load(config_map["data"][jobspec.CONFIG_FILE]))
        if not self.fake(stage):
            run_step(step(stage), stage_config, out)
            return
        with stage_run(stage, stage_config, out) as run:
            for filename in FAKE_OUTPUTS.get(stage, ["result.txt"]):
                run.write_text(filename, f"fake {stage} result\n")

    def _end(self, job: str, pod: str, stage: str, *, exit_code: int, reason: str,
             message: str, job_reason: tuple[str, str] | None = None) -> None:
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}
        if message:
            terminated["message"] = message
        self._patch_pod(pod, {"phase": "Succeeded" if exit_code == 0 else "Failed",
                              "containerStatuses": [self._state("terminated", terminated)]})
        if exit_code == 0:
            self._patch_job(job, {"succeeded": 1, "completionTime": _now(), "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]})
            self.completed.append((stage, time.perf_counter()))
        else:
            kind, text = job_reason or ("BackoffLimitExceeded", "")
            self._patch_job(job, {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": kind, "message": text,
                 "lastTransitionTime": _now()}]})

    @staticmethod
    def _state(key: str, value: dict[str, Any]) -> dict[str, Any]:
        return {"name": "stage", "ready": key == "running", "restartCount": 0,
                "image": "trackb-cpu", "imageID": "", "state": {key: value}}

    def _patch_pod(self, name: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod(name, self.namespace, {"status": status},
                                       _preload_content=False)

    def _patch_job(self, name: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, self.namespace, {"status": status},
                                        _preload_content=False)


@pytest.fixture
def emulator():
    pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
    pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")
    emu = Emulator()
    yield emu
    emu.close()


@pytest.fixture
def controller(emulator):
    """``controller(config, run_id, behaviour=..., fake=...)``: a FakeJobController on
    the emulator, used as a context manager."""
    def make(config, run_id: str, **kwargs: Any) -> FakeJobController:
        return FakeJobController(emulator, config, run_id, **kwargs)

    return make
