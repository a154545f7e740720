"""benchmarks/gpu_bench.py, exercised on CPU at the tiny shape (the GPU run is by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ("ok", "partial")
NOT_MEASURED = ("skipped", "not installed", "failed")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def assert_numbers_or_reason(row: dict) -> None:
    """A measured row has a positive rate; any other row says why it has none."""
    assert row["status"] in MEASURED + NOT_MEASURED, row
    if row["status"] in MEASURED:
        assert row["tokens_per_second"] > 0 and row["tokens"] > 0 and row["seconds"] > 0, row
    else:
        assert row["reason"].strip(), row


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--shape tiny`` run on CPU, as a user would start it, with OUT set."""
    if cuda_available():
        pytest.skip("CUDA is present: the tiny CPU run is for machines without a GPU")
    tmp = tmp_path_factory.mktemp("gpu_bench")
    markdown = tmp / "BENCHMARKS.md"
    markdown.write_text(
        "# Benchmarks\n\nBefore the markers.\n\n"
        f"{gpu_bench.BEGIN_MARKER}\nold results\n{gpu_bench.END_MARKER}\n\nAfter the markers.\n",
        encoding="utf-8")
    out_dir = tmp / "out"
    env = {**os.environ, "OUT": str(out_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--shape", "tiny",
         "--budget-seconds", "480", "--out", str(markdown)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out_dir / gpu_bench.JSON_NAME).read_text(encoding="utf-8"))
    return result, markdown, out_dir, proc


def test_tiny_run_has_every_section_with_numbers_or_reasons(tiny_run):
    result, *_ = tiny_run
    assert result["shape"] == "tiny"
    env = result["environment"]
    for key in ("device", "date", "torch", "transformers", "peft"):
        assert env[key], key
    assert result["model"]["params"] > result["model"]["non_embedding_params"] > 0

    train = {row["name"]: row for row in result["train"]["rows"]}
    fp32 = train["torch + peft loop, fp32"]
    # "partial" only when a busy machine made a step outlast the row's share of the budget
    assert fp32["status"] in MEASURED and fp32["optimizer_steps"] >= 1, fp32
    # effective batch 16 (4 x 4) of seq_len tokens per optimizer step
    assert fp32["tokens"] == fp32["optimizer_steps"] * 16 * gpu_bench.SHAPES["tiny"].seq_len
    assert fp32["trainable_params"] > 0
    assert fp32["mfu"] is None and "no fp32 peak" in fp32["mfu_reason"]
    assert fp32["peak_memory_gib"] is None and fp32["peak_memory_reason"]
    for precision in ("fp16", "bf16"):
        row = train[f"torch + peft loop, {precision}"]
        assert (row["status"], row["reason"]) == ("skipped", "needs CUDA")
    trainer = next(row for row in result["train"]["rows"] if row["path"] == "trl")
    if env["trl"]:
        # trackb's trainer runs here: a "failed" row means build_trainer's use broke
        assert trainer["status"] in MEASURED, trainer
        # examples fill seq_len but for a small margin: about the plain loop's work
        seq_len = gpu_bench.SHAPES["tiny"].seq_len
        assert seq_len - 32 <= trainer["mean_tokens_per_example"] <= seq_len
        assert trainer["ratio_vs_plain_loop"] > 0
    else:
        assert (trainer["status"], trainer["reason"].split(":")[0]) == (
            "not installed", "not installed")
    for row in result["train"]["rows"]:
        assert_numbers_or_reason(row)

    rows = result["eval"]["rows"]
    seed_loop = rows[0]
    assert seed_loop["name"].startswith("seed loop") and seed_loop["ratio_vs_seed_loop"] == 1.0
    batched = next(row for row in rows if row["name"].startswith("batched"))
    assert batched["status"] in MEASURED and batched["ratio_vs_seed_loop"] > 0, batched
    shape = gpu_bench.SHAPES["tiny"]
    # every answer is pinned to new_tokens, so a call's tokens are known in advance
    assert seed_loop["tokens"] == seed_loop["calls"] * shape.new_tokens, seed_loop
    if seed_loop["status"] == batched["status"] == "ok":
        answers = shape.prompts * (1 + gpu_bench.N_SAMPLES)
        assert batched["tokens"] == seed_loop["tokens"] == answers * shape.new_tokens
    vllm = next(row for row in rows if row["name"].startswith("vLLM"))
    assert vllm["status"] in NOT_MEASURED and vllm["reason"]
    for row in rows:
        assert_numbers_or_reason(row)


def test_tiny_run_rewrites_only_the_marked_section(tiny_run):
    result, markdown, out_dir, _ = tiny_run
    text = markdown.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nBefore the markers.\n\n")
    assert text.endswith("\n\nAfter the markers.\n")
    assert "old results" not in text
    inside = text.split(gpu_bench.BEGIN_MARKER)[1].split(gpu_bench.END_MARKER)[0]
    assert f"### tiny on {result['environment']['device']}" in inside
    assert "| torch+peft | fp32 |" in inside and "skipped: needs CUDA" in inside
    assert "seed loop" in inside and "vLLM" in inside
    assert text.count(gpu_bench.BEGIN_MARKER) == text.count(gpu_bench.END_MARKER) == 1
    # a copy comes back from a GPU machine through $OUT
    assert (out_dir / "BENCHMARKS.md").read_text(encoding="utf-8") == text


def test_write_section_appends_markers_then_replaces_in_place(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Title\n\nIntro.\n", encoding="utf-8")
    gpu_bench.write_section(path, "first\n")
    assert path.read_text() == (f"# Title\n\nIntro.\n\n{gpu_bench.BEGIN_MARKER}\nfirst\n"
                                f"{gpu_bench.END_MARKER}\n")
    gpu_bench.write_section(path, "second")
    assert path.read_text() == (f"# Title\n\nIntro.\n\n{gpu_bench.BEGIN_MARKER}\nsecond\n"
                                f"{gpu_bench.END_MARKER}\n")
    fresh = tmp_path / "new.md"
    gpu_bench.write_section(fresh, "only")
    assert fresh.read_text() == f"{gpu_bench.BEGIN_MARKER}\nonly\n{gpu_bench.END_MARKER}\n"


def test_checked_in_benchmarks_md_has_the_markers():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    begin = text.index(gpu_bench.BEGIN_MARKER)
    assert text.index(gpu_bench.END_MARKER) > begin
    assert "make bench-gpu" in text


@pytest.mark.parametrize(("device", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp16", 989.0),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
    ("Tesla T4", "fp16", 65.0),
    ("Tesla T4", "bf16", None),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_peak_tflops_by_device_name(device, precision, peak):
    assert gpu_bench.peak_tflops(device, precision) == peak


def test_mfu_is_six_n_tokens_over_peak():
    facts = gpu_bench.throughput(tokens=10_000, seconds=2.0, params=1_000_000_000,
                                 device="NVIDIA H100 80GB HBM3", precision="bf16")
    assert facts["tokens_per_second"] == 5000.0
    assert facts["mfu"] == round(6 * 1e9 * 5000 / 989e12, 4)


def test_qwen_shape_matches_the_published_parameter_count():
    facts = gpu_bench.model_facts(gpu_bench.SHAPES["qwen2.5-coder-1.5b"])
    # Qwen2.5-Coder-1.5B's model card: 1.54B parameters, 1.31B without the embedding.
    assert facts["params"] == 1_543_714_304
    assert round(facts["non_embedding_params"] / 1e9, 2) == 1.31


def test_fallback_lora_settings_match_train_config():
    assert gpu_bench.seed_lora_settings() == gpu_bench.FALLBACK_LORA_SETTINGS


def test_full_shape_on_cpu_skips_with_a_reason_instead_of_running():
    if cuda_available():
        pytest.skip("CUDA is present: the full shape would really run")
    result = gpu_bench.run_benchmark("qwen2.5-coder-1.5b", budget_seconds=60)
    rows = result["train"]["rows"] + result["eval"]["rows"][:2]
    assert rows and all(row["status"] == "skipped" and "needs CUDA" in row["reason"]
                        for row in rows)
    assert result["eval"]["rows"][2]["reason"] in ("not installed: vllm",
                                                   rows[0]["reason"])
    assert "needs CUDA" in gpu_bench.render_markdown(result)


def test_an_exhausted_budget_skips_every_part_with_a_reason():
    result = gpu_bench.run_benchmark("tiny", budget_seconds=gpu_bench.RESERVE_SECONDS + 0.5)
    for row in result["train"]["rows"] + result["eval"]["rows"]:
        assert row["status"] in NOT_MEASURED and row["reason"], row
    assert any("time budget" in row["reason"] for row in result["train"]["rows"])


def test_a_failing_part_becomes_a_failed_row(tmp_path):
    def broken(seconds):
        raise RuntimeError("CUDA out of memory\nmore detail")

    row = gpu_bench.measure("x", gpu_bench.Budget(100), "batched", None, broken, path="p")
    assert row == {"name": "x", "status": "failed", "path": "p",
                   "reason": "RuntimeError: CUDA out of memory"}
