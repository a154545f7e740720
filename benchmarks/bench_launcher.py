"""How fast the k8s launcher reacts: from a Job's completion to the next Job's creation.

Against kmock's Kubernetes emulator over HTTP (the same harness as
tests/k8s/test_launcher.py), with a fake Job controller that completes each Job with a
fake-but-valid stage result in a local store. For each stage after the first, the
latency is the time from the controller marking the upstream Job Complete to the
launcher's create call for the next Job. The baseline is the emulator's own create
round-trip (one ConfigMap) measured in the same process: the floor for any launcher.
Goal (issue 3): median < 1 s.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 3


def main() -> None:
    try:
        import kmock  # noqa: F401
        import kubernetes  # noqa: F401
    except ImportError as exc:
        print(f"bench_launcher: skipped: {exc.name} is not installed (pip install kmock "
              "kubernetes)")
        return
    # As pytest does: the repo root and tests/k8s (its helper modules) are importable.
    for path in (ROOT, ROOT / "tests" / "k8s"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from tests.k8s.conftest import Emulator

    work = Path(tempfile.mkdtemp(prefix="bench-launcher-"))
    latencies: list[float] = []
    baselines: list[float] = []
    corpus = work / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("def f(x):\n    \"\"\"Double.\"\"\"\n    return 2 * x\n")
    try:
        for index in range(RUNS):
            # A fresh API server per run, like a fresh namespace: the emulator keeps every
            # request and object in memory, and runs should not slow each other down.
            emulator = Emulator()
            try:
                client = emulator.client()
                baselines.append(_create_round_trip(client))
                latencies += _one_run(emulator, client, work, corpus, f"bench-{index}")
            finally:
                emulator.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline = statistics.median(baselines)
    median = statistics.median(latencies)
    print(f"launcher: Job complete -> next Job created, median {median * 1000:.1f} ms over "
          f"{len(latencies)} transitions (max {max(latencies) * 1000:.1f} ms); goal < 1000 ms")
    print(f"baseline: emulator create round-trip {baseline * 1000:.1f} ms; ratio "
          f"{median / baseline:.1f}x")


def _one_run(emulator, client, work: Path, corpus: Path, run_id: str) -> list[float]:
    """Latencies of one whole run (every stage faked by the controller)."""
    from tests.k8s.conftest import FakeJobController
    from trackb_core.config import build_config
    from trackb_core.k8s.launcher import LauncherConfig, run_on_kubernetes
    from trackb_core.pipeline import PipelineConfig

    config = build_config(PipelineConfig, {
        "run_id": run_id, "store": str(work / "store"), "corpus": str(corpus),
        "model": "tiny", "backend": "k8s"})
    created: list[tuple[str, float]] = []
    original = client.create

    def timed_create(obj):
        result = original(obj)
        if obj["kind"] == "Job":
            created.append((obj["metadata"]["labels"]["trackb/stage"], time.perf_counter()))
        return result

    client.create = timed_create
    with _local_cluster_store(work / "store"), \
            FakeJobController(emulator, config, run_id, fake=lambda stage: True) as controller:
        run_on_kubernetes(config, run_id, api=client, budgets=LauncherConfig(poll_seconds=2.0))
    client.create = original
    return _latencies(config, controller.completed, created)


def _create_round_trip(client) -> float:
    """Median seconds of one create + delete of a small ConfigMap on the emulator."""
    times = []
    for index in range(20):
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": f"probe-{index}", "namespace": "bench"},
               "data": {"k": "v"}}
        started = time.perf_counter()
        client.create(obj)
        times.append(time.perf_counter() - started)
        client.delete("ConfigMap", "bench", f"probe-{index}")
    return statistics.median(times)


def _latencies(config, completed, created) -> list[float]:
    """For each created Job whose upstream stages all completed: create - last upstream."""
    from trackb_core.k8s import jobspec

    done = dict(completed)
    needs = jobspec.dependencies(config, config.run_id)
    out = []
    for stage, at in created:
        upstream = [done[s] for s in needs[stage] if s in done]
        if upstream and len(upstream) == len(needs[stage]):
            out.append(at - max(upstream))
    return out


class _local_cluster_store:
    """Point the pods' store at a local folder: the bench measures the launcher, not S3."""

    def __init__(self, root: Path):
        self.root = str(root)

    def __enter__(self):
        from trackb_core.k8s import jobspec

        self.saved = jobspec.cluster_store_uri
        jobspec.cluster_store_uri = lambda config: self.root
        return self

    def __exit__(self, *exc):
        from trackb_core.k8s import jobspec

        jobspec.cluster_store_uri = self.saved


if __name__ == "__main__":
    main()
