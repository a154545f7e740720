"""Tests for trackb_core.teacher: the reference teacher (the OpenAI-compatible client's
tests live in test_openai_teacher.py).

``make_tasks`` builds task rows from real standard-library functions; test_generate and
test_dataset share it.
"""

from __future__ import annotations

import ast
import colorsys
import fnmatch
import inspect
import shlex
import string
import textwrap

import pytest

from trackb_core import codeblocks
from trackb_core.families import names
from trackb_core.families.bugfix import describe_mutation
from trackb_core.teacher import ReferenceTeacher

CATEGORIES = names()

# Real functions from the standard library: with and without docstrings, with
# comparisons to flip, a method, a generator-free loop-heavy function.
REAL_FUNCTIONS = (textwrap.dedent, shlex.quote, fnmatch.fnmatchcase, colorsys.rgb_to_hls,
                  string.capwords, textwrap.TextWrapper._split, textwrap.indent)


# -- task rows built from real sources (shared with test_generate / test_dataset) -------

_FLIPS = {ast.Eq: "!=", ast.NotEq: "==", ast.Lt: ">=", ast.GtE: "<", ast.Gt: "<=",
          ast.LtE: ">", ast.Is: "is not", ast.IsNot: "is", ast.In: "not in", ast.NotIn: "in"}


def flip_first_comparison(source: str) -> tuple[dict, str] | None:
    """``(mutation, buggy_source)`` flipping the first single-line comparison, or None."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or type(node.ops[0]) not in _FLIPS:
            continue
        left, right = node.left, node.comparators[0]
        if left.end_lineno != right.lineno:
            continue
        line = lines[left.end_lineno - 1]
        gap = line[left.end_col_offset:right.col_offset]
        before = gap.strip()
        after = _FLIPS[type(node.ops[0])]
        if before.startswith("("):
            continue
        new_gap = gap.replace(before, after, 1)
        buggy_line = line[:left.end_col_offset] + new_gap + line[right.col_offset:]
        buggy = lines[:left.end_lineno - 1] + [buggy_line] + lines[left.end_lineno:]
        mutation = {"kind": "comparison_flip", "line": left.end_lineno, "before": before,
                    "after": after}
        return mutation, "\n".join(buggy) + "\n"
    return None


def make_tasks(functions=REAL_FUNCTIONS, categories=CATEGORIES,
               source_file: str | None = None) -> list[dict]:
    """Task rows shaped like extract/tasks output, from real function objects or sources."""
    rows = []
    for func in functions:
        source = textwrap.dedent(func if isinstance(func, str) else inspect.getsource(func))
        name = ast.parse(source).body[0].name
        file = source_file or (f"{func.__module__}.py" if not isinstance(func, str) else "x.py")
        function_id = f"{file.removesuffix('.py').replace('/', '.')}.{name}"
        for category in categories:
            row = {"id": f"{function_id}-{category}", "category": category,
                   "instruction": f"Task {category} for `{name}`:\n```python\n{source}```",
                   "source_function": source, "source_file": file,
                   "function_id": function_id, "function_name": name}
            if category == "bugfix":
                flipped = flip_first_comparison(source)
                if flipped is None:
                    continue
                row["mutation"], row["buggy_source"] = flipped
            rows.append(row)
    return rows


# -- reference teacher ------------------------------------------------------------------


def answers(tasks):
    return {r.id: r for r in ReferenceTeacher().answer_all(tasks)}


def test_reference_docstring_is_the_functions_own_docstring():
    tasks = make_tasks([textwrap.dedent, shlex.quote], ["docstring"])
    for task in tasks:
        result = answers([task])[task["id"]]
        assert result.ok and result.finish_reason == "stop"
        block = codeblocks.seed_code_blocks(result.response)[0]
        # the block is a string literal whose value is exactly the docstring
        literal = ast.literal_eval(block)
        func = ast.parse(task["source_function"]).body[0]
        assert literal.strip() == ast.get_docstring(func).strip()
        assert result.response.startswith("```python\n")


def test_reference_docstring_skips_functions_without_one():
    source = "def add(a, b):\n    total = a + b\n    if total > 10:\n        return 10\n    return total\n"
    result = answers(make_tasks([source], ["docstring"]))["x.add-docstring"]
    assert result.status == "skipped" and result.reason == "no_reference_docstring"
    assert result.response is None


def test_reference_complete_is_the_original_function():
    task = make_tasks([fnmatch.fnmatchcase], ["complete"])[0]
    result = answers([task])[task["id"]]
    block = codeblocks.seed_code_blocks(result.response)[0]
    assert block == task["source_function"].strip()
    assert codeblocks.compiles(block)


def test_reference_bugfix_explains_the_flip_and_restores_the_original():
    task = make_tasks([textwrap.dedent], ["bugfix"])[0]
    mutation = task["mutation"]
    result = answers([task])[task["id"]]
    text = result.response
    assert f"Line {mutation['line']} compares with `{mutation['after']}` where the logic " \
           f"needs `{mutation['before']}`" in text
    assert "bug" in text.lower() and "fix" in text.lower()
    assert codeblocks.seed_code_blocks(text)[0] == task["source_function"].strip()


@pytest.mark.parametrize(("good", "bad", "expected"), [
    ("    if x == y:", "    if x != y:", "compares with `!=` where the logic needs `==`"),
    ("    while i < n:", "    while i <= n:", "off-by-one"),
    ("    if a and b:", "    if a or b:", "joins the conditions with `or`"),
    ("    return value", "    # return value", "commented out"),
    ("    flag = True", "    flag = False", "uses `False` where the logic needs `True`"),
    ("    if not ready:", "    if ready:", "drops a `not`"),
    ("    end = len(xs) - 1", "    end = len(xs)", "off by one"),
])
def test_describe_mutation_covers_the_seed_mutation_kinds(good, bad, expected):
    source = f"def f(x, y):\n{good}\n        pass\n"
    buggy = f"def f(x, y):\n{bad}\n        pass\n"
    # whole lines as before/after: the changed fragment is found by a token diff
    text = describe_mutation({"kind": "k", "line": 2, "before": good, "after": bad},
                             source, buggy)
    assert expected in text
    assert text.startswith("The bug is on line 2:")


def test_reference_explain_is_structured_and_passes_the_seed_style_checks():
    tasks = make_tasks(REAL_FUNCTIONS, ["explain"])
    results = answers(tasks)
    for task in tasks:
        text = results[task["id"]].response
        for heading in ("**Purpose:**", "**Parameters:**", "**Returns:**", "**Behavior:**"):
            assert heading in text
        assert len(text.split()) >= 20 and "function" in text.lower()
        assert not (text.strip().startswith("```") and text.strip().endswith("```"))
    dedent = results["textwrap.dedent-explain"].response
    assert "Remove any common leading whitespace" in dedent  # docstring summary
    assert "- `text`: no type annotation, required" in dedent
    assert "Loops over" in dedent and "Branches on" in dedent
    # deterministic
    assert answers(tasks) == results


def test_reference_explain_facts_for_async_generator_and_raise():
    source = textwrap.dedent('''
        async def fetch_rows(client, table: str, *, limit: int = 10) -> list:
            async with client.session() as session:
                try:
                    rows = await session.query(table, limit=limit)
                except KeyError:
                    raise ValueError(f"no table {table}")
            for row in rows:
                yield row
    ''')
    text = answers(make_tasks([source], ["explain"]))["x.fetch_rows-explain"].response
    assert "async generator function `fetch_rows` has no docstring" in text
    assert "fetch rows" in text
    assert "- `table`: type `str`, required" in text
    assert "- `limit`: type `int`, default `10`, keyword-only" in text
    assert "Catches `KeyError`" in text and "Raises `ValueError`" in text
    assert "A generator yielding `row`" in text
    assert "awaiting `session.query(table, limit=limit)`" in text


def test_reference_unit_test_and_unknown_are_skipped_with_reasons():
    tasks = make_tasks([shlex.quote], ["unit_test"]) + [
        {"id": "odd", "category": "poetry", "instruction": "x", "source_function": "def f(): pass"},
        {"id": "broken", "category": "complete", "instruction": "x", "source_function": "def ("},
    ]
    results = answers(tasks)
    assert results["shlex.quote-unit_test"].reason == "no_reference_unit_test"
    assert results["odd"].reason == "unknown_category"
    assert results["broken"].reason == "unparsable_source"
    assert all(r.status == "skipped" for r in results.values())


@pytest.mark.parametrize(("kind", "line", "expected"), [
    ("off_by_one", "return a[n - 1]", "drops the `- 1`: the value is off by one"),
    ("off_by_one", "return list(range(n))", "adds a `- 1`: the value is off by one"),
    ("eq_flip", "return a == n", "compares with `!=` where the logic needs `==`: the test "
                                 "is inverted"),
    ("is_not_to_is", "return a is not None", "compares with `is` where the logic needs "
                                             "`is not`: the test is inverted"),
    ("not_in_to_in", "return n not in a", "compares with `in` where the logic needs "
                                          "`not in`"),
    ("return_value_removed", "return a + n", "returns nothing where it should return "
                                             "`a + n`: a bare `return` gives the caller "
                                             "`None`"),
    ("bool_flip", "return True", "uses `False` where the logic needs `True`"),
    ("lte_to_lt", "return a <= n", "compares with `<` where the logic needs `<=`: the "
                                   "boundary case"),
    ("gte_to_gt", "return a >= n", "compares with `>` where the logic needs `>=`: the "
                                   "boundary case"),
    ("not_dropped", "return not a", "drops a `not`: the condition is inverted"),
    ("and_or_swap", "return a and n", "joins the conditions with `or` where the logic "
                                      "needs `and`"),
    ("is_to_is_not", "return a is None", "compares with `is not` where the logic needs "
                                         "`is`"),
    ("in_to_not_in", "return n in a", "compares with `not in` where the logic needs `in`"),
    ("lt_to_lte", "return a < n", "compares with `<=` where the logic needs `<`: the "
                                  "boundary case"),
    ("gt_to_gte", "return a > n", "compares with `>=` where the logic needs `>`: the "
                                  "boundary case"),
])
def test_describe_mutation_explains_every_mutation_kind(kind, line, expected):
    from trackb_core.mutations import KINDS, inject_bug

    source = f"def f(a, n):\n    x = 1\n    {line}\n"
    buggy, mutation = inject_bug(source, 0, "f", kind=kind)
    text = describe_mutation(mutation, source, buggy)
    assert text.startswith(f"The bug is on line 3: `{mutation['after'].strip()}`.")
    assert f"Line 3 {expected}" in text, text
    assert text.endswith(f"The fix restores `{line}`.")
    assert kind in KINDS


def test_describe_mutation_prefers_the_operator_fields_of_tasks():
    # trackb_core.tasks stores whole lines in before/after and the operators beside them
    mutation = {"kind": "comparison_flip", "line": 2, "before": "    if a <= b:",
                "after": "    if a < b:", "op_before": "<=", "op_after": "<"}
    text = describe_mutation(mutation, "def f(a, b):\n    if a <= b:\n        return a\n",
                             "def f(a, b):\n    if a < b:\n        return a\n")
    assert "Line 2 compares with `<` where the logic needs `<=`" in text
    assert "off-by-one" in text and "The fix restores `if a <= b:`" in text
