"""Hashing stored files without holding them, and without downloading what trackb wrote.

Issue 13: a rerun hashes every input; a 3 GB model loaded whole OOM-killed the launcher.
The digests must stay the sha256 the manifests always recorded, so old runs stay cached.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from test_stage import RemoteLike

from trackb_core import store as store_module
from trackb_core.config import StageConfig, input_field
from trackb_core.errors import MissingInputError
from trackb_core.stage import MANIFEST, cached_manifest, fingerprint, stage_run, tree_sha256
from trackb_core.store import DIGEST_CACHE, S3Store, Store, open_store


@pytest.fixture(autouse=True)
def trackb_cache(tmp_path, monkeypatch) -> Path:
    """A private $TRACKB_CACHE: the digest cache of one test is never another's."""
    cache = tmp_path / "trackb-cache"
    monkeypatch.setenv("TRACKB_CACHE", str(cache))
    return cache


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"s3://{request.getfixturevalue('bucket')}/base")


@pytest.fixture
def s3(bucket) -> S3Store:
    return open_store(f"s3://{bucket}/base")


def count_gets(s3: S3Store) -> Counter[str]:
    """GetObject calls per key (relative to ``s3``) from now on."""
    gets: Counter[str] = Counter()
    root = f"{s3.prefix}/"
    s3.client.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: gets.update([params["Key"].removeprefix(root)]))
    return gets


def put_foreign(s3: S3Store, key: str, data: bytes, **extra) -> None:
    """An object some other tool uploaded: no sha256 of trackb's in its metadata."""
    s3.client.put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{key}", Body=data, **extra)


def old_tree_sha256(store: Store) -> str:
    """tree_sha256 as it was before issue 13: every file read whole, then hashed."""
    digest = hashlib.sha256()
    for key in store.list():
        if key != MANIFEST:
            data_digest = hashlib.sha256(store.get_bytes(key)).hexdigest()
            digest.update(key.encode() + b"\0" + data_digest.encode())
    return digest.hexdigest()


def fill(store: Store, tmp_path: Path) -> None:
    """A small model-like tree: put_bytes, a multipart put_file, an empty file."""
    store.put_text("model/config.json", '{"r": 8}')
    store.put_bytes("model/empty.bin", b"")
    big = tmp_path / "weights.bin"
    big.write_bytes(bytes(range(256)) * 30_000)  # 7.3 MiB: two parts at a 5 MiB chunk
    store.put_file("model/weights.bin", big)


@pytest.fixture
def small_parts(monkeypatch):
    # S3's smallest part is 5 MiB; a multipart upload without writing 64 MiB.
    monkeypatch.setattr(store_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(store_module, "MULTIPART_CHUNK", 5 * 1024 * 1024)


# -- same digests as before ------------------------------------------------------------


def test_sha256_is_the_sha256_of_the_whole_content(store, tmp_path, small_parts):
    fill(store, tmp_path)
    for key in store.list():
        assert store.sha256(key) == hashlib.sha256(store.get_bytes(key)).hexdigest()


def test_a_foreign_s3_object_hashes_to_the_sha256_of_its_content(s3):
    put_foreign(s3, "a.bin", b"x" * 3_000_000)
    assert s3.sha256("a.bin") == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_tree_sha256_is_unchanged_so_earlier_manifests_still_verify(store, tmp_path,
                                                                   small_parts):
    class ModelConfig(StageConfig):
        """A stage downstream of a model folder."""

        model: str = input_field("", kind="dir", description="A model folder.")

    fill(store, tmp_path)
    if isinstance(store, S3Store):
        put_foreign(store, "model/foreign.bin", b"from elsewhere")
    assert tree_sha256(store.child("model")) == old_tree_sha256(store.child("model"))

    # A manifest whose fingerprint was computed the old way is still a cache hit.
    config = ModelConfig(model=store.child("model").uri)
    old_inputs = {"model": {"sha256": old_tree_sha256(store.child("model"))}}
    store.put_text(f"eval/{MANIFEST}", json.dumps(
        {"fingerprint": fingerprint(config, old_inputs), "outputs": {}}))
    assert cached_manifest(config, store.child("eval")) is not None


# -- S3: the recorded digest ---------------------------------------------------------


def test_s3_uploads_record_their_sha256_in_the_object_metadata(s3, tmp_path, small_parts):
    fill(s3, tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    s3.put_dir("dir", tmp_path / "dir")

    for key in ("model/config.json", "model/empty.bin", "model/weights.bin", "dir/a.txt"):
        head = s3.client.head_object(Bucket=s3.bucket, Key=f"base/{key}")
        assert head["Metadata"]["sha256"] == hashlib.sha256(s3.get_bytes(key)).hexdigest()
    assert "-" in s3.client.head_object(Bucket=s3.bucket, Key="base/model/weights.bin")["ETag"]


def test_s3_sha256_of_what_trackb_uploaded_downloads_nothing(s3, tmp_path, small_parts):
    fill(s3, tmp_path)
    gets = count_gets(s3)

    tree_sha256(s3.child("model"))

    assert gets == Counter()


def test_s3_metadata_that_is_no_sha256_is_not_trusted(s3):
    put_foreign(s3, "a.bin", b"content", Metadata={"sha256": "not-a-digest"})
    assert s3.sha256("a.bin") == hashlib.sha256(b"content").hexdigest()


def test_stage_outputs_record_the_uploaded_digest_without_reading_it_back(s3, tmp_path):
    class NoInputs(StageConfig):
        """No inputs."""

    local = tmp_path / "adapter"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"w" * 1000)
    out = s3.child("train")
    gets = count_gets(s3)

    with stage_run("train", NoInputs(), out) as run:
        run.write_dir("adapter", local)

    assert run.manifest["outputs"]["adapter/weights.bin"] == {
        "sha256": hashlib.sha256(b"w" * 1000).hexdigest(), "bytes": 1000}
    assert gets == Counter()


# -- S3: objects others uploaded, hashed once per version -----------------------------


def test_a_foreign_object_is_downloaded_once_per_version(s3, trackb_cache):
    put_foreign(s3, "a.bin", b"version 1")
    gets = count_gets(s3)

    first = s3.sha256("a.bin")
    assert (s3.sha256("a.bin"), gets["a.bin"]) == (first, 1)
    assert (trackb_cache / DIGEST_CACHE).is_file()

    put_foreign(s3, "a.bin", b"version 2")  # a new ETag: hashed again
    assert s3.sha256("a.bin") == hashlib.sha256(b"version 2").hexdigest()
    assert gets["a.bin"] == 2


def test_the_digest_cache_is_shared_by_processes_through_trackb_cache(s3):
    put_foreign(s3, "a.bin", b"data")
    s3.sha256("a.bin")
    again = S3Store(s3.bucket, s3.prefix)  # a new client, as in another process
    gets = count_gets(again)

    assert again.sha256("a.bin") == hashlib.sha256(b"data").hexdigest()
    assert gets == Counter()


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b"[]", b'{"digests": 3}',
                                     b'{"digests": {"k": "not-a-digest"}}'])
def test_a_corrupt_digest_cache_is_rebuilt_not_fatal(s3, trackb_cache, garbage):
    trackb_cache.mkdir()
    (trackb_cache / DIGEST_CACHE).write_bytes(garbage)
    put_foreign(s3, "a.bin", b"data")

    assert s3.sha256("a.bin") == hashlib.sha256(b"data").hexdigest()
    assert list(json.loads((trackb_cache / DIGEST_CACHE).read_text())["digests"].values()) == [
        hashlib.sha256(b"data").hexdigest()]


def test_an_unwritable_digest_cache_costs_a_download_not_the_run(s3, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TRACKB_CACHE", str(blocker / "cache"))  # under a file: no mkdir
    put_foreign(s3, "a.bin", b"data")
    gets = count_gets(s3)

    assert s3.sha256("a.bin") == s3.sha256("a.bin") == hashlib.sha256(b"data").hexdigest()
    assert gets["a.bin"] == 2


def test_no_home_directory_means_no_digest_cache_not_an_error(s3, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr("trackb_core.corpus.cache_root", no_home)
    put_foreign(s3, "a.bin", b"data")

    assert s3.sha256("a.bin") == hashlib.sha256(b"data").hexdigest()


def test_the_digest_cache_keeps_only_the_newest_entries(s3, trackb_cache, monkeypatch):
    monkeypatch.setattr(store_module, "DIGEST_CACHE_ENTRIES", 2)
    for name in ("a", "b", "c"):
        put_foreign(s3, name, name.encode())
        s3.sha256(name)

    entries = json.loads((trackb_cache / DIGEST_CACHE).read_text())["digests"]
    assert [json.loads(k)[2] for k in entries] == ["base/b", "base/c"]


# -- errors and other stores -----------------------------------------------------------


def test_sha256_of_a_missing_key_is_a_missing_input_error(store):
    with pytest.raises(MissingInputError, match="no such"):
        store.sha256("absent.bin")


class DownloadOnly(RemoteLike):
    """A store that offers only the abstract methods (test_stage's RemoteLike, which
    does not read files whole here): sha256 falls back to get_file."""

    def get_bytes(self, key):
        raise AssertionError("sha256 must not read a file whole")

    def child(self, subpath):
        return DownloadOnly(self._local.child(subpath).root)


def test_a_store_without_its_own_sha256_hashes_a_download(tmp_path):
    store = DownloadOnly(tmp_path / "remote")
    store.put_bytes("a.bin", b"data")

    assert store.sha256("a.bin") == hashlib.sha256(b"data").hexdigest()
    with pytest.raises(MissingInputError):
        store.sha256("absent.bin")


# -- the acceptance check: a rerun over a model bigger than the launcher's request ------


@pytest.mark.integration
def test_a_rerun_over_a_300_mib_model_stays_under_the_launchers_memory_request(tmp_path):
    """The launcher's resume check, in a child process: peak RSS < 256 MiB, nothing
    trackb wrote downloaded, a foreign file downloaded once (streamed), then never."""
    pytest.importorskip("moto")
    from benchmarks.bench_store_hashing import (
        FOREIGN_FILE,
        RSS_GOAL_MIB,
        TRACKB_FILE,
        check_in_child,
        moto_server,
        prepare,
        s3_env,
    )

    with moto_server() as endpoint:  # its own process: its memory goes when it stops
        spec = prepare(endpoint, tmp_path / "work", size_mib=300)
        result = check_in_child(spec, s3_env(endpoint, tmp_path / "cache"))

    # Both checks hit: S3's digests are those the local files hash to.
    assert [check["hit"] for check in result["checks"]] == [True, True]
    assert [check["gets"].get(TRACKB_FILE, 0) for check in result["checks"]] == [0, 0]
    assert [check["gets"].get(FOREIGN_FILE, 0) for check in result["checks"]] == [1, 0]
    assert result["peak_rss_mib"] < RSS_GOAL_MIB, result
