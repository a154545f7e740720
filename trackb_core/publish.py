"""Publish a build-dataset output to the Hugging Face Hub as a dataset repository.

``trackb publish --dataset URI --repo-id OWNER/NAME`` creates the repository if needed
(``HfApi.create_repo(repo_type="dataset", exist_ok=True)``) and uploads the dataset card
and the data in one commit (``HfApi.upload_folder``): ``README.md``, ``train.jsonl``,
``test.jsonl`` and ``data/*.parquet`` (the card's YAML header points the Hub at the
Parquet files). ``manifest.json`` stays home: it records this machine's paths, and the
card already states the provenance.

The token comes from ``HF_TOKEN`` or the file ``huggingface-cli login`` / ``hf auth login``
writes; the Hub from ``HF_ENDPOINT`` (default https://huggingface.co). huggingface_hub is
imported inside :func:`publish`, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from trackb_core.config import StageConfig
from trackb_core.errors import ConfigError, MissingInputError, TrackbError, UnavailableError
from trackb_core.stage import local_dir

REQUIRED_FILES = ("README.md", "train.jsonl")
UPLOADED = ("README.md", "train.jsonl", "test.jsonl", "data/*.parquet")
_TRUE = ("1", "true", "yes", "on")
# huggingface_hub goes offline on either variable (trackb's Makefile and tests set them)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
OFFLINE_MESSAGE = "Hub offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): unset it " \
    "to publish"


class PublishConfig(StageConfig):
    """Push a build-dataset output folder to the Hugging Face Hub as a dataset repository.

    Uploads README.md (the dataset card), train.jsonl, test.jsonl and data/*.parquet in
    one commit, creating the repository if it does not exist; manifest.json is not
    uploaded. The token is read from HF_TOKEN or the `huggingface-cli login` token file;
    HF_ENDPOINT selects another Hub. Exit codes: 64 no token or a rejected one, 66 the
    folder lacks the dataset files, 75 the Hub cannot be reached.
    """

    dataset: str = Field(..., description="The build-dataset output folder (local path or "
                         "s3://)")
    repo_id: str = Field(..., pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$",
                         description="Hub dataset repository, OWNER/NAME")
    private: bool = Field(False, description="Create the repository as private (an existing "
                          "repository keeps its visibility)")
    commit_message: str = Field("Upload trackb dataset", description="Message of the Hub commit")


def dataset_folder(uri: str) -> Path:
    """The local folder of the dataset at ``uri`` (downloaded first if remote).

    Raises MissingInputError when there is no folder or it lacks README.md/train.jsonl.
    """
    folder = local_dir(uri)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise MissingInputError(f"--dataset {uri} is not a build-dataset output: it lacks "
                                f"{', '.join(missing)}")
    return folder


def hub_token() -> str:
    """The Hugging Face token. Raises ConfigError when none is set."""
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`")
    return token


def publish(config: PublishConfig) -> str:
    """Upload the dataset folder ``config.dataset`` to ``config.repo_id``; returns its URL.

    Raises MissingInputError (no dataset there), ConfigError (offline mode on, no token,
    the Hub refused the token or the repository), UnavailableError (the Hub is
    unreachable or failing now: retrying may help).
    """
    folder = dataset_folder(config.dataset)
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_VARIABLES):
        raise ConfigError(OFFLINE_MESSAGE)
    token = hub_token()
    from huggingface_hub import HfApi

    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo = api.create_repo(config.repo_id, repo_type="dataset", exist_ok=True,
                               private=config.private)
        api.upload_folder(repo_id=config.repo_id, repo_type="dataset", folder_path=folder,
                          allow_patterns=list(UPLOADED), commit_message=config.commit_message)
    except Exception as exc:
        error = _hub_error(exc, endpoint or "https://huggingface.co")
        if error is None:
            raise
        raise error from exc
    return str(repo)


def _hub_error(exc: Exception, endpoint: str) -> TrackbError | None:
    """The trackb error for a failed Hub call; None for a failure that is not the Hub's."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return ConfigError(OFFLINE_MESSAGE)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        message = str(exc).splitlines()[0]
        if status is not None and (status >= 500 or status == 429):
            return UnavailableError(f"the Hub at {endpoint} is failing now ({message})")
        return ConfigError(f"the Hub at {endpoint} refused the upload ({message})")
    if _is_network_error(exc):
        return UnavailableError(f"cannot reach the Hub at {endpoint}: {exc}")
    return None


def _is_network_error(exc: Exception) -> bool:
    # huggingface_hub speaks HTTP through httpx (or its fork): match its transport errors
    # by name rather than importing the client it happens to use.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "TimeoutException",
                                                     "ConnectionError"})

