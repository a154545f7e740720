"""The adversarial suite (tests/sandbox_attacks.py) in host mode and in pod mode.

Pod mode is what a stage pod gets: no user namespaces and no capabilities, under the
runtime's default seccomp profile. It is simulated as the field notes say: a user
namespace whose limit of further user namespaces is 0, then ``setpriv`` dropping every
capability and setting no-new-privs. Every attack runs in a subprocess (the harness):
one that killed its parent shows as a missing record, not as a dead test run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("sandbox_attacks.py")
POD_WRAPPER = ("echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv "
               "--bounding-set=-all --inh-caps=-all --no-new-privs \"$@\"")


def pod_mode_available() -> str | None:
    """Why pod mode cannot be simulated here, or None."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return "unshare and setpriv (util-linux) are not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", POD_WRAPPER,
                            "sh", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot simulate a pod here: {probe.stderr.strip()[:200]}"
    return None


def run_harness(tmp_path: Path, mode: str, *extra: str) -> list[dict]:
    out = tmp_path / f"{mode}.json"
    command = [sys.executable, str(HARNESS), str(out), *extra]
    if mode == "pod":
        command = ["unshare", "--user", "--map-root-user", "sh", "-c", POD_WRAPPER, "sh",
                   *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=["host", "pod"])
def records(request, tmp_path_factory):
    if request.param == "pod" and (why := pod_mode_available()):
        pytest.skip(why)
    return request.param, run_harness(tmp_path_factory.mktemp(request.param), request.param)


def test_every_attack_fails_with_its_evidence_checked(records):
    mode, found = records
    attacks = [r for r in found if not r["attack"].startswith("(")]
    assert len(attacks) >= 30
    failed = {r["attack"]: r["problems"] for r in found if r["problems"]}
    assert not failed, f"{mode} mode: {json.dumps(failed, indent=1)}"
    assert found[-1]["attack"] == "(parent alive)"  # the harness outlived every attack


def test_the_isolation_reached_is_the_minimum_and_recorded(records):
    mode, found = records
    levels = {json.dumps(r["isolation"], sort_keys=True) for r in found
              if isinstance(r.get("isolation"), dict)}
    assert len(levels) == 1, levels  # every run got the same walls
    isolation = json.loads(levels.pop())
    assert isolation["seccomp"] and isolation["meets_minimum"]
    if isolation["landlock_offered"]:
        assert isolation["landlock"] == isolation["landlock_offered"]
    if mode == "pod":
        assert not isolation["netns"]  # no user namespaces in a pod


def test_the_evidence_checks_see_attacks_that_work_without_a_sandbox(tmp_path):
    """The control: the same attacks in a plain child process leave their evidence."""
    found = run_harness(tmp_path, "control", "--control")
    unseen = [r["attack"] for r in found if not r["problems"]]
    assert not unseen, f"these checks saw nothing of a working attack: {unseen}"
