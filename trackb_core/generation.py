"""What the eval backends share: one set of sampling settings, the per-item seeds, how an
answer ends and what is kept of it.

Both backends (Hugging Face ``generate`` in :mod:`trackb_core.evaluate`, vLLM in
:mod:`trackb_core.vllm_backend`) take the same :class:`SamplingSettings` and translate
it with :meth:`SamplingSettings.hf` and :meth:`SamplingSettings.vllm`: every knob is
set explicitly, so nothing is inherited from a model's ``generation_config.json`` (a
repetition penalty, HF's ``top_k=50``). Samples are seeded per item
(:func:`item_seed`), so an answer does not depend on which batch it was drawn in. Both
stop at the same tokens (:func:`stop_ids_for`: eos, ChatML's ``<|im_end|>`` and
``<|im_start|>``) and turn token ids into an :class:`Answer` with the same function
(:func:`finish_answer`): the text, its *seed view* (the first
:data:`SEED_VIEW_TOKENS` tokens, what the seed's 384-token generation would have
produced, which the seed-compatible metrics score) and whether the budget cut it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

# ChatML's end of turn: a model taught the chat format stops here, even when the
# tokenizer's eos is <|endoftext|> (as for the Qwen2.5 base models); a model that goes on
# to write the next turn itself starts one with <|im_start|>.
END_OF_TURN = "<|im_end|>"
START_OF_TURN = "<|im_start|>"
CHAT_STOPS = (END_OF_TURN, START_OF_TURN)
# The seed generated 384 new tokens; its metrics score that much of each answer.
SEED_VIEW_TOKENS = 384
# vLLM's value for "no top-k cut" (HF's is 0).
VLLM_NO_TOP_K = -1


@dataclass(frozen=True)
class SamplingSettings:
    """Every setting that shapes an answer, identical for both backends.

    Greedy answers: argmax at every step (temperature, top-p and top-k do not apply).
    Samples: ``n_samples`` per item at ``temperature`` with nucleus ``top_p``; ``top_k``
    0 means no top-k cut and ``min_p`` 0 no min-p cut; ``repetition_penalty`` 1 means
    none (also for greedy). ``seed`` seeds every item's own generator
    (:func:`item_seed`). Answers stop at ``stop_tokens`` (and the tokenizer's and the
    model's eos) or after ``max_new_tokens``.
    """

    max_new_tokens: int
    n_samples: int
    temperature: float
    top_p: float
    seed: int
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_tokens: tuple[str, ...] = CHAT_STOPS
    seed_view_tokens: int = SEED_VIEW_TOKENS

    def describe(self) -> dict[str, Any]:
        """The settings as eval.json records them (``stop_tokens`` as a list)."""
        data = asdict(self)
        data["stop_tokens"] = list(self.stop_tokens)
        data["seed_view_tokens"] = min(self.seed_view_tokens, self.max_new_tokens)
        return data

    def hf(self, *, sample: bool, stop_ids: list[int], pad_id: int | None) -> dict[str, Any]:
        """``{"config": GenerationConfig kwargs, "sampler": SeededSampler kwargs or None}``
        for Hugging Face ``generate``.

        The config sets every global default explicitly and is greedy: samples are drawn
        by the HF backend's seeded sampler (a logits processor with one generator per
        row, each prompt repeated ``n`` times) so that each item's samples follow its own
        seed. Raises nothing.
        """
        config = {
            "max_length": None, "min_length": 0, "min_new_tokens": None,
            "max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1,
            # HF's own sampling knobs stay unset: its sampling is never used (see above)
            "num_beam_groups": 1, "temperature": None, "top_k": None, "top_p": None,
            "min_p": None, "typical_p": None, "epsilon_cutoff": None, "eta_cutoff": None,
            "repetition_penalty": self.repetition_penalty, "encoder_repetition_penalty": 1.0,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
            "suppress_tokens": None, "begin_suppress_tokens": None,
            "forced_bos_token_id": None, "forced_eos_token_id": None,
            "exponential_decay_length_penalty": None, "remove_invalid_values": False,
            "diversity_penalty": 0.0, "renormalize_logits": False,
            "eos_token_id": list(stop_ids), "pad_token_id": pad_id,
            "num_return_sequences": 1,
            "use_cache": True,
        }
        sampler = ({"n": self.n_samples, "temperature": self.temperature,
                    "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}
                   if sample else None)
        return {"config": config, "sampler": sampler}

    def vllm(self, *, sample: bool, stop_ids: list[int], seed: int | None = None
             ) -> dict[str, Any]:
        """``vllm.SamplingParams`` kwargs: greedy (temperature 0, one answer) or the
        samples of one item with its ``seed``. Raises nothing."""
        return {
            "n": self.n_samples if sample else 1,
            "temperature": self.temperature if sample else 0.0,
            "top_p": self.top_p if sample else 1.0,
            "top_k": self.top_k if sample and self.top_k > 0 else VLLM_NO_TOP_K,
            "min_p": self.min_p if sample else 0.0,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": seed if sample else None,
            "max_tokens": self.max_new_tokens,
            "stop_token_ids": list(stop_ids),
            "ignore_eos": False,
            "skip_special_tokens": True,
        }


def effective_sampling(hf_or_vllm: dict[str, Any], backend: str) -> dict[str, Any]:
    """What a backend's arguments (:meth:`SamplingSettings.hf` /
    :meth:`SamplingSettings.vllm`) make it do, in one vocabulary: ``{"n", "greedy",
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
    "stop_ids"}`` (``top_k`` 0 = no cut). Lets a test hold both backends to one
    behaviour. Raises ValueError for another backend."""
    if backend == "hf":
        config, sampler = hf_or_vllm["config"], hf_or_vllm["sampler"]
        greedy = sampler is None
        return {"n": 1 if greedy else sampler["n"], "greedy": greedy,
                "temperature": None if greedy else sampler["temperature"],
                "top_p": None if greedy else sampler["top_p"],
                "top_k": None if greedy else sampler["top_k"],
                "min_p": None if greedy else sampler["min_p"],
                "repetition_penalty": config["repetition_penalty"],
                "max_new_tokens": config["max_new_tokens"],
                "stop_ids": sorted(config["eos_token_id"])}
    if backend == "vllm":
        greedy = hf_or_vllm["temperature"] == 0
        top_k = hf_or_vllm["top_k"]
        return {"n": hf_or_vllm["n"], "greedy": greedy,
                "temperature": None if greedy else hf_or_vllm["temperature"],
                "top_p": None if greedy else hf_or_vllm["top_p"],
                "top_k": None if greedy else (0 if top_k in (0, VLLM_NO_TOP_K) else top_k),
                "min_p": None if greedy else hf_or_vllm["min_p"],
                "repetition_penalty": hf_or_vllm["repetition_penalty"],
                "max_new_tokens": hf_or_vllm["max_tokens"],
                "stop_ids": sorted(hf_or_vllm["stop_token_ids"])}
    raise ValueError(f"unknown backend {backend!r}")


def item_seed(seed: int, item_id: str) -> int:
    """The seed of one item's samples: a hash of the run's ``seed`` and the item id, so
    an item draws the same samples whatever else is in its batch. Raises nothing."""
    digest = hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def sample_seeds(seed: int, item_id: str, n: int) -> list[int]:
    """One seed per sample of an item, for a backend that draws each sample on its own
    generator (HF); derived from :func:`item_seed`. Raises nothing."""
    base = item_seed(seed, item_id)
    return [item_seed(base, str(index)) for index in range(n)]


@dataclass
class Answer:
    """One generated answer: its ``text`` (cut at the first stop token), the
    ``seed_view`` (the same, cut at the seed's budget), the ``tokens`` generated (the stop
    token included) and whether the token budget ``truncated`` it."""

    text: str
    seed_view: str
    tokens: int
    truncated: bool


@dataclass
class Generations:
    """What a backend produced: per prompt one greedy answer and the samples."""

    greedy: list[Answer]
    samples: list[list[Answer]]
    device: str
    backend: str
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(a.tokens for a in self.greedy) + sum(
            a.tokens for answers in self.samples for a in answers)


def stop_ids_for(tokenizer, configured_eos: int | list[int] | None) -> list[int]:
    """The tokenizer's eos, the model's configured eos ids and ChatML's turn markers
    (those the tokenizer knows)."""
    ids = {tokenizer.eos_token_id}
    ids.update(configured_eos if isinstance(configured_eos, list) else [configured_eos])
    for marker in CHAT_STOPS:
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if isinstance(i, int))


def decode_answer(tokenizer, ids: list[int], stops: list[int] | set[int]) -> tuple[str, int]:
    """``(text, tokens generated)`` of new token ids cut at the first stop token.

    The stop token counts as generated but is not decoded.
    """
    stop_set = set(stops)
    cut = next((j for j, t in enumerate(ids) if t in stop_set), None)
    kept = ids if cut is None else ids[:cut]
    used = len(kept) + (0 if cut is None else 1)
    return tokenizer.decode(kept, skip_special_tokens=True), used


def finish_answer(tokenizer, ids: list[int], stops: list[int] | set[int],
                  settings: SamplingSettings) -> Answer:
    """The :class:`Answer` of new token ids; both backends use this, so their answers are
    post-processed identically. Truncated: no stop token within ``max_new_tokens``.
    The seed view decodes the first ``seed_view_tokens`` of the same ids: what a
    generation with that budget would have returned."""
    text, used = decode_answer(tokenizer, ids, stops)
    stopped = any(t in set(stops) for t in ids[: settings.max_new_tokens])
    truncated = not stopped and len(ids) >= settings.max_new_tokens
    view = text
    if used > settings.seed_view_tokens:
        view, _ = decode_answer(tokenizer, ids[: settings.seed_view_tokens], stops)
    return Answer(text=text, seed_view=view, tokens=used, truncated=truncated)
