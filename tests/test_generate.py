"""Tests for the generate stage (trackb_core.generate)."""

from __future__ import annotations

import json
import random

import pytest
from test_teacher import REAL_FUNCTIONS, FakeOpenAIServer, free_port, make_tasks

from trackb_core.config import build_config
from trackb_core.errors import ConfigError, InputError, MissingInputError, UnavailableError
from trackb_core.generate import GenerateConfig, run
from trackb_core.store import LocalStore


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

    # same tasks in another order -> byte-identical responses
    random.Random(1).shuffle(tasks)
    folder2 = write_tasks(tmp_path / "extract2" / "tasks.jsonl", tasks)
    run(GenerateConfig(tasks=folder2), LocalStore(tmp_path / "generate2"))
    assert (tmp_path / "generate2" / "responses.jsonl").read_bytes() == \
        (out / "responses.jsonl").read_bytes()


def test_openai_generate_counts_rejections_and_keeps_the_key_out(tmp_path, monkeypatch):
    server = FakeOpenAIServer(require_key="k-123", delay=0.02)
    try:
        tasks = make_tasks(REAL_FUNCTIONS[:3], ["complete", "explain", "unit_test"])
        tasks[0]["instruction"] += " [length]"
        tasks[1]["instruction"] += " [500]"
        folder = write_tasks(tmp_path / "t" / "tasks.jsonl", tasks)
        monkeypatch.setenv("MY_TEACHER_KEY", "k-123")
        config = GenerateConfig(tasks=folder, teacher="openai", base_url=server.base_url,
                                concurrency=4, timeout=5, max_retries=2,
                                api_key_env="MY_TEACHER_KEY")
        manifest = run(config, LocalStore(tmp_path / "g"))
    finally:
        server.stop()
    rows = read_jsonl(tmp_path / "g" / "responses.jsonl")
    assert len(rows) == len(tasks) - 1
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(r["teacher_model"] == "fake-teacher" and r["usage"]["total_tokens"] == 15
               for r in rows)
    assert tasks[0]["id"] not in {r["id"] for r in rows}
    counts = manifest["counts"]
    assert counts["rejected"] == {"truncated": 1}
    assert counts["retries"] == {"http_5xx": 1}
    assert counts["usage"]["total_tokens"] == 15 * len(tasks)
    assert manifest["teacher"]["model"] == "fake-teacher"
    assert "k-123" not in (tmp_path / "g" / "manifest.json").read_text()


def test_generate_wrong_key_is_config_error_and_leaves_no_manifest(tmp_path, monkeypatch):
    server = FakeOpenAIServer(require_key="right")
    try:
        folder = write_tasks(tmp_path / "t" / "tasks.jsonl", make_tasks(REAL_FUNCTIONS[:1]))
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        with pytest.raises(ConfigError, match=r"\$OPENAI_API_KEY"):
            run(GenerateConfig(tasks=folder, teacher="openai", base_url=server.base_url),
                LocalStore(tmp_path / "g"))
    finally:
        server.stop()
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_generate_unreachable_teacher_fails_fast_without_manifest(tmp_path):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", make_tasks(REAL_FUNCTIONS[:1]))
    config = GenerateConfig(tasks=folder, teacher="openai", timeout=2,
                            base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UnavailableError, match="unreachable"):
        run(config, LocalStore(tmp_path / "g"))
    assert not (tmp_path / "g" / "manifest.json").exists()


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
