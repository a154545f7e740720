"""Partitioned generate: four partitions against four servers vs one against one (issue 15,
acceptance 2: >= 3.5x).

Each server is tests/fault_server.py in its own process, like one vLLM replica: it serves
at most ``SERVER_SLOTS`` chat requests at once, each for a fixed ``LATENCY``, and queues
the rest. One partition against one server can do at most ``SERVER_SLOTS / LATENCY``
answers per second however many requests it keeps in flight; four partitions, each
with its own server (``base_urls``), can do four times that.

What is timed: each server logs when its first request arrived and when it sent its last
answer; throughput is the answers all servers sent divided by the span from the first
arrival to the last answer (the generate phase as the servers saw it: process starts,
waiting for /v1/models and the merge are not in it). The wall time of the whole
``generate.run`` call, those included, is printed beside it. Both runs answer the same
``TASKS`` tasks with the default in-flight setting (``concurrency``) per partition, and
must write byte-identical responses.jsonl.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATENCY = 0.2
SERVER_SLOTS = 16
TASKS = 1600
PARTITIONS = 4
GOAL = 3.5


def start_servers(count: int) -> list[tuple[subprocess.Popen, str]]:
    servers = []
    for _ in range(count):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fault_server.py"), "--latency", str(LATENCY),
             "--max-concurrent", str(SERVER_SLOTS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = int(process.stdout.readline().split()[1])
        servers.append((process, f"http://127.0.0.1:{port}/v1"))
    return servers


def stop_servers(servers: list[tuple[subprocess.Popen, str]]) -> list[dict]:
    """Each server's own record of what it served (see fault_server.main)."""
    records = []
    for process, _ in servers:
        process.stdin.close()
        records.append(json.loads(process.stdout.read().strip().splitlines()[-1]))
        process.wait(30)
    return records


def timed_generate(tasks: str, out: Path, count: int) -> dict:
    """Run generate in ``count`` partitions, one server each; what the servers saw."""
    from trackb_core import generate
    from trackb_core.store import LocalStore

    servers = start_servers(count)
    try:
        config = generate.GenerateConfig(
            tasks=tasks, teacher="openai", partitions=count, max_retries=0, timeout=60,
            ready_timeout=30, base_urls=[url for _, url in servers])
        start = time.perf_counter()
        manifest = generate.run(config, LocalStore(out))
        wall = time.perf_counter() - start
    finally:
        records = stop_servers(servers)
    answered = sum(r["requests"] for r in records)
    span = max(r["last_answer"] for r in records) - min(r["first_arrival"] for r in records)
    assert manifest["counts"]["responses"] == answered == int(TASKS), (
        f"{manifest['counts']} vs {answered} requests")
    return {"answered": answered, "span": span, "wall": wall, "per_s": answered / span,
            "max_in_flight": max(r["max_in_flight"] for r in records),
            "concurrency": config.concurrency}


def main() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("bench_partitions: skipped: aiohttp is not installed")
        return
    categories = ("docstring", "explain", "bugfix", "complete", "unit_test")
    with tempfile.TemporaryDirectory(prefix="bench-partitions-") as tmp:
        folder = Path(tmp) / "extract"
        folder.mkdir()
        (folder / "tasks.jsonl").write_text("".join(
            json.dumps({"id": f"t{i:05d}", "category": categories[i % 5],
                        "instruction": f"bench task {i}: answer for f{i}."}) + "\n"
            for i in range(TASKS)))
        one = timed_generate(str(folder), Path(tmp) / "one", 1)
        many = timed_generate(str(folder), Path(tmp) / "many", PARTITIONS)
        same = ((Path(tmp) / "one" / "responses.jsonl").read_bytes()
                == (Path(tmp) / "many" / "responses.jsonl").read_bytes())

    ideal = SERVER_SLOTS / LATENCY
    print(f"generate, {TASKS} tasks; each server serves {SERVER_SLOTS} requests at once for "
          f"{LATENCY * 1000:.0f} ms (ideal {ideal:.0f} answers/s per server), queues the rest; "
          f"{one['concurrency']} in flight per partition")
    print(f"{'partitions':>10}  {'answers/s':>9}  {'of ideal':>8}  {'served in':>9}  "
          f"{'wall (all)':>10}")
    for count, result in ((1, one), (PARTITIONS, many)):
        print(f"{count:>10}  {result['per_s']:>9.1f}  {result['per_s'] / (ideal * count):>8.2f}"
              f"  {result['span']:>8.1f}s  {result['wall']:>9.1f}s")
    ratio = many["per_s"] / one["per_s"]
    print(f"responses.jsonl identical: {same}")
    print(f"wall-time ratio (process starts and merge included): "
          f"{one['wall'] / many['wall']:.2f}x")
    print(f"goal: {PARTITIONS} partitions >= {GOAL}x one (server-measured): {ratio:.2f}x "
          f"({'met' if ratio >= GOAL and same else 'NOT met'})")


if __name__ == "__main__":
    main()
