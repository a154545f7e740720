"""Task building: determinism, balanced one-site bugs, each family's rows and fields."""

from __future__ import annotations

import ast
import io
import re
import textwrap
import tokenize

import pytest

from trackb_core.codeblocks import seed_code_blocks
from trackb_core.corpus import python_files
from trackb_core.extract import extract_functions, functions_in_source
from trackb_core.families import names
from trackb_core.mutations import MAX_KIND_SHARE, ParsedFunction, mutation_sites
from trackb_core.pyast import complete_stub, module_path, strip_docstring
from trackb_core.tasks import build_tasks

CATEGORIES = names()

ROW_KEYS = {"id", "category", "instruction", "source_function", "source_file", "function_id",
            "function_name", "qualname", "signature", "params", "returns_value", "line",
            "end_line", "decorators"}

TRAP = textwrap.dedent('''\
    def check(value, items):
        """Return True when value == items[0]; `a != b` here is prose, not code."""
        label = "value == other"  # a comment with == and != and is not
        text = f"{label} != x"
        if value in items:
            return value != items[0]
        return None
    ''')


def _functions(source: str, rel: str = "pkg/mod.py") -> list[dict]:
    rows, skipped = functions_in_source(source, rel, min_lines=1, max_lines=200)
    assert not skipped
    return rows


def _one(source: str, rel: str = "pkg/mod.py") -> dict:
    rows = _functions(source, rel)
    assert len(rows) == 1
    return rows[0]


def _non_code_tokens(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.STRING, tokenize.COMMENT)]


@pytest.fixture(scope="module")
def stdlib_functions(stdlib_corpus):
    functions, _, _ = extract_functions(stdlib_corpus, python_files(stdlib_corpus), 5, 60,
                                        1_000_000)
    assert len(functions) > 50
    return functions


# -- determinism ------------------------------------------------------------------------


def test_same_input_twice_gives_identical_tasks(stdlib_functions):
    first = build_tasks(stdlib_functions, list(CATEGORIES), seed=42)
    second = build_tasks([dict(f) for f in stdlib_functions], list(CATEGORIES), seed=42)
    assert first == second
    ids = [t["id"] for t in first[0]]
    assert len(ids) == len(set(ids))


def test_category_order_in_config_does_not_matter(stdlib_functions):
    some = stdlib_functions[:20]
    assert build_tasks(some, ["unit_test", "docstring"], 1) == \
        build_tasks(some, ["docstring", "unit_test"], 1)


def test_seed_moves_bug_sites_but_each_seed_is_stable(stdlib_functions):
    many = [f for f in stdlib_functions
            if len(mutation_sites(ParsedFunction.parse(f["source"]))) >= 3]
    assert len(many) >= 5

    def picks(seed):
        tasks, _ = build_tasks(many, ["bugfix"], seed)
        return [(t["mutation"]["kind"], t["mutation"]["line"]) for t in tasks]

    assert picks(1) != picks(2)
    assert picks(1) == picks(1)


def test_unknown_category_is_refused():
    with pytest.raises(ValueError, match="unknown task categories"):
        build_tasks([], ["docstring", "poetry"], 0)


# -- bug injection ----------------------------------------------------------------------


def test_bugs_never_touch_strings_comments_or_docstrings():
    fn = _one(TRAP)
    # `value in items`, `value != items[0]` and its return; nothing in the docstring,
    # the string, the f-string or the comment is a site.
    sites = mutation_sites(ParsedFunction.parse(fn["source"]))
    assert sorted(s.kind for s in sites) == ["eq_flip", "in_to_not_in",
                                            "return_value_removed"]
    for seed in range(12):
        (task,), _ = build_tasks([fn], ["bugfix"], seed)
        buggy, mutation = task["buggy_source"], task["mutation"]
        assert _non_code_tokens(buggy) == _non_code_tokens(fn["source"])
        assert ast.dump(ast.parse(buggy)) != ast.dump(ast.parse(fn["source"]))
        assert set(mutation) == {"kind", "line", "before", "after"}
        lines, buggy_lines = fn["source"].split("\n"), buggy.split("\n")
        changed = [i for i, (a, b) in enumerate(zip(lines, buggy_lines, strict=True)) if a != b]
        assert changed == [mutation["line"] - 1]
        assert lines[changed[0]] == mutation["before"]
        assert buggy_lines[changed[0]] == mutation["after"]


def test_every_stdlib_bugfix_row_is_a_one_line_one_site_mutant(stdlib_functions):
    tasks, skipped = build_tasks(stdlib_functions, ["bugfix"], 42)
    assert len(tasks) > 50
    kinds = {t["mutation"]["kind"] for t in tasks}
    assert len(kinds) >= 10, kinds
    for task in tasks:
        buggy, mutation = task["buggy_source"], task["mutation"]
        assert ast.dump(ast.parse(buggy)) != ast.dump(ast.parse(task["source_function"]))
        assert _non_code_tokens(buggy) == _non_code_tokens(task["source_function"])
        assert buggy.split("\n")[mutation["line"] - 1] == mutation["after"]
    counts = {k: sum(t["mutation"]["kind"] == k for t in tasks) for k in kinds}
    assert max(counts.values()) <= MAX_KIND_SHARE * len(tasks), counts
    assert len(tasks) + sum(skipped.values()) == len(stdlib_functions)


def test_function_without_a_site_skips_bugfix():
    fn = _one("def f(a):\n    print(a)\n")
    tasks, skipped = build_tasks([fn], ["bugfix", "explain"], 0)
    assert [t["category"] for t in tasks] == ["explain"]
    assert skipped == {"bugfix_no_site": 1}


def test_parsed_functions_from_extract_give_the_same_tasks(stdlib_corpus):
    # extract hands on the file's own nodes (positions shifted by the def's line and
    # indentation); parsing each function alone must give byte-identical rows.
    parsed: dict = {}
    functions, _, _ = extract_functions(stdlib_corpus, python_files(stdlib_corpus), 5, 60,
                                        1_000_000, parsed=parsed)
    assert set(parsed) == {f["id"] for f in functions}
    assert any(view.col_shift for view in parsed.values())  # methods were shifted
    assert build_tasks(functions, list(CATEGORIES), 5, parsed=parsed) == \
        build_tasks(functions, list(CATEGORIES), 5)


def test_deep_or_broken_sources_are_counted_not_raised():
    good = _one("def f(a):\n    return a == 1\n")
    deep = dict(good, id="deep",
                source="def g(a):\n    return " + "+".join(["a"] * 100_000) + "\n")
    broken = dict(good, id="broken", source="def h(:\n    pass\n")
    tasks, skipped = build_tasks([deep, good, broken], ["bugfix", "explain"], 0)
    assert [t["function_id"] for t in tasks] == [good["id"], good["id"]]
    assert skipped == {"bugfix_too_deep": 1, "explain_too_deep": 1,
                       "bugfix_unparsable": 1, "explain_unparsable": 1}


# -- docstring removal and stubs ---------------------------------------------------------


def test_strip_docstring_keeps_everything_else_byte_for_byte():
    source = 'def f(a):\n    """Doc.\n\n    More.\n    """\n    # why\n    return a  # ok\n'
    assert strip_docstring(source) == "def f(a):\n    # why\n    return a  # ok\n"


def test_strip_docstring_only_body_gets_pass():
    source = "def f():\n    '''Only a docstring.'''\n"
    assert strip_docstring(source) == "def f():\n    pass\n"


def test_strip_docstring_on_the_def_line():
    assert strip_docstring('def f(): "doc"; return 1\n') == "def f(): pass; return 1\n"
    assert strip_docstring("def f():\n    return 1\n") == "def f():\n    return 1\n"


def test_complete_stub_is_signature_plus_docstring():
    fn = _one('def f(\n    a: int,\n) -> int:\n    """Add one."""\n    return a + 1\n')
    assert fn["signature"] == "def f(\n    a: int,\n) -> int:"
    assert complete_stub(fn["source"], fn["signature"]) == \
        'def f(\n    a: int,\n) -> int:\n    """Add one."""'
    bare = _one("def g(x):\n    return x\n")
    assert complete_stub(bare["source"], bare["signature"]) == "def g(x):"


def test_module_path():
    assert module_path("verl/utils/fs.py") == "verl.utils.fs"
    assert module_path("verl/utils/__init__.py") == "verl.utils"
    assert module_path("setup.py") == "setup"


# -- every family, row by row -----------------------------------------------------------


FAMILY_SOURCE = textwrap.dedent('''\
    class Box:
        def put(self, item, *, force=False):
            """Put an item in the box.

            Raises:
                ValueError: if the box is full.
            """
            if len(self.items) >= self.size and not force:
                raise ValueError("full")
            self.items.append(item)
            return len(self.items)
    ''')


@pytest.fixture(scope="module")
def family_tasks():
    fn = _one(FAMILY_SOURCE, "pkg/box.py")
    tasks, skipped = build_tasks([fn], list(CATEGORIES), seed=7)
    assert skipped == {}
    assert [t["category"] for t in tasks] == list(CATEGORIES)
    return fn, {t["category"]: t for t in tasks}


def test_every_row_carries_the_common_fields(family_tasks):
    fn, tasks = family_tasks
    for category, task in tasks.items():
        assert ROW_KEYS <= set(task)
        assert task["id"] == f"{fn['id']}-{category}"
        assert task["source_function"] == fn["source"]
        assert task["source_file"] == "pkg/box.py"
        assert task["function_id"] == fn["id"]
        assert task["function_name"] == "put"
        assert task["qualname"] == "Box.put"
        assert task["signature"] == "def put(self, item, *, force=False):"
        assert task["params"] == ["item", "force"]  # no self
        assert task["returns_value"] is True
        assert (task["line"], task["end_line"]) == (2, 11)
        assert task["decorators"] == []
        # The code the instruction talks about is inside it, in a python fence.
        assert "```python\n" in task["instruction"]
        assert seed_code_blocks(task["instruction"])
        # Each says what to return: code families in a python block, explain as markdown.
        answer = "structured markdown" if category == "explain" else "```python block"
        assert answer in task["instruction"]


def test_row_fields_for_decorated_generators_and_plain_functions():
    rows = _functions(textwrap.dedent("""\
        @cache
        @other(1)
        def gen(cls, n):
            yield n

        def nothing(a, *args, **kw):
            print(a)
        """))
    (gen,), _ = build_tasks([rows[0]], ["explain"], 0)
    (nothing,), _ = build_tasks([rows[1]], ["explain"], 0)
    assert gen["decorators"] == ["cache", "other(1)"] and gen["line"] == 3
    assert gen["params"] == ["cls", "n"]  # not a method: cls is a real parameter
    assert gen["returns_value"] is True  # yields
    assert nothing["params"] == ["a", "args", "kw"] and nothing["returns_value"] is False


def test_docstring_row(family_tasks):
    fn, tasks = family_tasks
    instruction = tasks["docstring"]["instruction"]
    shown = seed_code_blocks(instruction)[0]
    assert "Put an item" not in instruction
    assert shown == strip_docstring(fn["source"]).strip()
    assert ast.get_docstring(ast.parse(shown).body[0]) is None
    assert "if len(self.items) >= self.size and not force:" in shown
    for section in ("Google-style", "one-line summary", "`Args:`", "`Returns:`", "`Raises:`",
                    "triple-quoted"):
        assert section in instruction


def test_docstring_sections_follow_the_function():
    fn = _one("def hello():\n    print('hi')\n")
    (task,), _ = build_tasks([fn], ["docstring"], 0)
    assert "`Args:`" not in task["instruction"]
    assert "`Returns:`" not in task["instruction"]
    assert "`Raises:`" not in task["instruction"]


def test_explain_row(family_tasks):
    fn, tasks = family_tasks
    instruction = tasks["explain"]["instruction"]
    assert seed_code_blocks(instruction)[0] == fn["source"].strip()
    for section in ("**Purpose**", "**Parameters**", "**Returns**", "**Behaviour**",
                    "markdown"):
        assert section in instruction


def test_bugfix_row(family_tasks):
    fn, tasks = family_tasks
    task = tasks["bugfix"]
    assert seed_code_blocks(task["instruction"])[0] == task["buggy_source"].strip()
    assert task["buggy_source"] != fn["source"]
    assert task["mutation"]["before"] in fn["source"].split("\n")
    assert task["mutation"]["after"] in task["buggy_source"].split("\n")
    assert "one bug" in task["instruction"]
    assert "corrected function" in task["instruction"]


def test_complete_row(family_tasks):
    fn, tasks = family_tasks
    shown = seed_code_blocks(tasks["complete"]["instruction"])[0]
    assert shown.startswith("def put(self, item, *, force=False):")
    assert "Put an item in the box." in shown
    assert "append" not in shown  # the body is gone
    assert "signature and docstring are given" in tasks["complete"]["instruction"]
    assert "whole function" in tasks["complete"]["instruction"]


def test_unit_test_row(family_tasks):
    fn, tasks = family_tasks
    task = tasks["unit_test"]
    instruction = task["instruction"]
    assert "from pkg.box import Box" in instruction
    assert "method of class `Box`" in instruction
    assert "`def test_...`" in instruction and "`assert`" in instruction
    assert seed_code_blocks(instruction)[0] == fn["source"].strip()
    # The function's mutant rides along for checking tests, unseen by the model.
    assert task["mutation"] == tasks["bugfix"]["mutation"]
    assert task["buggy_source"] == tasks["bugfix"]["buggy_source"]
    assert task["mutation"]["after"] not in instruction


def test_nested_function_cannot_be_imported_for_unit_tests():
    rows = _functions("def outer():\n    def inner(x):\n        return x\n    return inner\n")
    nested = [r for r in rows if r["name"] == "inner"]
    tasks, skipped = build_tasks(nested, ["unit_test", "explain"], 0)
    assert [t["category"] for t in tasks] == ["explain"]
    assert skipped == {"unit_test_not_importable": 1}


def test_source_with_a_code_fence_is_skipped():
    fn = _one('def f():\n    return "```"\n')
    tasks, skipped = build_tasks([fn], ["explain", "complete"], 0)
    assert tasks == []
    assert skipped == {"complete_fence_in_source": 1, "explain_fence_in_source": 1}


def test_instructions_are_plain_templates(stdlib_functions):
    tasks, _ = build_tasks(stdlib_functions[:30], list(CATEGORIES), 3)
    for task in tasks:
        # No stray template placeholders, one opening python fence.
        assert not re.search(r"\{[a-z_]+\}", task["instruction"].split("```python")[0])
        assert task["instruction"].count("```python\n") == 1
