"""``make bench-gpu``: LoRA training and eval-generation speed at Qwen2.5-Coder-1.5B's shape.

One call, inside a time budget (default 480 s, so it fits an 8-minute GPU slot), on
whatever torch / transformers / peft (/ trl / vLLM) the machine has; nothing is
downloaded. The model is built locally from the published Qwen2.5-Coder-1.5B
config.json values with random weights, and fed random token ids: throughput does not
depend on what the weights or tokens mean.

What it measures:

* **LoRA training** at the seed's settings (r 16, alpha 32, dropout 0.05, the seven
  projections, per-device batch 4 x grad-accum 4 = effective batch 16) on sequences of
  ``seq_len`` tokens (1024: trackb's ``--max-length``, the longest example trains at;
  the verl dataset's examples average ~520 tokens, so this is the heavy end). One row
  per precision (fp16, bf16 where native: compute capability >= 8; fp32 on CPU), a plain
  torch + peft loop that does what trackb's trainer does per step (autocast forward,
  backward, gradient clipping at 1.0, AdamW; a GradScaler in fp16; LoRA weights in fp32
  as peft keeps them): tokens/s, MFU and peak memory. A further row runs trackb's own trainer
  (:func:`trackb_core.train.build_trainer`, trl's SFTTrainer) on the same model and
  batch where trl is installed, so the trainer's overhead shows as a ratio.
* **MFU** = 6 x N x tokens/s / peak, N = every parameter of the base model (the tied
  embedding counted once: it is the LM head's matmul). 6N is the standard
  forward + backward estimate; with a frozen base, LoRA skips the base weights'
  gradients (about 2N of the 6N), so the work really done is nearer 4N: the 6N figure
  overstates utilisation by up to 1.5x and is reported because it is the one people
  compare. Peaks (dense tensor-core TFLOPS, no sparsity) come from ``PEAK_TFLOPS`` by
  device name: T4 65 fp16, A100 312, H100 SXM 989, H100 PCIe 756, H200 989; unknown
  devices get no MFU.
* **Eval generation** of ``prompts`` random prompts (lengths drawn between two bounds)
  x (1 greedy + 2 samples at T 0.6), each answer exactly ``new_tokens`` long: the
  seed's loop (one prompt, one answer at a time), ``trackb eval``'s way (left-padded
  batches of 16, samples as ``num_return_sequences``) and vLLM (offline ``LLM`` on the
  saved random model, no tokenizer needed) where it is installed. Ratios are against
  the seed loop's tokens/s, measured in the same process.

Every row has numbers or a reason (``needs CUDA``, ``not installed: vllm``, ``time
budget``...). The result goes to a JSON file under ``$OUT`` (when set) and to a
section of ``--out`` (BENCHMARKS.md) between the ``gpu-bench`` markers, which is
rewritten in place; on CPU nothing is written to a markdown file unless ``--out``
names one. ``--shape tiny`` runs the whole script in seconds on CPU (the test does).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN_MARKER = "<!-- gpu-bench:begin (rewritten by python -m benchmarks.gpu_bench) -->"
END_MARKER = "<!-- gpu-bench:end -->"
JSON_NAME = "gpu_bench.json"

# Qwen/Qwen2.5-Coder-1.5B's published config.json (the values that set the compute;
# 1,543,714,304 parameters, 1.31B without the embedding).
QWEN25_CODER_1_5B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

# The same architecture, small enough that the whole script runs in seconds on a CPU.
TINY = {
    **QWEN25_CODER_1_5B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 1,
}


@dataclass(frozen=True)
class Shape:
    """A model shape and the workload sizes measured on it."""

    model: dict[str, Any]
    seq_len: int  # training tokens per sequence
    timed_steps: int  # optimizer steps timed after one warm-up step
    prompts: int
    prompt_len: tuple[int, int]  # eval prompt lengths are drawn from this range
    new_tokens: int  # every eval answer is exactly this long
    trainer_vocab: int  # the trl path's BPE tokenizer size (at most the model's vocab)


SHAPES = {
    "qwen2.5-coder-1.5b": Shape(model=QWEN25_CODER_1_5B, seq_len=1024, timed_steps=3,
                                prompts=16, prompt_len=(256, 512), new_tokens=128,
                                trainer_vocab=4096),
    # seq_len 256: the trl path's prompt (system turn + instruction) alone is ~110 tokens
    # with a 512-token BPE, and every example must keep completion tokens to train on.
    "tiny": Shape(model=TINY, seq_len=256, timed_steps=2, prompts=4, prompt_len=(8, 16),
                  new_tokens=8, trainer_vocab=512),
}

# Dense tensor-core peaks in TFLOPS by device-name fragment (first match wins), from the
# vendors' datasheets. fp16 equals bf16 on every card that has bf16; the T4 has fp16 only.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0}),  # SXM / HBM3
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("T4", {"fp16": 65.0}),
]

# The eval loop of the seed and of trackb eval: 1 greedy + 2 samples at T 0.6, top-p 0.95.
N_SAMPLES, TEMPERATURE, TOP_P, EVAL_BATCH = 2, 0.6, 0.95, 16
# Seconds kept back at the end for writing results; and each part's share of the budget.
RESERVE_SECONDS = 10.0
SHARE = {"train_row": 0.12, "trainer": 0.2, "batched": 0.15, "seed_loop": 0.2}
SEED = 0


def seed_lora_settings() -> dict[str, Any]:
    """The seed's LoRA and batch settings, read from trackb's TrainConfig defaults.

    Where trackb_core.train cannot be imported (a GPU image without pydantic), the same
    documented values are used; the test checks the two agree.
    """
    try:
        from trackb_core.train import TrainConfig
    except ImportError:
        return dict(FALLBACK_LORA_SETTINGS)
    defaults = TrainConfig()
    return {
        "lora_r": defaults.lora_r,
        "lora_alpha": defaults.lora_alpha,
        "lora_dropout": defaults.lora_dropout,
        "target_modules": list(defaults.target_modules),
        "batch_size": defaults.batch_size,
        # One process: the accumulation that makes the effective batch.
        "grad_accum": defaults.effective_batch // defaults.batch_size,
        "learning_rate": defaults.learning_rate,
    }


FALLBACK_LORA_SETTINGS: dict[str, Any] = {
    "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"],
    "batch_size": 4, "grad_accum": 4, "learning_rate": 2e-4,
}


class Budget:
    """The wall-clock budget: how much is left, and how long one part may take."""

    def __init__(self, seconds: float, started: float | None = None):
        self.seconds = seconds
        # main() passes its own start, so the library imports count against the budget too.
        self.started = time.perf_counter() if started is None else started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        """Seconds left before the reserve for writing results."""
        return self.seconds - RESERVE_SECONDS - self.elapsed()

    def slice(self, share: float) -> float:
        """Seconds a part may use: its share of the whole budget, at most what is left."""
        return min(self.seconds * share, self.left())


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


def skipped(name: str, status: str, reason: str, **facts: Any) -> dict[str, Any]:
    """A row that measured nothing, and why (status: skipped, not installed, failed)."""
    return {"name": name, "status": status, "reason": reason, **facts}


# -- environment -----------------------------------------------------------------------

def package_version(name: str) -> str | None:
    """The installed version of ``name``, or None if it is not installed (never imports it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense tensor-core peak of ``device_name`` at ``precision``, or None if unknown."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def environment() -> dict[str, Any]:
    """Device, library versions and date of this run."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cuda": cuda,
        "torch_cuda_build": torch.version.cuda,
        # Native bf16 only (compute capability >= 8): is_bf16_supported() also says yes on
        # a T4, which merely emulates it. trackb train decides the same way.
        "bf16_supported": bool(cuda and torch.cuda.get_device_capability(0)[0] >= 8
                               and torch.cuda.is_bf16_supported()),
    }
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "vllm"):
        env[name] = package_version(name)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} threads)", capability=None, memory_gib=None)
    return env


# -- model ---------------------------------------------------------------------------------

def build_model(shape: Shape, dtype, device):
    """A seeded, randomly initialised Qwen2ForCausalLM of ``shape`` in ``dtype`` on ``device``.

    Built straight in ``dtype`` (as ``from_pretrained(dtype=...)`` does, through the
    default dtype), so no fp32 copy inflates the peak memory; RoPE's buffers stay fp32.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**shape.model))
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def model_facts(shape: Shape) -> dict[str, Any]:
    """Parameter counts of ``shape`` (built on the meta device: no memory, no time)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape.model))
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"config": dict(shape.model), "params": params,
            "non_embedding_params": params - embedding}


def add_lora(model, lora: dict[str, Any]):
    """``model`` wrapped with the seed's LoRA adapter (peft keeps its weights in fp32)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"],
                        lora_dropout=lora["lora_dropout"],
                        target_modules=list(lora["target_modules"]), bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def precisions(env: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(precision, reason it cannot run here or None)`` for every training row."""
    if not env["cuda"]:
        return [("fp32", None), ("fp16", "needs CUDA"), ("bf16", "needs CUDA")]
    bf16 = None if env["bf16_supported"] else f"bf16 is not supported by {env['device']}"
    return [("fp16", None), ("bf16", bf16)]


def dtype_of(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


# -- training ------------------------------------------------------------------------------

def throughput(tokens: int, seconds: float, params: int, device: str, precision: str
               ) -> dict[str, Any]:
    """tokens/s, MFU (6N approximation) and peak memory of ``tokens`` trained in ``seconds``.

    A figure that cannot be had here is None, with the reason beside it.
    """
    rate = tokens / seconds
    peak = peak_tflops(device, precision)
    facts: dict[str, Any] = {
        "tokens_per_second": round(rate, 1),
        "mfu": None if peak is None else round(6 * params * rate / (peak * 1e12), 4),
        "peak_tflops": peak,
        "peak_memory_gib": peak_memory_gib(),
    }
    if peak is None:
        facts["mfu_reason"] = f"no {precision} peak TFLOPS known for {device}"
    if facts["peak_memory_gib"] is None:
        facts["peak_memory_reason"] = "measured on CUDA only"
    return facts


def finite(value: float) -> float | None:
    """``value`` rounded for the report, or None if NaN/inf (JSON has no such numbers)."""
    return round(value, 4) if math.isfinite(value) else None


def train_plain(shape: Shape, precision: str, lora: dict[str, Any], env: dict[str, Any],
                params: int, seconds: float) -> dict[str, Any]:
    """One warm-up and up to ``shape.timed_steps`` timed optimizer steps of LoRA training.

    Steps stop early (status ``partial``) once ``seconds`` would be exceeded; the rate
    is over the steps that ran.
    """
    import torch

    name = f"torch + peft loop, {precision}"
    started = time.perf_counter()
    device = "cuda" if env["cuda"] else "cpu"
    dtype = dtype_of(precision)
    reset_peak_memory()
    model = add_lora(build_model(shape, dtype, device), lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lora["learning_rate"],
                                  fused=device == "cuda")
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    micro, accum = lora["batch_size"], lora["grad_accum"]
    generator = torch.Generator(device=device).manual_seed(SEED)
    vocab = shape.model["vocab_size"]

    def optimizer_step() -> float:
        losses = []
        for _ in range(accum):
            ids = torch.randint(0, vocab, (micro, shape.seq_len), device=device,
                                generator=generator)
            with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
                loss = model(input_ids=ids, labels=ids).loss / accum
            (scaler.scale(loss) if scaler else loss).backward()
            losses.append(loss.detach())
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).sum())

    loss_first = optimizer_step()  # warm-up: kernels, allocator, optimizer state
    synchronize()
    warmup = time.perf_counter() - started
    timed_start = time.perf_counter()
    steps, loss_last = 0, loss_first
    while steps < shape.timed_steps:
        per_step = (time.perf_counter() - timed_start) / steps if steps else warmup
        if time.perf_counter() - started + per_step > seconds:
            break
        loss_last = optimizer_step()
        steps += 1
    synchronize()
    elapsed = time.perf_counter() - timed_start
    # The model and optimizer are freed when this returns (measure() then empties the cache).
    trainable_params = sum(p.numel() for p in trainable)
    row: dict[str, Any] = {"name": name, "path": "torch+peft", "precision": precision,
                           "trainable_params": trainable_params,
                           "warmup_seconds": round(warmup, 2),
                           "loss_first": finite(loss_first), "loss_last": finite(loss_last)}
    if steps == 0:
        return {**row, "status": "skipped",
                "reason": f"time budget: the warm-up step took {warmup:.1f} s of {seconds:.0f} s"}
    tokens = steps * micro * accum * shape.seq_len
    row.update(status="ok" if steps == shape.timed_steps else "partial",
               optimizer_steps=steps, tokens=tokens, seconds=round(elapsed, 3),
               step_seconds=round(elapsed / steps, 3),
               **throughput(tokens, elapsed, params, env["device"], precision))
    if steps < shape.timed_steps:
        row["reason"] = f"time budget: {steps} of {shape.timed_steps} timed steps ran"
    if row["loss_last"] is None:
        row["note"] = "loss is not finite (random weights in fp16 can overflow)"
    return row


def trainer_texts() -> list[str]:
    """Real Python to train the trl path's tokenizer on and to fill its examples with."""
    texts = [path.read_text(encoding="utf-8")
             for path in sorted((ROOT / "trackb_core").glob("*.py"))]
    return [text for text in texts if text.strip()]


def fitted_examples(tokenizer, texts: list[str], seq_len: int, count: int, chat_example
                    ) -> list[dict[str, Any]]:
    """``count`` chat examples of code whose rendered length is just under ``seq_len`` tokens.

    Each response is a slice of the token stream of ``texts``, decoded back to text, as
    long as the prompt leaves room for (less a small margin: decoding and re-encoding
    can merge differently), so no example is dropped or cut at ``max_length``.
    """
    instruction = "Write the next part of this module."
    prompt = tokenizer.apply_chat_template(chat_example(instruction, "")["prompt"],
                                           tokenize=False, add_generation_prompt=True)
    room = seq_len - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 16
    if room < 1:
        raise ValueError(f"the chat prompt alone fills {seq_len} tokens")
    stream = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    stream = stream * (room * count // len(stream) + 2)
    return [chat_example(instruction, tokenizer.decode(stream[i * room:(i + 1) * room]))
            for i in range(count)]


def train_trackb_trainer(shape: Shape, precision: str, env: dict[str, Any], params: int,
                         seconds: float) -> dict[str, Any]:
    """trackb's own trainer (trl SFTTrainer via build_trainer) on the same model and batch.

    The model and a corpus-trained BPE tokenizer are saved to a temporary folder (the
    trainer loads a model folder, as ``trackb train`` does); every example is just
    under ``seq_len`` tokens long (:func:`fitted_examples`). Optimizer steps are timed by a
    callback from the end of the first (the warm-up) to the end of the last.
    """
    name = f"trackb trainer (trl SFTTrainer), {precision}"
    missing = [m for m in ("peft", "trl", "datasets", "pydantic")
               if importlib.util.find_spec(m) is None]
    if missing:
        return skipped(name, "not installed", "not installed: " + ", ".join(missing),
                       path="trl", precision=precision)
    from transformers import TrainerCallback

    from trackb_core.prompts import chat_example
    from trackb_core.tinymodel import train_tokenizer
    from trackb_core.train import TrainConfig, build_trainer, token_stats

    started = time.perf_counter()
    texts = trainer_texts()
    tokenizer = train_tokenizer(texts, min(shape.trainer_vocab, shape.model["vocab_size"]))
    config = TrainConfig(max_length=shape.seq_len, epochs=1, logging_steps=1,
                         precision=precision)
    per_step = config.effective_batch
    examples = fitted_examples(tokenizer, texts, shape.seq_len,
                               per_step * (1 + shape.timed_steps), chat_example)
    clock: list[float] = []
    deadline = started + seconds

    class StepClock(TrainerCallback):
        # Stops training once another step of the last one's length would pass the deadline.
        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            clock.append(time.perf_counter())
            last = clock[-1] - (clock[-2] if len(clock) > 1 else train_started)
            if clock[-1] + last > deadline:
                control.should_training_stop = True

    with tempfile.TemporaryDirectory(prefix="gpu-bench-trainer-") as tmp:
        model_dir = Path(tmp) / "model"
        model = build_model(shape, dtype_of(precision), "cuda" if env["cuda"] else "cpu")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        free_memory()
        reset_peak_memory()
        trainer = build_trainer(config, examples, str(model_dir), f"{tmp}/out", precision)
        stats = token_stats(trainer, len(examples))
        trainer.add_callback(StepClock())
        train_started = time.perf_counter()
        setup = train_started - started
        trainer.train()
        synchronize()
        del trainer  # the peak memory stays recorded until the next reset
        free_memory()
    row: dict[str, Any] = {"name": name, "path": "trl", "precision": precision,
                           "setup_seconds": round(setup, 2),
                           "mean_tokens_per_example": round(
                               stats["tokens_total"] / max(1, stats["examples_trained"]), 1)}
    steps = len(clock) - 1
    if steps < 1:
        return {**row, "status": "skipped",
                "reason": f"time budget: setup and the warm-up step took {seconds:.0f} s"}
    elapsed = clock[-1] - clock[0]
    tokens = round(steps * per_step * row["mean_tokens_per_example"])
    row.update(status="ok" if steps == shape.timed_steps else "partial",
               optimizer_steps=steps, tokens=tokens, seconds=round(elapsed, 3),
               step_seconds=round(elapsed / steps, 3),
               **throughput(tokens, elapsed, params, env["device"], precision))
    if steps < shape.timed_steps:
        row["reason"] = f"time budget: {steps} of {shape.timed_steps} timed steps ran"
    return row


def run_training(shape: Shape, env: dict[str, Any], params: int, budget: Budget,
                 lora: dict[str, Any]) -> dict[str, Any]:
    """The training section: one plain-loop row per precision, then the trl row."""
    rows = []
    no_peft = "not installed: peft" if importlib.util.find_spec("peft") is None else None
    for precision, reason in precisions(env):
        reason = reason or no_peft
        name = f"torch + peft loop, {precision}"
        rows.append(measure(name, budget, "train_row", reason, lambda seconds, p=precision:
                            train_plain(shape, p, lora, env, params, seconds),
                            path="torch+peft", precision=precision,
                            status="not installed" if no_peft and reason == no_peft
                            else "skipped"))
    auto = "fp32" if not env["cuda"] else ("bf16" if env["bf16_supported"] else "fp16")
    rows.append(measure(f"trackb trainer (trl SFTTrainer), {auto}", budget, "trainer", None,
                        lambda seconds: train_trackb_trainer(shape, auto, env, params, seconds),
                        path="trl", precision=auto))
    # The trainer's overhead: its tokens/s against the plain loop at the same precision.
    plain = next((r for r in rows if r["path"] == "torch+peft" and r["precision"] == auto), None)
    add_ratios(rows, plain, key="ratio_vs_plain_loop")
    return {"settings": {**lora, "seq_len": shape.seq_len,
                         "effective_batch": lora["batch_size"] * lora["grad_accum"],
                         "timed_optimizer_steps": shape.timed_steps,
                         "tokens": "random ids; loss on every token",
                         "mfu": "6 x params x tokens/s / peak (LoRA does ~4N: see module doc)"},
            "rows": rows}


def measure(name: str, budget: Budget, share: str, reason: str | None, body, *,
            status: str = "skipped", **facts) -> dict[str, Any]:
    """Run one row's ``body(seconds)`` within its slice of the budget, catching failures.

    A row that cannot run here (``reason``; ``status`` says why) or has no time left is
    skipped with the reason; an exception becomes a ``failed`` row naming it, and the
    script goes on.
    """
    if reason is not None:
        return skipped(name, status, reason, **facts)
    seconds = budget.slice(SHARE[share])
    if seconds < 1.0:
        return skipped(name, "skipped", f"time budget: {budget.left():.0f} s left", **facts)
    log(f"{name} (up to {seconds:.0f} s)")
    try:
        return body(seconds)
    except Exception as exc:  # one broken row must not lose the others' results
        message = str(exc).strip().splitlines()
        log(f"{name} failed: {type(exc).__name__}: {message[0] if message else ''}")
        return skipped(name, "failed", f"{type(exc).__name__}: {message[0] if message else ''}",
                       **facts)
    finally:
        free_memory()


def add_ratios(rows: list[dict[str, Any]], base: dict[str, Any] | None, key: str) -> None:
    """Each measured row's tokens/s as a multiple of ``base``'s (the same process's)."""
    if base is None or not base.get("tokens_per_second"):
        return
    for row in rows:
        if row.get("tokens_per_second"):
            row[key] = round(row["tokens_per_second"] / base["tokens_per_second"], 2)


# -- eval generation -------------------------------------------------------------------------

def random_prompts(shape: Shape) -> list[list[int]]:
    """Seeded random prompts, lengths drawn from ``shape.prompt_len`` (eos never among them)."""
    rng = random.Random(SEED)
    low, high = shape.prompt_len
    eos = shape.model["eos_token_id"]
    vocab = shape.model["vocab_size"]
    prompts = []
    for _ in range(shape.prompts):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(low, high))]
        prompts.append([t if t != eos else (t + 1) % vocab for t in ids])
    return prompts


def hf_generate(model, prompts: list[list[int]], *, new_tokens: int, eos: int, sample: bool,
                num_return: int = 1) -> int:
    """One left-padded ``generate`` call over ``prompts``; returns the tokens generated.

    ``min_new_tokens`` pins every answer to ``new_tokens``, so all modes do equal work.
    """
    import torch

    width = max(len(p) for p in prompts)
    device = model.device
    ids = torch.full((len(prompts), width), eos, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    options: dict[str, Any] = {"do_sample": sample, "num_return_sequences": num_return}
    if sample:
        options.update(temperature=TEMPERATURE, top_p=TOP_P)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=eos, pad_token_id=eos, use_cache=True, **options)
    return int((out.shape[1] - width) * out.shape[0])


def generate_batched(model, prompts, shape: Shape, seconds: float) -> dict[str, Any]:
    """``trackb eval``'s way: batches of 16 by length, greedy then samples per batch."""
    eos = shape.model["eos_token_id"]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [[prompts[i] for i in order[s:s + EVAL_BATCH]]
               for s in range(0, len(order), EVAL_BATCH)]
    return timed_loop("batched HF generate (trackb eval)", seconds, [
        (batch, sample, n) for batch in batches
        for sample, n in ((False, 1), (True, N_SAMPLES))], model, shape, eos,
        unit=f"batch of {EVAL_BATCH}")


def generate_seed_loop(model, prompts, shape: Shape, seconds: float) -> dict[str, Any]:
    """The seed's way: one prompt, one answer per ``generate`` call (greedy, then samples)."""
    eos = shape.model["eos_token_id"]
    calls = [([prompt], sample, 1) for prompt in prompts
             for sample in [False] + [True] * N_SAMPLES]
    return timed_loop("seed loop (one prompt, one answer at a time)", seconds, calls, model,
                      shape, eos, unit="call")


def timed_loop(name: str, seconds: float, calls, model, shape: Shape, eos: int, *, unit: str
               ) -> dict[str, Any]:
    """Run ``calls`` until done or out of ``seconds``; tokens/s over the calls that ran."""
    import torch

    torch.manual_seed(SEED)
    started = time.perf_counter()
    tokens = done = 0
    for call in calls:
        batch, sample, num_return = call
        if done and (time.perf_counter() - started) * (done + 1) / done > seconds:
            break
        tokens += hf_generate(model, batch, new_tokens=shape.new_tokens, eos=eos,
                              sample=sample, num_return=num_return)
        done += 1
    synchronize()
    elapsed = time.perf_counter() - started
    row: dict[str, Any] = {"name": name, "status": "ok" if done == len(calls) else "partial",
                           "calls": done, "of_calls": len(calls), "call_unit": unit,
                           "tokens": tokens, "seconds": round(elapsed, 3),
                           "tokens_per_second": round(tokens / elapsed, 1),
                           "peak_memory_gib": peak_memory_gib()}
    if row["peak_memory_gib"] is None:
        row["peak_memory_reason"] = "measured on CUDA only"
    if done < len(calls):
        row["reason"] = f"time budget: {done} of {len(calls)} generate calls ran"
    return row


def eval_precision(env: dict[str, Any]) -> str:
    """The dtype ``trackb eval`` loads the model in here (the runtime plan's rule,
    :func:`trackb_core.runtime.eval_dtype`: native bf16 only)."""
    if not env["cuda"]:
        return "fp32"
    return "bf16" if env["bf16_supported"] else "fp16"


def run_eval(shape: Shape, env: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """The generation section: seed loop, batched HF generate and vLLM, with ratios."""
    precision = eval_precision(env)
    prompts = random_prompts(shape)
    settings = {"prompts": len(prompts), "prompt_tokens": list(shape.prompt_len),
                "new_tokens": shape.new_tokens, "answers_per_prompt": 1 + N_SAMPLES,
                "temperature": TEMPERATURE, "top_p": TOP_P, "batch_size": EVAL_BATCH,
                "precision": precision}
    rows: list[dict[str, Any]] = []
    model = None
    vllm_name = "vLLM offline LLM.generate"
    try:
        if budget.left() > 5:
            log(f"eval: building the model ({precision})")
            model = build_model(shape, dtype_of(precision),
                                "cuda" if env["cuda"] else "cpu").eval()
            model.config.use_cache = True
            model.generation_config.pad_token_id = shape.model["eos_token_id"]
            # Warm-up outside the timings: kernels, allocator, generate's first-call setup.
            hf_generate(model, prompts[:2], new_tokens=2, eos=shape.model["eos_token_id"],
                        sample=True, num_return=N_SAMPLES)
        for share, body in (("batched", generate_batched), ("seed_loop", generate_seed_loop)):
            label = ("batched HF generate (trackb eval)" if share == "batched"
                     else "seed loop (one prompt, one answer at a time)")
            if model is None:
                rows.append(skipped(label, "skipped", f"time budget: {budget.left():.0f} s left"))
                continue
            reset_peak_memory()
            rows.append(measure(label, budget, share, None,
                                lambda seconds, b=body: b(model, prompts, shape, seconds)))
        rows.append(run_vllm(vllm_name, model, shape, prompts, env, precision, budget))
    finally:
        model = None
        free_memory()
    seed = next((r for r in rows if r["name"].startswith("seed loop")), None)
    add_ratios(rows, seed if seed and seed.get("tokens_per_second") else None,
               key="ratio_vs_seed_loop")
    # Seed loop first in the table: it is the baseline.
    rows.sort(key=lambda r: (not r["name"].startswith("seed loop"),
                             r["name"].startswith("vLLM")))
    return {"settings": settings, "rows": rows}


def run_vllm(name: str, model, shape: Shape, prompts, env: dict[str, Any], precision: str,
             budget: Budget) -> dict[str, Any]:
    """vLLM on the same random model, in a child process that cannot take this one down.

    The model is saved to a temporary folder (vLLM loads folders); vLLM runs without a
    tokenizer, on token ids, and its answers are pinned to ``new_tokens`` like HF's.
    """
    if importlib.util.find_spec("vllm") is None:
        return skipped(name, "not installed", "not installed: vllm")
    if not env["cuda"]:
        return skipped(name, "skipped", "needs CUDA")
    if model is None:
        return skipped(name, "skipped", f"time budget: {budget.left():.0f} s left")
    # Engine start-up (weights, CUDA graphs) alone takes about a minute.
    if budget.left() < 90:
        return skipped(name, "skipped",
                       f"time budget: {budget.left():.0f} s left, vLLM needs ~90 s to start")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-vllm-") as tmp:
        model.save_pretrained(tmp)
        spec = {"model_dir": tmp, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision],
                "prompts": prompts, "new_tokens": shape.new_tokens, "n_samples": N_SAMPLES,
                "temperature": TEMPERATURE, "top_p": TOP_P, "seed": SEED,
                "max_model_len": shape.prompt_len[1] + shape.new_tokens + 16}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        result_path = Path(tmp) / "result.json"
        free_memory()
        timeout = max(1.0, budget.left())
        log(f"{name} (child process, up to {timeout:.0f} s)")
        # Its own process group: vLLM starts an engine process of its own, and a timeout
        # must stop that one too.
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu_bench", "--vllm-child", str(spec_path),
             "--vllm-result", str(result_path)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return skipped(name, "skipped", f"time budget: vLLM did not finish in {timeout:.0f} s")
        if proc.returncode != 0 or not result_path.is_file():
            tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
            return skipped(name, "failed", f"exit {proc.returncode}: "
                           + (tail[0][:300] if tail else "no output"))
        result = json.loads(result_path.read_text())
    tokens = result["tokens"]
    seconds = result["greedy_seconds"] + result["sample_seconds"]
    return {"name": name, "status": "ok", "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
            "startup_seconds": round(result["startup_seconds"], 1),
            "vllm": result["version"], "calls": 2, "of_calls": 2,
            "call_unit": "LLM.generate over all prompts"}


def vllm_child(spec_path: Path, result_path: Path) -> int:
    """The child side of :func:`run_vllm`: start vLLM, time greedy and sampled answers."""
    import vllm
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], skip_tokenizer_init=True,
              max_model_len=spec["max_model_len"], gpu_memory_utilization=0.5,
              seed=spec["seed"])
    startup = time.perf_counter() - started
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    pinned = {"max_tokens": spec["new_tokens"], "min_tokens": spec["new_tokens"],
              "ignore_eos": True, "detokenize": False}
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, **{**pinned, "max_tokens": 2,
                                                                 "min_tokens": 2}))
    timings, tokens = {}, 0
    for label, params in (
            ("greedy", SamplingParams(temperature=0.0, **pinned)),
            ("sample", SamplingParams(n=spec["n_samples"], temperature=spec["temperature"],
                                      top_p=spec["top_p"], seed=spec["seed"], **pinned))):
        began = time.perf_counter()
        outputs = llm.generate(prompts, params)
        timings[label] = time.perf_counter() - began
        tokens += sum(len(c.token_ids) for out in outputs for c in out.outputs)
    Path(result_path).write_text(json.dumps({
        "startup_seconds": startup, "greedy_seconds": timings["greedy"],
        "sample_seconds": timings["sample"], "tokens": tokens, "version": vllm.__version__}))
    return 0


# -- the whole run -----------------------------------------------------------------------------

def run_benchmark(shape_name: str, budget_seconds: float, started: float | None = None
                  ) -> dict[str, Any]:
    """Measure everything that fits in ``budget_seconds`` (counted from ``started``, a
    ``time.perf_counter()`` value; default now); returns the result dict."""
    shape = SHAPES[shape_name]
    budget = Budget(budget_seconds, started)
    env = environment()
    log(f"{shape_name} on {env['device']} (torch {env['torch']}, transformers "
        f"{env['transformers']}), budget {budget_seconds:.0f} s")
    notes = []
    if not env["cuda"] and env["torch_cuda_build"] is None:
        notes.append(f"torch {env['torch']} is a CPU build: on a GPU machine run this with the "
                     "python whose torch has CUDA (GPU_PYTHON=... make bench-gpu)")
    facts = model_facts(shape)
    lora = seed_lora_settings()
    result: dict[str, Any] = {"benchmark": "gpu_bench", "version": 1, "shape": shape_name,
                              "budget_seconds": budget_seconds, "environment": env,
                              "model": facts, "notes": notes}
    if not env["cuda"] and shape_name != "tiny":
        # 1.5B parameters on CPU would take hours per row: say so instead of trying.
        reason = "needs CUDA (use --shape tiny to exercise the script on CPU)"
        result["train"] = {"settings": {**lora, "seq_len": shape.seq_len}, "rows": [
            skipped(f"torch + peft loop, {p}", "skipped", reason, path="torch+peft",
                    precision=p) for p in ("fp16", "bf16")] + [
            skipped("trackb trainer (trl SFTTrainer)", "skipped", reason, path="trl",
                    precision="auto")]}
        vllm = (skipped("vLLM offline LLM.generate", "not installed", "not installed: vllm")
                if importlib.util.find_spec("vllm") is None
                else skipped("vLLM offline LLM.generate", "skipped", reason))
        result["eval"] = {"settings": {"prompts": shape.prompts}, "rows": [
            skipped(n, "skipped", reason) for n in
            ("seed loop (one prompt, one answer at a time)", "batched HF generate (trackb eval)")]
            + [vllm]}
    else:
        result["train"] = run_training(shape, env, facts["params"], budget, lora)
        result["eval"] = run_eval(shape, env, budget)
    result["elapsed_seconds"] = round(budget.elapsed(), 1)
    return result


# -- output ----------------------------------------------------------------------------------

def _cell(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def _status(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return "ok"
    reason = row.get("reason", "")
    text = reason if reason.startswith(row["status"]) else f"{row['status']}: {reason}"
    return text.replace("|", "/")


def render_markdown(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for ``result`` (without the markers)."""
    env, train, evaluation = result["environment"], result["train"], result["eval"]
    ts, es = train["settings"], evaluation["settings"]
    lines = [
        f"### {result['shape']} on {env['device']}, {env['date']}",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda_build'] or 'none'}), transformers "
        f"{env['transformers']}, peft {env['peft']}, trl {env['trl'] or 'not installed'}, "
        f"vLLM {env['vllm'] or 'not installed'}; Python {env['python']}. "
        f"{result['model']['params']:,} parameters (random weights). Budget "
        f"{result['budget_seconds']:.0f} s, took {result['elapsed_seconds']:.0f} s.",
        "",
        f"**LoRA training**: r {ts['lora_r']}, alpha {ts['lora_alpha']}, "
        f"{len(ts['target_modules'])} projections; batch {ts['batch_size']} x grad-accum "
        f"{ts['grad_accum']}, sequences of {ts['seq_len']} tokens. MFU = 6 x params x "
        "tokens/s / dense peak (LoRA's real work is nearer 4N).",
        "",
        "| path | precision | tokens/s | vs plain loop | MFU | step (s) | peak memory (GiB) "
        "| status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in train["rows"]:
        lines.append(
            f"| {row.get('path', '')} | {row.get('precision', '')} | "
            f"{_cell(row.get('tokens_per_second'), '{:,.0f}')} | "
            f"{_cell(row.get('ratio_vs_plain_loop'), '{:.2f}x')} | "
            f"{_cell(row.get('mfu'), '{:.1%}')} | {_cell(row.get('step_seconds'))} | "
            f"{_cell(row.get('peak_memory_gib'))} | {_status(row)} |")
    lines += [
        "",
        f"**Eval generation**: {es['prompts']} random prompts"
        + (f" of {es['prompt_tokens'][0]}–{es['prompt_tokens'][1]} tokens, "
           f"{es['answers_per_prompt']} answers each (greedy + samples at T "
           f"{es['temperature']}), {es['new_tokens']} new tokens per answer, "
           f"{es['precision']}." if "new_tokens" in es else "."),
        "",
        "| mode | tokens/s | vs seed loop | seconds | calls | peak memory (GiB) | status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in evaluation["rows"]:
        calls = (f"{row['calls']}/{row['of_calls']}" if "calls" in row else "–")
        lines.append(
            f"| {row['name']} | {_cell(row.get('tokens_per_second'), '{:,.1f}')} | "
            f"{_cell(row.get('ratio_vs_seed_loop'), '{:.1f}x')} | "
            f"{_cell(row.get('seconds'))} | {calls} | {_cell(row.get('peak_memory_gib'))} | "
            f"{_status(row)} |")
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the gpu-bench markers in ``path`` with ``section``.

    A file without the markers gets them, with the section, appended; a missing file
    is created. Everything outside the markers is kept byte for byte.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{BEGIN_MARKER}\n{section.rstrip()}\n{END_MARKER}"
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if begin != -1 and end > begin:
        text = text[:begin] + block + text[end + len(END_MARKER):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_bench",
        description="LoRA training and eval-generation throughput at Qwen2.5-Coder-1.5B's "
                    "shape (random weights, nothing downloaded), inside a time budget.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-coder-1.5b")
    parser.add_argument("--budget-seconds", type=float, default=480.0,
                        help="wall-clock budget; parts that no longer fit are skipped with a note")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file whose gpu-bench section is rewritten (default: "
                             "BENCHMARKS.md at the repo root on a CUDA machine, none on CPU)")
    parser.add_argument("--vllm-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vllm-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_child:
        return vllm_child(args.vllm_child, args.vllm_result)
    if args.budget_seconds <= RESERVE_SECONDS:
        parser.error(f"--budget-seconds must be more than {RESERVE_SECONDS:.0f}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        importlib.import_module("torch")
        importlib.import_module("transformers")
    except ImportError as exc:
        # Without these nothing at all can be measured; peft, trl and vLLM are per-row.
        print(f"gpu-bench: error: {exc.name} is not installed; the benchmark needs torch and "
              "transformers (peft for training; trl and vllm optional)", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    result = run_benchmark(args.shape, args.budget_seconds, started)
    section = render_markdown(result)
    print(section)
    out = args.out
    if out is None and result["environment"]["cuda"]:
        out = ROOT / "BENCHMARKS.md"
    if out is not None:
        write_section(out, section)
        log(f"wrote the results section of {out}")
    else:
        log("not on CUDA: no markdown file written (name one with --out)")
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"])
        target.mkdir(parents=True, exist_ok=True)
        (target / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        # The GPU machine's checkout does not come back; its files under $OUT do.
        if out is not None:
            (target / Path(out).name).write_text(Path(out).read_text(encoding="utf-8"),
                                                 encoding="utf-8")
        log(f"wrote {target / JSON_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
