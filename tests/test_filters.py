"""The seed and strict filter sets, each reason pinned on a crafted row."""

from __future__ import annotations

import sys

import pytest

from trackb_core import families, filters
from trackb_core.errors import ConfigError
from trackb_core.filters import FilterContext, check_row

ORIGINAL = '''def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value'''
BUGGY = ORIGINAL.replace("if value < low:", "if value >= low:")
BASE = {"id": "shop/maths.py::clamp", "instruction": "...", "source_function": ORIGINAL,
        "source_file": "shop/maths.py", "function_id": "f1", "function_name": "clamp",
        "qualname": "clamp", "signature": "def clamp(value, low, high):",
        "params": ["value", "low", "high"], "returns_value": True, "line": 1, "end_line": 7,
        "decorators": [], "finish_reason": "stop"}


def row(category: str, response: str, **extra) -> dict:
    return {**BASE, "category": category, "response": response, **extra}


def fenced(code: str, prose: str = "The comparison in the first test was wrong.") -> str:
    return f"{prose}\n\n```python\n{code.strip()}\n```\n"


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "maths.py").write_text(ORIGINAL + "\n")
    return tmp_path


def strict(corpus=None) -> FilterContext:
    return FilterContext(min_chars=20, max_chars=8000, corpus_dir=corpus, sandbox_timeout=5)


def seed() -> FilterContext:
    return FilterContext(min_chars=20, max_chars=8000, corpus_dir=None, filter_set="seed")


@pytest.mark.parametrize("category, response, reason", [
    ("poetry", "x" * 40, "seed:unknown_category"),
    ("explain", "short", "seed:too_short"),
    ("explain", "x" * 9000, "seed:too_long"),
    ("explain", "This explains it. TODO: finish the explanation later.", "seed:placeholder"),
    ("complete", "I would write the function body here, nothing else.", "seed:no_code_block"),
    ("bugfix", "Fixed it:\n```python\ndef clamp(:\n    pass\n```", "seed:code_does_not_compile"),
    ("unit_test", "```python\nimport shop\n\ndef check():\n    assert 1\n```",
     "seed:no_test_function"),
    ("unit_test", "```python\nimport shop\n\ndef test_x():\n    pass\n```", "seed:no_assert"),
    ("docstring", "Clamp value into the closed range low..high.", "seed:no_triple_quote"),
])
def test_seed_reasons_apply_in_both_sets(category, response, reason):
    assert check_row(row(category, response), seed()).reason == reason
    assert check_row(row(category, response), strict()).reason == reason


def test_seed_set_keeps_what_strict_rejects():
    wrong_fix = row("bugfix", fenced(BUGGY), buggy_source=BUGGY, mutation={})
    assert check_row(wrong_fix, seed()) == filters.FilterVerdict(None, {})
    verdict = check_row(wrong_fix, strict())
    assert verdict.reason == "strict:bugfix_not_restored"
    assert verdict.facts == {"bugfix_exact_fix": False, "bugfix_site_restored": False}


def test_strict_bugfix_keeps_only_exact_fixes_and_records_a_restored_site():
    exact = check_row(row("bugfix", fenced(ORIGINAL), buggy_source=BUGGY, mutation={}),
                      strict())
    assert exact.reason is None and exact.facts["bugfix_exact_fix"] is True
    # the site restored but the function changed elsewhere: not shown to be a fix
    partial = ORIGINAL.replace("return value", "return int(value)")
    site = check_row(row("bugfix", fenced(partial), buggy_source=BUGGY, mutation={}), strict())
    assert site.reason == "strict:bugfix_not_restored"
    assert site.facts == {"bugfix_exact_fix": False, "bugfix_site_restored": True}


def test_strict_complete_reasons():
    echo = 'def clamp(value, low, high):\n    """Clamp value into [low, high]."""\n    pass'
    assert check_row(row("complete", fenced(echo)), strict()).reason == "strict:complete_echo"
    changed = "def clamp(value, low, high=10):\n    return min(max(value, low), high)"
    assert check_row(row("complete", fenced(changed)), strict()).reason \
        == "strict:complete_signature_changed"
    kept = check_row(row("complete", fenced(ORIGINAL)), strict())
    assert kept.reason is None and kept.facts["complete_exact_match"] is True


def test_strict_docstring_and_explain_reasons():
    partial = fenced('"""Clamp a value.\n\nArgs:\n    value: The value.\n\nReturns:\n    It.\n"""')
    verdict = check_row(row("docstring", partial), strict())
    assert verdict.reason == "strict:docstring_args_incomplete"
    assert verdict.facts["docstring_args_coverage"] == pytest.approx(1 / 3, abs=1e-3)
    no_returns = fenced('"""Clamp a value.\n\nArgs:\n    value: V.\n    low: L.\n    high: H.\n"""')
    assert check_row(row("docstring", no_returns), strict()).reason \
        == "strict:docstring_no_returns"
    explain = "**Purpose** Limits value to a range.\n**Parameters** value and low.\n" \
              "**Returns** the clamped value."
    assert check_row(row("explain", explain), strict()).reason == "strict:explain_params_missing"
    explain_all = explain.replace("value and low", "value, low and high")
    assert check_row(row("explain", explain_all), strict()).reason is None


def test_strict_rejects_truncated_and_extra_placeholders():
    truncated = row("explain", "**Purpose** value low high. Returns the value, clamped.",
                    finish_reason="length")
    assert check_row(truncated, strict()).reason == "strict:truncated"
    elided = fenced(ORIGINAL.replace("    return value", "    # rest of the code here"))
    assert check_row(row("complete", elided), strict()).reason == "strict:placeholder"


UNIT_TESTS_KILLING = fenced("""
from shop.maths import clamp

def test_inside():
    assert clamp(5, 0, 10) == 5

def test_above():
    assert clamp(12, 0, 10) == 10
""")


def test_unit_test_gold_failing_on_the_original_is_never_kept(corpus):
    wrong = fenced("from shop.maths import clamp\n\ndef test_wrong():\n"
                   "    assert clamp(50, 0, 10) == 50")
    verdict = check_row(row("unit_test", wrong), strict(corpus))
    assert verdict.reason == "strict:unit_test_failed"
    assert verdict.facts["unit_test_status"] == "failed"


def test_unit_test_gold_must_kill_the_mutant_where_one_exists(corpus):
    kept = check_row(row("unit_test", UNIT_TESTS_KILLING, buggy_source=BUGGY), strict(corpus))
    assert kept.reason is None
    assert kept.facts["unit_test_kills_mutant"] is True and kept.facts["unit_test_tests"] == 2
    weak = fenced("from shop.maths import clamp\n\ndef test_low():\n"
                  "    assert clamp(0, 0, 10) == 0")
    missed = check_row(row("unit_test", weak, buggy_source=BUGGY), strict(corpus))
    assert missed.reason == "strict:unit_test_misses_mutant"


def test_unit_test_that_cannot_run_is_rejected_and_counted_not_guessed():
    verdict = check_row(row("unit_test", UNIT_TESTS_KILLING), strict(corpus=None))
    assert verdict.reason == "strict:unit_test_not_executable"
    assert verdict.facts["unit_test_status"] == "not_executable"


def test_every_reason_is_documented_and_sets_are_checked():
    """The shared reasons in filters' docstring, each family's in its own module's."""
    shared = {f"seed:{r}" for r in filters.SEED_REASONS} | {
        f"strict:{r}" for r in filters.STRICT_REASONS}
    for reason in filters.reasons():
        name = reason.split(":", 1)[1]
        if reason in shared:
            assert f"``{reason}``" in filters.__doc__
        else:
            owners = [f for f in families.all_families()
                      if name in (*f.seed_reasons, *f.filter_reasons)]
            assert len(owners) == 1, reason
            assert f"``{name}``" in sys.modules[type(owners[0]).__module__].__doc__, reason
    with pytest.raises(ConfigError):
        FilterContext(min_chars=1, max_chars=2, corpus_dir=None, filter_set="lenient")
