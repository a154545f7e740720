"""An execution environment per corpus: the dependencies it declares, so its modules import.

Tests of corpus code can only run where the corpus's modules import; most verl modules
import ray, omegaconf or tensordict, which trackb itself does not need. With
``execution_env: declared`` the extract stage reads the corpus's own requirements
(``Requires-Dist`` of its wheel's ``METADATA`` or its sdist's ``PKG-INFO``; extras
left out, markers evaluated for this interpreter), asks pip what it would add to the
environment trackb runs in (``pip install --dry-run --report``: what is installed and
compatible is reused, so torch is never fetched twice), and records the answer as a
**lock** (name, version, wheel URL, sha256) in its manifest.

:func:`materialise` installs a lock once, wheels only (``--only-binary=:all:``: no
package's build code ever runs), without resolving again (``--no-deps``) and with
hashes checked, into ``$TRACKB_CACHE/envs/<lock sha256>/``: a temporary folder renamed
into place, a marker written last, so a killed install is never mistaken for a finished
one. Sandboxed runs put it on ``sys.path`` after the corpus, read-only (Landlock gives
them no write access to it). Later stages install the same lock (the cache makes that
free on one machine); where they cannot reach an index they stop with the lock's
name, never run without the environment the extract stage measured with.

The folder is a ``--target`` install, one per lock, so two corpora whose dependencies
clash (or clash with trackb's own: a corpus pinning ``numpy<2``) each get theirs: the
sandbox finds a corpus's pins before trackb's packages, and trackb itself never imports
from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from trackb_core.corpus import cache_root, network_failure, package_metadata, pip_error_line
from trackb_core.errors import ConfigError, InputError, UnavailableError

MODES = ("base", "declared")
MARKER = "trackb-env.json"
PIP_SECONDS = 1800


def declared_requirements(corpus: Path) -> list[str]:
    """The corpus's ``Requires-Dist`` entries that apply here (markers evaluated for this
    interpreter, extras left out), in the order its metadata lists them; empty when it
    has no package metadata."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415

    for meta in package_metadata(Path(corpus)):
        wanted = []
        for line in meta.get_all("Requires-Dist") or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            wanted.append(str(requirement))
        return wanted
    return []


def resolve_lock(requirements: list[str]) -> list[dict[str, Any]]:
    """What pip would add to this environment to satisfy ``requirements``, wheels only:
    ``[{"name", "version", "url", "sha256"}]`` sorted by name. Nothing is installed.

    Raises UnavailableError when no package index can be reached, InputError when the
    requirements cannot be met with wheels.
    """
    if not requirements:
        return []
    with tempfile.TemporaryDirectory(prefix="trackb-env-") as tmp:
        report = Path(tmp) / "report.json"
        done = _pip(["install", "--dry-run", "--only-binary=:all:", "--quiet",
                     "--report", str(report), *requirements])
        if done.returncode != 0:
            _raise_pip("resolving the corpus's declared dependencies", done)
        data = json.loads(report.read_text(encoding="utf-8"))
    lock = []
    for entry in data.get("install") or []:
        info = entry.get("download_info") or {}
        hashes = (info.get("archive_info") or {}).get("hashes") or {}
        lock.append({"name": str(entry["metadata"]["name"]),
                     "version": str(entry["metadata"]["version"]),
                     "url": str(info.get("url", "")), "sha256": hashes.get("sha256")})
    return sorted(lock, key=lambda e: e["name"].lower())


def lock_sha256(lock: list[dict[str, Any]]) -> str:
    """The identity of a lock (the cache folder's name)."""
    return hashlib.sha256(json.dumps(lock, sort_keys=True).encode()).hexdigest()


def materialise(lock: list[dict[str, Any]]) -> Path | None:
    """The folder holding ``lock`` installed (None for an empty lock), installing it
    once into the cache (wheels only, no dependency resolution, hashes checked).

    Raises UnavailableError when the wheels cannot be downloaded (no index reachable:
    install the lock where one is, or mount the cache), InputError when pip refuses
    them (a hash mismatch), ConfigError for a malformed lock.
    """
    if not lock:
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("name"), str)
               and isinstance(e.get("version"), str) for e in lock):
        raise ConfigError("a malformed execution-environment lock (each entry needs a "
                          "name and a version)")
    sha = lock_sha256(lock)
    target = cache_root() / "envs" / sha[:24]
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        requirements = staging / "requirements.txt"
        lines = []
        for entry in lock:
            line = f"{entry['name']}=={entry['version']}"
            if entry.get("sha256"):
                line += f" --hash=sha256:{entry['sha256']}"
            lines.append(line)
        requirements.write_text("\n".join(lines) + "\n", encoding="utf-8")
        hashed = all(e.get("sha256") for e in lock)
        done = _pip(["install", "--no-deps", "--only-binary=:all:", "--quiet",
                     "--no-compile", "--target", str(staging / "site"),
                     *(["--require-hashes"] if hashed else []), "-r", str(requirements)])
        if done.returncode != 0:
            _raise_pip(f"installing the execution environment {sha[:12]}", done)
        (staging / "site" / MARKER).write_text(json.dumps({"sha256": sha, "lock": lock}),
                                               encoding="utf-8")
        if (target / MARKER).is_file():  # another process finished first
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging / "site", target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                               *args], capture_output=True, text=True, timeout=PIP_SECONDS,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise UnavailableError(f"pip did not finish within {PIP_SECONDS} s") from exc


def _raise_pip(what: str, done: subprocess.CompletedProcess[str]) -> None:
    line = pip_error_line(done.stderr)
    if network_failure(done.stderr):
        raise UnavailableError(f"{what}: no package index reachable ({line}); the lock is "
                               "in the extract manifest: install it where an index is, or "
                               "share $TRACKB_CACHE/envs")
    raise InputError(f"{what}: pip refused ({line})")


def describe(mode: str, requirements: list[str], lock: list[dict[str, Any]]) -> dict[str, Any]:
    """What the extract manifest records of the environment (``execution_env``)."""
    return {"mode": mode, "requirements": requirements, "lock": lock,
            "sha256": lock_sha256(lock) if lock else None}


def from_manifest(info: Any) -> Path | None:
    """The environment an extract manifest's ``execution_env`` names, installed
    (:func:`materialise`); None when it names none. Raises what :func:`materialise`
    raises."""
    if not isinstance(info, dict) or info.get("mode") != "declared":
        return None
    lock = info.get("lock")
    if not isinstance(lock, list):
        raise ConfigError("the extract manifest's execution_env has no lock")
    return materialise(lock)
