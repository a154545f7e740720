"""The runtime plan: how a model runs on this machine, shared by train and eval.

:func:`device_facts` reads the hardware once into plain data; :func:`runtime_plan` turns
a requested precision and those facts into a plan (pure, so every device is unit-tested
without it). Train follows the plan's autocast and storage dtypes; eval loads the model
in :func:`eval_dtype` of the same plan, so a T4 runs fp16 in both stages and never bf16
through emulation (``torch.cuda.is_bf16_supported()`` says yes on a T4).
"""

from __future__ import annotations

from typing import Any

from trackb_core.errors import ConfigError

# Precision name -> torch dtype name.
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def device_facts() -> dict[str, Any]:
    """What this machine offers a model, as plain data (see :func:`runtime_plan`)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "gpu_count": 0, "gpu_name": None, "compute_capability": None,
                "bf16_native": False, "flash_attn_varlen": False}
    from transformers.utils import is_flash_attn_2_available

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "cuda": True,
        "gpu_count": torch.cuda.device_count(),
        "gpu_name": torch.cuda.get_device_name(0),
        "compute_capability": [major, minor],
        # Without including_emulation=False a T4 answers True (bf16 emulated, slowly).
        "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        "flash_attn_varlen": bool(is_flash_attn_2_available()),
    }


def runtime_plan(precision: str, facts: dict[str, Any]) -> dict[str, Any]:
    """How to run with ``precision`` ("auto", "fp16", "bf16", "fp32") on a machine
    described by ``facts`` (:func:`device_facts`'s keys). Pure: no hardware needed.

    Returns ``{"device", "gpus", "gpu_name", "compute_capability", "precision",
    "autocast", "base_dtype", "lora_dtype", "attention", "packing", "padding_free",
    "reason"}``. Raises ConfigError when fp16/bf16 is asked of hardware without it.
    """
    cuda = bool(facts.get("cuda"))
    capability = tuple(facts.get("compute_capability") or (0, 0))
    bf16 = cuda and bool(facts.get("bf16_native", capability >= (8, 0)))
    where = facts.get("gpu_name") or ("CUDA GPU" if cuda else "CPU")
    if precision == "auto":
        chosen = "fp32" if not cuda else ("bf16" if bf16 else "fp16")
        reason = ("CPU: fp32" if not cuda else
                  f"{where} (cc {capability[0]}.{capability[1]}): "
                  + ("native bf16" if bf16 else "no native bf16, fp16 autocast + loss scaling"))
    elif precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU; use fp32 or auto on CPU")
    elif precision == "bf16" and not bf16:
        raise ConfigError(f"--precision bf16 needs a GPU with native bf16 (compute capability "
                          f"8+; {where} has not): use fp16 or auto")
    else:
        chosen, reason = precision, f"{where}: --precision {precision}"
    # Padding-free batches need FlashAttention's varlen kernels (Ampere or newer); SDPA
    # has none, and packing without them lets examples attend to each other.
    padding_free = cuda and capability >= (8, 0) and bool(facts.get("flash_attn_varlen"))
    return {
        "device": "cuda" if cuda else "cpu",
        "gpus": int(facts.get("gpu_count") or 0),
        "gpu_name": facts.get("gpu_name"),
        "compute_capability": list(capability) if cuda else None,
        "precision": chosen,
        "autocast": None if chosen == "fp32" else DTYPES[chosen],
        # The frozen base is stored in the autocast dtype (half the memory on a T4) ...
        "base_dtype": DTYPES[chosen],
        # ... the trained LoRA weights never are: fp16 weights cannot take the updates.
        "lora_dtype": "float32",
        "attention": "flash_attention_2" if padding_free else "sdpa",
        "packing": False,
        "padding_free": padding_free,
        "reason": reason,
    }


def eval_dtype(plan: dict[str, Any]) -> str:
    """The torch dtype name ("float32", "float16" or "bfloat16") to load a model in for
    inference under ``plan`` (a :func:`runtime_plan`): the plan's precision, so CPU runs
    float32, a T4 float16 and only GPUs with native bf16 bfloat16, as in training.

    Raises ConfigError if ``plan`` names no known precision.
    """
    try:
        return DTYPES[plan["precision"]]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"not a runtime plan (no known precision): {plan!r}") from exc
