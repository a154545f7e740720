"""What the eval backends share: their answers' shape and how an answer ends.

Both backends (Hugging Face ``generate`` in :mod:`trackb_core.evaluate`, vLLM in
:mod:`trackb_core.vllm_backend`) stop at the same tokens (:func:`stop_ids_for`) and cut
and decode new tokens with the same function (:func:`decode_answer`), so their answers
are post-processed identically and come back as the same :class:`Generations`.
"""

from __future__ import annotations

from dataclasses import dataclass

# ChatML's end of turn: a model taught the chat format stops here, even when the
# tokenizer's eos is <|endoftext|> (as for the Qwen2.5 base models).
END_OF_TURN = "<|im_end|>"


@dataclass
class Generations:
    """What a backend produced: per prompt one greedy answer and the samples."""

    greedy: list[str]
    samples: list[list[str]]
    tokens: int
    device: str
    backend: str


def stop_ids_for(tokenizer, configured_eos: int | list[int] | None) -> list[int]:
    """The tokenizer's eos, the model's configured eos ids and ChatML's end of turn."""
    ids = {tokenizer.eos_token_id}
    ids.update(configured_eos if isinstance(configured_eos, list) else [configured_eos])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if isinstance(i, int))


def decode_answer(tokenizer, ids: list[int], stops: list[int] | set[int]) -> tuple[str, int]:
    """``(text, tokens generated)`` of new token ids cut at the first stop token.

    The stop token counts as generated but is not decoded; both backends use this, so
    their answers are post-processed identically.
    """
    stop_set = set(stops)
    cut = next((j for j, t in enumerate(ids) if t in stop_set), None)
    kept = ids if cut is None else ids[:cut]
    used = len(kept) + (0 if cut is None else 1)
    return tokenizer.decode(kept, skip_special_tokens=True), used
