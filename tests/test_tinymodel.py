"""The tiny model: builds offline, loads with the Auto classes, speaks ChatML, learns."""

from __future__ import annotations

import json

import pytest

from trackb_core.errors import InputError
from trackb_core.prompts import render_prompt
from trackb_core.tinymodel import (
    EOT,
    IM_END,
    IM_START,
    TinyModelConfig,
    build_tiny_model,
    corpus_texts,
    run,
)


def test_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    # a small corpus may not fill the requested vocabulary; never more than asked
    assert model.config.vocab_size == len(tokenizer) <= TinyModelConfig().vocab_size
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == EOT
    eos_ids = set(model.generation_config.eos_token_id)
    assert eos_ids == {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOT)}
    for token in (EOT, IM_START, IM_END):
        # special tokens stay whole: one id each, never split into bytes
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_round_trips_code(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    code = 'def f(x: int) -> str:\n    """Ünïcode ✓."""\n\treturn str(x * 2)  # 12345\n'
    ids = tokenizer(code, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == code
    # trained on code: common words and indentation merge, far fewer tokens than bytes
    plain = "    def __init__(self, value):\n        self.value = value\n        return None\n"
    assert len(tokenizer(plain, add_special_tokens=False)["input_ids"]) < len(plain) / 3


def test_chat_template_renders_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": "A"}], tokenize=False
    )
    assert full == text + "A<|im_end|>\n"
    assert render_prompt(tokenizer, "U").endswith("<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_pretraining_lowers_the_loss(tiny_model_dir):
    metrics = json.loads((tiny_model_dir / "pretrain_metrics.json").read_text())
    assert metrics["steps"] >= 3
    assert metrics["tokens"] == metrics["steps"] * TinyModelConfig().batch_size * TinyModelConfig().seq_len
    # A random init sits near ln(vocab) ~ 8; even a few steps must move below it.
    assert metrics["loss_first"] > 7.5
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["heldout_loss_final"] < metrics["heldout_loss_initial"]


def test_generates_and_stops(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    prompt = render_prompt(tokenizer, "Write a function.")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _small_config(corpus, **kw):
    base = dict(corpus=str(corpus), vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
                num_kv_heads=1, intermediate_size=64, seq_len=64, batch_size=4, pretrain_steps=3)
    return TinyModelConfig(**{**base, **kw})


def test_fixed_steps_are_byte_identical(tmp_path, stdlib_corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_model(_small_config(stdlib_corpus), a)
    build_tiny_model(_small_config(stdlib_corpus), b)
    names = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "pretrain_metrics.json":
            continue  # records wall-clock seconds
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_stage_writes_model_at_root_with_manifest(tmp_path, stdlib_corpus):
    from transformers import AutoModelForCausalLM

    from trackb_core.store import open_store

    out = tmp_path / "tiny-model"
    manifest = run(_small_config(stdlib_corpus), open_store(str(out)))
    assert (out / "manifest.json").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain_metrics.json",
            "generation_config.json"} <= set(manifest["outputs"])
    assert manifest["counts"]["pretrain_steps"] == 3
    assert manifest["counts"]["vocab"] == 512
    assert manifest["inputs"]["corpus"]["sha256"]
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)


def test_corpus_without_python_text_is_an_input_error(tmp_path):
    (tmp_path / "empty.py").write_text("   \n")
    (tmp_path / "latin1.py").write_bytes(b"x = '\xe9'\n")
    with pytest.raises(InputError, match="no readable UTF-8"):
        corpus_texts(tmp_path)


def test_inconsistent_heads_are_a_config_error(tmp_path, stdlib_corpus):
    from trackb_core.errors import ConfigError

    with pytest.raises(ConfigError, match="num_heads"):
        build_tiny_model(_small_config(stdlib_corpus, num_heads=3), tmp_path / "m")


def test_time_budget_run_equals_the_fixed_step_run(tmp_path, stdlib_corpus):
    timed = build_tiny_model(_small_config(stdlib_corpus, pretrain_steps=None,
                                           pretrain_seconds=0.5), tmp_path / "timed")
    assert timed["steps"] >= 3
    build_tiny_model(_small_config(stdlib_corpus, pretrain_steps=timed["steps"]), tmp_path / "fixed")
    # the clock only chose the step count: the same count reproduces the same weights
    assert (tmp_path / "timed" / "model.safetensors").read_bytes() == (
        tmp_path / "fixed" / "model.safetensors").read_bytes()


def test_schedule_decays_over_the_last_fifth():
    from trackb_core.tinymodel import decay_steps, total_for_stable

    for stable in range(3, 200):
        total = total_for_stable(stable)
        assert total - decay_steps(total) == stable
        assert (total + 1) - decay_steps(total + 1) > stable  # the longest such run
