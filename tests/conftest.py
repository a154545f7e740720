"""Shared fixtures. Nothing here touches the network or a model hub."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, real Python modules from this interpreter's standard library: a corpus that
# exists on every machine without a download, and is never committed here.
STDLIB_MODULES = ("textwrap.py", "shlex.py", "string.py", "json", "colorsys.py", "fnmatch.py")


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A corpus folder holding a few standard-library modules (a few hundred functions)."""
    root = tmp_path_factory.mktemp("stdlib_corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_MODULES:
        source = stdlib / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, stdlib_corpus) -> Path:
    """A tiny Qwen2-architecture model with a corpus-trained tokenizer, barely pretrained."""
    from trackb_core.tinymodel import TinyModelConfig, build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    config = TinyModelConfig(corpus=str(stdlib_corpus), pretrain_seconds=3.0)
    build_tiny_model(config, out)
    return out
