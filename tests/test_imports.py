"""Every module imports on a CPU-only machine, and cheaply: heavy libraries load lazily."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import trackb_core

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib", "boto3", "vllm")
MODULES = sorted(f"trackb_core.{m.name}" for m in pkgutil.iter_modules(trackb_core.__path__))


def test_all_modules_import_without_heavy_libraries():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at module level: {proc.stdout.strip()}"
    assert "trackb_core.cli" in MODULES and "trackb_core.pipeline" in MODULES
