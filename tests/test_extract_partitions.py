"""A partitioned extract (trackb_core.extract with partitions: N): every part walks and
samples the whole corpus, builds tasks and hidden tests for its share of the modules
(whole sandbox derivation runs), and the merge writes the bytes one part writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_corpora import three_corpora  # noqa: F401 - a fixture

from trackb_core import difftest, extract
from trackb_core.errors import InputError, MissingInputError
from trackb_core.extract import ExtractConfig, HiddenTestCounts, hidden_tests_summary
from trackb_core.partition import part_name, part_store, read_progress
from trackb_core.store import LocalStore

OUTPUTS = ("functions.jsonl", "tasks.jsonl", "corpus.tar.gz")
# What only a partitioned run's manifest holds, and what differs from run to run.
NOT_COMPARED = {"partitions", "timings", "started_at", "finished_at", "config",
                "fingerprint"}


def synthetic_corpus(root: Path, modules: int) -> Path:
    """A package of ``modules`` small modules, two callable functions each (hidden tests
    derive for most), every ninth importing a module that is not installed."""
    package = root / "calc"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for i in range(modules):
        body = (f'def clamp_{i}(value: int, low: int = 0, high: int = {i + 5}) -> int:\n'
                '    """value kept between low and high."""\n'
                '    if value < low:\n        return low\n'
                '    if value > high:\n        return high\n    return value\n\n\n'
                f'def scaled_{i}(items: list, factor: int = {i % 4 + 2}) -> list:\n'
                '    """every item times factor."""\n    result = []\n'
                '    for item in items:\n        result.append(item * factor)\n'
                '    return result\n')
        if i % 9 == 4:
            body = f"import missing_dependency_{i % 2}\n\n\n{body}"
        (package / f"mod_{i:03d}.py").write_text(body)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """34 modules: two derivation runs of difftest.MODULES_PER_RUN (32)."""
    return synthetic_corpus(tmp_path_factory.mktemp("synth"), 34)


@pytest.fixture(scope="module")
def whole_run(corpus, tmp_path_factory) -> tuple[LocalStore, dict]:
    """The unpartitioned extract of ``corpus``, hidden tests on."""
    out = LocalStore(tmp_path_factory.mktemp("whole") / "extract")
    return out, extract.run(ExtractConfig(corpus=str(corpus)), out)


def assert_same_run(one: LocalStore, single: dict, many: LocalStore, merged: dict) -> None:
    for key in OUTPUTS:
        assert many.get_bytes(key) == one.get_bytes(key), key
    assert merged["counts"] == single["counts"]
    assert merged["outputs"] == single["outputs"]
    assert {k: v for k, v in merged.items() if k not in NOT_COMPARED} == {
        k: v for k, v in single.items() if k not in NOT_COMPARED}


def tasks_per_part(out: LocalStore, count: int) -> list[int]:
    return [len(part_store(out, i, count).get_text("tasks.jsonl").splitlines())
            for i in range(count)]


def test_extract_in_three_partitions_writes_the_bytes_one_partition_writes(
        corpus, whole_run, tmp_path):
    one, single = whole_run
    assert single["hidden_tests"]["functions_with_tests"] > 0
    assert single["hidden_tests"]["missing_modules"]  # the failed imports are counted too
    three = LocalStore(tmp_path / "extract")
    merged = extract.run(ExtractConfig(corpus=str(corpus), partitions=3), three)

    assert_same_run(one, single, three, merged)
    assert merged["partitions"]["count"] == 3
    assert not (Path(one.uri.removeprefix("file://")) / "partitions").exists()
    per_part = tasks_per_part(three, 3)
    assert sum(per_part) == single["counts"]["tasks"]
    # two derivation runs (calc/mod_000.py.., calc/mod_032.py..): parts 0 and 2; 1 has none
    assert [n > 0 for n in per_part] == [True, False, True]
    for index in range(3):
        part = part_store(three, index, 3)
        files = set(part.list())
        # functions.jsonl and the corpus snapshot are written once, by part 0
        assert files == {"tasks.jsonl", "manifest.json", "progress.json"} | (
            {"functions.jsonl", "corpus.tar.gz"} if index == 0 else set())
        progress = read_progress(part)
        assert progress["done"] == progress["total"]
        assert progress["unit"] == "functions"


def test_a_sampled_extract_in_four_parts_merges_the_same_whatever_the_run_and_chunk_size(
        tmp_path, monkeypatch):
    # small runs and chunks: many of each, cut differently from the parts' shares
    monkeypatch.setattr(difftest, "MODULES_PER_RUN", 3)
    monkeypatch.setattr(extract, "CHUNK_MODULES", 7)
    corpus = synthetic_corpus(tmp_path / "corpus", 16)
    config = ExtractConfig(corpus=str(corpus), max_functions=25, seed=7)
    one, four = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "four")
    single = extract.run(config, one)
    assert single["counts"]["functions"] == 25  # sampled
    split = config.model_copy(update={"partitions": 4})
    for index in range(4):  # what the pods of the Indexed Job do
        extract.run(split.model_copy(update={"partition": index}), four)
    merged = extract.merge(split, four)

    assert_same_run(one, single, four, merged)
    assert sum(n > 0 for n in tasks_per_part(four, 4)) >= 3


def test_a_finished_extract_partition_is_never_redone(corpus, tmp_path):
    out = LocalStore(tmp_path / "extract")
    config = ExtractConfig(corpus=str(corpus), partitions=3, derive_tests=False)
    extract.run(config, out)
    first = {i: part_store(out, i, 3).get_bytes("manifest.json") for i in range(3)}
    tasks = out.get_bytes("tasks.jsonl")

    extract.run(config, out)  # every part done: only the merge runs
    assert {i: part_store(out, i, 3).get_bytes("manifest.json") for i in range(3)} == first

    shutil.rmtree(tmp_path / "extract" / "partitions" / part_name(0, 3))
    extract.run(config, out)
    again = {i: part_store(out, i, 3).get_bytes("manifest.json") for i in range(3)}
    assert {i: again[i] for i in (1, 2)} == {i: first[i] for i in (1, 2)}
    assert again[0] != first[0]  # rerun: a new start time
    assert out.get_bytes("tasks.jsonl") == tasks


def test_a_run_over_two_corpora_partitions_into_the_same_files(three_corpora,  # noqa: F811
                                                               tmp_path):
    setting, _ = three_corpora
    config = ExtractConfig(corpus=setting[1:])  # betapkg and the gamma folder
    one, two = LocalStore(tmp_path / "one"), LocalStore(tmp_path / "two")
    single = extract.run(config, one)
    merged = extract.run(config.model_copy(update={"partitions": 2}), two)

    assert_same_run(one, single, two, merged)
    assert [c["key"] for c in merged["corpus"]["corpora"]] == ["betapkg", "gamma"]
    assert single["hidden_tests"]["functions_with_tests"] > 0


def test_the_merge_names_the_extract_partitions_that_are_not_finished(corpus, tmp_path):
    out = LocalStore(tmp_path / "extract")
    config = ExtractConfig(corpus=str(corpus), partitions=3, derive_tests=False)
    for index in (0, 1):
        extract.run(config.model_copy(update={"partition": index}), out)
    with pytest.raises(MissingInputError, match=r"1 of 3 .*: part-00002-of-00003"):
        extract.merge(config, out)
    assert not out.exists("manifest.json")


def test_task_rows_out_of_function_order_do_not_merge(tmp_path):
    functions = tmp_path / "functions.jsonl"
    functions.write_text("".join(json.dumps({"id": i}) + "\n" for i in ("a", "b", "c")))
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps({"id": f"{i}-x", "function_id": i}) + "\n"
                            for i in ("c", "a")))
    with pytest.raises(InputError, match="function a out of functions.jsonl order"):
        extract.merge_tasks(functions, [part], tmp_path / "tasks.jsonl", where="here")


@pytest.mark.parametrize("declared", [False, True])
def test_summed_hidden_test_totals_give_the_summary_one_run_writes(declared):
    counts = HiddenTestCounts()
    derived = difftest.Derived(
        tests={"f1": {"cases": 3}, "f2": {"cases": 5}},
        reasons={"f3": "no_mutant", "f4": "module_missing", "f5": "module_missing"},
        modules={"a.py": "imported", "b.py": "missing torch", "c.py": "error ValueError"})
    base = difftest.Derived(modules={"a.py": "imported", "b.py": "imported"})
    functions = [{"file": f} for f in ("a.py", "a.py", "b.py", "b.py", "c.py")]
    counts.add(derived, base if declared else None, functions)
    rows = [{"file": f["file"]} for f in functions]
    expected = derived.counts(rows)
    expected["environment"] = "declared" if declared else "base"
    expected["importable_share_base"] = (base.counts(rows)["importable_share"] if declared
                                         else expected["importable_share"])
    assert counts.summary(len(functions), declared) == expected
    assert hidden_tests_summary(counts.totals(), declared) == expected
