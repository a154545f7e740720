"""Run the k8s launcher in a thread with a hard time limit (shared by the launcher tests)."""

from __future__ import annotations

import threading
import time


def launch_within(limit: float, config, run_id, client, budgets):
    """``(report URI or exception, seconds)``; fails the test if the launcher hangs."""
    from trackb_core.k8s.launcher import run_on_kubernetes

    result: dict = {}

    def target():
        try:
            result["value"] = run_on_kubernetes(config, run_id, api=client, budgets=budgets)
        except BaseException as exc:  # noqa: B036 - handed to the test thread
            result["value"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.perf_counter()
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the launcher hung for more than {limit}s"
    return result["value"], time.perf_counter() - started
