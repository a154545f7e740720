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
import uuid
from collections import Counter
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
# Stuck states (tests/k8s/test_stuck_states.py). A Job that cannot create its pod: the
# Job controller's FailedCreate event on the Job ({pod}: the pod it tried to create).
FAILED_CREATE = {
    "no-pods-priorityclass": 'Error creating: pods "{pod}" is forbidden: no PriorityClass '
                             "with name trackb-gpu was found",
    "no-pods-quota": 'Error creating: pods "{pod}" is forbidden: exceeded quota: gpu-quota, '
                     "requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, "
                     "limited: requests.nvidia.com/gpu=4",
    "no-pods-webhook": 'Error creating: admission webhook "validate.kyverno.svc-fail" denied '
                       "the request: resource Pod/trackb-test/{pod} was blocked due to the "
                       "following policies require-team-label",
}
# The generate pod's vLLM sidecar crash-looping: (restarts, its last termination, the log
# of that run, the kubelet's events about it as (reason, message)).
VLLM_CRASHES = {
    "vllm-crashloop-oom": (2, {"exitCode": 1, "reason": "Error"},
                           "INFO model_runner.py:1060] Loading model weights took 13.9 GB\n"
                           "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                           "1.50 GiB. GPU 0 has a total capacity of 14.58 GiB of which 1.02 "
                           "GiB is free.\n", []),
    "vllm-crashloop-probe": (1, {"exitCode": 137, "reason": "Error"},
                             "INFO weight_utils.py:243] Using model weights format "
                             "['*.safetensors']\n",
                             [("Unhealthy", 'Startup probe failed: Get "http://10.244.1.7:8000'
                               '/v1/models": dial tcp 10.244.1.7:8000: connect: connection '
                               "refused"),
                              ("Killing", "Container vllm failed startup probe, will be "
                               "restarted")]),
    # FallbackToLogsOnError: the log's tail is the termination message too.
    "vllm-crashloop-gpu": (1, {"exitCode": 1, "reason": "Error", "message":
                               "ValueError: Bfloat16 is only supported on GPUs with compute "
                               "capability of at least 8.0. Your Tesla T4 GPU has compute "
                               "capability 7.5."},
                           "INFO config.py:1200] Downcasting torch.float32 to torch.bfloat16."
                           "\nValueError: Bfloat16 is only supported on GPUs with compute "
                           "capability of at least 8.0. Your Tesla T4 GPU has compute "
                           "capability 7.5.\n", []),
}
# A CUDA image on a node whose NVIDIA driver is too old: the runtime refuses to start it,
# or CUDA says so from inside (the container's terminated state).
DRIVER_TOO_OLD = {
    "driver-too-old": {"exitCode": 128, "reason": "StartError", "message":
                       "failed to create containerd task: failed to create shim task: OCI "
                       "runtime create failed: runc create failed: unable to start container "
                       "process: error during container init: error running hook #0: error "
                       "running hook: exit status 1, stdout: , stderr: Auto-detected mode as "
                       "'legacy'\nnvidia-container-cli: requirement error: unsatisfied "
                       "condition: cuda>=12.4, please update your driver to a newer version, "
                       "or use an earlier cuda container: unknown"},
    "driver-too-old-log": {"exitCode": 1, "reason": "Error", "message":
                           "Traceback (most recent call last):\nRuntimeError: CUDA error: CUDA "
                           "driver version is insufficient for CUDA runtime version"},
}
MULTI_ATTACH = ('Multi-Attach error for volume "pvc-3f1c2a" Volume is already used by pod(s) '
                "trackb-other-train-00001")
RESOURCES = (("batch", "v1", "jobs"), ("", "v1", "pods"), ("", "v1", "events"),
             ("", "v1", "configmaps"), ("", "v1", "services"), ("apps", "v1", "deployments"),
             ("networking.k8s.io", "v1", "networkpolicies"),
             ("coordination.k8s.io", "v1", "leases"))
CONTROLLER_AGENT = "trackb-fake-controller"
LOG_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")
# What preflight reads (tests add objects with Emulator.put) and its access reviews.
PREFLIGHT_RESOURCES = (("", "v1", "secrets"), ("", "v1", "persistentvolumeclaims"),
                       ("", "v1", "nodes"), ("scheduling.k8s.io", "v1", "priorityclasses"),
                       ("node.k8s.io", "v1", "runtimeclasses"))
REVIEW_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
# Custom resources of Kueue and JobSet, served as if their CRDs were installed (the fakes
# that play their controllers are in tests/k8s/test_kueue.py).
CRD_RESOURCES = (("kueue.x-k8s.io", "v1beta1", "workloads"),
                 ("kueue.x-k8s.io", "v1beta1", "localqueues"),
                 ("jobset.x-k8s.io", "v1alpha2", "jobsets"))


class Emulator:
    """kmock's KubernetesEmulator on a free port, served from a background event loop."""

    def __init__(self) -> None:
        self.logs: dict[str, str] = {}  # pod name -> its log text
        # (pod name, container) -> the log of the container's run before its last restart
        self.previous_logs: dict[tuple[str, str], str] = {}
        self.forbidden: set[str] = set()  # plurals whose every request answers 403
        self.denied: set[tuple[str, str, str]] = set()  # (group, resource, verb) reviews deny
        self.served: list[Any] = []  # every request, in arrival order (see calls())
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start")

    def _serve(self) -> None:
        import kmock

        served = self.served

        class WithUids(kmock.KubernetesEmulator):
            async def _handle(self, request: Any) -> Any:
                # A real API server gives every object a uid at creation (ownerReferences
                # name it); kmock does not, so this does, before the object is stored.
                if (request.action == kmock.action.CREATE and isinstance(request.data, dict)
                        and isinstance(request.data.get("metadata"), dict)):
                    request.data["metadata"].setdefault("uid", str(uuid.uuid4()))
                served.append(request)
                try:
                    return await super()._handle(request)
                finally:
                    # kmock matches each request against each reaction by scanning its
                    # whole request history, so every request costs more than the last
                    # (a launch spent most of its CPU there). Only requests in flight
                    # stay in that history; Emulator.served keeps them all.
                    self._requests[:] = [r for r in self._requests if r is not request]

        async def main() -> None:
            async with WithUids() as emulator, kmock.Server(emulator) as srv:
                # Lists of a kind nobody created yet must be empty, not 404: declare kinds.
                for group, version, plural in RESOURCES + PREFLIGHT_RESOURCES + CRD_RESOURCES:
                    emulator.resources[kmock.resource(group, version, plural)] = {}
                # Pod logs are a subresource the emulator does not store: serve them here.
                emulator["get", LOG_PATH] << self._serve_log
                # Kinds a test forbids answer 403 (a criterion, not a reaction that returns
                # nothing: kmock disables a reaction for good after its first mismatch).
                emulator[self._forbidden] << kmock.KubernetesError(
                    status=403, reason="Forbidden", message="forbidden by the test")
                emulator["post", REVIEW_PATH] << self._review
                self.handler = emulator
                self.url = str(srv.url).rstrip("/")
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def _serve_log(self, request: Any) -> bytes:
        match = LOG_PATH.search(request.url.path)
        if match and str(request.params.get("previous", "")).lower() == "true":
            key = (match.group(2), request.params.get("container", ""))
            return self.previous_logs.get(key, "").encode()
        return self.logs.get(match.group(2), "").encode() if match else b""

    def _forbidden(self, request: Any) -> bool:
        return request.resource is not None and request.resource.plural in self.forbidden

    def _review(self, request: Any) -> dict[str, Any]:
        """A SelfSubjectAccessReview: allowed unless its (group, resource, verb) is denied."""
        attributes = request.data["spec"]["resourceAttributes"]
        resource = attributes["resource"] + (f"/{attributes['subresource']}"
                                             if attributes.get("subresource") else "")
        key = (attributes.get("group", ""), resource, attributes["verb"])
        # The emulator stores every create by name, and reviews have none: forget this one,
        # or the next review would be refused as a conflict.
        self.handler.objects[request.resource, None, None].delete()
        return {**request.data, "status": {"allowed": key not in self.denied}}

    def provide(self, config) -> None:
        """Put what preflight checks for ``config`` (a PipelineConfig): its Secrets with
        the keys pods read, its cache PVC (ReadWriteMany), PriorityClass and RuntimeClass,
        and a node matching its GPU node selector."""
        from trackb_core.k8s.jobspec import required_secrets

        k8s = config.kubernetes
        for name, _, keys in required_secrets(k8s):
            self.put("", "secrets", {"metadata": {"name": name, "namespace": k8s.namespace},
                                     "data": dict.fromkeys(keys, "eA==")})
        if k8s.cache.pvc:
            self.put("", "persistentvolumeclaims", {
                "metadata": {"name": k8s.cache.pvc, "namespace": k8s.namespace},
                "spec": {"accessModes": ["ReadWriteMany"]}})
        for group, plural, name in (
                ("scheduling.k8s.io", "priorityclasses", k8s.scheduling.priority_class_name),
                ("node.k8s.io", "runtimeclasses", k8s.sandbox.runtime_class_name)):
            if name:
                self.put(group, plural, {"metadata": {"name": name}})
        self.put("", "nodes", {"metadata": {"name": "gpu-node",
                                            "labels": dict(k8s.scheduling.node_selector)}})

    def put(self, group: str, plural: str, obj: dict[str, Any]) -> None:
        """Store ``obj`` as if created, without a request (namespaced when its metadata
        names a namespace): what preflight expects to find."""
        import kmock

        meta = obj["metadata"]
        self.handler.objects[kmock.resource(group, "v1", plural), meta.get("namespace"),
                             meta["name"]] = obj

    def calls(self, exclude_agent: str = CONTROLLER_AGENT) -> set[tuple[str, str, str]]:
        """``(API group, resource[/subresource], verb)`` of every request served so far,
        except those of the fake controller: what a Role must grant the launcher."""
        verbs = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create",
                 "DELETE": "delete", "PATCH": "patch", "UPDATE": "update"}
        found = set()
        for request in list(self.served):
            if request.resource is None or request.headers.get("User-Agent") == exclude_agent:
                continue
            verb = verbs.get(getattr(request.action, "name", ""), str(request.method).lower())
            if str(request.method).upper().endswith("PATCH"):
                verb = "patch"  # the emulator files a PATCH under its UPDATE action
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
    exits 65 with a message); stuck states the Job never ends by itself: a key of
    FAILED_CREATE (no pod, a FailedCreate event on the Job), of VLLM_CRASHES (the vLLM
    sidecar in CrashLoopBackOff, its previous log in ``emulator.previous_logs``), of
    DRIVER_TOO_OLD (the container failed to start; the Job would retry), ``multi-attach``
    (Pending on a volume another pod holds); ``hold`` (Running until ``release`` is set,
    then as ``ok``).
    ``completed`` records (stage, perf_counter time) when a Job is marked Complete.

    A partitioned step's Indexed Job (:meth:`_run_indexed`) gets a pod per completion
    index, at most ``parallelism`` at a time, each annotated with its index and running
    its part (``--partition`` from the pod's environment, as jobs/_entry.py reads it).
    ``behaviour`` may name one part, ``"<stage>#<part>"``, with ``ok``, ``hold`` or
    ``fail`` (exit 1 on every try: the index fails once backoffLimitPerIndex is spent).
    A pod deleted while it holds is replaced for its index, as the Job controller does.
    ``part_pods`` counts the pods started per (stage, part).
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
        self.part_pods: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self.holding: set[str] = set()  # stages whose pod runs until release is set
        self.release = threading.Event()
        # What a prepared namespace holds (Secrets, ...): preflight checks for it.
        emulator.provide(config)
        super().__init__("fake-controller")

    # -- the control loop (every 50 ms: like a real controller, not instantaneous) --------
    def step(self) -> None:
        jobs, _ = self.kube.list_jobs(self.namespace, {"trackb/run-id": self.run_id})
        self._collect_garbage({j["metadata"]["name"] for j in jobs})
        for job in jobs:
            if job.get("spec", {}).get("suspend"):
                continue  # queued in Kueue: no pod until it is admitted (unsuspended)
            if "startTime" not in job.get("status", {}):
                if not job["metadata"].get("uid"):
                    # A real API server gives every object a uid at creation, as the
                    # emulator does for creates; a Job stored by Emulator.put gets one here.
                    self.batch.patch_namespaced_job(
                        job["metadata"]["name"], self.namespace,
                        {"metadata": {"uid": str(uuid.uuid4())}}, _preload_content=False)
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
        from trackb_core.k8s import jobspec

        name = job["metadata"]["name"]
        stage = job["metadata"]["labels"]["trackb/stage"]
        self.started.append(stage)
        if jobspec.job_parts(job) is not None:
            self._run_indexed(job)
            return
        template = job["spec"]["template"]
        pod_name = f"{name}-{len(self.started):05d}"
        if self.behaviour.get(stage) in FAILED_CREATE:
            # The pod is never made: only the Job's events say why.
            self._event("Job", name, job["metadata"].get("uid"), "FailedCreate",
                        FAILED_CREATE[self.behaviour[stage]].format(pod=pod_name))
            return
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
        if behaviour in VLLM_CRASHES:
            self._crash_loop(pod_name, template["spec"], *VLLM_CRASHES[behaviour])
            return
        if behaviour == "multi-attach":
            self._event("Pod", pod_name, None, "FailedAttachVolume", MULTI_ATTACH)
            self._patch_pod(pod_name, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True"}], "containerStatuses": [{
                    "name": "stage", "ready": False, "restartCount": 0, "image": "x",
                    "imageID": "", "state": {"waiting": {"reason": "ContainerCreating"}}}]})
            return
        if behaviour in DRIVER_TOO_OLD:
            # The Job would retry on the same kind of node (backoffLimit): only the
            # launcher's diagnosis ends the stage at once.
            self._patch_pod(pod_name, {"phase": "Failed", "containerStatuses": [self._state(
                "terminated", {**DRIVER_TOO_OLD[behaviour], "finishedAt": _now()})]})
            return
        self._patch_pod(pod_name, {"phase": "Running", "startTime": _now(),
                                   "containerStatuses": [self._state("running", {})]})
        if behaviour == "hold":
            # Runs until the test says so (a long training run): launchers come and go.
            self.holding.add(stage)
            self.release.wait(600)
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

    def _run_stage(self, stage: str, job: dict[str, Any], partition: int | None = None) -> None:
        """Run the stage as its pod would: config from the Job's ConfigMap, --out from
        args; ``partition``: only that part, into its folder (as --partition does)."""
        import yaml

        from trackb_core.k8s import jobspec
        from trackb_core.partition import part_store
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
        data = yaml.safe_load(config_map["data"][jobspec.CONFIG_FILE])
        if partition is not None:
            data["partition"] = partition
        stage_config = type(expected).model_validate(data)
        if not self.fake(stage):
            run_step(step(stage), stage_config, out)
            return
        if partition is not None:
            out = part_store(out, partition, stage_config.partitions)
        with stage_run(stage, stage_config, out) as run:
            for filename in FAKE_OUTPUTS.get(stage, ["result.txt"]):
                run.write_text(filename, f"fake {stage} result\n")

    # -- a partitioned step's Indexed Job --------------------------------------------------
    def _run_indexed(self, job: dict[str, Any]) -> None:
        """Run every completion index, at most ``parallelism`` at once; the Job is Complete
        when every index succeeded, else Failed (FailedIndexes) listing the failed ones."""
        from trackb_core.k8s import jobspec

        spec = job["spec"]
        completions = spec["completions"]
        parts = jobspec.job_parts(job)
        assert parts is not None and len(parts) == completions, (parts, completions)
        waiting = list(range(completions))
        outcome: dict[int, bool] = {}

        def worker() -> None:
            try:
                while True:
                    with self._lock:
                        if not waiting:
                            return
                        index = waiting.pop(0)
                    outcome[index] = self._run_index(job, index)
                    if outcome[index]:
                        done = sorted(i for i, ok in outcome.items() if ok)
                        self._patch_job(job["metadata"]["name"], {
                            "succeeded": len(done),
                            "completedIndexes": ",".join(map(str, done))})
            except Exception as exc:
                if not (self._stop.is_set() or _gone(exc)):
                    self.errors.append(traceback.format_exc())

        workers = [threading.Thread(target=worker, daemon=True)
                   for _ in range(min(spec.get("parallelism", completions), completions))]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        if len(outcome) < completions:
            return  # the Job went away (deleted) or the test ended
        stage = job["metadata"]["labels"]["trackb/stage"]
        failed = sorted(i for i, ok in outcome.items() if not ok)
        if failed:
            self._patch_job(job["metadata"]["name"], {
                "failed": len(failed), "failedIndexes": ",".join(map(str, failed)),
                "conditions": [{"type": "Failed", "status": "True", "reason": "FailedIndexes",
                                "message": "Job has failed indexes",
                                "lastTransitionTime": _now()}]})
            return
        self._patch_job(job["metadata"]["name"], {
            "completionTime": _now(), "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]})
        self.completed.append((stage, time.perf_counter()))

    def _run_index(self, job: dict[str, Any], index: int) -> bool:
        """The pods of one completion index until one succeeds (True) or its retries
        (backoffLimitPerIndex) are spent (False). A pod deleted while it runs is replaced."""
        from trackb_core.k8s import jobspec

        name = job["metadata"]["name"]
        stage = job["metadata"]["labels"]["trackb/stage"]
        template = job["spec"]["template"]
        part = jobspec.job_parts(job)[index]
        behaviour = self.behaviour.get(f"{stage}#{part}", self.behaviour.get(stage, "ok"))
        tries = job["spec"].get("backoffLimitPerIndex", 0) + 1
        while tries > 0 and not self._stop.is_set():
            pod_name = f"{name}-{index}-{uuid.uuid4().hex[:5]}"
            with self._lock:
                self.part_pods[stage, part] += 1
            annotations = {**(template["metadata"].get("annotations") or {}),
                           jobspec.COMPLETION_INDEX_ANNOTATION: str(index)}
            self.core.create_namespaced_pod(self.namespace, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": self.namespace,
                             "creationTimestamp": _now(), "annotations": annotations,
                             "labels": {**template["metadata"]["labels"], "job-name": name,
                                        jobspec.COMPLETION_INDEX_ANNOTATION: str(index)}},
                "spec": template["spec"]}, _preload_content=False)
            self._patch_pod(pod_name, {"phase": "Running", "startTime": _now(),
                                       "containerStatuses": [self._state("running", {})]})
            if behaviour == "hold":
                self.holding.add(stage)
                while not (self.release.is_set() or self._stop.is_set()
                           or self._pod_gone(pod_name)):
                    self.release.wait(0.1)
            if self._pod_gone(pod_name):
                continue  # deleted while running: the Job controller makes a new pod
            # What the kubelet would give the container: the Job's env, the downward API
            # resolved from the pod's annotations; the entry reads its part from it.
            env = {var["name"]: var["value"] if "value" in var
                   else annotations[re.search(r"annotations\['(.+)'\]", var["valueFrom"][
                       "fieldRef"]["fieldPath"]).group(1)]
                   for var in template["spec"]["containers"][0]["env"]
                   if var["name"] in (jobspec.PARTITIONS_ENV, jobspec.COMPLETION_INDEX_ENV)}
            partition = jobspec.pod_partition(env)
            assert partition == part, (partition, part)
            if behaviour == "fail":
                tries -= 1
                self.emulator.logs[pod_name] = f"[{stage}] part {part}\ntrackb: teacher gone\n"
                self._end_pod(pod_name, exit_code=1, reason="Error",
                              message="trackb: the teacher went away")
                continue
            try:
                self._run_stage(stage, job, partition)
            except TrackbError as exc:
                self.emulator.logs[pod_name] = f"trackb: {exc}\n"
                self._end_pod(pod_name, exit_code=exc.exit_code, reason="Error",
                              message=f"trackb: {exc}")
                return False
            self.emulator.logs[pod_name] = f"[{stage}] part {part}\n[{stage}] wrote manifest.json\n"
            self._end_pod(pod_name, exit_code=0, reason="Completed", message="")
            return True
        return False

    def _pod_gone(self, name: str) -> bool:
        try:
            self.core.read_namespaced_pod(name, self.namespace, _preload_content=False)
        except Exception as exc:
            if _gone(exc):
                return True
            raise
        return False

    def _end_pod(self, pod: str, *, exit_code: int, reason: str, message: str) -> None:
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}
        if message:
            terminated["message"] = message
        self._patch_pod(pod, {"phase": "Succeeded" if exit_code == 0 else "Failed",
                              "containerStatuses": [self._state("terminated", terminated)]})

    def _end(self, job: str, pod: str, stage: str, *, exit_code: int, reason: str,
             message: str, job_reason: tuple[str, str] | None = None) -> None:
        self._end_pod(pod, exit_code=exit_code, reason=reason, message=message)
        if exit_code == 0:
            self._patch_job(job, {"succeeded": 1, "completionTime": _now(), "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]})
            self.completed.append((stage, time.perf_counter()))
        else:
            kind, text = job_reason or ("BackoffLimitExceeded", "")
            self._patch_job(job, {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": kind, "message": text,
                 "lastTransitionTime": _now()}]})

    def _crash_loop(self, pod: str, spec: dict[str, Any], restarts: int,
                    last: dict[str, Any], log: str, events: list[tuple[str, str]]) -> None:
        """The pod's native sidecar (the init container with restartPolicy Always) in
        CrashLoopBackOff; the containers after it wait, so the pod stays Pending."""
        sidecar = next(c["name"] for c in spec["initContainers"]
                       if c.get("restartPolicy") == "Always")
        self.emulator.previous_logs[pod, sidecar] = log
        self.emulator.logs[pod] = "INFO starting the server\n"  # the run after the crash
        for reason, message in events:
            self._event("Pod", pod, None, reason, message, f"spec.initContainers{{{sidecar}}}")
        waiting = {"waiting": {"reason": "PodInitializing"}}
        self._patch_pod(pod, {"phase": "Pending", "initContainerStatuses": [
            {"name": c["name"], "ready": False, "image": c["image"], "imageID": "",
             **({"restartCount": restarts, "started": False, "state": {"waiting": {
                 "reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed "
                 f"container={sidecar} pod={pod}"}},
                 "lastState": {"terminated": {**last, "finishedAt": _now()}}}
                if c["name"] == sidecar else {"restartCount": 0, "state": waiting})}
            for c in spec["initContainers"]],
            "containerStatuses": [{"name": c["name"], "ready": False, "restartCount": 0,
                                   "image": c["image"], "imageID": "", "state": waiting}
                                  for c in spec["containers"]]})

    def _event(self, kind: str, name: str, uid: str | None, reason: str, message: str,
               field_path: str | None = None) -> None:
        """A Warning event about one object, as the Job controller or the kubelet
        records it."""
        involved = {"kind": kind, "name": name, "namespace": self.namespace}
        if uid:
            involved["uid"] = uid
        if field_path:
            involved["fieldPath"] = field_path
        self.core.create_namespaced_event(self.namespace, {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:16]}",
                         "namespace": self.namespace},
            "involvedObject": involved, "reason": reason, "message": message,
            "type": "Warning", "count": 1, "firstTimestamp": _now(),
            "lastTimestamp": _now()}, _preload_content=False)

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
def launcher_said(monkeypatch) -> list[str]:
    """Every line the launcher says, recorded as it is said. (capsys, read from the test
    thread while the launcher's thread prints, drops a line written between its read and
    its reset: a test that polled it failed now and then on a busy machine.)"""
    from trackb_core.k8s import launcher

    lines: list[str] = []
    real = launcher.say

    def record(stage: str, message: str) -> None:
        lines.append(f"[{stage}] {message}")
        real(stage, message)

    monkeypatch.setattr(launcher, "say", record)
    return lines


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
