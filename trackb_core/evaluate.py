"""``trackb eval`` and ``trackb score``: generate answers for the test split and score them.

Recipe, top to bottom (:func:`run`): pick the test items, load the base model (and the
LoRA adapter, if given), render every prompt with the one prompt builder training used
(:func:`trackb_core.prompts.render_prompt`), generate in left-padded batches — one
greedy answer per item, then ``n_samples`` seeded samples at ``temperature``/``top_p``
— and score them with the seed-compatible scorer (:mod:`trackb_core.metrics`).

The seed generated one item at a time, unbatched and unseeded (422.7 s for 46 items
on a T4). Batching with left padding and a fixed seed gives the same kind of answers,
reproducibly, in a fraction of the time.

:func:`score` scores ``predictions.jsonl`` made elsewhere (another server, vLLM) with
the same scorer, so its numbers mean exactly what ``trackb eval``'s do.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import ConfigError, InputError
from trackb_core.metrics import index_predictions, score_seed
from trackb_core.prompts import render_prompt
from trackb_core.stage import StageRun, say, stage_run
from trackb_core.store import Store

STAGE = "eval"
SEED_K = 3  # the seed's pass@3: greedy + 2 samples
# ChatML's end of turn: a model taught the chat format stops here, even when the
# tokenizer's eos is <|endoftext|> (as for the Qwen2.5 base models).
END_OF_TURN = "<|im_end|>"


class EvalConfig(StageConfig):
    """Generate answers for the test split with a model (+ optional LoRA adapter) and score them.

    Reads test.jsonl from build-dataset (--dataset), the base model (--model: a local
    folder, a store URI or a hub id) and optionally the train stage's output (--adapter).
    Prompts are built by the same function training used. Generation is batched with
    left padding: one greedy answer per item, then --n-samples samples at
    --temperature/--top-p, seeded. Writes predictions.jsonl ({"id", "greedy", "samples"},
    sorted by id) and eval.json (the seed-compatible metrics: pass_at_1, pass_at_k,
    avg_style_score, hallucination_rate, execution_rate, per_category, plus a "trackb"
    key with generation facts).
    """

    dataset: str | None = input_field(
        None, kind="file", filename="test.jsonl",
        description="Test split: test.jsonl or the build-dataset folder holding it.")
    model: str = input_field(
        "Qwen/Qwen2.5-Coder-1.5B", kind="model",
        description="Base model: a local folder, a store URI (s3://...) or a hub id.")
    adapter: str | None = input_field(
        None, kind="dir",
        description="LoRA adapter: the train stage's folder (holding adapter/) or the adapter "
                    "folder itself; none evaluates the base model.", required=False)
    tag: str = Field("eval", description="Name of this evaluation in eval.json (e.g. baseline).")
    n_samples: int = Field(2, ge=0, description="Sampled answers per item besides the greedy one.")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature of the samples.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top-p of the samples.")
    max_new_tokens: int = Field(384, ge=1, description="Most tokens generated per answer.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")
    max_items: int | None = Field(
        None, ge=1,
        description="Evaluate a seeded random sample of at most this many items (all if unset).")
    seed: int = Field(42, description="Seed of the item sample and of sampling.")


class ScoreConfig(StageConfig):
    """Score predictions made elsewhere with the seed-compatible metrics.

    Reads test.jsonl (--dataset) and a predictions.jsonl (--predictions) whose rows are
    {"id", "greedy": str, "samples": [str, ...]}; every test item needs a prediction.
    Writes eval.json, exactly as `trackb eval` would from the same answers.
    """

    dataset: str | None = input_field(
        None, kind="file", filename="test.jsonl",
        description="Test split: test.jsonl or the build-dataset folder holding it.")
    predictions: str | None = input_field(
        None, kind="file", filename="predictions.jsonl",
        description="predictions.jsonl, or the folder holding it.")
    tag: str = Field("score", description="Name of this evaluation in eval.json.")


# -- inputs -----------------------------------------------------------------------------

def load_items(run: StageRun, max_items: int | None = None, seed: int = 42
               ) -> list[dict[str, Any]]:
    """The test items to evaluate, sorted by id.

    With ``max_items``, a seeded sample like the seed's ``min(60, n)`` (taken from the
    id-sorted rows, so file order does not matter). Raises InputError if the dataset is
    empty or a row lacks ``id``/``instruction``, MissingInputError if it is absent.
    """
    rows = run.read_jsonl("dataset")
    where = run.input_uri("dataset")
    if not rows:
        raise InputError(f"--dataset: {where} holds no test items")
    for number, row in enumerate(rows, 1):
        if "id" not in row or not isinstance(row.get("instruction"), str):
            raise InputError(f"--dataset: {where}: row {number} needs 'id' and a string "
                             "'instruction'")
    rows = sorted(rows, key=lambda r: str(r["id"]))
    if max_items is not None and max_items < len(rows):
        rows = random.Random(seed).sample(rows, max_items)
    return sorted(rows, key=lambda r: str(r["id"]))


def _model_source(uri: str) -> tuple[str, bool]:
    """``(uri, is_hub_id)``: a hub id is passed to transformers as is."""
    return uri, "://" not in uri and not Path(uri).expanduser().exists()


def find_adapter(root: Path, uri: str) -> Path:
    """The PEFT adapter folder in ``root`` (the train stage's folder or the adapter itself).

    Raises InputError if neither ``root/adapter`` nor ``root`` holds adapter_config.json.
    """
    for candidate in (root / "adapter", root):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise InputError(f"--adapter: {uri} holds no PEFT adapter (no adapter_config.json in it "
                     "or in its adapter/ folder)")


def _tokenizer_source(adapter_dir: Path | None, adapter_root: Path | None, model_path: str
                      ) -> str:
    # Training may add tokens or fix the chat template; its saved tokenizer wins.
    for folder in (adapter_dir, adapter_root):
        if folder is not None and (folder / "tokenizer_config.json").is_file():
            return str(folder)
    return model_path


# -- model --------------------------------------------------------------------------------

def load_model(model_path: str, adapter_dir: Path | None, tokenizer_path: str):
    """``(model, tokenizer, device)`` ready for batched generation (left padding).

    The adapter, if any, is merged into the weights: generation is then as fast as the
    base model's. Raises InputError if the model or adapter cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype,
                                                     attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {model_path}: {str(exc).splitlines()[0]}") from exc
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot load adapter {adapter_dir}: "
                             f"{str(exc).splitlines()[0]}") from exc
    tokenizer.padding_side = "left"  # batched generate continues every row at its end
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer, device


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos, the model's generation eos ids and ChatML's end of turn."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if isinstance(i, int))


def generate(model, tokenizer, device, prompts: list[str], *, batch_size: int,
             max_new_tokens: int, stop_ids: list[int], num_return: int = 1,
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             desc: str = "generate") -> tuple[list[list[str]], int]:
    """``num_return`` answers per prompt (greedy or sampled) and the tokens generated.

    Prompts are batched in order of length, so a batch wastes little on padding; the
    answers come back in the order of ``prompts``. Only new tokens are decoded, up to
    the first stop token. Raises nothing of its own.
    """
    import torch
    from tqdm import tqdm

    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    answers: list[list[str]] = [[] for _ in prompts]
    tokens = 0
    stops = set(stop_ids)
    options: dict[str, Any] = {"do_sample": sample, "num_return_sequences": num_return}
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    else:
        # the model's generation config may carry sampling knobs; greedy ignores them
        options.update(temperature=None, top_p=None, top_k=None)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False):
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, **options)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        for row, ids in enumerate(new):
            cut = next((j for j, t in enumerate(ids) if t in stops), None)
            kept = ids if cut is None else ids[:cut]
            tokens += len(kept) + (0 if cut is None else 1)
            text = tokenizer.decode(kept, skip_special_tokens=True)
            answers[batch[row // num_return]].append(text)
    return answers, tokens


# -- the stages ---------------------------------------------------------------------------

def run(config: EvalConfig, out: Store) -> dict[str, Any]:
    """Generate and score; writes predictions.jsonl and eval.json into ``out``.

    Raises ConfigError if --dataset is not given, MissingInputError if an input is
    absent, InputError if the dataset, model or adapter is unusable, StoreError if
    ``out`` cannot be written.
    """
    import torch

    if not config.dataset:
        raise ConfigError("--dataset is required: test.jsonl or the build-dataset folder")
    with stage_run(STAGE, config, out) as run:
        items = load_items(run, config.max_items, config.seed)
        say(STAGE, f"{len(items)} test items")

        with run.timed("load_model"):
            model_path, hub = _model_source(config.model)
            if not hub:
                model_path = str(run.local_dir("model"))
            adapter_dir = adapter_root = None
            if config.adapter:
                adapter_root = run.local_dir("adapter")
                adapter_dir = find_adapter(adapter_root, config.adapter)
            tokenizer_path = _tokenizer_source(adapter_dir, adapter_root, model_path)
            model, tokenizer, device = load_model(model_path, adapter_dir, tokenizer_path)
        say(STAGE, f"model {config.model}" + (f" + adapter {adapter_dir}" if adapter_dir else "")
            + f" on {device}")

        prompts = [render_prompt(tokenizer, item["instruction"]) for item in items]
        stop_ids = stop_token_ids(model, tokenizer)
        common = {"batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens,
                  "stop_ids": stop_ids}
        started = time.perf_counter()
        with run.timed("greedy"):
            torch.manual_seed(config.seed)
            greedy, greedy_tokens = generate(model, tokenizer, device, prompts, desc="greedy",
                                             **common)
        samples: list[list[str]] = [[] for _ in items]
        sample_tokens = 0
        if config.n_samples:
            with run.timed("samples"):
                torch.manual_seed(config.seed)
                samples, sample_tokens = generate(
                    model, tokenizer, device, prompts, num_return=config.n_samples, sample=True,
                    temperature=config.temperature, top_p=config.top_p, desc="samples", **common)
        seconds = round(time.perf_counter() - started, 3)

        predictions = [
            {"id": str(item["id"]), "greedy": g[0], "samples": s}
            for item, g, s in zip(items, greedy, samples, strict=True)
        ]
        run.write_jsonl("predictions.jsonl", predictions)
        by_id = {p["id"]: p for p in predictions}
        result = score_seed(items, by_id, config.tag, k=min(SEED_K, 1 + config.n_samples))
        result["trackb"] = {
            "model": config.model,
            "adapter": config.adapter,
            "n_items": len(items),
            "n_samples": config.n_samples,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
            "device": str(device),
            "generation_seconds": seconds,
            "tokens_generated": greedy_tokens + sample_tokens,
        }
        run.write_json("eval.json", result)
        run.counts.update({"items": len(items), "tokens_generated": greedy_tokens + sample_tokens})
        run.extra["metrics"] = _headline(result)
        say(STAGE, _summary_line(result, seconds))
    return run.manifest


def score(config: ScoreConfig, out: Store) -> dict[str, Any]:
    """Score predictions made elsewhere; writes eval.json into ``out``.

    Raises ConfigError if an input is not given, MissingInputError if one is absent,
    InputError if a test item has no prediction or a row is malformed, StoreError if
    ``out`` cannot be written.
    """
    for field in ("dataset", "predictions"):
        if not getattr(config, field):
            raise ConfigError(f"--{field} is required")
    with stage_run("score", config, out) as run:
        items = load_items(run)
        predictions = index_predictions(run.read_jsonl("predictions"),
                                        run.input_uri("predictions"))
        result = score_seed(items, predictions, config.tag)
        wanted = {str(item["id"]) for item in items}
        result["trackb"] = {
            "predictions": config.predictions,
            "n_items": len(items),
            "unused_predictions": len(set(predictions) - wanted),
        }
        run.write_json("eval.json", result)
        run.counts.update({"items": len(items), "predictions": len(predictions)})
        run.extra["metrics"] = _headline(result)
        say("score", _summary_line(result))
    return run.manifest


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("pass_at_1", "pass_at_k", "avg_style_score", "hallucination_rate", "execution_rate")
    return {key: round(result[key], 4) for key in keys}


def _summary_line(result: dict[str, Any], seconds: float | None = None) -> str:
    line = (f"{result['tag']}: pass@1 {result['pass_at_1']:.3f}, pass@{result['k']} "
            f"{result['pass_at_k']:.3f}, style {result['avg_style_score']:.3f}, "
            f"hallucination {result['hallucination_rate']:.3f} over "
            f"{result['total_samples']} items")
    return line + (f" ({seconds:.1f} s generating)" if seconds is not None else "")
