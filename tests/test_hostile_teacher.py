"""build-dataset over a teacher whose unit tests are all hostile, in host and pod mode.

The stage must exit 0, keep none of the hostile tests, and lose no benign row: the same
responses without the hostile rows keep exactly the same benign rows. Each hostile test
tries something a wrong-but-passing test would need (forging a report, reading the
corpus copy, exiting early) or something that harms the host (killing the worker that
checks it, forking, writing outside, reading the process' secrets, the network).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_sandbox_attacks import POD_WRAPPER, pod_mode_available

from trackb_core.extract import ExtractConfig
from trackb_core.extract import run as extract
from trackb_core.generate import GenerateConfig
from trackb_core.generate import run as generate
from trackb_core.store import LocalStore

CANARY = "canary-9f2c41d7a0b3e6"
ROOT = Path(__file__).parents[1]

MODULE = '''"""Small functions with one comparison each: every one has a mutant."""


def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value


def is_even(number):
    """Whether number is even."""
    if number % 2 == 0:
        return True
    return False


def first_positive(values):
    """The first value above zero, or None."""
    for value in values:
        if value > 0:
            return value
    return None


def count_at_least(values, floor):
    """How many values are at least floor."""
    total = 0
    for value in values:
        if value >= floor:
            total += 1
    return total


def is_blank(text):
    """Whether text holds only whitespace."""
    if text.strip() == "":
        return True
    return False


def sign(number):
    """-1, 0 or 1."""
    if number < 0:
        return -1
    if number == 0:
        return 0
    return 1


def longest(words):
    """The longest word (the first of equals)."""
    best = ""
    for word in words:
        if len(word) > len(best):
            best = word
    return best


def within(value, low, high):
    """Whether low <= value <= high."""
    if value < low:
        return False
    if value > high:
        return False
    return True
'''

BENIGN = '''from shop.maths import clamp

def test_clamp():
    assert clamp(5, 0, 10) == 5
    assert clamp(-1, 0, 10) == 0
    assert clamp(0, 0, 10) == 0
    assert clamp(11, 0, 10) == 10
    assert clamp(10, 0, 10) == 10
'''


def hostile_tests(outside: Path, port: int, corpus_copy: str) -> dict[str, str]:
    """function name -> a hostile test file for it."""
    head = "import os, sys, json\nfrom shop.maths import {name}\n\ndef test_{name}():\n"
    bodies = {
        "is_even": "    os.kill(os.getppid(), 9)\n    assert is_even(2)\n",
        "first_positive": (
            "    fd = sys.modules['__main__'].REPORT_FD\n"
            "    os.write(fd, (json.dumps({'stage': 'ran', 'results': [['test_first_positive', "
            "'passed', '']], 'skipped': []}) + '\\n').encode())\n"
            "    os._exit(0)\n    assert first_positive([1]) == 1\n"),
        "count_at_least": (
            f"    here = open(sys.modules['shop.maths'].__file__).read()\n"
            f"    assert here == open({corpus_copy!r}).read()\n"),
        "is_blank": "    while True:\n        os.fork()\n    assert is_blank(' ')\n",
        "sign": (f"    open({str(outside / 'pwned')!r}, 'w').write(os.environ.get('TRACKB_CANARY', "
                 "''))\n    assert sign(1) == 1\n"),
        "longest": (
            "    import socket\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
            "    assert longest(['a']) == 'a'\n"),
        "within": (
            "    print(open(f'/proc/{os.getppid()}/environ').read())\n"
            "    assert within(1, 0, 2)\n"),
    }
    return {name: head.format(name=name) + body for name, body in bodies.items()}


@pytest.fixture(scope="module")
def responses(tmp_path_factory):
    """The reference teacher's rows plus unit_test rows: one benign, the rest hostile."""
    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus"
    (corpus / "shop").mkdir(parents=True)
    (corpus / "shop" / "__init__.py").write_text("")
    (corpus / "shop" / "maths.py").write_text(MODULE)
    store = LocalStore(root / "run")
    # no derived tests: every unit_test row here is the hostile or the benign teacher's
    extract(ExtractConfig(corpus=str(corpus), derive_tests=False), store.child("extract"))
    generate(GenerateConfig(tasks=store.child("extract").uri), store.child("generate"))
    tasks = {json.loads(line)["id"]: json.loads(line)
             for line in (root / "run" / "extract" / "tasks.jsonl").open()}
    rows = [json.loads(line) for line in (root / "run" / "generate" / "responses.jsonl").open()]
    outside = root / "outside"
    outside.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    hostile = hostile_tests(outside, listener.getsockname()[1], str(corpus / "shop" / "maths.py"))
    unit_rows = []
    for task in tasks.values():
        if task["category"] != "unit_test":
            continue
        name = task["function_name"]
        if name == "clamp":
            test = BENIGN
        elif name in hostile:
            test = hostile[name]
        else:
            continue
        assert task.get("buggy_source"), f"{name} needs a mutant for this test"
        who = "benign" if test is BENIGN else "hostile"
        unit_rows.append({**task, "response": f"```python\n{test}```", "teacher": who,
                          "teacher_model": who, "finish_reason": "stop", "usage": {}})
    assert len(unit_rows) == 1 + len(hostile)
    # The generate stage's manifest makes the corpus snapshot findable upstream.
    folder = root / "run" / "generate"
    all_rows = sorted(rows + unit_rows, key=lambda r: r["id"])
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    benign_only = root / "benign" / "responses.jsonl"
    benign_only.parent.mkdir()
    kept = [r for r in all_rows if r["category"] != "unit_test" or r["teacher"] != "hostile"]
    benign_only.write_text("".join(json.dumps(r) + "\n" for r in kept))
    manifest = json.loads((folder / "manifest.json").read_text())
    (benign_only.parent / "manifest.json").write_text(json.dumps(manifest))
    yield {"root": root, "responses": folder / "responses.jsonl", "benign": benign_only,
           "outside": outside, "listener": listener}
    listener.close()


def build_dataset(responses: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "jobs.build_dataset", "--responses", str(responses),
               "--out", str(out), "--filter-workers", "3", "--sandbox-timeout", "5"]
    if mode == "pod":
        command = ["unshare", "--user", "--map-root-user", "sh", "-c", POD_WRAPPER, "sh",
                   *command]
    env = {**os.environ, "TRACKB_CANARY": CANARY, "AWS_SECRET_ACCESS_KEY": CANARY}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for name in ("train.jsonl", "test.jsonl")
            for line in (folder / name).open()]


@pytest.mark.parametrize("mode", ["host", "pod"])
def test_hostile_unit_tests_are_all_rejected_and_no_benign_row_is_lost(responses, mode,
                                                                        tmp_path):
    if mode == "pod" and (why := pod_mode_available()):
        pytest.skip(why)
    out = tmp_path / "dataset"
    proc = build_dataset(responses["responses"], out, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = rows_of(out)
    assert not [r for r in kept if r.get("teacher") == "hostile"], "a hostile test was kept"
    unit = [r for r in kept if r["category"] == "unit_test"]
    assert [r["function_name"] for r in unit] == ["clamp"]  # the benign one survives
    # The same rows without the hostile ones keep the same benign rows.
    reference = tmp_path / "reference"
    proc = build_dataset(responses["benign"], reference, mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in rows_of(reference))
    # The evidence: nothing outside, nothing at the listener, no secret anywhere.
    assert not any(responses["outside"].iterdir())
    with pytest.raises(OSError):
        responses["listener"].accept()
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_text(errors="replace"), path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sandbox"]["used"] and manifest["sandbox"]["meets_minimum"]
    rejected = manifest["counts"]["rejected"]
    assert sum(v for k, v in rejected.items() if k.startswith("strict:unit_test")) == 7
    card = (out / "README.md").read_text()
    assert f"isolation level **{manifest['sandbox']['level']}**" in card
