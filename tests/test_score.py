"""``metrics.score_all`` on crafted predictions: every number against a hand calculation.

Three small functions, four task families each (unit_test has its own tests below),
answered with echoes, truncated code, correct and wrong fixes, empty outputs, and
answers in another language. Each answer's verdict is obvious by construction; the
expected metrics are worked out by hand in the comments.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from trackb_core import families, metrics
from trackb_core.errors import InputError
from trackb_core.families import unit_test
from trackb_core.metrics import functional_pass, score_all
from trackb_core.seed_metrics import score_seed
from trackb_core.stats import mcnemar_exact, paired_bootstrap_delta, wilson_interval

CLAMP = '''def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''
GREET = '''def greet(name, punctuation="!"):
    """Say hello to name."""
    if not name:
        return "Hello!"
    return "Hello, " + name + punctuation
'''
EVEN = '''def is_even(number):
    """Tell whether number is even."""
    return number % 2 == 0
'''

FUNCTIONS = {
    "clamp": {"source": CLAMP, "signature": "def clamp(value, low, high):",
              "params": ["value", "low", "high"],
              "bug": ("    if value < low:", "    if value <= low:", "off_by_one", 3)},
    "greet": {"source": GREET, "signature": 'def greet(name, punctuation="!"):',
              "params": ["name", "punctuation"],
              "bug": ("    if not name:", "    if name:", "not_dropped", 3)},
    "is_even": {"source": EVEN, "signature": "def is_even(number):", "params": ["number"],
                "bug": ("    return number % 2 == 0", "    return number % 2 != 0", "eq_flip", 3)},
}


HIDDEN = {
    "clamp": "def test_clamp():\n    assert clamp(5, 0, 3) == 3\n    assert clamp(-1, 0, 3) == 0\n"
             "    assert clamp(2, 0, 3) == 2\n",
    "greet": "def test_greet():\n    assert greet('') == 'Hello!'\n"
             "    assert greet('Ada') == 'Hello, Ada!'\n    assert greet('Bo', '?') == 'Hello, Bo?'\n",
    "is_even": "def test_is_even():\n    assert is_even(2) is True\n    assert is_even(3) is False\n",
}


def _corpus() -> Path:
    """The corpus the crafted items come from (demo/mod.py), for their hidden tests."""
    root = Path(tempfile.mkdtemp(prefix="trackb-score-corpus-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "demo").mkdir()
    (root / "demo" / "__init__.py").write_text("")
    (root / "demo" / "mod.py").write_text("\n\n".join([CLAMP, GREET, EVEN]))
    return root


CORPUS = _corpus()


def fence(code: str) -> str:
    return f"```python\n{code}```"


def buggy(name: str) -> str:
    before, after, _, _ = FUNCTIONS[name]["bug"]
    return FUNCTIONS[name]["source"].replace(before, after)


def make_item(name: str, category: str, instruction: str | None = None) -> dict:
    fn = FUNCTIONS[name]
    row = {
        "id": f"{name}-{category}", "category": category,
        "instruction": instruction or f"Task {category} for {name}",
        "source_function": fn["source"], "source_file": "demo/mod.py",
        "function_id": name, "function_name": name, "qualname": name,
        "signature": fn["signature"], "params": fn["params"], "returns_value": True,
        "line": 1, "end_line": fn["source"].count("\n"), "decorators": [],
    }
    if category == "bugfix":
        before, after, kind, line = fn["bug"]
        row["buggy_source"] = buggy(name)
        row["mutation"] = {"kind": kind, "line": line, "before": before, "after": after}
    if category in ("bugfix", "complete"):
        row["hidden_tests"] = {"code": f"from demo.mod import {name}\n\n\n" + HIDDEN[name],
                               "cases": 1, "version": 1}
    return row


GREET_SITE_FIX = GREET.replace(
    '    return "Hello, " + name + punctuation',
    '    greeting = "Hello, " + name\n    return greeting + punctuation')
CLAMP_DOCSTRING = ('"""Clamp a value into a range.\n\nArgs:\n    value: the number.\n'
                   '    low: lower bound.\n    high: upper bound.\n\nReturns:\n'
                   '    The clamped value.\n"""')
EVEN_DOCSTRING = ('"""Tell whether number is even.\n\nArgs:\n    number: the integer.\n\n'
                  'Returns:\n    True when it is even.\n"""')
GREET_EXPLAIN = ("The function takes `name` and an optional `punctuation` mark.\n"
                 "It returns a greeting such as 'Hello, Ada!', or 'Hello!' for an empty name.")

# id -> (greedy answer, the verdict it must get, a passing answer for samples or None)
# Samples are [passing] * c + [""] * (3 - c): c correct of n = 3.
CRAFTED = {
    # bugfix: exact fix, site fix with another edit, wrong "fix" (the mutant back)
    "clamp-bugfix": ("The bug is the off-by-one comparison. Fixed:\n" + fence(CLAMP), 3),
    "greet-bugfix": ("The negation was dropped; restored it:\n" + fence(GREET_SITE_FIX), 1),
    "is_even-bugfix": ("I could not find the bug. TODO\n" + fence(buggy("is_even")), 0),
    # complete: correct (answer in Chinese), echo of the stub, truncated code
    "clamp-complete": ("这是完整的实现：\n" + fence(CLAMP), 2),
    "greet-complete": (fence('def greet(name, punctuation="!"):\n    """Say hello."""\n'
                             '    ...\n'), 0),
    "is_even-complete": (fence("def is_even(number):\n    return number %"), 0),
    # docstring: complete, one parameter missing, empty output
    "clamp-docstring": (CLAMP_DOCSTRING, 3),
    "greet-docstring": ('"""Say hello.\n\nArgs:\n    name: who to greet.\n\nReturns:\n'
                        '    The greeting.\n"""', 0),
    "is_even-docstring": ("", 1),
    # explain: Chinese (names every parameter, no English word for "returns"),
    # a complete English explanation, empty output
    "clamp-explain": ("该函数接收 value、low 和 high 三个参数，\n"
                      "并把 value 限制在 low 与 high 之间后给出结果。", 0),
    "greet-explain": (GREET_EXPLAIN, 3),
    "is_even-explain": ("", 0),
}
PASSING = {
    "clamp-bugfix": fence(CLAMP), "greet-bugfix": fence(GREET),
    "clamp-complete": fence(CLAMP),
    "clamp-docstring": CLAMP_DOCSTRING, "is_even-docstring": EVEN_DOCSTRING,
    "greet-explain": GREET_EXPLAIN,
}


def crafted_items() -> list[dict]:
    items = []
    for item_id in CRAFTED:
        name, category = item_id.split("-")
        instruction = "请解释这个函数。" if item_id == "clamp-explain" else None
        items.append(make_item(name, category, instruction))
    return items


def crafted_predictions() -> dict[str, dict]:
    predictions = {}
    for item_id, (greedy, correct) in CRAFTED.items():
        passing = PASSING.get(item_id, "")
        predictions[item_id] = {"greedy": greedy,
                                "samples": [passing] * correct + [""] * (3 - correct)}
    return predictions


@pytest.fixture(scope="module")
def scored():
    return score_all(crafted_items(), crafted_predictions(), "post", corpus_dir=CORPUS,
                     n_boot=300, seed=0, temperature=0.6)


def value(result, name):
    return result["headline"][name]["value"]


# -- the crafted answers are what they claim to be ------------------------------------------

def test_each_crafted_greedy_answer_gets_the_intended_functional_verdict():
    # bugfix and complete are checked by their hidden tests: the exact fix, the site fix
    # with another edit (it computes the same) and the correct completion pass them
    shown_right = {"clamp-bugfix", "greet-bugfix", "clamp-complete"}
    for item in crafted_items():
        greedy = CRAFTED[item["id"]][0]
        verdict = functional_pass(item["category"], greedy, item, CORPUS)
        if item["category"] in ("bugfix", "complete"):
            assert verdict is (item["id"] in shown_right), item["id"]
            if item["id"] in PASSING:
                assert functional_pass(item["category"], PASSING[item["id"]], item,
                                       CORPUS) is True
            assert functional_pass(item["category"], "", item, CORPUS) is False
            # no hidden tests, or no corpus to run them in: no verdict, never a pass
            assert functional_pass(item["category"], greedy, {**item, "hidden_tests": None},
                                   CORPUS) is None
            assert functional_pass(item["category"], greedy, item, None) is None
        else:
            assert verdict is None, item["id"]  # nothing can show prose right


# -- functional pass@k and greedy pass --------------------------------------------------------

def test_functional_pass_at_k_and_greedy_by_hand(scored):
    # bugfix and complete are checked: greedy 1, 1, 0 and 1, 0, 0; correct samples
    # 3, 1, 0 and 2, 0, 0
    assert value(scored, "functional_pass_greedy") == pytest.approx(3 / 6)
    assert scored["headline"]["functional_pass_greedy"]["n"] == 6
    assert value(scored, "functional_pass_at_1") == pytest.approx((1 + 1 / 3 + 2 / 3) / 6)
    assert value(scored, "functional_pass_at_3") == pytest.approx(3 / 6)
    assert value(scored, "functional_checked_share") == pytest.approx(6 / 12)
    functional = scored["functional"]
    assert functional["n_samples"] == 3 and functional["temperature"] == 0.6
    assert functional["functional_pass_at_1"] == pytest.approx(1 / 3)
    assert functional["n"]["functional_pass_greedy"] == 6
    assert functional["unavailable"] == {}
    assert set(functional["pass_means"]) == set(families.names())
    per_category = functional["per_category"]
    assert per_category["bugfix"] == {
        "n": 3, "checked": 3, "functional_pass_greedy": pytest.approx(2 / 3),
        "functional_pass_at_1": pytest.approx(4 / 9),
        "functional_pass_at_3": pytest.approx(2 / 3)}
    assert per_category["complete"] == {
        "n": 3, "checked": 3, "functional_pass_greedy": pytest.approx(1 / 3),
        "functional_pass_at_1": pytest.approx(2 / 9),
        "functional_pass_at_3": pytest.approx(1 / 3)}
    assert per_category["explain"] == {"n": 3, "checked": 0, "functional_pass_greedy": None,
                                       "functional_pass_at_1": None,
                                       "functional_pass_at_3": None}


def test_functional_pass_at_k_with_five_samples_matches_the_estimator():
    # n = 5, c = 2: pass@1 = 0.4 and pass@3 = 1 - C(3,3)/C(5,3) = 0.9
    item = make_item("clamp", "bugfix")
    samples = [fence(CLAMP), "", fence(CLAMP), "", ""]
    result = score_all([item], {item["id"]: {"greedy": "", "samples": samples}}, "t",
                       corpus_dir=CORPUS, n_boot=50)
    assert value(result, "functional_pass_at_1") == pytest.approx(0.4)
    assert value(result, "functional_pass_at_3") == pytest.approx(0.9)
    assert value(result, "functional_pass_greedy") == 0.0
    record = result["items"][0]
    assert (record["n_samples"], record["functional_n"], record["functional_correct"]) == (5, 5, 2)
    assert record["functional_fraction"] == pytest.approx(0.4)
    assert record["functional_at_3"] == pytest.approx(0.9)


def test_too_few_samples_report_pass_at_k_as_none_with_the_reason():
    items = crafted_items()
    predictions = {k: {"greedy": v["greedy"], "samples": v["samples"][:2]}
                   for k, v in crafted_predictions().items()}
    result = score_all(items, predictions, "t", corpus_dir=CORPUS, n_boot=50)
    entry = result["headline"]["functional_pass_at_3"]
    assert entry["value"] is None and entry["ci"] is None
    assert "at least 3 samples" in entry["reason"] and "have 2" in entry["reason"]
    assert result["functional"]["functional_pass_at_3"] is None
    assert "functional_pass_at_3" in result["functional"]["unavailable"]
    assert result["headline"]["functional_pass_at_1"]["value"] is not None
    assert result["per_category"]["bugfix"]["functional_pass_at_3"]["value"] is None
    # the seed's pass@3 still has its 3 responses
    assert result["headline"]["seed_pass_at_3"]["value"] is not None

    greedy_only = {k: {"greedy": v["greedy"], "samples": []}
                   for k, v in crafted_predictions().items()}
    result = score_all(items, greedy_only, "t", corpus_dir=CORPUS, n_boot=50)
    for name in ("functional_pass_at_1", "functional_pass_at_3", "seed_pass_at_3"):
        assert result["headline"][name]["value"] is None, name
        assert "have 0" in result["headline"][name]["reason"]
    assert value(result, "functional_pass_greedy") == pytest.approx(3 / 6)
    assert result["seed_compatible"]["k"] == 1
    assert all(r["functional_fraction"] is None for r in result["items"])


# -- format and family metrics on the greedy answer ---------------------------------------

def test_format_and_family_metrics_by_hand(scored):
    # bugfix: exact (clamp), site restored with another edit (greet), neither (is_even)
    assert value(scored, "bugfix_exact_fix") == pytest.approx(1 / 3)
    assert value(scored, "bugfix_site_restored") == pytest.approx(2 / 3)
    # complete: correct / echo (parses, keeps signature) / truncated (does not parse)
    assert value(scored, "complete_parses") == pytest.approx(2 / 3)
    assert value(scored, "complete_keeps_signature") == pytest.approx(2 / 3)
    assert value(scored, "complete_not_echo") == pytest.approx(1 / 3)
    assert value(scored, "complete_exact_match") == pytest.approx(1 / 3)
    # docstring Args coverage: 3/3, 1/2, 0 -> 0.5; explain parameter coverage: 1, 1, 0
    assert value(scored, "docstring_args_coverage") == pytest.approx(0.5)
    assert value(scored, "explain_param_coverage") == pytest.approx(2 / 3)
    # format: every bugfix answer parses; one complete is neither echo nor cut; one
    # docstring has every section; one explanation (the English one) says what it returns
    assert value(scored, "bugfix_format_ok") == 1.0
    assert value(scored, "complete_format_ok") == pytest.approx(1 / 3)
    assert value(scored, "docstring_format_ok") == pytest.approx(1 / 3)
    assert value(scored, "explain_format_ok") == pytest.approx(1 / 3)
    assert value(scored, "format_ok") == pytest.approx(6 / 12)
    assert scored["headline"]["format_ok"]["section"] == "format"
    blocks = scored["families"]
    assert blocks["explain"]["mentions_return"] == pytest.approx(1 / 3)  # only English
    assert blocks["docstring"]["ok"] == pytest.approx(1 / 3)
    assert blocks["complete"]["format_ok"] == pytest.approx(1 / 3)
    assert blocks["complete"]["functional_pass_greedy"] == pytest.approx(1 / 3)
    assert blocks["complete"]["with_hidden_tests"] == 3
    assert blocks["bugfix"]["functional_pass_greedy"] == pytest.approx(2 / 3)
    assert blocks["bugfix"]["n"] == 3 and blocks["bugfix"]["parses"] == pytest.approx(1)
    assert "unit_test" not in blocks


def test_edit_similarity_is_the_mean_of_greedy_similarities(scored):
    by_id = {r["id"]: r for r in scored["items"]}
    exact = by_id["clamp-complete"]["verdict"]["edit_similarity"]
    echo = by_id["greet-complete"]["verdict"]["edit_similarity"]
    truncated = by_id["is_even-complete"]["verdict"]["edit_similarity"]
    assert exact == 1.0 and 0 < echo < 1 and 0 < truncated < 1
    assert value(scored, "complete_edit_similarity") == pytest.approx(
        (exact + echo + truncated) / 3)
    assert scored["families"]["complete"]["edit_similarity"] == pytest.approx(
        (exact + echo + truncated) / 3)


def test_family_metric_without_items_is_none_with_reason(scored):
    for name in ("unit_test_consistent_with_original", "unit_test_kills_mutant"):
        entry = scored["headline"][name]
        assert entry == {"value": None, "ci": None, "n": 0, "reason": "no unit_test items",
                         "section": "family"}
    assert scored["headline"]["unit_test_format_ok"]["reason"] == "no unit_test items"


def test_no_metric_outside_the_functional_section_is_named_a_pass(scored):
    for name, entry in scored["headline"].items():
        if "pass" in name:
            assert entry["section"] in ("seed", "functional"), name
    for family in families.all_families():
        assert all("pass" not in metric.name for metric in family.metrics), family.name


# -- seed-compatible section ------------------------------------------------------------------

def test_seed_compatible_is_score_seed_unchanged(scored):
    assert scored["seed_compatible"] == score_seed(crafted_items(), crafted_predictions(),
                                                   "post")
    seed = scored["seed_compatible"]
    assert value(scored, "seed_pass_at_1") == pytest.approx(seed["pass_at_1"])
    assert value(scored, "seed_pass_at_3") == pytest.approx(seed["pass_at_k"])
    assert value(scored, "seed_style_score") == pytest.approx(seed["avg_style_score"])
    assert value(scored, "seed_hallucination_rate") == pytest.approx(1 / 12)  # the "TODO"
    assert value(scored, "seed_execution_rate") == pytest.approx(seed["execution_rate"])
    for name, key in metrics.SEED_HEADLINE_KEYS.items():
        assert scored["headline"][name]["section"] == "seed"
        assert scored["headline"][name]["value"] == pytest.approx(seed[key]), name
    # the seed counts the wrong "fix" (compiles) as a pass; the functional check does not
    by_id = {r["id"]: r for r in scored["items"]}
    assert by_id["is_even-bugfix"]["seed_pass_at_1"] is True
    assert by_id["is_even-bugfix"]["functional"] is False


def test_the_seed_block_scores_the_seed_view_and_the_rest_the_whole_answer():
    # A fix that runs past the seed's 384 tokens: the seed scored its cut version (the
    # code block never closes, so there is no code: not a pass), the functional check
    # the whole answer (the exact fix).
    item = make_item("clamp", "bugfix")
    whole = "The off-by-one comparison is the bug, fixed here:\n" + fence(CLAMP)
    cut = "The off-by-one comparison is the bug, fixed here:\n```python\ndef clamp(value, l"
    prediction = {"greedy": whole, "samples": [],
                  "seed_view": {"greedy": cut, "samples": []},
                  "truncated": {"greedy": False, "samples": []}}
    result = score_all([item], {item["id"]: prediction}, "t", corpus_dir=CORPUS, n_boot=20)
    record = result["items"][0]
    assert record["seed_pass_at_1"] is False and record["functional"] is True
    assert result["seed_compatible"] == score_seed(
        [item], {item["id"]: {"greedy": cut, "samples": []}}, "t", k=1)
    # without a seed view the seed block scores the whole answer
    plain = score_all([item], {item["id"]: {"greedy": whole, "samples": []}}, "t",
                      corpus_dir=CORPUS, n_boot=20)
    assert plain["items"][0]["seed_pass_at_1"] is True


def test_truncation_is_reported_per_family_when_the_predictions_say():
    items = [make_item("clamp", "bugfix"), make_item("greet", "bugfix"),
             make_item("clamp", "complete")]
    predictions = {
        "clamp-bugfix": {"greedy": fence(CLAMP), "samples": ["", ""],
                         "truncated": {"greedy": True, "samples": [True, False]}},
        "greet-bugfix": {"greedy": "", "samples": ["", ""],
                         "truncated": {"greedy": False, "samples": [False, False]}},
        "clamp-complete": {"greedy": "", "samples": ["", ""],
                           "truncated": {"greedy": False, "samples": [False, False]}},
    }
    result = score_all(items, predictions, "t", corpus_dir=CORPUS, n_boot=20)
    assert value(result, "truncated_rate") == pytest.approx(1 / 3)
    assert result["per_category"]["bugfix"]["truncated_rate"]["value"] == pytest.approx(0.5)
    budget = result["budget"]
    assert budget["known"] is True
    assert budget["per_category"]["bugfix"] == {"n": 2, "greedy_truncated": 0.5,
                                                "samples_truncated": 0.25}
    assert budget["all"]["samples_truncated"] == pytest.approx(0.5 / 3)
    unknown = score_all(items, {k: {"greedy": v["greedy"], "samples": v["samples"]}
                                for k, v in predictions.items()}, "t", corpus_dir=CORPUS,
                        n_boot=20)
    assert unknown["headline"]["truncated_rate"]["value"] is None
    assert "token budget" in unknown["headline"]["truncated_rate"]["reason"]


def test_unknown_categories_are_scored_as_explain_by_the_seed_and_na_elsewhere():
    items = [dict(make_item("clamp", "explain"), id="poem", category="haiku"),
             make_item("clamp", "bugfix")]
    answer = ("This function takes value, low and high as input and returns the value\n"
              "limited to the range between low and high, so it never leaves it at all.")
    predictions = {"poem": {"greedy": answer, "samples": []},
                   "clamp-bugfix": {"greedy": fence(CLAMP), "samples": []}}
    result = score_all(items, predictions, "t", corpus_dir=CORPUS, n_boot=20)
    assert result["seed_compatible"] == score_seed(items, predictions, "t", k=1)
    assert result["seed_compatible"]["per_category"]["haiku"]["pass_at_1"] == 1.0
    haiku = result["per_category"]["haiku"]
    assert haiku["seed_pass_at_1"]["value"] == 1.0
    for name in ("functional_pass_greedy", "format_ok", "truncated_rate"):
        assert haiku[name]["value"] is None and "unknown category 'haiku'" in \
            haiku[name]["reason"], name
    # the honest headline is over the known families only
    assert result["headline"]["format_ok"]["n"] == 1
    assert result["headline"]["seed_pass_at_1"]["n"] == 2
    assert "haiku" not in result["families"]


# -- shape and uncertainty ------------------------------------------------------------------

def test_shape_of_the_result(scored):
    assert set(scored) == {"tag", "metric_version", "n_items", "headline", "seed_compatible",
                           "functional", "families", "budget", "per_category", "items"}
    assert scored["tag"] == "post" and scored["metric_version"] == metrics.METRIC_VERSION
    assert scored["n_items"] == 12
    assert {e["section"] for e in scored["headline"].values()} == {
        "seed", "functional", "format", "family", "budget"}
    assert set(scored["per_category"]) == {"bugfix", "complete", "docstring", "explain"}
    assert set(scored["per_category"]["bugfix"]) >= {
        "functional_pass_at_1", "functional_pass_greedy", "seed_pass_at_1", "exact_fix",
        "site_restored", "format_ok", "truncated_rate"}
    record = scored["items"][0]
    assert {"id", "category", "group", "seed_pass_at_1", "functional", "functional_fraction",
            "format_ok", "truncated"} <= set(record)
    assert [r["id"] for r in scored["items"]] == sorted(CRAFTED)
    assert {r["group"] for r in scored["items"]} == {"clamp", "greet", "is_even"}


def test_every_headline_number_carries_a_ci_that_contains_it(scored):
    numbers = 0
    for name, entry in scored["headline"].items():
        assert set(entry) >= {"value", "ci", "n", "section"}, name
        if entry["value"] is None:
            assert entry["ci"] is None and entry["reason"], name
            continue
        numbers += 1
        low, high = entry["ci"]
        assert 0.0 <= low <= entry["value"] <= high <= 1.0, name
        assert entry["n"] > 0
    # 5 seed + 4 functional + 1 format + 4 family format + 9 family metrics (no unit_test
    # items; truncation unknown: these predictions do not say)
    assert numbers == 23
    for category, entries in scored["per_category"].items():
        for name, entry in entries.items():
            assert entry["value"] is None or entry["ci"][0] <= entry["value"] <= entry["ci"][1], \
                (category, name)


def test_intervals_resample_source_functions_and_are_deterministic(scored):
    again = score_all(crafted_items(), crafted_predictions(), "post", corpus_dir=CORPUS,
                      n_boot=300, seed=0, temperature=0.6)
    assert again["headline"] == scored["headline"]
    # bugfix site restored is 1, 1, 0 over three functions. A replicate draws 3 functions,
    # so its mean is 0, 1/3, 2/3 or 1; P(mean 0) = 1/27 = 3.7% and P(mean 1) = 8/27 both
    # exceed 2.5%, so the 95% interval is [0, 1]. Resampling the 12 items instead would
    # give a narrower one.
    assert scored["headline"]["bugfix_site_restored"]["ci"] == [0.0, 1.0]
    other = score_all(crafted_items(), crafted_predictions(), "post", corpus_dir=CORPUS,
                      n_boot=300, seed=1)
    assert other["headline"]["functional_pass_at_1"]["value"] == \
        scored["headline"]["functional_pass_at_1"]["value"]


def test_an_interval_never_collapses_at_zero_or_all():
    # one function, all right (n/n) or all wrong (0/n): the bootstrap alone says [1, 1] or
    # [0, 0]; the reported interval is at least the Wilson interval of the rate
    item = make_item("clamp", "bugfix")
    right = score_all([item], {item["id"]: {"greedy": fence(CLAMP), "samples": [fence(CLAMP)]}},
                      "t", corpus_dir=CORPUS)
    assert right["headline"]["functional_pass_greedy"]["ci"] == list(wilson_interval(1.0, 1))
    assert right["headline"]["functional_pass_greedy"]["ci"][0] < 0.25
    items = [dict(make_item(name, "bugfix")) for name in FUNCTIONS]
    wrong = score_all(items, {i["id"]: {"greedy": "", "samples": []} for i in items}, "t",
                      corpus_dir=CORPUS)
    entry = wrong["headline"]["functional_pass_greedy"]
    assert entry["value"] == 0.0 and entry["ci"] == [0.0, wilson_interval(0.0, 3)[1]]
    assert entry["ci"][1] > 0.5


# -- pairing baseline with post ---------------------------------------------------------------

def test_items_carry_what_a_paired_comparison_needs(scored):
    empty = {k: {"greedy": "", "samples": ["", "", ""]} for k in CRAFTED}
    baseline = score_all(crafted_items(), empty, "baseline", corpus_dir=CORPUS, n_boot=50)
    assert value(baseline, "functional_pass_greedy") == 0.0
    assert [r["id"] for r in baseline["items"]] == [r["id"] for r in scored["items"]]
    pairs = [(b, p) for b, p in zip(baseline["items"], scored["items"], strict=True)
             if b["functional"] is not None and p["functional"] is not None]
    assert [b["id"] for b, _ in pairs] == [
        "clamp-bugfix", "clamp-complete", "greet-bugfix", "greet-complete", "is_even-bugfix",
        "is_even-complete"]
    # three items gained, none lost: McNemar's exact p = 2 * 0.5 ** 3
    assert mcnemar_exact([b["functional"] for b, _ in pairs],
                         [p["functional"] for _, p in pairs]) == {"b": 0, "c": 3,
                                                                  "p_value": 0.25}
    delta = paired_bootstrap_delta([b["functional_fraction"] for b, _ in pairs],
                                   [p["functional_fraction"] for _, p in pairs],
                                   [p["group"] for _, p in pairs], n_boot=200)
    assert delta["delta"] == pytest.approx(1 / 3)
    assert delta["ci"][0] <= 1 / 3 <= delta["ci"][1]


def test_group_falls_back_to_a_hash_of_the_source():
    item = make_item("clamp", "complete")
    del item["function_id"]
    same_text = dict(item, id="copy", source_function=CLAMP.replace("    ", "        "))
    assert metrics.item_group(item).startswith("sha256:")
    assert metrics.item_group(item) == metrics.item_group(same_text)  # whitespace-normalised
    assert metrics.item_group({"id": "x"}) == "item:x"


# -- through the `trackb score` stage --------------------------------------------------------

def test_trackb_score_stage_writes_the_same_metrics_and_its_settings(tmp_path):
    from trackb_core.evaluate import ScoreConfig, score
    from trackb_core.store import LocalStore

    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in crafted_items()))
    (tmp_path / "predictions.jsonl").write_text("".join(
        json.dumps({"id": key, **prediction}) + "\n"
        for key, prediction in crafted_predictions().items()))
    out = LocalStore(tmp_path / "score")
    score(ScoreConfig(dataset=str(tmp_path / "test.jsonl"),
                      predictions=str(tmp_path / "predictions.jsonl"), tag="post",
                      temperature=0.6, corpus=str(CORPUS)), out)
    written = json.loads((tmp_path / "score" / "eval.json").read_text())
    assert written["headline"]["functional_pass_at_1"]["value"] == pytest.approx(1 / 3)
    assert written["headline"]["bugfix_site_restored"]["value"] == pytest.approx(2 / 3)
    direct = score_all(crafted_items(), crafted_predictions(), "post", corpus_dir=CORPUS,
                       temperature=0.6)
    assert {k: v for k, v in written.items() if k not in ("trackb", "settings")} == direct
    settings = written["settings"]
    assert settings["dataset"]["sha256"] == hashlib.sha256(
        (tmp_path / "test.jsonl").read_bytes()).hexdigest()
    assert settings["dataset"]["items"] == 12
    assert settings["corpus"]["needed"] is True and settings["corpus"]["available"] is True
    assert settings["corpus"]["execution_env"] is None
    assert settings["scorer"]["metric_version"] == metrics.METRIC_VERSION
    assert settings["scorer"]["bootstrap_seed"] == metrics.BOOTSTRAP_SEED
    # predictions made elsewhere without generation.json: how they were made is unknown
    assert settings["sampling"] is None and settings["backend"] is None


# -- errors ---------------------------------------------------------------------------------

def test_bad_inputs_raise_input_error():
    item = make_item("clamp", "complete")
    with pytest.raises(InputError, match="no test items"):
        score_all([], {}, "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="no prediction"):
        score_all([item], {}, "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="greedy"):
        score_all([item], {item["id"]: {"samples": []}}, "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="samples"):
        score_all([item], {item["id"]: {"greedy": "", "samples": 5}}, "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="seed_view"):
        score_all([item], {item["id"]: {"greedy": "", "samples": [""],
                                        "seed_view": {"greedy": ""}}}, "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="truncated"):
        score_all([item], {item["id"]: {"greedy": "", "samples": [""],
                                        "truncated": {"greedy": "yes", "samples": [False]}}},
                  "t", corpus_dir=CORPUS)
    with pytest.raises(InputError, match="haiku"):
        functional_pass("haiku", "", item, None)


# -- unit_test aggregation (verdicts stubbed: the sandbox has its own tests) -------------------

def fake_unit_test_verdicts(monkeypatch, table):
    """Make the unit_test family's verdict answer from ``table[response]``."""
    calls = []

    def fake(response, item, corpus_dir, *, timeout=10.0, allow_weak_sandbox=False,
             python_path=()):
        calls.append((item["id"], response))
        return dict(table[response])

    monkeypatch.setattr(unit_test, "unit_test_verdict", fake)
    return calls


def unit_verdict(status, original, killed):
    return {"status": status, "passes_original": original, "kills_mutant": killed,
            "tests": 2, "reason": ""}


def test_unit_test_rates_count_executable_items_only(monkeypatch):
    calls = fake_unit_test_verdicts(monkeypatch, {
        "kills": unit_verdict("passed", True, True),
        "weak": unit_verdict("passed", True, False),
        "fails": unit_verdict("failed", False, None),
        "cannot": unit_verdict("not_executable", None, None),
        "no-mutant": unit_verdict("passed", True, None),
        "unplaced": unit_verdict("passed", True, None),  # the mutant could not be run
        "garbled": unit_verdict("unparsable", None, None),
    })
    greedy = ["kills", "weak", "fails", "cannot", "no-mutant", "unplaced", "garbled"]
    items = []
    for number, answer in enumerate(greedy):
        item = make_item("clamp", "unit_test")
        item.update(id=f"u{number}", function_id=f"f{number}")
        if answer != "no-mutant":
            item.update(buggy_source=buggy("clamp"), mutation={"kind": "off_by_one"})
        items.append(item)
    predictions = {f"u{i}": {"greedy": g, "samples": [g, "kills"]} for i, g in enumerate(greedy)}
    result = score_all(items, predictions, "t", corpus_dir=CORPUS, n_boot=50, workers=2)

    # executable: all but u3. Consistent with the original: u0, u1, u4, u5 of 6
    assert value(result, "unit_test_consistent_with_original") == pytest.approx(4 / 6)
    # kill rate over executable items with a mutant that counts: u0, u1, u2, u6
    # (u4 has none, u5's could not be run): killed by u0 only
    assert value(result, "unit_test_kills_mutant") == pytest.approx(1 / 4)
    assert result["headline"]["unit_test_kills_mutant"]["n"] == 4
    facts = result["families"]["unit_test"]
    assert facts["n"] == 7 and facts["n_executable"] == 6 and facts["not_executable"] == 1
    assert facts["n_with_mutant"] == 5
    assert facts["statuses"] == {"failed": 1, "not_executable": 1, "passed": 4,
                                 "unparsable": 1}
    # functional: the tests pass the original and kill the mutant; left out (None) where
    # they could not run or no mutant run could show it
    assert [r["functional"] for r in result["items"]] == [
        True, False, False, None, None, None, False]
    assert value(result, "functional_pass_greedy") == pytest.approx(1 / 4)
    assert result["headline"]["functional_pass_greedy"]["n"] == 4
    # samples [greedy, "kills"], the greedy one counted only where it is checked:
    # u0 2/2, u1 u2 u6 1/2, u3 u4 u5 1/1 -> (1 + 3 * 0.5 + 3) / 7
    assert value(result, "functional_pass_at_1") == pytest.approx(5.5 / 7)
    # each distinct (item, answer) runs once: 7 greedy + 6 extra "kills" samples
    assert len(calls) == len(set(calls)) == 13


EVEN_MODULE = '''"""A module of the corpus the tests import."""


''' + EVEN


def test_unit_test_answers_run_in_the_sandbox(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mathy.py").write_text(EVEN_MODULE)
    item = make_item("is_even", "unit_test")
    before, after, kind, line = FUNCTIONS["is_even"]["bug"]
    item.update(source_file="pkg/mathy.py", line=4, end_line=6, buggy_source=buggy("is_even"),
                mutation={"kind": kind, "line": line, "before": before, "after": after})
    header = "from pkg.mathy import is_even\n\n"
    kills = fence(header + "def test_parity():\n    assert is_even(4)\n    assert not is_even(3)\n")
    weak = fence(header + "def test_type():\n    assert isinstance(is_even(2), bool)\n")
    wrong = fence(header + "def test_odd():\n    assert is_even(3)\n")
    items, predictions = [], {}
    for name, greedy, samples in (("kills", kills, [weak, kills, kills]),
                                  ("weak", weak, [wrong, "", weak]),
                                  ("wrong", wrong, ["", "", ""])):
        items.append(dict(item, id=f"is_even-{name}"))
        predictions[f"is_even-{name}"] = {"greedy": greedy, "samples": samples}
    result = score_all(items, predictions, "t", corpus_dir=tmp_path, n_boot=50)

    facts = result["families"]["unit_test"]
    assert facts["statuses"] == {"failed": 1, "passed": 2}
    assert facts["not_executable"] == 0
    assert facts["consistent_with_original"] == pytest.approx(2 / 3)
    assert facts["kills_mutant"] == pytest.approx(1 / 3)
    assert [r["functional"] for r in result["items"]] == [True, False, False]
    # samples: kills 2/3 correct, weak 0/3, wrong 0/3
    assert value(result, "functional_pass_at_1") == pytest.approx(2 / 9)
    assert value(result, "functional_pass_at_3") == pytest.approx(1 / 3)
    # without the corpus nothing can run: every item is left out of the pass, not failed
    blind = score_all(items, predictions, "t", corpus_dir=CORPUS, n_boot=50)
    assert blind["families"]["unit_test"]["not_executable"] == 3
    assert blind["headline"]["unit_test_consistent_with_original"]["value"] is None
    assert blind["headline"]["functional_pass_greedy"]["value"] is None
    assert blind["headline"]["functional_pass_greedy"]["n"] == 0
