"""trackb eval (tiny model, real generation) and trackb score (hand-written predictions)."""

from __future__ import annotations

import json

import pytest

from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.evaluate import EvalConfig, ScoreConfig, find_adapter, run, score
from trackb_core.store import LocalStore

SEED_KEYS = {"tag", "total_samples", "k", "pass_at_1", "pass_at_k", "avg_style_score",
             "hallucination_rate", "execution_rate", "per_category", "failures"}

CATEGORIES = ("docstring", "complete", "bugfix", "explain", "unit_test", "complete")


def dataset_rows():
    rows = []
    for i, category in enumerate(CATEGORIES):
        instruction = f"Task {i} ({category}): write a function that returns {i} plus x."
        response = f"```python\ndef f{i}(x):\n    return x + {i}\n```"
        rows.append({
            "id": f"item-{i}", "category": category, "instruction": instruction,
            "response": response, "source_function": f"def f{i}(x): ...",
            "source_file": "m.py", "function_id": f"m.py::f{i}", "function_name": f"f{i}",
            "messages": [{"role": "user", "content": instruction},
                         {"role": "assistant", "content": response}],
        })
    return rows


@pytest.fixture
def dataset_dir(tmp_path):
    folder = tmp_path / "build-dataset"
    folder.mkdir()
    # written in reverse id order: outputs must not depend on file order
    rows = list(reversed(dataset_rows()))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def read_jsonl(store, key):
    return [json.loads(line) for line in store.get_text(key).splitlines()]


# -- trackb eval --------------------------------------------------------------------------

def eval_config(dataset_dir, tiny_model_dir, **overrides):
    values = {"dataset": str(dataset_dir), "model": str(tiny_model_dir), "tag": "baseline",
              "max_new_tokens": 12, "batch_size": 4, "n_samples": 2}
    values.update(overrides)
    return EvalConfig(**values)


def test_eval_with_tiny_model_is_complete_and_deterministic(tmp_path, dataset_dir,
                                                            tiny_model_dir):
    outs = [LocalStore(tmp_path / f"eval{i}") for i in range(2)]
    for out in outs:
        manifest = run(eval_config(dataset_dir, tiny_model_dir), out)
        assert set(manifest["outputs"]) == {"predictions.jsonl", "eval.json"}
        assert out.exists("manifest.json")

    predictions = read_jsonl(outs[0], "predictions.jsonl")
    ids = [p["id"] for p in predictions]
    assert ids == sorted(f"item-{i}" for i in range(len(CATEGORIES)))  # every id, sorted
    for p in predictions:
        assert set(p) == {"id", "greedy", "samples"}
        assert isinstance(p["greedy"], str) and len(p["samples"]) == 2
        assert all(isinstance(s, str) for s in p["samples"])
    # the barely pretrained fixture model may only emit whitespace, but it emits
    # something: all-empty answers would mean the prompt tokens were cut, not the new ones
    assert all(p["greedy"] for p in predictions)
    assert any(s.strip() for p in predictions for s in p["samples"])

    # same seed: byte-identical predictions (greedy and the seeded samples)
    assert outs[0].get_bytes("predictions.jsonl") == outs[1].get_bytes("predictions.jsonl")

    result = json.loads(outs[0].get_text("eval.json"))
    assert SEED_KEYS <= set(result)
    assert result["metric_set"] == "seed-compatible"
    assert result["tag"] == "baseline" and result["k"] == 3
    assert result["total_samples"] == len(CATEGORIES)
    assert set(result["per_category"]) == set(CATEGORIES)
    assert result["per_category"]["complete"]["count"] == 2
    facts = result["trackb"]
    assert facts["model"] == str(tiny_model_dir) and facts["adapter"] is None
    assert facts["n_items"] == len(CATEGORIES) and facts["n_samples"] == 2
    assert facts["temperature"] == 0.6
    # at most max_new_tokens per answer, 3 answers per item
    assert 0 < facts["tokens_generated"] <= 3 * 12 * len(CATEGORIES)
    assert facts["generation_seconds"] > 0


def test_eval_max_items_is_a_seeded_sample(tmp_path, dataset_dir, tiny_model_dir):
    picked = []
    for seed in (42, 42):
        out = LocalStore(tmp_path / f"eval-{len(picked)}")
        run(eval_config(dataset_dir, tiny_model_dir, max_items=3, n_samples=0,
                        max_new_tokens=2, seed=seed), out)
        rows = read_jsonl(out, "predictions.jsonl")
        assert all(r["samples"] == [] for r in rows)
        picked.append([r["id"] for r in rows])
        assert json.loads(out.get_text("eval.json"))["k"] == 1
    assert len(picked[0]) == 3 and picked[0] == sorted(picked[0]) and picked[0] == picked[1]


def test_eval_with_adapter_changes_answers(tmp_path, dataset_dir, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # non-zero LoRA weights (the default init is a no-op) so the adapter visibly matters
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    train_dir = tmp_path / "train"
    get_peft_model(base, lora).save_pretrained(train_dir / "adapter")
    assert find_adapter(train_dir, "x") == train_dir / "adapter"
    assert find_adapter(train_dir / "adapter", "x") == train_dir / "adapter"

    plain, tuned = LocalStore(tmp_path / "plain"), LocalStore(tmp_path / "tuned")
    run(eval_config(dataset_dir, tiny_model_dir, n_samples=0), plain)
    manifest = run(eval_config(dataset_dir, tiny_model_dir, n_samples=0,
                               adapter=str(train_dir), tag="post_sft"), tuned)
    assert "adapter" in manifest["inputs"]
    result = json.loads(tuned.get_text("eval.json"))
    assert result["tag"] == "post_sft" and result["trackb"]["adapter"] == str(train_dir)
    assert plain.get_bytes("predictions.jsonl") != tuned.get_bytes("predictions.jsonl")


def test_batched_greedy_matches_one_at_a_time(tiny_model_dir):
    from trackb_core.evaluate import generate, load_model, stop_token_ids
    from trackb_core.prompts import render_prompt

    model, tokenizer, device = load_model(str(tiny_model_dir), None, str(tiny_model_dir))
    assert tokenizer.padding_side == "left"
    # prompts of different lengths, so the batch really is padded
    prompts = [render_prompt(tokenizer, r["instruction"] + " more" * (3 * i))
               for i, r in enumerate(dataset_rows())]
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.eos_token_id in stops
    single, tokens_single = generate(model, tokenizer, device, prompts, batch_size=1,
                                     max_new_tokens=8, stop_ids=stops)
    batched, tokens_batched = generate(model, tokenizer, device, prompts, batch_size=6,
                                       max_new_tokens=8, stop_ids=stops)
    assert single == batched and tokens_single == tokens_batched
    assert all(len(answers) == 1 for answers in single)


def test_eval_input_errors(tmp_path, dataset_dir, tiny_model_dir):
    out = LocalStore(tmp_path / "eval")
    with pytest.raises(MissingInputError, match="--dataset"):
        run(eval_config(tmp_path / "nowhere", tiny_model_dir), out)
    with pytest.raises(ConfigError, match="--dataset is required"):
        run(EvalConfig(model=str(tiny_model_dir)), out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no PEFT adapter"):
        run(eval_config(dataset_dir, tiny_model_dir, adapter=str(tmp_path / "build-dataset")),
            out)
    (empty / "test.jsonl").write_text("")
    with pytest.raises(InputError, match="no test items"):
        run(eval_config(empty, tiny_model_dir), out)
    assert not out.exists("manifest.json")


# -- trackb score -------------------------------------------------------------------------

GOOD_CODE = "```python\ndef f(x):\n    return x + 1\n```"
GOOD_DOCSTRING = '"""Add one.\n\nArgs:\n    x: a number.\n\nReturns:\n    x plus one.\n"""'


def hand_predictions():
    # item-0 docstring: greedy passes; item-1 complete: only sample 2 passes;
    # item-2 bugfix: nothing passes; item-3 explain: greedy fails with a TODO;
    # item-4 unit_test: no code; item-5 complete: greedy passes.
    return [
        {"id": "item-0", "greedy": GOOD_DOCSTRING, "samples": ["", ""]},
        {"id": "item-1", "greedy": "no idea", "samples": ["still no", GOOD_CODE]},
        {"id": "item-2", "greedy": "wrong", "samples": ["wrong", "wrong"]},
        {"id": "item-3", "greedy": "TODO", "samples": ["", ""]},
        {"id": "item-4", "greedy": "nothing", "samples": []},
        {"id": "item-5", "greedy": GOOD_CODE, "samples": []},
        {"id": "elsewhere", "greedy": "not in the test split", "samples": []},
    ]


def write_predictions(folder, rows):
    folder.mkdir(exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_score_hand_written_predictions(tmp_path, dataset_dir):
    preds = write_predictions(tmp_path / "preds", hand_predictions())
    out = LocalStore(tmp_path / "score")
    manifest = score(ScoreConfig(dataset=str(dataset_dir / "test.jsonl"),
                                 predictions=str(preds), tag="external"), out)
    assert manifest["stage"] == "score" and set(manifest["outputs"]) == {"eval.json"}
    result = json.loads(out.get_text("eval.json"))
    assert SEED_KEYS <= set(result) and result["tag"] == "external"
    assert result["total_samples"] == 6
    assert result["pass_at_1"] == pytest.approx(2 / 6)  # item-0, item-5
    assert result["pass_at_k"] == pytest.approx(3 / 6)  # + item-1 via its second sample
    assert result["hallucination_rate"] == pytest.approx(1 / 6)  # item-3
    assert result["execution_rate"] == pytest.approx(1 / 4)  # items 1, 2, 4, 5: only 5
    # style: docstring 1, complete (1 + 1)/2, bugfix "wrong": mentions_fix only -> 1/4,
    # explain "TODO": not_only_code only -> 1/4, unit_test 0
    assert result["avg_style_score"] == pytest.approx((1 + 1 + 0.25 + 0.25 + 0 + 1) / 6)
    assert result["per_category"]["complete"] == {
        "count": 2, "pass_at_1": 0.5, "pass_at_k": 1.0, "avg_style": 1.0,
        "hallucination_rate": 0.0}
    assert [f["id"] for f in result["failures"]] == ["item-1", "item-2", "item-3", "item-4"]
    assert result["trackb"]["unused_predictions"] == 1


def test_score_missing_prediction_is_input_error(tmp_path, dataset_dir):
    rows = [r for r in hand_predictions() if r["id"] != "item-4"]
    preds = write_predictions(tmp_path / "preds", rows)
    out = LocalStore(tmp_path / "score")
    with pytest.raises(InputError, match="no prediction for test item 'item-4'"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds)), out)
    assert not out.exists("manifest.json") and not out.exists("eval.json")


def test_score_rejects_duplicate_ids_and_missing_files(tmp_path, dataset_dir):
    rows = hand_predictions() + [hand_predictions()[0]]
    preds = write_predictions(tmp_path / "preds", rows)
    out = LocalStore(tmp_path / "score")
    with pytest.raises(InputError, match="appears twice"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(preds)), out)
    with pytest.raises(MissingInputError, match="--predictions"):
        score(ScoreConfig(dataset=str(dataset_dir), predictions=str(tmp_path / "none")), out)
