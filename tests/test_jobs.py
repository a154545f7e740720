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
