"""P4: eval generation, the seed's one-at-a-time loop vs trackb's batched eval (CPU).

The seed generated every answer with its own ``generate`` call: per item the greedy
answer, then each of the 2 samples (T = 0.6, top-p 0.95), batch size 1 (422.7 s for 46
items on a T4). trackb renders the same prompts and generates the greedy answers in one
left-padded batch pass and the samples in another (each prompt repeated per sample,
each row drawn by its own seeded generator).

Both run here on the same tiny model (built offline with trackb_core.tinymodel from a
few standard-library modules, a fixed number of pretraining steps), the same items
(prompts from functions of that corpus, one per task family in turn), the same
``max_new_tokens`` and the same number of answers (greedy + 2 samples), in the same
process, alternately, best of a few rounds. Timed: generation only (prompt rendering,
tokenization, generate, decoding) — scoring is the same work for both.
Goal (issue 5): ratio >= 3x.
"""

from __future__ import annotations

import ast
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

ITEMS = 16
SAMPLES = 2  # the seed's: greedy + 2 samples
MAX_NEW_TOKENS = 40
BATCH_SIZE = 16
ROUNDS = 2
PRETRAIN_STEPS = 3
STDLIB_MODULES = ("textwrap.py", "shlex.py", "string.py", "colorsys.py", "fnmatch.py")
TEMPLATES = (
    "Write a Google-style docstring for this function:\n```python\n{source}\n```",
    "Explain what this function does, its parameters and what it returns:\n"
    "```python\n{source}\n```",
    "This function has a bug. Find it and give the fixed function:\n```python\n{source}\n```",
    "Complete the body of this function:\n```python\n{stub}\n```",
    "Write pytest unit tests for this function:\n```python\n{source}\n```",
)


def _corpus(root: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = root / "corpus"
    folder.mkdir()
    for name in STDLIB_MODULES:
        shutil.copy(stdlib / name, folder / name)
    return folder


def _instructions(corpus: Path, count: int) -> list[str]:
    """``count`` task instructions built from the corpus's functions (5 to 40 lines)."""
    functions = []
    for path in sorted(corpus.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and 5 <= node.end_lineno - node.lineno <= 40:
                source = ast.get_source_segment(text, node)
                if source:
                    functions.append((source, source.splitlines()[0] + "\n    ..."))
    instructions = []
    for index in range(count):
        source, stub = functions[(index * 7) % len(functions)]
        template = TEMPLATES[index % len(TEMPLATES)]
        instructions.append(template.format(source=source, stub=stub))
    return instructions


def seed_style(model, tokenizer, prompts: list[str], stops: list[int]) -> list[list[str]]:
    """The seed's loop: one prompt, one answer per generate call."""
    import torch

    from trackb_core.generation import decode_answer

    answers = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        mine = []
        for sample in (False,) + (True,) * SAMPLES:
            options = ({"do_sample": True, "temperature": 0.6, "top_p": 0.95} if sample
                       else {"do_sample": False, "temperature": None, "top_p": None,
                             "top_k": None})
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stops,
                                     pad_token_id=tokenizer.pad_token_id, **options)
            ids = out[0, enc["input_ids"].shape[1]:].tolist()
            mine.append(decode_answer(tokenizer, ids, stops)[0])
        answers.append(mine)
    return answers


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from trackb_core.evaluate import generate_hf, load_model, stop_token_ids
    from trackb_core.generation import SamplingSettings
    from trackb_core.prompts import render_prompt
    from trackb_core.tinymodel import TinyModelConfig, build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        corpus = _corpus(work)
        model_dir = work / "model"
        started = time.perf_counter()
        # a few small steps: the model must exist and emit tokens, its quality is not timed
        build_tiny_model(TinyModelConfig(corpus=str(corpus), pretrain_steps=PRETRAIN_STEPS,
                                         batch_size=4, seq_len=128), model_dir)
        build_seconds = time.perf_counter() - started
        model, tokenizer, device, _ = load_model(str(model_dir), None, str(model_dir))
        instructions = _instructions(corpus, ITEMS)
        stops = stop_token_ids(model, tokenizer)

        def seed_run() -> None:
            prompts = [render_prompt(tokenizer, text) for text in instructions]
            seed_style(model, tokenizer, prompts, stops)

        def trackb_run() -> None:
            prompts = [render_prompt(tokenizer, text) for text in instructions]
            generate_hf(model, tokenizer, device, prompts,
                        [str(i) for i in range(len(prompts))], batch_size=BATCH_SIZE,
                        settings=SamplingSettings(max_new_tokens=MAX_NEW_TOKENS,
                                                  n_samples=SAMPLES, temperature=0.6,
                                                  top_p=0.95, seed=42))

        trackb_run()  # warm-up: first-call allocations count for neither side
        seed_times, trackb_times = [], []
        for _ in range(ROUNDS):
            for run, times in ((seed_run, seed_times), (trackb_run, trackb_times)):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seed_best, trackb_best = min(seed_times), min(trackb_times)
    answers = ITEMS * (1 + SAMPLES)
    print(f"eval generation, {ITEMS} items x (greedy + {SAMPLES} samples) = {answers} answers, "
          f"max_new_tokens {MAX_NEW_TOKENS}, tiny model on {device} "
          f"({torch.get_num_threads()} threads; model built in {build_seconds:.1f} s)")
    print(f"seed-style loop (batch 1, one generate per answer): {seed_best:.2f} s "
          f"(best of {ROUNDS})")
    print(f"trackb batched (batch {BATCH_SIZE}, left padding): {trackb_best:.2f} s "
          f"(best of {ROUNDS})")
    print(f"ratio: {seed_best / trackb_best:.1f}x faster; goal >= 3x")


if __name__ == "__main__":
    main()
