"""The train stage: LoRA supervised fine-tuning with trl's SFTTrainer.

Recipe, top to bottom: validate the config, read and check the dataset rows, turn each
into a conversational prompt-completion example through
:func:`trackb_core.prompts.chat_example` (the same messages eval generates from), load
the base model and tokenizer (local folder, store URI or a hub id already in the local
cache), train a peft LoRA adapter with the loss on the completion only, then save
``adapter/`` (adapter + tokenizer), ``metrics.json`` and ``loss_curve.png``.

Defaults are the seed's hyperparameters (r 16, alpha 32, dropout 0.05, the seven
projections, 3 epochs, lr 2e-4 cosine, batch 4 x grad-accum 4). The CPU path and the
GPU path are one code path; only ``precision`` differs (auto: fp32 on CPU, bf16 where
CUDA supports it, fp16 on older cards such as the T4).
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import ConfigError, InputError, MissingInputError, TrackbError
from trackb_core.prompts import chat_example
from trackb_core.stage import say, stage_run
from trackb_core.store import Store

STAGE = "train"
SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(StageConfig):
    """LoRA-fine-tune a causal code LM on the dataset's train split (trl SFTTrainer + peft).

    Reads --dataset (train.jsonl, or the build-dataset folder holding it: rows with
    instruction and response) and --model (a local model folder, a store URI of one such
    as the tiny-model output, or a hub id already in the local Hugging Face cache; nothing
    is downloaded). The loss covers the response only; prompts come from the same function
    eval uses. Writes adapter/ (PEFT LoRA adapter + tokenizer files), metrics.json
    (loss per logged step, final loss, runtime, steps, examples, trainable parameters) and
    loss_curve.png.
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
    grad_accum: int = Field(4, ge=1, description="Gradient accumulation steps (effective batch = batch_size x grad_accum)")
    max_length: int = Field(1024, ge=16, description="Longest tokenised example; longer ones are cut at the end")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up the learning rate")
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="Training precision; auto = bf16 on CUDA that supports it, fp16 on "
        "other CUDA (T4), fp32 on CPU",
    )
    logging_steps: int = Field(1, ge=1, description="Log the training loss every N optimizer steps")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long examples")


class LossDivergedError(TrackbError):
    """The training loss became NaN or infinite."""


def resolve_precision(precision: str) -> str:
    """The concrete precision for ``precision`` on this machine ("fp16", "bf16" or "fp32").

    Raises ConfigError when fp16/bf16 is asked for without a CUDA GPU that supports it.
    """
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a CUDA GPU; use fp32 or auto on CPU")
    if precision == "bf16" and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("--precision bf16 needs a CUDA GPU with bf16 support (not a T4); "
                          "use fp16 or auto")
    return precision


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


def load_model(model_path: str, precision: str):
    """The base causal LM in the dtype ``precision`` implies, with SDPA attention.

    Raises MissingInputError if it cannot be loaded offline.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except OSError as exc:
        raise MissingInputError(f"--model: cannot load a model from {model_path} "
                                f"(a hub id must already be in the local cache): "
                                f"{str(exc).splitlines()[0]}") from exc


def build_trainer(config: TrainConfig, examples: list[dict[str, Any]], model_path: str,
                  output_dir: str, precision: str = "fp32"):
    """An SFTTrainer ready to train a LoRA adapter on ``examples``.

    Its ``train_dataset`` is trl's own tokenisation (``input_ids`` and ``labels`` with
    -100 on prompt tokens), which the tests inspect. Raises MissingInputError if the
    model cannot be loaded, ConfigError if LoRA finds none of the target modules.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

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
    model = load_model(model_path, precision)
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length,
        warmup_steps=config.warmup_ratio,  # a value below 1 is a ratio in transformers 5
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        # transformers 5 renamed gradient_checkpointing; trl's default for the old name is True
        activation_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing=None,
        dataloader_pin_memory=torch.cuda.is_available(),
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        completion_only_loss=True,
        packing=False,
        report_to="none",
        save_strategy="no",
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
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[StopOnNonFiniteLoss()],
        )
    except ValueError as exc:
        if "target modules" in str(exc).lower():
            raise ConfigError(f"--target-modules: {str(exc).splitlines()[0]}") from exc
        raise


def token_stats(trainer, n_examples: int) -> dict[str, int]:
    """Counts of the tokens trl will train on, from its own tokenised dataset."""
    dataset = trainer.train_dataset
    trained = sum(sum(1 for t in labels if t != -100) for labels in dataset["labels"])
    total = sum(len(ids) for ids in dataset["input_ids"])
    return {
        "examples_in": n_examples,
        "examples_trained": len(dataset),
        "examples_dropped_fully_masked": n_examples - len(dataset),
        "tokens_total": total,
        "tokens_trained": trained,
    }


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
    """Run the train stage into ``out``.

    Raises ConfigError (no --dataset, bad precision or target modules),
    MissingInputError (dataset or model not found), InputError (empty dataset, a row
    without instruction/response, a tokenizer without chat template),
    LossDivergedError (NaN/inf loss), StoreError (``out`` not writable).
    """
    if not config.dataset:
        raise ConfigError("--dataset is required (train.jsonl or the build-dataset folder)")
    check_model_source(config.model)
    precision = resolve_precision(config.precision)

    with stage_run(STAGE, config, out) as run:
        examples = examples_from_rows(run.read_jsonl("dataset"), config.dataset)
        model_path = str(run.local_dir("model")) if looks_like_path(config.model) else config.model
        say(STAGE, f"{len(examples)} examples, base model {config.model}, precision {precision}")

        with tempfile.TemporaryDirectory(prefix="trackb-train-") as tmp:
            with run.timed("setup"):
                trainer = build_trainer(config, examples, model_path, f"{tmp}/trainer", precision)
            stats = token_stats(trainer, len(examples))
            trainable, total_params = trainer.model.get_nb_trainable_parameters()
            say(STAGE, f"{stats['tokens_trained']:,} of {stats['tokens_total']:,} tokens trained; "
                       f"{trainable:,} trainable of {total_params:,} parameters")

            with run.timed("train"):
                result = trainer.train()

            losses = [
                {"step": entry["step"], "loss": round(float(entry["loss"]), 6),
                 "learning_rate": float(entry.get("learning_rate", 0.0))}
                for entry in trainer.state.log_history if "loss" in entry
            ]
            adapter_dir = Path(tmp) / "adapter"
            # Record the base as the user named it, not a temporary download path.
            for peft_config in trainer.model.peft_config.values():
                peft_config.base_model_name_or_path = config.model
            trainer.model.save_pretrained(adapter_dir)
            trainer.processing_class.save_pretrained(adapter_dir)
            run.write_dir("adapter", adapter_dir)

        metrics = {
            "train_loss": losses,
            "final_loss": losses[-1]["loss"] if losses else None,
            "first_loss": losses[0]["loss"] if losses else None,
            "mean_train_loss": round(float(result.training_loss), 6),
            "runtime_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
            "steps": int(trainer.state.global_step),
            "epochs": config.epochs,
            "examples": len(examples),
            "trainable_params": int(trainable),
            "total_params": int(total_params),
            "precision": precision,
            **stats,
        }
        run.write_json("metrics.json", metrics)
        run.write_bytes("loss_curve.png", loss_curve_png(
            losses, f"LoRA SFT on {len(examples)} examples ({config.epochs:g} epochs)"))
        run.counts.update({
            "examples": len(examples),
            "steps": metrics["steps"],
            "trainable_params": metrics["trainable_params"],
            "loss_first": metrics["first_loss"],
            "loss_final": metrics["final_loss"],
        })
        say(STAGE, f"{metrics['steps']} steps in {metrics['runtime_seconds']} s: loss "
                   f"{metrics['first_loss']} -> {metrics['final_loss']}")
    return run.manifest
