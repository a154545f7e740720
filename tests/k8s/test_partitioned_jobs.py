"""A partitioned step on Kubernetes: one Indexed Job, a pod per part, merged by the launcher.

Against the API emulator (conftest.py): generate with ``partitions: 4`` and an openai
teacher in the GPU profile, so each pod of the Indexed Job carries its own vLLM sidecar.
The fake controller cannot start vLLM; the port the sidecar would listen on
(``kubernetes.vllm.port``) is served by a fault-free OpenAI-compatible server
(tests/fault_server.py) instead, so each part really asks "its" server at 127.0.0.1.
Only extract and generate run for real; the later stages are faked. The pure pieces
(parts of a Job, a pod's part, each part's state for ``trackb status``) are unit-tested
below without the emulator.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from fault_server import FaultServer
from k8s_launch import HANG_GUARD, launch_within, wait_until

from trackb_core.config import build_config
from trackb_core.errors import ConfigError
from trackb_core.k8s import jobspec
from trackb_core.k8s.launcher import LauncherConfig, StageFailed, partition_states, status
from trackb_core.partition import part_name, part_store
from trackb_core.pipeline import PipelineConfig
from trackb_core.store import open_store

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

NAMESPACE = "trackb-test"
BUDGETS = LauncherConfig(poll_seconds=0.2, replace_seconds=10, progress_seconds=0.2)
REAL = ("extract", "generate")


def partitioned(corpus, bucket: str, run_id: str, port: int, partitions: int = 4,
                **kubernetes) -> PipelineConfig:
    return build_config(PipelineConfig, {
        "run_id": run_id, "store": f"s3://{bucket}/trackb", "corpus": str(corpus),
        "model": "tiny", "backend": "k8s", "extract": {"max_functions": 30},
        "generate": {"teacher": "openai", "partitions": partitions, "ready_timeout": 30},
        "kubernetes": {"namespace": NAMESPACE, "accelerator": "gpu",
                       "vllm": {"port": port}, **kubernetes},
    })


def run_store(bucket: str, run_id: str):
    return open_store(f"s3://{bucket}/trackb/runs/{run_id}")


def one_part_bytes(config: PipelineConfig, run_id: str, tmp_path) -> bytes:
    """responses.jsonl of the same generate step run here unpartitioned (N = 1)."""
    from trackb_core.generate import run

    generate = jobspec.stage_configs(config, run_id)["generate"]
    out = open_store(str(tmp_path / "one-part"))
    run(generate.model_copy(update={"partitions": 1}), out)
    return out.get_bytes("responses.jsonl")


class InBackground:
    """The launcher in a thread, so that the test can act on the cluster meanwhile."""

    def __init__(self, config, run_id: str, client) -> None:
        self.outcome = None
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       args=(config, run_id, client))
        self.thread.start()

    def _run(self, config, run_id, client) -> None:
        self.outcome, _ = launch_within(HANG_GUARD, config, run_id, client, BUDGETS)

    def result(self):
        self.thread.join(HANG_GUARD)
        return self.outcome


def generate_pods(client, run_id: str) -> list[dict]:
    return client.list_pods(NAMESPACE, jobspec.selector(run_id, "generate"))


def pod_index(pod: dict) -> int:
    return int(pod["metadata"]["annotations"][jobspec.COMPLETION_INDEX_ANNOTATION])


# -- the emulator -------------------------------------------------------------------------
def test_four_parts_run_as_one_indexed_job_a_deleted_pod_reruns_its_part_only_and_the_merge_equals_one_part(
        emulator, controller, bucket, stdlib_corpus, tmp_path):
    client = emulator.client()
    with FaultServer() as server:
        config = partitioned(stdlib_corpus, bucket, "parts", server.port)
        with controller(config, "parts", behaviour={"generate": "hold"},
                        fake=lambda stage: stage not in REAL) as ctl:
            launcher = InBackground(config, "parts", emulator.client())
            wait_until(lambda: len(generate_pods(client, "parts")) == 4,
                       "the Indexed Job's four pods run")
            job = client.get("Job", NAMESPACE, jobspec.object_name("parts", "generate"))
            assert (job["spec"]["completionMode"], job["spec"]["completions"],
                    job["spec"]["parallelism"]) == ("Indexed", 4, 4)
            pods = generate_pods(client, "parts")
            assert sorted(map(pod_index, pods)) == [0, 1, 2, 3]
            for pod in pods:  # each part has its own vLLM server beside it
                sidecars = [c for c in pod["spec"]["initContainers"]
                            if c["name"] == jobspec.VLLM_CONTAINER]
                assert len(sidecars) == 1 and sidecars[0]["restartPolicy"] == "Always"
            victim = next(pod for pod in pods if pod_index(pod) == 2)
            ctl.core.delete_namespaced_pod(victim["metadata"]["name"], NAMESPACE,
                                           _preload_content=False)
            wait_until(lambda: ctl.part_pods["generate", 2] == 2,
                       "the deleted pod's index gets a new pod")
            ctl.release.set()
            report = launcher.result()
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(report, str), report
        assert ctl.started.count("generate") == 1  # one Job for the step
        assert ctl.part_pods == Counter({("generate", 0): 1, ("generate", 1): 1,
                                         ("generate", 2): 2, ("generate", 3): 1})
        # No part was answered twice: every task was asked once, by its part.
        assert set(server.hits.values()) == {1}
        merged = run_store(bucket, "parts").child("generate").get_bytes("responses.jsonl")
        assert merged == one_part_bytes(config, "parts", tmp_path)


def test_a_rerun_after_a_failed_part_creates_a_job_for_that_part_alone(
        emulator, controller, bucket, stdlib_corpus):
    client = emulator.client()
    name = jobspec.object_name("again", "generate")
    with FaultServer() as server:
        config = partitioned(stdlib_corpus, bucket, "again", server.port)
        with controller(config, "again", behaviour={"generate#1": "fail"},
                        fake=lambda stage: stage not in REAL) as ctl:
            error, _ = launch_within(HANG_GUARD, config, "again", emulator.client(), BUDGETS)
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(error, StageFailed), error
        assert str(error).startswith("generate: part-00001-of-00004 failed")
        assert "the teacher went away" in str(error)
        # Retried alone (backoffLimitPerIndex), the other parts ran once.
        assert ctl.part_pods == Counter({("generate", 0): 1, ("generate", 1): 3,
                                         ("generate", 2): 1, ("generate", 3): 1})
        row = next(r for r in status(config, "again", api=client) if r["stage"] == "generate")
        states = {p["part"]: p["state"] for p in row["partitions"]}
        assert states[part_name(0, 4)] == "done"
        assert states[part_name(1, 4)].startswith("failed: Error (exit 1)")
        assert "the teacher went away" in states[part_name(1, 4)]

        with controller(config, "again", fake=lambda stage: stage not in REAL) as ctl:
            report, _ = launch_within(HANG_GUARD, config, "again", emulator.client(), BUDGETS)
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(report, str), report
        assert ctl.part_pods == Counter({("generate", 1): 1})
        job = client.get("Job", NAMESPACE, name)
        assert job["spec"]["completions"] == 1 and jobspec.job_parts(job) == [1]
        assert run_store(bucket, "again").child("generate").exists("responses.jsonl")


# -- the pure pieces ------------------------------------------------------------------------
def config_for(**sections) -> PipelineConfig:
    return build_config(PipelineConfig, {"corpus": "x", "model": "org/model", **sections})


def test_an_unpartitioned_step_stays_a_plain_job_with_a_backoff_limit():
    spec = jobspec.runner(jobspec.build_stage("generate", config_for(), "r"))["spec"]
    assert "completionMode" not in spec and spec["backoffLimit"] == 2
    assert jobspec.job_parts({"spec": {"template": {"spec": {"containers": []}}}}) is None


def test_a_partitioned_predict_step_is_an_indexed_job_of_the_parts_to_run_each_pod_one_gpu():
    config = config_for(eval={"partitions": 3},
                        kubernetes={"job": {"partition_parallelism": 1}})
    job = jobspec.runner(jobspec.build_stage("predict-post", config, "r", parts=[2, 0]))
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"],
            spec["backoffLimitPerIndex"]) == ("Indexed", 2, 1, 2)
    assert "backoffLimit" not in spec and "maxFailedIndexes" not in spec
    assert spec["podFailurePolicy"] == jobspec.runner(
        jobspec.build_stage("train", config, "r"))["spec"]["podFailurePolicy"]
    main = spec["template"]["spec"]["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert jobspec.job_parts(job) == [0, 2]
    env = {var["name"]: var for var in main["env"]}
    assert jobspec.COMPLETION_INDEX_ANNOTATION in json.dumps(
        env[jobspec.COMPLETION_INDEX_ENV]["valueFrom"])


def test_a_partitioned_extract_step_is_an_indexed_job_of_its_parts_merged_by_extract():
    from trackb_core import extract
    from trackb_core.stages import command

    config = config_for(extract={"partitions": 2})
    assert jobspec.stage_partitions(config, "r", "extract") == 2
    job = jobspec.runner(jobspec.build_stage("extract", config, "r", parts=[0, 1]))
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"]) == ("Indexed", 2)
    assert jobspec.job_parts(job) == [0, 1]
    assert getattr(extract, command("extract").merger) is extract.merge


def test_a_pod_reads_its_part_from_its_completion_index_and_the_jobs_list():
    environ = {jobspec.PARTITIONS_ENV: "1,3", jobspec.COMPLETION_INDEX_ENV: "1"}
    assert jobspec.pod_partition(environ) == 3
    assert jobspec.pod_partition({}) is None
    with pytest.raises(ConfigError, match="TRACKB_COMPLETION_INDEX"):
        jobspec.pod_partition({**environ, jobspec.COMPLETION_INDEX_ENV: "2"})


def test_the_container_entry_turns_the_pods_environment_into_partition(monkeypatch):
    from jobs._entry import _partition_args

    assert _partition_args({}) == []
    assert _partition_args({jobspec.PARTITIONS_ENV: "0,2",
                            jobspec.COMPLETION_INDEX_ENV: "1"}) == ["--partition", "2"]
    with pytest.raises(SystemExit) as exc:
        _partition_args({jobspec.PARTITIONS_ENV: "0,2", jobspec.COMPLETION_INDEX_ENV: "x"})
    assert exc.value.code == 64


def test_parts_outside_the_step_and_a_partitioned_generate_on_one_deployment_are_refused():
    config = config_for(generate={"teacher": "openai", "partitions": 2})
    with pytest.raises(ConfigError, match="not a non-empty subset"):
        jobspec.build_stage("generate", config, "r", parts=[2])
    deployment = config_for(generate={"teacher": "openai", "partitions": 2},
                            kubernetes={"vllm": {"serve": "deployment"}})
    with pytest.raises(ConfigError, match="vllm.serve=sidecar"):
        jobspec.build_stage("generate", deployment, "r")


def test_each_part_pod_asks_its_own_sidecar_not_a_list_of_servers_meant_elsewhere():
    config = config_for(generate={"teacher": "openai", "partitions": 2,
                                  "base_urls": ["http://a:8000/v1", "http://b:8000/v1"]})
    generate = jobspec.stage_configs(config, "r")["generate"]
    assert generate.base_urls == [] and generate.base_url == "http://127.0.0.1:8000/v1"


def test_kueue_queues_a_partitioned_step_as_one_suspended_job():
    config = config_for(generate={"teacher": "openai", "partitions": 4},
                        kubernetes={"kueue": {"enabled": True},
                                    "job": {"partition_parallelism": 2}})
    job = jobspec.runner(jobspec.build_stage("generate", config, "r"))
    assert job["spec"]["suspend"] is True and job["spec"]["parallelism"] == 2
    assert job["metadata"]["labels"][jobspec.KUEUE_QUEUE_LABEL] == "trackb"


def test_status_tells_each_part_done_running_with_progress_failed_with_cause_or_pending(
        tmp_path):
    out = open_store(str(tmp_path / "generate"))
    part_store(out, 0, 4).put_text("manifest.json", "{}")
    part_store(out, 1, 4).put_text("progress.json", json.dumps(
        {"done": 10, "total": 40, "started": 100.0, "updated": 110.0}))
    job = {"spec": {"template": {"spec": {"containers": [{
               "name": jobspec.MAIN_CONTAINER,
               "env": [{"name": jobspec.PARTITIONS_ENV, "value": "1,2,3"}]}]}}},
           "status": {"failedIndexes": "1"}}

    def pod(index: int, phase: str, **terminated) -> dict:
        state = {"terminated": terminated} if terminated else {"running": {}}
        return {"metadata": {"name": f"p{index}", "annotations": {
                    jobspec.COMPLETION_INDEX_ANNOTATION: str(index)}},
                "status": {"phase": phase, "containerStatuses": [
                    {"name": jobspec.MAIN_CONTAINER, "restartCount": 0, "state": state}]}}

    pods = [pod(0, "Running"),
            pod(1, "Failed", exitCode=1, reason="Error", message="trace\ntrackb: gone")]
    states = [s["state"] for s in partition_states(4, out, job, pods)]
    assert states == ["done", "running: 10/40 items, 1.0/s, ETA 30s",
                      "failed: Error (exit 1) in pod p1: trackb: gone", "pending"]
    assert [s["state"] for s in partition_states(2, None, None, [])] == ["unknown"] * 2
