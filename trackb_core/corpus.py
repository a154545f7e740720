"""Where a corpus comes from: a local folder, or a PyPI release fetched without running it.

:func:`resolve_corpus` turns a corpus spec into a local folder to walk, a sha256 that
pins its content, and JSON-able metadata for the manifest. It is called whenever a
stage hashes its inputs, so a PyPI corpus is fetched once into
``$TRACKB_CACHE/corpus/NAME-VERSION/`` and reused from there without calling pip.

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
from typing import Any

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
    """A corpus ready to walk: its folder, a content hash and manifest metadata."""

    path: Path
    sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)


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


def resolve_corpus(src: str) -> ResolvedCorpus:
    """Resolve a corpus spec: a directory or ``pypi:NAME==VERSION``.

    Raises ConfigError for a malformed ``pypi:`` spec, MissingInputError for a missing
    folder or a release PyPI does not have, InputError for a folder with no ``.py``
    files or an archive that cannot be unpacked, UnavailableError when pip cannot
    reach the index, StoreError when the cache folder cannot be written.
    """
    src = str(src).strip()
    if src.startswith(PYPI_PREFIX):
        name, version = parse_pypi_spec(src)
        return _resolve_pypi(name, version)
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
    """A byte-stable ``.tar.gz`` of the corpus' ``.py`` files and package metadata.

    The extract stage stores it beside its outputs so that later stages (unit tests run
    against the original functions in build-dataset and eval) find the exact corpus in
    the object store, also in pods whose egress reaches nothing else. Fixed order, zero
    mtimes and owners, so the same corpus always gives the same bytes.
    """
    import gzip
    import io

    files = python_files(root) + sorted(
        p for p in root.glob("*.dist-info/*") if p.is_file() and p.stat().st_size < 1 << 20)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(set(files), key=lambda p: p.relative_to(root).as_posix()):
            try:
                data = path.read_bytes()
            except OSError:
                continue  # extract counts it as unreadable; nothing to run it against
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


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
