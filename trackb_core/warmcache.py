"""``trackb warm-cache``: the base model from the hub into the model cache, once.

    trackb warm-cache --model Qwen/Qwen2.5-Coder-1.5B --out runs/x/warm-cache

On Kubernetes every pod mounts the model cache at /cache (``HF_HOME=/cache/huggingface``).
When that cache is a PersistentVolumeClaim (``kubernetes.cache.pvc``) and the model a hub
id, a run starts with this step (trackb_core.pipeline.warms_cache): it may reach the hub,
downloads the whole model repository into the cache, and every step that loads the model
waits for it. Those steps then load the model from the cache with ``HF_HUB_OFFLINE=1``:
one download instead of one per pod (train and predict-baseline start together and would
race on the same files), and no hub call, so a pod whose egress is locked finds it too.

The step's output is ``cache.json``: which model, which commit (the hub revision the cache
now holds), how many files and bytes. The download is resumable and idempotent: a
second run finds the files in place and only checks the revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import InputError, UnavailableError
from trackb_core.pipeline import is_hub_model
from trackb_core.stage import say, stage_run
from trackb_core.store import Store

STAGE = "warm-cache"


class WarmCacheConfig(StageConfig):
    """Download a hub model into the cache (HF_HOME), so that later pods load it offline."""

    model: str | None = input_field(description="The hub model id (org/name) to download: "
                                    "the pipeline's model.", kind="model")
    revision: str | None = Field(None, description="Branch, tag or commit of the model; "
                                 "empty: the repository's default branch.")


def download(model: str, revision: str | None = None) -> dict[str, Any]:
    """Download ``model``'s repository into the hub cache (HF_HOME); ``{"model",
    "revision" (the commit), "path", "files", "bytes"}``.

    Raises InputError when ``model`` is not a hub id, or the hub has no such model,
    revision or access for this token (a retry cannot help); UnavailableError when the
    hub cannot be reached.
    """
    if not is_hub_model(model):
        raise InputError(f"warm-cache downloads hub models (org/name), not {model!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id=model, revision=revision))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise InputError(f"cannot download {model}"
                         f"{'@' + revision if revision else ''} from the hub: "
                         f"{str(exc).splitlines()[0]} (check the id and HF_TOKEN)") from exc
    except OSError as exc:  # connection errors and the offline mode's LocalEntryNotFound
        raise UnavailableError(f"cannot reach the hub to download {model}: {exc}") from exc
    files = [p for p in path.rglob("*") if p.is_file()]
    return {"model": model, "revision": path.name, "path": str(path), "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}


def run(config: WarmCacheConfig, out: Store) -> dict:
    """Fill the cache with ``config.model``; writes ``cache.json`` into ``out``.

    Raises what :func:`download` raises, and StoreError if ``out`` is not writable.
    """
    with stage_run(STAGE, config, out) as run:
        with run.timed("download"):
            cached = download(config.model or "", config.revision)
        run.write_json("cache.json", cached)
        run.counts.update({"files": cached["files"], "bytes": cached["bytes"]})
        say(STAGE, f"{cached['model']}@{cached['revision'][:12]} in the cache: "
            f"{cached['files']} files, {cached['bytes'] / 2**30:.2f} GiB")
    return run.manifest
