"""Parsing answers' code: safe from the scorer's threads."""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor

from trackb_core.codeblocks import parses, syntax_tree

MODULE = "\n".join(f"def f{i}(a, b):\n    return [x * (a + b) for x in range({i}) if x % 2]"
                   for i in range(200))


def _at_depth(depth, action):
    return _at_depth(depth - 1, action) if depth else action()


def test_parses_in_many_threads_at_different_stack_depths_all_succeed():
    # CPython 3.11.7 shares the AST converter's recursion counter between threads: a
    # thread switch inside one conversion (forced here by a GC callback that yields, with
    # GC running every few dozen allocations) made another thread's parse raise
    # SystemError "AST constructor recursion depth mismatch" in CI's scoring pool.
    def yield_during_gc(phase, info):
        time.sleep(0)

    threshold = gc.get_threshold()
    gc.callbacks.append(yield_during_gc)
    gc.set_threshold(50)
    try:
        with ThreadPoolExecutor(8) as pool:
            trees = list(pool.map(lambda i: _at_depth(i % 7 * 3, lambda: parses(MODULE)),
                                  range(64)))
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(yield_during_gc)
    assert all(tree is not None and len(tree.body) == 200 for tree in trees)


def test_syntax_tree_raises_on_bad_code_and_parses_expressions():
    assert syntax_tree("(a +\n b)", mode="eval").body.op is not None
    for bad in ("def f(:\n", "x = 1\0"):
        try:
            syntax_tree(bad)
        except (SyntaxError, ValueError):
            continue
        raise AssertionError(f"{bad!r} parsed")
    assert parses("def f(:\n") is None
