"""The train stage: loss on the completion only, prompts identical to eval's, the effective
batch across process counts, a data order that survives resuming, checkpoints in the store
and resuming from them, DDP, TensorBoard logs, real artifacts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trackb_core import train
from trackb_core.config import build_config
from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.prompts import chat_example, render_prompt
from trackb_core.runtime import runtime_plan
from trackb_core.store import LocalStore, open_store
from trackb_core.train import (
    CHECKPOINT_MARKER,
    LossDivergedError,
    Ranks,
    TrainConfig,
    build_trainer,
    examples_from_rows,
    grad_accum_for,
    latest_checkpoint,
    run,
    stored_checkpoints,
    upload_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
# Tracking configured in a developer's shell must not reach these runs (tests/test_tracking.py
# sets it up on purpose).
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_MODE",
                "TRACKB_RUN_ID")


@pytest.fixture(autouse=True)
def _no_tracking_from_the_shell(monkeypatch):
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)

FUNCTION = '''def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value'''


def make_rows(n: int) -> list[dict]:
    """Small rows shaped like build-dataset's: a function in the prompt, varied responses."""
    rows = []
    for i in range(n):
        source = FUNCTION.replace("clamp", f"clamp_{i}")
        if i % 2:
            instruction = f"Explain the Python function `clamp_{i}` below.\n\n```python\n{source}\n```"
            response = (f"**Purpose**: `clamp_{i}` limits a value to a range.\n\n"
                        "**Parameters**: `value`, `low`, `high`.\n\n**Returns**: the clamped value.")
        else:
            instruction = (f"Complete the Python function `clamp_{i}` below.\n\n"
                           f"```python\ndef clamp_{i}(value, low, high):\n```")
            response = f"```python\n{source}\n```"
        rows.append({"id": f"f{i}", "category": "explain" if i % 2 else "complete",
                     "instruction": instruction, "response": response})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trainer_and_rows(tiny_model_dir, tmp_path_factory):
    rows = make_rows(6)
    config = TrainConfig(dataset="unused", model=str(tiny_model_dir))
    examples = examples_from_rows(rows, "test rows")
    out = tmp_path_factory.mktemp("trainer")
    trainer = build_trainer(config, examples, str(tiny_model_dir), str(out))
    return trainer, rows


def _prompt_len(labels: list[int]) -> int:
    return next(i for i, t in enumerate(labels) if t != -100)


def test_loss_mask_covers_completion_only(trainer_and_rows):
    trainer, rows = trainer_and_rows
    tokenizer = trainer.processing_class
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    dataset = trainer.train_dataset
    assert len(dataset) == len(rows)  # nothing dropped as fully masked
    by_prompt = {}
    for row in rows:
        ids = tokenizer(render_prompt(tokenizer, row["instruction"]), add_special_tokens=False)
        by_prompt[tuple(ids["input_ids"])] = row
    for example in dataset:
        ids, labels = example["input_ids"], example["labels"]
        start = _prompt_len(labels)
        row = by_prompt[tuple(ids[:start])]
        # every prompt token is masked, every completion token is trained
        assert all(t == -100 for t in labels[:start])
        assert labels[start:] == ids[start:]
        trained = ids[start:]
        assert len(trained) >= 1
        assert im_end in trained  # the model learns to stop
        text = tokenizer.decode(trained)
        assert text.startswith(row["response"])
        assert text.rstrip("\n").endswith("<|im_end|>")


def test_collator_keeps_the_mask_and_pads_with_ignore(trainer_and_rows):
    trainer, _ = trainer_and_rows
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels, input_ids = batch["labels"], batch["input_ids"]
    prompt_tokens = 0
    for i in range(4):
        example = trainer.train_dataset[i]
        n = len(example["input_ids"])
        assert labels[i, :n].tolist() == example["labels"]
        assert (labels[i, n:] == -100).all()  # padding never trained
        assert input_ids[i, :n].tolist() == example["input_ids"]  # right padding
        prompt_tokens += _prompt_len(example["labels"])
    assert (labels == -100).sum().item() >= prompt_tokens > 0


def test_prompt_tokens_equal_eval_prompt(trainer_and_rows):
    trainer, rows = trainer_and_rows
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        eval_ids = tokenizer(render_prompt(tokenizer, row["instruction"]),
                             add_special_tokens=False)["input_ids"]
        assert example["input_ids"][: _prompt_len(example["labels"])] == eval_ids


def test_examples_are_built_by_chat_example():
    rows = make_rows(2)
    assert examples_from_rows(rows, "x") == [
        chat_example(r["instruction"], r["response"]) for r in rows
    ]


def test_one_epoch_run_writes_loadable_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    out = tmp_path / "train"
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=1.0,
                         batch_size=4, effective_batch=4, learning_rate=2e-3)
    manifest = run(config, open_store(str(out)))

    assert (out / "manifest.json").is_file()
    assert manifest["inputs"]["dataset"]["file"] == "train.jsonl"
    assert manifest["counts"]["examples"] == 20
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "adapter/tokenizer.json", "metrics.json", "loss_curve.png"} <= set(manifest["outputs"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 == len(metrics["train_loss"])
    assert metrics["examples"] == 20
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert all(p["loss"] > 0 for p in metrics["train_loss"])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert adapter_config["r"] == 16 and set(adapter_config["target_modules"]) == set(
        config.target_modules)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter", local_files_only=True)
    ids = tokenizer(render_prompt(tokenizer, "hi"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        tuned_logits = tuned(**ids).logits
        with tuned.disable_adapter():
            base_logits = tuned(**ids).logits
    assert not torch.allclose(tuned_logits, base_logits)  # the adapter learned something

    # TensorBoard: the same loss curve, read back from the stored event files.
    assert any(key.startswith("tensorboard/events.out.tfevents.") for key in manifest["outputs"])
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [p["step"] for p in metrics["train_loss"]]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx(
        [p["loss"] for p in metrics["train_loss"]], abs=1e-5)
    assert [step for step, _ in scalars["train/learning_rate"]] == [1, 2, 3, 4, 5]
    assert "train/mean_loss" in scalars  # transformers' run mean, off the loss curve
    assert manifest["tracking"] == {"run_name": open_store(str(out)).uri,
                                    "tensorboard": {"logdir": "tensorboard"}}


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``logdir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_missing_model_folder_is_a_missing_input(tmp_path):
    dataset = write_jsonl(tmp_path / "train.jsonl", make_rows(2))
    config = TrainConfig(dataset=dataset, model=str(tmp_path / "no-such-model"))
    with pytest.raises(MissingInputError, match="no such model folder"):
        run(config, open_store(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_dataset_is_a_missing_input(tiny_model_dir, tmp_path):
    config = TrainConfig(dataset=str(tmp_path / "nothing" / "train.jsonl"), model=str(tiny_model_dir))
    with pytest.raises(MissingInputError, match="--dataset"):
        run(config, open_store(str(tmp_path / "out")))


def test_no_dataset_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--dataset is required"):
        run(TrainConfig(model=str(tiny_model_dir)), open_store(str(tmp_path / "out")))


@pytest.mark.parametrize("rows, message", [
    ([], "has no rows"),
    ([{"id": "a", "instruction": "do it"}], "row 1 .*'response'"),
    ([{"id": "a", "instruction": " ", "response": "x"}], "row 1 .*'instruction'"),
])
def test_bad_rows_are_input_errors(tiny_model_dir, tmp_path, rows, message):
    dataset = write_jsonl(tmp_path / "train.jsonl", rows)
    config = TrainConfig(dataset=dataset, model=str(tiny_model_dir))
    with pytest.raises(InputError, match=message):
        run(config, open_store(str(tmp_path / "out")))
    assert not (tmp_path / "out" / "manifest.json").exists()


def _trained_example_checks(tokenizer, input_ids: list[int], labels: list[int]) -> None:
    """Prompt masked, >= 1 trained token, and the trained part ends the turn."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = _prompt_len(labels)
    assert start > 0 and all(t == -100 for t in labels[:start])
    assert labels[start:] == input_ids[start:]
    assert im_end in labels[start:]


def test_batches_from_the_trainers_dataloader_mask_prompts_and_padding(trainer_and_rows):
    trainer, rows = trainer_and_rows
    tokenizer = trainer.processing_class
    seen = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist(), strict=True):
            n = sum(mask)
            assert all(t == -100 for t in labels[n:])  # padding never trained
            _trained_example_checks(tokenizer, ids[:n], labels[:n])
            seen += 1
    assert seen == len(rows)


def test_trainer_batches_by_length_with_seed_hyperparameters(trainer_and_rows):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer, _ = trainer_and_rows
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.batch_size == 16  # the effective batch on one process: 4 x grad-accum 4
    assert trainer.args.per_device_train_batch_size == 4
    assert trainer.args.gradient_accumulation_steps == 4


def test_data_order_is_a_function_of_seed_and_epoch_only(trainer_and_rows):
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    trainer, _ = trainer_and_rows
    sampler = trainer._get_train_sampler()
    orders = {}
    for epoch in (0, 1, 0):
        torch.manual_seed(1000 + epoch)  # whatever the global RNG holds ...
        torch.rand(7)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert orders.setdefault(epoch, order) == order  # ... the order does not change
        assert order == get_length_grouped_indices(
            sampler.lengths, sampler.batch_size,
            generator=torch.Generator().manual_seed(trainer.args.seed + epoch))
    assert sorted(orders[0]) == list(range(len(sampler.lengths)))


@pytest.mark.parametrize("effective, batch, processes, accum", [
    (16, 4, 1, 4), (16, 4, 2, 2), (16, 2, 2, 4), (16, 16, 1, 1), (16, 2, 8, 1),
])
def test_grad_accum_keeps_the_effective_batch_across_process_counts(effective, batch,
                                                                    processes, accum):
    assert grad_accum_for(effective, batch, processes) == accum
    assert batch * accum * processes == effective


def test_an_effective_batch_the_processes_cannot_split_is_a_config_error():
    with pytest.raises(ConfigError, match="--effective-batch 16 is not a multiple of "
                                          r"--batch-size 4 x 8 process\(es\) = 32"):
        grad_accum_for(16, 4, 8)
    with pytest.raises(ConfigError, match="--batch-size 3 x 1"):
        grad_accum_for(16, 3, 1)


def test_the_old_grad_accum_option_says_what_replaced_it():
    assert TrainConfig().effective_batch == 16
    with pytest.raises(ConfigError, match="grad_accum is derived now: set effective_batch"):
        build_config(TrainConfig, {"batch_size": 4, "grad_accum": 4})


def test_non_finite_loss_stops_the_run(trainer_and_rows):
    trainer, _ = trainer_and_rows
    stop = next(cb for cb in trainer.callback_handler.callbacks
                if type(cb).__name__ == "StopOnNonFiniteLoss")
    stop.on_log(trainer.args, trainer.state, trainer.control, logs={"loss": 1.5})  # fine
    for bad in (math.nan, math.inf):
        with pytest.raises(LossDivergedError, match="loss became"):
            stop.on_log(trainer.args, trainer.state, trainer.control, logs={"loss": bad})


def test_ranks_come_from_torchrun_environment():
    assert Ranks.from_environ({}) == Ranks(0, 0, 1)
    ranks = Ranks.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (ranks.rank, ranks.local_rank, ranks.world_size, ranks.is_main) == (3, 1, 4, False)


def test_lora_weights_stay_fp32_on_a_half_precision_base(tiny_model_dir, tmp_path):
    import torch

    plan = {**runtime_plan("fp32", {"cuda": False}), "base_dtype": "float16"}  # a T4's storage
    config = TrainConfig(dataset="unused", model=str(tiny_model_dir), save_steps=0)
    trainer = build_trainer(config, examples_from_rows(make_rows(2), "rows"),
                            str(tiny_model_dir), str(tmp_path), plan)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert any(p.dtype == torch.float16 for p in frozen)


def test_overlong_examples_are_dropped_or_cut(tiny_model_dir, tmp_path):
    rows = make_rows(4)
    rows[0]["response"] = "word " * 400  # far over max_length
    examples = examples_from_rows(rows, "rows")
    dropped = build_trainer(
        TrainConfig(dataset="unused", model=str(tiny_model_dir), max_length=200, save_steps=0),
        examples, str(tiny_model_dir), str(tmp_path / "drop"))
    assert dropped.trackb_fit["examples_too_long"] == 1
    assert len(dropped.train_dataset) == 3
    for example in dropped.train_dataset:
        assert len(example["input_ids"]) <= 200
        _trained_example_checks(dropped.processing_class, example["input_ids"],
                                example["labels"])
    cut = build_trainer(
        TrainConfig(dataset="unused", model=str(tiny_model_dir), max_length=200, save_steps=0,
                    overlong="truncate"),
        examples, str(tiny_model_dir), str(tmp_path / "cut"))
    assert len(cut.train_dataset) == 4
    assert max(len(e["input_ids"]) for e in cut.train_dataset) == 200
    with pytest.raises(InputError, match="no example fits --max-length 16"):
        build_trainer(TrainConfig(dataset="unused", model=str(tiny_model_dir), max_length=16,
                                  save_steps=0),
                      examples, str(tiny_model_dir), str(tmp_path / "none"))


# -- checkpoints in the store ----------------------------------------------------------------

def _fake_checkpoint(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"local-checkpoint-{step}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_checkpoints_upload_marker_last_and_keep_the_newest(tmp_path):
    out = LocalStore(tmp_path / "out")
    for step in (2, 4, 6):
        upload_checkpoint(out, _fake_checkpoint(tmp_path, step), step, "fp-a", keep=2)
    assert sorted(stored_checkpoints(out)) == [4, 6]
    assert stored_checkpoints(out)[6] == {"step": 6, "fingerprint": "fp-a", "files": 2}
    assert latest_checkpoint(out, "fp-a") == 6
    assert latest_checkpoint(out, "another config") is None
    # A partial upload (no marker: killed mid-copy) is never resumed from.
    out.put_bytes("checkpoints/checkpoint-8/adapter_model.safetensors", b"half")
    assert stored_checkpoints(out)[8] is None
    assert latest_checkpoint(out, "fp-a") == 6
    upload_checkpoint(out, _fake_checkpoint(tmp_path, 10), 10, "fp-a", keep=2)
    assert sorted(stored_checkpoints(out)) == [6, 10]  # the partial 8 is cleaned up too


def test_stale_checkpoints_are_not_resumed_and_finished_runs_remove_them(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(8))
    out = LocalStore(tmp_path / "train")
    upload_checkpoint(out, _fake_checkpoint(tmp_path, 99), 99, "stale", keep=2)
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=1.0,
                         batch_size=4, effective_batch=4, save_steps=1, resume=True)
    manifest = run(config, out)
    # The stale checkpoint (another fingerprint) was not resumed from.
    assert manifest["resumed_from_step"] == 0
    assert manifest["counts"]["steps"] == 2
    assert not out.list("checkpoints")  # removed once the run finished
    kept = run(config.model_copy(update={"keep_checkpoints": True, "seed": 7}), out)
    assert kept["resumed_from_step"] == 0
    assert sorted(stored_checkpoints(out)) == [1, 2]
    assert all(m["fingerprint"] == kept["fingerprint"] for m in stored_checkpoints(out).values())
    assert out.exists(f"checkpoints/checkpoint-2/{CHECKPOINT_MARKER}")


def _train_command(dataset: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--dataset", str(dataset), "--model", str(model),
            "--out", str(out), "--epochs", "2", "--batch-size", "2", "--effective-batch", "2",
            "--learning-rate", "1e-3", "--save-steps", "2", *extra]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_killed_run_resumes_from_the_stored_checkpoint(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(12))  # 6 steps an epoch, 12 planned
    out = tmp_path / "train"
    marker = out / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER
    proc = subprocess.Popen(_train_command(tmp_path, tiny_model_dir, out), cwd=ROOT,
                            env=_environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        assert marker.exists(), "no checkpoint-2 in the store within 90 s"
        proc.send_signal(signal.SIGKILL)  # as a preemption does: no cleanup at all
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()
    stored = stored_checkpoints(LocalStore(out))
    assert max(step for step, m in stored.items() if m) >= 2

    resumed = subprocess.run(_train_command(tmp_path, tiny_model_dir, out, "--resume"),
                             cwd=ROOT, env=_environment(), capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from stored checkpoint" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert manifest["resumed_from_step"] >= 2
    assert metrics["steps"] == metrics["steps_planned"] == 12
    assert metrics["resumed_from_step"] == manifest["resumed_from_step"]
    # The loss history spans the whole run: steps before the kill come from the checkpoint.
    assert [p["step"] for p in metrics["train_loss"]] == list(range(1, 13))
    assert manifest["runtime"]["precision"] == "fp32"
    assert not (out / "checkpoints").exists()


# 48 examples make 3 optimizer steps at the effective batch of 16; an effective batch that
# grew with the processes (2 x grad-accum 8 x 2 = 32) would make 2.
EFFECTIVE_BATCH_EXAMPLES = 48


def _assert_effective_batch_16(manifest: dict, metrics: dict, processes: int) -> None:
    assert metrics["examples"] == EFFECTIVE_BATCH_EXAMPLES
    assert metrics["steps"] == metrics["steps_planned"] == EFFECTIVE_BATCH_EXAMPLES // 16
    assert manifest["batch"] == {"batch_size": 2, "grad_accum": 8 // processes,
                                 "world_size": processes, "effective_batch": 16}
    assert manifest["runtime"]["world_size"] == processes


def test_effective_batch_is_16_on_one_process(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(EFFECTIVE_BATCH_EXAMPLES))
    out = tmp_path / "train"
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=1.0,
                         batch_size=2, effective_batch=16, save_steps=0)
    manifest = run(config, open_store(str(out)))
    _assert_effective_batch_16(manifest, json.loads((out / "metrics.json").read_text()), 1)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_once_with_effective_batch_16(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(EFFECTIVE_BATCH_EXAMPLES))
    out = tmp_path / "train"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "jobs.train", "--dataset", str(tmp_path),
               "--model", str(tiny_model_dir), "--out", str(out), "--epochs", "1",
               "--batch-size", "2", "--effective-batch", "16", "--save-steps", "1",
               "--keep-checkpoints"]
    proc = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    # Each process saw its own half of every optimizer step's 16 examples: 2 per device
    # x grad-accum 4 x 2 processes, the same 3 steps as on one process.
    _assert_effective_batch_16(manifest, metrics, 2)
    assert sorted(stored_checkpoints(LocalStore(out))) == [2, 3]  # --save-total-limit 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Only rank 0 logged: one TensorBoard event file.
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


class Preempted(Exception):
    """Stands for a kill right after a checkpoint reached the store."""


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    import torch

    # 6 optimizer steps an epoch, 2 epochs; the interruption falls in the second epoch,
    # whose shuffle an uninterrupted run draws after a whole epoch of dropout.
    write_jsonl(tmp_path / "train.jsonl", make_rows(12))
    config = TrainConfig(dataset=str(tmp_path), model=str(tiny_model_dir), epochs=2.0,
                         batch_size=2, effective_batch=2, learning_rate=1e-3, save_steps=2)
    whole = run(config, open_store(str(tmp_path / "whole")))

    # Deterministic interruption: the run dies as soon as checkpoint 8 is stored.
    upload = train.upload_checkpoint

    def upload_then_die(out, folder, step, run_fingerprint, keep):
        upload(out, folder, step, run_fingerprint, keep)
        if step == 8:
            raise Preempted(f"after checkpoint {step}")

    resumed_out = open_store(str(tmp_path / "resumed"))
    with monkeypatch.context() as patch:
        patch.setattr(train, "upload_checkpoint", upload_then_die)
        with pytest.raises(Preempted):
            run(config, resumed_out)
    assert latest_checkpoint(resumed_out, whole["fingerprint"]) == 8
    resumed = run(config, resumed_out)

    assert resumed["resumed_from_step"] == 8 and whole["resumed_from_step"] == 0
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text())
               for name in ("whole", "resumed")}
    assert metrics["resumed"]["steps"] == metrics["whole"]["steps"] == 12
    # The same batches in the same order: the same loss at every step ...
    assert [p["loss"] for p in metrics["resumed"]["train_loss"]] == pytest.approx(
        [p["loss"] for p in metrics["whole"]["train_loss"]], abs=1e-6)
    # ... and the same adapter, tensor for tensor.
    expected, got = _adapter_tensors(tmp_path / "whole"), _adapter_tensors(tmp_path / "resumed")
    assert sorted(got) == sorted(expected) and len(got) > 0
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name
    # TensorBoard covers the whole run, the steps before the interruption included.
    scalars = _tensorboard_scalars(tmp_path / "resumed" / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 13))
