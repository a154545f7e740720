"""Near-duplicate detection: token 5-gram shingles, MinHash LSH, exact Jaccard, clusters.

build-dataset uses it twice (field notes §2; BigCode's dedup settings):

* **Removal** (:data:`REMOVAL_THRESHOLD` = 0.85): two rows of one category whose
  instructions, or whose response code, share >= 85% of their token 5-grams ask or
  answer the same thing; only the first (by id) is kept. 0.85 sits inside BigCode's
  0.7-0.9 band, high enough that two genuinely different functions that share
  boilerplate stay.
* **Split grouping** (:data:`CLUSTER_THRESHOLD` = 0.7): source functions with Jaccard
  >= 0.7 are joined (union-find) into one cluster, and a cluster sits on one side of
  the split. Lower than removal on purpose: a test function that merely resembles a
  training function still leaks (Allamanis 2019). Jaccard cannot see a function nested
  in another (about ``|inner| / |outer|``) or a helper copied into two larger functions:
  build-dataset joins those by line span and by AST (:func:`trackb_core.dataset.split_groups`).

Similarity is the Jaccard index of two texts' sets of token 5-grams. Tokens are runs of
word characters or single punctuation characters, so whitespace and formatting do not
matter. MinHash LSH (datasketch) only proposes candidate pairs: its band/row split is
chosen so that a pair at the threshold is missed with probability below
:data:`MAX_MISS_PROBABILITY`, and every candidate is then confirmed with the exact Jaccard
of the two shingle sets. So a reported pair is never a MinHash estimation error, and a
missed one is a vanishingly rare LSH miss rather than an estimate that fell short.

Everything is deterministic: shingles are hashed with blake2b (not Python's salted
``hash``), MinHash permutations come from a fixed seed, and results are sorted. datasketch
and numpy are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

NGRAM = 5
NUM_PERM = 128
MINHASH_SEED = 1
REMOVAL_THRESHOLD = 0.85
CLUSTER_THRESHOLD = 0.7
MAX_MISS_PROBABILITY = 1e-6
ESTIMATE_MARGIN = 0.2

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Odd 64-bit multipliers for the rolling n-gram hash and splitmix64's finaliser.
_ROLL = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def tokens(text: str) -> list[str]:
    """Word runs and single punctuation characters of ``text``; whitespace is dropped."""
    return _TOKEN.findall(str(text))


def shingles(text: str, n: int = NGRAM) -> set[str]:
    """The set of ``n``-token shingles of ``text``, each as its tokens joined by a space.

    A text shorter than ``n`` tokens has one shingle (all its tokens); an empty one none.
    """
    toks = tokens(text)
    if len(toks) < n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    """``|a & b| / |a | b|``; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingle_hashes(texts: Sequence[str], n: int = NGRAM) -> list[Any]:
    """For each text, its ``n``-token shingles as a sorted, unique numpy ``uint64`` array.

    Each token is hashed once (blake2b), and the shingle hashes are computed from the
    token hashes with numpy, so 15k code-sized texts take about a second. Equal
    shingles give equal hashes across processes and runs; two different shingles
    collide with probability ~2^-64.
    """
    import numpy as np

    token_hash: dict[str, int] = {}
    result = []
    for text in texts:
        toks = tokens(text)
        values = np.fromiter((token_hash.get(t) or token_hash.setdefault(t, _hash64(t))
                              for t in toks), dtype=np.uint64, count=len(toks))
        result.append(_ngram_hashes(values, n))
    return result


def _hash64(token: str) -> int:
    # 0 is reserved so that ``dict.get(t) or ...`` above never mistakes a hash for a miss
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(),
                          "little") or 1


def _ngram_hashes(values: Any, n: int) -> Any:
    import numpy as np

    if len(values) == 0:
        return values
    width = min(n, len(values))
    count = len(values) - width + 1
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        combined = np.zeros(count, dtype=np.uint64)
        for offset in range(width):
            combined = combined * np.uint64(_ROLL) + values[offset:offset + count]
        # splitmix64's finaliser spreads the bits, so the low and high halves are both usable
        combined ^= combined >> np.uint64(30)
        combined *= np.uint64(_MIX1)
        combined ^= combined >> np.uint64(27)
        combined *= np.uint64(_MIX2)
        combined ^= combined >> np.uint64(31)
    return np.unique(combined)


def exact_jaccard(a: Any, b: Any) -> float:
    """Jaccard index of two sorted unique hash arrays from :func:`shingle_hashes`."""
    import numpy as np

    if len(a) == 0 and len(b) == 0:
        return 1.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def lsh_params(threshold: float, num_perm: int = NUM_PERM,
               max_miss: float = MAX_MISS_PROBABILITY) -> tuple[int, int]:
    """``(bands, rows)`` for MinHash LSH: the most rows per band (fewest false
    candidates) whose chance of missing a pair at ``threshold`` stays below ``max_miss``.

    A pair of Jaccard ``s`` becomes a candidate with probability
    ``1 - (1 - s**rows)**bands``.
    """
    best = (num_perm, 1)
    # datasketch's LSH needs two bands at least (at threshold 1.0 every width would do)
    for rows in range(1, num_perm // 2 + 1):
        bands = num_perm // rows
        if (1 - threshold ** rows) ** bands <= max_miss:
            best = (bands, rows)
    return best


def similar_pairs(hashes: Sequence[Any], threshold: float, *, num_perm: int = NUM_PERM,
                  seed: int = MINHASH_SEED) -> list[tuple[int, int, float]]:
    """``(i, j, jaccard)`` with ``i < j`` for every pair of ``hashes`` (arrays from
    :func:`shingle_hashes`) whose exact Jaccard is >= ``threshold``, sorted.

    Candidates come from datasketch's MinHashLSH with :func:`lsh_params`; each is then
    confirmed exactly. Empty texts (no shingles) are never similar to anything.
    """
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    bands, rows = lsh_params(threshold, num_perm)
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    present = [i for i, h in enumerate(hashes) if len(h)]
    # datasketch's legacy scheme permutes 32-bit values: use the upper half of each hash
    minhashes = MinHash.bulk(((hashes[i] >> 32).tolist() for i in present), num_perm=num_perm,
                             seed=seed, hashfunc=_identity)
    with lsh.insertion_session() as session:
        for index, minhash in zip(present, minhashes, strict=True):
            session.insert(index, minhash, check_duplication=False)
    # The MinHash estimate screens candidates before the exact check: LSH proposes many
    # pairs that merely share boilerplate (the task templates), and an estimate more than
    # ESTIMATE_MARGIN below the threshold is > 4.5 standard deviations off at 128
    # permutations.
    signatures = np.vstack([m.hashvalues for m in minhashes])
    row_of = {index: row for row, index in enumerate(present)}
    found: list[tuple[int, int, float]] = []
    for row, index in enumerate(present):
        others = np.array(sorted(o for o in lsh.query(minhashes[row]) if o > index), dtype=int)
        if not len(others):
            continue
        rows_ = np.array([row_of[o] for o in others])
        estimates = (signatures[rows_] == signatures[row]).mean(axis=1)
        for other in others[estimates >= threshold - ESTIMATE_MARGIN]:
            similarity = exact_jaccard(hashes[index], hashes[other])
            if similarity >= threshold:
                found.append((index, int(other), similarity))
    return sorted(found)


def _identity(value: int) -> int:
    return value


def near_duplicates(hashes: Sequence[Any], threshold: float = REMOVAL_THRESHOLD,
                    **kwargs: Any) -> dict[int, int]:
    """``{dropped index: kept index}``: walking ``hashes`` in order, each item similar
    (>= ``threshold``) to an earlier *kept* item is dropped in favour of it.

    The input order decides which copy stays, so pass items in a canonical order.
    """
    pairs = similar_pairs(hashes, threshold, **kwargs)
    neighbours: dict[int, list[int]] = {}
    for i, j, _ in pairs:
        neighbours.setdefault(i, []).append(j)
    dropped: dict[int, int] = {}
    for i in range(len(hashes)):
        if i in dropped:
            continue
        for j in neighbours.get(i, ()):
            dropped.setdefault(j, i)
    return dropped


def clusters(count: int, pairs: Sequence[tuple[int, int, Any]]) -> list[int]:
    """Union-find over ``count`` items joined by ``pairs``: each item's cluster, named by
    its smallest member index (so the result does not depend on the order of pairs)."""
    parent = list(range(count))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for i, j, *_ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(count)]
