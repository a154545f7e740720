"""Run the k8s launcher in a thread, guarded against hangs (shared by the launcher tests).

No test here depends on how fast the machine is: tests wait on conditions and events,
and the only clock is :data:`HANG_GUARD`, an outer limit far above any run's duration
that turns a real hang into a failure instead of a stalled suite.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

# Seconds: only a launcher that hangs comes near this, however busy the machine is.
HANG_GUARD = 600.0


def wait_until(condition: Callable[[], bool], what: str, guard: float = HANG_GUARD,
               every: float = 0.05) -> None:
    """Return once ``condition()`` holds; fail the test if it never does (a hang)."""
    deadline = time.monotonic() + guard
    stop = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not true after {guard:.0f}s"
        stop.wait(every)


def write_kubeconfig(path, server: str):
    """A kubeconfig at ``path`` whose current context is the API server at ``server``
    (what ``trackb`` commands and launcher processes read, as a user's would be)."""
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emu",
        "clusters": [{"name": "emu", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}]}))
    return path


def launch_within(limit: float, config, run_id, client, budgets, **kwargs):
    """``(report URI or exception, seconds)``; fails the test if the launcher hangs
    (runs past ``limit``, an outer guard, not a speed requirement). ``kwargs`` go to
    :func:`run_on_kubernetes` (e.g. ``clock``)."""
    from trackb_core.k8s.launcher import run_on_kubernetes

    result: dict = {}

    def target():
        try:
            result["value"] = run_on_kubernetes(config, run_id, api=client, budgets=budgets,
                                                **kwargs)
        except BaseException as exc:  # noqa: B036 - handed to the test thread
            result["value"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.perf_counter()
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the launcher hung for more than {limit}s"
    return result["value"], time.perf_counter() - started


class BackgroundLoop:
    """A fake Kubernetes controller: ``step()`` runs every ``interval`` seconds in a thread
    between ``__enter__`` and ``__exit__``; errors are kept in ``errors``, never swallowed."""

    interval = 0.2

    def __init__(self, name: str):
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # report, never die silently: tests check .errors
                if getattr(exc, "status", None) != 404:  # deleted between list and call
                    self.errors.append(traceback.format_exc())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
