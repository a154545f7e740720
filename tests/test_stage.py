"""The stage contract: manifest last, nothing on failure, caching by content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import Field

from trackb_core import __version__
from trackb_core.config import StageConfig, input_field
from trackb_core.errors import InputError, MissingInputError, StoreError
from trackb_core.stage import (
    MANIFEST,
    cached_manifest,
    hash_input,
    local_dir,
    parse_jsonl,
    resolve_file,
    stage_run,
    tree_sha256,
    upstream_corpus,
    upstream_corpus_dir,
)
from trackb_core.store import LocalStore, S3Store, Store


class EchoConfig(StageConfig):
    """Copy rows, adding a suffix to each text.

    Reads rows.jsonl (or the folder holding it); writes echo.jsonl.
    """

    rows: str = input_field("", description="Rows to echo.", kind="file", filename="rows.jsonl")
    weights: str | None = input_field(None, description="An optional folder.", kind="dir",
                                      required=False)
    suffix: str = Field("!", description="Appended to every text.")


class RecordingStore(LocalStore):
    """A local store that remembers the order of its writes."""

    def __init__(self, root):
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key, data):
        self.writes.append(key)
        super().put_bytes(key, data)


def echo(config: EchoConfig, out: Store, *, fail: bool = False) -> dict:
    with stage_run("echo", config, out) as run:
        rows = run.read_jsonl("rows")
        with run.timed("echo"):
            echoed = [{"id": r["id"], "text": r["text"] + config.suffix} for r in rows]
        run.write_jsonl("echo.jsonl", echoed)
        run.write_json("summary.json", {"rows": len(echoed)})
        run.counts["rows"] = len(echoed)
        run.extra["note"] = "extra keys land in the manifest"
        if fail:
            raise RuntimeError("the body failed")
    return run.manifest


ROWS = b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n'


@pytest.fixture
def upstream(tmp_path) -> Path:
    folder = tmp_path / "upstream"
    folder.mkdir()
    (folder / "rows.jsonl").write_bytes(ROWS)
    return folder


def test_stage_run_writes_the_manifest_last_with_everything(tmp_path, upstream):
    out = RecordingStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))

    manifest = echo(config, out)

    assert out.writes[-1] == MANIFEST
    assert json.loads(out.get_text(MANIFEST)) == manifest
    assert manifest["stage"] == "echo"
    assert manifest["trackb_version"] == __version__
    assert manifest["config"] == {"rows": str(upstream), "weights": None, "suffix": "!"}
    assert manifest["inputs"] == {
        "rows": {"uri": str(upstream), "file": "rows.jsonl",
                 "sha256": hashlib.sha256(ROWS).hexdigest()},
    }
    echo_bytes = out.get_bytes("echo.jsonl")
    assert manifest["outputs"]["echo.jsonl"] == {
        "sha256": hashlib.sha256(echo_bytes).hexdigest(), "bytes": len(echo_bytes),
    }
    assert set(manifest["outputs"]) == {"echo.jsonl", "summary.json"}
    assert manifest["counts"] == {"rows": 2}
    assert set(manifest["timings"]) == {"echo", "total_seconds"}
    assert manifest["timings"]["total_seconds"] >= manifest["timings"]["echo"] >= 0
    assert manifest["note"] == "extra keys land in the manifest"
    assert len(manifest["fingerprint"]) == 64
    assert echo_bytes == b'{"id": 1, "text": "a!"}\n{"id": 2, "text": "b!"}\n'


def test_output_files_are_byte_identical_across_runs(tmp_path, upstream):
    config = EchoConfig(rows=str(upstream / "rows.jsonl"))

    echo(config, LocalStore(tmp_path / "one"))
    echo(config, LocalStore(tmp_path / "two"))

    for name in ("echo.jsonl", "summary.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_failing_body_leaves_no_manifest_and_removes_the_old_one(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))
    echo(config, out)
    assert out.exists(MANIFEST)

    with pytest.raises(RuntimeError, match="the body failed"):
        echo(config, out, fail=True)

    assert not out.exists(MANIFEST)
    assert cached_manifest(config, out) is None


def test_a_missing_input_fails_before_the_body_naming_the_option(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    echo(EchoConfig(rows=str(upstream)), out)

    with pytest.raises(MissingInputError, match=r"^--rows: .*nowhere"):
        echo(EchoConfig(rows=str(tmp_path / "nowhere")), out)
    with pytest.raises(MissingInputError, match=r"^--weights: .*no-weights"):
        echo(EchoConfig(rows=str(upstream), weights=str(tmp_path / "no-weights")), out)

    assert not out.exists(MANIFEST)


def test_an_unwritable_output_fails_before_the_body(tmp_path, upstream):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # nothing can be created below a regular file, even by root
    ran = []

    with pytest.raises(StoreError, match="cannot write"):
        with stage_run("echo", EchoConfig(rows=str(upstream)), LocalStore(blocker / "out")):
            ran.append(True)

    assert ran == []


def test_bad_jsonl_input_is_an_input_error_naming_the_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"id": 1, "text": "a"}\n[1, 2]\n')
    out = LocalStore(tmp_path / "out")

    with pytest.raises(InputError, match="rows.jsonl: line 2 is not a JSON object"):
        echo(EchoConfig(rows=str(tmp_path / "rows.jsonl")), out)
    assert not out.exists(MANIFEST)


# -- cached_manifest ----------------------------------------------------------------


def test_cached_manifest_matches_same_config_and_inputs(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))
    manifest = echo(config, out)

    assert cached_manifest(config, out) == manifest
    # The same bytes under another URI are the same input: still cached.
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(ROWS)
    assert cached_manifest(EchoConfig(rows=str(moved)), out) == manifest


def test_cached_manifest_is_none_when_anything_differs(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))
    echo(config, out)

    assert cached_manifest(config.model_copy(update={"suffix": "?"}), out) is None
    assert cached_manifest(EchoConfig(rows=str(tmp_path / "missing")), out) is None

    (upstream / "rows.jsonl").write_bytes(ROWS + b'{"id": 3, "text": "c"}\n')
    assert cached_manifest(config, out) is None
    (upstream / "rows.jsonl").write_bytes(ROWS)
    assert cached_manifest(config, out) is not None

    out.delete("echo.jsonl")
    assert cached_manifest(config, out) is None


def test_cached_manifest_is_none_without_a_readable_manifest(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))

    assert cached_manifest(config, out) is None
    out.put_text(MANIFEST, "{not json")
    assert cached_manifest(config, out) is None


def test_cached_manifest_rejects_an_output_with_another_size(tmp_path, upstream):
    out = LocalStore(tmp_path / "out")
    config = EchoConfig(rows=str(upstream))
    echo(config, out)

    out.put_text("echo.jsonl", "truncated")

    assert cached_manifest(config, out) is None


# -- resolving and hashing inputs ---------------------------------------------------


def test_resolve_file_local_folder_and_file(upstream):
    store, key = resolve_file(str(upstream), "rows.jsonl")
    assert isinstance(store, LocalStore)
    assert (store.root, key) == (upstream, "rows.jsonl")

    store, key = resolve_file(str(upstream / "rows.jsonl"), "ignored.jsonl")
    assert (store.root, key) == (upstream, "rows.jsonl")

    store, key = resolve_file(f"file://{upstream}/", "rows.jsonl")
    assert (store.root, key) == (upstream, "rows.jsonl")
    assert store.get_bytes(key) == ROWS


@pytest.mark.parametrize(
    ("uri", "bucket", "prefix", "key"),
    [
        ("s3://b/runs/r1/extract", "b", "runs/r1/extract", "tasks.jsonl"),
        ("s3://b/runs/r1/extract/", "b", "runs/r1/extract", "tasks.jsonl"),
        ("s3://b/runs/r1/extract/tasks.jsonl", "b", "runs/r1/extract", "tasks.jsonl"),
        ("s3://b/tasks.jsonl", "b", "", "tasks.jsonl"),
        ("s3://b", "b", "", "tasks.jsonl"),
        ("s3://b/runs/r1/other.json", "b", "runs/r1", "other.json"),
    ],
)
def test_resolve_file_s3_folder_and_file(uri, bucket, prefix, key):
    store, got_key = resolve_file(uri, "tasks.jsonl")

    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, got_key) == (bucket, prefix, key)


def test_hash_input_kinds(tmp_path, upstream):
    assert hash_input(str(upstream), "file", "rows.jsonl")["sha256"] == hashlib.sha256(ROWS).hexdigest()

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "config.json").write_text("{}")
    (twin / MANIFEST).write_text('{"not": "hashed"}')
    # A folder hash covers names and contents, not where it lives nor its manifest.
    assert hash_input(str(model), "dir")["sha256"] == hash_input(str(twin), "dir")["sha256"]
    assert tree_sha256(LocalStore(model)) == tree_sha256(LocalStore(twin))

    hub = hash_input("Qwen/Qwen2.5-Coder-1.5B-Instruct", "model")
    assert hub["hub_id"] is True
    with pytest.raises(MissingInputError, match="empty"):
        hash_input(str(tmp_path / "missing-dir"), "dir")


def test_local_dir_of_a_local_folder_is_the_folder(tmp_path, upstream):
    assert local_dir(str(upstream)) == upstream
    with pytest.raises(MissingInputError, match="no such folder"):
        local_dir(str(tmp_path / "missing"))


class RemoteLike(Store):
    """A store that is not a LocalStore, so local_dir must download from it."""

    def __init__(self, root):
        self._local = LocalStore(root)
        self.uri = "remote:" + self._local.uri

    def put_bytes(self, key, data):
        self._local.put_bytes(key, data)

    def get_bytes(self, key):
        return self._local.get_bytes(key)

    def exists(self, key):
        return self._local.exists(key)

    def size(self, key):
        return self._local.size(key)

    def list(self, prefix=""):
        return self._local.list(prefix)

    def delete(self, prefix):
        self._local.delete(prefix)

    def put_file(self, key, path):
        self._local.put_file(key, path)

    def get_file(self, key, path):
        self._local.get_file(key, path)

    def child(self, subpath):
        return RemoteLike(self._local.child(subpath).root)


@pytest.fixture
def remote(tmp_path, monkeypatch) -> RemoteLike:
    store = RemoteLike(tmp_path / "remote")
    monkeypatch.setattr("trackb_core.stage.open_store", lambda uri: store)
    return store


def test_local_dir_downloads_a_remote_folder_once(tmp_path, remote):
    remote.put_text("adapter/config.json", "{}")
    cache = tmp_path / "cache"

    first = local_dir("s3://b/adapter-run", cache_root=cache)
    assert (first / "adapter" / "config.json").read_text() == "{}"
    (first / "adapter" / "config.json").write_text("touched")  # a second call must not refetch

    assert local_dir("s3://b/adapter-run", cache_root=cache) == first
    assert (first / "adapter" / "config.json").read_text() == "touched"

    remote.put_text("adapter/config.json", '{"r": 8}')  # the remote changed: refetch
    assert (local_dir("s3://b/adapter-run", cache_root=cache) / "adapter" / "config.json").read_text() == '{"r": 8}'


def test_local_dir_drops_files_removed_remotely(tmp_path, remote):
    remote.put_text("a.txt", "1")
    remote.put_text("b.txt", "2")
    cache = tmp_path / "cache"
    local_dir("s3://b/x", cache_root=cache)

    remote.delete("b.txt")
    again = local_dir("s3://b/x", cache_root=cache)

    assert sorted(p.name for p in again.iterdir() if not p.name.startswith(".")) == ["a.txt"]


# -- parse_jsonl --------------------------------------------------------------------


def test_parse_jsonl_reads_objects_and_skips_blank_lines():
    rows = parse_jsonl(b'{"a": 1}\n\n  \n{"b": "x"}\r\n{"c": null}', "f.jsonl")

    assert rows == [{"a": 1}, {"b": "x"}, {"c": None}]
    assert parse_jsonl(b"", "f.jsonl") == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1}\n\n{"a": \n', r"^data/f.jsonl: line 3 is not valid JSON \("),
        (b'{"a": 1}\n"just a string"\n', r"^data/f.jsonl: line 2 is not a JSON object$"),
        (b"[1]\n", r"^data/f.jsonl: line 1 is not a JSON object$"),
        (b'{"a": "\xff"}\n', r"^data/f.jsonl is not UTF-8 text$"),
        (b'{"a": 1}\n' + b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
         r"^data/f.jsonl: line 2 is nested too deeply to read$"),
    ],
)
def test_parse_jsonl_errors_name_the_line(data, message):
    with pytest.raises(InputError, match=message):
        parse_jsonl(data, "data/f.jsonl")


def test_parse_jsonl_reads_back_what_write_jsonl_writes(tmp_path, upstream):
    rows = [{"id": 1, "text": "line\u2028separator and NEL\x85 inside a docstring"}]
    out = LocalStore(tmp_path / "out")
    with stage_run("echo", EchoConfig(rows=str(upstream)), out) as run:
        run.write_jsonl("rows.jsonl", rows)

    assert parse_jsonl(out.get_bytes("rows.jsonl"), "rows.jsonl") == rows


# -- provenance: the corpus upstream of a stage output -----------------------------------


@pytest.fixture
def extracted(tmp_path, monkeypatch):
    """A small corpus (with wheel metadata) run through extract and generate."""
    from trackb_core import extract, generate
    from trackb_core.extract import ExtractConfig
    from trackb_core.generate import GenerateConfig

    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "pkg" / "__init__.py").write_text("")
    (corpus / "pkg" / "maths.py").write_text(
        "def clamp(x, low, high):\n    if x < low:\n        return low\n"
        "    if x > high:\n        return high\n    return x\n")
    (corpus / "pkg-1.0.dist-info").mkdir()
    (corpus / "pkg-1.0.dist-info" / "METADATA").write_text("Name: pkg\nLicense: MIT\n")
    root = LocalStore(tmp_path / "run")
    extract.run(ExtractConfig(corpus=str(corpus)), root.child("extract"))
    generate.run(GenerateConfig(tasks=root.child("extract").uri), root.child("generate"))
    return corpus, root


def test_upstream_corpus_follows_manifests_to_the_corpus_spec(extracted):
    corpus, root = extracted
    spec = upstream_corpus(root.child("generate").uri, "responses.jsonl")
    assert spec["uri"] == str(corpus) and spec["sha256"]
    assert upstream_corpus(root.child("nothing").uri, "responses.jsonl") is None


def test_upstream_corpus_dir_uses_the_stored_snapshot_without_the_original(extracted):
    import shutil

    corpus, root = extracted
    shutil.rmtree(corpus)  # e.g. a pod that cannot reach PyPI: only the store is left
    folder = upstream_corpus_dir(root.child("generate").uri, "responses.jsonl")
    assert folder is not None and folder != corpus
    assert (folder / "pkg" / "maths.py").read_text().startswith("def clamp(")
    assert (folder / "pkg-1.0.dist-info" / "METADATA").read_text().endswith("MIT\n")
    # unpacked once, then reused from the cache
    assert upstream_corpus_dir(root.child("generate").uri, "responses.jsonl") == folder


def test_a_corrupt_snapshot_falls_back_to_the_corpus_spec(extracted):
    corpus, root = extracted
    snapshot = root.child("extract").local_path("corpus.tar.gz")
    snapshot.write_bytes(b"not a tarball")
    manifest = json.loads(root.child("extract").get_bytes("manifest.json"))
    manifest["outputs"]["corpus.tar.gz"]["sha256"] = "0" * 64  # force a fresh unpack
    root.child("extract").put_text("manifest.json", json.dumps(manifest))
    assert upstream_corpus_dir(root.child("generate").uri, "responses.jsonl") == corpus


@pytest.mark.parametrize("recorded", ["../../../../tmp/trackb-escape", "", "ABC", "0" * 63,
                                      "g" * 64, None, 12])
def test_a_snapshot_hash_that_is_no_sha256_is_never_used_as_a_path(tmp_path, recorded):
    from trackb_core.corpus import snapshot_bytes, unpack_snapshot
    from trackb_core.errors import InputError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("x = 1\n")
    archive = tmp_path / "corpus.tar.gz"
    archive.write_bytes(snapshot_bytes(corpus))
    with pytest.raises(InputError, match="not a sha256"):
        unpack_snapshot(archive, recorded)
    assert not (tmp_path.parent / "trackb-escape").exists()


def test_a_snapshot_must_match_the_hash_its_manifest_records(tmp_path):
    import hashlib

    from trackb_core.corpus import snapshot_bytes, unpack_snapshot
    from trackb_core.errors import InputError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("x = 1\n")
    archive = tmp_path / "corpus.tar.gz"
    archive.write_bytes(snapshot_bytes(corpus))
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (unpack_snapshot(archive, good) / "m.py").read_text() == "x = 1\n"
    with pytest.raises(InputError, match="not the .* its manifest records"):
        unpack_snapshot(archive, "1" * 64)


def test_a_pypi_corpus_named_by_a_manifest_is_not_fetched_unless_allowed(extracted,
                                                                         monkeypatch):
    from trackb_core import corpus as corpus_module
    from trackb_core.errors import UnavailableError

    _, root = extracted
    manifest = json.loads(root.child("extract").get_bytes("manifest.json"))
    manifest["inputs"]["corpus"]["uri"] = "pypi:evil-package==6.6.6"
    del manifest["outputs"]["corpus.tar.gz"]  # no snapshot: only the spec is left
    root.child("extract").put_text("manifest.json", json.dumps(manifest))
    asked = []

    def resolve(name, version):
        asked.append((name, version))
        raise UnavailableError("no index here")

    monkeypatch.setattr(corpus_module, "_resolve_pypi", resolve)
    assert upstream_corpus_dir(root.child("generate").uri, "responses.jsonl") is None
    assert asked == []
    upstream_corpus_dir(root.child("generate").uri, "responses.jsonl", fetch=True)
    assert asked == [("evil-package", "6.6.6")]
