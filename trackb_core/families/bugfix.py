"""The ``bugfix`` family: find and fix the one bug injected into a function.

- Task: the function with one AST-located mutation (:mod:`trackb_core.mutations`,
  balanced across the corpus); rows carry ``buggy_source`` and ``mutation`` (``{kind,
  line, before, after}``). A function with no mutation site is skipped
  (``bugfix_no_site``), and so is one whose only kinds are already a quarter of all
  bugs (``bugfix_kind_cap``).
- Reference answer: what the mutation changed and why that is wrong
  (:func:`describe_mutation`), then the original function.
- Verdict, always on the one definition running the answer's code would bind
  (:func:`trackb_core.pyast.bound_function`: the last top-level ``def`` of that name,
  else the last such method; other definitions of the name do not count):
  ``exact_fix`` = the original function restored (AST-equal after normalising: the
  mutated site reads as in the original and nothing else changed) — the family's
  functional check; ``site_restored`` = a diagnostic, not a fix: the smallest
  expression/statement that differs between the original and the mutant reads as in
  the original again, whatever else the answer changed (dead code included).
- Functional check: the function's hidden tests run with the bound definition in its
  module (:func:`trackb_core.testrun.hidden_test_verdict`); items without them have none.
- Strict filter reasons: ``bugfix_unparsable`` / ``bugfix_not_restored`` (not an exact
  fix); facts ``bugfix_exact_fix``, ``bugfix_site_restored``.
"""

from __future__ import annotations

import ast
import difflib
import re
from typing import Any

from trackb_core.codeblocks import first_code, parses
from trackb_core.families.base import (
    CheckContext,
    Family,
    FunctionSource,
    Metric,
    hidden_summary,
    verdict_fact,
)
from trackb_core.pyast import (
    FunctionNode,
    bound_function,
    dump,
    first_function,
    normalised,
    python_block,
    restores_original,
    short,
)
from trackb_core.testrun import hidden_functional

# -- the reference answer ----------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|==|!=|<=|>=|\*\*|//|->|\S")
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "is", "is not", "in", "not in"}
_BOUNDARY_PAIRS = {frozenset({"<", "<="}), frozenset({">", ">="})}
# trackb_core.mutations kinds whose operators are fixed: (correct, buggy). A token diff
# of `is not` -> `is` would only see a `not` go missing.
_KIND_OPERATORS = {
    "is_not_to_is": ("is not", "is"),
    "not_in_to_in": ("not in", "in"),
    "lte_to_lt": ("<=", "<"),
    "gte_to_gt": (">=", ">"),
    "is_to_is_not": ("is", "is not"),
    "in_to_not_in": ("in", "not in"),
    "lt_to_lte": ("<", "<="),
    "gt_to_gte": (">", ">="),
}


def describe_mutation(mutation: dict[str, Any], source: str, buggy_source: str | None) -> str:
    """A short explanation of what a mutation changed and why the result is wrong."""
    line_no = int(mutation.get("line") or 0)
    before = str(mutation.get("before", ""))
    after = str(mutation.get("after", ""))
    good_line = _line(source, line_no) or before
    bad_line = _line(buggy_source or "", line_no) or after
    # before/after may be whole lines or just the changed fragment: narrow lines down
    kind = str(mutation.get("kind", ""))
    if kind in _KIND_OPERATORS:
        good, bad = _KIND_OPERATORS[kind]
    elif mutation.get("op_before") and mutation.get("op_after"):
        good, bad = str(mutation["op_before"]).strip(), str(mutation["op_after"]).strip()
    elif before.strip() and before.strip() != good_line.strip():
        good, bad = before.strip(), after.strip()
    else:
        good, bad = _changed_fragment(good_line, bad_line)
    where = f"Line {line_no}" if line_no else "The changed line"
    what, why = _explain_change(good, bad, good_line, bad_line, kind)
    head = f"The bug is on line {line_no}: `{short(bad_line)}`." if line_no else (
        f"The bug is in `{short(bad_line)}`.")
    return f"{head}\n{where} {what}: {why} The fix restores `{short(good_line)}`."


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 1 <= number <= len(lines) else ""


def _changed_fragment(good_line: str, bad_line: str) -> tuple[str, str]:
    a, b = _TOKEN.findall(good_line), _TOKEN.findall(bad_line)
    codes = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
             if op[0] != "equal"]
    if not codes:
        return good_line.strip(), bad_line.strip()
    i1, j1 = codes[0][1], codes[0][3]
    i2, j2 = codes[-1][2], codes[-1][4]
    return " ".join(a[i1:i2]), " ".join(b[j1:j2])


def _explain_change(good: str, bad: str, good_line: str, bad_line: str,
                    kind: str = "") -> tuple[str, str]:
    if bad_line.lstrip().startswith("#") and good_line.lstrip().startswith("return"):
        return ("has its `return` statement commented out",
                "the function falls through and returns `None` instead of the computed value.")
    returned = good_line.strip().removeprefix("return").strip()
    if kind == "return_value_removed" or (
            bad_line.strip() == "return" and good_line.strip().startswith("return ")):
        return (f"returns nothing where it should return `{short(returned, 60)}`",
                "a bare `return` gives the caller `None` instead of the computed value.")
    if good in _COMPARISONS and bad in _COMPARISONS:
        if frozenset({good, bad}) in _BOUNDARY_PAIRS:
            return (f"compares with `{bad}` where the logic needs `{good}`",
                    "the boundary case where both sides are equal is handled the wrong way "
                    "(an off-by-one error).")
        return (f"compares with `{bad}` where the logic needs `{good}`",
                "the test is inverted, so the wrong branch runs.")
    if {good, bad} == {"and", "or"}:
        return (f"joins the conditions with `{bad}` where the logic needs `{good}`",
                "the combined condition holds in the wrong cases.")
    if {good, bad} == {"True", "False"}:
        return (f"uses `{bad}` where the logic needs `{good}`",
                "the flag is flipped, so callers see the opposite behavior.")
    good_tokens, bad_tokens = good.split(), bad.split()
    if "not" in good_tokens and [t for t in good_tokens if t != "not"] == bad_tokens:
        return ("drops a `not`", "the condition is inverted, so the wrong branch runs.")
    if kind == "off_by_one" or re.search(r"[+-]\s*1\b", f"{good} {bad}"):
        if not bad:
            what = f"drops the `{good}`"
        elif not good:
            what = f"adds a `{bad}`"
        else:
            what = f"reads `{bad}` where the logic needs `{good}`"
        return what, "the value is off by one, so an index, count or bound is shifted."
    return (f"reads `{bad}` where the correct code is `{good}`",
            "this changes what the function computes, so its result is wrong.")


# -- the verdict ----------------------------------------------------------------------


def _difference(a: Any, b: Any, path_a: list, path_b: list
                ) -> tuple[list[ast.AST], list[ast.AST]] | None:
    """The AST ancestors (outermost first) of the first place ``a`` and ``b`` differ.

    Each path ends with the smallest node that differs as a whole: the node whose
    type, list length or primitive field differs (operators count as their owner).
    """
    if type(a) is not type(b):
        if isinstance(a, ast.expr | ast.stmt) and isinstance(b, ast.expr | ast.stmt):
            return [*path_a, a], [*path_b, b]  # a whole node swapped: `not x` -> `x`
        return path_a, path_b  # an operator or a missing value: its owner differs
    if isinstance(a, ast.AST):
        if isinstance(a, ast.operator | ast.boolop | ast.cmpop | ast.unaryop
                      | ast.expr_context):
            return None  # same type: same operator
        for field in a._fields:
            value_a, value_b = getattr(a, field, None), getattr(b, field, None)
            if isinstance(value_a, list) and isinstance(value_b, list):
                if len(value_a) != len(value_b):
                    return [*path_a, a], [*path_b, b]
                for x, y in zip(value_a, value_b, strict=True):
                    found = _difference(x, y, [*path_a, a], [*path_b, b])
                    if found:
                        return found
            elif isinstance(value_a, ast.AST) and isinstance(value_b, ast.AST):
                found = _difference(value_a, value_b, [*path_a, a], [*path_b, b])
                if found:
                    return found
            elif isinstance(value_a, ast.AST) or isinstance(value_b, ast.AST) \
                    or value_a != value_b:
                return [*path_a, a], [*path_b, b]
        return None
    return None if a == b else (path_a, path_b)


def _anchor(chain: list[ast.AST]) -> ast.AST:
    """The site to compare, given the ancestors of a difference (the differing node last):
    the whole expression of the innermost statement holding it (``x == y`` of ``if x ==
    y:``), or that statement itself when the statement is what differs."""
    statements = [i for i, n in enumerate(chain) if isinstance(n, ast.stmt)]
    if not statements:
        return chain[-1]
    inner = statements[-1]
    if inner + 1 < len(chain) and isinstance(chain[inner + 1], ast.expr):
        return chain[inner + 1]
    return chain[inner]


def _site_pair(original: FunctionNode, buggy: FunctionNode) -> tuple[str, str] | None:
    found = _difference(original, buggy, [], [])
    if not found:
        return None
    path_o, path_b = found
    return dump(_anchor(path_o)), dump(_anchor(path_b))


def _count_dumps(node: ast.AST) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.expr | ast.stmt):
            key = dump(sub)
            counts[key] = counts.get(key, 0) + 1
    return counts


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.split("\n")]


def restores_site(code: str, original: str, buggy: str, mutation: dict) -> bool:
    """True if ``code`` reverts the mutated site of ``buggy`` to read as in ``original``.

    The site is the smallest whole expression (or simple statement) that differs between
    the normalised original and mutant. Restored means the definition ``code`` binds
    (:func:`trackb_core.pyast.bound_function`) holds the original's site at least as
    often as the original does and the mutant's site no more often than the original
    does; edits elsewhere are allowed (so this is a diagnostic, never a fix). When the
    two do not parse or do not differ, falls back to the changed line of ``mutation``
    (whitespace-collapsed ``before`` present, ``after`` gone). An exact restore is
    always a site restore. Raises nothing.
    """
    if restores_original(code, original):
        return True
    target = first_function(original)
    mutant = first_function(buggy)
    if target is None:
        return False
    bound = bound_function(code, target.name)
    if bound is None:
        return False
    candidates = [bound]
    pair = None
    if mutant is not None:
        pair = _site_pair(normalised(target), normalised(mutant))
    if pair is None:
        before = " ".join(str((mutation or {}).get("before", "")).split())
        after = " ".join(str((mutation or {}).get("after", "")).split())
        if not before or before == after:
            return False
        original_lines = _lines(original)
        for candidate in candidates:
            lines = _lines(ast.get_source_segment(code, candidate) or "")
            if lines.count(before) >= original_lines.count(before) \
                    and lines.count(after) <= original_lines.count(after):
                return True
        return False
    site_original, site_buggy = pair
    in_original = _count_dumps(target)
    for candidate in candidates:
        counts = _count_dumps(normalised(candidate))
        if counts.get(site_original, 0) >= in_original.get(site_original, 0) \
                and counts.get(site_buggy, 0) <= in_original.get(site_buggy, 0):
            return True
    return False


def bugfix_verdict(response: str, item: dict) -> dict:
    """``{"parses", "exact_fix", "site_restored"}`` for a bugfix ``response`` to ``item``
    (see the module docstring). Raises nothing."""
    code = first_code(str(response or ""))
    if code is None or parses(code) is None:
        return {"parses": False, "exact_fix": False, "site_restored": False}
    original = str(item.get("source_function", ""))
    mutation = item.get("mutation") if isinstance(item.get("mutation"), dict) else {}
    exact = restores_original(code, original)
    site = exact or restores_site(code, original, str(item.get("buggy_source", "")), mutation)
    return {"parses": True, "exact_fix": exact, "site_restored": site}


class Bugfix(Family):
    name = "bugfix"
    answers_with_code = True
    needs_mutants = True
    shows_mutant = True
    guidance = ("Say in one or two sentences which line is wrong and why, then give the whole "
                "corrected function in one ```python block.")
    runs_code = True
    uses_hidden_tests = True
    pass_rule = ("the function's hidden tests (derived from the original, validated to "
                 "catch its mutant and a stub) pass with the definition the answer binds in "
                 "its module; items without hidden tests are left out (exact_fix: the "
                 "original restored exactly, is reported beside it)")
    filter_reasons = ("bugfix_unparsable", "bugfix_not_restored")
    metrics = (Metric("exact_fix", verdict_fact("exact_fix")),
               Metric("site_restored", verdict_fact("site_restored")))
    facts = ("parses",)

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        if source.mutant is None:
            return "bugfix_no_site"
        if source.over_cap:
            return "bugfix_kind_cap"  # its only kinds are already a quarter of all bugs
        buggy_source, mutation = source.mutant
        instruction = (
            f"The Python function `{source.name}` below contains exactly one bug.\n\n"
            f"{python_block(buggy_source)}\n\n"
            "Find the bug and explain in one or two sentences what is wrong and why. Then "
            "give the whole corrected function in one ```python block."
        )
        return {"instruction": instruction, "buggy_source": buggy_source,
                "mutation": dict(mutation)}

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        mutation = task.get("mutation")
        if not isinstance(mutation, dict):
            return None, "no_mutation"
        return describe_mutation(mutation, source, task.get("buggy_source")) + "\n\n" + (
            "Fixed function:\n\n" + python_block(source)
        ), None

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        return {**bugfix_verdict(response, item),
                **context.hidden_tests(first_code(str(response or "")), item)}

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"bugfix_exact_fix": verdict["exact_fix"],
                 "bugfix_site_restored": verdict["site_restored"]}
        if not verdict["parses"]:
            return "bugfix_unparsable", facts
        if not verdict["exact_fix"]:
            return "bugfix_not_restored", facts
        return None, facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return bool(verdict["parses"])

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        # Hidden tests, not the text: a fix in dead code or beside the site fails them.
        return hidden_functional(verdict)

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return hidden_summary(records)


FAMILY = Bugfix()
