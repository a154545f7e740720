"""Helm chart tests: shared helpers (helm binary, rendering, schema validation).

helm comes from ``.cache/tools/bin`` (fetched by scripts/fetch_helm.py, which the first
test that needs it runs automatically) or from PATH; when neither works the tests skip
with the fetch script's reason.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "trackb"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion; native sidecars are
# on by default from 1.29) and the version of the bundled kubectl. Pinned: a new
# kubernetes-validate release adds schemas but does not move these.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
RELEASE = "demo"
NAMESPACE = "ml-batch"  # not the KubernetesConfig default, so overrides show


@functools.lru_cache(maxsize=1)
def _helm_or_reason() -> tuple[str | None, str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fetch_helm
    finally:
        sys.path.pop(0)
    try:
        return str(fetch_helm.ensure_tools() / "helm"), ""
    except fetch_helm.FetchError as exc:
        on_path = shutil.which("helm")
        if on_path:
            return on_path, ""
        return None, f"helm unavailable: {exc}"


def helm_binary() -> str:
    """Path of a working helm; skips the calling test with the reason when there is none."""
    helm, reason = _helm_or_reason()
    if helm is None:
        pytest.skip(reason)
    return helm


def run_helm(*args: str) -> subprocess.CompletedProcess:
    """``helm ARGS`` with the output captured (never raises on a non-zero exit)."""
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


@functools.lru_cache(maxsize=64)
def _template(values_files: tuple[str, ...], sets: tuple[str, ...]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["--values", path]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(*values_files: str | Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The objects ``helm template`` renders with these values files and ``--set`` items."""
    import yaml

    text = _template(tuple(str(p) for p in values_files), tuple(sets))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_ci(name: str, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Render with ``ci/<name>.yaml``."""
    return render(CHART / "ci" / f"{name}.yaml", sets=sets)


def validate_for_kubernetes(objects: list[dict[str, Any]]) -> None:
    """Fail the test naming the first object invalid for a pinned Kubernetes version."""
    import kubernetes_validate  # a dev dependency: missing is a failure, not a skip

    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for "
                            f"Kubernetes {version}: {exc.message} at {list(exc.path)}")


def find(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    """Objects of ``kind`` (and app.kubernetes.io/component ``component``, if given)."""
    return [o for o in objects if o["kind"] == kind and (
        component is None
        or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def one(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict:
    """The single object of ``kind`` / ``component``; fails when there are 0 or several."""
    found = find(objects, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod spec inside a Job or Deployment."""
    return obj["spec"]["template"]["spec"]
