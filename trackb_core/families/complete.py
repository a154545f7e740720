"""The ``complete`` family: write the body of a function from its signature and docstring.

- Task: the function's signature and docstring (cut from its source at AST positions);
  the answer is the whole function.
- Reference answer: the original function.
- Verdict: ``parses``; ``keeps_signature`` = a function of that name with the same
  arguments (names, defaults, annotations) as ``item["signature"]``; ``not_echo`` = the
  body has a statement beyond the docstring, ``pass``, ``...`` and ``raise
  NotImplementedError``; ``exact_match`` = AST-equal to the original;
  ``edit_similarity`` = difflib ratio over the tokens of both functions, normalised by
  :func:`ast.unparse` (docstrings dropped), in [0, 1].
- Functional check: the function's hidden tests (:mod:`trackb_core.difftest`) run with
  the completion in its module (:func:`trackb_core.testrun.hidden_test_verdict`:
  ``hidden``, ``hidden_reason``); items without hidden tests have none.
- Strict filter reasons: ``complete_unparsable`` / ``complete_signature_changed`` /
  ``complete_echo`` / ``complete_fails_hidden_tests``; facts ``complete_exact_match``, ``complete_edit_similarity``.
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
    complete_stub,
    dump,
    first_function,
    functions_named,
    normalised,
    python_block,
    restores_original,
)
from trackb_core.testrun import hidden_functional

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _signature_args(item: dict) -> tuple[str, str] | None:
    """``(name, dumped arguments)`` of the item's signature (or its original function)."""
    signature = str(item.get("signature") or "").rstrip()
    node = None
    if signature:
        node = first_function(signature + "\n    pass\n")
    if node is None:
        node = first_function(str(item.get("source_function", "")))
    if node is None:
        return None
    return node.name, dump(node.args)


def _is_trivial(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True  # a docstring, `...`, or a bare string
    if isinstance(statement, ast.Raise) and statement.exc is not None:
        exc = statement.exc.func if isinstance(statement.exc, ast.Call) else statement.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _comparable_text(code: str, name: str | None) -> str:
    """Code as compared for similarity: the named function, unparsed without docstrings
    (formatting and comments gone); whitespace-collapsed text when it does not parse."""
    tree = parses(code)
    if tree is None:
        return " ".join(code.split())
    found = functions_named(tree, name) if name else []
    node = found[0] if found else tree
    try:
        return ast.unparse(normalised(node))
    except (ValueError, RecursionError):
        return " ".join(code.split())


def edit_similarity(code: str, original: str, name: str | None = None) -> float:
    """difflib ratio, in [0, 1], of the tokens of ``code`` and ``original`` (normalised)."""
    if not code.strip() or not original.strip():
        return 0.0
    a = _TOKEN.findall(_comparable_text(code, name))
    b = _TOKEN.findall(_comparable_text(original, name))
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def complete_verdict(response: str, item: dict) -> dict:
    """``{"parses", "keeps_signature", "not_echo", "exact_match", "edit_similarity"}``,
    judged on the definition of the function's name the code binds
    (:func:`trackb_core.pyast.bound_function`). Raises nothing."""
    code = first_code(response)
    original = str(item.get("source_function", ""))
    name = str(item.get("function_name") or "") or None
    verdict = {"parses": False, "keeps_signature": False, "not_echo": False,
               "exact_match": False,
               "edit_similarity": round(edit_similarity(code or "", original, name), 4)}
    if code is None or parses(code) is None:
        return verdict
    verdict["parses"] = True
    wanted = _signature_args(item)
    if wanted is None:
        return verdict
    wanted_name, wanted_args = wanted
    # the definition running the code binds, as for a bugfix: others of the name do not count
    bound = bound_function(code, wanted_name)
    if bound is None:
        return verdict
    verdict["keeps_signature"] = dump(bound.args) == wanted_args
    verdict["not_echo"] = not all(_is_trivial(s) for s in bound.body)
    verdict["exact_match"] = restores_original(code, original)
    return verdict


class Complete(Family):
    name = "complete"
    answers_with_code = True
    guidance = "Give the whole completed function in one ```python block and nothing else."
    runs_code = True
    uses_hidden_tests = True
    pass_rule = ("the function's hidden tests (derived from the original, validated to "
                 "catch its mutant and a stub) pass with the completion in its module; "
                 "items without hidden tests are left out; exact_match and "
                 "edit_similarity say how close it is, format_ok that it parses, keeps the "
                 "signature and is not an echo of the stub")
    filter_reasons = ("complete_unparsable", "complete_signature_changed", "complete_echo",
                      "complete_fails_hidden_tests")
    metrics = tuple(Metric(fact, verdict_fact(fact)) for fact in (
        "parses", "keeps_signature", "not_echo", "exact_match", "edit_similarity"))

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        row = source.row
        stub = complete_stub(source.source, row["signature"], source.view)
        documented = row.get("docstring") is not None
        given = "signature and docstring are" if documented else "signature is"
        instruction = (
            f"Complete the Python function `{source.name}` below: its {given} given, "
            "the body is missing.\n\n"
            f"{python_block(stub)}\n\n"
            "Write the body. Return the whole function (signature"
            f"{', docstring' if documented else ''} and body) in one "
            "```python block."
        )
        return {"instruction": instruction}

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        return python_block(source), None

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        return {**complete_verdict(response, item),
                **context.hidden_tests(first_code(str(response or "")), item)}

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"complete_exact_match": verdict["exact_match"],
                 "complete_edit_similarity": verdict["edit_similarity"]}
        if not verdict["parses"]:
            return "complete_unparsable", facts
        if not verdict["keeps_signature"]:
            return "complete_signature_changed", facts
        if not verdict["not_echo"]:
            return "complete_echo", facts
        if verdict.get("hidden") == "failed":
            return "complete_fails_hidden_tests", facts
        return None, facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return bool(verdict["parses"] and verdict["keeps_signature"] and verdict["not_echo"])

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        return hidden_functional(verdict)

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return hidden_summary(records)


FAMILY = Complete()
