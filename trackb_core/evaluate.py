"""``trackb eval`` and ``trackb score``: generate answers for the test split and score them.

Recipe, top to bottom (:func:`run`): pick the test items, render every prompt with the
one prompt builder training used (:func:`trackb_core.prompts.render_prompt`), load the
model in the dtype of training's runtime plan (:mod:`trackb_core.runtime`), generate one
greedy answer per item and ``n_samples`` samples at one ``temperature``/``top_p`` with
one :class:`~trackb_core.generation.SamplingSettings` (every knob explicit, each item's
samples on its own seed, up to ``max_new_tokens``; each answer keeps its 384-token seed
view and a truncated flag), and score them with the one scorer
(:func:`trackb_core.metrics.score_all`). eval.json's ``settings`` records everything that
made and scored the answers (dataset hash, sampling, backend, dtype, corpus, scorer),
which ``trackb compare`` requires to match on both sides.

Two generation backends give the same kind of answers (:func:`choose_backend`):

- ``hf``: Hugging Face ``generate`` in left-padded batches (the LoRA adapter merged
  into the weights; samples drawn by :class:`SeededSampler`); runs anywhere.
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

import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from trackb_core import corpus_env, families, vllm_backend
from trackb_core.config import input_field
from trackb_core.corpus import folder_sha256
from trackb_core.errors import ConfigError, InputError
from trackb_core.generation import (
    Answer,
    Generations,
    SamplingSettings,
    finish_answer,
    item_seed,
    sample_seeds,
    stop_ids_for,
)
from trackb_core.metrics import (
    BOOTSTRAP_SEED,
    METRIC_VERSION,
    N_BOOT,
    index_predictions,
    score_all,
)
from trackb_core.partition import (
    PartitionOptions,
    Progress,
    finished_parts,
    member,
    merge_jsonl_by_id,
    part_store,
    part_summary,
    run_parts,
)
from trackb_core.prompts import render_prompt
from trackb_core.runtime import device_facts, eval_dtype, runtime_plan
from trackb_core.sandbox import CodeRunOptions, stage_isolation
from trackb_core.stage import (
    StageRun,
    parse_jsonl,
    say,
    stage_run,
    upstream_corpus_dir,
    upstream_manifest_field,
)
from trackb_core.store import Store
from trackb_core.tracking import check_configured, log_eval_metrics, run_name

STAGE = "eval"
BACKENDS = ("auto", "hf", "vllm")
# Seconds each unit-test run of a scored answer may take in the sandbox.
SANDBOX_TIMEOUT = 10.0


class EvalConfig(CodeRunOptions, PartitionOptions):
    """Generate answers for the test split with a model (+ optional LoRA adapter) and score them.

    Reads test.jsonl from build-dataset (--dataset), the base model (--model: a local
    folder, a store URI or a hub id) and optionally the train stage's output (--adapter).
    Prompts are built by the same function training used. Per item: one greedy answer
    and --n-samples samples at one --temperature/--top-p, seeded. --backend hf batches
    Hugging Face generate with left padding; vllm runs vLLM offline with the adapter as a
    LoRARequest (needs vllm and a GPU); auto picks vllm exactly when both are present.
    Every sampling setting is explicit (nothing inherited from the model's
    generation_config; top-k off, no repetition penalty), each item's samples come from
    its own seed, and answers stop at <|im_end|>/<|im_start|> or after --max-new-tokens.
    The seed's pass@3 uses greedy + the first 2 samples; the unbiased pass@3 needs
    --n-samples >= 3; the seed-compatible block scores each answer's first 384 tokens.
    Writes predictions.jsonl ({"id", "greedy", "samples", "truncated", "seed_view"},
    sorted by id), generation.json (how the answers were made, and for which items) and
    eval.json (metric_version 3: "settings" = what made and scored the answers, which
    `trackb compare` needs equal on both sides; headline metrics with 95% CIs; the
    seed-compatible block; functional pass@k; format, family and truncation metrics;
    per-item flags for paired tests). With --no-score it stops after generation.json:
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
    max_new_tokens: int = Field(
        1024, ge=1, description="Most tokens generated per answer; an answer cut here is "
        "flagged truncated and counted per family. The seed-compatible metrics score the "
        "first 384 tokens whatever this is (the seed's budget).")
    batch_size: int = Field(16, ge=1, description="Answers generated together per generate() "
                            "call (hf backend): prompts for the greedy pass, prompt x sample "
                            "rows for the samples.")
    max_items: int | None = Field(
        None, ge=1,
        description="Evaluate at most this many items (all if unset): every item with hidden "
        "tests (the only ones a functional check exists for), then a seeded random sample "
        "of the others.")
    seed: int = Field(42, description="Seed of the item sample and of sampling.")
    corpus: str | None = Field(
        None, description="Corpus the test items come from (a folder or pypi:NAME==VERSION), "
        "for executing unit-test answers; unset: found by following the dataset's manifests "
        "upstream (best effort; without it unit tests count as not executable).")
    score: bool = Field(True, description="Score the answers too (eval.json); off: only "
                        "generate them, for `trackb score`.")
    run_name: str | None = Field(
        None, description="Tracking run to log the headline metrics to (MLflow, W&B when "
        "configured); default $TRACKB_RUN_ID, else the output URI (run-all sets the run id, "
        "so train and eval log to one run)")

    # Used only by scoring, which runs after the merge (a part never scores): changing
    # them redoes no part.
    merge_only_fields: ClassVar[dict[str, Any]] = {
        "tag": "eval", "score": False, "corpus": None, "run_name": None,
        "allow_weak_sandbox": False, "fetch_upstream_corpus": False}


class ScoreConfig(CodeRunOptions):
    """Score predictions made elsewhere with the same scorer as `trackb eval`.

    Reads test.jsonl (--dataset) and a predictions.jsonl (--predictions) whose rows are
    {"id", "greedy": str, "samples": [str, ...]}, optionally with "seed_view" (the same
    answers cut at 384 tokens, which the seed-compatible block then scores) and
    "truncated" ({"greedy": bool, "samples": [bool]}); every test item needs a prediction.
    When `trackb eval --no-score` made them, its generation.json beside them names the
    items, the settings that made them and the test split's sha256 (another split is
    refused), and only those items are scored. Writes eval.json, exactly as `trackb eval`
    would from the same answers.
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
    run_name: str | None = Field(
        None, description="Tracking run to log the headline metrics to (MLflow, W&B when "
        "configured); default $TRACKB_RUN_ID, else the output URI (run-all sets the run id, "
        "so train and eval log to one run)")


GENERATION_FILE = "generation.json"


# -- inputs -----------------------------------------------------------------------------

def load_items(run: StageRun, max_items: int | None = None, seed: int = 42
               ) -> list[dict[str, Any]]:
    """The test items to evaluate, sorted by id.

    With ``max_items``, every item with hidden tests (up to ``max_items``), then a seeded
    sample of the others like the seed's ``min(60, n)`` (taken from the id-sorted rows,
    so file order does not matter). Raises InputError if the dataset is
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
        tested = [r for r in rows if isinstance(r.get("hidden_tests"), dict)]
        others = [r for r in rows if not isinstance(r.get("hidden_tests"), dict)]
        rng = random.Random(seed)
        chosen = rng.sample(tested, max_items) if len(tested) > max_items else tested
        rows = chosen + rng.sample(others, max_items - len(chosen))
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
    """``(model, tokenizer, device, dtype name)`` ready for batched generation (left
    padding), in the dtype of the runtime plan training uses
    (:func:`trackb_core.runtime.eval_dtype`: float16 on a T4, never emulated bfloat16).

    The adapter, if any, is merged into the weights: generation is then as fast as the
    base model's. Raises InputError if the model or adapter cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = runtime_plan("auto", device_facts())
    dtype_name = eval_dtype(plan)
    device = torch.device(plan["device"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype_name),
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
    return model, tokenizer, device, dtype_name


def stop_token_ids(model, tokenizer) -> list[int]:
    """:func:`stop_ids_for` with the eos ids of ``model``'s own generation config."""
    return stop_ids_for(tokenizer, getattr(model.generation_config, "eos_token_id", None))


class SeededSampler:
    """A logits processor that draws each row's next token from that row's own generator
    (temperature, then top-k, top-p and min-p cuts) and leaves only it possible, so a
    greedy ``generate`` takes it.

    HF's own sampling draws every row from one global generator, so a sample would
    depend on which rows share its batch; here row ``i`` draws from a generator seeded
    with ``seeds[i]`` once per step, whatever else is in the batch.
    """

    def __init__(self, seeds: list[int], device, *, temperature: float, top_p: float,
                 top_k: int, min_p: float):
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p

    def __call__(self, input_ids, scores):
        import torch

        logits = scores.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always)
            beyond = (ordered.cumsum(-1) - ordered) >= self.top_p
            probs = probs.scatter(1, order, ordered.masked_fill(beyond, 0.0))
        if self.min_p > 0.0:
            floor = probs.max(dim=-1, keepdim=True).values * self.min_p
            probs = probs.masked_fill(probs < floor, 0.0)
        chosen = torch.stack([torch.multinomial(row, 1, generator=generator)
                              for row, generator in zip(probs, self.generators, strict=True)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, chosen, 0.0)


def generate(model, tokenizer, device, prompts: list[str], *, settings: SamplingSettings,
             stop_ids: list[int], batch_size: int, seeds: list[int] | None = None,
             desc: str = "generate", on_answers: Callable[[int], None] | None = None
             ) -> list[list[Answer]]:
    """Answers per prompt: one greedy answer each, or with ``seeds`` (one per prompt:
    :func:`trackb_core.generation.item_seed`) ``settings.n_samples`` samples each.

    Every setting is explicit (:meth:`SamplingSettings.hf`): the model's own generation
    config is replaced for the call, so nothing of it is inherited. Prompts are batched
    in order of length (sampled prompts repeated once per sample), so a batch wastes
    little on padding; the answers come back in the order of ``prompts``;
    ``on_answers(n)`` is called after each batch of ``n`` answers. Raises nothing of its
    own.
    """
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    sample = seeds is not None
    spec = settings.hf(sample=sample, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id)
    config = GenerationConfig(**spec["config"])
    copies = settings.n_samples if sample else 1
    rows = [(index, copy) for index in range(len(prompts)) for copy in range(copies)]
    row_seeds = {}
    if sample:
        for index, seed in enumerate(seeds):
            for copy, derived in enumerate(sample_seeds(seed, "", copies)):
                row_seeds[(index, copy)] = derived
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    rows.sort(key=lambda r: (-lengths[r[0]], r))
    answers: list[list[Answer | None]] = [[None] * copies for _ in prompts]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    own_config = model.generation_config
    model.generation_config = config  # what generate() would otherwise inherit from
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False):
            enc = tokenizer([prompts[index] for index, _ in batch], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
            processors = LogitsProcessorList()
            if sample:
                knobs = {k: v for k, v in spec["sampler"].items() if k != "n"}
                processors.append(SeededSampler([row_seeds[r] for r in batch], device,
                                                **knobs))
            with torch.inference_mode():
                out = model.generate(**enc, generation_config=config,
                                     logits_processor=processors)
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            for (index, copy), ids in zip(batch, new, strict=True):
                answers[index][copy] = finish_answer(tokenizer, ids, stop_ids, settings)
            if on_answers is not None:
                on_answers(len(batch))
    finally:
        model.generation_config = own_config
    return [[a for a in row if a is not None] for row in answers]


def generate_hf(model, tokenizer, device, prompts: list[str], item_ids: list[str], *,
                settings: SamplingSettings, batch_size: int,
                on_answers: Callable[[int], None] | None = None) -> Generations:
    """Greedy answers, then ``settings.n_samples`` samples per prompt, each item's drawn
    from its own seed (:func:`trackb_core.generation.item_seed`), with HF generate;
    ``on_answers(n)`` after each batch of ``n`` answers. Raises nothing of its own."""
    stops = stop_token_ids(model, tokenizer)
    greedy = generate(model, tokenizer, device, prompts, settings=settings, stop_ids=stops,
                      batch_size=batch_size, desc="greedy", on_answers=on_answers)
    samples: list[list[Answer]] = [[] for _ in prompts]
    if settings.n_samples:
        samples = generate(model, tokenizer, device, prompts, settings=settings,
                           stop_ids=stops, batch_size=batch_size, desc="samples",
                           seeds=[item_seed(settings.seed, i) for i in item_ids],
                           on_answers=on_answers)
    return Generations(greedy=[g[0] for g in greedy], samples=samples, device=str(device),
                       backend="hf")


# -- the stages ---------------------------------------------------------------------------

def sampling_settings(config: EvalConfig) -> SamplingSettings:
    """The one :class:`SamplingSettings` both backends get for ``config``."""
    return SamplingSettings(max_new_tokens=config.max_new_tokens, n_samples=config.n_samples,
                            temperature=config.temperature, top_p=config.top_p,
                            seed=config.seed)


def prediction_rows(items: list[dict[str, Any]], generations: Generations
                    ) -> list[dict[str, Any]]:
    """predictions.jsonl rows: ``{"id", "greedy", "samples", "truncated": {"greedy",
    "samples"}, "seed_view": {"greedy", "samples"}}`` in item order."""
    rows = []
    for item, greedy, samples in zip(items, generations.greedy, generations.samples,
                                     strict=True):
        rows.append({
            "id": str(item["id"]),
            "greedy": greedy.text,
            "samples": [a.text for a in samples],
            "truncated": {"greedy": greedy.truncated, "samples": [a.truncated for a in samples]},
            "seed_view": {"greedy": greedy.seed_view, "samples": [a.seed_view for a in samples]},
        })
    return rows


def run(config: EvalConfig, out: Store) -> dict[str, Any]:
    """Generate and score; writes predictions.jsonl, generation.json and (unless
    ``--no-score``) eval.json into ``out``.

    With ``partition`` set: generates the answers of that part's items only, into its
    part folder of ``out`` (never scored: the merge scores). With ``partitions`` > 1 and
    no ``partition``: every unfinished part as a process here
    (:func:`trackb_core.partition.run_parts`), then :func:`merge`.

    Raises ConfigError if --dataset is not given or --backend vllm cannot run here,
    MissingInputError if an input is absent, InputError if the dataset, model or
    adapter is unusable, StoreError if ``out`` cannot be written, PartitionsFailed
    (naming the parts that failed; the others are kept).
    """
    if not config.dataset:
        raise ConfigError("--dataset is required: test.jsonl or the build-dataset folder")
    if config.partition is not None:
        return _run_one(config.part(config.partition),
                        part_store(out, config.partition, config.partitions))
    if config.score:
        check_configured()  # a tracker configured but not installed: before any work
    if config.partitions > 1:
        run_parts(STAGE, config, out)
        return merge(config, out)
    return _run_one(config, out)


def _run_one(config: EvalConfig, out: Store) -> dict[str, Any]:
    """One stage run over every item, or over the items of ``config.partition``."""
    with stage_run(STAGE, config, out) as run:
        items = load_items(run, config.max_items, config.seed)
        progress = None
        if config.partition is not None:
            items = [item for item in items
                     if member(str(item["id"]), config.partitions) == config.partition]
            progress = Progress(out, len(items) * (1 + config.n_samples), unit="answers")
        say(STAGE, f"{len(items)} test items")
        generations, dtype, seconds = generate_answers(run, config, items, progress)
        predictions = prediction_rows(items, generations)
        generation_settings = {
            "dataset": _dataset_identity(run, items, config.max_items),
            "sampling": sampling_settings(config).describe(),
            "backend": generations.backend,
            "dtype": dtype,
            "device": generations.device.split(":")[0],
            "model": config.model,
            "adapter": config.adapter,
        }
        facts = {"device_name": generations.device, "generation_seconds": seconds,
                 "tokens_generated": generations.tokens,
                 "truncated_answers": sum(a.truncated for a in generations.greedy)
                 + sum(a.truncated for row in generations.samples for a in row)}
        _write_answers(run, config, items, predictions, generation_settings, facts)
        if progress is not None:
            progress.finish()
        _score_or_say(run, config, items, predictions, generation_settings, facts)
    return run.manifest


def generate_answers(run: StageRun, config: EvalConfig, items: list[dict[str, Any]],
                     progress: Progress | None = None) -> tuple[Generations, str, float]:
    """``(generations, dtype name, seconds generating)`` for ``items`` on the backend
    ``config`` chooses, the model and adapter fetched through ``run``; ``progress``
    advances per answer batch. Raises ConfigError (--backend vllm cannot run here),
    MissingInputError, InputError (model, adapter or tokenizer unusable)."""
    model_path, hub = _model_source(config.model)
    if not hub:
        model_path = str(run.local_dir("model"))
    adapter_dir = adapter_root = None
    if config.adapter:
        adapter_root = run.local_dir("adapter")
        adapter_dir = find_adapter(adapter_root, config.adapter)
    tokenizer_path = _tokenizer_source(adapter_dir, adapter_root, model_path)
    backend = choose_backend(config.backend, adapter_dir)
    settings = sampling_settings(config)
    item_ids = [str(item["id"]) for item in items]
    on_answers = progress.advance if progress is not None else None

    if backend == "vllm":
        from transformers import AutoTokenizer

        prompts = [render_prompt(AutoTokenizer.from_pretrained(tokenizer_path),
                                 item["instruction"]) for item in items]
        say(STAGE, f"model {config.model}" + (f" + adapter {adapter_dir}" if adapter_dir
                                              else "") + " on vllm")
        started = time.perf_counter()
        with run.timed("generate"):
            generations, dtype = vllm_backend.generate_vllm(
                model_path, tokenizer_path, adapter_dir, prompts, item_ids,
                settings=settings, on_answers=on_answers)
    else:
        with run.timed("load_model"):
            model, tokenizer, device, dtype = load_model(model_path, adapter_dir,
                                                         tokenizer_path)
        say(STAGE, f"model {config.model}" + (f" + adapter {adapter_dir}" if adapter_dir
                                              else "") + f" on {device} ({dtype}, hf)")
        prompts = [render_prompt(tokenizer, item["instruction"]) for item in items]
        started = time.perf_counter()
        with run.timed("generate"):
            generations = generate_hf(model, tokenizer, device, prompts, item_ids,
                                      settings=settings, batch_size=config.batch_size,
                                      on_answers=on_answers)
    return generations, dtype, round(time.perf_counter() - started, 3)


def _write_answers(run: StageRun, config: EvalConfig, items: list[dict[str, Any]],
                   predictions: list[dict[str, Any]], generation_settings: dict[str, Any],
                   facts: dict[str, Any]) -> None:
    """predictions.jsonl, generation.json and the manifest's counts."""
    run.write_jsonl("predictions.jsonl", predictions)
    run.write_json(GENERATION_FILE, {"settings": generation_settings, **facts,
                                     "tag": config.tag,
                                     "items": [str(item["id"]) for item in items]})
    run.counts.update({"items": len(items), "tokens_generated": facts["tokens_generated"],
                       "truncated_answers": facts["truncated_answers"]})
    if facts["truncated_answers"]:
        say(STAGE, f"{facts['truncated_answers']} answers hit --max-new-tokens "
                   f"{config.max_new_tokens} (eval.json reports the rate per family)")


def _score_or_say(run: StageRun, config: EvalConfig, items: list[dict[str, Any]],
                  predictions: list[dict[str, Any]], generation_settings: dict[str, Any],
                  facts: dict[str, Any]) -> None:
    """Score the answers into eval.json when ``config.score``; else say who will."""
    seconds = facts["generation_seconds"]
    if not config.score or config.partition is not None:
        say(STAGE, f"{len(items)} items answered in {seconds:.1f} s; scoring is left to "
                   + ("the merge" if config.partition is not None else "`trackb score`"))
        return
    with run.timed("score"):
        result = _score(run, items, {p["id"]: p for p in predictions}, config.tag,
                        config, config.temperature if config.n_samples else None,
                        generation_settings)
    result["trackb"] = {**result.get("trackb", {}), **facts}
    _finish(run, result, config.run_name)
    say(STAGE, summary_line(result, seconds))


def merge(config: EvalConfig, out: Store) -> dict[str, Any]:
    """Write the step's predictions.jsonl, generation.json and manifest into ``out``
    from its finished parts, then (``score``) score them into eval.json exactly as an
    unpartitioned run does; returns the manifest. The predictions are byte-identical to
    an unpartitioned run's. In generation.json and eval.json, tokens and truncated
    answers are summed, ``generation_seconds`` is the parts' sum (generating time spent,
    as one process would have spent it) and ``device_name`` the parts' devices; the
    manifest's ``generate`` timing is the longest part's and ``generate_sum`` the sum.

    Raises ConfigError (no --dataset), MissingInputError naming the parts that are not
    finished, InputError if the parts were generated with different settings or for
    other items, StoreError if a part cannot be read or ``out`` written.
    """
    if not config.dataset:
        raise ConfigError("--dataset is required: test.jsonl or the build-dataset folder")
    if config.score:
        check_configured()
    with stage_run(STAGE, config, out) as run:
        parts = finished_parts(config, out, run.inputs)
        items = load_items(run, config.max_items, config.seed)
        generations = [json.loads(store.get_bytes(GENERATION_FILE)) for store, _ in parts]
        first = {k: v for k, v in generations[0]["settings"].items() if k != "dataset"}
        for index, ((store, _), generation) in enumerate(zip(parts, generations, strict=True)):
            wanted = [str(i["id"]) for i in items
                      if member(str(i["id"]), config.partitions) == index]
            if generation.get("items") != wanted:
                raise InputError(f"{store.uri}/{GENERATION_FILE} answers other items than "
                                 f"its partition of --dataset holds")
            own = {k: v for k, v in generation["settings"].items() if k != "dataset"}
            if own != first:
                differ = sorted(k for k in set(own) | set(first) if own.get(k) != first.get(k))
                raise InputError(f"the partitions of {out.uri} were generated with different "
                                 f"settings ({', '.join(differ)}); rerun them with one")
        rows = parse_jsonl(merge_jsonl_by_id(store.get_bytes("predictions.jsonl")
                                             for store, _ in parts), out.uri)
        generation_settings = {**generations[0]["settings"],
                               "dataset": _dataset_identity(run, items, config.max_items)}
        devices = sorted({str(g.get("device_name")) for g in generations})
        facts = {"device_name": ", ".join(devices),
                 "generation_seconds": round(sum(g["generation_seconds"]
                                                 for g in generations), 3),
                 "tokens_generated": sum(g["tokens_generated"] for g in generations),
                 "truncated_answers": sum(g["truncated_answers"] for g in generations)}
        _write_answers(run, config, items, rows, generation_settings, facts)
        seconds = [float(m.get("timings", {}).get("generate", 0.0)) for _, m in parts]
        run.timings.update({"generate": max(seconds), "generate_sum": round(sum(seconds), 3)})
        run.extra["partitions"] = part_summary(parts)
        say(STAGE, f"merged {len(parts)} partitions: {len(items)} items")
        _score_or_say(run, config, items, rows, generation_settings, facts)
    return run.manifest


def _dataset_identity(run: StageRun, items: list[dict[str, Any]], max_items: int | None
                      ) -> dict[str, Any]:
    """The test split's sha256 and the ids scored from it (their count and hash)."""
    ids = "\n".join(sorted(str(item["id"]) for item in items))
    return {"sha256": run.inputs.get("dataset", {}).get("sha256"),
            "items": len(items), "items_sha256": hashlib.sha256(ids.encode()).hexdigest(),
            "max_items": max_items}


def _score(run: StageRun, items: list[dict[str, Any]], predictions: dict[str, dict[str, Any]],
           tag: str, config: EvalConfig | ScoreConfig, temperature: float | None,
           generation_settings: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`score_all` with the corpus resolved and the sandbox checked first when an
    item's family runs code (recorded in the manifest; raises ConfigError below the
    sandbox's minimum unless ``allow_weak_sandbox``), and eval.json's ``settings``: what
    made and scored the answers (compare refuses two results that differ in them)."""
    code = {family.name for family in families.all_families() if family.runs_code}
    corpus_dir = env = None
    needed = any(item.get("category") in code for item in items)
    env_info = upstream_manifest_field(run.input_uri("dataset"), "test.jsonl",
                                       "execution_env") if needed else None
    if needed:
        run.sandbox = stage_isolation(config.allow_weak_sandbox)
        corpus_dir = corpus_dir_for(config.corpus, run.input_uri("dataset"),
                                    fetch=config.fetch_upstream_corpus)
        env = corpus_env.from_manifest(env_info)
    result = score_all(items, predictions, tag, corpus_dir=corpus_dir, temperature=temperature,
                       allow_weak_sandbox=config.allow_weak_sandbox, n_boot=N_BOOT,
                       seed=BOOTSTRAP_SEED, sandbox_timeout=SANDBOX_TIMEOUT,
                       python_path=(env,) if env is not None else ())
    unknown = dict.fromkeys(("sampling", "backend", "dtype", "device", "model", "adapter"))
    settings = {**unknown, **(generation_settings or {})}
    settings["dataset"] = _dataset_identity(run, items, settings.get("dataset", {}).get(
        "max_items") if isinstance(settings.get("dataset"), dict) else None)
    settings["corpus"] = {"needed": needed, "available": corpus_dir is not None,
                          "sha256": folder_sha256(corpus_dir) if corpus_dir else None,
                          "execution_env": (env_info or {}).get("sha256") if isinstance(
                              env_info, dict) else None}
    settings["scorer"] = {"metric_version": METRIC_VERSION, "n_boot": N_BOOT,
                          "bootstrap_seed": BOOTSTRAP_SEED, "sandbox_timeout": SANDBOX_TIMEOUT}
    settings["tag"] = tag
    result["settings"] = settings
    result["trackb"] = {"corpus_dir": str(corpus_dir) if corpus_dir else None}
    return result


def _finish(run: StageRun, result: dict[str, Any], configured_run: str | None) -> None:
    """Write eval.json, put its headline in the manifest and log it to the tracking run
    (the one training logged to) when MLflow or W&B are configured.

    A tracking server that fails now does not fail the stage: eval.json already holds
    every number, and rerunning an evaluation to repeat a log call would waste GPU time;
    the failure is said and recorded in the manifest (``tracking.error``).
    """
    run.write_json("eval.json", result)
    run.extra["metrics"] = headline_summary(result)
    values = {name: entry["value"] for name, entry in result["headline"].items()
              if isinstance(entry.get("value"), int | float)}
    name = run_name(configured_run, run.out.uri)
    try:
        run.extra["tracking"] = log_eval_metrics(name, values,
                                                 prefix=f"eval/{result['tag']}")
    except Exception as exc:  # noqa: BLE001 - any tracking backend's error, see above
        say(run.name, f"could not log the metrics to tracking run {name!r} "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "they are in eval.json")
        run.extra["tracking"] = {"run_name": name, "error": type(exc).__name__}


def score(config: ScoreConfig, out: Store) -> dict[str, Any]:
    """Score predictions made elsewhere; writes eval.json into ``out``.

    Raises ConfigError if an input is not given, MissingInputError if one is absent,
    InputError if a test item has no prediction, a row is malformed or the predictions
    were made for another test split, StoreError if ``out`` cannot be written.
    """
    for field in ("dataset", "predictions"):
        if not getattr(config, field):
            raise ConfigError(f"--{field} is required")
    check_configured()  # a tracker configured but not installed: before any work
    with stage_run("score", config, out) as run:
        items = load_items(run)
        predictions = index_predictions(run.read_jsonl("predictions"),
                                        run.input_uri("predictions"))
        generation = _generation_beside(run.input_uri("predictions"))
        settings = None
        if generation is not None:
            wanted_ids = set(generation["items"])
            items = [item for item in items if str(item["id"]) in wanted_ids]
            if not items:
                raise InputError(f"--predictions: {GENERATION_FILE} beside them names no item "
                                 "of --dataset (another test split?)")
            settings = generation.get("settings") if isinstance(
                generation.get("settings"), dict) else None
            made_for = ((settings or {}).get("dataset") or {}).get("sha256")
            if made_for and made_for != run.inputs.get("dataset", {}).get("sha256"):
                raise InputError(
                    f"--predictions were made for the test split with sha256 {made_for[:12]}…, "
                    f"--dataset {run.input_uri('dataset')} has "
                    f"{run.inputs['dataset']['sha256'][:12]}…: score them with that split")
        temperature = config.temperature
        sampling = (settings or {}).get("sampling") or {}
        if temperature is None and sampling.get("n_samples"):
            temperature = sampling.get("temperature")
        result = _score(run, items, predictions, config.tag, config, temperature, settings)
        wanted = {str(item["id"]) for item in items}
        result["trackb"].update({
            **{k: v for k, v in (generation or {}).items()
               if k not in ("items", "tag", "settings")},
            "predictions": config.predictions,
            "unused_predictions": len(set(predictions) - wanted),
            "temperature": temperature,
        })
        run.counts.update({"items": len(items), "predictions": len(predictions)})
        _finish(run, result, config.run_name)
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
