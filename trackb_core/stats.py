"""The statistics behind trackb's honest metrics: unbiased pass@k, grouped bootstrap
intervals, and the paired tests that compare a baseline with a fine-tuned model.

Test sets here are small (the seed had 46 items: a proportion near 0.5 has a standard
error of about 7 points) and items are not independent: up to five tasks come from one
source function. So every interval resamples whole *groups* (source functions), not
items, and baseline-vs-post comparisons are paired on the same items (field notes §2).

Only the standard library and numpy (imported inside the functions) are used; scipy
would do the same sums but is not needed for them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k of one item: ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples were drawn at one temperature and ``c`` of them are correct: the
    result is the chance that at least one of ``k`` samples drawn from those ``n``
    without replacement is correct. Computed with exact integers.

    Raises ValueError unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples holds a correct one
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _group_arrays(values: Sequence[float], groups: Sequence[Hashable]):
    """``(sums, counts)`` per group, as numpy arrays, in first-seen group order."""
    import numpy as np

    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} groups")
    if not values:
        raise ValueError("no values to resample")
    index: dict[Hashable, int] = {}
    for group in groups:
        index.setdefault(group, len(index))
    sums = np.zeros(len(index))
    counts = np.zeros(len(index))
    for value, group in zip(values, groups, strict=True):
        sums[index[group]] += float(value)
        counts[index[group]] += 1
    return sums, counts


def bootstrap_ci(values: Sequence[float], groups: Sequence[Hashable], *, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """A ``1 - alpha`` percentile bootstrap interval for the mean of ``values``.

    Each of ``n_boot`` replicates draws as many groups as there are, with replacement,
    and takes the mean over every value of the drawn groups (so a source function with
    five tasks counts five times, as it does in the point estimate). The same inputs
    and ``seed`` always give the same interval. With one group, or with all values
    equal, the interval is the point estimate itself. If the percentile interval
    misses the point estimate (possible with a handful of groups of very unequal
    size), it is widened to include it: a reported interval always contains its value.

    Raises ValueError if ``values`` is empty, its length differs from ``groups``, or
    ``n_boot < 1`` or ``alpha`` is not in (0, 1).
    """
    import numpy as np

    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    sums, counts = _group_arrays(values, groups)
    point = float(sums.sum() / counts.sum())
    if len(sums) == 1 or np.all(np.asarray(values, dtype=float) == point):
        return point, point
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return min(float(low), point), max(float(high), point)


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``rate`` over ``n`` trials, rounded to 4
    places; (0, 1) when ``n`` is 0.

    Unlike the normal approximation (or a bootstrap), it does not collapse to a point at
    0/n or n/n: 0 passes out of 20 gives [0, 0.161], not [0, 0]. Raises nothing.
    """
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(rate * (1 - rate), 0.0) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def proportion_ci(values: Sequence[float], groups: Sequence[Hashable], *, n_boot: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """A 95% interval for the mean of ``values`` that never collapses at 0/n or n/n.

    The grouped bootstrap interval (:func:`bootstrap_ci`: source functions resampled
    whole); when every value is 0 or 1 (a pass/fail rate, or per-item shares that all
    sit at an end) it is widened to hold the Wilson score interval of the same rate
    over as many items (:func:`wilson_interval`). The bootstrap alone says "no
    uncertainty" for 0 passes out of 20, which is false; widening never narrows the
    clustered interval. Raises ValueError as :func:`bootstrap_ci` does.
    """
    low, high = bootstrap_ci(values, groups, n_boot=n_boot, seed=seed)
    if all(float(v) in (0.0, 1.0) for v in values):
        mean = sum(float(v) for v in values) / len(values)
        wilson_low, wilson_high = wilson_interval(mean, len(values))
        low, high = min(low, wilson_low), max(high, wilson_high)
    return low, high


def paired_bootstrap_delta(before: Sequence[float], after: Sequence[float],
                           groups: Sequence[Hashable], *, n_boot: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """``{"delta": mean(after) - mean(before), "ci": [lo, hi]}``, a 95% interval.

    Paired: ``before[i]`` and ``after[i]`` are the same item under two models, and each
    replicate resamples whole groups of items for both at once, so the interval is that
    of the mean per-item difference (:func:`bootstrap_ci` of ``after - before``).

    Raises ValueError if the three sequences differ in length or are empty, or if
    ``n_boot < 1``.
    """
    if len(before) != len(after):
        raise ValueError(f"paired values differ in length: {len(before)} before, "
                         f"{len(after)} after")
    differences = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    low, high = bootstrap_ci(differences, groups, n_boot=n_boot, seed=seed)
    return {"delta": sum(differences) / len(differences), "ci": [low, high]}


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired pass/fail outcomes: ``{"b", "c", "p_value"}``.

    ``b`` counts items that passed before and fail after, ``c`` items that failed before
    and pass after. Under "no change" each discordant item is a fair coin flip, so the
    two-sided p-value is ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))`` (1.0
    when there are no discordant items). Exact integer sums; no scipy.

    Raises ValueError if the two sequences differ in length.
    """
    if len(before) != len(after):
        raise ValueError(f"paired outcomes differ in length: {len(before)} before, "
                         f"{len(after)} after")
    b = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    c = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    discordant = b + c
    if discordant == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    tail = sum(math.comb(discordant, i) for i in range(min(b, c) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant)
    return {"b": b, "c": c, "p_value": p_value}
