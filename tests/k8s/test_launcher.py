"""The Kubernetes backend end to end against an API emulator over HTTP.

The launcher uses the official client against kmock's KubernetesEmulator; the fake
controller (conftest.py) plays the Job controller and runs extract, generate and
build-dataset for real into an S3 store (moto), the heavy stages as fake-but-valid
results. Every launch runs in a thread guarded against hangs, so a hang fails the test
instead of stalling the suite; no assertion depends on the machine's speed.
"""

from __future__ import annotations

import json

import pytest
import yaml
from k8s_launch import HANG_GUARD, launch_within, wait_until, write_kubeconfig

from trackb_core.config import build_config
from trackb_core.k8s.launcher import LauncherConfig, StageFailed, delete, logs, status
from trackb_core.pipeline import PipelineConfig, steps_for
from trackb_core.store import open_store

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

NAMESPACE = "trackb-test"
# Short budgets: a fault reaches the user once its budget has passed.
BUDGETS = LauncherConfig(poll_seconds=0.2, image_pull_seconds=1.5, unschedulable_seconds=1.5,
                         replace_seconds=10)
# Longer than any launch here could take, however loaded the machine: waiting for a
# budget this long means the launcher did not fail at once.
PATIENT = 10 * HANG_GUARD


def pipeline(corpus, bucket: str, run_id: str) -> PipelineConfig:
    return build_config(PipelineConfig, {
        "run_id": run_id, "store": f"s3://{bucket}/trackb", "corpus": str(corpus),
        "model": "tiny", "backend": "k8s", "extract": {"max_functions": 30},
        "kubernetes": {"namespace": NAMESPACE},
    })


def launch(config, run_id, client, budgets=BUDGETS):
    """``(report URI or exception, seconds)``, guarded against hangs."""
    return launch_within(HANG_GUARD, config, run_id, client, budgets)


def run_store(bucket: str, run_id: str):
    return open_store(f"s3://{bucket}/trackb/runs/{run_id}")


def order_ok(started: list[str]) -> None:
    pos = {stage: started.index(stage) for stage in started}
    assert pos["extract"] < pos["generate"] < pos["build-dataset"]
    for stage in ("train", "predict-baseline"):
        assert pos[stage] > max(pos["build-dataset"], pos["tiny-model"])
    assert pos["predict-post"] > pos["train"]
    assert pos["eval-baseline"] > pos["predict-baseline"]
    assert pos["eval-post"] > pos["predict-post"]
    assert pos["compare"] > max(pos["eval-post"], pos["eval-baseline"])


def test_happy_path_runs_every_stage_in_order_and_a_rerun_is_all_cached(
        emulator, controller, bucket, stdlib_corpus, capsys):
    config = pipeline(stdlib_corpus, bucket, "happy")
    with controller(config, "happy") as ctl:
        report, _ = launch(config, "happy", emulator.client())
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(report, str), report
        store = run_store(bucket, "happy")
        assert report == store.child("compare").child("report.md").uri
        assert store.child("compare").get_text("report.md") == "fake compare result\n"
        assert sorted(ctl.started) == sorted(row.folder for row in steps_for(config))
        order_ok(ctl.started)
        # Real stage outputs passed through the store, and every stage's logs and
        # termination state were copied next to its outputs.
        assert store.child("build-dataset").get_text("train.jsonl").strip()
        for stage in ctl.started:
            saved = store.child(stage).child("_k8s")
            assert any(key.endswith(".stage.log") for key in saved.list()), stage
            assert json.loads(saved.get_text("status.json"))["cause"] is None
        err = capsys.readouterr().err
        assert "[build-dataset] [build-dataset] wrote manifest.json" in err  # streamed log
        assert "[compare] done in" in err

        # Same run id again: every manifest verifies, no Job is created.
        before = list(ctl.started)
        report2, _ = launch(config, "happy", emulator.client())
        assert report2 == report
        assert ctl.started == before
        assert capsys.readouterr().err.count("cached:") == len(steps_for(config))

        # Everything the launcher called over HTTP is granted by RBAC_RULES (the Role).
        from trackb_core.k8s.client import OUTSIDE_ROLE, RBAC_RULES

        calls = emulator.calls()
        assert {("batch", "jobs", "create"), ("batch", "jobs", "watch"),
                ("", "pods", "list"), ("", "pods/log", "get")} <= calls
        for group, resource, verb in calls:
            assert verb in {**RBAC_RULES, **OUTSIDE_ROLE}.get((group, resource), ()), \
            (group, resource, verb)

        rows = {row["stage"]: row for row in status(config, "happy", api=emulator.client())}
        assert rows["compare"] == {"stage": "compare", "store": "done", "job": "complete"}
        assert "wrote manifest.json" in logs(config, "happy", "extract", api=emulator.client())
        gone = delete(config, "happy", api=emulator.client())
        assert "Job/trackb-happy-extract" in gone
        assert any(name.startswith("ConfigMap/") for name in gone)
        # With the pods gone (the controller collects them), logs come from the store.
        client = emulator.client()
        wait_until(lambda: not client.list_pods(NAMESPACE, {"trackb/run-id": "happy"}),
                   "the deleted Jobs' pods are collected")
        assert "(saved)" in logs(config, "happy", "extract", api=emulator.client())


def _fault(emulator, controller, bucket, corpus, run_id, behaviour, budgets=BUDGETS):
    config = pipeline(corpus, bucket, run_id)
    with controller(config, run_id, behaviour=behaviour, fake=lambda stage: True) as ctl:
        error, seconds = launch(config, run_id, emulator.client(), budgets)
    assert not ctl.errors, ctl.errors[0]
    assert isinstance(error, StageFailed), error
    message = str(error)
    assert "\n" not in message, "the cause must reach the user as one line"
    return config, ctl, message, seconds


def test_image_pull_backoff_fails_after_its_budget(emulator, controller, bucket, stdlib_corpus):
    config, ctl, message, seconds = _fault(
        emulator, controller, bucket, stdlib_corpus, "pull", {"extract": "image-pull"})
    assert message.startswith("extract: pod trackb-pull-extract-")
    assert "ImagePullBackOff" in message and "for over 2s" in message
    assert seconds >= BUDGETS.image_pull_seconds  # not before its budget ran out
    assert "generate" not in ctl.started
    # The stuck Job was deleted; why it was stuck is in the store.
    jobs, _ = emulator.client().list_jobs(NAMESPACE, {"trackb/stage": "extract"})
    assert jobs == []
    saved = json.loads(run_store(bucket, "pull").child("extract/_k8s").get_text("status.json"))
    assert "ImagePullBackOff" in saved["cause"]


@pytest.mark.parametrize("behaviour, cause", [
    ("invalid-image", 'InvalidImageName: couldn\'t parse image name "x::y"'),
    ("missing-secret", 'CreateContainerConfigError: secret "trackb-s3" not found'),
])
def test_permanent_causes_fail_at_once_not_after_the_budget(
        emulator, controller, bucket, stdlib_corpus, behaviour, cause):
    # The pull budget is longer than the hang guard: a launch that waited for it fails.
    patient = BUDGETS.model_copy(update={"image_pull_seconds": PATIENT})
    _, _, message, _ = _fault(emulator, controller, bucket, stdlib_corpus, behaviour,
                              {"extract": behaviour}, patient)
    assert message.startswith("extract: pod trackb-")
    assert message.endswith(f"cannot start: container stage: {cause}")


def test_unschedulable_reports_the_schedulers_message(emulator, controller, bucket, stdlib_corpus, capsys):
    _, ctl, message, seconds = _fault(
        emulator, controller, bucket, stdlib_corpus, "nogpu", {"train": "unschedulable"})
    assert seconds >= BUDGETS.unschedulable_seconds  # not before its budget ran out
    assert message.startswith("train: pod ")
    assert "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in message
    assert "eval-post" not in ctl.started and "compare" not in ctl.started
    # The user hears why at once, before the budget runs out.
    assert "[train] pod trackb-nogpu-train-" in capsys.readouterr().err


def test_oomkilled_is_reported_by_name_and_stops_the_chain(emulator, controller, bucket, stdlib_corpus):
    _, ctl, message, _ = _fault(emulator, controller, bucket, stdlib_corpus, "oom",
                                       {"train": "oom"})
    assert message.startswith("train: OOMKilled (exit 137) in container stage")
    assert "BackoffLimitExceeded" in message
    assert "eval-post" not in ctl.started and "compare" not in ctl.started
    log = run_store(bucket, "oom").child("train/_k8s")
    assert any(key.endswith(".log") for key in log.list())
    assert "OOMKilled" in json.loads(log.get_text("status.json"))["cause"]


def test_evicted_is_reported_by_name(emulator, controller, bucket, stdlib_corpus):
    _, ctl, message, _ = _fault(emulator, controller, bucket, stdlib_corpus, "evict",
                                {"generate": "evicted"})
    assert message.startswith("generate: Evicted: The node was low on resource: memory.")
    assert "build-dataset" not in ctl.started


def test_ctrl_c_at_a_terminal_deletes_the_active_jobs_and_exits_130(emulator, controller, bucket,
                                                     stdlib_corpus):
    from trackb_core.k8s.launcher import Interrupted

    config = pipeline(stdlib_corpus, bucket, "ctrlc")
    client = emulator.client()
    list_jobs, watch = client.list_jobs, client.watch_jobs
    seen = {"tiny-model done": False}

    def note(job):
        conditions = job.get("status", {}).get("conditions", [])
        if job["metadata"]["labels"]["trackb/stage"] == "tiny-model" and any(
                c["type"] == "Complete" and c["status"] == "True" for c in conditions):
            seen["tiny-model done"] = True

    def listing(*args, **kwargs):
        jobs, version = list_jobs(*args, **kwargs)
        for job in jobs:
            note(job)
        return jobs, version

    def interrupted_watch(*args, **kwargs):
        # Ctrl-C while waiting, once the launcher has seen tiny-model finish and is
        # waiting again (extract stays stuck pulling its image): an event, not a clock.
        if seen["tiny-model done"]:
            raise KeyboardInterrupt
        for kind, job in watch(*args, **kwargs):
            note(job)
            yield kind, job

    client.list_jobs, client.watch_jobs = listing, interrupted_watch
    with controller(config, "ctrlc", behaviour={"extract": "image-pull"}, fake=lambda s: True):
        error, _ = launch_within(HANG_GUARD, config, "ctrlc", client,
                                 BUDGETS.model_copy(update={"image_pull_seconds": PATIENT}),
                                 cancel_on_interrupt=True)
    assert isinstance(error, Interrupted) and error.exit_code == 130
    assert "trackb-ctrlc-extract" in str(error)
    # The active Job is gone; finished ones (tiny-model) stay for their TTL.
    jobs, _ = emulator.client().list_jobs(NAMESPACE, {"trackb/run-id": "ctrlc"})
    assert [j["metadata"]["labels"]["trackb/stage"] for j in jobs] == ["tiny-model"]


def test_failed_stage_stops_the_run_via_cli_and_a_rerun_resumes_there(
        emulator, controller, bucket, stdlib_corpus, tmp_path, monkeypatch):
    """Through ``trackb run-all --backend k8s`` with a kubeconfig, as a user runs it."""
    from click.testing import CliRunner

    from trackb_core.cli import main

    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    config = pipeline(stdlib_corpus, bucket, "resume")
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    args = ["run-all", "--config", str(config_file), "--backend", "k8s", "--run-id", "resume"]

    with controller(config, "resume", behaviour={"build-dataset": "fail"}) as ctl:
        result = CliRunner().invoke(main, args)
    assert not ctl.errors, ctl.errors[0]
    # 80: the launcher Job's podFailurePolicy fails at once instead of rerunning the stage.
    assert result.exit_code == 80, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("trackb: error")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith("trackb: error: build-dataset: Error (exit 65) in container "
                                "stage: trackb: no usable rows in responses.jsonl; job "
                                "PodFailurePolicy: "), errors[0]
    assert not {"train", "eval-baseline", "eval-post", "compare"} & set(ctl.started)

    result = CliRunner().invoke(main, ["status", "resume", "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert "extract        done      complete" in result.output
    assert "build-dataset  not done  failed (PodFailurePolicy)" in result.output

    with controller(config, "resume") as ctl:
        result = CliRunner().invoke(main, args)
    assert not ctl.errors, ctl.errors[0]
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("compare/report.md")
    # extract and generate were done: the rerun starts at the failed stage (the failed
    # Job left over from the first attempt is replaced).
    assert "extract" not in ctl.started and "generate" not in ctl.started
    assert ctl.started[0] in ("build-dataset", "tiny-model")
    assert "build-dataset" in ctl.started and "compare" in ctl.started


def test_watch_relists_after_410_gone():
    """A 410 from the watch (history compacted) makes the launcher list again."""
    from trackb_core.k8s.client import WatchExpired
    from trackb_core.k8s.launcher import _Active, _Run, _wait_for_finish

    running = {"metadata": {"name": "job-a", "resourceVersion": "3"}, "status": {"active": 1}}
    done = {"metadata": {"name": "job-a", "resourceVersion": "7"},
            "status": {"conditions": [{"type": "Complete", "status": "True"}]}}

    class Stub:
        lists = 0
        watched_from: list[str] = []

        def list_jobs(self, namespace, selector):
            self.lists += 1
            return ([done] if self.lists > 1 else [running]), str(self.lists)

        def list_pods(self, namespace, selector):
            return []

        def object_events(self, namespace, kind, name):
            return []  # a Job without pods: the launcher reads why (FailedCreate)

        def watch_jobs(self, namespace, selector, version, timeout):
            self.watched_from.append(version)
            raise WatchExpired("too old resource version")
            yield  # pragma: no cover

    stub = Stub()
    run = _Run(config=None, run_id="r", client=stub, budgets=BUDGETS, store=None,
               namespace="ns")
    run.active["a"] = _Active("a", "job-a", [])
    assert _wait_for_finish(run) == [("a", None)]
    assert stub.watched_from == ["1"] and stub.lists == 2


def test_connect_without_any_cluster_is_a_config_error(tmp_path, monkeypatch):
    from trackb_core.errors import ConfigError
    from trackb_core.k8s.client import connect

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="kubeconfig: .*in-cluster: "):
        connect()


def test_a_job_deleted_between_two_rounds_is_reported_not_waited_for():
    """A Job gone from the list (deleted while no watch was open) ends its stage."""
    from trackb_core.k8s.launcher import _Active, _Run, _wait_for_finish

    class Stub:
        def list_jobs(self, namespace, selector):
            return [], "5"

        def list_pods(self, namespace, selector):
            return []

        def watch_jobs(self, namespace, selector, version, timeout):  # pragma: no cover
            raise AssertionError("no watch needed: the list already tells")

    run = _Run(config=None, run_id="r", client=Stub(), budgets=BUDGETS, store=None,
               namespace="ns")
    run.active["a"] = _Active("a", "job-a", [])
    ((stage, cause),) = _wait_for_finish(run)
    assert stage == "a" and "deleted while running" in cause
