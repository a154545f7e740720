"""Bug mutations: one AST site each, never in strings or comments, balanced over a corpus."""

from __future__ import annotations

import ast
import io
import textwrap
import tokenize
from collections import Counter

import pytest

from trackb_core.corpus import python_files
from trackb_core.extract import extract_functions
from trackb_core.mutations import (
    KINDS,
    MAX_KIND_SHARE,
    SEED_KINDS,
    ParsedFunction,
    apply_site,
    assign_mutations,
    ast_differences,
    changed_site,
    inject_bug,
    mutation_sites,
    node_at,
)

TRAP = textwrap.dedent('''\
    def check(value, items, flag: "a == b" = True) -> "x is not y":
        """True when value == items[0]; `not a` and `a or b` here are prose."""
        label = "value == other"  # a comment with == and != and is not and True
        text = f"{label} != {value == 1} {True} {not value}"
        if value in items:
            return value != items[0]
        return None
    ''')


def non_code_tokens(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.STRING, tokenize.COMMENT)]


def assert_one_site(source: str, buggy: str, mutation: dict) -> None:
    """The mutant parses, keeps every string and comment, changes one line, and its
    AST differs from the original's inside exactly one expression-level node."""
    original, mutant = ast.parse(source), ast.parse(buggy)
    site = changed_site(original, mutant)
    assert site is not None, "the mutant's AST equals the original's"
    assert all(path[:len(site)] == site for path in ast_differences(original, mutant))
    # From a comparison operator, a constant's value or an emptied return slot, up to
    # the node that holds it: at most two steps, and never a whole statement list.
    changed, steps = node_at(original, site), 0
    while not isinstance(changed, ast.expr | ast.stmt):
        site, steps = site[:-1], steps + 1
        changed = node_at(original, site)
    assert steps <= 2 and isinstance(changed, ast.expr | ast.Return), mutation
    assert changed.lineno <= mutation["line"] <= changed.end_lineno
    assert non_code_tokens(buggy) == non_code_tokens(source)
    lines, buggy_lines = source.split("\n"), buggy.split("\n")
    assert len(lines) == len(buggy_lines)
    differing = [i + 1 for i, (a, b) in enumerate(zip(lines, buggy_lines, strict=True))
                 if a != b]
    assert differing == [mutation["line"]]
    assert lines[mutation["line"] - 1] == mutation["before"]
    assert buggy_lines[mutation["line"] - 1] == mutation["after"]
    assert set(mutation) == {"kind", "line", "before", "after"}


@pytest.fixture(scope="module")
def stdlib_functions(stdlib_corpus):
    functions, _, _ = extract_functions(stdlib_corpus, python_files(stdlib_corpus), 5, 60,
                                        1_000_000)
    return functions


# -- each kind ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "line", "mutated"), [
    ("off_by_one", "return a[n - 1]", "return a[n]"),
    ("off_by_one", "return a[n+1]", "return a[n]"),
    ("off_by_one", "return a[1 + n]", "return a[n]"),
    ("off_by_one", "return (a) - 1", "return (a)"),
    ("off_by_one", "return [x for x in range(len(a))]",
     "return [x for x in range(len(a) - 1)]"),
    ("off_by_one", "return [x for x in range(1, n)]", "return [x for x in range(1, n - 1)]"),
    ("eq_flip", "return a == n", "return a != n"),
    ("eq_flip", "return (a)!=(n)", "return (a)==(n)"),
    ("is_not_to_is", "return a  is  not  None", "return a  is  None"),
    ("not_in_to_in", "return n not in a", "return n in a"),
    ("return_value_removed", "return a.get(n)", "return"),
    ("bool_flip", "return True", "return False"),
    ("bool_flip", "return a.get(n, False)", "return a.get(n, True)"),
    ("lte_to_lt", "return a <= n", "return a < n"),
    ("gte_to_gt", "return a >= n", "return a > n"),
    ("not_dropped", "return not a", "return a"),
    ("not_dropped", "return not(a)", "return (a)"),
    ("and_or_swap", "return a and n", "return a or n"),
    ("and_or_swap", "return a or n", "return a and n"),
    ("is_to_is_not", "return a is n", "return a is not n"),
    ("in_to_not_in", "return n in a", "return n not in a"),
    ("lt_to_lte", "return a < n", "return a <= n"),
    ("gt_to_gte", "return a > n", "return a >= n"),
])
def test_each_kind_rewrites_exactly_its_operator(kind, line, mutated):
    source = f"def f(a, n):\n    x = 1\n    {line}\n"
    buggy, mutation = inject_bug(source, 0, "f", kind=kind)
    assert buggy == f"def f(a, n):\n    x = 1\n    {mutated}\n"
    assert mutation == {"kind": kind, "line": 3, "before": f"    {line}",
                        "after": f"    {mutated}"}
    assert_one_site(source, buggy, mutation)


def test_kind_names_keep_the_contract():
    assert SEED_KINDS == ("off_by_one", "eq_flip", "is_not_to_is", "not_in_to_in",
                          "return_value_removed", "bool_flip", "lte_to_lt", "gte_to_gt",
                          "not_dropped", "and_or_swap")
    assert len(set(KINDS)) == len(KINDS) > len(SEED_KINDS)


@pytest.mark.parametrize("line", [
    "return None",  # `return` means the same: an equivalent mutant
    "return 'text'",  # would delete a string literal
    "return f'{a}'",
    "return (a,\n            n)",  # the rewrite would span lines
])
def test_return_values_that_are_not_removed(line):
    source = f"def f(a, n):\n    {line}\n"
    assert inject_bug(source, 0, "f", kind="return_value_removed") is None


def test_boolean_operators_that_would_regroup_are_refused():
    # Swapping the inner `and` of `a or n and x` gives `a or n or x`: one flat BoolOp,
    # so the change leaks into the outer node. Swapping the outer `or` changes only it.
    source = "def f(a, n, x):\n    return a or n and x\n"
    results = [apply_site(source, site) for site in
               mutation_sites(ParsedFunction.parse(source))
               if site.kind == "and_or_swap"]
    assert len(results) == 2
    assert [r[0] for r in results if r is not None] == [
        "def f(a, n, x):\n    return a and n and x\n"]
    three = "def f(a, n, x):\n    return a and n and x\n"  # one keyword of three: regroups
    assert inject_bug(three, 0, "f", kind="and_or_swap") is None
    parenthesised = "def f(a, n, x):\n    return a or (n and x)\n"
    buggy, mutation = inject_bug(parenthesised, 0, "f", kind="and_or_swap")
    assert buggy in ("def f(a, n, x):\n    return a and (n and x)\n",
                     "def f(a, n, x):\n    return a or (n or x)\n")
    assert_one_site(parenthesised, buggy, mutation)


def test_strings_comments_docstrings_fstrings_and_the_header_are_never_sites():
    sites = mutation_sites(ParsedFunction.parse(TRAP))
    # Only `value in items`, `value != items[0]` (and the return of it) are code sites.
    assert sorted(s.kind for s in sites) == ["eq_flip", "in_to_not_in",
                                            "return_value_removed"]
    for seed in range(10):
        buggy, mutation = inject_bug(TRAP, seed, "trap")
        assert_one_site(TRAP, buggy, mutation)


def test_multiline_expressions_and_comments_between_operands():
    source = textwrap.dedent("""\
        def f(a, b, c):
            return (a <
                    b   # a comment with >= and not
                    == c) and (not
                               a)
        """)
    found = {(s.kind, s.line) for s in mutation_sites(ParsedFunction.parse(source))}
    # `not` with its operand on the next line is left alone; so is the 2-line return.
    assert found == {("lt_to_lte", 2), ("eq_flip", 4), ("and_or_swap", 4)}
    for kind, _ in found:
        buggy, mutation = inject_bug(source, 0, "f", kind=kind)
        assert_one_site(source, buggy, mutation)
        assert "# a comment with >= and not" in buggy


def test_unicode_before_a_site_keeps_byte_columns_right():
    source = 'def f(a):\n    return "héllo wörld ✓" == a\n'
    buggy, _ = inject_bug(source, 0, "u", kind="eq_flip")
    assert buggy == 'def f(a):\n    return "héllo wörld ✓" != a\n'


def test_every_stdlib_site_gives_a_one_site_mutant(stdlib_functions):
    kinds: Counter[str] = Counter()
    for fn in stdlib_functions:
        for site in mutation_sites(ParsedFunction.parse(fn["source"])):
            found = apply_site(fn["source"], site)
            if found is None:
                continue
            assert_one_site(fn["source"], *found)
            kinds[site.kind] += 1
    assert len(kinds) >= 12, kinds
    assert sum(kinds.values()) > 300


def test_deep_nesting_is_walked_without_recursion():
    # Parses, but ast.unparse / recursive walkers would exceed the recursion limit.
    source = "def f(a):\n    x = 1\n    return a" + "[0]" * 2000 + " == 1\n"
    buggy, mutation = inject_bug(source, 0, "deep", kind="eq_flip")
    assert mutation["after"].endswith("!= 1")
    deep = ParsedFunction.parse(source)
    assert {s.kind for s in mutation_sites(deep)} == {"eq_flip", "return_value_removed"}
    assert len(ast_differences(deep.node, ast.parse(buggy).body[0])) == 1


# -- corpus-wide assignment --------------------------------------------------------------


def _parsed(sources: dict[str, str]) -> dict[str, ParsedFunction]:
    return {fid: ParsedFunction.parse(src) for fid, src in sources.items()}


def test_assignment_is_deterministic_and_moves_with_the_seed(stdlib_functions):
    functions = {fn["id"]: ParsedFunction.parse(fn["source"]) for fn in stdlib_functions}
    first, again = assign_mutations(functions, 1), assign_mutations(dict(functions), 1)
    assert first == again
    other = assign_mutations(functions, 2)
    assert first.mutants.keys() == other.mutants.keys()
    assert first.mutants != other.mutants


def test_assignment_balances_kinds_over_a_corpus(stdlib_functions):
    functions = {fn["id"]: ParsedFunction.parse(fn["source"]) for fn in stdlib_functions}
    assignment = assign_mutations(functions, 42)
    counts = assignment.kind_counts()
    total = sum(counts.values())
    assert total == len(assignment.mutants) - len(assignment.over_cap) > 50
    assert max(counts.values()) <= MAX_KIND_SHARE * total, counts
    # Each function's own site order alone would pick `return x` far more often.
    for function_id, (buggy, mutation) in assignment.mutants.items():
        assert mutation["kind"] in KINDS
        assert buggy != functions[function_id].source


def test_a_kind_over_the_cap_is_trimmed_to_it():
    only_returns = {f"r{i}": f"def r{i}(a):\n    return a.x{i}\n" for i in range(30)}
    others = {f"e{i}": f"def e{i}(a):\n    print(a == {i})\n" for i in range(5)}
    others |= {f"b{i}": f"def b{i}(a):\n    print(a, flag=True)\n" for i in range(5)}
    others |= {f"n{i}": f"def n{i}(a):\n    print(not a)\n" for i in range(5)}
    assignment = assign_mutations(_parsed(only_returns | others), 0)
    counts = assignment.kind_counts()
    # 5 returns of 20 is the cap exactly: 25 of the 30 return-only functions go.
    assert counts == {"eq_flip": 5, "return_value_removed": 5, "bool_flip": 5,
                      "not_dropped": 5}
    assert len(assignment.over_cap) == 25 and assignment.over_cap <= set(only_returns)
    # With the cap lifted every function keeps its mutant.
    uncapped = assign_mutations(_parsed(only_returns | others), 0, max_share=1.0)
    assert not uncapped.over_cap and len(uncapped.mutants) == 45


def test_the_cap_is_not_forced_where_too_few_kinds_exist():
    # Three kinds cannot each stay under a quarter: nothing is dropped for nothing.
    sources = {f"r{i}": f"def r{i}(a):\n    return a.x{i}\n" for i in range(10)}
    sources |= {f"e{i}": f"def e{i}(a):\n    print(a == {i})\n" for i in range(2)}
    sources |= {f"b{i}": f"def b{i}(a):\n    print(a, flag=True)\n" for i in range(2)}
    assignment = assign_mutations(_parsed(sources), 0)
    assert not assignment.over_cap and len(assignment.mutants) == 14


def test_a_function_takes_its_least_used_kind():
    sources = {f"e{i}": f"def e{i}(a):\n    print(a == {i})\n" for i in range(6)}
    sources["both"] = "def both(a):\n    print(a == 1, True)\n"
    assignment = assign_mutations(_parsed(sources), 3)
    assert assignment.mutants["both"][1]["kind"] == "bool_flip"
