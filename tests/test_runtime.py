"""The runtime plan train and eval share: precision per device, and the dtype eval loads a
model in under it (fp16 on a T4, never emulated bf16)."""

from __future__ import annotations

import json

import pytest

from trackb_core.errors import ConfigError
from trackb_core.runtime import device_facts, eval_dtype, runtime_plan

CPU = {"cuda": False}
T4 = {"cuda": True, "gpu_count": 1, "gpu_name": "Tesla T4", "compute_capability": [7, 5],
      "bf16_native": False, "flash_attn_varlen": False}
A100 = {"cuda": True, "gpu_count": 8, "gpu_name": "NVIDIA A100-SXM4-80GB",
        "compute_capability": [8, 0], "bf16_native": True, "flash_attn_varlen": False}
H100_FA = {"cuda": True, "gpu_count": 1, "gpu_name": "NVIDIA H100", "compute_capability": [9, 0],
           "bf16_native": True, "flash_attn_varlen": True}
# What torch.cuda.is_bf16_supported() alone would claim for a T4 (through emulation);
# the plan trusts bf16_native, which device_facts reads without emulation.
T4_NO_FACT = {"cuda": True, "gpu_count": 1, "gpu_name": "Tesla T4", "compute_capability": [7, 5]}


@pytest.mark.parametrize("facts, precision, autocast", [
    (CPU, "fp32", None), (T4, "fp16", "float16"), (A100, "bf16", "bfloat16"),
    (H100_FA, "bf16", "bfloat16"),
])
def test_auto_runtime_plan_per_device(facts, precision, autocast):
    plan = runtime_plan("auto", facts)
    assert plan["precision"] == precision and plan["autocast"] == autocast
    assert plan["lora_dtype"] == "float32"
    assert plan["base_dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[
        precision]
    assert plan["packing"] is False
    # Padding-free only with FlashAttention varlen kernels; SDPA everywhere else.
    assert plan["padding_free"] is (facts is H100_FA)
    assert plan["attention"] == ("flash_attention_2" if facts is H100_FA else "sdpa")
    assert plan["device"] == ("cpu" if facts is CPU else "cuda")
    json.dumps(plan)  # recorded in the manifest as is


def test_runtime_plan_refuses_precision_the_hardware_lacks():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        runtime_plan("fp16", CPU)
    with pytest.raises(ConfigError, match="native bf16.*Tesla T4"):
        runtime_plan("bf16", T4)
    assert runtime_plan("fp32", T4)["autocast"] is None  # fp32 is always allowed
    assert runtime_plan("fp16", A100)["precision"] == "fp16"


@pytest.mark.parametrize("facts, dtype", [
    (CPU, "float32"), (T4, "float16"), (T4_NO_FACT, "float16"), (A100, "bfloat16"),
    (H100_FA, "bfloat16"),
])
def test_eval_loads_the_model_in_the_dtype_training_uses(facts, dtype):
    plan = runtime_plan("auto", facts)
    assert eval_dtype(plan) == dtype == plan["base_dtype"]


def test_eval_dtype_follows_an_explicit_precision():
    assert eval_dtype(runtime_plan("fp32", A100)) == "float32"
    assert eval_dtype(runtime_plan("fp16", H100_FA)) == "float16"
    with pytest.raises(ConfigError, match="not a runtime plan"):
        eval_dtype({"device": "cuda"})


def test_device_facts_on_this_machine_plan_without_error():
    facts = device_facts()
    plan = runtime_plan("auto", facts)
    assert eval_dtype(plan) in ("float32", "float16", "bfloat16")
    if not facts["cuda"]:
        assert plan["precision"] == "fp32" and facts["gpu_count"] == 0
