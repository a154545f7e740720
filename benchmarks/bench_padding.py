"""P3: how much of the training compute padding eats, with and without length grouping.

The dataset is the real one: ``pypi:verl==0.9.1`` through extract -> generate (reference
teacher) -> build-dataset, built once into ``$TRACKB_CACHE/bench/padding`` (default
``~/.cache/trackb``) and reused while its manifests match. Lengths are exact token
counts from trl's own tokenisation (:func:`trackb_core.train.build_trainer` on the train
split) with the tiny model's tokenizer (a corpus-trained byte-level BPE, built into the
same cache with a few seconds of pretraining); a real model's tokenizer gives other
absolute lengths but a similar spread.

* **Padding efficiency** = real tokens / processed tokens (each per-device batch padded
  to its longest example), over one epoch of the trainer's own sampler order: the
  LengthGroupedSampler ``trackb train`` uses by default against the random order of
  naive batching, at the default per-device batch (4) x grad-accum (4) = 16 effective.
  Goal: >= 0.85 with grouping.
* **Tokens/s** (real tokens per second of ``trainer.train()``) of the tiny model on the
  same random subset of examples, grouped against random batches, in this process.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path

CORPUS = "pypi:verl==0.9.1"
GOAL = 0.85
SPEED_EXAMPLES = 160  # 10 optimizer steps at the effective batch of 16


def cache_root() -> Path:
    root = Path(os.environ.get("TRACKB_CACHE", "~/.cache/trackb")).expanduser()
    return root / "bench" / "padding"


def build_inputs(root: Path) -> tuple[Path, Path]:
    """(build-dataset folder, tiny model folder), built once and reused while cached."""
    from trackb_core import dataset, extract, generate, tinymodel
    from trackb_core.stage import cached_manifest
    from trackb_core.store import open_store

    stages = [
        ("extract", extract.run, extract.ExtractConfig(corpus=CORPUS)),
        ("generate", generate.run, generate.GenerateConfig(tasks=str(root / "extract"),
                                                           teacher="reference")),
        ("build-dataset", dataset.run, dataset.DatasetConfig(responses=str(root / "generate"))),
        ("tiny-model", tinymodel.run, tinymodel.TinyModelConfig(corpus=CORPUS,
                                                                pretrain_seconds=3.0)),
    ]
    for name, runner, config in stages:
        out = open_store(str(root / name))
        if cached_manifest(config, out) is None:
            print(f"padding: building {name} into {root / name} (once)", flush=True)
            runner(config, out)
    return root / "build-dataset", root / "tiny-model"


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Tokens processed when ``order`` is cut into batches, each padded to its longest."""
    total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        total += max(batch) * len(batch)
    return total


def sampler_order(trainer, grouped: bool, seed: int) -> list[int]:
    """One epoch of indices as the trainer's sampler draws them."""
    import torch

    torch.manual_seed(seed)  # the trainer seeds torch before it draws the order
    if grouped:
        return list(iter(trainer._get_train_sampler()))
    return torch.randperm(len(trainer.train_dataset)).tolist()


def main() -> None:
    import torch

    from trackb_core.stage import parse_jsonl
    from trackb_core.train import TrainConfig, build_trainer, examples_from_rows

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = cache_root()
    dataset_dir, model_dir = build_inputs(root)
    rows = parse_jsonl((dataset_dir / "train.jsonl").read_bytes(), "train.jsonl")
    examples = examples_from_rows(rows, "train.jsonl")
    config = TrainConfig(dataset=str(dataset_dir), model=str(model_dir), save_steps=0,
                         epochs=1.0)
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        trainer = build_trainer(config, examples, str(model_dir), f"{tmp}/all")
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        batch = config.batch_size
        real = sum(lengths)
        print(f"padding: {len(lengths)} train examples of verl 0.9.1 (tiny-model BPE tokens: "
              f"median {statistics.median(lengths):.0f}, max {max(lengths)}; "
              f"{trainer.trackb_fit['examples_too_long']} over {config.max_length} dropped); "
              f"per-device batch {batch}, effective {config.effective_batch}")
        efficiency = {}
        for grouped in (False, True):
            per_seed = [real / padded_tokens(lengths, sampler_order(trainer, grouped, seed),
                                             batch) for seed in range(5)]
            efficiency[grouped] = statistics.mean(per_seed)
        verdict = "meets" if efficiency[True] >= GOAL else "MISSES"
        print(f"padding efficiency (real / processed tokens, mean of 5 epochs): random "
              f"{efficiency[False]:.3f}, length-grouped {efficiency[True]:.3f} ({verdict} the "
              f"{GOAL} goal); processed tokens ratio random / grouped "
              f"{efficiency[True] / efficiency[False]:.2f}x")

        subset = random.Random(0).sample(examples, min(SPEED_EXAMPLES, len(examples)))
        speed = {}
        for grouped in (False, True):
            run_config = config.model_copy(update={"group_by_length": grouped})
            speed_trainer = build_trainer(run_config, subset, str(model_dir),
                                          f"{tmp}/speed-{grouped}")
            tokens = sum(len(ids) for ids in speed_trainer.train_dataset["input_ids"])
            started = time.perf_counter()
            speed_trainer.train()
            speed[grouped] = tokens / (time.perf_counter() - started)
        print(f"tiny-model training, {len(subset)} examples x 1 epoch: random batches "
              f"{speed[False]:,.0f} tokens/s, length-grouped {speed[True]:,.0f} tokens/s; "
              f"ratio {speed[True] / speed[False]:.2f}x")


if __name__ == "__main__":
    main()
