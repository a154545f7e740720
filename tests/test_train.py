"""The train stage: loss on the completion only, prompts identical to eval's, real artifacts."""

from __future__ import annotations

import json

import pytest

from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.prompts import chat_example, render_prompt
from trackb_core.store import open_store
from trackb_core.train import TrainConfig, build_trainer, examples_from_rows, run

FUNCTION = '''def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value'''


def make_rows(n: int) -> list[dict]:
    """Small rows shaped like build-dataset's: a function in the prompt, varied responses."""
    rows = []
    for i in range(n):
        source = FUNCTION.replace("clamp", f"clamp_{i}")
        if i % 2:
            instruction = f"Explain the Python function `clamp_{i}` below.\n\n```python\n{source}\n```"
            response = (f"**Purpose**: `clamp_{i}` limits a value to a range.\n\n"
                        "**Parameters**: `value`, `low`, `high`.\n\n**Returns**: the clamped value.")
        else:
            instruction = (f"Complete the Python function `clamp_{i}` below.\n\n"
                           f"```python\ndef clamp_{i}(value, low, high):\n```")
            response = f"```python\n{source}\n```"
        rows.append({"id": f"f{i}", "category": "explain" if i % 2 else "complete",
                     "instruction": instruction, "response": response})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trainer_and_rows(tiny_model_dir, tmp_path_factory):
    rows = make_rows(6)
    config = TrainConfig(dataset="unused", model=str(tiny_model_dir))
    examples = examples_from_rows(rows, "test rows")
    out = tmp_path_factory.mktemp("trainer")
    trainer = build_trainer(config, examples, str(tiny_model_dir), str(out))
    return trainer, rows


def _prompt_len(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != -100)


def test_loss_mask_covers_completion_only(trainer_and_rows):
    trainer, rows = trainer_and_rows
    tokenizer = trainer.processing_class
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    dataset = trainer.train_dataset
    assert len(dataset) == len(rows)  # nothing dropped as fully masked
    by_prompt = {}
    for row in rows:
        ids = tokenizer(render_prompt(tokenizer, row["instruction"]), add_special_tokens=False)
        by_prompt[tuple(ids["input_ids"])] = row
    for example in dataset:
        ids, labels = example["input_ids"], example["labels"]
        start = _prompt_len(labels)
        row = by_prompt[tuple(ids[:start])]
        # every prompt token is masked, every completion token is trained
        assert all(t == -100 for t in labels[:start])
        assert labels[start:] == ids[start:]
        trained = ids[start:]
        assert len(trained) >= 1
        assert im_end in trained  # the model learns to stop
        text = tokenizer.decode(trained)
        assert text.startswith(row["response"])
        assert text.rstrip("\n").endswith("<|im_end|>")


def test_collator_keeps_the_mask_and_pads_with_ignore(trainer_and_rows):
    trainer, _ = trainer_and_rows
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels, input_ids = batch["labels"], batch["input_ids"]
    prompt_tokens = 0
    for i in range(4):
        example = trainer.train_dataset[i]
        n = len(example["input_ids"])
        assert labels[i, :n].tolist() == example["labels"]
        assert (labels[i, n:] == -100).all()  # padding never trained
        assert input_ids[i, :n].tolist() == example["input_ids"]  # right padding
        prompt_tokens += _prompt_len(example["labels"])
    assert (labels == -100).sum().item() >= prompt_tokens > 0


def test_prompt_tokens_equal_eval_prompt(trainer_and_rows):
    trainer, rows = trainer_and_rows
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        eval_ids = tokenizer(render_prompt(tokenizer, row["instruction"]),
                             add_special_tokens=False)["input_ids"]
        assert example["input_ids"][: _prompt_len(example["labels"])] == eval_ids


def test_examples_are_built_by_chat_example():
    rows = make_rows(2)
    assert examples_from_rows(rows, "x") == [
        chat_example(r["instruction"], r["response"]) for r in rows
    ]


def test_one_epoch_run_writes_loadable_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    out = tmp_path / "train"
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=1.0,
                         batch_size=4, grad_accum=1, learning_rate=2e-3)
    manifest = run(config, open_store(str(out)))

    assert (out / "manifest.json").is_file()
    assert manifest["inputs"]["dataset"]["file"] == "train.jsonl"
    assert manifest["counts"]["examples"] == 20
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "adapter/tokenizer.json", "metrics.json", "loss_curve.png"} <= set(manifest["outputs"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 == len(metrics["train_loss"])
    assert metrics["examples"] == 20
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert all(p["loss"] > 0 for p in metrics["train_loss"])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert adapter_config["r"] == 16 and set(adapter_config["target_modules"]) == set(
        config.target_modules)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter", local_files_only=True)
    ids = tokenizer(render_prompt(tokenizer, "hi"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        tuned_logits = tuned(**ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(**ids).logits
    assert not torch.allclose(tuned_logits, base_logits)  # the adapter learned something


def test_missing_model_folder_is_a_missing_input(tmp_path):
    dataset = write_jsonl(tmp_path / "train.jsonl", make_rows(2))
    config = TrainConfig(dataset=dataset, model=str(tmp_path / "no-such-model"))
    with pytest.raises(MissingInputError, match="no such model folder"):
        run(config, open_store(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_dataset_is_a_missing_input(tiny_model_dir, tmp_path):
    config = TrainConfig(dataset=str(tmp_path / "nothing" / "train.jsonl"), model=str(tiny_model_dir))
    with pytest.raises(MissingInputError, match="--dataset"):
        run(config, open_store(str(tmp_path / "out")))


def test_no_dataset_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--dataset is required"):
        run(TrainConfig(model=str(tiny_model_dir)), open_store(str(tmp_path / "out")))


@pytest.mark.parametrize("rows, message", [
    ([], "has no rows"),
    ([{"id": "a", "instruction": "do it"}], "row 1 .*'response'"),
    ([{"id": "a", "instruction": " ", "response": "x"}], "row 1 .*'instruction'"),
])
def test_bad_rows_are_input_errors(tiny_model_dir, tmp_path, rows, message):
    dataset = write_jsonl(tmp_path / "train.jsonl", rows)
    config = TrainConfig(dataset=dataset, model=str(tiny_model_dir))
    with pytest.raises(InputError, match=message):
        run(config, open_store(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_half_precision_needs_a_gpu():
    import torch

    from trackb_core.train import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed here")
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16")
