"""One set of sampling settings for both eval backends: what Hugging Face generate and
vLLM are told, on the settings objects themselves (vLLM need not be installed)."""

from __future__ import annotations

import pytest

from trackb_core.generation import (
    CHAT_STOPS,
    SEED_VIEW_TOKENS,
    SamplingSettings,
    effective_sampling,
    item_seed,
    sample_seeds,
)

STOPS = [151643, 151644, 151645]


def settings(**overrides) -> SamplingSettings:
    values = {"max_new_tokens": 1024, "n_samples": 3, "temperature": 0.6, "top_p": 0.95,
              "seed": 42, **overrides}
    return SamplingSettings(**values)


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"top_k": 20, "min_p": 0.05},
                                       {"repetition_penalty": 1.1, "max_new_tokens": 64}])
def test_hf_and_vllm_are_told_the_same_thing(sample, overrides):
    chosen = settings(**overrides)
    hf = effective_sampling(chosen.hf(sample=sample, stop_ids=STOPS, pad_id=0), "hf")
    vllm = effective_sampling(chosen.vllm(sample=sample, stop_ids=STOPS, seed=7), "vllm")
    assert hf == vllm
    assert hf["greedy"] is (not sample)
    assert hf["n"] == (chosen.n_samples if sample else 1)
    assert hf["repetition_penalty"] == chosen.repetition_penalty
    assert hf["max_new_tokens"] == chosen.max_new_tokens and hf["stop_ids"] == STOPS
    if sample:
        assert (hf["temperature"], hf["top_p"], hf["top_k"], hf["min_p"]) == (
            chosen.temperature, chosen.top_p, chosen.top_k, chosen.min_p)


def test_hf_config_is_valid_and_sets_what_the_model_could_otherwise_supply():
    from transformers import GenerationConfig

    for sample in (False, True):
        spec = settings().hf(sample=sample, stop_ids=STOPS, pad_id=0)
        config = GenerationConfig(**spec["config"])
        config.validate(strict=True)
        # HF's own sampling is never used: samples come from the seeded sampler
        assert config.do_sample is False and config.num_beams == 1
        assert config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0
        assert config.max_new_tokens == 1024 and config.eos_token_id == STOPS
    # nothing of the sampling is left for HF's defaults (its top_k is 50)
    sampler = settings().hf(sample=True, stop_ids=STOPS, pad_id=0)["sampler"]
    assert sampler == {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0}


def test_vllm_params_leave_nothing_to_defaults():
    greedy = settings().vllm(sample=False, stop_ids=STOPS)
    assert greedy["temperature"] == 0.0 and greedy["n"] == 1 and greedy["seed"] is None
    sampled = settings().vllm(sample=True, stop_ids=STOPS, seed=9)
    assert sampled == {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.0,
                       "repetition_penalty": 1.0, "presence_penalty": 0.0,
                       "frequency_penalty": 0.0, "seed": 9, "max_tokens": 1024,
                       "stop_token_ids": STOPS, "ignore_eos": False,
                       "skip_special_tokens": True}


def test_settings_as_recorded_in_eval_json():
    recorded = settings(max_new_tokens=200).describe()
    assert recorded["stop_tokens"] == list(CHAT_STOPS) == ["<|im_end|>", "<|im_start|>"]
    # a budget under the seed's: the seed view is the whole answer, and says so
    assert recorded["seed_view_tokens"] == 200
    assert settings().describe()["seed_view_tokens"] == SEED_VIEW_TOKENS == 384


def test_item_seeds_depend_on_the_item_and_the_run_seed_only():
    assert item_seed(42, "a") == item_seed(42, "a")
    assert len({item_seed(42, "a"), item_seed(42, "b"), item_seed(43, "a")}) == 3
    seeds = sample_seeds(42, "a", 3)
    assert len(set(seeds)) == 3 and seeds == sample_seeds(42, "a", 3)
    assert all(0 <= s < 2**31 for s in seeds)
