"""Exactly one module talks to the cluster SDK (metaflow's lesson): trackb_core/k8s/client.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]


def importers_of(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / "trackb_core").rglob("*.py")) + sorted((ROOT / "jobs").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            if any(name == package or name.startswith(package + ".") for name in names):
                found.append(path.relative_to(ROOT).as_posix())
                break
    return found


def test_only_the_client_module_imports_kubernetes():
    assert importers_of("kubernetes") == ["trackb_core/k8s/client.py"]


def test_only_the_store_module_imports_boto3():
    assert importers_of("boto3") == ["trackb_core/store.py"]
