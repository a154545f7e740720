"""Teacher client throughput against a server with a fixed 200 ms latency (benchmark P2).

The server is tests/fault_server.py in its own process (aiohttp, no faults), so it
does not compete with the client for the GIL. With ``c`` requests in flight and a
latency ``L`` the best any client can do is ``c / L`` answers per second; the ratio to
that ideal shows what the client itself costs. Each setting answers ``ROUNDS * c``
tasks. Goal (issue P2): >= 0.8 of the ideal at 32 in flight. The baseline run in the
same process is 2 in flight, the seed's setting.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATENCY = 0.2
IN_FLIGHT = (1, 2, 8, 32, 64)
BASELINE = 2
ROUNDS = 10
GOAL_AT_32 = 0.8


def main() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("bench_teacher: skipped: aiohttp is not installed")
        return
    from trackb_core.openai_teacher import OpenAITeacher

    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_server.py"),
                               "--latency", str(LATENCY)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        base_url = f"http://127.0.0.1:{port}/v1"
        throughput: dict[int, float] = {}
        for in_flight in IN_FLIGHT:
            teacher = OpenAITeacher(base_url, concurrency=in_flight, max_retries=0,
                                    timeout=30, ready_timeout=30)
            teacher.connect()
            tasks = [{"id": f"t{i}", "category": "complete",
                      "instruction": f"bench task {in_flight}-{i}"}
                     for i in range(ROUNDS * in_flight)]
            start = time.perf_counter()
            answered = sum(result.ok for result in teacher.answer_all(tasks))
            seconds = time.perf_counter() - start
            assert answered == len(tasks), f"{len(tasks) - answered} requests failed"
            throughput[in_flight] = answered / seconds
    finally:
        server.stdin.close()
        server.wait(30)

    print(f"teacher client vs a server with {LATENCY * 1000:.0f} ms latency "
          f"({ROUNDS} rounds per setting)")
    print(f"{'in flight':>9}  {'answers/s':>9}  {'ideal/s':>8}  {'of ideal':>8}  "
          f"{'vs ' + str(BASELINE) + ' in flight':>15}")
    for in_flight, rate in throughput.items():
        ideal = in_flight / LATENCY
        print(f"{in_flight:>9}  {rate:>9.1f}  {ideal:>8.1f}  {rate / ideal:>8.2f}  "
              f"{rate / throughput[BASELINE]:>14.1f}x")
    at_32 = throughput[32] / (32 / LATENCY)
    print(f"goal: >= {GOAL_AT_32} of ideal at 32 in flight: {at_32:.2f} "
          f"({'met' if at_32 >= GOAL_AT_32 else 'NOT met'})")


if __name__ == "__main__":
    main()
