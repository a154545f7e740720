"""vLLM offline generation for ``trackb eval``: the fast path on a GPU.

One :class:`vllm.LLM` per evaluation, the LoRA adapter applied per request with
``LoRARequest`` (no merge, no second copy of the weights). It answers exactly what the
Hugging Face path answers: the same prompt token ids (tokenized here without special
tokens, as the HF path does), the same :class:`~trackb_core.generation.SamplingSettings`
translated by :meth:`~trackb_core.generation.SamplingSettings.vllm` (every parameter
explicit, the model's generation_config never read for sampling), one greedy answer
(temperature 0) and ``n_samples`` samples per item on the item's own seed, every answer
finished by the same function (:func:`trackb_core.generation.finish_answer`), in the
dtype of training's runtime plan.

vLLM is imported inside the functions, so this module imports on any machine;
:func:`vllm_unusable` says why the backend cannot run here (not installed, no GPU),
and :func:`adapter_problem` why an adapter cannot be served (vLLM rejects adapters
that carry ``embed_tokens``/``lm_head``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from trackb_core.errors import InputError
from trackb_core.generation import (
    Answer,
    Generations,
    SamplingSettings,
    finish_answer,
    item_seed,
    stop_ids_for,
)
from trackb_core.runtime import device_facts, eval_dtype, runtime_plan

# Ranks vLLM's LoRA kernels accept for max_lora_rank; the adapter's rank is rounded up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Modules vLLM refuses to load from a LoRA adapter (field notes §4).
UNSUPPORTED_LORA_MODULES = ("embed_tokens", "lm_head")


def vllm_unusable() -> str | None:
    """Why the vLLM backend cannot run on this machine, or None when it can."""
    try:
        installed = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return "vllm is not installed (pip install vllm, or use the vllm image)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is available (vLLM needs one)"
    return None


def _adapter_config(adapter_dir: Path) -> dict:
    try:
        data = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {adapter_dir / 'adapter_config.json'}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{adapter_dir / 'adapter_config.json'} is not a JSON object")
    return data


def adapter_problem(adapter_dir: Path) -> str | None:
    """Why vLLM cannot serve this PEFT adapter, or None when it can.

    Raises InputError if adapter_config.json is unreadable.
    """
    config = _adapter_config(adapter_dir)
    named = []
    for key in ("modules_to_save", "target_modules"):
        value = config.get(key) or []
        named += [value] if isinstance(value, str) else list(value)
    carried = sorted({m for m in UNSUPPORTED_LORA_MODULES if any(m in str(n) for n in named)})
    if carried:
        return (f"the adapter carries {', '.join(carried)}, which vLLM's LoRA support "
                "rejects")
    return None


def max_lora_rank(adapter_dir: Path) -> int:
    """The smallest rank vLLM accepts that fits the adapter's largest LoRA rank.

    Raises InputError if adapter_config.json is unreadable or its rank is beyond vLLM's.
    """
    config = _adapter_config(adapter_dir)
    ranks = [config.get("r") or 0]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    largest = max(int(r) for r in ranks if isinstance(r, int | float))
    for allowed in VLLM_LORA_RANKS:
        if largest <= allowed:
            return allowed
    raise InputError(f"{adapter_dir}: LoRA rank {largest} is above vLLM's largest "
                     f"({VLLM_LORA_RANKS[-1]})")


def vllm_dtype() -> str:
    """vLLM's dtype for this GPU from the runtime plan training uses
    (:func:`trackb_core.runtime.eval_dtype`): ``"float16"`` on GPUs without native
    bfloat16 (T4), ``"bfloat16"`` on those with it."""
    return eval_dtype(runtime_plan("auto", device_facts()))


def generate_vllm(model_path: str, tokenizer_path: str, adapter_dir: Path | None,
                  prompts: list[str], item_ids: list[str], *, settings: SamplingSettings,
                  on_answers: Callable[[int], None] | None = None
                  ) -> tuple[Generations, str]:
    """Greedy answers and ``settings.n_samples`` samples per prompt, with vLLM; each
    item's samples drawn with its own seed (:func:`trackb_core.generation.item_seed`);
    ``on_answers(n)`` after the greedy pass and after the samples (``n`` answers each).

    Returns the :class:`trackb_core.generation.Generations` and the dtype name. Raises
    InputError if the tokenizer or the adapter cannot be read or the adapter cannot be
    served by vLLM.
    """
    from transformers import AutoTokenizer, GenerationConfig
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load tokenizer {tokenizer_path}: "
                         f"{str(exc).splitlines()[0]}") from exc
    try:
        configured_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        configured_eos = None  # a model without generation_config.json: tokenizer eos only
    stops = stop_ids_for(tokenizer, configured_eos)

    dtype = vllm_dtype()
    # generation_config="vllm": vLLM's neutral defaults, never the model's file (which
    # could carry a repetition penalty or top-k); every parameter is set below anyway.
    engine_options: dict = {"model": model_path, "tokenizer": tokenizer_path,
                            "dtype": dtype, "seed": settings.seed,
                            "generation_config": "vllm"}
    lora_request = None
    if adapter_dir is not None:
        problem = adapter_problem(adapter_dir)
        if problem:
            raise InputError(f"--adapter: {problem}; use --backend hf")
        engine_options.update(enable_lora=True, max_loras=1,
                              max_lora_rank=max_lora_rank(adapter_dir))
        lora_request = LoRARequest("adapter", 1, str(adapter_dir))
    llm = LLM(**engine_options)

    # Token ids, not text: vLLM would add the tokenizer's special tokens, the HF path does not.
    requests = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]}
                for p in prompts]
    greedy_params = SamplingParams(**settings.vllm(sample=False, stop_ids=stops))
    greedy = [finish_answer(tokenizer, list(output.outputs[0].token_ids), stops, settings)
              for output in llm.generate(requests, greedy_params, lora_request=lora_request,
                                         use_tqdm=False)]
    if on_answers is not None:
        on_answers(len(greedy))
    samples: list[list[Answer]] = [[] for _ in prompts]
    if settings.n_samples:
        per_item = [SamplingParams(**settings.vllm(sample=True, stop_ids=stops,
                                                   seed=item_seed(settings.seed, item_id)))
                    for item_id in item_ids]
        outputs = llm.generate(requests, per_item, lora_request=lora_request, use_tqdm=False)
        for index, output in enumerate(outputs):
            samples[index] = [finish_answer(tokenizer, list(c.token_ids), stops, settings)
                              for c in output.outputs]
        if on_answers is not None:
            on_answers(sum(len(answers) for answers in samples))
    return Generations(greedy=greedy, samples=samples, device="cuda", backend="vllm"), dtype
