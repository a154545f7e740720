"""The seed-compatible scorer: one test per rule of shared/docs/seed-metrics.md."""

from __future__ import annotations

import pytest

from trackb_core.errors import InputError
from trackb_core.metrics import index_predictions
from trackb_core.placeholders import hallucinates
from trackb_core.seed_metrics import score_response, score_seed

GOOD_CODE = "```python\ndef f(x):\n    return x + 1\n```"
BAD_CODE = "```python\ndef f(x:\n    return\n```"
GOOD_DOCSTRING = '"""Add one.\n\nArgs:\n    x: a number.\n\nReturns:\n    x plus one.\n"""'
GOOD_EXPLAIN = (
    "This function takes a number as input and returns it plus one.\n"
    "- **x**: the parameter to increment\n"
    "- the output is always one larger than the argument given to it"
)
BUGFIX_TEXT = (
    "The bug is that the comparison is flipped, so the function returns the wrong "
    "value for equal inputs. Here is the fix:\n"
)


def one(category, response, hints=None):
    return score_response(category, response, hints)


# -- code extraction ------------------------------------------------------------------

def test_py_fence_tag_does_not_match_so_keyword_fallback_takes_whole_response():
    # "```py" is not a fence for the seed; the response has "def " so the whole text
    # (fence markers included) is the block, and it does not compile.
    r = one("complete", "```py\ndef f():\n    return 1\n```")
    assert r["checks"]["has_code"] is True
    assert r["checks"]["syntax_ok"] is False


def test_fence_needs_newline_after_tag():
    # No newline after the opening fence: the regex does not match, fallback applies.
    r = one("complete", "```def f(): return 1```")
    assert r["checks"]["syntax_ok"] is False
    ok = one("complete", "```python   \ndef f():\n    return 1\n```")
    assert ok["checks"]["syntax_ok"] is True


def test_untagged_fence_matches():
    assert one("complete", "```\ndef f():\n    return 1\n```")["passed"] is True


def test_empty_fenced_blocks_dropped_without_fallback():
    # A fence was found but it is empty: no block at all, even though "def " appears.
    r = one("complete", "```python\n   \n```\nthen def f(): return 1")
    assert r["checks"] == {"has_code": False, "syntax_ok": False, "has_function": False}
    assert r["passed"] is False


def test_keyword_fallback_whole_response_is_the_block():
    r = one("complete", "def f(x):\n    return x\n")
    assert r["checks"] == {"has_code": True, "syntax_ok": True, "has_function": True}
    assert r["passed"] is True


def test_no_fence_no_keyword_means_no_block():
    assert one("bugfix", "nothing here at all")["checks"]["has_code"] is False


def test_only_first_block_is_checked():
    bad_then_good = BAD_CODE + "\n" + GOOD_CODE
    good_then_bad = GOOD_CODE + "\n" + BAD_CODE
    assert one("complete", bad_then_good)["passed"] is False
    assert one("complete", good_then_bad)["passed"] is True


# -- per-category checks --------------------------------------------------------------

def test_docstring_checks_and_hint_defaults():
    r = one("docstring", GOOD_DOCSTRING)
    # "Raises:" absent, but has_exceptions defaults to False so the check holds.
    assert r["checks"] == dict.fromkeys(
        ["has_triple_quotes", "long_enough", "has_args", "has_returns", "has_raises"], True)
    assert r["style"] == 1.0 and r["passed"] is True


def test_docstring_hints_change_checks():
    text = '"""Add one to the given number and give it back."""'
    default = one("docstring", text)
    assert default["checks"]["has_args"] is False
    assert default["checks"]["has_returns"] is False
    assert default["style"] == pytest.approx(3 / 5)
    hinted = one("docstring", text, {"has_args": False, "has_return": False,
                                     "has_exceptions": True})
    assert hinted["checks"]["has_args"] is True
    assert hinted["checks"]["has_returns"] is True
    assert hinted["checks"]["has_raises"] is False


def test_docstring_pass_threshold_is_half():
    # 2 of 5 checks (long enough, Raises default) -> 0.4 -> fail
    r = one("docstring", "x" * 40)
    assert r["style"] == pytest.approx(0.4) and r["passed"] is False
    # short, but quotes + Args + Returns + Raises default -> 4/5
    assert one("docstring", '""" Args: Returns:')["passed"] is True


def test_alternative_docstring_section_names():
    r = one("docstring", '"""Sum.\nParameters:\n  a\nReturn:\n  b\nRaises:\n  c"""')
    assert r["checks"]["has_args"] and r["checks"]["has_returns"] and r["checks"]["has_raises"]
    assert one("docstring", "Params: x")["checks"]["has_args"] is True


def test_complete_needs_function_definition_and_expected_name():
    r = one("complete", "```python\nx = 1\nimport os\n```")
    assert r["checks"] == {"has_code": True, "syntax_ok": True, "has_function": False}
    assert r["passed"] is True  # pass is syntax only
    assert r["style"] == pytest.approx(2 / 3)
    asyncdef = "```python\nasync def g():\n    return 1\n```"
    assert one("complete", asyncdef)["checks"]["has_function"] is True
    assert one("complete", asyncdef, {"expected_name": "g"})["checks"]["has_function"] is True
    assert one("complete", asyncdef, {"expected_name": "h"})["checks"]["has_function"] is False


def test_complete_without_block_fails_all_three():
    r = one("complete", "I cannot do that.")
    assert r["style"] == 0.0 and r["passed"] is False


def test_bugfix_checks():
    r = one("bugfix", BUGFIX_TEXT + GOOD_CODE)
    assert all(r["checks"].values()) and r["passed"] is True
    # keyword match is a lower-cased substring: "Prefix" contains "fix"
    assert one("bugfix", "Prefix")["checks"]["mentions_fix"] is True
    # exactly 15 words is not "more than 15"
    fifteen = " ".join(["word"] * 15)
    assert one("bugfix", fifteen)["checks"]["enough_words"] is False
    assert one("bugfix", fifteen + " more")["checks"]["enough_words"] is True
    # wordy but broken code: style 3/4, yet pass follows syntax only
    broken = one("bugfix", BUGFIX_TEXT + BAD_CODE)
    assert broken["style"] == pytest.approx(3 / 4) and broken["passed"] is False


def test_explain_checks():
    r = one("explain", GOOD_EXPLAIN)
    assert all(r["checks"].values()) and r["passed"] is True
    words19 = " ".join(["word"] * 19)
    assert one("explain", words19)["checks"]["enough_words"] is False
    assert one("explain", words19 + " x")["checks"]["enough_words"] is True
    # structure: >2 lines, or "**", or "- "
    assert one("explain", "a\nb")["checks"]["structured"] is False
    assert one("explain", "a\nb\nc")["checks"]["structured"] is True
    assert one("explain", "a **b**")["checks"]["structured"] is True
    assert one("explain", "a - b")["checks"]["structured"] is True
    only_code = one("explain", "  ```python\nx = 1\n```  ")
    assert only_code["checks"]["not_only_code"] is False


def test_unknown_category_scored_as_explain():
    assert one("haiku", GOOD_EXPLAIN)["checks"] == one("explain", GOOD_EXPLAIN)["checks"]
    assert one("haiku", "short")["passed"] is False


def test_unit_test_checks():
    text = "```python\nimport pytest\n\ndef test_f():\n    assert 1 + 1 == 2\n```"
    r = one("unit_test", text)
    assert all(r["checks"].values()) and r["passed"] is True
    # "def test" without underscore also counts
    assert one("unit_test", "def testit(): pass")["checks"]["has_test_def"] is True
    no_import = one("unit_test", "```python\ndef test_f():\n    assert True\n```")
    assert no_import["checks"]["has_import"] is False and no_import["passed"] is True


# -- hallucination --------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "<insert code here>", "< Insert your name>", "# todo: later", "value is TBD",
    "call your_function()", "import some_module", "foo = bar", "FOO and then BAZ",
])
def test_hallucination_regexes_match(text):
    assert hallucinates(text)


@pytest.mark.parametrize("text", [
    "foo\nbar",  # "." does not cross newlines
    "todos are fine", "footbar", "my_your_x", "insert without brackets", "TBDX",
])
def test_hallucination_regexes_do_not_match(text):
    assert not hallucinates(text)


# -- aggregation ----------------------------------------------------------------------

def test_pass_at_3_is_any_of_three_and_ignores_later_samples():
    items = [{"id": "a", "category": "complete"}]
    fail, ok = "no code", GOOD_CODE
    first = score_seed(items, {"a": {"greedy": fail, "samples": [fail, ok]}}, "t")
    assert first["pass_at_1"] == 0.0 and first["pass_at_k"] == 1.0
    # samples beyond the first two are not among r[0..2]
    fourth = score_seed(items, {"a": {"greedy": fail, "samples": [fail, fail, ok]}}, "t")
    assert fourth["pass_at_k"] == 0.0


def test_style_is_max_over_responses_starting_at_zero():
    items = [{"id": "a", "category": "explain"}, {"id": "b", "category": "complete"}]
    preds = {
        "a": {"greedy": "hi", "samples": [GOOD_EXPLAIN, "hi"]},
        "b": {"greedy": "nope", "samples": ["nope", "nope"]},
    }
    out = score_seed(items, preds, "t")
    # a: max is 1.0 from the first sample; b: every response scores 0 -> running max 0
    assert out["avg_style_score"] == pytest.approx(0.5)
    assert out["per_category"]["explain"]["avg_style"] == 1.0
    assert out["per_category"]["complete"]["avg_style"] == 0.0


def test_score_seed_keys_execution_rate_and_rounding():
    items = [
        {"id": "1", "category": "complete"},
        {"id": "2", "category": "bugfix"},
        {"id": "3", "category": "docstring"},
        {"id": "4", "category": "explain"},
        {"id": "5", "category": "unit_test"},
        {"id": "6", "category": "docstring"},
    ]
    preds = {
        "1": {"greedy": GOOD_CODE, "samples": []},
        "2": {"greedy": BUGFIX_TEXT + BAD_CODE, "samples": []},
        "3": {"greedy": GOOD_DOCSTRING, "samples": []},
        "4": {"greedy": "TODO", "samples": []},
        "5": {"greedy": "nothing", "samples": []},
        "6": {"greedy": '"""x""" Args:', "samples": []},  # 3/5 style, passes
    }
    out = score_seed(items, preds, "base")
    assert set(out) == {"tag", "metric_set", "total_samples", "k", "pass_at_1", "pass_at_k",
                        "avg_style_score", "hallucination_rate", "execution_rate",
                        "per_category", "failures"}
    assert out["tag"] == "base" and out["metric_set"] == "seed-compatible"
    assert out["total_samples"] == 6 and out["k"] == 3
    assert out["pass_at_1"] == pytest.approx(3 / 6)
    assert out["execution_rate"] == pytest.approx(1 / 3)  # only item 1 of the 3 code items
    assert out["hallucination_rate"] == pytest.approx(1 / 6)
    assert set(out["per_category"]["docstring"]) == {
        "count", "pass_at_1", "pass_at_k", "avg_style", "hallucination_rate"}
    assert out["per_category"]["docstring"]["count"] == 2
    assert out["per_category"]["docstring"]["avg_style"] == 0.8
    assert out["per_category"]["bugfix"]["avg_style"] == 0.75
    assert out["per_category"]["explain"]["hallucination_rate"] == 1.0
    assert [f["id"] for f in out["failures"]] == ["2", "4", "5"]


def test_avg_style_rounded_to_four_places_in_per_category():
    items = [{"id": str(i), "category": "complete"} for i in range(3)]
    # styles 2/3 (compiles, no function), 0, 0 -> mean 2/9 = 0.2222...
    preds = {"0": {"greedy": "```python\nx = 1\n```"}, "1": {"greedy": "no"},
             "2": {"greedy": "no"}}
    out = score_seed(items, preds, "t")
    assert out["per_category"]["complete"]["avg_style"] == 0.2222
    assert out["avg_style_score"] == pytest.approx(2 / 9)  # the top level is not rounded
    assert out["avg_style_score"] != 0.2222


def test_failures_capped_at_twenty():
    items = [{"id": f"{i:02d}", "category": "complete"} for i in range(25)]
    preds = {it["id"]: {"greedy": "no", "samples": []} for it in items}
    out = score_seed(items, preds, "t")
    assert len(out["failures"]) == 20
    assert out["failures"][0]["id"] == "00"


def test_missing_prediction_raises_input_error():
    with pytest.raises(InputError, match="no prediction for test item 'b'"):
        score_seed([{"id": "a", "category": "x"}, {"id": "b", "category": "x"}],
                   {"a": {"greedy": "", "samples": []}}, "t")


def test_malformed_prediction_and_empty_items_raise():
    with pytest.raises(InputError, match="greedy"):
        score_seed([{"id": "a", "category": "x"}], {"a": {"samples": []}}, "t")
    with pytest.raises(InputError, match="no test items"):
        score_seed([], {}, "t")


def test_index_predictions_rejects_duplicates():
    with pytest.raises(InputError, match="appears twice"):
        index_predictions([{"id": "a"}, {"id": "a"}], "p.jsonl")
    assert set(index_predictions([{"id": "a"}, {"id": 2}], "p")) == {"a", "2"}


def test_order_does_not_change_metrics():
    items = [{"id": str(i), "category": c} for i, c in
             enumerate(["complete", "explain", "bugfix", "docstring"])]
    preds = {"0": {"greedy": GOOD_CODE}, "1": {"greedy": GOOD_EXPLAIN},
             "2": {"greedy": "bad"}, "3": {"greedy": GOOD_DOCSTRING}}
    assert score_seed(items, preds, "t") == score_seed(list(reversed(items)), preds, "t")
