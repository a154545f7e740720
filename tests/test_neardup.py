"""Tests for near-duplicate detection (trackb_core.neardup)."""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
import textwrap

import pytest

from trackb_core import neardup


def stdlib_sources(limit: int = 200) -> list[str]:
    """Real function sources from a few standard-library modules, in a stable order."""
    import calendar
    import colorsys
    import difflib
    import fnmatch
    import json.encoder
    import ntpath
    import posixpath
    import shlex
    import statistics
    import textwrap as textwrap_module

    sources = []
    for module in (textwrap_module, shlex, fnmatch, colorsys, json.encoder, posixpath, ntpath,
                   calendar, statistics, difflib):
        for _name, func in sorted(vars(module).items()):
            if inspect.isfunction(func) and func.__module__ == module.__name__:
                try:
                    sources.append(textwrap.dedent(inspect.getsource(func)))
                except (OSError, TypeError):  # made at run time: no source file
                    continue
    return sources[:limit]


def test_shingles_ignore_whitespace_and_use_five_token_windows():
    a = "def f(x):\n    return x + 1\n"
    b = "def  f( x ):\n\n        return x+1"
    assert neardup.tokens(a) == ["def", "f", "(", "x", ")", ":", "return", "x", "+", "1"]
    assert neardup.shingles(a) == neardup.shingles(b)
    assert len(neardup.shingles(a)) == 10 - 5 + 1
    assert neardup.shingles("a b") == {"a b"} and neardup.shingles("   ") == set()


def test_hashed_shingles_match_the_plain_sets():
    texts = stdlib_sources(40)
    hashes = neardup.shingle_hashes(texts)
    for text, hashed in zip(texts, hashes, strict=True):
        assert len(hashed) == len(neardup.shingles(text))
    for i, j in [(0, 1), (2, 9), (5, 5), (10, 30)]:
        plain = neardup.jaccard(neardup.shingles(texts[i]), neardup.shingles(texts[j]))
        assert neardup.exact_jaccard(hashes[i], hashes[j]) == pytest.approx(plain)


def test_hashes_are_the_same_in_another_process():
    # Python's own str hash is salted per process; trackb's must not be
    code = ("from trackb_core import neardup\n"
            "print(neardup.shingle_hashes(['def f(x):\\n    return x + 1'])[0].tolist())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
def test_lsh_params_keep_misses_at_the_threshold_rare(threshold):
    bands, rows = neardup.lsh_params(threshold)
    assert bands * rows <= neardup.NUM_PERM
    assert (1 - threshold ** rows) ** bands <= neardup.MAX_MISS_PROBABILITY


def test_a_threshold_of_one_finds_exact_copies_only():
    # DatasetConfig allows 1.0; the LSH under it needs two bands at least
    codes = ["def f(x):\n    return x + 1 + 2 + 3 + 4", "def f(x):\n    return x + 1 + 2 + 3 + 4",
             "def f(x):\n    return x + 1 + 2 + 3 + 5"]
    assert neardup.lsh_params(1.0)[0] >= 2
    assert neardup.near_duplicates(neardup.shingle_hashes(codes), 1.0) == {1: 0}


def with_near_copies(sources: list[str]) -> list[str]:
    """``sources`` plus edited copies of a few: a renamed local, an added statement."""
    copies = []
    for source in sources[:6]:
        lines = source.splitlines()
        lines.insert(len(lines) - 1, "    _unused = None")
        copies.append("\n".join(lines).replace("result", "outcome"))
    return sources + copies


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
def test_similar_pairs_equal_brute_force_exact_jaccard(threshold):
    texts = with_near_copies(stdlib_sources())
    sets = [neardup.shingles(t) for t in texts]
    expected = {(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
                if sets[i] and sets[j] and neardup.jaccard(sets[i], sets[j]) >= threshold}
    found = neardup.similar_pairs(neardup.shingle_hashes(texts), threshold)
    assert {(i, j) for i, j, _ in found} == expected
    planted = {(i, len(texts) - 6 + i) for i in range(6)}
    assert planted <= expected if threshold == 0.5 else expected
    for i, j, similarity in found:
        assert similarity == pytest.approx(neardup.jaccard(sets[i], sets[j]))
    assert found == sorted(found)


def test_near_duplicates_keep_the_first_of_each_family():
    base = stdlib_sources(3)
    texts = [base[0], base[1], base[0] + "\n# copied", base[2], base[0].replace("\n", "\n\n")]
    dropped = neardup.near_duplicates(neardup.shingle_hashes(texts), 0.85)
    assert dropped == {2: 0, 4: 0}


def test_clusters_are_transitive_and_named_by_their_smallest_member():
    pairs = [(3, 4, 0.9), (1, 3, 0.8), (5, 6, 0.7)]
    assert neardup.clusters(7, pairs) == [0, 1, 2, 1, 1, 5, 5]
    assert neardup.clusters(7, list(reversed(pairs))) == neardup.clusters(7, pairs)
    assert neardup.clusters(3, []) == [0, 1, 2]
