"""The tiny-model stage: a small Qwen2-architecture code model built offline from a corpus.

Recipe, top to bottom: read the corpus's ``.py`` files, train a byte-level BPE tokenizer
on them (Qwen2's pre-tokenizer split, ChatML special tokens), build a randomly initialised
``Qwen2ForCausalLM`` from a ``Qwen2Config``, pretrain it briefly on the packed corpus
text under a CPU wall-clock budget, and save model + tokenizer + generation config so
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load it
offline.

Why pretrain at all: a random-weight tiny model cannot learn through LoRA (measured:
loss 8.27 -> 8.08 over 3 epochs with the output entropy pinned at ln(vocab)). A couple
of minutes of causal-LM pretraining on the corpus gives the frozen base usable features,
which is what makes the LoRA demo real.

The pretraining data is the corpus text only, never ChatML-formatted tasks: the chat
format is what SFT has to teach, so the baseline must not have seen it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.corpus import CORPUS_HELP, CorpusSetting
from trackb_core.errors import InputError
from trackb_core.stage import say, stage_run
from trackb_core.store import Store

STAGE = "tiny-model"
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)

# Qwen2's pre-tokenizer split: digits one by one, newlines grouped with leading spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen2.5 renders it, minus the default system prompt Qwen injects: trackb's
# prompts always carry their own system turn (trackb_core.prompts), so none is needed.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Files larger than this are skipped: generated tables, vendored blobs, not code style.
MAX_FILE_BYTES = 1_000_000


class TinyModelConfig(StageConfig):
    """Build a tiny Qwen2-architecture code model offline: corpus BPE tokenizer + brief CPU pretraining.

    Reads the corpus, or every corpus of a list (folders of .py files,
    pypi:NAME==VERSION, repository archives). Writes, directly in
    --out, a Hugging Face model folder (config.json, model.safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json, chat template) that
    --model accepts, plus pretrain_metrics.json. The default size learns through LoRA on
    2 CPU cores; only the wall-clock step count varies between machines (set
    --pretrain-steps for a byte-identical model).
    """

    corpus: CorpusSetting = input_field(
        "pypi:verl==0.9.1",
        description="Corpus (or corpora) to train the tokenizer and pretrain on. " + CORPUS_HELP,
        kind="corpus",
    )
    vocab_size: int = Field(4096, ge=300, description="BPE vocabulary size, special tokens included")
    hidden_size: int = Field(128, ge=8, description="Transformer hidden size")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers")
    num_heads: int = Field(4, ge=1, description="Attention heads (hidden_size must divide evenly)")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (grouped-query attention)")
    intermediate_size: int = Field(384, ge=8, description="MLP inner size")
    max_position_embeddings: int = Field(2048, ge=64, description="Longest sequence the model accepts")
    pretrain_seconds: float = Field(
        120.0, ge=0.0, description="CPU wall-clock budget for pretraining on the corpus, in seconds"
    )
    pretrain_steps: int | None = Field(
        None, ge=1,
        description="Exact number of pretraining steps instead of the time budget (reproducible bytes)",
    )
    seq_len: int = Field(256, ge=16, description="Tokens per packed pretraining chunk")
    batch_size: int = Field(16, ge=1, description="Chunks per pretraining step")
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (cosine decay to 10%)")
    seed: int = Field(42, description="Seed for tokenizer order, init, chunk shuffling")


def corpus_texts(root: Path, files: list[Path] | None = None, prefix: str = ""
                 ) -> list[tuple[str, str]]:
    """``(relative path, text)`` for every readable UTF-8 ``.py`` file under ``root`` (or
    of ``files``, those a corpus's globs take), sorted; paths start with ``prefix``.

    Raises InputError if there is none.
    """
    texts = []
    for path in sorted(root.rglob("*.py")) if files is None else files:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append((prefix + path.relative_to(root).as_posix(), text))
    if not texts:
        raise InputError(f"corpus {root} holds no readable UTF-8 .py files")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with ChatML tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte is a base token, so any text encodes without an unknown token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def check_sizes(config: TinyModelConfig) -> None:
    """Raises ConfigError if the head counts do not divide the hidden size evenly."""
    from trackb_core.errors import ConfigError

    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ConfigError(
            f"hidden_size {config.hidden_size} must divide by num_heads {config.num_heads}, "
            f"which must divide by num_kv_heads {config.num_kv_heads}"
        )


def build_model(config: TinyModelConfig, tokenizer):
    """A randomly initialised, seeded ``Qwen2ForCausalLM`` sized by ``config``.

    Raises ConfigError if the head counts do not divide the hidden size.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    check_sizes(config)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOT),
        use_sliding_window=False,
        dtype="float32",
    )
    torch.manual_seed(config.seed)
    return Qwen2ForCausalLM(model_config)


def pack_chunks(tokenizer, texts: list[str], seq_len: int):
    """The corpus as one token stream (documents joined by <|endoftext|>) cut into rows."""
    import torch

    eot = tokenizer.convert_tokens_to_ids(EOT)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eot)
    rows = len(stream) // seq_len
    if rows < 2:
        raise InputError(
            f"corpus too small to pretrain on: {len(stream)} tokens, need at least {2 * seq_len}"
        )
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def decay_steps(total: int) -> int:
    """Steps of the final LR decay in a run of ``total`` steps (the last fifth)."""
    return total // 5


def total_for_stable(stable: int) -> int:
    """The longest run whose constant-LR phase is ``stable`` steps long."""
    total = stable
    while (total + 1) - decay_steps(total + 1) <= stable:
        total += 1
    return total


def pretrain(model, chunks, config: TinyModelConfig) -> dict[str, Any]:
    """Causal-LM pretraining on ``chunks`` under the time (or step) budget; returns metrics.

    The schedule is warmup-stable-decay: linear warmup, a constant LR, then a linear decay
    to 10% over the last fifth of the steps. Under a time budget the decay starts at 80%
    of the budget and its length is fixed there, so the run is exactly the run
    ``pretrain_steps=<steps>`` gives: the weights depend on the step count alone.
    Raises TrackbError if the loss becomes NaN or infinite.
    """
    import torch
    from tqdm import tqdm

    from trackb_core.errors import TrackbError

    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(chunks), generator=generator)
    # A few held-out chunks measure the loss on text the model never trained on.
    n_heldout = min(8, max(1, len(chunks) // 20))
    heldout, train = chunks[order[:n_heldout]], chunks[order[n_heldout:]]
    if len(train) == 0:
        train = heldout

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=heldout, labels=heldout).loss.item()
        model.train()
        return loss

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    min_steps, warmup = 3, 10
    # None until known: the decay start is decided by the clock under a time budget.
    total: int | None = config.pretrain_steps

    def lr_at(step: int) -> float:
        peak = config.learning_rate
        if total is not None and step >= total - decay_steps(total):
            done = (step - (total - decay_steps(total)) + 1) / (decay_steps(total) + 1)
            return peak * (1.0 - 0.9 * done)
        return peak * min(1.0, (step + 1) / warmup)

    def batch_at(step: int):
        start = (step * config.batch_size) % len(train)
        idx = [(start + i) % len(train) for i in range(min(config.batch_size, len(train)))]
        return train[idx]

    initial_heldout = heldout_loss()
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc=f"[{STAGE}] pretrain", unit="step", disable=None)
    step = 0
    while total is None or step < total:
        if total is None and step >= min_steps and (
            time.perf_counter() - started >= 0.8 * config.pretrain_seconds
        ):
            total = total_for_stable(step)
            bar.total = total
            bar.refresh()
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = batch_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise TrackbError(f"pretraining loss became {loss.item()} at step {step}; "
                              "lower --learning-rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        step += 1
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    tail = losses[-min(10, len(losses)):]
    tokens = len(losses) * len(batch_at(0)) * config.seq_len
    return {
        "steps": len(losses),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_last10_mean": round(sum(tail) / len(tail), 4),
        "heldout_loss_initial": round(initial_heldout, 4),
        "heldout_loss_final": round(heldout_loss(), 4),
        "losses": losses,
        "train_chunks": len(train),
        "heldout_chunks": n_heldout,
    }


def build_tiny_model(config: TinyModelConfig, out_dir: Path) -> dict[str, Any]:
    """Build, pretrain and save the tiny model into ``out_dir``; returns pretrain metrics.

    Every corpus of ``config.corpus`` is read (each must hold a usable file). Raises
    InputError if a corpus has no usable .py files or there is too little text,
    ConfigError on inconsistent sizes, MissingInputError if the corpus cannot be found,
    TrackbError if pretraining diverges.
    """
    import torch
    from transformers import GenerationConfig

    from trackb_core.corpus import corpus_files, resolve_corpora

    check_sizes(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpora = resolve_corpora(config.corpus)
    # globs choose a corpus's files; without them every file, in the order one corpus
    # always had (so a single corpus gives the same model as before)
    files = [text for corpus in corpora for text in corpus_texts(
        Path(corpus.path), corpus_files(corpus.path, corpus.include, corpus.exclude)
        if corpus.include or corpus.exclude else None,
        f"{corpus.key}/" if len(corpora) > 1 else "")]
    texts = [text for _, text in files]
    say(STAGE, f"{len(files)} .py files, {sum(len(t) for t in texts):,} characters")

    torch.manual_seed(config.seed)
    tokenizer = train_tokenizer(texts, config.vocab_size)
    say(STAGE, f"tokenizer: {len(tokenizer)} tokens")
    chunks = pack_chunks(tokenizer, texts, config.seq_len)
    say(STAGE, f"{chunks.numel():,} tokens in {len(chunks)} chunks of {config.seq_len}")

    model = build_model(config, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    budget = (f"{config.pretrain_steps} steps" if config.pretrain_steps
              else f"{config.pretrain_seconds:.0f} s")
    say(STAGE, f"Qwen2ForCausalLM with {params:,} parameters; pretraining for {budget}")
    metrics = pretrain(model, chunks, config)
    say(STAGE, f"pretrained {metrics['steps']} steps in {metrics['seconds']} s: loss "
               f"{metrics['loss_first']} -> {metrics['loss_last']} (held-out "
               f"{metrics['heldout_loss_initial']} -> {metrics['heldout_loss_final']})")

    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(EOT)],
        pad_token_id=tokenizer.convert_tokens_to_ids(EOT),
        bos_token_id=tokenizer.convert_tokens_to_ids(EOT),
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    metrics.update({
        "params": params,
        "vocab_size": len(tokenizer),
        "corpus_files": len(files),
        "corpus_tokens": int(chunks.numel()),
    })
    (out_dir / "pretrain_metrics.json").write_text(
        json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return metrics


def run(config: TinyModelConfig, out: Store) -> dict:
    """Run the tiny-model stage into ``out`` (the model files sit at its root).

    Raises what :func:`build_tiny_model` raises, and StoreError if ``out`` is not writable.
    """
    with stage_run(STAGE, config, out) as run:
        with tempfile.TemporaryDirectory(prefix="trackb-tiny-") as tmp:
            with run.timed("build"):
                metrics = build_tiny_model(config, Path(tmp))
            with run.timed("upload"):
                # run.write_dir would nest under a key; the model must sit at the root
                # so that this folder itself is a valid --model.
                for path in sorted(Path(tmp).rglob("*")):
                    if path.is_file():
                        run.write_bytes(path.relative_to(tmp).as_posix(), path.read_bytes())
        run.counts.update({
            "params": metrics["params"],
            "vocab": metrics["vocab_size"],
            "pretrain_steps": metrics["steps"],
            "pretrain_loss_first": metrics["loss_first"],
            "pretrain_loss_last": metrics["loss_last"],
            "pretrain_heldout_loss_initial": metrics["heldout_loss_initial"],
            "pretrain_heldout_loss_final": metrics["heldout_loss_final"],
        })
    return run.manifest
