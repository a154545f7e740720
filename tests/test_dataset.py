"""Tests for the build-dataset stage (trackb_core.dataset)."""

from __future__ import annotations

import inspect
import json
import random
from collections import Counter

import pytest
from test_teacher import make_tasks

from trackb_core import prompts
from trackb_core.dataset import DatasetConfig, group_key, grouped_split, rejection_reason, run
from trackb_core.errors import InputError, MissingInputError
from trackb_core.store import LocalStore
from trackb_core.teacher import ReferenceTeacher


def stdlib_functions(limit: int = 90) -> list:
    """Plain functions of 5-60 lines from a few standard-library modules, in a stable order."""
    import calendar
    import colorsys
    import fnmatch
    import json.decoder
    import json.encoder
    import ntpath
    import posixpath
    import shlex
    import statistics
    import string
    import textwrap

    found = []
    for module in (textwrap, shlex, fnmatch, colorsys, string, json.decoder, json.encoder,
                   posixpath, ntpath, calendar, statistics):
        for _name, func in sorted(vars(module).items()):
            if not inspect.isfunction(func) or func.__module__ != module.__name__:
                continue
            try:
                lines = len(inspect.getsource(func).splitlines())
            except (OSError, TypeError):
                continue
            if 5 <= lines <= 60:
                found.append(func)
    return found[:limit]


def respond(tasks: list[dict]) -> list[dict]:
    """Response rows as generate writes them, from the reference teacher."""
    rows = []
    by_id = {t["id"]: t for t in tasks}
    for result in ReferenceTeacher().answer_all(tasks):
        if result.ok:
            rows.append({**by_id[result.id], "response": result.response, "teacher": "reference",
                         "teacher_model": "reference", "finish_reason": "stop", "usage": {}})
    return rows


@pytest.fixture(scope="module")
def responses() -> list[dict]:
    rows = respond(make_tasks(stdlib_functions()))
    # exact copies of five functions in other files: a different id and instruction, the
    # same code up to whitespace; they must share a side of the split with the original
    copies = make_tasks(stdlib_functions()[:5], source_file="vendored/copy.py")
    for task in copies:
        task["instruction"] = "(vendored copy) " + task["instruction"]
        task["source_function"] = task["source_function"].replace("\n", "  \n", 1)
    return rows + respond(copies)


def write_responses(folder, rows) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "responses.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return str(folder)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def build(tmp_path, rows, name="d", **config):
    folder = write_responses(tmp_path / f"{name}-in", rows)
    out = tmp_path / name
    manifest = run(DatasetConfig(responses=folder, **config), LocalStore(out))
    return out, manifest


def test_split_is_deterministic_whatever_the_input_order(tmp_path, responses):
    shuffled = list(responses)
    random.Random(7).shuffle(shuffled)
    first, _ = build(tmp_path, responses, "a")
    second, _ = build(tmp_path, shuffled, "b")
    for name in ("train.jsonl", "test.jsonl", "README.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # another seed gives another split of the same rows
    third, _ = build(tmp_path, responses, "c", seed=7)
    assert (third / "test.jsonl").read_bytes() != (first / "test.jsonl").read_bytes()


def test_no_source_function_on_both_sides(tmp_path, responses):
    out, manifest = build(tmp_path, responses)
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    train_groups = {group_key(r) for r in train}
    test_groups = {group_key(r) for r in test}
    assert train and test and not train_groups & test_groups
    # the vendored copies are grouped with their originals
    copies = [r for r in train + test if r["source_file"] == "vendored/copy.py"]
    assert copies
    for copy in copies:
        side = "test" if group_key(copy) in test_groups else "train"
        originals = [r for r in (test if side == "test" else train)
                     if r["function_name"] == copy["function_name"]
                     and r["source_file"] != "vendored/copy.py"]
        assert originals, copy["id"]
    assert manifest["counts"]["train_groups"] == len(train_groups)
    assert manifest["counts"]["test_groups"] == len(test_groups)


def test_split_is_stratified_by_category(tmp_path, responses):
    out, manifest = build(tmp_path, responses)
    train, test = manifest["counts"]["train"], manifest["counts"]["test"]
    for category in train:
        total = train[category] + test.get(category, 0)
        assert total >= 30, category  # enough rows for the tolerance to mean something
        assert abs(test.get(category, 0) / total - 0.15) <= 0.05, (category, train, test)


def test_dataset_rows_carry_the_training_messages(tmp_path, responses):
    out, _ = build(tmp_path, responses)
    rows = read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for row in rows:
        assert row["messages"] == (prompts.prompt_messages(row["instruction"])
                                   + prompts.completion_messages(row["response"]))
        assert {"id", "category", "instruction", "response", "source_function", "source_file",
                "function_id", "function_name"} <= row.keys()
        assert ("mutation" in row) == (row["category"] == "bugfix")
        assert "teacher" not in row and "buggy_source" not in row


GOOD_CODE = "```python\ndef add(a, b):\n    return a + b\n```"
GOOD_TEST = "```python\nimport m\n\ndef test_add():\n    assert m.add(1, 2) == 3\n```"


@pytest.mark.parametrize(("category", "response", "reason"), [
    ("explain", "Too short.", "too_short"),
    ("explain", "word " * 3000, "too_long"),
    ("explain", "This function does things. TODO: describe the rest of it.", "placeholder"),
    ("complete", "```python\ndef f():\n    <insert code here>\n```", "placeholder"),
    ("unit_test", GOOD_TEST.replace("import m", "import your_module"), "placeholder"),
    ("explain", "The function is TBD and will be described later on.", "placeholder"),
    ("complete", "Just add the two numbers together and hand back the sum.", "no_code_block"),
    ("complete", "```python\ndef add(a, b)\n    return a + b\n```", "code_does_not_compile"),
    ("bugfix", "The bug is the comparison; the fix:\n```python\ndef f(:\n```",
     "code_does_not_compile"),
    ("unit_test", "```python\nimport m\n\ndef check_add():\n    assert m.add(1, 2) == 3\n```",
     "no_test_function"),
    ("unit_test", "```python\nimport m\n\ndef test_add():\n    m.add(1, 2)\n```", "no_assert"),
    ("docstring", "Adds two numbers and returns the sum of them.", "no_triple_quote"),
    ("poetry", "Roses are red, and this is not a code task at all.", "unknown_category"),
])
def test_each_filter_rejects_what_it_should(category, response, reason):
    config = DatasetConfig(responses="x")
    assert rejection_reason({"category": category, "response": response}, config) == reason


@pytest.mark.parametrize(("category", "response"), [
    ("complete", GOOD_CODE),
    ("bugfix", "The bug is on line 2; the fix restores it:\n" + GOOD_CODE),
    ("unit_test", GOOD_TEST),
    ("docstring", '```python\n"""Add two numbers.\n\nArgs:\n    a: x\n"""\n```'),
    ("explain", "**Purpose:** The function adds numbers and returns the sum."),
])
def test_good_rows_pass_the_filters(category, response):
    assert rejection_reason({"category": category, "response": response},
                            DatasetConfig(responses="x")) is None


def test_stage_counts_rejections_and_removes_exact_duplicates(tmp_path, responses):
    base = [r for r in responses if r["category"] == "complete"][:6]
    bad = {**base[0], "id": "zz-bad", "response": "TODO"}
    # the same instruction and response up to whitespace, under another id
    dup = {**base[1], "id": "zz-dup", "response": base[1]["response"].replace("\n", "\n  ", 1),
           "instruction": base[1]["instruction"] + "   "}
    out, manifest = build(tmp_path, base + [bad, dup])
    counts = manifest["counts"]
    assert counts["rejected"] == {"too_short": 1}  # "TODO" is too short before it is a placeholder
    assert counts["duplicates_removed"] == 1
    assert counts["rows_in"] == 8 and counts["train_rows"] + counts["test_rows"] == 6
    ids = {r["id"] for name in ("train.jsonl", "test.jsonl") for r in read_jsonl(out / name)}
    assert "zz-dup" not in ids and "zz-bad" not in ids


def test_two_groups_give_a_non_empty_test_and_train():
    rows = [{"id": f"{n}-complete", "category": "complete", "response": GOOD_CODE,
             "instruction": n, "source_function": f"def {n}():\n    return 1\n"}
            for n in ("a", "b")]
    train, test = grouped_split(rows, 0.15, 42)
    assert len(train) == 1 and len(test) == 1
    train, test = grouped_split(rows, 0.99, 42)
    assert len(train) == 1 and len(test) == 1
    train, test = grouped_split(rows[:1], 0.15, 42)
    assert len(train) == 1 and not test


def test_dataset_card_describes_counts_split_and_corpus(tmp_path, responses):
    # provenance chain: extract's manifest names the corpus, generate's names the tasks
    extract = tmp_path / "extract"
    extract.mkdir()
    (extract / "tasks.jsonl").write_text("")
    (extract / "manifest.json").write_text(json.dumps({"inputs": {"corpus": {
        "uri": "pypi:verl==0.9.1", "name": "verl", "version": "0.9.1", "sha256": "abc"}}}))
    generate = tmp_path / "gen"
    write_responses(generate, responses)
    (generate / "manifest.json").write_text(json.dumps({"inputs": {"tasks": {
        "uri": str(extract), "file": "tasks.jsonl", "sha256": "def"}}}))
    out = tmp_path / "ds"
    manifest = run(DatasetConfig(responses=str(generate / "responses.jsonl")), LocalStore(out))
    card = (out / "README.md").read_text()
    assert "name: verl" in card and "version: 0.9.1" in card and "`abc`" in card
    test_counts = manifest["counts"]["test"]
    train_counts = manifest["counts"]["train"]
    for category, n in test_counts.items():
        total = n + train_counts.get(category, 0)
        assert f"| {category} | {train_counts.get(category, 0)} | {n} | {total} |" in card
    assert "Grouped by source function" in card and "test_ratio: 0.15" in card
    assert "seed: 42" in card and str(tmp_path) not in card
    assert "reference (reference)" in card


def test_missing_or_useless_input_fails_without_manifest(tmp_path, responses):
    with pytest.raises(MissingInputError, match="--responses"):
        run(DatasetConfig(responses=str(tmp_path / "none")), LocalStore(tmp_path / "o"))
    useless = [{**r, "response": "TODO"} for r in responses[:3]]
    with pytest.raises(InputError, match="no row survives the filters"):
        build(tmp_path, useless, "o")
    broken = [{k: v for k, v in responses[0].items() if k != "response"}]
    with pytest.raises(InputError, match="row 1 lacks response"):
        build(tmp_path, broken, "o")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_reference_rows_mostly_survive_the_filters(tmp_path, responses):
    _, manifest = build(tmp_path, responses)
    counts = manifest["counts"]
    kept = counts["train_rows"] + counts["test_rows"]
    assert kept >= 0.9 * len(responses), counts["rejected"]
    assert Counter(r["category"] for r in responses).keys() == \
        (counts["train"].keys() | counts["test"].keys())
