"""trackb_core.warmcache: the base model from the hub into the model cache, once.

No hub is reachable here: the download itself is huggingface_hub's, replaced by a stand-in
that lays out a snapshot as the hub cache would; the offline failure is the real one.
"""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from trackb_core.errors import InputError, UnavailableError
from trackb_core.stage import MANIFEST, cached_manifest
from trackb_core.store import LocalStore
from trackb_core.warmcache import WarmCacheConfig, download, run

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in snapshot_download: the model's files under snapshots/<commit>."""
    calls = []

    def snapshot_download(repo_id: str, revision: str | None = None) -> str:
        calls.append((repo_id, revision))
        folder = tmp_path / "hf" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_the_step_downloads_the_model_and_records_the_commit_it_cached(hub, tmp_path):
    out = LocalStore(tmp_path / "run").child("warm-cache")
    config = WarmCacheConfig(model="Qwen/Qwen2.5-Coder-1.5B", revision="main")
    manifest = run(config, out)
    assert hub == [("Qwen/Qwen2.5-Coder-1.5B", "main")]
    cached = json.loads(out.get_text("cache.json"))
    assert cached["model"] == "Qwen/Qwen2.5-Coder-1.5B"
    assert cached["revision"] == COMMIT
    assert (cached["files"], cached["bytes"]) == (2, 1002)
    assert manifest["counts"] == {"files": 2, "bytes": 1002}
    # A rerun of the same config is cached: the model is named, not hashed, by its id.
    assert out.exists(MANIFEST) and cached_manifest(config, out) is not None


@pytest.mark.parametrize("model", ["tiny", "s3://bucket/models/qwen", "/cache/models/qwen",
                                   "./qwen"])
def test_only_hub_ids_are_downloaded(model, hub):
    with pytest.raises(InputError, match="warm-cache downloads hub models"):
        download(model)
    assert hub == []


@pytest.mark.parametrize("error", [RepositoryNotFoundError, GatedRepoError])
def test_a_model_the_hub_refuses_is_an_input_error_not_retried(error, monkeypatch):
    import httpx2  # huggingface_hub's HTTP client

    url = "https://huggingface.co/api/models/org/private/revision/main"
    response = httpx2.Response(401, request=httpx2.Request("GET", url))

    def refuse(repo_id: str, revision: str | None = None) -> str:
        raise error(f"401 Client Error: Repository Not Found for url: {url}",
                    response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(InputError, match="cannot download org/private from the hub.*HF_TOKEN"):
        download("org/private")


def test_a_hub_out_of_reach_is_unavailable(monkeypatch, tmp_path):
    # The real huggingface_hub, offline, with nothing cached.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UnavailableError, match="cannot reach the hub to download org/name"):
        download("org/name")
