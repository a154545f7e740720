"""A launcher that never loses GPU hours, against the API emulator over HTTP.

API faults (resets, 429s, 500s, cut watches) injected by a proxy between the launcher
and the emulator; a launcher process killed mid-train (SIGTERM, SIGKILL) and a new one
that adopts the running Job; two launchers of one run id; Ctrl-C without a terminal.
The train stage's pod runs until the test releases it (behaviour ``hold``), so "mid
train" is a state, not a moment. No assertion depends on the machine's speed: tests
wait on conditions, under the hang guard.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from fault_proxy import FaultProxy
from k8s_launch import HANG_GUARD, launch_within, wait_until, write_kubeconfig
from test_launcher import BUDGETS, NAMESPACE, pipeline

from trackb_core.k8s.launcher import Detached
from trackb_core.pipeline import steps_for

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

ROOT = Path(__file__).resolve().parents[2]
LEASE = 2  # seconds: a dead launcher's lease expires this long after its last renewal
RESILIENT = BUDGETS.model_copy(update={"lease_seconds": LEASE})
PATIENT_LEASE = BUDGETS.model_copy(update={"lease_seconds": int(HANG_GUARD)})


def jobs_by_stage(client, run_id: str) -> dict[str, dict]:
    jobs, _ = client.list_jobs(NAMESPACE, {"trackb/run-id": run_id})
    return {j["metadata"]["labels"]["trackb/stage"]: j for j in jobs}


class Recording:
    """Wraps a client: counts Lease reads, records Job creates/deletes, and tells when a
    live Job of ``watch_stage`` was read (the adoption check)."""

    def __init__(self, client, run_id: str, watch_stage: str = "train"):
        self.client = client
        self.lease_reads = 0
        self.job_writes: list[tuple[str, str]] = []
        self.read_live = threading.Event()
        get, create, delete = client.get, client.create, client.delete
        target = f"trackb-{run_id}-{watch_stage}"

        def recording_get(kind, namespace, name):
            found = get(kind, namespace, name)
            if kind == "Lease":
                self.lease_reads += 1
            if kind == "Job" and name == target and found is not None \
                    and not (found.get("status") or {}).get("conditions"):
                self.read_live.set()
            return found

        def recording_create(obj):
            if obj["kind"] == "Job":
                self.job_writes.append(("create", obj["metadata"]["name"]))
            return create(obj)

        def recording_delete(kind, namespace, name):
            if kind == "Job":
                self.job_writes.append(("delete", name))
            return delete(kind, namespace, name)

        client.get, client.create, client.delete = recording_get, recording_create, \
            recording_delete


def test_resets_429s_and_500s_during_watches_and_lists_leave_every_job_running(
        emulator, controller, bucket, stdlib_corpus):
    proxy = FaultProxy(emulator.url)
    try:
        config = pipeline(stdlib_corpus, bucket, "flaky")
        client = proxy.client()
        client.retry.first_wait = 0.05  # the backoff's shape is tested below, not here
        with controller(config, "flaky", fake=lambda stage: True) as ctl:
            report, _ = launch_within(HANG_GUARD, config, "flaky", client, BUDGETS)
        assert not ctl.errors, ctl.errors[0]
        assert isinstance(report, str), report
        # Every stage ran once: no Job was deleted or recreated because of a fault.
        assert sorted(ctl.started) == sorted(row.folder for row in steps_for(config))
        assert ("batch", "jobs", "delete") not in emulator.calls()
        assert {"500", "429", "reset", "cut", "503"} <= set(proxy.faults), proxy.faults
        assert client.retry.retried > 0
    finally:
        proxy.close()


def test_retries_back_off_with_jitter_honour_retry_after_and_give_up_after_the_budget():
    from trackb_core.k8s.client import RetryPolicy

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

        def sleep(self, seconds):
            waits.append(seconds)
            self.now += seconds

    waits: list[float] = []
    clock = Clock()
    policy = RetryPolicy(seconds=60, first_wait=1, longest_wait=16, clock=clock,
                         sleep=clock.sleep)
    attempt = 0
    while policy.wait(attempt, 0.0, None):
        attempt += 1
    assert clock.now <= 60 and attempt == len(waits) > 4
    for n, wait in enumerate(waits):
        assert 0 <= wait <= min(16, 2 ** n)  # full jitter under a growing ceiling
    assert len(set(waits)) > 1
    policy = RetryPolicy(seconds=60, first_wait=0.001, clock=clock, sleep=clock.sleep)
    waits.clear()
    assert policy.wait(0, clock.now, retry_after=7.0) and waits == [7.0]


# -- launcher processes that die mid-train ------------------------------------------------
def _launcher_process(tmp_path, emulator, config, run_id: str) -> subprocess.Popen:
    """``python -m jobs.run_all --backend k8s`` as the in-cluster launcher runs it: no
    terminal, the cluster from a kubeconfig."""
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    config_file = tmp_path / f"{run_id}.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.run_all", "--config", str(config_file),
         "--backend", "k8s", "--run-id", run_id],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_launcher_killed_mid_train_deletes_nothing_and_a_new_one_adopts_the_job(
        emulator, controller, bucket, stdlib_corpus, tmp_path, capsys, sig):
    run_id = f"kill-{sig.name.lower()}"
    config = pipeline(stdlib_corpus, bucket, run_id)
    k8s = config.kubernetes
    config = config.model_copy(update={"kubernetes": k8s.model_copy(
        update={"budgets": RESILIENT})})
    with controller(config, run_id, behaviour={"train": "hold"},
                    fake=lambda stage: True) as ctl:
        process = _launcher_process(tmp_path, emulator, config, run_id)
        try:
            wait_until(lambda: "train" in ctl.holding or process.poll() is not None,
                       "train is running")
            assert process.poll() is None, process.communicate()
            before = jobs_by_stage(emulator.client(), run_id)
            os.kill(process.pid, sig)
            _, err = process.communicate(timeout=HANG_GUARD)
        finally:
            if process.poll() is None:
                process.kill()
        if sig == signal.SIGTERM:
            assert process.returncode == 143, err
            assert "deleted nothing" in err and f"trackb-{run_id}-train" in err, err
        else:
            assert process.returncode == -signal.SIGKILL
        # Nothing was deleted: every Job is there, with the same uid.
        after = jobs_by_stage(emulator.client(), run_id)
        assert {s: j["metadata"]["uid"] for s, j in after.items()} == \
            {s: j["metadata"]["uid"] for s, j in before.items()}
        train_uid = after["train"]["metadata"]["uid"]

        # A new launcher (the launcher Job's next pod) adopts the running train Job.
        client = Recording(emulator.client(), run_id)
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(value=launch_within(
            HANG_GUARD, config, run_id, client.client, RESILIENT)[0]), daemon=True)
        thread.start()
        wait_until(client.read_live.is_set, "the new launcher looked at the train Job")
        ctl.release.set()
        thread.join(HANG_GUARD)
    assert not ctl.errors, ctl.errors[0]
    assert isinstance(outcome["value"], str), outcome["value"]
    assert ctl.started.count("train") == 1
    assert ("create", f"trackb-{run_id}-train") not in client.job_writes
    assert not [w for w in client.job_writes if w[0] == "delete"]
    assert jobs_by_stage(emulator.client(), run_id)["train"]["metadata"]["uid"] == train_uid
    err = capsys.readouterr().err
    assert f"adopted the running Job trackb-{run_id}-train (uid {train_uid})" in err
    if sig == signal.SIGKILL:  # its lease was never given up: the new one waited for it
        assert "waiting until it ends or stops renewing" in err
        assert "is gone; taking over" in err


def test_a_second_launcher_of_the_same_run_waits_on_the_lease_and_touches_nothing(
        emulator, controller, bucket, stdlib_corpus, capsys):
    config = pipeline(stdlib_corpus, bucket, "twice")
    with controller(config, "twice", behaviour={"train": "hold"},
                    fake=lambda stage: True) as ctl:
        outcomes: dict[str, object] = {}

        def launch(name, client):
            # A lease far longer than the test: however slow the machine, the first
            # launcher's renewals keep it, and the second takes over only when the
            # first gives it up on exit.
            outcomes[name] = launch_within(HANG_GUARD, config, "twice", client, PATIENT_LEASE)[0]

        first = threading.Thread(target=launch, args=("first", emulator.client()))
        first.start()
        wait_until(lambda: "train" in ctl.holding, "train is running")
        second_client = Recording(emulator.client(), "twice")
        second = threading.Thread(target=launch, args=("second", second_client.client))
        second.start()
        # The second launcher keeps looking at the lease (the first renews it) ...
        wait_until(lambda: second_client.lease_reads >= 3, "the second launcher waits")
        assert second_client.job_writes == []  # ... and touches no Job meanwhile
        ctl.release.set()
        first.join(HANG_GUARD)
        second.join(HANG_GUARD)
    assert not ctl.errors, ctl.errors[0]
    assert isinstance(outcomes["first"], str), outcomes["first"]
    # Once the first gave the lease up, the second found every stage done.
    assert outcomes["second"] == outcomes["first"]
    assert second_client.job_writes == []
    assert sorted(ctl.started) == sorted(row.folder for row in steps_for(config))
    assert "is driven by launcher" in capsys.readouterr().err


def test_ctrl_c_without_a_terminal_deletes_nothing(emulator, controller, bucket,
                                                   stdlib_corpus):
    config = pipeline(stdlib_corpus, bucket, "nocancel")
    client = emulator.client()
    watch = client.watch_jobs

    def interrupted_watch(*args, **kwargs):
        if "train" in ctl.holding:
            raise KeyboardInterrupt  # as a SIGINT reaching a pod's PID 1 would
        yield from watch(*args, **kwargs)

    client.watch_jobs = interrupted_watch
    with controller(config, "nocancel", behaviour={"train": "hold"},
                    fake=lambda stage: True) as ctl:
        error, _ = launch_within(HANG_GUARD, config, "nocancel", client, RESILIENT)
        assert isinstance(error, Detached) and error.exit_code == 130, error
        running = jobs_by_stage(emulator.client(), "nocancel")
        assert "train" in running and not running["train"]["status"].get("conditions")
        ctl.release.set()
    assert "deleted nothing" in str(error)


def test_the_trackb_commands_in_the_charts_notes_run_as_printed(
        emulator, controller, bucket, stdlib_corpus, tmp_path, monkeypatch):
    """NOTES.txt prints `trackb status/logs/delete RUN -n NS`, no --config: they find the
    run's pipeline on its Lease."""
    from click.testing import CliRunner

    from helm import CHART, run_helm
    from trackb_core.cli import main

    rendered = run_helm("install", "demo", str(CHART), "--namespace", NAMESPACE,
                        "--dry-run=client", "--set", "launcher.runId=notes", "--values",
                        str(CHART / "ci" / "default-values.yaml"))
    assert rendered.returncode == 0, rendered.stderr
    notes = rendered.stdout.split("NOTES:", 1)[1]
    commands = [line.split() for line in notes.splitlines()
                if line.startswith("     trackb ")]  # the indented command lines
    assert {c[1] for c in commands} == {"status", "logs", "delete"}, commands

    config = pipeline(stdlib_corpus, bucket, "notes")
    with controller(config, "notes", fake=lambda stage: True) as ctl:
        report, _ = launch_within(HANG_GUARD, config, "notes", emulator.client(), BUDGETS)
    assert not ctl.errors and isinstance(report, str), report
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    outputs = {}
    for command in sorted(commands, key=lambda c: c[1] == "delete"):  # delete last
        result = CliRunner().invoke(main, command[1:])
        assert result.exit_code == 0, (command, result.output)
        outputs[command[1]] = result.output
    assert "compare        done      complete" in outputs["status"]
    assert "[train] running" in outputs["logs"]
    assert "deleted Lease/trackb-notes-lease" in outputs["delete"]
