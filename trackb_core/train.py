"""The train stage: LoRA supervised fine-tuning with trl's SFTTrainer.

Recipe, top to bottom (:func:`run`): validate the config, decide the runtime from the
hardware (:func:`trackb_core.runtime.runtime_plan`, shared with eval: precision,
attention, padding) and the gradient accumulation from the effective batch and the
number of processes (:func:`grad_accum_for`), read and check the
dataset rows, turn each into a conversational prompt-completion example through
:func:`trackb_core.prompts.chat_example` (the same messages eval generates from), load
the base model and tokenizer (local folder, store URI or a hub id already in the local
cache), train a peft LoRA adapter with the loss on the completion only, then save
``adapter/`` (adapter + tokenizer), ``metrics.json``, ``loss_curve.png`` and, with
``--merge``, ``merged/`` (the base with the adapter folded in), and ``tensorboard/``.

Truthful training, in the details:

* Loss masks: trl tokenises prompt and prompt+completion with the chat template and
  labels the prompt -100. Examples longer than ``--max-length`` are dropped, not cut
  (``--overlong``), so every trained example ends with the end-of-turn token the model
  must learn to stop on; the manifest counts what was dropped.
* Runtime, decided once from device facts (:mod:`trackb_core.runtime`, unit-tested
  without hardware): CPU fp32; T4 (compute capability 7.5) fp16 autocast with a GradScaler;
  bf16 only where the GPU does it natively (cc >= 8; ``torch.cuda.is_bf16_supported()``
  says yes on a T4 too, through emulation). LoRA weights stay fp32, attention is SDPA,
  and there is no packing or padding-free batching unless FlashAttention's varlen
  kernels are there. Length-grouped batches keep padding low instead.
* Batches: ``--effective-batch`` examples per optimizer step however many processes
  run; the gradient accumulation is derived from it (and recorded in the manifest), so
  a DDP run takes the same optimizer steps as a single-GPU one.
* Data order: a pure function of the seed and the epoch (the length-grouped sampler has
  its own generator, :func:`seeded_length_sampler`), so a run resumed mid-epoch sees the
  batches an uninterrupted run sees and ends with the same adapter weights.
* Checkpoints: every ``--save-steps`` optimizer steps the trainer's checkpoint is
  uploaded to ``checkpoints/checkpoint-<step>/`` in the output store, marker file last;
  at most ``--save-total-limit`` are kept. ``--resume`` (the default) continues from the
  newest complete checkpoint made with the same config and inputs, after a kill or a
  preemption, to the planned number of steps; a run that finishes removes them unless
  ``--keep-checkpoints``.
* Several GPUs: ``torchrun --standalone --nproc-per-node=N -m jobs.train ...`` runs DDP
  (gloo on CPU); only rank 0 writes to the store.
* Tracking (:mod:`trackb_core.tracking`): TensorBoard event files always, in
  ``tensorboard/``; MLflow and Weights & Biases when the environment configures them,
  in a tracking run named after the trackb run id (``--run-name``).

Defaults are the seed's hyperparameters (r 16, alpha 32, dropout 0.05, the seven
projections, 3 epochs, lr 2e-4 cosine, batch 4 and effective batch 16: grad-accum 4 on
one process).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import ConfigError, InputError, MissingInputError, TrackbError
from trackb_core.prompts import chat_example
from trackb_core.runtime import device_facts, runtime_plan
from trackb_core.stage import StageRun, fingerprint, local_dir, say, stage_run
from trackb_core.store import Store
from trackb_core.tracking import TENSORBOARD, check_configured, run_name, training_callback

STAGE = "train"
SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINTS = "checkpoints"
# Written last into a stored checkpoint: a folder without it is a partial upload.
CHECKPOINT_MARKER = "trackb-checkpoint.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class TrainConfig(StageConfig):
    """LoRA-fine-tune a causal code LM on the dataset's train split (trl SFTTrainer + peft).

    Reads --dataset (train.jsonl, or the build-dataset folder holding it: rows with
    instruction and response) and --model (a local model folder, a store URI of one such
    as the tiny-model output, or a hub id already in the local Hugging Face cache; nothing
    is downloaded). The loss covers the response only; prompts come from the same function
    eval uses. Precision follows the hardware (CPU fp32, T4 fp16, bf16 where native).
    Checkpoints go to OUT/checkpoints/ every --save-steps steps; with --resume (default)
    a killed run continues from the newest one, with the same data order. Several GPUs:
    run it under `torchrun --standalone --nproc-per-node=N -m jobs.train`; the effective
    batch stays --effective-batch. Writes adapter/ (PEFT LoRA adapter + tokenizer files),
    metrics.json (loss per logged step, final loss, runtime, steps, examples, tokens,
    trainable parameters), loss_curve.png, tensorboard/ (TensorBoard event files) and,
    with --merge, merged/. MLflow (MLFLOW_TRACKING_URI) and Weights & Biases
    (WANDB_PROJECT with WANDB_API_KEY or WANDB_MODE=offline) log too when the
    environment configures them.
    """

    dataset: str | None = input_field(
        None, description="Training rows: train.jsonl or the build-dataset folder holding it",
        kind="file", filename="train.jsonl",
    )
    model: str = input_field(
        "Qwen/Qwen2.5-Coder-1.5B",
        description="Base model: a local folder, a store URI of one, or a hub id in the local cache",
        kind="model",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(SEED_TARGET_MODULES),
        description="Module names LoRA adapts (comma-separated)",
    )
    epochs: float = Field(3.0, gt=0, description="Training epochs")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers learning-rate schedule name")
    batch_size: int = Field(4, ge=1, description="Examples per device step")
    effective_batch: int = Field(
        16, ge=1, description="Examples per optimizer step over all processes; gradient "
        "accumulation = effective_batch / (batch_size x processes), which must be whole")
    max_length: int = Field(1024, ge=16, description="Longest tokenised example (prompt + response)")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="Examples longer than max_length: drop (every trained example "
        "keeps its end-of-turn token) or truncate (cut at the end; the model may never see "
        "the response end)")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up the learning rate")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="Training precision; auto = bf16 on GPUs that support it natively "
        "(compute capability 8+), fp16 autocast on older ones (T4), fp32 on CPU",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together, so padding wastes "
        "little compute")
    logging_steps: int = Field(1, ge=1, description="Log the training loss every N optimizer steps")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long examples")
    save_steps: int = Field(
        50, ge=0, description="Upload a checkpoint to OUT/checkpoints/ every N optimizer "
        "steps (0: no checkpoints)")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept in the store (the newest)")
    resume: bool = Field(
        True, description="Continue from the newest stored checkpoint of the same config and "
        "inputs, if there is one (--no-resume starts over and removes old checkpoints)")
    keep_checkpoints: bool = Field(
        False, description="Keep OUT/checkpoints/ after a finished run (else removed then)")
    merge: bool = Field(False, description="Also save merged/: the base model with the adapter "
                        "folded in")
    run_name: str | None = Field(
        None, description="Name of the tracking run (TensorBoard, MLflow, W&B); default "
        "$TRACKB_RUN_ID, else the output URI (run-all sets the run id)")

    @model_validator(mode="before")
    @classmethod
    def _grad_accum_is_derived(cls, data: Any) -> Any:
        # The old knob: a fixed grad_accum made the effective batch grow with the GPUs.
        if isinstance(data, dict) and "grad_accum" in data:
            raise ValueError("grad_accum is derived now: set effective_batch, the examples "
                             "per optimizer step (batch_size x grad_accum x processes), e.g. "
                             "effective_batch: 16 for batch_size 4 x grad_accum 4")
        return data


class LossDivergedError(TrackbError):
    """The training loss became NaN or infinite."""


# -- processes ------------------------------------------------------------------------------

def grad_accum_for(effective_batch: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that give ``effective_batch`` examples per optimizer
    step with ``batch_size`` examples per process and ``world_size`` processes.

    Raises ConfigError if ``batch_size x world_size`` does not divide ``effective_batch``.
    """
    per_pass = batch_size * world_size
    if effective_batch % per_pass:
        raise ConfigError(
            f"--effective-batch {effective_batch} is not a multiple of --batch-size "
            f"{batch_size} x {world_size} process(es) = {per_pass}: choose a batch size that "
            f"times {world_size} divides {effective_batch}")
    return effective_batch // per_pass


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Ranks:
        env = os.environ if environ is None else environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _process_state(plan: dict[str, Any], ranks: Ranks):
    """accelerate's process group for a multi-process launch (None for one process)."""
    if ranks.world_size == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=plan["device"] == "cpu")


def _from_main(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (also a barrier)."""
    if ranks.world_size == 1:
        return value
    import torch.distributed

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _local_main_first(state) -> Any:
    return state.local_main_process_first() if state is not None else nullcontext()


# -- checkpoints in the store ----------------------------------------------------------------

def stored_checkpoints(out: Store) -> dict[int, dict[str, Any] | None]:
    """Every checkpoint under ``out/checkpoints/``: step -> its marker (None while partial)."""
    found: dict[int, dict[str, Any] | None] = {}
    for key in out.list(CHECKPOINTS):
        parts = key.split("/")
        match = CHECKPOINT_NAME.fullmatch(parts[1]) if len(parts) > 2 else None
        if not match:
            continue
        step = int(match.group(1))
        found.setdefault(step, None)
        if parts[2:] == [CHECKPOINT_MARKER]:
            try:
                found[step] = json.loads(out.get_bytes(key))
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # a damaged marker: treated as a partial upload
    return found


def latest_checkpoint(out: Store, run_fingerprint: str) -> int | None:
    """The newest complete stored checkpoint made with ``run_fingerprint``, or None."""
    steps = [step for step, marker in stored_checkpoints(out).items()
             if marker and marker.get("fingerprint") == run_fingerprint]
    return max(steps, default=None)


def upload_checkpoint(out: Store, folder: Path, step: int, run_fingerprint: str,
                      keep: int) -> None:
    """Copy the trainer's checkpoint ``folder`` to ``checkpoints/checkpoint-<step>/``,
    marker last, then keep only the ``keep`` newest complete ones (and no partial
    uploads older than the newest). Raises StoreError."""
    key = f"{CHECKPOINTS}/checkpoint-{step}"
    out.delete(key)
    out.put_dir(key, folder)
    marker = {"step": step, "fingerprint": run_fingerprint,
              "files": sum(1 for p in folder.rglob("*") if p.is_file())}
    out.put_text(f"{key}/{CHECKPOINT_MARKER}", json.dumps(marker, sort_keys=True))
    stored = stored_checkpoints(out)
    complete = sorted((s for s, m in stored.items() if m), reverse=True)
    for old, marker in stored.items():
        if (marker and old not in complete[:keep]) or (not marker and old < step):
            out.delete(f"{CHECKPOINTS}/checkpoint-{old}")


def download_checkpoint(out: Store, step: int, target: Path) -> Path:
    """The stored checkpoint of ``step`` as a local folder the trainer can resume from.

    Raises MissingInputError if it is not stored.
    """
    folder = target / f"checkpoint-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    return out.get_dir(f"{CHECKPOINTS}/checkpoint-{step}", folder)


def looks_like_path(model: str) -> bool:
    """True if ``model`` names a folder or store URI rather than a hub id ("org/name")."""
    if "://" in model or model.startswith(("/", ".", "~")) or Path(model).exists():
        return True
    return model.count("/") != 1


def check_model_source(model: str) -> None:
    """Fail fast on a model folder that is not there.

    A missing path is otherwise taken for a hub id. Raises MissingInputError.
    """
    if "://" in model:
        return  # a store URI: resolved (and checked) by the stage's input hashing
    path = Path(model).expanduser()
    if looks_like_path(model) and not path.is_dir():
        raise MissingInputError(f"--model: no such model folder: {model}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise MissingInputError(f"--model: {model} is not a model folder (no config.json)")


def examples_from_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Conversational prompt-completion examples, one per row, built by ``chat_example``.

    Raises InputError if there are no rows or a row lacks a non-empty instruction or
    response string.
    """
    if not rows:
        raise InputError(f"dataset {where} has no rows")
    examples = []
    for number, row in enumerate(rows, 1):
        for key in ("instruction", "response"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"dataset {where}: row {number} (id {row.get('id', '?')}) "
                                 f"has no {key!r} text")
        examples.append(chat_example(row["instruction"], row["response"]))
    return examples


def load_tokenizer(model_path: str):
    """The base model's tokenizer, padded on the right for training.

    Raises MissingInputError if it cannot be loaded offline.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except OSError as exc:
        raise MissingInputError(f"--model: cannot load a tokenizer from {model_path} "
                                f"(a hub id must already be in the local cache): "
                                f"{str(exc).splitlines()[0]}") from exc
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise InputError(f"--model: the tokenizer of {model_path} has no chat template")
    return tokenizer


def load_model(model_path: str, plan: dict[str, Any]):
    """The base causal LM in the plan's base dtype and attention implementation.

    Raises MissingInputError if it cannot be loaded offline.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, plan["base_dtype"]),
            attn_implementation=plan["attention"], local_files_only=True,
        )
    except OSError as exc:
        raise MissingInputError(f"--model: cannot load a model from {model_path} "
                                f"(a hub id must already be in the local cache): "
                                f"{str(exc).splitlines()[0]}") from exc


def fit_to_max_length(dataset, max_length: int, overlong: str):
    """trl's tokenised ``dataset`` with examples over ``max_length`` tokens dropped or cut.

    Returns ``(dataset, report)``; ``report`` counts ``examples_too_long`` and
    ``examples_dropped_fully_masked`` (cut examples left without a trained token).
    """
    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = sum(1 for n in lengths if n > max_length)
    if overlong == "drop":
        fitted = dataset.filter(lambda example: len(example["input_ids"]) <= max_length)
        masked = 0
    else:
        cut = dataset.map(lambda example: {"input_ids": example["input_ids"][:max_length],
                                           "labels": example["labels"][:max_length]})
        fitted = cut.filter(lambda example: any(t != -100 for t in example["labels"]))
        masked = len(cut) - len(fitted)
    return fitted, {"examples_too_long": too_long, "examples_dropped_fully_masked": masked,
                    "overlong": overlong, "max_length": max_length}


def seeded_length_sampler(lengths: list[int], batch_size: int, seed: int):
    """transformers' LengthGroupedSampler with an order that is a pure function of
    ``seed`` and the epoch (``set_epoch``).

    transformers builds it without a generator, so it shuffles from the global torch RNG
    at the start of each epoch; a run resumed mid-epoch draws from a different RNG state
    than the uninterrupted run did (the checkpoint's RNG state is restored only after the
    dataloader has started) and trains on other batches.
    """
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(seed + self.epoch)
            return super().__iter__()

    return SeededLengthGroupedSampler(batch_size, lengths=list(lengths))


def build_trainer(config: TrainConfig, examples: list[dict[str, Any]], model_path: str,
                  output_dir: str, plan: dict[str, Any] | str = "fp32",
                  callbacks: list[Any] | tuple[Any, ...] = (), world_size: int | None = None):
    """An SFTTrainer ready to train a LoRA adapter on ``examples``.

    ``plan`` is a :func:`~trackb_core.runtime.runtime_plan` (or a precision name,
    planned for this machine); ``world_size`` the number of processes (default: from
    the torchrun environment), which with the batch size sets the gradient accumulation
    (:func:`grad_accum_for`). Its ``train_dataset`` is trl's own tokenisation
    (``input_ids`` and ``labels`` with -100 on prompt tokens) after
    :func:`fit_to_max_length`, whose report is ``trainer.trackb_fit``. Raises
    MissingInputError if the model cannot be loaded, ConfigError if LoRA finds none of
    the target modules, the plan needs hardware that is not here or the effective batch
    does not divide, InputError if no example fits ``max_length``.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTConfig, SFTTrainer

    if isinstance(plan, str):
        plan = runtime_plan(plan, device_facts())
    if world_size is None:
        world_size = Ranks.from_environ().world_size
    grad_accum = grad_accum_for(config.effective_batch, config.batch_size, world_size)

    class SeededOrderTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                sampler = seeded_length_sampler(sampler.lengths, sampler.batch_size,
                                                config.seed)
            self.trackb_sampler = sampler
            return sampler

    class EpochToSampler(TrainerCallback):
        # The Trainer's set_epoch reaches the sampler through some of accelerate's
        # dataloader wrappers, not all (a skipping one under DDP): tell it here too.
        def on_epoch_begin(self, args, state, control, **kwargs):
            sampler = getattr(trainer, "trackb_sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(math.floor(state.epoch or 0))

    class StopOnNonFiniteLoss(TrainerCallback):
        # fp16 Qwen2 can overflow; stop at the first bad loss instead of saving garbage.
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise LossDivergedError(
                    f"training loss became {loss} at step {state.global_step}; lower "
                    "--learning-rate or use --precision bf16/fp32"
                )

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, plan)
    checkpointing = config.save_steps > 0
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=grad_accum,
        # Length is handled after tokenising (fit_to_max_length): trl would cut silently.
        max_length=None,
        warmup_steps=config.warmup_ratio,  # a value below 1 is a ratio in transformers 5
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        # transformers 5 renamed gradient_checkpointing; trl's default for the old name is True
        activation_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing=None,
        use_cpu=plan["device"] == "cpu",
        dataloader_pin_memory=plan["device"] == "cuda",
        fp16=plan["autocast"] == "float16",
        bf16=plan["autocast"] == "bfloat16",
        completion_only_loss=True,
        packing=plan["packing"],
        padding_free=plan["padding_free"],
        # transformers 5's spelling of group_by_length: LengthGroupedSampler over the
        # batches of one optimizer step (batch_size x grad_accum), sorted within shuffled
        # mega-batches; SeededOrderTrainer gives it a generator of its own.
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # Every LoRA weight takes part in every forward: no unused-parameter search.
        ddp_find_unused_parameters=False,
        save_strategy="steps" if checkpointing else "no",
        save_steps=config.save_steps if checkpointing else 500,
        save_total_limit=config.save_total_limit,
        # Tracking is trackb_core.tracking's callback: one run identity for train and eval.
        report_to="none",
        disable_tqdm=False,
    )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        trainer = SeededOrderTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StopOnNonFiniteLoss(), EpochToSampler(), *callbacks],
        )
    except ValueError as exc:
        if "target modules" in str(exc).lower():
            raise ConfigError(f"--target-modules: {str(exc).splitlines()[0]}") from exc
        raise
    # peft upcasts adapters of a half-precision base; make sure, as fp16 weights would
    # make the GradScaler fail ("Attempting to unscale FP16 gradients").
    for parameter in trainer.model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    trainer.train_dataset, trainer.trackb_fit = fit_to_max_length(
        trainer.train_dataset, config.max_length, config.overlong)
    if len(trainer.train_dataset) == 0:
        raise InputError(f"no example fits --max-length {config.max_length} tokens "
                         f"({trainer.trackb_fit['examples_too_long']} longer); raise it or "
                         "use --overlong truncate")
    return trainer


def token_stats(trainer, n_examples: int) -> dict[str, int]:
    """Counts of the tokens trl will train on, from its own tokenised dataset."""
    dataset = trainer.train_dataset
    trained = sum(sum(1 for t in labels if t != -100) for labels in dataset["labels"])
    total = sum(len(ids) for ids in dataset["input_ids"])
    fit = getattr(trainer, "trackb_fit", {})
    return {
        "examples_in": n_examples,
        "examples_trained": len(dataset),
        "examples_too_long": fit.get("examples_too_long", 0),
        "examples_dropped": n_examples - len(dataset),
        "examples_dropped_fully_masked": fit.get("examples_dropped_fully_masked", 0),
        "tokens_total": total,
        "tokens_trained": trained,
    }


def checkpoint_uploader(out: Store, run_fingerprint: str, keep: int):
    """A TrainerCallback copying each checkpoint the trainer saves to the store (rank 0)."""
    from transformers import TrainerCallback

    class UploadCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                step = state.global_step
                upload_checkpoint(out, Path(args.output_dir) / f"checkpoint-{step}", step,
                                  run_fingerprint, keep)
                say(STAGE, f"checkpoint {step} -> {out.uri}/{CHECKPOINTS}/checkpoint-{step}")

    return UploadCheckpoint()


def loss_curve_png(losses: list[dict[str, float]], title: str) -> bytes:
    """A PNG line plot of the logged training loss per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p["step"] for p in losses], [p["loss"] for p in losses], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    # No software/date metadata: the same curve gives the same bytes.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def run(config: TrainConfig, out: Store) -> dict:
    """Run the train stage into ``out`` (under torchrun: every rank calls it; rank 0 writes).

    Raises ConfigError (no --dataset, bad precision or target modules, an effective
    batch the processes cannot split, a tracking backend configured but not installed),
    MissingInputError (dataset or model not found), InputError (empty dataset, a row
    without instruction/response, a tokenizer without chat template, nothing fits
    --max-length), LossDivergedError (NaN/inf loss), StoreError (``out`` not writable).
    """
    if not config.dataset:
        raise ConfigError("--dataset is required (train.jsonl or the build-dataset folder)")
    check_model_source(config.model)
    plan = runtime_plan(config.precision, device_facts())
    ranks = Ranks.from_environ()
    grad_accum_for(config.effective_batch, config.batch_size, ranks.world_size)
    check_configured()
    if ranks.is_main:
        with stage_run(STAGE, config, out) as run:
            _train(run, config, out, plan, ranks)
        if not config.keep_checkpoints:
            # Only now: a kill before the manifest is written can still resume.
            out.delete(CHECKPOINTS)
        return run.manifest
    started = time.time()
    _train(StageRun(STAGE, config, out), config, out, plan, ranks)
    return {"stage": STAGE, "rank": ranks.rank,
            "timings": {"total_seconds": round(time.time() - started, 3)}}


@contextmanager
def _workdir(ranks: Ranks) -> Iterator[Path]:
    """The trainer's local folder: rank 0 names it, every rank of a node shares it."""
    made = tempfile.mkdtemp(prefix="trackb-train-") if ranks.is_main else None
    path = Path(_from_main(made, ranks))
    path.mkdir(parents=True, exist_ok=True)  # on other nodes
    try:
        yield path
    finally:
        if ranks.local_rank == 0:
            shutil.rmtree(path, ignore_errors=True)


def _resume_point(out: Store, config: TrainConfig, run_fingerprint: str) -> int:
    """The stored step to resume from (0: start over, removing stale checkpoints)."""
    if config.resume:
        step = latest_checkpoint(out, run_fingerprint)
        if step is not None:
            return step
        if out.list(CHECKPOINTS):
            say(STAGE, "no stored checkpoint matches this config and these inputs; "
                       "starting over")
    out.delete(CHECKPOINTS)
    return 0


def _train(run: StageRun, config: TrainConfig, out: Store, plan: dict[str, Any],
           ranks: Ranks) -> None:
    state = _process_state(plan, ranks)
    examples = examples_from_rows(run.read_jsonl("dataset"), config.dataset)
    with _local_main_first(state):  # one download of a store model per node
        model_path = (str(local_dir(config.model)) if looks_like_path(config.model)
                      else config.model)
    run_fingerprint = fingerprint(config, run.inputs) if ranks.is_main else ""
    resume_step = _from_main(_resume_point(out, config, run_fingerprint)
                             if ranks.is_main else None, ranks)
    if ranks.is_main:
        say(STAGE, f"{len(examples)} examples, base model {config.model}, {plan['reason']}, "
                   f"{ranks.world_size} process(es)")

    with _workdir(ranks) as work:
        callbacks: list[Any] = []
        if ranks.is_main:
            if config.save_steps:
                callbacks.append(checkpoint_uploader(out, run_fingerprint,
                                                     config.save_total_limit))
            tracking = training_callback(
                run_name(config.run_name, out.uri), tensorboard_dir=work / TENSORBOARD,
                params={f"train.{k}": v for k, v in config.model_dump(mode="json").items()})
            callbacks.append(tracking)
        with run.timed("setup"):
            trainer = build_trainer(config, examples, model_path, str(work / "trainer"), plan,
                                    callbacks, ranks.world_size)
        stats = token_stats(trainer, len(examples))
        trainable, total_params = trainer.model.get_nb_trainable_parameters()
        stats.update(trainable_params=int(trainable), total_params=int(total_params))
        resume_from = None
        if resume_step:
            resume_from = download_checkpoint(out, resume_step, work / f"resume-{ranks.rank}")
        if ranks.is_main:
            say(STAGE, f"{stats['tokens_trained']:,} of {stats['tokens_total']:,} tokens "
                       f"trained; {stats['examples_too_long']} of {len(examples)} examples "
                       f"over {config.max_length} tokens ({config.overlong}); "
                       f"{trainable:,} trainable of {total_params:,} parameters")
            if resume_step:
                say(STAGE, f"resuming from stored checkpoint {resume_step}")

        with run.timed("train"):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from
                                   else None)
        if not ranks.is_main:
            return
        _save_outputs(run, config, trainer, result, work, plan, stats, ranks, resume_step)
        if (work / TENSORBOARD).is_dir():
            run.write_dir(TENSORBOARD, work / TENSORBOARD)
        if tracking.tracker is not None:
            run.extra["tracking"] = tracking.tracker.describe()


def _save_outputs(run: StageRun, config: TrainConfig, trainer, result, work: Path,
                  plan: dict[str, Any], stats: dict[str, int], ranks: Ranks,
                  resume_step: int) -> None:
    losses = [
        {"step": entry["step"], "loss": round(float(entry["loss"]), 6),
         "learning_rate": float(entry.get("learning_rate", 0.0))}
        for entry in trainer.state.log_history if "loss" in entry
    ]
    model = trainer.model
    # Record the base as the user named it, not a temporary download path.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = config.model
    adapter_dir = work / "adapter"
    model.save_pretrained(adapter_dir)
    trainer.processing_class.save_pretrained(adapter_dir)
    run.write_dir("adapter", adapter_dir)
    if config.merge:
        merged_dir = work / "merged"
        model.merge_and_unload().save_pretrained(merged_dir)
        trainer.processing_class.save_pretrained(merged_dir)
        run.write_dir("merged", merged_dir)

    metrics = {
        "train_loss": losses,
        "final_loss": losses[-1]["loss"] if losses else None,
        "first_loss": losses[0]["loss"] if losses else None,
        "mean_train_loss": round(float(result.training_loss), 6),
        "runtime_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
        "steps": int(trainer.state.global_step),
        "steps_planned": int(trainer.state.max_steps),
        "resumed_from_step": resume_step,
        "epochs": config.epochs,
        "examples": len(trainer.train_dataset),
        "precision": plan["precision"],
        "world_size": ranks.world_size,
        "batch_size": config.batch_size,
        "grad_accum": int(trainer.args.gradient_accumulation_steps),
        "effective_batch": config.batch_size * int(trainer.args.gradient_accumulation_steps)
        * ranks.world_size,
        **stats,
    }
    run.write_json("metrics.json", metrics)
    run.write_bytes("loss_curve.png", loss_curve_png(
        losses, f"LoRA SFT on {len(trainer.train_dataset)} examples ({config.epochs:g} epochs)"))
    run.counts.update({
        "examples": len(trainer.train_dataset),
        "examples_too_long": stats["examples_too_long"],
        "steps": metrics["steps"],
        "trainable_params": stats["trainable_params"],
        "loss_first": metrics["first_loss"],
        "loss_final": metrics["final_loss"],
    })
    run.extra["runtime"] = {**plan, "world_size": ranks.world_size}
    # As resolved for this run: the accumulation depends on the number of processes.
    run.extra["batch"] = {key: metrics[key] for key in
                          ("batch_size", "grad_accum", "world_size", "effective_batch")}
    run.extra["resumed_from_step"] = resume_step
    say(STAGE, f"{metrics['steps']} steps in {metrics['runtime_seconds']} s: loss "
               f"{metrics['first_loss']} -> {metrics['final_loss']}")
