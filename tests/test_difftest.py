"""Hidden tests by differential execution: derived from what the original does, kept only
when they tell it from its mutant and from a stub, and run on answers like EvalPlus does."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from trackb_core import difftest
from trackb_core.families import CheckContext, get
from trackb_core.testrun import hidden_test_verdict

MODULE = textwrap.dedent('''\
    """A small pure module, like the helpers a real corpus holds."""


    def clamp(value: int, low: int, high: int) -> int:
        """Clamp value into [low, high]."""
        if value < low:
            return low
        if value > high:
            return high
        return value


    def dedupe(items: list) -> list:
        """Keep the first of each item."""
        seen = []
        for item in items:
            if item not in seen:
                seen.append(item)
        return seen


    class Text:
        @staticmethod
        def shout(text: str) -> str:
            """Upper-case and end with a bang."""
            if not text:
                return "!"
            return text.upper() + "!"

        def width(self, text: str) -> int:
            """The longest line of text."""
            lines = text.split("\\n")
            return max(len(line) for line in lines) if lines else 0


    def noisy(count: int) -> int:
        """Not deterministic: no test can be derived from it."""
        import random
        return random.randint(0, 10 ** 9) + count
''')

MUTANTS = {
    "clamp": ("if value < low:", "if value <= low:"),
    "dedupe": ("if item not in seen:", "if item in seen:"),
    "shout": ("if not text:", "if text:"),
    "width": ("return max(len(line) for line in lines) if lines else 0",
              "return max(len(line) for line in lines) if not lines else 0"),
    "noisy": ("+ count", "- count"),
}


def function_rows(corpus: Path) -> list[dict]:
    from trackb_core.extract import extract_functions

    rows, _, _ = extract_functions(corpus, sorted(corpus.rglob("*.py")), 3, 60, 1_000_000)
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "helpers.py").write_text(MODULE)
    return root


@pytest.fixture(scope="module")
def derived(corpus):
    rows = function_rows(corpus)
    mutants = {}
    for row in rows:
        before, after = MUTANTS[row["name"]]
        assert before in row["source"], row["name"]
        mutants[row["id"]] = row["source"].replace(before, after)
    return rows, mutants, difftest.derive_tests(rows, mutants, corpus, seed=0, workers=2)


def item_for(row: dict, mutant: str, tests: dict | None) -> dict:
    return {"source_file": row["file"], "qualname": row["qualname"],
            "function_name": row["name"], "line": row["line"], "end_line": row["end_line"],
            "source_function": row["source"], "signature": row["signature"],
            "buggy_source": mutant, "hidden_tests": tests}


def fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def test_value_pools_come_from_the_default_then_the_annotation_then_the_name():
    assert difftest.value_pools({"name": "x", "annotation": "int", "default": "5"})[:2] == \
        ["5", "0"]
    assert set(difftest.value_pools({"name": "flag", "annotation": None, "default": None})) \
        == {"True", "False"}
    assert "''" in difftest.value_pools({"name": "prefix", "annotation": None, "default": None})
    assert "None" in difftest.value_pools({"name": "a", "annotation": "list[int] | None",
                                           "default": None})
    # every pool value is a literal a test file can hold (tensors: torch.tensor(<literal>))
    for kind, values in difftest.POOLS.items():
        for value in values:
            if kind == "tensor":
                assert value.startswith("torch.tensor(")
                ast.literal_eval(ast.parse(value).body[0].value.args[0])
            elif value != "set()":
                ast.literal_eval(value)
    assert difftest.value_pools({"name": "mask", "annotation": None, "default": None})[0] \
        .startswith("torch.tensor(")


def test_the_calls_tried_are_the_same_for_the_same_function_and_seed(corpus):
    row = next(r for r in function_rows(corpus) if r["name"] == "clamp")
    assert difftest.plan_calls(row, seed=0) == difftest.plan_calls(row, seed=0)
    assert difftest.plan_calls(row, seed=0) != difftest.plan_calls(row, seed=1)
    assert len(difftest.plan_calls(row, seed=0)) <= difftest.MAX_CALLS


def test_the_stub_keeps_the_signature_and_docstring_and_returns_none():
    stub = difftest.stub_of('def f(a, b=2):\n    """Doc."""\n    return a + b\n')
    assert stub == 'def f(a, b=2):\n    """Doc."""\n    return None\n'
    assert difftest.stub_of("def f(a): return a\n") is None  # body on the def line


def test_deterministic_functions_get_tests_and_a_random_one_does_not(derived):
    rows, _, result = derived
    by_name = {r["name"]: r["id"] for r in rows}
    for name in ("clamp", "dedupe", "shout", "width"):
        assert by_name[name] in result.tests, (name, result.reasons.get(by_name[name]))
    assert by_name["noisy"] not in result.tests
    assert result.modules == {"pkg/helpers.py": "imported"}
    counts = result.counts(rows)
    assert counts["functions_with_tests"] == 4 and counts["importable_share"] == 1.0


def test_derived_tests_are_plain_asserts_that_need_no_pytest(derived):
    rows, _, result = derived
    for tests in result.tests.values():
        tree = ast.parse(tests["code"])
        assert "pytest" not in tests["code"]
        assert any(isinstance(n, ast.Assert) for n in ast.walk(tree))
        assert tests["cases"] >= 1 and tests["version"] == difftest.VERSION
        assert set(tests) == {"code", "cases", "version"}  # nothing machine-dependent


@pytest.mark.parametrize("name", ["clamp", "dedupe", "shout", "width"])
def test_hidden_tests_pass_the_original_and_fail_the_mutant_the_stub_and_a_dead_code_fix(
        derived, corpus, name):
    rows, mutants, result = derived
    row = next(r for r in rows if r["name"] == name)
    item = item_for(row, mutants[row["id"]], result.tests[row["id"]])
    original = hidden_test_verdict(row["source"], item, corpus)
    assert original["hidden"] == "passed"
    # the original, reformatted (not byte-equal): the tests really run and pass
    renamed = row["source"].replace("    ", "  ")
    assert hidden_test_verdict(renamed, item, corpus)["hidden"] == "passed", renamed
    assert hidden_test_verdict(mutants[row["id"]], item, corpus)["hidden"] == "failed"
    stub = difftest.stub_of(row["source"])
    assert hidden_test_verdict(stub, item, corpus)["hidden"] == "failed"
    # the site restored where it never runs, the bug left where it does
    before, after = MUTANTS[name]
    body = textwrap.dedent(row["source"]).split("\n")
    indent = "    "
    dead = "\n".join([body[0], f"{indent}if False:", f"{indent}    pass  # {before}",
                      *[line for line in textwrap.dedent(mutants[row["id"]]).split("\n")[1:]]])
    assert hidden_test_verdict(dead, item, corpus)["hidden"] == "failed", dead


def test_complete_and_bugfix_pass_only_on_hidden_tests_and_say_when_there_are_none(
        derived, corpus):
    rows, mutants, result = derived
    row = next(r for r in rows if r["name"] == "clamp")
    item = item_for(row, mutants[row["id"]], result.tests[row["id"]])
    context = CheckContext(corpus)
    for family in (get("complete"), get("bugfix")):
        good = family.verdict(fence(row["source"]), item, context)
        assert family.functional_check(good) is True
        trivial = family.verdict(fence(row["signature"] + "\n    return None"), item, context)
        assert family.functional_check(trivial) is False
        untested = family.verdict(fence(row["source"]), {**item, "hidden_tests": None}, context)
        assert untested["hidden"] == "no_tests" and family.functional_check(untested) is None
        no_corpus = family.verdict(fence(row["source"]), item, CheckContext(None))
        assert family.functional_check(no_corpus) is None


def test_an_answer_without_the_function_or_that_loops_fails_and_a_hostile_one_cannot_pass(
        derived, corpus):
    rows, mutants, result = derived
    row = next(r for r in rows if r["name"] == "dedupe")
    item = item_for(row, mutants[row["id"]], result.tests[row["id"]])
    assert hidden_test_verdict("def other():\n    return 1", item, corpus)["hidden"] \
        == "failed"
    loops = row["signature"] + "\n    while True:\n        pass\n"
    verdict = hidden_test_verdict(loops, item, corpus)
    assert verdict["hidden"] == "failed" and "CPU" in verdict["hidden_reason"]
    # forging the runner's report, exiting early, or patching the assertion helper
    for hostile in (
        row["signature"] + "\n    import os\n    os.write(3, b'{\"stage\": \"ran\"}\\n')\n",
        row["signature"] + "\n    raise SystemExit(0)\n",
        row["signature"] + "\n    import builtins\n    builtins.AssertionError = KeyError\n"
                           "    return []\n",
    ):
        assert hidden_test_verdict(hostile, item, corpus)["hidden"] == "failed", hostile


def test_unit_test_reference_answers_are_the_derived_tests(derived):
    rows, mutants, result = derived
    row = next(r for r in rows if r["name"] == "shout")
    task = {**item_for(row, mutants[row["id"]], result.tests[row["id"]])}
    answer, reason = get("unit_test").reference_answer(task, row["source"], None)
    assert reason is None and result.tests[row["id"]]["code"].strip() in answer
    assert get("unit_test").reference_answer({**task, "hidden_tests": None}, row["source"],
                                             None) == (None, "no_reference_unit_test")


def verdicts_of(derived, corpus) -> dict[tuple[str, str], str]:
    rows, mutants, result = derived
    out = {}
    for row in rows:
        if row["id"] not in result.tests:
            continue
        item = item_for(row, mutants[row["id"]], result.tests[row["id"]])
        answers = {"original": row["source"].replace("    ", "  "),
                   "mutant": mutants[row["id"]], "stub": difftest.stub_of(row["source"]),
                   "loop": row["signature"] + "\n    while True:\n        pass\n"}
        for kind, code in answers.items():
            out[(row["name"], kind)] = hidden_test_verdict(code, item, corpus)["hidden"]
    return out


def test_a_busy_machine_changes_no_functional_verdict(derived, corpus):
    """Budgets are CPU seconds, so CPU-bound neighbours (twice as many as cores) slow the
    runs down without flipping one: not even the answer that loops forever."""
    import os
    import subprocess
    import sys

    quiet = verdicts_of(derived, corpus)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 1))]
    try:
        busy = verdicts_of(derived, corpus)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert busy == quiet
    assert {v for (_, kind), v in quiet.items() if kind == "original"} == {"passed"}
    assert {v for (_, kind), v in quiet.items() if kind != "original"} == {"failed"}


def test_a_mutant_that_runs_out_of_time_is_no_kill_and_an_original_that_does_is_no_verdict():
    from trackb_core.testrun import kills_of, side_status

    ran = {"outcome": "ran", "results": [["t", "timeout", "over"]], "cpu": [1.0]}
    assert side_status(ran) == "timeout"
    assert kills_of(ran, 1) == (None, "timeout")
    assert kills_of({"outcome": "timeout", "results": []}, 1) == (None, "timeout")
    failed = {"outcome": "ran", "results": [["t", "failed", "x"], ["u", "timeout", ""]]}
    assert kills_of(failed, 2) == (True, "failed")
    assert kills_of({"outcome": "ran", "results": [["t", "passed", ""]]}, 1) == (False, "passed")


def test_forked_workers_building_one_corpus_view_at_once_all_get_it(corpus):
    """Filter workers are forked after the parent made the view root: two of them building
    the same view must both end up with it, neither failing on the other's rename."""
    import multiprocessing

    from trackb_core import testrun

    testrun._view_root()  # the parent holds the root before the fork, as build-dataset does
    testrun._VIEWS.clear()
    with multiprocessing.get_context("fork").Pool(4) as pool:
        views = pool.starmap(_build_in_child, [(str(corpus),)] * 8)
    assert len(set(views)) == 1 and Path(views[0], "pkg", "__init__.py").is_file()


def _build_in_child(corpus: str) -> str:
    from trackb_core import testrun

    return str(testrun.corpus_view(Path(corpus), "pkg/helpers.py"))


def test_a_module_whose_import_kills_the_interpreter_costs_only_its_own_tests(tmp_path):
    """Modules share derivation runs; one that aborts the process on import must not take
    the tests of the others with it (the run is split until the culprit is alone)."""
    root = tmp_path / "corpus"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "helpers.py").write_text(MODULE)
    (root / "pkg" / "boom.py").write_text(
        "import os\nos.abort()\n\n\ndef twice(x: int) -> int:\n    y = x\n    y = y * 2\n"
        "    if y > 100:\n        return 100\n    return y\n")
    rows = function_rows(root)
    mutants = {r["id"]: r["source"].replace(*MUTANTS.get(r["name"], ("y > 100", "y >= 100")))
               for r in rows}
    result = difftest.derive_tests(rows, mutants, root, seed=0, workers=1)
    assert result.modules["pkg/helpers.py"] == "imported"
    assert result.modules["pkg/boom.py"].startswith("error")
    tested = {r["name"] for r in rows if r["id"] in result.tests}
    assert {"clamp", "dedupe", "shout"} <= tested and "twice" not in tested


def test_functions_of_tensors_get_tests_that_rebuild_and_compare_tensors(tmp_path):
    pytest.importorskip("torch")
    root = tmp_path / "corpus"
    (root / "ops").mkdir(parents=True)
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "masks.py").write_text(textwrap.dedent('''\
        import torch


        def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            """Mean of values where mask is set."""
            total = (values * mask).sum()
            count = mask.sum()
            if count > 0:
                return total / count
            return total
        '''))
    rows = function_rows(root)
    mutants = {r["id"]: r["source"].replace("if count > 0:", "if count >= 0:") for r in rows}
    result = difftest.derive_tests(rows, mutants, root, seed=0, workers=1)
    row = rows[0]
    assert row["id"] in result.tests, result.reasons
    code = result.tests[row["id"]]["code"]
    assert code.startswith("import torch") and "torch.tensor(" in code
    item = item_for(row, mutants[row["id"]], result.tests[row["id"]])
    assert hidden_test_verdict(row["source"].replace("    ", "  "), item, root)["hidden"] \
        == "passed"
    assert hidden_test_verdict(mutants[row["id"]], item, root)["hidden"] == "failed"


def test_a_test_that_fills_memory_is_killed_for_what_it_keeps_resident(corpus, monkeypatch):
    """Address space is not memory (CUDA torch reserves gigabytes it never touches), so
    imports get a large one; what a run keeps resident is watched and capped."""
    from trackb_core import testrun

    monkeypatch.setattr(testrun, "RESIDENT_MB", 200)
    hog = ("def test_hog():\n    blocks = []\n    while True:\n"
           "        blocks.append(bytearray(16 << 20))\n")
    item = {"source_file": "pkg/helpers.py", "qualname": "clamp"}
    run = testrun.run_against(hog, item, corpus, testrun.Budget(test_cpu=30))
    assert run["outcome"] == "error" and "resident" in run["sandbox"].reason
