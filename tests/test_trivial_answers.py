"""Trivial answers earn no pass: over the real verl test split, the answers an evaluation
researcher tries first — the signature with ``return None``, an echo of the code in the
prompt, an empty string, the prompt repeated, the buggy code unchanged — score 0 on every
headline metric outside the seed block whose name says *pass*.

Before metric version 3 they reached a greedy "strict pass@1" of about 0.70 here: a
completion passed by keeping the signature, an explanation by echoing the code.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from trackb_core.codeblocks import first_code
from trackb_core.metrics import score_all

pytestmark = pytest.mark.integration

# unit_test items from extract (the reference teacher writes no tests, so none reach the
# split): enough to cover the family without running a sandbox per item
UNIT_TEST_ITEMS = 40


def fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def signature_return_none(item: dict) -> str:
    signature = str(item.get("signature") or "def f():").rstrip()
    return fence(f"{signature}\n    return None")


def code_echo(item: dict) -> str:
    # the code the prompt shows: the function, its stub or its mutant
    return fence(first_code(item["instruction"]) or "")


TRIVIAL = {
    "signature_return_none": signature_return_none,
    "code_echo": code_echo,
    "empty": lambda item: "",
    "prompt_repeated": lambda item: item["instruction"],
    "buggy_unchanged": lambda item: fence(item.get("buggy_source") or item["source_function"]),
}


@pytest.fixture(scope="module")
def real_items(verl_dataset):
    folder, manifests = verl_dataset
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    tasks_file = folder.parent / "extract" / "tasks.jsonl"
    tasks = [json.loads(line) for line in tasks_file.read_text().splitlines()]
    unit_tests = [t for t in tasks if t["category"] == "unit_test" and t.get("buggy_source")]
    unit_tests = random.Random(0).sample(unit_tests, min(UNIT_TEST_ITEMS, len(unit_tests)))
    return test + unit_tests


@pytest.mark.parametrize("kind", sorted(TRIVIAL))
def test_a_trivial_answer_scores_zero_on_every_pass_metric(real_items, kind):
    answer = TRIVIAL[kind]
    predictions = {str(item["id"]): {"greedy": answer(item), "samples": [answer(item)] * 3}
                   for item in real_items}
    result = score_all(real_items, predictions, kind, corpus_dir=None, n_boot=20)
    categories = {item["category"] for item in real_items}
    assert {"bugfix", "complete", "docstring", "explain", "unit_test"} <= categories

    passes = {name: entry for name, entry in result["headline"].items()
              if re.search("pass", name) and entry["section"] != "seed"}
    assert {"functional_pass_greedy", "functional_pass_at_1",
            "functional_pass_at_3"} <= set(passes)
    for name, entry in passes.items():
        assert entry["n"] > 0, name  # measured, not skipped
        assert entry["value"] == 0.0, (kind, name, entry)
    for category, metrics in result["per_category"].items():
        for name, entry in metrics.items():
            if "pass" in name and not name.startswith("seed_"):
                assert entry["value"] in (0.0, None), (kind, category, name, entry)


def dead_code_fix(item: dict) -> str:
    """The bug left where it runs, the original body restored where it never does."""
    import textwrap

    buggy = textwrap.dedent(item["buggy_source"]).rstrip("\n")
    original = textwrap.dedent(item["source_function"]).split("\n")
    header = next(i for i, line in enumerate(original) if line.rstrip().endswith(":"))
    body = textwrap.dedent("\n".join(original[header + 1:]))
    return buggy + "\n    if False:\n" + textwrap.indent(body.rstrip("\n"), " " * 8) + "\n"


def with_a_no_op(source: str) -> str:
    """The original with a ``pass`` before its body: the same behaviour, another AST (so
    the hidden tests really run on it)."""
    import textwrap

    lines = textwrap.dedent(source).split("\n")
    header = next(i for i, line in enumerate(lines) if line.rstrip().endswith(":"))
    return "\n".join([*lines[:header + 1], "    pass", *lines[header + 1:]])


@pytest.fixture(scope="module")
def verl_hidden_items():
    """complete and bugfix tasks of verl/utils (every module there) with the hidden tests
    derived for them, as extract derives them, and the corpus folder."""
    from pathlib import Path

    from trackb_core import difftest
    from trackb_core.corpus import resolve_corpus
    from trackb_core.extract import extract_functions
    from trackb_core.tasks import build_tasks

    corpus = Path(resolve_corpus("pypi:verl==0.9.1").path)
    files = [p for p in sorted(corpus.rglob("*.py")) if "verl/utils/" in p.as_posix()]
    functions, _, _ = extract_functions(corpus, files, 5, 60, 1_000_000)
    tasks, _ = build_tasks(functions, ["bugfix", "complete"], 42)
    mutants = {t["function_id"]: t["buggy_source"] for t in tasks if t.get("buggy_source")}
    derived = difftest.derive_tests(functions, mutants, corpus, seed=42, workers=2)
    for task in tasks:
        if task["function_id"] in derived.tests:
            task["hidden_tests"] = derived.tests[task["function_id"]]
    tested = {c: [t for t in tasks if t["category"] == c and t.get("hidden_tests")]
              for c in ("complete", "bugfix")}
    return tested, corpus


def test_signature_only_completions_and_dead_code_fixes_fail_the_hidden_tests(
        verl_hidden_items):
    """Over real verl items with hidden tests: the original passes them, a completion that
    keeps only the signature fails them, and so does a fix that restores the original only
    in code that never runs (the bug stays where it runs)."""
    from concurrent.futures import ThreadPoolExecutor

    from trackb_core.testrun import hidden_test_verdict

    tested, corpus = verl_hidden_items
    assert all(len(items) >= 20 for items in tested.values()), \
        {c: len(items) for c, items in tested.items()}
    checks = [(with_a_no_op(item["source_function"]), item, "passed")
              for item in tested["complete"][:5]]
    checks += [(first_code(signature_return_none(item)), item, "failed")
               for item in tested["complete"][:20]]
    checks += [(dead_code_fix(item), item, "failed") for item in tested["bugfix"][:20]]
    with ThreadPoolExecutor(2) as pool:
        verdicts = list(pool.map(lambda c: hidden_test_verdict(c[0], c[1], corpus), checks))
    for (code, item, wanted), verdict in zip(checks, verdicts, strict=True):
        assert verdict["hidden"] == wanted, (item["id"], wanted, verdict, code)
