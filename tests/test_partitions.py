"""Partitioned steps run locally (trackb_core.partition): generate and eval's generation
split by a hash of the item id into parts, each a process of its own, merged into the
same files one part writes; finished parts are never redone."""

from __future__ import annotations

import json
import shutil

import pytest
from fault_server import FaultServer
from test_evaluate import FakeVLLM, dataset_rows, eval_config
from test_generate import synthetic_tasks, write_tasks
from test_teacher import REAL_FUNCTIONS, make_tasks

from trackb_core import evaluate, generate
from trackb_core.errors import EXIT_CONFIG, EXIT_TEMPORARY, MissingInputError
from trackb_core.evaluate import EvalConfig
from trackb_core.generate import GenerateConfig
from trackb_core.partition import (
    PartitionsFailed,
    member,
    merge_jsonl_by_id,
    part_name,
    part_store,
    read_progress,
    sum_counts,
)
from trackb_core.store import LocalStore

PART_FILES = {"responses.jsonl", "manifest.json", "progress.json"}


def reference_tasks(tmp_path) -> str:
    return write_tasks(tmp_path / "extract" / "tasks.jsonl", make_tasks(REAL_FUNCTIONS))


def part_manifests(out: LocalStore, count: int) -> dict[int, bytes]:
    """The manifest bytes of each finished part (its timestamps change when rerun)."""
    found = {}
    for index in range(count):
        store = part_store(out, index, count)
        if store.exists("manifest.json"):
            found[index] = store.get_bytes("manifest.json")
    return found


# -- generate -----------------------------------------------------------------------------

def test_generate_in_four_partitions_writes_the_bytes_one_partition_writes(tmp_path):
    tasks = reference_tasks(tmp_path)
    one, four = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "four")
    single = generate.run(GenerateConfig(tasks=tasks), one)
    merged = generate.run(GenerateConfig(tasks=tasks, partitions=4), four)

    assert four.get_bytes("responses.jsonl") == one.get_bytes("responses.jsonl")
    assert not (tmp_path / "one" / "partitions").exists()  # N = 1 is today's run
    assert merged["counts"] == single["counts"]
    assert merged["outputs"] == single["outputs"]
    assert [p["folder"] for p in merged["partitions"]["parts"]] == [
        part_name(i, 4) for i in range(4)]
    ids = [json.loads(line)["id"] for line in one.get_text("responses.jsonl").splitlines()]
    for index in range(4):
        part = part_store(four, index, 4)
        assert set(part.list()) == PART_FILES
        rows = part.get_text("responses.jsonl").splitlines()
        assert [json.loads(r)["id"] for r in rows] == [i for i in ids if member(i, 4) == index]
        progress = read_progress(part)
        assert progress["done"] == progress["total"] == merged["partitions"]["parts"][index][
            "counts"]["tasks"]


def test_finished_partitions_are_never_redone(tmp_path):
    tasks = reference_tasks(tmp_path)
    out = LocalStore(tmp_path / "generate")
    config = GenerateConfig(tasks=tasks, partitions=4)
    generate.run(config, out)
    first = part_manifests(out, 4)
    responses = out.get_bytes("responses.jsonl")

    generate.run(config, out)  # every part done: only the merge runs
    assert part_manifests(out, 4) == first

    shutil.rmtree(tmp_path / "generate" / "partitions" / part_name(2, 4))
    generate.run(config, out)
    again = part_manifests(out, 4)
    assert {i: again[i] for i in (0, 1, 3)} == {i: first[i] for i in (0, 1, 3)}
    assert again[2] != first[2]  # rerun: a new start time
    assert out.get_bytes("responses.jsonl") == responses


def test_merge_names_the_partitions_that_are_not_finished(tmp_path):
    tasks = reference_tasks(tmp_path)
    out = LocalStore(tmp_path / "generate")
    config = GenerateConfig(tasks=tasks, partitions=3)
    for index in (0, 2):  # what two pods of the Indexed Job did
        generate.run(config.model_copy(update={"partition": index}), out)
    with pytest.raises(MissingInputError, match=r"1 of 3 .*: part-00001-of-00003; run them"):
        generate.merge(config, out)
    assert not out.exists("manifest.json")
    generate.run(config.model_copy(update={"partition": 1}), out)
    generate.merge(config, out)
    one = LocalStore(tmp_path / "one")
    generate.run(GenerateConfig(tasks=tasks), one)
    assert out.get_bytes("responses.jsonl") == one.get_bytes("responses.jsonl")


def test_openai_teacher_partitions_ask_each_their_own_server(tmp_path):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", synthetic_tasks(24))
    settings = {"tasks": folder, "teacher": "openai", "timeout": 5.0, "max_retries": 2,
                "ready_timeout": 10.0, "max_tokens": 16, "max_tokens_cap": 64}
    with FaultServer() as alone, FaultServer() as a, FaultServer() as b:
        one = LocalStore(tmp_path / "one")
        generate.run(GenerateConfig(base_url=alone.base_url, **settings), one)
        four = LocalStore(tmp_path / "four")
        manifest = generate.run(GenerateConfig(base_urls=[a.base_url, b.base_url],
                                               partitions=4, **settings), four)
        assert four.get_bytes("responses.jsonl") == one.get_bytes("responses.jsonl")
        # parts 0 and 2 ask the first server, 1 and 3 the second; nobody asks twice
        ids = [t["id"] for t in synthetic_tasks(24)]
        wanted = [sum(member(i, 4) in parts for i in ids) for parts in ((0, 2), (1, 3))]
        assert [a.requests, b.requests] == wanted and sum(wanted) == alone.requests == 24
    assert manifest["teacher"]["base_urls"] == [a.base_url, b.base_url, a.base_url,
                                                b.base_url]
    assert manifest["counts"]["requested"] == 24 and manifest["counts"]["responses"] == 24
    for index in range(4):  # each part keeps its own answer cache
        assert part_store(four, index, 4).list("cache")


def test_a_failed_partition_fails_the_step_by_name_and_reruns_alone(tmp_path, closed_port):
    folder = write_tasks(tmp_path / "t" / "tasks.jsonl", synthetic_tasks(12))
    out = LocalStore(tmp_path / "generate")
    with FaultServer() as up:
        config = GenerateConfig(
            tasks=folder, teacher="openai", partitions=2, timeout=5.0, max_retries=1,
            ready_timeout=1.0, max_tokens=16, max_tokens_cap=64,
            base_urls=[up.base_url, f"http://127.0.0.1:{closed_port}/v1"])
        with pytest.raises(PartitionsFailed, match=r"1 of 2 .* part-00001-of-00002 \(exit 75\)"
                           ) as failure:
            generate.run(config, out)
        assert failure.value.exit_code == EXIT_TEMPORARY  # the server was down: retryable
        assert not out.exists("manifest.json")
        kept = part_manifests(out, 2)
        assert list(kept) == [0]
        asked = up.requests
        with FaultServer(port=closed_port):  # the second server is up now
            generate.run(config, out)
        assert part_manifests(out, 2)[0] == kept[0] and up.requests == asked
    assert len(out.get_text("responses.jsonl").splitlines()) == 12


def test_a_part_config_resets_only_what_acts_after_the_merge():
    config = EvalConfig(partitions=3, tag="post", score=False, corpus="somewhere",
                        max_new_tokens=7)
    part = config.part(1)
    assert (part.partition, part.partitions, part.max_new_tokens) == (1, 3, 7)
    assert (part.tag, part.score, part.corpus) == ("eval", False, None)  # parts never score
    assert config.model_copy(update={"score": True, "tag": "x"}).part(1) == part
    assert GenerateConfig(partitions=2, concurrency=5).part(0).concurrency == 5
    with pytest.raises(ValueError, match="partition 3 is not one of 0..2"):
        config.part(3)


def test_teacher_url_of_each_partition():
    assert GenerateConfig(base_url="http://x/v1", partitions=2, partition=1).teacher_url == \
        "http://x/v1"
    urls = ["http://a/v1", "http://b/v1"]
    parts = [GenerateConfig(base_urls=urls, partitions=3, partition=i) for i in range(3)]
    assert [p.teacher_url for p in parts] == [urls[0], urls[1], urls[0]]
    assert GenerateConfig(base_urls=urls).teacher_url == urls[0]


def test_counts_sum_and_rows_merge_sorted_by_id():
    merged = sum_counts([{"tasks": 3, "skipped": {"a": 1}, "model": "m", "ok": True},
                         {"tasks": 4, "skipped": {"a": 2, "b": 1}, "model": "m", "ok": True}])
    assert merged == {"model": "m", "ok": True, "skipped": {"a": 3, "b": 1}, "tasks": 7}
    assert merge_jsonl_by_id([b'{"id": "b"}\n', b'{"id": "a", "x": 1}\n{"id": "c"}\n']) == \
        b'{"id": "a", "x": 1}\n{"id": "b"}\n{"id": "c"}\n'
    with pytest.raises(ValueError, match="'a' is in two partitions"):
        merge_jsonl_by_id([b'{"id": "a"}\n', b'{"id": "a"}\n'])


def test_failed_partitions_exit_with_the_code_a_retry_policy_needs():
    assert PartitionsFailed("x", [75, 75]).exit_code == EXIT_TEMPORARY
    assert PartitionsFailed("x", [75, 64]).exit_code == EXIT_CONFIG  # permanent wins
    assert PartitionsFailed("x", [75, -9]).exit_code == EXIT_TEMPORARY
    assert PartitionsFailed("x", [-9]).exit_code == 1


# -- eval ---------------------------------------------------------------------------------

@pytest.fixture
def split_folder(tmp_path):
    folder = tmp_path / "build-dataset"
    folder.mkdir()
    folder.joinpath("test.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                      for r in dataset_rows()))
    return folder


def without_timings(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result.get("trackb", {}).pop("generation_seconds", None)
    result.pop("generation_seconds", None)
    return result


def assert_same_evaluation(one: LocalStore, three: LocalStore) -> None:
    assert three.get_bytes("predictions.jsonl") == one.get_bytes("predictions.jsonl")
    for name in ("eval.json", "generation.json"):
        assert without_timings(json.loads(three.get_text(name))) == \
            without_timings(json.loads(one.get_text(name))), name
    manifests = [json.loads(s.get_text("manifest.json")) for s in (one, three)]
    assert manifests[1]["metrics"] == manifests[0]["metrics"]
    assert set(manifests[1]["outputs"]) == {"predictions.jsonl", "generation.json",
                                            "eval.json"}
    for index in range(3):  # parts generate, never score
        part = part_store(three, index, 3)
        assert set(part.list()) == {"predictions.jsonl", "generation.json", "manifest.json",
                                    "progress.json"}
        progress = read_progress(part)
        assert progress["unit"] == "answers" and progress["done"] == progress["total"]
        items = json.loads(part.get_text("generation.json"))["items"]
        assert progress["total"] == 3 * len(items)


EVAL_SETTINGS = {"n_samples": 2, "max_new_tokens": 8}


def test_eval_generation_in_three_partitions_scores_exactly_as_one(tmp_path, split_folder,
                                                                   tiny_model_dir):
    one, three = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "three")
    evaluate.run(eval_config(split_folder, tiny_model_dir, **EVAL_SETTINGS), one)
    config = eval_config(split_folder, tiny_model_dir, partitions=3, **EVAL_SETTINGS)
    for index in range(3):  # as the pods of an Indexed Job run them, then the launcher
        evaluate.run(config.model_copy(update={"partition": index}), three)
    evaluate.merge(config, three)
    assert_same_evaluation(one, three)


@pytest.mark.slow
def test_eval_in_three_partitions_as_local_processes_scores_exactly_as_one(
        tmp_path, split_folder, tiny_model_dir):
    one, three = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "three")
    evaluate.run(eval_config(split_folder, tiny_model_dir, **EVAL_SETTINGS), one)
    evaluate.run(eval_config(split_folder, tiny_model_dir, partitions=3, **EVAL_SETTINGS),
                 three)
    assert_same_evaluation(one, three)


def test_eval_merge_refuses_parts_made_with_other_settings(tmp_path, split_folder,
                                                           tiny_model_dir):
    out = LocalStore(tmp_path / "eval")
    config = eval_config(split_folder, tiny_model_dir, partitions=2, n_samples=0,
                         max_new_tokens=4)
    for index in range(2):
        evaluate.run(config.model_copy(update={"partition": index}), out)
    part = part_store(out, 1, 2)
    generation = json.loads(part.get_text("generation.json"))
    generation["settings"]["dtype"] = "bfloat16"
    manifest = json.loads(part.get_text("manifest.json"))
    data = json.dumps(generation).encode()
    part.put_bytes("generation.json", data)
    manifest["outputs"]["generation.json"]["bytes"] = len(data)
    part.put_text("manifest.json", json.dumps(manifest))
    with pytest.raises(Exception, match=r"generated with different settings \(dtype\)"):
        evaluate.merge(config, out)


class KeyedVLLM(FakeVLLM):
    """The fake engine, answering by prompt (as a real one does), not by request index."""

    def answer_for(self, request, index, n):
        return super().answer(sum(request["prompt_token_ids"]) % 7, n)


def test_eval_partitions_on_the_vllm_backend_merge_to_the_unpartitioned_run(
        tmp_path, split_folder, tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = tokenizer("def f(x): return x", add_special_tokens=False)["input_ids"]
    KeyedVLLM(answer, tokenizer.convert_tokens_to_ids("<|im_end|>")).install(monkeypatch)
    one, three = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "three")
    evaluate.run(eval_config(split_folder, tiny_model_dir, backend="vllm"), one)
    config = eval_config(split_folder, tiny_model_dir, backend="vllm", partitions=3)
    for index in range(3):  # each as a pod runs it (the fake engine lives in this process)
        evaluate.run(config.model_copy(update={"partition": index}), three)
    evaluate.merge(config, three)
    assert three.get_bytes("predictions.jsonl") == one.get_bytes("predictions.jsonl")
    results = [without_timings(json.loads(s.get_text("eval.json"))) for s in (one, three)]
    assert results[0] == results[1] and results[0]["settings"]["backend"] == "vllm"


def test_a_pipeline_that_sets_one_part_itself_is_refused(tmp_path):
    # One part alone is never merged: the step would look unfinished on every run.
    from trackb_core.errors import ConfigError
    from trackb_core.pipeline import PipelineConfig, plan

    run = LocalStore(tmp_path / "run")
    with pytest.raises(ConfigError, match="generate.partition is set by the run"):
        plan(PipelineConfig(generate={"partitions": 4, "partition": 1}), run)
    steps = dict((step.folder, config) for step, config in
                 plan(PipelineConfig(generate={"partitions": 4}), run))
    assert steps["generate"].partitions == 4 and steps["generate"].partition is None
