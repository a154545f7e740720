"""Tests for `trackb publish` (trackb_core.publish), as far as an offline machine allows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trackb_core.errors import ConfigError, MissingInputError, UnavailableError
from trackb_core.publish import PublishConfig, publish


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    folder = tmp_path / "build-dataset"
    (folder / "data").mkdir(parents=True)
    for name in ("README.md", "train.jsonl", "test.jsonl", "manifest.json",
                 "data/train.parquet", "data/test.parquet"):
        (folder / name).write_text(f"{name}\n")
    return folder


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """No token anywhere, online mode; HF_ENDPOINT and HF_TOKEN left to each test."""
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub read these when first imported; point them away from any real login
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def config(folder, repo_id="someone/trackb-verl") -> PublishConfig:
    return PublishConfig(dataset=str(folder), repo_id=repo_id)


def test_a_folder_without_the_dataset_files_is_missing_input(tmp_path, dataset_dir, hub_env):
    with pytest.raises(MissingInputError, match="no such folder"):
        publish(config(tmp_path / "nothing"))
    (dataset_dir / "train.jsonl").unlink()
    with pytest.raises(MissingInputError, match="lacks train.jsonl"):
        publish(config(dataset_dir))


def test_no_token_is_a_config_error(dataset_dir, hub_env):
    with pytest.raises(ConfigError, match="HF_TOKEN or run `huggingface-cli login`"):
        publish(config(dataset_dir))


def test_offline_mode_is_a_config_error(dataset_dir, hub_env):
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    hub_env.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(ConfigError, match="offline mode is on"):
        publish(config(dataset_dir))


def test_an_unreachable_hub_is_unavailable(dataset_dir, hub_env, closed_port):
    hub_env.setenv("HF_TOKEN", "hf_test")
    hub_env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(UnavailableError, match=f"cannot reach the Hub at .*:{closed_port}"):
        publish(config(dataset_dir))


def test_publish_creates_the_dataset_repo_and_uploads_the_dataset_files(dataset_dir, hub_env):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", endpoint, token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://hub.example/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    hub_env.setattr(huggingface_hub, "HfApi", RecordingApi)
    hub_env.setenv("HF_TOKEN", "hf_test")
    url = publish(config(dataset_dir))
    assert url == "https://hub.example/datasets/someone/trackb-verl"
    assert calls[0] == ("init", None, "hf_test")
    assert calls[1] == ("create_repo", "someone/trackb-verl",
                        {"repo_type": "dataset", "exist_ok": True, "private": False})
    upload = calls[2][1]
    assert upload["repo_type"] == "dataset" and Path(upload["folder_path"]) == dataset_dir
    uploaded = {p.relative_to(dataset_dir).as_posix() for pattern in upload["allow_patterns"]
                for p in dataset_dir.glob(pattern)}
    assert uploaded == {"README.md", "train.jsonl", "test.jsonl", "data/train.parquet",
                        "data/test.parquet"}  # manifest.json holds this machine's paths


def test_repo_id_must_be_owner_slash_name(dataset_dir):
    from trackb_core.config import build_config

    with pytest.raises(ConfigError, match="repo_id"):
        build_config(PublishConfig, {"dataset": str(dataset_dir), "repo_id": "no-owner"})


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                          "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_OIDC_RESOURCE")}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), **env)
    return subprocess.run([sys.executable, "-m", "trackb_core.cli", "publish", *args],
                          capture_output=True, text=True, env=clean, timeout=120)


def test_cli_exit_codes_tell_missing_token_from_unreachable_hub(dataset_dir, tmp_path,
                                                                closed_port):
    args = ["--dataset", str(dataset_dir), "--repo-id", "someone/trackb-verl"]
    no_token = run_cli(args, tmp_path)
    assert no_token.returncode == 64, no_token.stderr
    assert no_token.stderr.startswith("trackb: error: no Hugging Face token")
    unreachable = run_cli(args, tmp_path, HF_TOKEN="hf_test",
                          HF_ENDPOINT=f"http://127.0.0.1:{closed_port}")
    assert unreachable.returncode == 75, unreachable.stderr
    assert "cannot reach the Hub" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
