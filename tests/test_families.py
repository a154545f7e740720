"""Each task family's verdict, pinned on crafted responses."""

from __future__ import annotations

import textwrap

import pytest

from trackb_core.families import bugfix, complete, docstring, explain, unit_test
from trackb_core.placeholders import has_placeholder

ORIGINAL = '''def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''
BUGGY = ORIGINAL.replace("if value < low:", "if value >= low:")
MUTATION = {"kind": "eq_flip", "line": 3, "before": "    if value < low:",
            "after": "    if value >= low:"}
ITEM = {
    "id": "m:clamp-bugfix", "category": "bugfix", "source_function": ORIGINAL,
    "buggy_source": BUGGY, "mutation": MUTATION, "function_name": "clamp",
    "qualname": "clamp", "signature": "def clamp(value, low, high):",
    "params": ["value", "low", "high"], "returns_value": True,
}


def fenced(code: str, prose: str = "The comparison was wrong; fixed below.") -> str:
    return f"{prose}\n\n```python\n{textwrap.dedent(code).strip()}\n```\n"


# -- bugfix -------------------------------------------------------------------------------


def test_correct_fix_with_other_formatting_and_comments_is_exact():
    reformatted = ORIGINAL.replace('"""Clamp value into [low, high]."""',
                                   "# clamps").replace("return value", "return (value)  # ok")
    verdict = bugfix.bugfix_verdict(fenced(reformatted), ITEM)
    assert verdict == {"parses": True, "exact_fix": True, "site_restored": True}


def test_fix_inside_its_class_is_found():
    method = "class Holder:\n" + textwrap.indent(ORIGINAL, "    ")
    assert bugfix.bugfix_verdict(fenced(method), ITEM)["exact_fix"]


def test_partial_fix_restores_the_site_with_other_edits():
    edited = ORIGINAL.replace("return value", "return int(value)")
    verdict = bugfix.bugfix_verdict(fenced(edited), ITEM)
    assert verdict == {"parses": True, "exact_fix": False, "site_restored": True}


def test_wrong_fix_leaves_the_site_broken():
    wrong = BUGGY.replace("value > high", "value >= high")
    assert bugfix.bugfix_verdict(fenced(wrong), ITEM) == {
        "parses": True, "exact_fix": False, "site_restored": False}


def test_echoing_the_buggy_code_is_no_fix():
    verdict = bugfix.bugfix_verdict(fenced(BUGGY), ITEM)
    assert not verdict["exact_fix"] and not verdict["site_restored"]


def test_only_the_definition_python_binds_is_judged():
    # the right function first, the bug again last: running this code binds the bug
    shadowed = ORIGINAL + "\n\n" + BUGGY
    assert bugfix.bugfix_verdict(fenced(shadowed), ITEM) == {
        "parses": True, "exact_fix": False, "site_restored": False}
    # and the other way round the fix is what Python binds
    assert bugfix.bugfix_verdict(fenced(BUGGY + "\n\n" + ORIGINAL), ITEM)["exact_fix"]
    # a method of the same name does not shadow the top-level function
    decoy = ORIGINAL + "\n\nclass Other:\n" + textwrap.indent(BUGGY, "    ")
    assert bugfix.bugfix_verdict(fenced(decoy), ITEM)["exact_fix"]


def test_a_site_restored_in_dead_code_is_not_a_fix():
    # the original site appears, unreachable, after an early return of the buggy logic
    dead = BUGGY.replace('    """Clamp value into [low, high]."""\n',
                         '    """Clamp value into [low, high]."""\n'
                         '    if value >= low:\n        return low\n    return value\n'
                         '    if value < low:\n        return low\n')
    verdict = bugfix.bugfix_verdict(fenced(dead), ITEM)
    assert verdict["exact_fix"] is False
    # (its hidden tests fail it too: tests/test_difftest.py, tests/test_trivial_answers.py)


def test_the_functional_check_of_a_fix_is_its_hidden_tests_never_the_text():
    check = bugfix.FAMILY.functional_check
    assert check({"exact_fix": True, "hidden": "no_tests"}) is None
    assert check({"exact_fix": False, "site_restored": True, "hidden": "passed"}) is True
    assert check({"exact_fix": True, "hidden": "failed"}) is False
    assert check({"exact_fix": True, "hidden": "timeout"}) is None
    assert check({"exact_fix": True, "hidden": "not_executable"}) is None


@pytest.mark.parametrize("response", [
    "", "There is a bug in the comparison.",
    "```python\ndef clamp(value, low, high):\n    if value < low:\n```",  # truncated
])
def test_empty_prose_only_and_truncated_answers_do_not_parse(response):
    assert bugfix.bugfix_verdict(response, ITEM) == {
        "parses": False, "exact_fix": False, "site_restored": False}


def test_removed_return_value_site():
    original = "def first(items):\n    for item in items:\n        return item\n    return None\n"
    buggy = original.replace("return item", "return")
    edited = original.replace("for item in items", "for item in list(items)")
    assert bugfix.restores_site(edited, original, buggy, {})
    assert not bugfix.restores_site(buggy.replace("in items", "in list(items)"), original,
                                    buggy, {})


def test_site_falls_back_to_the_mutation_lines_when_the_mutant_does_not_parse():
    mutation = {"before": "    if value < low:", "after": "    if value >= low:"}
    edited = ORIGINAL.replace("return value", "return int(value)")
    assert bugfix.restores_site(edited, ORIGINAL, "not python (", mutation)
    assert not bugfix.restores_site(BUGGY, ORIGINAL, "not python (", mutation)


# -- complete -----------------------------------------------------------------------------


def test_complete_exact_answer():
    verdict = complete.complete_verdict(fenced(ORIGINAL), ITEM)
    assert verdict == {"parses": True, "keeps_signature": True, "not_echo": True,
                       "exact_match": True, "edit_similarity": 1.0}


def test_complete_echoing_the_stub_is_an_echo():
    stub = 'def clamp(value, low, high):\n    """Clamp value into [low, high]."""\n    ...\n'
    verdict = complete.complete_verdict(fenced(stub), ITEM)
    assert verdict["parses"] and verdict["keeps_signature"]
    assert not verdict["not_echo"] and not verdict["exact_match"]
    raising = "def clamp(value, low, high):\n    raise NotImplementedError\n"
    assert not complete.complete_verdict(fenced(raising), ITEM)["not_echo"]


def test_complete_is_judged_on_the_definition_the_code_binds():
    stub = 'def clamp(value, low, high):\n    """Clamp value into [low, high]."""\n    ...\n'
    # the real body first, the stub last: the stub is what a caller gets
    verdict = complete.complete_verdict(fenced(ORIGINAL + "\n\n" + stub), ITEM)
    assert verdict["keeps_signature"] and not verdict["not_echo"]
    assert not verdict["exact_match"]
    # a right body behind a wrong signature is bound last: its signature is what counts
    moved = ORIGINAL.replace("def clamp(value, low, high):", "def clamp(value, low):")
    verdict = complete.complete_verdict(fenced(ORIGINAL + "\n\n" + moved), ITEM)
    assert not verdict["keeps_signature"]


def test_complete_with_changed_arguments_does_not_keep_the_signature():
    changed = "def clamp(value, low=0, high=1):\n    return max(low, min(value, high))\n"
    verdict = complete.complete_verdict(fenced(changed), ITEM)
    assert verdict["parses"] and verdict["not_echo"] and not verdict["keeps_signature"]
    assert 0.0 < verdict["edit_similarity"] < 1.0


def test_complete_different_but_valid_body_scores_partial_similarity():
    other = "def clamp(value, low, high):\n    return max(low, min(value, high))\n"
    verdict = complete.complete_verdict(fenced(other), ITEM)
    assert verdict["keeps_signature"] and verdict["not_echo"] and not verdict["exact_match"]
    close = ORIGINAL.replace("return value", "return value + 0")
    assert complete.complete_verdict(fenced(close), ITEM)["edit_similarity"] \
        > verdict["edit_similarity"]


def test_complete_empty_output():
    verdict = complete.complete_verdict("", ITEM)
    assert verdict == {"parses": False, "keeps_signature": False, "not_echo": False,
                       "exact_match": False, "edit_similarity": 0.0}


# -- docstring ----------------------------------------------------------------------------

FULL_DOCSTRING = '''"""Clamp a value into a closed range.

Args:
    value (float): The number to clamp.
    low: Lower bound.
    high (float): Upper bound; must not be below
        low: the caller checks it.

Returns:
    float: ``value`` limited to ``[low, high]``.
"""'''


def test_complete_google_docstring_is_ok():
    verdict = docstring.docstring_verdict(fenced(FULL_DOCSTRING), ITEM)
    assert verdict == {"has_docstring": True, "google_style": True, "args_coverage": 1.0,
                       "has_returns": True, "ok": True}


def test_missing_args_entry_lowers_coverage():
    missing = FULL_DOCSTRING.replace("    low: Lower bound.\n", "")
    verdict = docstring.docstring_verdict(fenced(missing), ITEM)
    assert verdict["google_style"] and not verdict["ok"]
    assert verdict["args_coverage"] == pytest.approx(2 / 3)  # continuation lines don't count


def test_missing_returns_and_missing_args_section():
    no_returns = FULL_DOCSTRING.split("Returns:")[0] + '"""'
    assert not docstring.docstring_verdict(fenced(no_returns), ITEM)["has_returns"]
    summary_only = '"""Clamp a value into a closed range."""'
    verdict = docstring.docstring_verdict(fenced(summary_only), ITEM)
    assert not verdict["google_style"] and verdict["args_coverage"] == 0.0


def test_docstring_for_a_function_without_params_or_return():
    item = {"source_function": "def reset(self):\n    self.count = 0\n", "params": [],
            "returns_value": False}
    verdict = docstring.docstring_verdict('"""Reset the counter to zero."""', item)
    assert verdict["ok"]


def test_docstring_inside_a_function_definition_and_derived_params():
    item = {"source_function": "def area(self, width, *args, **kwargs):\n"
                               "    return width\n"}
    answer = fenced('def area(self, width, *args, **kwargs):\n    """Area.\n\n    Args:\n'
                    '        width: W.\n        *args: More.\n        **kwargs: Options.\n\n'
                    '    Yields:\n        W.\n    """\n    return width\n')
    assert docstring.docstring_verdict(answer, item)["ok"]


# -- explain ------------------------------------------------------------------------------


def test_explain_naming_every_parameter_and_the_return():
    text = ("**Purpose** Limits a number.\n**Parameters** `value`, `low` and `high`.\n"
            "**Returns**\n\nThe clamped number.")
    assert explain.explain_verdict(text, ITEM) == {"substantive": True, "param_coverage": 1.0,
                                                  "mentions_return": True, "ok": True}


def test_explain_missing_a_parameter_and_saying_it_returns_nothing():
    text = "Takes value and low. Returns nothing."
    verdict = explain.explain_verdict(text, ITEM)
    assert verdict["param_coverage"] == pytest.approx(2 / 3)
    assert not verdict["mentions_return"] and not verdict["ok"]
    # a parameter name inside a longer word does not count
    assert explain.explain_verdict("lowest values", ITEM)["param_coverage"] == 0.0


def test_explain_of_a_function_that_returns_nothing_needs_no_return_text():
    item = {"params": ["path"], "returns_value": False, "source_function": "def f(path): pass"}
    assert explain.explain_verdict("Deletes the file found at path, if it exists.", item)["ok"]


@pytest.mark.parametrize("text", ["", "the the the the the the the", "0.0.0, 2.0.0 0.0"])
def test_an_explanation_that_says_nothing_fails_even_with_nothing_to_cover(text):
    item = {"params": [], "returns_value": False, "source_function": "def f(): pass"}
    verdict = explain.explain_verdict(text, item)
    assert not verdict["substantive"] and not verdict["ok"]


def test_an_explanation_that_echoes_the_code_is_not_prose():
    # the function itself, fenced or not: names every parameter and says "return"
    for echo in (fenced(ORIGINAL, prose=""), ORIGINAL, "This function:\n" + ORIGINAL):
        verdict = explain.explain_verdict(echo, ITEM)
        assert not verdict["substantive"] and not verdict["ok"], echo
    assert explain.FAMILY.functional_check(explain.explain_verdict(ORIGINAL, ITEM)) is None


def test_prose_around_the_code_is_judged_without_it():
    text = ("The function keeps `value` between `low` and `high` and returns the clamped "
            "number.\n\n" + fenced(ORIGINAL, prose=""))
    assert explain.explain_verdict(text, ITEM)["ok"]


@pytest.mark.parametrize("text", ["", "    # 2.0, 1.0.0\n    # the the", "Resets it."])
def test_an_answer_without_a_docstring_literal_fails_even_with_nothing_to_cover(text):
    item = {"source_function": "def reset(self):\n    self.count = 0\n", "params": [],
            "returns_value": False}
    verdict = docstring.docstring_verdict(text, item)
    assert not verdict["has_docstring"] and not verdict["google_style"]
    assert not verdict["ok"]


# -- placeholders -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "TODO: write this", "from your_module import clamp", "from path.to.module import f",
    "```python\ndef f(x):\n    ...\n```", "    # rest of the code here", "<insert code>",
])
def test_placeholders_are_found(text):
    assert has_placeholder(text)


def test_real_code_has_no_placeholder():
    assert not has_placeholder(fenced(ORIGINAL))
    assert not has_placeholder(fenced("def f(x):\n    return x[...]\n"))


# -- unit_test ----------------------------------------------------------------------------

MODULE = '''"""A small module."""
from shop.util.helpers import double


def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value


class Basket:
    def total(self, n):
        return double(n) + 1
'''


@pytest.fixture
def corpus(tmp_path):
    """A tiny corpus: a package whose __init__ imports a missing heavy library."""
    root = tmp_path / "corpus"
    (root / "shop" / "util").mkdir(parents=True)
    (root / "shop" / "__init__.py").write_text("import torch_nonexistent\n")
    (root / "shop" / "util" / "__init__.py").write_text("")
    (root / "shop" / "util" / "maths.py").write_text(MODULE)
    (root / "shop" / "util" / "helpers.py").write_text("def double(n):\n    return 2 * n\n")
    (root / "shop" / "heavy.py").write_text(
        "import torch_nonexistent\n\n\ndef ident(x):\n    return x\n")
    return root


def unit_item(**extra) -> dict:
    source = ORIGINAL.rstrip("\n")
    item = {"category": "unit_test", "source_function": source, "source_file":
            "shop/util/maths.py", "qualname": "clamp", "function_name": "clamp",
            "line": 5, "end_line": 11}
    item.update(extra)
    return item


KILLING_TESTS = fenced("""
    import pytest
    from shop.util.maths import clamp

    def test_inside():
        assert clamp(5, 0, 10) == 5

    @pytest.mark.parametrize("value, expected", [(-3, 0), (12, 10)])
    def test_edges(value, expected):
        assert clamp(value, 0, 10) == expected
""")


def test_passing_tests_that_kill_the_mutant(corpus):
    verdict = unit_test.unit_test_verdict(KILLING_TESTS, unit_item(buggy_source=BUGGY.rstrip()),
                                       corpus, timeout=5)
    assert verdict["status"] == "passed" and verdict["tests"] == 3
    assert verdict["passes_original"] is True and verdict["kills_mutant"] is True


def test_tests_that_miss_the_mutant(corpus):
    weak = fenced("""
        from shop.util.maths import clamp

        def test_at_the_lower_bound():
            assert clamp(0, 0, 10) == 0  # the mutant returns low here too
    """)
    verdict = unit_test.unit_test_verdict(weak, unit_item(buggy_source=BUGGY.rstrip()), corpus,
                                       timeout=5)
    assert verdict["status"] == "passed" and verdict["kills_mutant"] is False


def test_tests_failing_on_the_original(corpus):
    wrong = fenced("""
        from shop.util.maths import clamp

        def test_wrong():
            assert clamp(50, 0, 10) == 50
    """)
    verdict = unit_test.unit_test_verdict(wrong, unit_item(), corpus, timeout=5)
    assert verdict["status"] == "failed" and verdict["passes_original"] is False
    assert verdict["tests"] == 1


def test_a_method_using_a_sibling_module_runs_without_mutant(corpus):
    item = {"source_function": "def total(self, n):\n    return double(n) + 1",
            "source_file": "shop/util/maths.py", "qualname": "Basket.total",
            "function_name": "total", "line": 15, "end_line": 16}
    tests = fenced("""
        from shop.util.maths import Basket

        class TestBasket:
            def test_total(self, tmp_path):
                assert tmp_path.is_dir()
                assert Basket().total(2) == 5
    """)
    verdict = unit_test.unit_test_verdict(tests, item, corpus, timeout=5)
    assert verdict["status"] == "passed" and verdict["kills_mutant"] is None
    mutated = unit_test.unit_test_verdict(
        tests, {**item, "buggy_source": "def total(self, n):\n    return double(n)"}, corpus,
        timeout=5)
    assert mutated["kills_mutant"] is True


def test_heavy_import_is_not_executable(corpus):
    item = {"source_function": "def ident(x):\n    return x", "source_file": "shop/heavy.py",
            "qualname": "ident", "function_name": "ident", "line": 4, "end_line": 5}
    tests = fenced("from shop.heavy import ident\n\ndef test_ident():\n    assert ident(1) == 1")
    verdict = unit_test.unit_test_verdict(tests, item, corpus, timeout=5)
    assert verdict["status"] == "not_executable" and verdict["passes_original"] is None
    assert "torch_nonexistent" in verdict["reason"]


def test_tests_needing_a_missing_library_are_not_executable(corpus):
    tests = fenced("import numpy_nonexistent\nfrom shop.util.maths import clamp\n\n"
                   "def test_x():\n    assert clamp(1, 0, 2) == 1")
    assert unit_test.unit_test_verdict(tests, unit_item(), corpus, timeout=5)["status"] \
        == "not_executable"


def test_tests_importing_a_wrong_name_are_an_error(corpus):
    tests = fenced("from shop.util.maths import nothing\n\ndef test_x():\n    assert nothing()")
    verdict = unit_test.unit_test_verdict(tests, unit_item(), corpus, timeout=5)
    assert verdict["status"] == "error" and verdict["passes_original"] is False


def test_hanging_tests_time_out(corpus):
    tests = fenced("def test_hang():\n    while True:\n        pass\n    assert False")
    assert unit_test.unit_test_verdict(tests, unit_item(), corpus, timeout=1.5)["status"] \
        == "timeout"


@pytest.mark.parametrize("response, status", [
    ("", "unparsable"),
    ("```python\ndef test_x(:\n```", "unparsable"),
    (fenced("def test_x():\n    pass"), "no_tests"),
    (fenced("def helper():\n    assert True"), "no_tests"),
])
def test_unrunnable_responses(corpus, response, status):
    assert unit_test.unit_test_verdict(response, unit_item(), corpus)["status"] == status


def test_no_corpus_or_file_is_not_executable(corpus):
    assert unit_test.unit_test_verdict(KILLING_TESTS, unit_item(), None)["reason"] == "no corpus"
    missing = unit_item(source_file="shop/absent.py")
    assert unit_test.unit_test_verdict(KILLING_TESTS, missing, corpus)["status"] \
        == "not_executable"


# -- no verdict raises, whatever it is given ------------------------------------------------

HOSTILE_RESPONSES = ["", None, 42, "```python\n" + "(" * 5000 + "\n```", "\x00\x01\x02",
                     "```python\ndef clamp(value, low, high):\n    return value\n```",
                     "```python\nfrom shop.maths import clamp\n\ndef test_x():\n"
                     "    assert clamp(1, 0, 2) == 1\n```"]
HOSTILE_ITEMS = [
    {},
    {"source_function": 5, "params": "value", "returns_value": "yes", "signature": 3},
    {**ITEM, "mutation": ["not", "a", "dict"], "buggy_source": 7},
    {**ITEM, "source_file": "../../etc/passwd.py", "category": "unit_test"},
    {**ITEM, "source_file": "/etc/passwd.py", "category": "unit_test"},
    {**ITEM, "source_file": "shop/../../x.py", "line": "one", "end_line": None},
    {**ITEM, "source_file": ["a.py"], "qualname": None, "function_name": 3},
    {**ITEM, "source_file": "shop/maths.py", "line": -5, "end_line": 10 ** 9},
]


@pytest.mark.parametrize("family", ["bugfix", "complete", "docstring", "explain", "unit_test"])
def test_no_verdict_raises_on_malformed_answers_items_or_paths(family, tmp_path):
    from trackb_core import families
    from trackb_core.families import CheckContext

    corpus = tmp_path / "corpus"
    (corpus / "shop").mkdir(parents=True)
    (corpus / "shop" / "__init__.py").write_text("")
    (corpus / "shop" / "maths.py").write_text(ORIGINAL)
    subject = families.get(family)
    for item in HOSTILE_ITEMS:
        for response in HOSTILE_RESPONSES:
            verdict = subject.verdict(response, item, CheckContext(corpus, timeout=5))
            assert isinstance(verdict, dict)
            assert isinstance(subject.passes(verdict), bool)
            reason, facts = subject.filter(verdict)
            assert reason is None or reason in subject.filter_reasons
    # Paths that leave the corpus are not executable, and nothing outside is read.
    escaping = {**ITEM, "source_file": "../outside.py"}
    (tmp_path / "outside.py").write_text(ORIGINAL)
    tests = "```python\nfrom outside import clamp\n\ndef test_x():\n    assert clamp(1, 0, 2)\n```"
    verdict = families.get("unit_test").verdict(tests, escaping, CheckContext(corpus))
    assert verdict["status"] == "not_executable" and "inside the corpus" in verdict["reason"]


@pytest.mark.parametrize("report", [
    b"", b"\xff\xfe", b"not json\n", b"[1, 2]\n", b'{"stage": "ran"}\n',
    b'{"stage": "ran", "results": "x", "skipped": []}\n',
    b'{"stage": "ran", "results": [["t", "passed"]], "skipped": []}\n',
    b'{"stage": "ran", "results": [["t", "won", ""]], "skipped": []}\n',
    b'{"stage": "ran", "results": [[1, "passed", ""]], "skipped": []}\n',
    b'{"stage": "import_module", "error": 3, "message": "m"}\n',
    b'{"stage": "elsewhere"}\n', b"[" * 100_000 + b"\n",
    b'{"stage": "ran", "results": [], "skipped": []}\n' * 2,
])
def test_malformed_or_repeated_reports_are_errors_never_verdicts(report):
    from trackb_core.testrun import parse_report

    assert isinstance(parse_report(report), str)


def test_a_well_formed_report_is_read():
    from trackb_core.testrun import parse_report

    parsed = parse_report(b'{"stage": "ran", "results": [["t", "passed", ""]], '
                          b'"skipped": [["u", "needs fixture x"]]}\n')
    assert parsed == {"stage": "ran", "results": [["t", "passed", ""]],
                      "skipped": [["u", "needs fixture x"]]}
