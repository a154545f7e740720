"""Shared fixtures. Nothing here touches the network or a model hub."""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig
import uuid
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


@pytest.fixture(scope="session")
def qwen_template_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with the published Qwen2.5-Coder-Instruct chat template (default
    system prompt, tool branches; tests/qwen_chat_template.py) in place of its ChatML."""
    from qwen_chat_template import QWEN2_5_CODER_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("qwen_template_model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tokenizer.chat_template = QWEN2_5_CODER_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def verl_dataset(tmp_path_factory):
    """``(build-dataset folder, {stage: manifest})`` of extract, generate (reference) and
    build-dataset over the real verl 0.9.1 corpus; built once per session (about a
    minute), shared by the integration tests that look at it."""
    from trackb_core import dataset, extract, generate
    from trackb_core.dataset import DatasetConfig
    from trackb_core.extract import ExtractConfig
    from trackb_core.generate import GenerateConfig
    from trackb_core.store import LocalStore

    root = LocalStore(tmp_path_factory.mktemp("verl"))
    manifests = {
        # hidden tests are derived where a test needs them (tests/test_trivial_answers.py
        # does, over verl/utils): over all of verl they would cost minutes here
        "extract": extract.run(ExtractConfig(corpus="pypi:verl==0.9.1", derive_tests=False),
                               root.child("extract")),
        "generate": generate.run(GenerateConfig(tasks=root.child("extract").uri),
                                 root.child("generate")),
        "dataset": dataset.run(DatasetConfig(responses=root.child("generate").uri),
                               root.child("build-dataset")),
    }
    return root.child("build-dataset").root, manifests


# -- S3: moto's real server over HTTP -------------------------------------------------
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on a free local port, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    """Point trackb's S3 client at moto with fake credentials and no user AWS config."""
    monkeypatch.setenv("TRACKB_S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    # A developer's ~/.aws must not leak into the test.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_endpoint


@pytest.fixture
def bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"trackb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name=REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture
def closed_port() -> int:
    """A local port with no server: connecting to it is refused at once."""
    return free_port()
