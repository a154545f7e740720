"""Every module imports on a CPU-only machine, and cheaply: heavy libraries load lazily."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import trackb_core

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib", "boto3", "vllm")
MODULES = sorted(m.name for m in pkgutil.walk_packages(trackb_core.__path__, "trackb_core."))
PACKAGE = Path(trackb_core.__file__).parent


def test_all_modules_import_without_heavy_libraries():
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported at module level: {proc.stdout.strip()}"
    assert "trackb_core.cli" in MODULES and "trackb_core.pipeline" in MODULES


def _module_files(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the trackb_core modules it imports, from every ``import`` statement
    wherever it stands (function-local ones included), resolved to the innermost module
    that exists. A module's import of its own package's ``__init__`` is not counted:
    Python runs that first anyway."""
    files = _module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_trackb_core_counting_function_local_imports():
    graph = import_graph()
    assert "trackb_core.families.bugfix" in graph and len(graph) == len(MODULES) + 1
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_local_import(tmp_path):
    # pipeline -> launcher (inside a function) -> jobspec -> pipeline, as it once was
    package = tmp_path / "pkg"
    (package / "k8s").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "k8s" / "__init__.py").write_text("")
    (package / "pipeline.py").write_text(
        "def run():\n    from pkg.k8s.launcher import go\n    return go()\n")
    (package / "k8s" / "launcher.py").write_text("from . import jobspec\n")
    (package / "k8s" / "jobspec.py").write_text("from ..pipeline import run\n")
    (package / "other.py").write_text("import pkg.pipeline\n")
    assert cycles(import_graph(package)) == [
        ["pkg.k8s.jobspec", "pkg.k8s.launcher", "pkg.pipeline"]]
