"""Every shipped config loads, and says how it is run."""

from __future__ import annotations

from pathlib import Path

import pytest

from trackb_core.config import build_config, load_yaml
from trackb_core.pipeline import PipelineConfig

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# trackb ") and str(path.relative_to(path.parents[2])) in first
    config = build_config(PipelineConfig, load_yaml(path))
    assert config.corpus


@pytest.mark.parametrize("module", ["extract", "generate", "build_dataset", "train", "eval",
                                    "score", "compare", "tiny_model", "run_all"])
def test_every_job_entry_imports(module):
    imported = __import__(f"jobs.{module}", fromlist=["run_command"])
    assert callable(imported.run_command)


def test_sigterm_to_a_stage_running_as_pid_1_ends_it_with_143_and_keeps_earlier_results(
        tmp_path, stdlib_corpus):
    """As in a pod: the entry point is PID 1 (no default SIGTERM action there), the
    kubelet sends the image's STOPSIGNAL, SIGTERM. trackb's handler makes it unwind:
    exit 143, no manifest for the stage it was in, earlier stages intact."""
    import shutil
    import signal
    import subprocess
    import sys
    import threading

    import yaml

    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--user", "--map-root-user", "--pid",
                            "--fork", "true"], capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no unshare with user and pid namespaces here: cannot run as PID 1")
    root = Path(__file__).parents[1]
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "corpus": str(stdlib_corpus), "model": "tiny", "store": str(tmp_path / "store"),
        "run_id": "sigterm", "extract": {"max_functions": 30, "derive_tests": False},
        # Long enough that SIGTERM arrives while it runs, whatever the machine.
        "tiny_model": {"pretrain_steps": 1_000_000}}))
    process = subprocess.Popen(
        [unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child",
         sys.executable, "-m", "jobs.run_all", "--config", str(config)],
        cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    lines: list[str] = []
    in_tiny_model = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("[tiny-model]"):
                in_tiny_model.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert in_tiny_model.wait(600), "".join(lines)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 1, children  # the Python that is PID 1 in its namespace
        __import__("os").kill(int(children[0]), signal.SIGTERM)
        try:
            process.wait(300)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM to PID 1 was ignored: no handler")
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
    assert process.returncode == 143, "".join(lines)
    assert any("terminated (SIGTERM)" in line for line in lines), "".join(lines)
    run = tmp_path / "store" / "runs" / "sigterm"
    assert (run / "extract" / "manifest.json").is_file()
    assert not (run / "tiny-model" / "manifest.json").exists()
