"""Where a corpus comes from: a local folder, a PyPI release fetched without running it,
or an archive of a repository at a commit.

:func:`resolve_corpus` turns a corpus spec into a local folder to walk, a sha256 that
pins its content, and JSON-able metadata for the manifest. It is called whenever a
stage hashes its inputs, so a PyPI corpus is fetched once into
``$TRACKB_CACHE/corpus/NAME-VERSION/`` and reused from there without calling pip.

A run may name many corpora (:data:`CorpusSpec`: one spec string, or a list of spec
strings and :class:`CorpusSource` entries with a name, include/exclude globs and a
license). :func:`resolve_corpora` resolves each; :func:`corpus_provenance` is what the
manifests and the dataset card record of each (name, version or commit, sha256,
license). With more than one corpus, function rows name their file
``<corpus key>/<path>`` and the snapshot (:func:`write_snapshot`) holds each corpus under
its key, with :data:`CORPORA_MARKER` at its root: :func:`import_root` then finds the
folder a module imports from.

A cached corpus is complete only when its ``trackb-corpus.json`` marker exists: the
archive is unpacked into a temporary folder which is renamed into place, and the
marker is written last, so an interrupted fetch is never mistaken for a finished one.

A package's code is never run to fetch it: pip downloads a wheel only
(``--only-binary=:all:``; ``pip download`` of an sdist would run its build backend to
prepare metadata), and a release with no wheel has its sdist file found in the same
indexes and find-links pip uses (PEP 503 pages, read here) and unpacked as an archive.
"""

from __future__ import annotations

import email.message
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from trackb_core.errors import (
    ConfigError,
    InputError,
    MissingInputError,
    StoreError,
    TrackbError,
    UnavailableError,
)

PYPI_PREFIX = "pypi:"
MARKER = "trackb-corpus.json"
# PEP 508 distribution names and a liberal version (anything pip could accept as ==X).
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
# pip's wording when it could not reach an index at all (as opposed to "no such name").
_NETWORK_HINTS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Max retries exceeded",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Network is unreachable",
    "SSLError",
    "ProxyError",
)
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class ResolvedCorpus:
    """A corpus ready to walk: its folder, a content hash and manifest metadata.

    ``key`` names it among a run's corpora (the first folder of its files' paths when
    there are several); ``include``/``exclude`` are the globs that choose its files
    (:func:`corpus_files`)."""

    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    license: str | None = None


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
CORPORA_MARKER = "trackb-corpora.json"
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class CorpusSource(BaseModel):
    """One corpus of a run, with the files to take from it and what to record of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="pypi:NAME==VERSION, a folder of .py files, or an "
                        "archive of a repository (.tar.gz/.tgz/.zip: a path, file:// or "
                        "https:// URL).")
    name: str | None = Field(None, description="The corpus's key: the folder its files sit "
                             "under when a run has several corpora (default: the package "
                             "name, folder name or archive name).")
    commit: str | None = Field(None, description="The commit an archive holds, recorded as "
                               "its version (an archive URL may also end in #commit=SHA).")
    include: list[str] = Field(default_factory=list, description="Globs of the paths to "
                               "take (relative, '/'-separated, '**' for any folders); none: "
                               "every .py file.")
    exclude: list[str] = Field(default_factory=list, description="Globs of the paths to "
                               "leave out, e.g. tests/**.")
    license: str | None = Field(None, description="The corpus's license when its package "
                                "metadata does not say (e.g. a private repository).")


# The shape of every ``corpus`` setting: one spec string, or a list of corpora.
CorpusSpec = str | list[str | CorpusSource]


def _checked_spec(value: CorpusSpec) -> CorpusSpec:
    """A ``corpus`` setting checked: keys valid and distinct; a list of one spec string
    (``--corpus pypi:verl==0.9.1`` on the command line) is that string."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    try:
        corpus_sources(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    return value


# The type of every ``corpus`` setting (extract, tiny-model, the pipeline's top level).
CorpusSetting = Annotated[CorpusSpec, AfterValidator(_checked_spec)]

CORPUS_HELP = ("The corpus, or a list of corpora: each pypi:NAME==VERSION, a folder of .py "
               "files, or an archive of a repository at a commit (.tar.gz/.zip path or URL, "
               "#commit=SHA); a list entry may be a mapping {source, name, commit, include, "
               "exclude, license} (e.g. exclude: ['tests/**']). On the command line, "
               "comma-separated.")


def corpus_sources(spec: CorpusSpec | Any) -> list[CorpusSource]:
    """``spec`` as a list of :class:`CorpusSource`, each with its key set and unique.

    Accepts a spec string, a list of strings, mappings or CorpusSource, or the JSON of
    such a list (how a manifest records it). Raises ConfigError for an empty list, a
    malformed entry or two corpora with one key.
    """
    if isinstance(spec, str) and spec.strip().startswith("["):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise ConfigError(f"corpus list {spec[:80]!r} is not valid JSON") from exc
    entries = [spec] if isinstance(spec, str | CorpusSource | dict) else list(spec or [])
    if not entries:
        raise ConfigError("name at least one corpus")
    sources = []
    for entry in entries:
        try:
            source = entry if isinstance(entry, CorpusSource) else CorpusSource(
                source=entry) if isinstance(entry, str) else CorpusSource.model_validate(entry)
        except ValueError as exc:
            raise ConfigError(f"corpus {entry!r}: {exc}".splitlines()[0]) from exc
        sources.append(source.model_copy(update={"name": source.name or _default_key(source)}))
    keys = [s.name for s in sources]
    for key in keys:
        if not _KEY.match(str(key)):
            raise ConfigError(f"corpus name {key!r}: use letters, digits, '.', '_' or '-'")
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ConfigError(f"two corpora are named {', '.join(map(str, clashes))}: give each "
                          "a distinct name")
    return sources


def _default_key(source: CorpusSource) -> str:
    text = source.source.strip()
    if text.startswith(PYPI_PREFIX):
        return _normalise(parse_pypi_spec(text)[0])
    if is_archive(text):
        name = text.partition("#")[0].rstrip("/").rpartition("/")[2]
        for suffix in ARCHIVE_SUFFIXES:
            name = name.removesuffix(suffix)
        return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "archive"
    name = Path(text).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "corpus"


def is_archive(src: str) -> bool:
    """Whether ``src`` names an archive of a repository (by its suffix)."""
    return src.partition("#")[0].lower().endswith(ARCHIVE_SUFFIXES)


def resolve_corpora(spec: CorpusSpec | Any) -> list[ResolvedCorpus]:
    """Every corpus of ``spec`` resolved (:func:`resolve_corpus`), with its key, globs
    and license. Raises what :func:`corpus_sources` and :func:`resolve_corpus` raise,
    and InputError when a corpus's globs leave no .py file."""
    resolved = []
    for source in corpus_sources(spec):
        corpus = resolve_corpus(source.source, commit=source.commit)
        include, exclude = tuple(source.include), tuple(source.exclude)
        sha256 = corpus.sha256
        if include or exclude:
            files = corpus_files(corpus.path, include, exclude)
            if not files:
                raise InputError(f"corpus {source.name}: include {list(include)} / exclude "
                                 f"{list(exclude)} leave no .py file")
            # the files taken are the content: hash them, not the whole release
            sha256 = folder_sha256(corpus.path, files)
        resolved.append(ResolvedCorpus(
            path=corpus.path, sha256=sha256, metadata=corpus.metadata, key=str(source.name),
            include=include, exclude=exclude,
            license=source.license or declared_license(corpus.path)))
    return resolved


def corpus_provenance(corpus: ResolvedCorpus, source: str = "") -> dict[str, Any]:
    """What the manifests and the dataset card record of one corpus: key, source, name,
    version (a release's) or commit (an archive's), sha256 (of the archive fetched, or of
    the files taken), license and the globs. Raises nothing."""
    meta = corpus.metadata
    return {"key": corpus.key, "source": source or meta.get("uri") or str(corpus.path),
            "name": meta.get("name", Path(corpus.path).name),
            "version": meta.get("version"), "commit": meta.get("commit"),
            "filename": meta.get("filename"), "sha256": corpus.sha256,
            "license": corpus.license, "include": list(corpus.include),
            "exclude": list(corpus.exclude)}


def corpora_input(spec: CorpusSpec | Any) -> dict[str, Any]:
    """The manifest's ``corpus`` input for a list of corpora: one sha256 over every
    corpus (key, content hash, globs) and ``corpora``, each one's provenance. Raises
    what :func:`resolve_corpora` raises."""
    sources = corpus_sources(spec)
    resolved = resolve_corpora(sources)
    provenance = [corpus_provenance(c, s.source) for c, s in zip(resolved, sources, strict=True)]
    return {"uri": spec_uri(sources), "sha256": corpora_sha256(provenance),
            "corpora": provenance}


def corpora_sha256(provenance: list[dict[str, Any]]) -> str:
    """One sha256 over several corpora's :func:`corpus_provenance`: each one's key,
    content hash and globs, in order. Raises KeyError for an entry without them."""
    return hashlib.sha256(json.dumps(
        [[p["key"], p["sha256"], p["include"], p["exclude"]] for p in provenance]).encode()
    ).hexdigest()


def spec_uri(spec: CorpusSpec | Any) -> str:
    """``spec`` as one string: itself for a plain spec string, else the JSON of its
    corpora (what manifests record as the corpus's ``uri``)."""
    if isinstance(spec, str):
        return spec
    sources = corpus_sources(spec)
    return json.dumps([s.model_dump(exclude_defaults=True) for s in sources], sort_keys=True)


def corpus_files(root: Path, include: tuple[str, ...] | list[str] = (),
                 exclude: tuple[str, ...] | list[str] = ()) -> list[Path]:
    """:func:`python_files` of ``root`` whose relative path matches an ``include`` glob
    (any, when there are none) and no ``exclude`` glob. ``**`` matches any folders,
    ``*`` any name part; a glob naming a folder (``tests/**``) takes everything below
    it. Raises nothing."""
    files = python_files(root)
    if not include and not exclude:
        return files
    takes, leaves = [_glob(g) for g in include], [_glob(g) for g in exclude]
    chosen = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if (not takes or any(g.match(rel) for g in takes)) \
                and not any(g.match(rel) for g in leaves):
            chosen.append(path)
    return chosen


def _glob(pattern: str) -> re.Pattern[str]:
    """A glob over '/'-separated paths as a regex: ``**/`` any folders (none too), ``**``
    anything, ``*`` and ``?`` within one name."""
    out, i = "", 0
    pattern = pattern.strip().lstrip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "(?:/.*)?$" if not pattern.endswith("*") else out + "$")


def declared_license(folder: Path | None) -> str | None:
    """A corpus's license from its package metadata, or None if it does not say.

    Looks at a wheel's ``*.dist-info/METADATA`` or an sdist's ``PKG-INFO`` (top level or
    one folder down): ``License-Expression``, else a one-line ``License``, else the
    ``License ::`` classifiers. Raises nothing.
    """
    if folder is None:
        return None
    for meta in package_metadata(folder):
        expression = (meta.get("License-Expression") or "").strip()
        if expression:
            return expression
        license_field = (meta.get("License") or "").strip()
        if license_field and "\n" not in license_field and len(license_field) <= 80 \
                and license_field.upper() not in ("UNKNOWN", "NONE"):
            return license_field
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        if classifiers:
            return " / ".join(classifiers)
    return None


def import_root(corpus_dir: Path, source_file: str) -> tuple[Path, str]:
    """``(folder, path)``: the folder the module at ``source_file`` (a function row's
    ``file``, an item's ``source_file``) imports from, and its path under that folder.

    A snapshot of several corpora (:data:`CORPORA_MARKER` at its root) holds each under
    its key, the first folder of ``source_file``; a single corpus is its own root.
    Raises nothing.
    """
    corpus_dir = Path(corpus_dir)
    key, sep, rest = source_file.partition("/")
    if sep and rest and (corpus_dir / CORPORA_MARKER).is_file() and _KEY.match(key):
        return corpus_dir / key, rest
    return corpus_dir, source_file


def package_metadata(folder: Path) -> Iterator[email.message.Message]:
    """The package metadata a corpus folder holds, parsed, in the order it is trusted: a
    wheel's ``*.dist-info/METADATA``, then an sdist's ``PKG-INFO`` (top level or one
    folder down). Unreadable files are skipped; raises nothing."""
    folder = Path(folder)
    candidates = sorted(folder.glob("*.dist-info/METADATA")) + sorted(folder.glob("PKG-INFO")) \
        + sorted(folder.glob("*/PKG-INFO"))
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        yield email.parser.Parser().parsestr(text)


def cache_root() -> Path:
    """``$TRACKB_CACHE`` (default ``~/.cache/trackb``)."""
    return Path(os.environ.get("TRACKB_CACHE") or "~/.cache/trackb").expanduser()


def resolve_corpus(src: str, *, commit: str | None = None) -> ResolvedCorpus:
    """Resolve one corpus spec: a directory, ``pypi:NAME==VERSION`` or an archive of a
    repository (``.tar.gz``/``.tgz``/``.zip``: a path, ``file://`` or ``https://`` URL,
    optionally ending in ``#commit=SHA``; ``commit`` says the same).

    Raises ConfigError for a malformed ``pypi:`` spec or a list given where one corpus
    is meant, MissingInputError for a missing folder or archive or a release PyPI does
    not have, InputError for a folder with no ``.py`` files or an archive that cannot be
    unpacked, UnavailableError when pip or the archive's server cannot be reached,
    StoreError when the cache folder cannot be written.
    """
    src = str(src).strip()
    if src.startswith("["):
        raise ConfigError(f"corpus {src[:80]!r} is a list: resolve it with resolve_corpora")
    if src.startswith(PYPI_PREFIX):
        name, version = parse_pypi_spec(src)
        return _resolve_pypi(name, version)
    if is_archive(src):
        return _resolve_archive(src, commit)
    return _resolve_dir(Path(src).expanduser())


def parse_pypi_spec(src: str) -> tuple[str, str]:
    """``("verl", "0.9.1")`` for ``"pypi:verl==0.9.1"``. Raises ConfigError if malformed."""
    spec = src[len(PYPI_PREFIX):].strip()
    name, sep, version = spec.partition("==")
    name, version = name.strip(), version.strip()
    if not sep or not version:
        raise ConfigError(f"corpus {src!r} must pin a version: pypi:NAME==VERSION "
                          "(e.g. pypi:verl==0.9.1)")
    if not _NAME.match(name):
        raise ConfigError(f"corpus {src!r}: {name!r} is not a valid distribution name")
    if not _VERSION.match(version):
        raise ConfigError(f"corpus {src!r}: {version!r} is not a valid version")
    return name, version


def python_files(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root``, in sorted relative-path order.

    Symlinked folders are not entered (``rglob`` does not follow them), so a link back
    to a parent cannot loop; links to files count only if they lead to a file.
    """
    return sorted(
        (p for p in root.rglob("*.py") if p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )


SNAPSHOT_FILE = "corpus.tar.gz"


def snapshot_bytes(root: Path) -> bytes:
    """:func:`write_snapshot` of the one corpus at ``root``, as bytes (small corpora and
    tests; extract streams the archive to a file). Raises OSError if it cannot write
    its temporary file."""
    with tempfile.TemporaryDirectory(prefix="trackb-snapshot-") as tmp:
        target = Path(tmp) / SNAPSHOT_FILE
        write_snapshot([ResolvedCorpus(path=Path(root), sha256="")], target)
        return target.read_bytes()


def write_snapshot(corpora: list[ResolvedCorpus], target: Path) -> None:
    """Write a byte-stable ``.tar.gz`` of the corpora's ``.py`` files (those their globs
    take) and package metadata to ``target``, one file at a time (the archive is never
    held in memory).

    One corpus sits at the archive's root, as its files' paths say; several sit each
    under its key, with :data:`CORPORA_MARKER` (their keys) at the root, so that
    :func:`import_root` finds each one's import root. The extract stage stores it
    beside its outputs so that later stages (unit tests run against the original
    functions in build-dataset and eval) find the exact corpora in the object store,
    also in pods whose egress reaches nothing else. Fixed order, zero mtimes and owners,
    so the same corpora always give the same bytes. Raises OSError if ``target`` cannot
    be written.
    """
    import gzip
    import io

    many = len(corpora) > 1
    with open(target, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tf:
        if many:
            marker = json.dumps({"corpora": [c.key for c in corpora]}, indent=2).encode()
            info = tarfile.TarInfo(CORPORA_MARKER)
            info.size, info.mode, info.mtime = len(marker), 0o644, 0
            tf.addfile(info, io.BytesIO(marker))
        for corpus in corpora:
            root = corpus.path
            files = corpus_files(root, corpus.include, corpus.exclude) + sorted(
                p for p in root.glob("*.dist-info/*")
                if p.is_file() and p.stat().st_size < 1 << 20)
            prefix = f"{corpus.key}/" if many else ""
            for path in sorted(set(files), key=lambda p: p.relative_to(root).as_posix()):
                try:
                    handle = path.open("rb")
                except OSError:
                    continue  # extract counts it as unreadable; nothing to run it against
                with handle:
                    info = tarfile.TarInfo(prefix + path.relative_to(root).as_posix())
                    info.size = os.fstat(handle.fileno()).st_size
                    info.mode, info.mtime = 0o644, 0
                    tf.addfile(info, handle)


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def unpack_snapshot(archive: Path, sha256: str) -> Path:
    """The folder ``archive`` (from :func:`snapshot_bytes`) unpacks to, cached by hash.

    ``sha256`` is what the manifest says the archive's hash is: it must be one (64 hex
    digits: it also names the cache folder) and match the archive. Raises InputError
    for a malformed or mismatched hash or a corrupt or unsafe archive, StoreError when
    the cache cannot be written.
    """
    if not isinstance(sha256, str) or not SHA256.match(sha256):
        raise InputError(f"corpus snapshot: {str(sha256)[:80]!r} is not a sha256 digest")
    actual = _file_sha256(archive)
    if actual != sha256:
        raise InputError(f"corpus snapshot: {archive.name} has sha256 {actual}, not the "
                         f"{sha256} its manifest records")
    target = cache_root() / "snapshots" / sha256
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
    except OSError as exc:
        raise StoreError(f"cannot write the corpus cache {target.parent}: {exc}") from exc
    try:
        _unpack(archive, staging)
        staging.rename(target)  # atomic: a half-unpacked folder never looks done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # a concurrent unpack that won the race is fine
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _resolve_dir(root: Path) -> ResolvedCorpus:
    if not root.is_dir():
        raise MissingInputError(f"corpus folder not found: {root}")
    files = python_files(root)
    if not files:
        raise InputError(f"corpus {root} holds no .py files")
    return ResolvedCorpus(path=root, sha256=folder_sha256(root, files),
                          metadata={"name": root.name, "path": str(root),
                                    "python_files": len(files)})


def _resolve_archive(src: str, commit: str | None) -> ResolvedCorpus:
    """An archive of a repository, fetched (or copied) once into
    ``$TRACKB_CACHE/corpus/archive-<sha256 of its location>/`` and unpacked; an archive
    whose files all sit in one top folder (GitHub's ``repo-<commit>/``) is walked from
    that folder. Its sha256 is the archive's."""
    location, _, fragment = src.partition("#")
    commit = commit or dict(p.partition("=")[::2] for p in fragment.split("&") if p).get(
        "commit") or None
    target = cache_root() / "corpus" / ("archive-" + hashlib.sha256(
        f"{location}\0{commit or ''}".encode()).hexdigest()[:16])
    marker = target / MARKER
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
            return ResolvedCorpus(path=target / meta["root"], sha256=meta["sha256"],
                                  metadata=meta)
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)
    name = location.rstrip("/").rpartition("/")[2]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".archive-", dir=target.parent) as tmp:
            archive = Path(tmp) / name
            if "://" in location and not location.startswith("file:"):
                archive.write_bytes(_read_url(location, SDIST_BYTES))
            else:
                path = Path(location.removeprefix("file://")).expanduser()
                if not path.is_file():
                    raise MissingInputError(f"corpus archive not found: {path}")
                shutil.copyfile(path, archive)
            staging = Path(tmp) / "unpacked"
            staging.mkdir()
            _unpack(archive, staging)
            tops = [p for p in staging.iterdir() if p.name != MARKER]
            root = tops[0].name if len(tops) == 1 and tops[0].is_dir() else "."
            meta = {"name": _default_key(CorpusSource(source=location)), "uri": location,
                    "filename": name, "commit": commit, "root": root,
                    "sha256": _file_sha256(archive)}
            (staging / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
            if target.exists() and not marker.is_file():
                shutil.rmtree(target)
            if not marker.is_file():
                staging.rename(target)
    except OSError as exc:
        raise StoreError(f"cannot write the corpus cache {target}: {exc}") from exc
    meta = json.loads(marker.read_text(encoding="utf-8"))
    if not python_files(target / meta["root"]):
        raise InputError(f"corpus archive {location} holds no .py files")
    return ResolvedCorpus(path=target / meta["root"], sha256=meta["sha256"], metadata=meta)


def folder_sha256(root: Path, files: list[Path] | None = None) -> str:
    """A hash over the ``.py`` files of a corpus folder (relative path and content): the
    corpus's identity in manifests and in eval.json. ``files`` defaults to
    :func:`python_files`. Raises nothing (an unreadable file hashes as "unreadable")."""
    digest = hashlib.sha256()
    for path in python_files(root) if files is None else files:
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(_file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """The file's sha256, streamed (a huge file is never held in memory); a file that
    cannot be read hashes as "unreadable" (extract skips and counts it)."""
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return "unreadable"


def _resolve_pypi(name: str, version: str) -> ResolvedCorpus:
    target = cache_root() / "corpus" / f"{name}-{version}"
    marker = target / MARKER
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
            return ResolvedCorpus(path=target, sha256=meta["sha256"], metadata=meta)
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)  # a damaged marker: fetch again below
    try:
        _fetch_into(target, name, version)
    except OSError as exc:
        raise StoreError(f"cannot write the corpus cache {target}: {exc}") from exc
    meta = json.loads((target / MARKER).read_text(encoding="utf-8"))
    return ResolvedCorpus(path=target, sha256=meta["sha256"], metadata=meta)


def _fetch_into(target: Path, name: str, version: str) -> None:
    """Download, unpack and mark ``name==version`` at ``target``, all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-{version}-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        archive = _pip_download(name, version, tmp_path / "download")
        meta = {"name": name, "version": version, "filename": archive.name,
                "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
        staging = tmp_path / "unpacked"
        staging.mkdir()
        _unpack(archive, staging)
        # The marker is the last file written, and the folder only appears under its
        # final name once complete, so a reader never sees a half-unpacked corpus.
        (staging / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
        if target.exists() and not (target / MARKER).is_file():
            shutil.rmtree(target)  # left by an interrupted fetch
        if (target / MARKER).is_file():
            return  # another process finished the same fetch meanwhile
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # not a lost race: a real failure
                raise


def _pip_download(name: str, version: str, dest: Path) -> Path:
    """Download ``name==version`` (no deps) into ``dest``: its wheel, else its sdist file,
    without running any of its code."""
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{name}=={version}"
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", requirement, "-d", str(dest)]
    result = _run_pip(base)
    if result.returncode != 0:
        line = pip_error_line(result.stderr)
        if network_failure(result.stderr):
            raise UnavailableError(f"pypi: cannot reach the package index for {requirement} "
                                   f"(pip: {line})")
        if "No matching distribution" in result.stderr or "Could not find a version" in \
                result.stderr:
            return _fetch_sdist(name, version, dest, line)  # no wheel: the source archive
        raise InputError(f"pypi: pip download {requirement} failed (pip: {line})")
    wheels = sorted(p for p in dest.iterdir() if p.is_file() and p.suffix == ".whl")
    if wheels:
        return wheels[0]
    raise InputError(f"pypi: pip download {requirement} gave no wheel")


SDIST_SUFFIXES = (".tar.gz", ".zip")
SDIST_BYTES = 256 << 20  # the largest source archive fetched
FETCH_TIMEOUT_S = 120


def _normalise(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _pip_settings() -> dict[str, list[str]]:
    """``index-url``, ``extra-index-url``, ``find-links`` and ``no-index`` as pip sees them
    (its config files and PIP_* variables), each a list of values."""
    result = _run_pip([sys.executable, "-m", "pip", "config", "list"])
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.rpartition(".")[2]
        if key in ("index-url", "extra-index-url", "find-links", "no-index"):
            found[key] = value.strip().strip("'\"").split()
    return found


class _Links:
    """The links of a PEP 503 page (or of a folder), ``{file name: URL}``."""

    @staticmethod
    def of_page(html: str, base: str) -> dict[str, str]:
        from html.parser import HTMLParser
        from urllib.parse import unquote, urljoin, urlsplit

        found: dict[str, str] = {}

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                href = dict(attrs).get("href")
                if tag == "a" and href:
                    url = urljoin(base, href)
                    found[unquote(urlsplit(url).path.rpartition("/")[2])] = url

        Parser().feed(html)
        return found

    @staticmethod
    def of_folder(folder: Path) -> dict[str, str]:
        try:
            return {p.name: p.resolve().as_uri() for p in folder.iterdir() if p.is_file()}
        except OSError:
            return {}


def _read_url(url: str, limit: int) -> bytes:
    """The bytes at ``url`` (http, https or file), at most ``limit``. Raises
    UnavailableError when it cannot be read, InputError when it is larger."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limit + 1)
    except OSError as exc:
        raise UnavailableError(f"pypi: cannot read {url}: {exc}") from exc
    if len(data) > limit:
        raise InputError(f"pypi: {url} is larger than {limit} bytes")
    return data


def _sdist_links(name: str) -> dict[str, str]:
    """Every file the configured find-links and indexes offer for ``name``."""
    settings = _pip_settings()
    links: dict[str, str] = {}
    for location in settings.get("find-links", []):
        if "://" in location and not location.startswith("file:"):
            try:
                links.update(_Links.of_page(_read_url(location, 16 << 20).decode(
                    "utf-8", "replace"), location))
            except TrackbError:
                continue
        else:
            links.update(_Links.of_folder(Path(location.removeprefix("file://"))))
    if settings.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        return links
    indexes = (settings.get("index-url") or ["https://pypi.org/simple"]) + \
        settings.get("extra-index-url", [])
    for index in indexes:
        page = f"{index.rstrip('/')}/{_normalise(name)}/"
        if index.startswith("file:"):
            folder = Path(page.removeprefix("file://"))
            html = folder / "index.html"
            links.update(_Links.of_page(html.read_text("utf-8", "replace"), html.as_uri())
                         if html.is_file() else _Links.of_folder(folder))
            continue
        try:
            links.update(_Links.of_page(_read_url(page, 16 << 20).decode("utf-8", "replace"),
                                        page))
        except TrackbError:
            continue
    return links


def _fetch_sdist(name: str, version: str, dest: Path, pip_said: str = "") -> Path:
    """The sdist file of ``name==version`` from the configured indexes, downloaded into
    ``dest`` and checked against the ``#sha256=`` its index gives. Never built, never run.

    Raises MissingInputError when no index has it, UnavailableError when none can be
    read, InputError when it does not match its hash or is too large.
    """
    wanted = _normalise(f"{name}-{version}")
    matches = sorted((file_name, url) for file_name, url in _sdist_links(name).items()
                     if file_name.endswith(SDIST_SUFFIXES) and _normalise(
                         file_name.removesuffix(".tar.gz").removesuffix(".zip")) == wanted)
    if not matches:
        raise MissingInputError(f"pypi: no distribution {name}=={version} (pip: "
                                f"{pip_said or 'no wheel'}; and no source archive in the "
                                "configured indexes)")
    file_name, url = matches[0]
    data = _read_url(url, SDIST_BYTES)
    digest = url.partition("#sha256=")[2][:64]
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise InputError(f"pypi: {file_name} does not match the sha256 its index gives")
    target = dest / Path(file_name).name
    target.write_bytes(data)
    return target


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise UnavailableError(f"pypi: pip download timed out after {PIP_TIMEOUT_S} s") from exc


def network_failure(stderr: str) -> bool:
    return any(hint in stderr for hint in _NETWORK_HINTS)


def pip_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    # pip prints "Could not find a version ..." then "No matching distribution ...":
    # the last ERROR line is the verdict.
    chosen = errors[-1] if errors else (lines[-1] if lines else "no output")
    return chosen.removeprefix("ERROR:").strip()


def _unpack(archive: Path, target: Path) -> None:
    """Unpack a wheel/zip or tarball into ``target``, refusing paths that escape it.

    Raises InputError for a corrupt archive or a member that would land outside.
    """
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(info.filename, archive)
                zf.extractall(target)
        else:
            with tarfile.open(archive) as tf:
                members = []
                for member in tf.getmembers():
                    _check_member(member.name, archive)
                    # Links and device files have no place in a source corpus.
                    if member.isfile() or member.isdir():
                        members.append(member)
                tf.extractall(target, members=members, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"pypi: cannot unpack {archive.name}: {exc}") from exc


def _check_member(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InputError(f"pypi: {archive.name} holds an unsafe path {name!r}")
