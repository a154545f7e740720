"""Corpus resolution: local folders and pypi: releases (pip faked unless integration)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from trackb_core import corpus
from trackb_core.corpus import MARKER, parse_pypi_spec, resolve_corpus
from trackb_core.errors import (
    ConfigError,
    InputError,
    MissingInputError,
    StoreError,
    UnavailableError,
)

# -- local folders --------------------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_dir_hash_covers_paths_and_bytes_of_py_files_only(tmp_path):
    root = _tree(tmp_path / "c", {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n", "README": "hi"})
    first = resolve_corpus(str(root))
    assert first.path == root
    assert len(first.sha256) == 64
    assert first.metadata["python_files"] == 2
    assert json.dumps(first.metadata)  # JSON-able for the manifest

    (root / "README").write_text("changed")  # not a .py file: same corpus
    assert resolve_corpus(str(root)).sha256 == first.sha256

    (root / "pkg/b.py").write_text("y = 3\n")
    changed = resolve_corpus(str(root)).sha256
    assert changed != first.sha256

    (root / "pkg/b.py").rename(root / "pkg/c.py")  # same bytes, other path
    assert resolve_corpus(str(root)).sha256 not in (first.sha256, changed)


def test_same_content_in_two_places_hashes_the_same(tmp_path):
    files = {"a.py": "x = 1\n", "sub/b.py": "def f():\n    return 1\n"}
    one = resolve_corpus(str(_tree(tmp_path / "one", files)))
    two = resolve_corpus(str(_tree(tmp_path / "two", files)))
    assert one.sha256 == two.sha256


def test_missing_dir_is_missing_input(tmp_path):
    with pytest.raises(MissingInputError, match="corpus folder not found: .*nope"):
        resolve_corpus(str(tmp_path / "nope"))


def test_dir_without_py_files_is_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no code")
    with pytest.raises(InputError, match=r"holds no \.py files"):
        resolve_corpus(str(tmp_path))


# -- pypi specs ---------------------------------------------------------------------------


def test_symlink_loops_and_dangling_links_are_not_followed(tmp_path):
    root = _tree(tmp_path / "c", {"a.py": "x = 1\n", "pkg/b.py": "y = 2\n"})
    (root / "pkg" / "up").symlink_to("..", target_is_directory=True)  # a loop to the parent
    (root / "pkg" / "deeper").symlink_to(root, target_is_directory=True)  # to the root
    (root / "self.py").symlink_to("self.py")  # ELOOP
    (root / "dangling.py").symlink_to("missing.py")
    (root / "ab.py").symlink_to(root / "a.py")  # a link to a real file counts
    files = corpus.python_files(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a.py", "ab.py", "pkg/b.py"]
    assert resolve_corpus(str(root)).metadata["python_files"] == 3


def test_an_unreadable_file_does_not_stop_hashing(tmp_path, monkeypatch):
    root = _tree(tmp_path / "c", {"a.py": "x = 1\n", "b.py": "y = 2\n"})
    before = resolve_corpus(str(root)).sha256
    real_open = Path.open

    def failing_open(path, *args, **kwargs):
        if path.name == "b.py":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    assert resolve_corpus(str(root)).sha256 != before  # hashed as unreadable, no crash


def test_parse_pypi_spec():
    assert parse_pypi_spec("pypi:verl==0.9.1") == ("verl", "0.9.1")
    assert parse_pypi_spec("pypi: my_pkg.x == 1.0rc1 ") == ("my_pkg.x", "1.0rc1")


@pytest.mark.parametrize("spec, message", [
    ("pypi:verl", "must pin a version"),
    ("pypi:verl==", "must pin a version"),
    ("pypi:verl>=0.9", "must pin a version"),
    ("pypi:-bad-==1.0", "not a valid distribution name"),
    ("pypi:a b==1.0", "not a valid distribution name"),
    ("pypi:verl==1.0;rm", "not a valid version"),
])
def test_bad_pypi_spec_is_config_error(spec, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_run_pip", _no_pip)
    with pytest.raises(ConfigError, match=message):
        resolve_corpus(spec)


# -- pypi downloads, with pip faked --------------------------------------------------------


def _no_pip(cmd):
    raise AssertionError(f"pip must not be called: {cmd}")


def _wheel_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def _sdist_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


NO_SUCH = ("ERROR: Could not find a version that satisfies the requirement nope==1.0 "
           "(from versions: none)\nERROR: No matching distribution found for nope==1.0\n")
NETWORK = ("WARNING: Retrying (Retry(total=4)) after connection broken by "
           "'NewConnectionError(\"Failed to establish a new connection: "
           "[Errno -3] Temporary failure in name resolution\")': /simple/nope/\n" + NO_SUCH)


class FakePip:
    """Stands in for ``pip download``: drops the given files into ``-d`` and records calls;
    ``pip config list`` prints ``config`` (default: no index, no find-links)."""

    def __init__(self, files: dict[str, bytes], returncode: int = 0, stderr: str = "",
                 config: str = ":env:.no-index='1'\n"):
        self.files, self.returncode, self.stderr = files, returncode, stderr
        self.config = config
        self.calls: list[list[str]] = []

    def __call__(self, cmd):
        if cmd[3] == "config":
            return subprocess.CompletedProcess(cmd, 0, self.config, "")
        self.calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        if self.returncode == 0:
            for name, data in self.files.items():
                (dest / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def test_pypi_wheel_is_unpacked_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    wheel = _wheel_bytes({"demo/__init__.py": "", "demo/core.py": "def f():\n    return 1\n"})
    pip = FakePip({"demo-1.0-py3-none-any.whl": wheel,
                   "demo-1.0.tar.gz": _sdist_bytes({"demo-1.0/setup.py": ""})})
    monkeypatch.setattr(corpus, "_run_pip", pip)

    got = resolve_corpus("pypi:demo==1.0")
    import hashlib

    assert got.path == tmp_path / "cache" / "corpus" / "demo-1.0"
    assert (got.path / "demo" / "core.py").read_text().startswith("def f")
    assert not (got.path / "demo-1.0" / "setup.py").exists()  # the wheel won
    assert got.sha256 == hashlib.sha256(wheel).hexdigest()
    assert got.metadata == {"name": "demo", "version": "1.0",
                            "filename": "demo-1.0-py3-none-any.whl", "sha256": got.sha256}
    assert json.loads((got.path / MARKER).read_text()) == got.metadata
    cmd = pip.calls[0]
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "demo==1.0", "-d", cmd[-1]]
    # Only the finished folder is left beside the cache entries.
    assert sorted(p.name for p in got.path.parent.iterdir()) == ["demo-1.0"]

    monkeypatch.setattr(corpus, "_run_pip", _no_pip)
    again = resolve_corpus("pypi:demo==1.0")
    assert again == got


def test_damaged_marker_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    target = tmp_path / "corpus" / "demo-1.0"
    target.mkdir(parents=True)
    (target / MARKER).write_text("{not json")
    pip = FakePip({"demo-1.0-py3-none-any.whl": _wheel_bytes({"demo/a.py": "a = 1\n"})})
    monkeypatch.setattr(corpus, "_run_pip", pip)
    got = resolve_corpus("pypi:demo==1.0")
    assert len(pip.calls) == 1
    assert json.loads((target / MARKER).read_text())["name"] == "demo"
    assert (got.path / "demo" / "a.py").exists()


def test_unwritable_cache_is_store_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "file"))
    pip = FakePip({"demo-1.0-py3-none-any.whl": _wheel_bytes({"demo/a.py": ""})})
    monkeypatch.setattr(corpus, "_run_pip", pip)
    with pytest.raises(StoreError, match="cannot write the corpus cache"):
        resolve_corpus("pypi:demo==1.0")


def test_pypi_sdist_when_there_is_no_wheel_is_fetched_as_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    links = tmp_path / "links"
    links.mkdir()
    sdist = _sdist_bytes({"demo-2.0/demo/mod.py": "x = 1\n", "demo-2.0/PKG-INFO": ""})
    (links / "demo-2.0.tar.gz").write_bytes(sdist)
    (links / "demo-1.9.tar.gz").write_bytes(b"other version")
    calls = []

    def pip(cmd):
        calls.append(cmd[3])
        if cmd[3] == "config":  # what pip is configured with: these find-links only
            return subprocess.CompletedProcess(cmd, 0, f"global.find-links='{links}'\n"
                                               ":env:.no-index='1'\n", "")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution "
                                           "found for demo==2.0")

    monkeypatch.setattr(corpus, "_run_pip", pip)
    got = resolve_corpus("pypi:demo==2.0")
    assert calls == ["download", "config"]  # a wheel only; then the file, never built
    assert (got.path / "demo-2.0" / "demo" / "mod.py").read_text() == "x = 1\n"
    assert got.metadata["filename"] == "demo-2.0.tar.gz"


def test_an_sdist_only_package_never_runs_its_build_backend(tmp_path):
    """Real pip, a local find-links folder and an sdist whose setup.py writes a file."""
    marker = tmp_path / "the-build-backend-ran"
    links = tmp_path / "links"
    links.mkdir()
    setup = (f"open({str(marker)!r}, 'w').write('ran')\n"
             "from setuptools import setup\nsetup(name='evilpkg', version='1.0')\n")
    module = ("def tally(values):\n    total = 0\n    for value in values:\n"
              "        if value > 0:\n            total += value\n    return total\n")
    (links / "evilpkg-1.0.tar.gz").write_bytes(_sdist_bytes({
        "evilpkg-1.0/setup.py": setup, "evilpkg-1.0/PKG-INFO": "Name: evilpkg\n",
        "evilpkg-1.0/evilpkg/__init__.py": "", "evilpkg-1.0/evilpkg/core.py": module}))
    env = {**os.environ, "TRACKB_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "trackb_core.cli", "extract", "--corpus",
                           "pypi:evilpkg==1.0", "--out", str(tmp_path / "extract")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists(), "the package's setup.py ran on the host"
    functions = (tmp_path / "extract" / "functions.jsonl").read_text()
    assert '"name": "tally"' in functions


def test_half_unpacked_cache_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    stale = tmp_path / "corpus" / "demo-1.0"
    stale.mkdir(parents=True)
    (stale / "partial.py").write_text("x = ")  # an interrupted fetch: no marker
    pip = FakePip({"demo-1.0-py3-none-any.whl": _wheel_bytes({"demo/a.py": "a = 1\n"})})
    monkeypatch.setattr(corpus, "_run_pip", pip)
    got = resolve_corpus("pypi:demo==1.0")
    assert len(pip.calls) == 1
    assert not (got.path / "partial.py").exists()
    assert (got.path / "demo" / "a.py").exists()


@pytest.mark.parametrize("make", [
    lambda: ("evil-1.0-py3-none-any.whl", _wheel_bytes({"../escape.py": "x = 1\n"})),
    lambda: ("evil-1.0.tar.gz", _sdist_bytes({"/abs/escape.py": "x = 1\n"})),
])
def test_archive_paths_escaping_the_target_are_refused(make, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    name, data = make()
    if name.endswith(".whl"):
        pip = FakePip({name: data})
    else:  # no wheel: the sdist file comes from the find-links folder
        links = tmp_path / "links"
        links.mkdir()
        (links / name).write_bytes(data)
        pip = FakePip({}, returncode=1, stderr=NO_SUCH,
                      config=f"global.find-links='{links}'\n:env:.no-index='1'\n")
    monkeypatch.setattr(corpus, "_run_pip", pip)
    with pytest.raises(InputError, match="unsafe path"):
        resolve_corpus("pypi:evil==1.0")
    assert not (tmp_path / "escape.py").exists()
    assert not (tmp_path / "cache" / "corpus" / "evil-1.0").exists()


def test_corrupt_archive_is_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_run_pip",
                        FakePip({"demo-1.0-py3-none-any.whl": b"not a zip"}))
    with pytest.raises(InputError, match="cannot unpack demo-1.0-py3-none-any.whl"):
        resolve_corpus("pypi:demo==1.0")
    assert not (tmp_path / "corpus" / "demo-1.0").exists()


def test_pip_no_such_distribution_is_missing_input(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_run_pip", FakePip({}, returncode=1, stderr=NO_SUCH))
    with pytest.raises(MissingInputError) as info:
        resolve_corpus("pypi:nope==1.0")
    assert str(info.value) == ("pypi: no distribution nope==1.0 "
                               "(pip: No matching distribution found for nope==1.0; and no "
                               "source archive in the configured indexes)")
    assert not (tmp_path / "corpus" / "nope-1.0").exists()


def test_pip_network_failure_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_run_pip", FakePip({}, returncode=1, stderr=NETWORK))
    with pytest.raises(UnavailableError, match="cannot reach the package index"):
        resolve_corpus("pypi:nope==1.0")
    assert UnavailableError.exit_code == 75  # retryable, unlike a missing package


def test_pip_timeout_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))

    def hang(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, 1)

    monkeypatch.setattr(corpus.subprocess, "run", hang)
    with pytest.raises(UnavailableError, match="timed out"):
        resolve_corpus("pypi:demo==1.0")


@pytest.mark.integration
def test_real_pip_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path))
    with pytest.raises(MissingInputError,
                       match=r"^pypi: no distribution no-such-package-trackb-xyz==0\.0\.1 \(pip: "):
        resolve_corpus("pypi:no-such-package-trackb-xyz==0.0.1")


def test_snapshot_is_byte_stable_and_holds_sources_and_metadata(tmp_path):
    import io
    import tarfile
    import time

    from trackb_core.corpus import snapshot_bytes

    root = tmp_path / "c"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "pkg" / "data.bin").write_bytes(b"\0")  # not source: left out
    (root / "pkg-1.0.dist-info").mkdir()
    (root / "pkg-1.0.dist-info" / "METADATA").write_text("Name: pkg\n")
    first = snapshot_bytes(root)
    time.sleep(0.01)
    (root / "pkg" / "a.py").touch()  # a newer mtime must not change the bytes
    assert snapshot_bytes(root) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        assert tf.getnames() == ["pkg-1.0.dist-info/METADATA", "pkg/a.py"]
