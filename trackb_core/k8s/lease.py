"""One launcher per run id: a ``coordination.k8s.io`` Lease named after the run.

Two launchers of one run (a laptop and the in-cluster Job, or a restarted launcher
whose predecessor is not quite dead) would each replace the other's Jobs. The Lease
settles who drives the run, the way client-go's leader election does:

- the holder renews ``renewTime`` every third of ``leaseDurationSeconds`` from a thread
  and gives the lease up (empty holder) when it exits, so its successor starts at once;
- a launcher that finds the lease held waits. It never compares its clock with the
  holder's: it notes when it first saw the current record (holder, renewTime) on its
  own clock and takes over only once that record has not changed for a whole lease
  duration, i.e. the holder died without giving it up (SIGKILL, OOM, a lost node);
- every write carries the resourceVersion it read, so of two launchers taking over at
  once the API server lets only one win (409 Conflict for the other, which waits again).

The Lease also carries the run's store and pipeline, so ``trackb status RUN_ID`` finds
the run from the cluster alone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from trackb_core.errors import UnavailableError
from trackb_core.k8s.jobspec import object_name
from trackb_core.stage import say

PIPELINE_ANNOTATION = "trackb/pipeline"
STORE_ANNOTATION = "trackb/store"


class LeaseLost(UnavailableError):
    """Another launcher took the run's lease over: this one stops, deleting nothing."""


def lease_name(run_id: str) -> str:
    """The Lease of a run (the name its Jobs start with)."""
    return object_name(run_id, "lease")


def identity() -> str:
    """Who holds a lease: host (the pod name in a cluster), pid and a random suffix."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def _timestamp() -> str:
    # MicroTime: RFC 3339 with microseconds.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class RunLease:
    """The lease of one run, held by this launcher between :meth:`acquire` and
    :meth:`release`."""

    client: Any
    namespace: str
    run_id: str
    seconds: int
    annotations: dict[str, str] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    holder: str = field(default_factory=identity)
    lost: str | None = None  # why the lease was lost, set by the renewing thread
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return lease_name(self.run_id)

    # -- taking the lease ---------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the lease, waiting while another live launcher holds it; then keep it
        renewed from a thread. Raises UnavailableError (API down) or the client's
        ApiException (e.g. 403: no permission on leases)."""
        seen: tuple[Any, ...] | None = None
        seen_at = self.clock()
        told = None
        while True:
            lease = self.client.get("Lease", self.namespace, self.name)
            if lease is None:
                if self._create():
                    break
                continue
            spec = lease.get("spec") or {}
            current = spec.get("holderIdentity")
            record = (current, spec.get("renewTime"), spec.get("acquireTime"))
            if record != seen:
                seen, seen_at = record, self.clock()
            duration = float(spec.get("leaseDurationSeconds") or self.seconds)
            free = not current or current == self.holder
            if free or self.clock() - seen_at >= duration:
                if not free:
                    say("run-all", f"the lease of run {self.run_id} was not renewed for "
                        f"{duration:.0f}s: launcher {current} is gone; taking over")
                if self._take(lease):
                    break
                continue
            if told != current:
                told = current
                say("run-all", f"run {self.run_id} is driven by launcher {current} (Lease "
                    f"{self.name}); waiting until it ends or stops renewing "
                    f"(up to {duration:.0f}s after its last renewal)")
            self.sleep(min(max(duration / 4, 0.05), 5.0))
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}",
                                        daemon=True)
        self._thread.start()

    def _body(self, resource_version: str | None, transitions: int) -> dict[str, Any]:
        now = _timestamp()
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "labels": {"trackb/run-id": self.run_id},
                                    "annotations": self.annotations}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self.holder,
                         "leaseDurationSeconds": max(1, int(self.seconds)),
                         "acquireTime": now, "renewTime": now,
                         "leaseTransitions": transitions}}

    def _create(self) -> bool:
        try:
            self.client.create(self._body(None, 0))
            return True
        except self.client.ApiException as exc:
            if exc.status == 409:  # another launcher created it first: look again
                return False
            raise

    def _take(self, lease: dict[str, Any]) -> bool:
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        transitions = int(spec.get("leaseTransitions") or 0)
        if spec.get("holderIdentity") != self.holder:
            transitions += 1
        try:
            self.client.patch("Lease", self.namespace, self.name,
                              self._body(meta.get("resourceVersion"), transitions))
            return True
        except self.client.ApiException as exc:
            if exc.status == 409:  # someone else wrote it since we read it
                return False
            raise

    # -- keeping it -----------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(max(self.seconds / 3, 0.05)):
            try:
                self.renew()
            except LeaseLost as exc:
                self.lost = str(exc)
                return
            except Exception as exc:  # a failed renewal is retried at the next tick
                say("run-all", f"could not renew the lease of run {self.run_id}: {exc}")

    def renew(self) -> None:
        """Push renewTime forward. Raises LeaseLost when another launcher holds it."""
        lease = self.client.get("Lease", self.namespace, self.name)
        current = ((lease or {}).get("spec") or {}).get("holderIdentity")
        if current != self.holder:
            raise LeaseLost(f"launcher {current or '(none)'} took over run {self.run_id} "
                            "(this one did not renew its lease in time)")
        meta = lease.get("metadata") or {}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                "spec": {"renewTime": _timestamp()}}
        try:
            self.client.patch("Lease", self.namespace, self.name, body)
        except self.client.ApiException as exc:
            if exc.status != 409:
                raise
            self.renew()  # changed since read: look again (lost, or a harmless race)

    def check(self) -> None:
        """Raise LeaseLost if the renewing thread found the lease taken over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop renewing and give the lease up, so a successor need not wait. Best
        effort: a launcher that cannot reach the API leaves it to expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            lease = self.client.get("Lease", self.namespace, self.name)
            if ((lease or {}).get("spec") or {}).get("holderIdentity") == self.holder:
                meta = lease.get("metadata") or {}
                self.client.patch("Lease", self.namespace, self.name, {
                    "metadata": {"resourceVersion": meta.get("resourceVersion")},
                    "spec": {"holderIdentity": None}})
        except Exception as exc:
            say("run-all", f"could not release the lease of run {self.run_id} "
                f"(it expires by itself): {exc}")
