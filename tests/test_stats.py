"""Unbiased pass@k, grouped bootstrap intervals and the paired tests, against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trackb_core.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap_delta, pass_at_k


def chen_numpy_pass_at_k(n: int, c: int, k: int) -> float:
    """The estimator exactly as printed in Chen et al. (2021), Figure 3."""
    if n - c < k:
        return 1.0
    return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


# -- pass@k ---------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 1, 0.4),          # c / n
    (5, 2, 3, 0.9),          # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 0, 3, 0.0),
    (5, 5, 1, 1.0),
    (3, 1, 3, 1.0),          # n - c < k: every draw of 3 holds the correct one
    (10, 3, 2, 1 - 21 / 45),  # C(7,2)=21, C(10,2)=45
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_chen_numpy_formula_everywhere():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(chen_numpy_pass_at_k(n, c, k)), \
                    (n, c, k)


def test_pass_at_1_is_the_correct_fraction():
    assert all(pass_at_k(n, c, 1) == pytest.approx(c / n)
               for n in range(1, 12) for c in range(n + 1))


@pytest.mark.parametrize(("n", "c", "k"), [(2, 1, 3), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# -- bootstrap_ci ---------------------------------------------------------------------

def test_bootstrap_is_deterministic_given_seed_and_varies_with_it():
    values = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    groups = [i // 2 for i in range(len(values))]
    first = bootstrap_ci(values, groups, n_boot=500, seed=7)
    assert first == bootstrap_ci(values, groups, n_boot=500, seed=7)
    others = {bootstrap_ci(values, groups, n_boot=500, seed=s) for s in range(8)}
    assert len(others) > 1


def test_bootstrap_interval_contains_point_estimate_and_is_ordered():
    rng = np.random.default_rng(3)
    for trial in range(20):
        size = int(rng.integers(2, 40))
        values = rng.random(size).tolist()
        groups = rng.integers(0, max(1, size // 3), size).tolist()
        low, high = bootstrap_ci(values, groups, n_boot=200, seed=trial)
        point = sum(values) / len(values)
        assert low <= point <= high


def test_bootstrap_degenerate_cases_collapse_to_the_point():
    assert bootstrap_ci([1, 1, 1, 1], ["a", "b", "c", "d"]) == (1.0, 1.0)
    assert bootstrap_ci([0.0, 0.0], ["a", "b"]) == (0.0, 0.0)
    # one group: resampling it always gives the same mean
    assert bootstrap_ci([1, 0, 0], ["f", "f", "f"]) == pytest.approx((1 / 3, 1 / 3))
    assert bootstrap_ci([0.5], ["only"]) == (0.5, 0.5)


def test_bootstrap_resamples_groups_not_items():
    # Two groups, each all-pass or all-fail: a replicate mean can only be 0, 0.5 or 1
    # (whole groups move together), and both extremes appear with 1000 replicates.
    values = [1] * 10 + [0] * 10
    groups = ["pass"] * 10 + ["fail"] * 10
    assert bootstrap_ci(values, groups, n_boot=1000, seed=0) == (0.0, 1.0)
    # The same values as 20 independent items give a much narrower interval.
    low, high = bootstrap_ci(values, list(range(20)), n_boot=1000, seed=0)
    assert 0.2 < low < 0.5 < high < 0.8


def test_bootstrap_interval_width_is_about_the_normal_one():
    # 100 independent items, mean 0.5: the 95% interval is about +-1.96 * 0.05.
    values = [1, 0] * 50
    low, high = bootstrap_ci(values, list(range(100)), n_boot=2000, seed=1)
    assert high - low == pytest.approx(2 * 1.96 * 0.05, abs=0.03)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci([], [])
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], ["a"])
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], ["a", "b"], n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], ["a", "b"], alpha=1.0)


# -- McNemar ----------------------------------------------------------------------------

def test_mcnemar_hand_values():
    five_gains = mcnemar_exact([False] * 5 + [True] * 3, [True] * 5 + [True] * 3)
    assert five_gains == {"b": 0, "c": 5, "p_value": pytest.approx(0.0625)}
    assert mcnemar_exact([True, False, True, False], [False, True, False, True])["p_value"] == 1.0
    assert mcnemar_exact([True, False], [True, False]) == {"b": 0, "c": 0, "p_value": 1.0}
    # b=1, c=9: 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    one_loss = mcnemar_exact([True] + [False] * 9, [False] + [True] * 9)
    assert one_loss["b"] == 1 and one_loss["c"] == 9
    assert one_loss["p_value"] == pytest.approx(22 / 1024)


def test_mcnemar_matches_binomial_sum_and_is_symmetric():
    for b in range(0, 12):
        for c in range(0, 12):
            before = [True] * b + [False] * c
            after = [False] * b + [True] * c
            n = b + c
            expected = 1.0 if n == 0 else min(
                1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)
            result = mcnemar_exact(before, after)
            assert result["p_value"] == pytest.approx(expected)
            assert result["p_value"] == mcnemar_exact(after, before)["p_value"]


def test_mcnemar_large_counts_do_not_overflow():
    result = mcnemar_exact([False] * 3000, [True] * 1600 + [False] * 1400)
    assert result["c"] == 1600 and result["p_value"] == pytest.approx(0.0, abs=1e-300)


def test_mcnemar_rejects_unpaired_lists():
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


# -- paired bootstrap delta -------------------------------------------------------------

def test_paired_delta_is_mean_difference_and_deterministic():
    before = [0, 0, 1, 1, 0, 1]
    after = [1, 0, 1, 1, 1, 1]
    groups = ["a", "a", "b", "c", "d", "d"]
    result = paired_bootstrap_delta(before, after, groups, n_boot=400, seed=5)
    assert result["delta"] == pytest.approx(2 / 6)
    low, high = result["ci"]
    assert low <= result["delta"] <= high
    assert result == paired_bootstrap_delta(before, after, groups, n_boot=400, seed=5)


def test_paired_delta_of_identical_runs_is_exactly_zero():
    values = [0.2, 0.9, 0.4]
    assert paired_bootstrap_delta(values, values, [1, 2, 3]) == {"delta": 0.0, "ci": [0.0, 0.0]}


def test_paired_delta_rejects_unpaired_lists():
    with pytest.raises(ValueError):
        paired_bootstrap_delta([1, 0], [1], ["a", "b"])
