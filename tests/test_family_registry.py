"""The task-family registry: every family implements the protocol, and a new family is
one module's worth of code that the whole pipeline picks up without another file
changing (here: a toy sixth family, registered only for the test)."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import pytest

from trackb_core import families
from trackb_core.evaluate import ScoreConfig, score
from trackb_core.extract import ExtractConfig
from trackb_core.extract import run as extract
from trackb_core.families import CheckContext, Family, FunctionSource, Metric
from trackb_core.families.base import verdict_fact
from trackb_core.filters import reasons
from trackb_core.generate import GenerateConfig
from trackb_core.generate import run as generate
from trackb_core.openai_teacher import teacher_messages, teacher_prompt_sha256
from trackb_core.pyast import FunctionNode, python_block
from trackb_core.seed_metrics import score_seed
from trackb_core.store import LocalStore

HOOKS = ("build_task", "reference_answer", "verdict", "filter", "passes", "format_check",
         "functional_check", "seed_reason", "summary")


# -- the toy sixth family: name a function whose name is hidden ---------------------------

HIDDEN = "____"


class Naming(Family):
    """Name a function whose ``def`` line has its name hidden."""

    name = "naming"
    answers_with_code = False
    guidance = "Answer with the function's name in backticks and one sentence why."
    pass_rule = "the name in the first backticks is the one the source uses"
    filter_reasons = ("naming_wrong_name",)
    metrics = (Metric("exact_name", verdict_fact("exact_name")),)

    def build_task(self, source: FunctionSource) -> dict[str, Any] | str:
        if re.search(rf"\b{re.escape(source.name)}\b", source.source.split("(", 1)[1]):
            return "naming_name_used_inside"  # a recursive call would give it away
        hidden = source.source.replace(f"def {source.name}(", f"def {HIDDEN}(", 1)
        return {"instruction": f"Name the Python function below.\n\n{python_block(hidden)}\n\n"
                               "Answer with the name in backticks."}

    def reference_answer(self, task: dict[str, Any], source: str, function: FunctionNode
                         ) -> tuple[str | None, str | None]:
        return f"The source calls it `{function.name}`, which says what it does.", None

    def verdict(self, response: str, item: dict[str, Any], context: CheckContext
                ) -> dict[str, Any]:
        found = re.search(r"`([A-Za-z_]\w*)`", str(response or ""))
        return {"named": found is not None,
                "exact_name": bool(found and found.group(1) == item.get("function_name"))}

    def filter(self, verdict: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        facts = {"naming_exact_name": verdict["exact_name"]}
        return (None if verdict["exact_name"] else "naming_wrong_name"), facts

    def format_check(self, verdict: dict[str, Any]) -> bool:
        return verdict["named"]

    def functional_check(self, verdict: dict[str, Any]) -> bool | None:
        return verdict["exact_name"]  # the source's own name: right by construction


@pytest.fixture
def naming():
    with families.registered(Naming()) as family:
        yield family
    assert "naming" not in families.names()


# -- the protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("family", families.all_families(), ids=lambda f: f.name)
def test_every_registered_family_implements_every_hook(family):
    assert isinstance(family, Family)
    for hook in HOOKS:
        assert callable(getattr(family, hook)), hook
    assert not inspect.isabstract(type(family))
    assert isinstance(family.name, str) and family.name
    assert family.guidance.strip() and family.pass_rule.strip()
    assert family.metrics and all(isinstance(m, Metric) for m in family.metrics)
    assert len({m.name for m in family.metrics}) == len(family.metrics)
    assert all(r.startswith(f"{family.name}_") for r in family.filter_reasons), \
        "a family's filter reasons carry its name"
    # The module holds one family, under the name the registry gives it.
    module = inspect.getmodule(type(family))
    assert module.FAMILY is family
    assert module.__name__ == f"trackb_core.families.{family.name}"


def test_the_category_list_is_the_registry_in_order():
    assert families.names() == ("docstring", "explain", "bugfix", "complete", "unit_test")
    assert families.code_names() == ("bugfix", "complete", "unit_test")
    assert ExtractConfig().categories == list(families.names())


def test_registering_twice_or_an_incomplete_family_is_refused(naming):
    with pytest.raises(ValueError, match="registered already"):
        families.register(Naming())

    class Half(Family):
        name = "half"
        answers_with_code = False

    with pytest.raises(TypeError):
        Half()  # its hooks are abstract
    with pytest.raises(TypeError, match="not a trackb_core.families.Family"):
        families.register(object())
    with pytest.raises(ValueError, match="unknown task category 'nope'"):
        families.get("nope")


def test_a_registered_family_reaches_filters_teacher_prompts_and_reasons(naming):
    assert families.names()[-1] == "naming"
    assert "strict:naming_wrong_name" in reasons()
    messages = teacher_messages({"category": "naming", "instruction": "Name it."})
    assert naming.guidance in messages[0]["content"]
    with families.registered(type("Other", (Naming,), {"name": "other"})()):
        changed = teacher_prompt_sha256()
    assert changed != teacher_prompt_sha256()  # the prompt hash covers every family


# -- the toy family through the whole data pipeline ----------------------------------------


def test_a_sixth_family_runs_through_extract_generate_build_dataset_and_score(
        naming, stdlib_corpus, tmp_path):
    from trackb_core.dataset import DatasetConfig
    from trackb_core.dataset import run as build_dataset

    root = LocalStore(tmp_path)
    extract(ExtractConfig(corpus=str(stdlib_corpus), max_functions=80),
            root.child("extract"))
    tasks = [json.loads(line) for line in (tmp_path / "extract" / "tasks.jsonl").open()]
    named = [t for t in tasks if t["category"] == "naming"]
    assert named and all(HIDDEN in t["instruction"] for t in named)
    manifest = json.loads((tmp_path / "extract" / "manifest.json").read_text())
    assert manifest["counts"]["tasks_per_category"]["naming"] == len(named)

    generate(GenerateConfig(tasks=root.child("extract").uri), root.child("generate"))
    build_dataset(DatasetConfig(responses=root.child("generate").uri, test_ratio=0.3),
                  root.child("build-dataset"))
    test_rows = [json.loads(line)
                 for line in (tmp_path / "build-dataset" / "test.jsonl").open()]
    train_rows = [json.loads(line)
                  for line in (tmp_path / "build-dataset" / "train.jsonl").open()]
    assert any(r["category"] == "naming" for r in train_rows)
    assert any(r["category"] == "naming" for r in test_rows)
    card = (tmp_path / "build-dataset" / "README.md").read_text()
    assert "| naming |" in card

    # Predictions made elsewhere: the gold answer for half the naming items, a wrong
    # name for the rest, the gold answer for every other item.
    predictions = []
    naming_ids = sorted(r["id"] for r in test_rows if r["category"] == "naming")
    wrong = set(naming_ids[::2])
    for row in test_rows:
        answer = "It could be called `something_else`." if row["id"] in wrong \
            else row["response"]
        predictions.append({"id": row["id"], "greedy": answer, "samples": [answer] * 3})
    (tmp_path / "predictions.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in predictions))
    score(ScoreConfig(dataset=root.child("build-dataset").uri,
                      predictions=str(tmp_path / "predictions.jsonl"), tag="toy"),
          root.child("score"))
    result = json.loads((tmp_path / "score" / "eval.json").read_text())

    # The family's own metric and pass rule.
    exact = result["headline"]["naming_exact_name"]
    assert exact["n"] == len(naming_ids)
    assert exact["value"] == pytest.approx((len(naming_ids) - len(wrong)) / len(naming_ids))
    assert result["functional"]["pass_means"]["naming"] == naming.pass_rule
    assert result["headline"]["naming_format_ok"]["n"] == len(naming_ids)
    assert result["functional"]["per_category"]["naming"]["functional_pass_greedy"] == \
        pytest.approx(exact["value"])

    # The seed-compatible block scores an unknown category as explain, as the seed did:
    # the same items and answers scored as explain give the same numbers.
    by_id = {p["id"]: p for p in predictions}
    as_explain = [dict(r, category="explain") for r in test_rows if r["category"] == "naming"]
    expected = score_seed(as_explain, by_id, "toy")["per_category"]["explain"]
    assert result["seed_compatible"]["per_category"]["naming"] == expected
    assert expected["pass_at_1"] < 1.0 or expected["avg_style"] < 1.0  # the seed's rules bite
