"""Tests for the generate stage (trackb_core.generate).

The openai teacher runs against tests/fault_server.py (faults on purpose), against a
killed-and-resumed ``python -m jobs.generate`` process, and against a real
``transformers serve`` with a tiny local model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_server import FaultServer
from test_teacher import REAL_FUNCTIONS, make_tasks

from trackb_core import families, openai_teacher
from trackb_core.config import build_config
from trackb_core.errors import ConfigError, InputError, MissingInputError, UnavailableError
from trackb_core.generate import GenerateConfig, ResponseCache, cache_key, run
from trackb_core.openai_teacher import OpenAITeacher
from trackb_core.store import LocalStore, open_store

ROOT = Path(__file__).resolve().parent.parent


def write_tasks(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return str(path.parent)  # the upstream folder, as the pipeline passes it


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_generate_writes_sorted_responses_and_counts(tmp_path):
    tasks = make_tasks(REAL_FUNCTIONS)
    random.Random(0).shuffle(tasks)
    folder = write_tasks(tmp_path / "extract" / "tasks.jsonl", tasks)
    out = tmp_path / "generate"
    manifest = run(GenerateConfig(tasks=folder), LocalStore(out))

    rows = read_jsonl(out / "responses.jsonl")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert {r["category"] for r in rows} == {"docstring", "explain", "bugfix", "complete"}
    by_id = {t["id"]: t for t in tasks}
    for row in rows:
        assert row["teacher"] == "reference" and row["finish_reason"] == "stop"
        assert row["response"]
        # every task field is carried through unchanged
        assert {k: row[k] for k in by_id[row["id"]]} == by_id[row["id"]]

    counts = manifest["counts"]
    n_unit = sum(t["category"] == "unit_test" for t in tasks)
    n_nodoc = sum(t["category"] == "docstring" and '"""' not in t["source_function"]
                  and "'''" not in t["source_function"] for t in tasks)
    assert counts["tasks"] == len(tasks) and counts["responses"] == len(rows)
    assert counts["skipped"]["no_reference_unit_test"] == n_unit
    assert counts["skipped"].get("no_reference_docstring", 0) == n_nodoc
    assert counts["rejected"] == {}
    assert sum(counts["responses_by_category"].values()) == len(rows)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "generate"
    assert not (out / "cache").exists()  # the reference teacher is free: no cache

    # same tasks in another order -> byte-identical responses
    random.Random(1).shuffle(tasks)
    folder2 = write_tasks(tmp_path / "extract2" / "tasks.jsonl", tasks)
    run(GenerateConfig(tasks=folder2), LocalStore(tmp_path / "generate2"))
    assert (tmp_path / "generate2" / "responses.jsonl").read_bytes() == \
        (out / "responses.jsonl").read_bytes()


def synthetic_tasks(count: int, prefix: str = "syn") -> list[dict]:
    """Task rows with short, distinct instructions (the fault server keys on them)."""
    categories = ("docstring", "explain", "bugfix", "complete", "unit_test")
    return [{"id": f"{prefix}-{i:03d}", "category": categories[i % 5],
             "instruction": f"Task {i} ({categories[i % 5]}): answer for function f{i}.",
             "function_id": f"m.f{i}", "function_name": f"f{i}"} for i in range(count)]


def openai_config(server: FaultServer, folder: str, **overrides) -> GenerateConfig:
    """The openai teacher against ``server``, with test-sized timeouts and token budgets."""
    settings = {"tasks": folder, "teacher": "openai", "base_url": server.base_url,
                "concurrency": 8, "timeout": 1.0, "max_retries": 8, "ready_timeout": 10.0,
                "max_tokens": 16, "max_tokens_cap": 64, **overrides}
    return GenerateConfig(**settings)


def shard_entries(out: Path) -> list[dict]:
    """Complete lines of every cache shard under ``out``."""
    entries = []
    for shard in sorted((out / "cache").glob("shard-*.jsonl")):
        lines = shard.read_text().split("\n")
        entries += [json.loads(line) for line in lines[:-1]]
    return entries


def test_openai_generate_counts_rejections_caches_and_keeps_the_key_out(tmp_path, monkeypatch):
    tasks = make_tasks(REAL_FUNCTIONS[:3], ["complete", "explain", "unit_test"])
    always_long, refused = tasks[0]["instruction"], tasks[1]["instruction"]
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", tasks)
    monkeypatch.setenv("MY_TEACHER_KEY", "k-123")
    with FaultServer(require_key="k-123", script={always_long: ["length"] * 9,
                                                   refused: ["400"]}) as server:
        config = openai_config(server, folder, api_key_env="MY_TEACHER_KEY")
        manifest = run(config, LocalStore(tmp_path / "g"))
        server.reset_counts()
        again = run(config, LocalStore(tmp_path / "g"))
        asked_again = server.requests

    rows = read_jsonl(tmp_path / "g" / "responses.jsonl")
    assert [r["id"] for r in rows] == sorted(t["id"] for t in tasks[2:])
    for row in rows:
        assert row["teacher"] == "openai" and row["teacher_model"] == "fault-teacher"
        assert row["finish_reason"] == "stop" and "candidates" not in row
        assert row["usage"]["total_tokens"] > 0
    counts = manifest["counts"]
    assert counts["rejected"] == {"http_400": 1, "truncated": 1}
    assert counts["truncated_retried"] == 2  # 16 -> 32 -> 64, still truncated: rejected
    assert counts["usage"]["total_tokens"] == sum(r["usage"]["total_tokens"] for r in rows)
    assert counts["usage_spent"]["total_tokens"] > counts["usage"]["total_tokens"]
    assert counts["requested"] == len(tasks) and counts["cached"] == 0
    teacher = manifest["teacher"]
    assert teacher["model"] == "fault-teacher" and teacher["prompt_version"] == "v2"
    assert teacher["prompt_sha256"] == openai_teacher.teacher_prompt_sha256()
    assert teacher["sampling"] == {"temperature": 0.2, "max_tokens": 16, "max_tokens_cap": 64,
                                   "n": 1}
    assert "k-123" not in (tmp_path / "g" / "manifest.json").read_text()
    # the rerun finds every answer, the permanent rejections included, in the cache
    assert asked_again == 0 and again["counts"]["cached"] == len(tasks)
    assert again["counts"]["rejected"] == counts["rejected"]


def test_generate_keeps_n_candidates(tmp_path):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", synthetic_tasks(3))
    with FaultServer() as server:
        run(openai_config(server, folder, n=2, temperature=0.8), LocalStore(tmp_path / "g"))
    for row in read_jsonl(tmp_path / "g" / "responses.jsonl"):
        assert len(row["candidates"]) == 2 and row["response"] == row["candidates"][0]


def test_generate_with_a_fifth_of_requests_faulted_loses_and_duplicates_nothing(tmp_path):
    tasks = synthetic_tasks(150)
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", tasks)
    # Answers need 8..40 tokens and are first asked with 16: many are truncated as well.
    # A "length" fault is a model rambling past any budget; the cap leaves room to ask
    # again a few times (a truncated answer at the cap would be rejected, not kept).
    config = {"concurrency": 16, "max_tokens_cap": 256}
    with FaultServer(fault_rate=0.2, answer_tokens=(8, 40)) as server:
        manifest = run(openai_config(server, folder, **config), LocalStore(tmp_path / "f"))
        faults = dict(server.faults)
        requests = server.requests
    with FaultServer(answer_tokens=(8, 40)) as clean:
        run(openai_config(clean, folder, **config), LocalStore(tmp_path / "clean"))

    assert set(faults) == {"429", "500", "hang", "reset", "length"}
    assert 0.15 < sum(faults.values()) / requests < 0.25
    rows = read_jsonl(tmp_path / "f" / "responses.jsonl")
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == len(tasks)  # none lost, none twice
    for row in rows:  # whole answers only: a truncated one never gets in
        assert row["finish_reason"] == "stop"
        assert row["response"] == server.answer_text(row["instruction"])
    counts = manifest["counts"]
    assert counts["rejected"] == {}
    assert set(counts["retries"]) == {"http_429", "http_5xx", "timeout", "connection"}
    assert counts["truncated_retried"] >= faults["length"]
    # faults change nothing in the output
    assert (tmp_path / "f" / "responses.jsonl").read_bytes() == \
        (tmp_path / "clean" / "responses.jsonl").read_bytes()


def test_killed_generate_resumes_without_asking_again(tmp_path):
    tasks = synthetic_tasks(48)
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", tasks)
    out = tmp_path / "killed"
    # 200 ms per answer, 8 in flight: the whole run takes over a second, time to kill it
    with FaultServer(latency=0.2, fault_rate=0.2) as server:
        config = openai_config(server, folder, concurrency=8)
        command = [sys.executable, "-m", "jobs.generate", "--tasks", folder, "--out", str(out)]
        for name in ("teacher", "base_url", "concurrency", "timeout", "max_retries",
                     "ready_timeout", "max_tokens", "max_tokens_cap"):
            command += ["--" + name.replace("_", "-"), str(getattr(config, name))]
        with open(tmp_path / "killed.log", "wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
            deadline = time.monotonic() + 60
            while len(shard_entries(out) if (out / "cache").is_dir() else []) < 8:
                assert process.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no answers were cached in 60 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait()
        finished = {entry["id"] for entry in shard_entries(out)}
        assert 8 <= len(finished) < len(tasks)
        assert not (out / "manifest.json").exists()

        server.reset_counts()
        manifest = run(config, LocalStore(out))
        asked = {t["id"] for t in tasks if server.hits[t["instruction"]]}
        assert asked == {t["id"] for t in tasks} - finished  # nothing finished is asked again
        assert manifest["counts"]["cached"] == len(finished)

        server.reset_counts()
        run(config, LocalStore(tmp_path / "straight"))
    assert (out / "responses.jsonl").read_bytes() == \
        (tmp_path / "straight" / "responses.jsonl").read_bytes()


def test_response_cache_skips_torn_corrupt_and_stale_lines(tmp_path):
    store = LocalStore(tmp_path)
    cache = ResponseCache(store)
    cache.append({"key": "ka", "id": "a", "status": "ok", "response": "A"})
    cache.append({"key": "old", "id": "b", "status": "ok", "response": "B"})
    cache.close()
    # a shard whose writer was killed: a bad line, then half a line
    torn = {"key": "kd", "id": "d", "status": "ok", "response": "D"}
    (tmp_path / "cache" / "shard-000002.jsonl").write_text(
        json.dumps({"key": "kc", "id": "c", "status": "ok", "response": "C"}) + "\n"
        + "{not json\n" + json.dumps(torn)[:20])

    reader = ResponseCache(store)
    found = reader.load({"a": "ka", "b": "kb", "c": "kc", "d": "kd"})
    assert {k: v["response"] for k, v in found.items()} == {"a": "A", "c": "C"}
    assert dict(reader.stats) == {"shards_read": 2, "torn_lines": 1, "corrupt_lines": 1,
                                  "stale_entries": 1}
    reader.append(torn)  # a new shard: the torn one is never appended to
    reader.close()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == \
        ["shard-000001.jsonl", "shard-000002.jsonl", "shard-000003.jsonl"]
    assert set(ResponseCache(store).load({"d": "kd"})) == {"d"}


def test_cache_key_covers_instruction_model_sampling_and_prompt_template(monkeypatch):
    task = {"id": "m.f-complete", "category": "complete", "instruction": "Complete `f`."}

    def key(task=task, **settings) -> str:
        teacher = OpenAITeacher("http://127.0.0.1:1/v1", **{"model": "m", **settings})
        return cache_key(task, teacher.identity())

    base = key()
    assert key() == base
    variants = [key(model="other"), key(temperature=0.7), key(max_tokens=512),
                key(max_tokens_cap=4096), key(n=2), key({**task, "instruction": "Complete g."}),
                key({**task, "id": "m.g-complete"})]
    monkeypatch.setattr(openai_teacher, "TEACHER_PROMPT_VERSION", "v3")
    variants.append(key())
    monkeypatch.setattr(openai_teacher, "TEACHER_PROMPT_VERSION", "v2")
    monkeypatch.setattr(families.get("complete"), "guidance", "Just the code.")
    variants.append(key())
    assert base not in variants and len(set(variants)) == len(variants)


def test_remote_output_uploads_immutable_shards_and_resumes_from_them(tmp_path, bucket,
                                                                       monkeypatch):
    from trackb_core import generate

    monkeypatch.setattr(generate, "CACHE_ROLL_RESULTS", 4)
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", synthetic_tasks(10))
    out = open_store(f"s3://{bucket}/runs/x/generate")
    with FaultServer() as server:
        run(openai_config(server, folder), out)
        shards = out.list("cache")
        server.reset_counts()
        manifest = run(openai_config(server, folder), out)
        asked_again = server.requests
    assert shards == [f"cache/shard-00000{i}.jsonl" for i in (1, 2, 3)]  # 4 + 4 + 2
    assert asked_again == 0 and manifest["counts"]["cached"] == 10
    assert len(parse_rows(out.get_bytes("responses.jsonl"))) == 10


def parse_rows(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def test_generate_wrong_key_is_config_error_and_leaves_no_manifest(tmp_path, monkeypatch):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", make_tasks(REAL_FUNCTIONS[:1]))
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with FaultServer(require_key="right") as server, \
            pytest.raises(ConfigError, match=r"\$OPENAI_API_KEY"):
        run(GenerateConfig(tasks=folder, teacher="openai", base_url=server.base_url),
            LocalStore(tmp_path / "g"))
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_generate_unreachable_teacher_is_unavailable_after_the_ready_budget(tmp_path,
                                                                          closed_port):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", make_tasks(REAL_FUNCTIONS[:1]))
    config = GenerateConfig(tasks=folder, teacher="openai", ready_timeout=1,
                            base_url=f"http://127.0.0.1:{closed_port}/v1")
    with pytest.raises(UnavailableError, match="unreachable or not ready after 1 s"):
        run(config, LocalStore(tmp_path / "g"))
    assert not (tmp_path / "g" / "manifest.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_generate_against_transformers_serve(tmp_path, tiny_model_dir, closed_port):
    """A real OpenAI-compatible server: ``transformers serve`` with the tiny local model."""
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    # The tiny model is barely trained: greedy, it repeats one token; sampled, its next
    # token is close to uniform, and it hardly ever emits its end-of-sequence token where
    # a real teacher ends its answers. So: sample by default (transformers serve applies
    # the temperature only then), and end at any token holding "." or ")" (about 1 in
    # 12): answers then finish within a few dozen tokens, and a 1-token try is truncated.
    tokenizer = AutoTokenizer.from_pretrained(model)
    enders = [index for token, index in tokenizer.get_vocab().items()
              if any(ch in tokenizer.convert_tokens_to_string([token]) for ch in ".)")]
    generation = json.loads((model / "generation_config.json").read_text())
    eos = generation.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    generation["eos_token_id"] = sorted(set(eos) | set(enders))
    generation["do_sample"] = True
    (model / "generation_config.json").write_text(json.dumps(generation))

    tasks = make_tasks(REAL_FUNCTIONS[:1])
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", tasks)
    serve = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen([str(serve), "serve", str(model), "--host", "127.0.0.1",
                                   "--port", str(closed_port), "--device", "cpu",
                                   "--default-seed", "0"],
                                  stdout=log, stderr=log, env=env)
        try:
            # max_tokens=1: nearly every first answer is truncated and asked again
            config = GenerateConfig(tasks=folder, teacher="openai", concurrency=2,
                                    base_url=f"http://127.0.0.1:{closed_port}/v1",
                                    max_tokens=1, max_tokens_cap=128, temperature=1.0,
                                    timeout=60, ready_timeout=180)
            manifest = run(config, LocalStore(tmp_path / "g"))
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    rows = read_jsonl(tmp_path / "g" / "responses.jsonl")
    counts = manifest["counts"]
    assert manifest["teacher"]["model"] == str(model)  # detected from /v1/models
    assert rows, (counts, (tmp_path / "serve.log").read_text()[-2000:])
    assert len(rows) + sum(counts["rejected"].values()) == len(tasks)
    for row in rows:
        assert row["finish_reason"] == "stop" and row["response"].strip()
        assert row["teacher_model"] == str(model)
        assert 0 < row["usage"]["completion_tokens"] <= 128
        assert row["usage"]["total_tokens"] == \
            row["usage"]["prompt_tokens"] + row["usage"]["completion_tokens"]
    assert counts["truncated_retried"] >= 1
    assert counts["usage"]["total_tokens"] == sum(r["usage"]["total_tokens"] for r in rows)
    assert counts["usage_spent"]["total_tokens"] > counts["usage"]["total_tokens"]


def test_generate_bad_inputs(tmp_path):
    with pytest.raises(MissingInputError, match="--tasks"):
        run(GenerateConfig(tasks=str(tmp_path / "nowhere")), LocalStore(tmp_path / "g"))
    empty = write_tasks(tmp_path / "empty" / "tasks.jsonl", [])
    with pytest.raises(InputError, match="holds no tasks"):
        run(GenerateConfig(tasks=empty), LocalStore(tmp_path / "g"))
    twice = make_tasks(REAL_FUNCTIONS[:1], ["complete"]) * 2
    dup = write_tasks(tmp_path / "dup" / "tasks.jsonl", twice)
    with pytest.raises(InputError, match="appears twice"):
        run(GenerateConfig(tasks=dup), LocalStore(tmp_path / "g"))
    nameless = write_tasks(tmp_path / "bad" / "tasks.jsonl", [{"id": "a", "category": "x"}])
    with pytest.raises(InputError, match="task 1 lacks instruction"):
        run(GenerateConfig(tasks=nameless), LocalStore(tmp_path / "g"))
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_generate_config_validates_and_documents_every_field():
    with pytest.raises(ConfigError, match="teacher"):
        build_config(GenerateConfig, {"tasks": "x", "teacher": "oracle"})
    with pytest.raises(ConfigError, match="api_key"):
        build_config(GenerateConfig, {"tasks": "x", "api_key": "secret"})  # no such field
    assert GenerateConfig.__doc__.strip().splitlines()[0].endswith(".")
    assert all(f.description for f in GenerateConfig.model_fields.values())
