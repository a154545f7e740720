"""Tests for the build-dataset stage (trackb_core.dataset)."""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from trackb_core import dataset, extract, filters, generate, neardup, prompts
from trackb_core.dataset import DatasetConfig, grouped_split, run, split_groups
from trackb_core.errors import InputError, MissingInputError
from trackb_core.extract import ExtractConfig
from trackb_core.generate import GenerateConfig
from trackb_core.store import LocalStore

TASK_FIELDS = {"id", "category", "instruction", "response", "source_function", "source_file",
               "function_id", "function_name", "qualname", "signature", "params",
               "returns_value", "line", "end_line", "decorators"}
METADATA = "Metadata-Version: 2.4\nName: stdlib-sample\nVersion: 1.0\nLicense-Expression: MIT\n"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, stdlib_corpus) -> Path:
    """extract + generate (reference teacher) over a licensed copy of the stdlib corpus;
    returns the generate folder, whose manifests lead back to the corpus."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus"
    shutil.copytree(stdlib_corpus, corpus)
    (corpus / "stdlib_sample-1.0.dist-info").mkdir()
    (corpus / "stdlib_sample-1.0.dist-info" / "METADATA").write_text(METADATA)
    store = LocalStore(root)
    extract.run(ExtractConfig(corpus=str(corpus)), store.child("extract"))
    generate.run(GenerateConfig(tasks=store.child("extract").uri), store.child("generate"))
    return root / "generate"


@pytest.fixture(scope="module")
def responses(pipeline) -> list[dict]:
    return read_jsonl(pipeline / "responses.jsonl")


def write_responses(folder: Path, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "responses.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return str(folder)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build(tmp_path, rows, name="d", **config):
    folder = write_responses(tmp_path / f"{name}-in", rows)
    out = tmp_path / name
    config.setdefault("filter_workers", 1)
    manifest = run(DatasetConfig(responses=folder, **config), LocalStore(out))
    return out, manifest


OUTPUTS = ("train.jsonl", "test.jsonl", "data/train.parquet", "data/test.parquet", "README.md")


def test_outputs_are_byte_identical_whatever_the_input_order(tmp_path, responses):
    shuffled = list(responses)
    random.Random(7).shuffle(shuffled)
    first, _ = build(tmp_path, responses, "a")
    # another order, and the filters spread over processes
    second, _ = build(tmp_path, shuffled, "b", filter_workers=2)
    for name in OUTPUTS:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    third, _ = build(tmp_path, responses, "c", seed=7)
    assert (third / "test.jsonl").read_bytes() != (first / "test.jsonl").read_bytes()


def function_shingles(rows: list[dict]) -> dict[str, set[str]]:
    return {r["source_function"]: neardup.shingles(r["source_function"]) for r in rows}


def assert_no_leak(train: list[dict], test: list[dict], threshold: float) -> None:
    """No function, exact copy or near-duplicate (brute-force exact Jaccard) on both sides."""
    assert not {r["function_id"] for r in train} & {r["function_id"] for r in test}
    train_sets, test_sets = function_shingles(train), function_shingles(test)
    for source, shingles in test_sets.items():
        for other, other_shingles in train_sets.items():
            assert neardup.jaccard(shingles, other_shingles) < threshold, (source, other)


def test_no_source_function_or_near_copy_on_both_sides(tmp_path, pipeline):
    out, manifest = build(tmp_path, read_jsonl(pipeline / "responses.jsonl"))
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert train and test
    assert manifest["counts"]["near_duplicate_function_pairs"] >= 1  # the check has teeth
    assert_no_leak(train, test, neardup.CLUSTER_THRESHOLD)
    groups = manifest["counts"]
    assert groups["train_groups"] + groups["test_groups"] <= len(
        {r["function_id"] for r in train + test})


def near_copy(row: dict, suffix: str, file: str) -> dict:
    """``row`` as if made from an edited copy of its function in another file."""
    source = row["source_function"].replace("\n", "\n    _copied = None\n", 1) \
        if row["source_function"].count("\n") > 1 else row["source_function"]
    return {**row, "id": f"{row['function_id']}.{suffix}-{row['category']}",
            "function_id": f"{row['function_id']}.{suffix}", "source_file": file,
            "source_function": source, "instruction": f"({suffix}) {row['instruction']}"}


def test_split_groups_join_exact_and_near_copies(responses):
    originals = [r for r in responses if r["source_function"].count("\n") >= 6][:40]
    exact = [{**near_copy(r, "exact", "vendored/a.py"), "source_function":
              r["source_function"].replace("\n", "  \n", 1)} for r in originals[:10]]
    near = [near_copy(r, "near", "vendored/b.py") for r in originals[10:20]]
    rows = originals + exact + near
    groups, joins = split_groups(rows, neardup.CLUSTER_THRESHOLD)
    assert joins["near_duplicate_function_pairs"] >= len({r["function_id"] for r in near})
    by_id = {r["id"]: r for r in rows}
    for copy in exact + near:
        original = by_id[copy["id"].replace(".exact-", "-").replace(".near-", "-")]
        assert groups[copy["id"]] == groups[original["id"]]
    # shuffled rows name the same groups
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    assert split_groups(shuffled)[0] == groups
    train, test = grouped_split(rows, 0.3, 42, groups)
    assert train and test
    assert_no_leak(train, test, neardup.CLUSTER_THRESHOLD)


# A module whose `outer` holds `square`, a function extract also takes on its own
# (`outer.<locals>.square`), among unrelated functions.
NESTED_MODULE = '''
def outer(items):
    """Sum the squares of the even items, capped."""
    def square(value):
        result = value * value
        if result > 1000:
            result = 1000
        return result

    total = 0
    for item in items:
        if item % 2 == 0:
            total += square(item)
    return total


def mean(values):
    """The arithmetic mean of ``values``."""
    if not values:
        raise ValueError("no values")
    return sum(values) / len(values)


def words(text):
    """The lower-cased words of ``text``."""
    found = []
    for word in text.split():
        found.append(word.strip(".,;").lower())
    return found


def clamp(value, low, high):
    """``value`` limited to ``low`` .. ``high``."""
    if value < low:
        return low
    if value > high:
        return high
    return value


def invert(mapping):
    """A dict from each value of ``mapping`` to its key."""
    inverted = {}
    for key, value in mapping.items():
        inverted[value] = key
    return inverted


def chunks(items, size):
    """``items`` in lists of ``size`` (the last may be shorter)."""
    out = []
    for start in range(0, len(items), size):
        out.append(items[start:start + size])
    return out
'''


def sides(train: list[dict], test: list[dict], qualnames: set[str]) -> set[str]:
    """Which sides hold rows of the functions named ``qualnames``."""
    return {side for side, rows in (("train", train), ("test", test))
            for r in rows if r.get("qualname") in qualnames}


def test_a_nested_function_and_its_outer_function_stay_on_one_side(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "numbers.py").write_text(NESTED_MODULE)
    store = LocalStore(tmp_path)
    extract.run(ExtractConfig(corpus=str(corpus)), store.child("extract"))
    generate.run(GenerateConfig(tasks=store.child("extract").uri), store.child("generate"))
    rows = read_jsonl(tmp_path / "generate" / "responses.jsonl")
    pair = {"outer", "outer.<locals>.square"}
    assert {r["qualname"] for r in rows} >= pair
    # by source function alone, some seeds put the two on different sides
    apart = [seed for seed in range(40) if len(sides(*grouped_split(rows, 0.3, seed), pair)) == 2]
    assert apart
    groups, joins = split_groups(rows)
    assert joins["nested_functions"] == 1 and joins["functions_sharing_a_body"] == 2
    for seed in apart:
        assert len(sides(*grouped_split(rows, 0.3, seed, groups), pair)) == 1, seed
    # and the stage itself
    out, manifest = build(tmp_path, rows, test_ratio=0.3, seed=apart[0], filter_set="seed")
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert train and test and len(sides(train, test, pair)) == 1
    assert manifest["counts"]["nested_functions"] == 1
    assert "1 of the 7 source functions are nested in another one" in \
        (out / "README.md").read_text()


def task_row(name: str, source: str, file: str, line: int) -> dict:
    return {"id": f"{name}-explain", "category": "explain", "instruction": f"Explain {name}.",
            "response": "It does something.", "source_function": source, "source_file": file,
            "function_id": name, "qualname": name, "line": line,
            "end_line": line + source.count("\n") - 1}


RETRY = '''def retry(func):
    attempts = 3

    def wrapper(*args):
        """Call func."""
        return func(*args)  # no retry yet

    return wrapper
'''
LOGGED = '''def logged(func):
    import functools
    print("wrapping", func)

    @functools.wraps(func)
    def wrapper(*args):
        """Call the wrapped function."""
        return func(
            *args)

    return wrapper
'''
UNRELATED = '''def unrelated(func):
    def wrapper(*args):
        return func(*args, 1)

    return wrapper
'''


def test_functions_sharing_a_nested_body_share_a_group_whatever_their_files():
    # the same wrapper, up to docstring, comment, decorator and layout, in two files
    rows = [task_row("retry", RETRY, "a.py", 1), task_row("logged", LOGGED, "b.py", 1),
            task_row("unrelated", UNRELATED, "a.py", 20)]
    groups, joins = split_groups(rows)
    assert groups["retry-explain"] == groups["logged-explain"] != groups["unrelated-explain"]
    assert joins == {"source_functions": 3, "near_duplicate_function_pairs": 0,
                     "nested_functions": 0, "functions_sharing_a_body": 2}
    assert split_groups(list(reversed(rows))) == (groups, joins)
    # a copy of a whole function that differs only in comments and docstring, too
    commented = task_row("retry2", RETRY.replace('"""Call func."""', "# calls func"), "c.py", 1)
    assert split_groups(rows + [commented])[0]["retry2-explain"] == groups["retry-explain"]


def test_overlap_counts_test_rows_and_ngrams_found_in_train():
    train = [task_row("a", "def a(x):\n    return x + 1 + 2 + 3 + 4 + 5 + 6\n", "a.py", 1)]
    # 20 tokens: 8 13-grams, of which the 6 that do not hold the name are in train
    renamed = task_row("b", "def b(x):\n    return x + 1 + 2 + 3 + 4 + 5 + 6\n", "b.py", 1)
    test = [renamed, {**renamed, "id": "b-complete", "category": "complete"},
            task_row("c", "def c():\n    pass\n", "c.py", 1)]  # 6 tokens: one n-gram
    assert dataset.ngram_overlap(train, test) == {
        "ngram": 13, "test_rows": 3, "test_rows_sharing_an_ngram": 2, "test_row_share": 0.6667,
        "test_ngrams": 9, "test_ngrams_in_train": 6, "test_ngram_share": 0.6667}
    assert dataset.ngram_overlap(train, [])["test_row_share"] == 0.0
    assert dataset.ngram_overlap([], test)["test_ngrams_in_train"] == 0


def test_split_is_stratified_by_category(tmp_path, responses):
    _, manifest = build(tmp_path, responses)
    train, test = manifest["counts"]["train"], manifest["counts"]["test"]
    checked = 0
    for category in train:
        total = train[category] + test.get(category, 0)
        if total >= 30:  # enough rows for the tolerance to mean something
            assert abs(test.get(category, 0) / total - 0.15) <= 0.05, (category, train, test)
            checked += 1
    assert checked >= 3


def test_rows_keep_every_task_field_and_the_training_messages(tmp_path, responses):
    out, _ = build(tmp_path, responses)
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")
    train_ids = [r["id"] for r in read_jsonl(out / "train.jsonl")]
    assert train_ids == sorted(train_ids)
    for row in rows:
        assert row["messages"] == (prompts.prompt_messages(row["instruction"])
                                   + prompts.completion_messages(row["response"]))
        assert TASK_FIELDS <= row.keys(), TASK_FIELDS - row.keys()
        assert not set(dataset.GENERATION_FIELDS) & row.keys()
        if row["category"] == "bugfix":
            assert {"buggy_source", "mutation"} <= row.keys()
            assert {"kind", "line", "before", "after"} <= row["mutation"].keys()


def test_parquet_holds_the_same_rows_as_jsonl(tmp_path, responses):
    from datasets import load_dataset

    out, _ = build(tmp_path, responses)
    for split in ("train", "test"):
        rows = read_jsonl(out / f"{split}.jsonl")
        loaded = load_dataset("parquet", data_files=str(out / "data" / f"{split}.parquet"),
                              split="train")
        assert len(loaded) == len(rows)
        for row, stored in zip(rows, loaded, strict=True):
            # a field a row lacks (mutation on a docstring row) is null in Parquet
            assert {k: v for k, v in stored.items() if v is not None} == \
                {k: v for k, v in row.items() if v is not None}


@pytest.fixture
def fake_filters(monkeypatch):
    """check_row that rejects any response containing "BAD" and reports a fact."""

    def check_row(row, ctx):
        bad = "BAD" in row["response"]
        facts = {"fake_ok": not bad, "fake_kind": row["category"]}
        return filters.FilterVerdict("strict:fake_bad" if bad else None, facts)

    monkeypatch.setattr(filters, "check_row", check_row)


def test_candidates_rescue_rows_and_rejections_are_counted(tmp_path, responses, fake_filters):
    rows = [r for r in responses if r["category"] == "explain"][:8]
    good = rows[0]["response"]
    rows[0] = {**rows[0], "response": "BAD answer", "candidates": ["BAD answer", good, "x"]}
    rows[1] = {**rows[1], "response": "BAD one", "candidates": ["BAD one", "BAD two"]}
    rows[2] = {**rows[2], "response": "BAD alone"}
    out, manifest = build(tmp_path, rows)
    counts = manifest["counts"]
    assert counts["rejected"] == {"strict:fake_bad": 2}
    assert counts["candidates_rescued"] == 1
    assert counts["filter_facts"]["fake_ok"] == {"n": 8, "true": 6, "rate": 0.75}
    assert counts["filter_facts"]["fake_kind"] == {"counts": {"explain": 8}}
    kept = {r["id"]: r for name in ("train.jsonl", "test.jsonl") for r in read_jsonl(out / name)}
    assert kept[rows[0]["id"]]["response"] == good and "candidates" not in kept[rows[0]["id"]]
    assert rows[1]["id"] not in kept and rows[2]["id"] not in kept
    card = (out / "README.md").read_text()
    assert "| strict:fake_bad | 2 |" in card and "| fake_ok | 0.750 (6/8) |" in card


def test_exact_and_near_duplicates_are_removed(tmp_path, responses, fake_filters):
    base = [r for r in responses if r["category"] == "complete"
            and r["instruction"].count("\n") >= 8][:6]
    # the same instruction and response up to whitespace, under another id
    exact = {**base[0], "id": "zz-exact", "instruction": base[0]["instruction"] + "   ",
             "response": base[0]["response"].replace("\n", "\n  ", 1)}
    # one word of a long instruction changed: a near-duplicate question
    near_instruction = {**base[1], "id": "zz-near-instruction",
                        "instruction": base[1]["instruction"].replace("Complete", "Finish", 1)}
    # another question whose answer is the same code with one line added
    code = dataset.response_code(base[2])
    near_code = {**base[2], "id": "zz-near-code", "instruction": "Write something like this.",
                 "response": "```python\n" + code.replace("\n", "\n    pass\n", 1) + "\n```"}
    out, manifest = build(tmp_path, base + [exact, near_instruction, near_code])
    assert manifest["counts"]["duplicates_removed"] == {
        "exact": 1, "near_instruction": 1, "near_response_code": 1}
    ids = {r["id"] for name in ("train.jsonl", "test.jsonl") for r in read_jsonl(out / name)}
    assert ids == {r["id"] for r in base}


def test_two_groups_give_a_non_empty_test_and_train():
    rows = [{"id": f"{n}-complete", "category": "complete", "response": "x",
             "instruction": n, "source_function": f"def {n}():\n    return 1\n"}
            for n in ("a", "b")]
    train, test = grouped_split(rows, 0.15, 42)
    assert len(train) == 1 and len(test) == 1
    train, test = grouped_split(rows, 0.99, 42)
    assert len(train) == 1 and len(test) == 1
    train, test = grouped_split(rows[:1], 0.15, 42)
    assert len(train) == 1 and not test


def card_header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dataset_card_describes_counts_filters_mutations_and_corpus(tmp_path, pipeline):
    out = tmp_path / "ds"
    manifest = run(DatasetConfig(responses=str(pipeline / "responses.jsonl"), filter_workers=1),
                   LocalStore(out))
    card = (out / "README.md").read_text()
    counts = manifest["counts"]
    header = card_header(card)
    assert header["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train.parquet"},
        {"split": "test", "path": "data/test.parquet"}]}]
    assert header["license"] == "mit"
    assert "- Corpus license: MIT" in card and "name: stdlib_corpus" not in card
    # the input's hash changes with row order; the card must not
    assert manifest["inputs"]["responses"]["sha256"] not in card
    for category, n in counts["test"].items():
        train = counts["train"].get(category, 0)
        assert f"| {category} | {train} | {n} | {train + n} |" in card
    assert f"| **all** | {counts['train_rows']} | {counts['test_rows']} |" in card
    assert "Filter set: **strict**" in card
    assert f"{counts['rows_in']} responses in, {sum(counts['rejected'].values())} rejected" in card
    for reason, n in counts["rejected"].items():
        assert f"| {reason} | {n} |" in card
    facts = counts["filter_facts"]["bugfix_exact_fix"]
    assert f"| bugfix_exact_fix | {facts['rate']:.3f} ({facts['true']}/{facts['n']}) |" in card
    kinds = counts["mutations"]
    assert sum(kinds["train"].values()) == counts["train"]["bugfix"]
    for kind in set(kinds["train"]) | set(kinds["test"]):
        assert f"| {kind} | {kinds['train'].get(kind, 0)} | {kinds['test'].get(kind, 0)} |" in card
    removed = counts["duplicates_removed"]
    assert f"Near-duplicate instructions (same category): {removed['near_instruction']}" in card
    assert "at least 0.85" in card and "at least 0.7 (" in card
    assert 'in the order of sha256("42:<group>")' in card
    assert f"{counts['nested_functions']} of the {counts['source_functions']} source " \
        "functions are nested in another one" in card
    overlap = counts["test_train_overlap"]
    assert overlap["test_rows"] == counts["test_rows"] and overlap["ngram"] == 13
    assert (f"shares at least one token 13-gram with a train row's source function: "
            f"{overlap['test_rows_sharing_an_ngram']} of {counts['test_rows']}") in card
    assert (f"also found in train: {overlap['test_ngrams_in_train']} of "
            f"{overlap['test_ngrams']}") in card
    assert "- Sampling: none (the reference teacher" in card
    assert "seed: 42" in card and "test_ratio: 0.15" in card and str(tmp_path) not in card


def test_card_names_an_openai_teachers_sampling_and_an_unknown_license(tmp_path, responses):
    generate_dir = tmp_path / "gen"
    write_responses(generate_dir, responses)
    (generate_dir / "manifest.json").write_text(json.dumps({
        "teacher": {"name": "openai", "model": "Qwen3-Coder-30B-A3B-Instruct",
                    "base_url": "http://10.0.0.7:8000/v1"},
        "config": {"teacher": "openai", "temperature": 0.7, "max_tokens": 2048, "n": 4,
                   "model": None},
        "inputs": {"tasks": {"uri": str(tmp_path / "nowhere"), "file": "tasks.jsonl"}}}))
    out = tmp_path / "ds"
    run(DatasetConfig(responses=str(generate_dir), filter_workers=1), LocalStore(out))
    card = (out / "README.md").read_text()
    assert "- Teacher: model: Qwen3-Coder-30B-A3B-Instruct, name: openai" in card
    assert "- Sampling: max_tokens: 2048, n: 4, temperature: 0.7" in card
    assert "10.0.0.7" not in card
    assert f"- Corpus license: {dataset.UNKNOWN_LICENSE}" in card
    assert card_header(card)["license"] == "unknown"


def test_corpus_license_reads_package_metadata(tmp_path):
    assert dataset.corpus_license(None) is None
    assert dataset.corpus_license(tmp_path) is None
    sdist = tmp_path / "pkg-1.0"
    sdist.mkdir()
    (sdist / "PKG-INFO").write_text("Name: pkg\nLicense: BSD 3-Clause\n")
    assert dataset.corpus_license(tmp_path) == "BSD 3-Clause"
    (sdist / "PKG-INFO").write_text("Name: pkg\nLicense: UNKNOWN\nClassifier: License :: "
                                    "OSI Approved :: Apache Software License\n")
    assert dataset.corpus_license(tmp_path) == "Apache Software License"


def test_missing_or_useless_input_fails_without_manifest(tmp_path, responses):
    with pytest.raises(MissingInputError, match="--responses"):
        run(DatasetConfig(responses=str(tmp_path / "none")), LocalStore(tmp_path / "o"))
    useless = [{**r, "response": "TODO"} for r in responses[:3]]
    with pytest.raises(InputError, match="no row survives the strict filters"):
        build(tmp_path, useless, "o")
    broken = [{k: v for k, v in responses[0].items() if k != "response"}]
    with pytest.raises(InputError, match="row 1 lacks response"):
        build(tmp_path, broken, "o")
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("filter_set", ["seed", "strict"])
def test_reference_rows_survive_the_filters(tmp_path, responses, filter_set):
    _, manifest = build(tmp_path, responses, filter_set=filter_set)
    counts = manifest["counts"]
    kept = counts["train_rows"] + counts["test_rows"]
    # the reference teacher quotes the source: the seed filters keep nearly all of it; the
    # strict ones also drop the stdlib's docstrings that are not Google style
    share = 0.9 if filter_set == "seed" else 0.6
    assert kept >= share * len(responses), counts["rejected"]
    assert all(reason.startswith(f"{filter_set}:") or reason.startswith("seed:")
               for reason in counts["rejected"])
    assert Counter(r["category"] for r in responses).keys() >= \
        (counts["train"].keys() | counts["test"].keys())


# -- the real corpus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_split(verl_dataset):
    folder, manifests = verl_dataset
    return (read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "test.jsonl"),
            manifests["dataset"])


@pytest.mark.integration
def test_verl_split_has_no_near_duplicate_across_sides(verl_split):
    """MinHash over train x test source functions, computed here with datasketch's own
    hashing and another seed (not the stage's clusters); every pair the estimate puts near
    the threshold is then measured exactly."""
    import numpy as np
    from datasketch import MinHash

    train, test, manifest = verl_split
    assert len(train) > 1000 and len(test) > 100
    assert not {r["function_id"] for r in train} & {r["function_id"] for r in test}
    threshold = manifest["config"]["group_threshold"]
    train_sets, test_sets = function_shingles(train), function_shingles(test)
    train_sources, test_sources = sorted(train_sets), sorted(test_sets)

    def signatures(sets):
        hashes = MinHash.bulk(([s.encode() for s in sets[k]] for k in sorted(sets)),
                              num_perm=256, seed=7)
        return np.vstack([m.hashvalues for m in hashes])

    train_sig, test_sig = signatures(train_sets), signatures(test_sets)
    checked = 0
    for row, source in enumerate(test_sources):
        estimates = (train_sig == test_sig[row]).mean(axis=1)
        # 0.15 below the threshold is > 5 standard deviations of a 256-permutation estimate
        for other in np.flatnonzero(estimates >= threshold - 0.15):
            checked += 1
            similarity = neardup.jaccard(test_sets[source], train_sets[train_sources[other]])
            assert similarity < threshold, (source, train_sources[other], similarity)
    assert manifest["counts"]["near_duplicate_function_pairs"] > 0
    print(f"pairs measured exactly: {checked}; stage timings: {manifest['timings']}")


@pytest.fixture(scope="module")
def click_split(tmp_path_factory):
    """``(train, test, build-dataset manifest)`` of extract, generate (reference) and
    build-dataset over click 8.1.7 (a second real corpus, with decorator factories that
    nest their wrappers), built once for this module."""
    root = LocalStore(tmp_path_factory.mktemp("click"))
    extract.run(ExtractConfig(corpus="pypi:click==8.1.7"), root.child("extract"))
    generate.run(GenerateConfig(tasks=root.child("extract").uri), root.child("generate"))
    manifest = run(DatasetConfig(responses=root.child("generate").uri),
                   root.child("build-dataset"))
    folder = root.child("build-dataset").root
    return read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "test.jsonl"), manifest


def every_function_body(rows: list[dict]) -> set[str]:
    """The AST dump, docstrings and decorators dropped, of every def (at any depth, the
    row's function itself included) in each row's source function.

    Written here on its own, not with the stage's code, so that the test does not share
    a blind spot with what it checks."""
    bodies = set()
    for source in {r["source_function"] for r in rows}:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                node.decorator_list = []
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    node.body = node.body[1:] or [ast.Pass()]
        bodies.update(ast.dump(node) for node in ast.walk(tree)
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))
    return bodies


def thirteen_grams(source: str) -> set[tuple[str, ...]]:
    found = re.findall(r"\w+|[^\w\s]", source)
    return {tuple(found[i:i + 13]) for i in range(max(1, len(found) - 12))}


@pytest.mark.integration
@pytest.mark.parametrize("split", ["verl_split", "click_split"])
def test_no_function_body_is_on_both_sides_of_a_real_split(split, request):
    train, test, manifest = request.getfixturevalue(split)
    counts = manifest["counts"]
    assert len(train) > 500 and len(test) > 100
    assert counts["nested_functions"] > 10  # the corpus nests functions: the check has teeth
    nested = {r["function_id"] for r in train + test if ".<locals>." in r["qualname"]}
    assert len(nested) >= 10
    assert not every_function_body(train) & every_function_body(test)
    # the card's overlap figures, counted again with tuples of tokens instead of hashes
    train_grams = set().union(*(thirteen_grams(s) for s in {r["source_function"] for r in train}))
    test_grams = {s: thirteen_grams(s) for s in {r["source_function"] for r in test}}
    overlap = counts["test_train_overlap"]
    assert overlap["test_rows_sharing_an_ngram"] == sum(
        bool(test_grams[r["source_function"]] & train_grams) for r in test)
    every = set().union(*test_grams.values())
    assert (overlap["test_ngrams"], overlap["test_ngrams_in_train"]) == (
        len(every), len(every & train_grams))
    print(f"{split}: {counts['nested_functions']} of {counts['source_functions']} source "
          f"functions nested, {counts['functions_sharing_a_body']} share a body; "
          f"overlap {overlap}")


def _check_that_misbehaves(job):
    """A worker's check that dies on one row and hangs on another (picklable by name)."""
    import os
    import time

    from trackb_core.filters import FilterVerdict

    row, _ = job
    if row["id"] == "dies":
        os._exit(3)
    if row["id"] == "hangs":
        time.sleep(600)
    return row, FilterVerdict(None), False


def test_a_worker_that_dies_or_hangs_costs_its_own_row_only():
    from trackb_core.dataset import WORKER_DIED, WORKER_HUNG, _check_in_pool

    ids = ["a", "b", "dies", "c", "hangs", "d", "e"]
    jobs = [({"id": i}, None) for i in ids]
    results = _check_in_pool(jobs, workers=2, hang_seconds=5, check=_check_that_misbehaves)
    assert [r[0]["id"] if r[0] else r[1].reason for r in results] == [
        "a", "b", WORKER_DIED, "c", WORKER_HUNG, "d", "e"]
