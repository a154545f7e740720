"""The real corpus: verl 0.9.1 from PyPI, through extract -> generate -> build-dataset."""

from __future__ import annotations

import ast
import io
import json
import tokenize

import pytest

from trackb_core.mutations import MAX_KIND_SHARE, SEED_KINDS, changed_site

pytestmark = pytest.mark.integration
VERL = "pypi:verl==0.9.1"


def rows(path):
    return [json.loads(line) for line in path.open()]


def test_extract_finds_the_documented_number_of_functions(verl_dataset):
    _, manifests = verl_dataset
    counts = manifests["extract"]["counts"]
    assert 2500 <= counts["functions"] <= 3500, counts  # 3,287 in verl 0.9.1 (tests/ and scripts/ included)
    assert manifests["extract"]["inputs"]["corpus"]["sha256"]


def test_no_source_function_in_both_train_and_test(verl_dataset):
    folder, _ = verl_dataset
    train, test = rows(folder / "train.jsonl"), rows(folder / "test.jsonl")
    assert len(train) > 1000 and len(test) > 100
    assert not {r["function_id"] for r in train} & {r["function_id"] for r in test}

    def normalised(source: str) -> str:
        return " ".join(source.split())

    # Also by content: exact-duplicate bodies from different files stay on one side.
    assert not ({normalised(r["source_function"]) for r in train}
                & {normalised(r["source_function"]) for r in test})


def test_split_is_stratified_by_category(verl_dataset):
    folder, _ = verl_dataset
    train, test = rows(folder / "train.jsonl"), rows(folder / "test.jsonl")
    for category in {r["category"] for r in train + test}:
        n_test = sum(r["category"] == category for r in test)
        n_all = n_test + sum(r["category"] == category for r in train)
        assert 0.10 <= n_test / n_all <= 0.20, (category, n_test, n_all)


def _strings_and_comments(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.STRING, tokenize.COMMENT)]


def test_bugfix_items_are_one_site_mutants_with_balanced_kinds(verl_dataset):
    folder, manifests = verl_dataset
    tasks = rows(folder.parent / "extract" / "tasks.jsonl")
    bugfix = [t for t in tasks if t["category"] == "bugfix"]
    kinds = manifests["extract"]["counts"]["mutation_kinds"]
    assert sum(kinds.values()) == len(bugfix) > 2000
    assert max(kinds.values()) <= MAX_KIND_SHARE * len(bugfix), kinds
    assert all(kinds[kind] > 0 for kind in SEED_KINDS), kinds
    for task in bugfix:
        source, buggy, mutation = task["source_function"], task["buggy_source"], \
            task["mutation"]
        site = changed_site(ast.parse(source), ast.parse(buggy))
        assert site is not None, task["id"]
        changed = [i + 1 for i, (a, b) in enumerate(zip(source.split("\n"),
                                                        buggy.split("\n"), strict=True))
                   if a != b]
        assert changed == [mutation["line"]], task["id"]
        assert _strings_and_comments(buggy) == _strings_and_comments(source), task["id"]
    # unit_test rows carry their function's mutant, so tests can be checked to catch it
    with_mutant = [t for t in tasks if t["category"] == "unit_test" and "mutation" in t]
    assert len(with_mutant) > 1000
