"""Partitions: one step's items split across processes or pods, merged last.

A partitioned step (``partitions: N`` on generate or eval) answers its items in N
disjoint parts. Which part an item belongs to is a pure function of its id
(:func:`member`): a rerun, a resume and another N = 1 run agree on it, whatever the
order of the input or the machine. Each part is a stage run of its own, into
``<step>/partitions/part-0000I-of-0000N/`` (the name cannot clash with generate's
``cache/shard-*`` files), with its outputs and its own manifest; a part whose manifest
matches is never redone. The step's own outputs are written by a merge that reads every
part and writes the step's output and manifest last, byte-identical to an N = 1 run.

While a part runs it writes ``progress.json`` beside its outputs (:class:`Progress`):
done and total items and when it started, which the launcher and ``trackb status``
read (:func:`read_progress`) to show each part's rate and ETA.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from trackb_core.config import StageConfig
from trackb_core.errors import MissingInputError
from trackb_core.store import Store

PART_DIR = "partitions"
PROGRESS_FILE = "progress.json"
# How often a part rewrites progress.json, at most: each write is one PUT on S3.
PROGRESS_EVERY_SECONDS = 10.0


class PartitionOptions(StageConfig):
    """The options of a step that can run in parts (generate, eval's generation)."""

    partitions: int = Field(
        1, ge=1, description="Answer the items in this many disjoint parts, each a process "
        "here or a pod of one Indexed Job on Kubernetes (one teacher server or GPU each), "
        "merged last into the same output as one part would write. An item's part is a "
        "hash of its id, so reruns and resumes agree; a finished part is never redone.")
    partition: int | None = Field(
        None, ge=0, description="Run only this part (0 .. partitions-1) into "
        "partitions/part-0000I-of-0000N/ of --out; set by the launcher for each process or "
        "pod. Unset: run every part not yet done, then merge.")

    @model_validator(mode="after")
    def _partition_in_range(self) -> PartitionOptions:
        if self.partition is not None and self.partition >= self.partitions:
            raise ValueError(f"partition {self.partition} is not one of "
                             f"0..{self.partitions - 1}")
        return self


def partitions_of(config: StageConfig) -> int:
    """How many parts a step config runs in (1 for a step that cannot be split)."""
    return int(getattr(config, "partitions", 1) or 1)


def member(item_id: str, count: int) -> int:
    """The part (0 .. ``count`` - 1) that answers the item ``item_id``: the first 8
    bytes of the sha256 of its id, modulo ``count``. Pure; raises ValueError if
    ``count`` < 1."""
    if count < 1:
        raise ValueError(f"partition count must be at least 1, not {count}")
    digest = hashlib.sha256(str(item_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def part_name(index: int, count: int) -> str:
    """The folder of part ``index`` of ``count``: ``part-00001-of-00004``. Raises
    ValueError for an index outside ``0 .. count - 1``."""
    if not 0 <= index < count:
        raise ValueError(f"partition {index} is not one of 0..{count - 1}")
    return f"part-{index:05d}-of-{count:05d}"


def part_store(out: Store, index: int, count: int) -> Store:
    """Where part ``index`` of ``count`` of the step at ``out`` writes."""
    return out.child(f"{PART_DIR}/{part_name(index, count)}")


@dataclass
class Progress:
    """Writes ``progress.json`` of one part, at most every ``every`` seconds (and at
    :meth:`finish`). Never raises for a failed write: progress is a courtesy, the
    outputs and the manifest are what count."""

    out: Store
    total: int
    every: float = PROGRESS_EVERY_SECONDS

    def __post_init__(self) -> None:
        self.started = time.time()
        self.done = 0
        self._written = 0.0

    def advance(self, n: int = 1) -> None:
        """``n`` more items done; written if ``every`` seconds have passed."""
        self.done += n
        if time.monotonic() - self._written >= self.every:
            self._write()

    def finish(self) -> None:
        """Write the final count now."""
        self._write()

    def _write(self) -> None:
        self._written = time.monotonic()
        record = {"done": self.done, "total": self.total, "started": self.started,
                  "updated": time.time()}
        try:
            self.out.put_text(PROGRESS_FILE, json.dumps(record, sort_keys=True) + "\n")
        except Exception:  # noqa: BLE001 - see the class docstring
            pass


def read_progress(out: Store) -> dict[str, Any] | None:
    """A part's ``progress.json`` (``{"done", "total", "started", "updated"}``), or None
    when it has none or it is unreadable. Raises nothing."""
    try:
        data = json.loads(out.get_bytes(PROGRESS_FILE))
    except (MissingInputError, ValueError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a store error: no progress to show
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), int | float)
                                             for k in ("done", "total", "started", "updated")):
        return None
    return data


def rate_and_eta(progress: dict[str, Any]) -> tuple[float | None, float | None]:
    """``(items per second, seconds left)`` of a :func:`read_progress` record; None
    where it cannot be told yet (nothing done, no time passed). Raises nothing."""
    elapsed = progress["updated"] - progress["started"]
    if progress["done"] <= 0 or elapsed <= 0:
        return None, None
    rate = progress["done"] / elapsed
    return rate, max(0.0, (progress["total"] - progress["done"]) / rate)


def describe_progress(progress: dict[str, Any]) -> str:
    """``"120/400 items, 3.1/s, ETA 1m30s"`` for a :func:`read_progress` record."""
    rate, eta = rate_and_eta(progress)
    text = f"{progress['done']}/{progress['total']} items"
    if rate is not None:
        text += f", {rate:.1f}/s"
    if eta is not None:
        minutes, seconds = divmod(int(round(eta)), 60)
        text += f", ETA {minutes}m{seconds:02d}s" if minutes else f", ETA {seconds}s"
    return text
