"""Partitions: one step's items split across processes or pods, merged last.

A partitioned step (``partitions: N`` on generate or eval) answers its items in N
disjoint parts (extract builds the tasks of its modules so: its ``file_parts``). Which
part an item belongs to is a pure function of its id (:func:`member`): a rerun, a
resume and another N = 1 run agree on it, whatever the order of the input or the
machine. Each part is a stage run of its own, into
``<step>/partitions/part-0000I-of-0000N/`` (the name cannot clash with generate's
``cache/shard-*`` files), with its outputs and its own manifest; a part whose manifest
matches is never redone. The step's own outputs are written by a merge that reads every
part and writes the step's output and manifest last, byte-identical to an N = 1 run.

While a part runs it writes ``progress.json`` beside its outputs (:class:`Progress`):
done and total items and when it started, which the launcher and ``trackb status``
read (:func:`read_progress`) to show each part's rate and ETA.

Who runs what: a step's ``run(config, out)`` with ``partition`` set runs that one part
(what each pod of an Indexed Job does); with ``partitions`` > 1 and no ``partition``
(the local backend, ``trackb generate --partitions 4``) it runs every unfinished part as
a process of its own here (:func:`run_parts`, the same ``python -m jobs.<command>``
entry a pod runs), then the step's ``merge(config, out)``. The Kubernetes launcher
calls that ``merge`` itself once its Indexed Job is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import Field, model_validator

from trackb_core.config import StageConfig
from trackb_core.errors import (
    EXIT_FAILURE,
    EXIT_TEMPORARY,
    PERMANENT_EXIT_CODES,
    MissingInputError,
    TrackbError,
)
from trackb_core.stage import cached_manifest, say
from trackb_core.store import Store

PART_DIR = "partitions"
PROGRESS_FILE = "progress.json"
# How often a part rewrites progress.json, at most: each write is one PUT on S3.
PROGRESS_EVERY_SECONDS = 10.0


class PartitionOptions(StageConfig):
    """The options of a step that can run in parts (extract's tasks and hidden tests,
    generate, eval's generation)."""

    partitions: int = Field(
        1, ge=1, description="Answer the items in this many disjoint parts, each a process "
        "here or a pod of one Indexed Job on Kubernetes (for generate a teacher server, for "
        "eval a GPU, for extract CPUs for the sandbox, each), "
        "merged last into the same output as one part would write. An item's part is a "
        "hash of its id, so reruns and resumes agree; a finished part is never redone.")
    partition: int | None = Field(
        None, ge=0, description="Run only this part (0 .. partitions-1) into "
        "partitions/part-0000I-of-0000N/ of --out; set by the launcher for each process or "
        "pod. Unset: run every part not yet done, then merge.")

    # Fields that act only on the merged step (eval's scoring), with the value every
    # part's config holds: changing them never redoes a finished part.
    merge_only_fields: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _partition_in_range(self) -> PartitionOptions:
        if self.partition is not None and self.partition >= self.partitions:
            raise ValueError(f"partition {self.partition} is not one of "
                             f"0..{self.partitions - 1}")
        return self

    def part(self, index: int) -> Self:
        """The config part ``index`` runs with (and its manifest records): this one with
        ``partition`` set and the :attr:`merge_only_fields` at their part values. Raises
        ValueError for an index outside ``0 .. partitions - 1``."""
        part_name(index, self.partitions)  # the range check
        return self.model_copy(update={"partition": index, **self.merge_only_fields})


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
    unit: str = "items"  # what done and total count (eval counts answers)

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
                  "updated": time.time(), "unit": self.unit}
        try:
            self.out.put_text(PROGRESS_FILE, json.dumps(record, sort_keys=True) + "\n")
        except Exception:  # noqa: BLE001 - see the class docstring
            pass


def read_progress(out: Store) -> dict[str, Any] | None:
    """A part's ``progress.json`` (``{"done", "total", "started", "updated"}``, and
    ``"unit"``, what they count, when written by this version), or None
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
    """``(items (or answers) per second, seconds left)`` of a :func:`read_progress` record; None
    where it cannot be told yet (nothing done, no time passed). Raises nothing."""
    elapsed = progress["updated"] - progress["started"]
    if progress["done"] <= 0 or elapsed <= 0:
        return None, None
    rate = progress["done"] / elapsed
    return rate, max(0.0, (progress["total"] - progress["done"]) / rate)


def describe_progress(progress: dict[str, Any]) -> str:
    """``"120/400 items, 3.1/s, ETA 1m30s"`` for a :func:`read_progress` record."""
    rate, eta = rate_and_eta(progress)
    unit = progress.get("unit") if isinstance(progress.get("unit"), str) else "items"
    text = f"{progress['done']}/{progress['total']} {unit}"
    if rate is not None:
        text += f", {rate:.1f}/s"
    if eta is not None:
        minutes, seconds = divmod(int(round(eta)), 60)
        text += f", ETA {minutes}m{seconds:02d}s" if minutes else f", ETA {seconds}s"
    return text


# -- finished parts, and running the rest here -------------------------------------------


def unfinished_parts(config: PartitionOptions, out: Store,
                     inputs: dict[str, dict[str, Any]] | None = None) -> list[int]:
    """The indexes of the parts of the step at ``out`` whose manifest does not match
    their config (:meth:`PartitionOptions.part`, not just ``partition`` set: eval's
    parts never score) and ``inputs`` (the step's input hashes; hashed here when not
    given). Raises StoreError if a part's folder cannot be read; an input that is
    missing makes every part unfinished."""
    from trackb_core.errors import ConfigError
    from trackb_core.stage import hash_inputs

    count = config.partitions
    if inputs is None:
        try:
            inputs = hash_inputs(config)
        except (MissingInputError, ConfigError):
            return list(range(count))
    return [index for index in range(count)
            if cached_manifest(config.part(index), part_store(out, index, count),
                               inputs) is None]


def finished_parts(config: PartitionOptions, out: Store, inputs: dict[str, dict[str, Any]]
                   ) -> list[tuple[Store, dict[str, Any]]]:
    """``(part store, manifest)`` of every part, in part order, for a merge.

    Raises MissingInputError naming the parts without a matching manifest (not run yet,
    failed, or run with another config or other inputs).
    """
    count = config.partitions
    found, missing = [], []
    for index in range(count):
        store = part_store(out, index, count)
        manifest = cached_manifest(config.part(index), store, inputs)
        if manifest is None:
            missing.append(part_name(index, count))
        found.append((store, manifest))
    if missing:
        raise MissingInputError(
            f"{len(missing)} of {count} partitions of {out.uri} are not finished (no "
            f"manifest matching this config and these inputs): {', '.join(missing)}; run "
            "them first (partition=I), or run the step without `partition` to run the "
            "missing ones here")
    return found


class PartitionsFailed(TrackbError):
    """Some parts of a partitioned step failed; the finished ones are kept.

    Its exit code is the failed parts' code when they share one, else a permanent code
    if any part had one (a retry cannot fix that part), else 75 (retryable) if any part
    had 75, else 1.
    """

    def __init__(self, message: str, codes: Iterable[int]):
        super().__init__(message)
        codes = list(codes)
        if len(set(codes)) == 1 and codes[0] > 0:
            self.exit_code = codes[0]
        elif permanent := [c for c in codes if c in PERMANENT_EXIT_CODES]:
            self.exit_code = permanent[0]
        elif EXIT_TEMPORARY in codes:
            self.exit_code = EXIT_TEMPORARY
        else:
            self.exit_code = EXIT_FAILURE


def default_parallel(count: int) -> int:
    """How many parts run at once here: ``$TRACKB_PARTITION_PARALLEL`` if set, else
    one per CPU core, at most ``count``. Raises ConfigError for a malformed value."""
    from trackb_core.errors import ConfigError

    value = os.environ.get("TRACKB_PARTITION_PARALLEL", "").strip()
    if value:
        try:
            wanted = int(value)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ConfigError(f"TRACKB_PARTITION_PARALLEL must be a positive integer, "
                              f"not {value!r}")
        return min(wanted, count)
    return max(1, min(count, os.cpu_count() or 1))


def run_parts(command: str, config: PartitionOptions, out: Store, *,
              parallel: int | None = None) -> dict[str, Any]:
    """Run every unfinished part of the step at ``out`` as a process of its own on this
    machine, at most ``parallel`` at once (default :func:`default_parallel`): each is
    ``python -m jobs.<command> --config PART.yaml --out OUT`` (what a pod of the Indexed
    Job runs), its log in a temp file whose tail is said if it fails. Finished parts
    (a matching manifest) are not run again. Says each running part's progress every
    :data:`PROGRESS_EVERY_SECONDS`. Returns ``{"ran": [names], "reused": [names]}``.

    Raises PartitionsFailed naming every part that failed (after the others finished:
    their results are kept for the rerun), ConfigError, MissingInputError or StoreError
    for the step's inputs and output. Ctrl-C or SIGTERM stops the running parts first.
    """
    import yaml

    from trackb_core.stage import MANIFEST, hash_inputs
    from trackb_core.stages import command as find_command

    count = config.partitions
    out.check_writable()
    out.delete(MANIFEST)  # the step is not done until its merge
    inputs = hash_inputs(config)
    todo = unfinished_parts(config, out, inputs)
    reused = [part_name(i, count) for i in range(count) if i not in todo]
    if reused:
        say(command, f"{len(reused)} of {count} partitions already done; not run again")
    if not todo:
        return {"ran": [], "reused": reused}
    parallel = max(1, min(parallel or default_parallel(count), len(todo)))
    module = find_command(command).job_module
    env = dict(os.environ)
    # Parts share this machine's cores: each gets its share of the math threads.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    say(command, f"running {len(todo)} of {count} partitions here, {parallel} at once")
    queue = list(todo)
    running: dict[int, tuple[subprocess.Popen, Path]] = {}
    failed: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix=f"trackb-{command}-parts-") as tmp:
        shown = time.monotonic()
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    index = queue.pop(0)
                    name = part_name(index, count)
                    config_file = Path(tmp) / f"{name}.yaml"
                    config_file.write_text(yaml.safe_dump(
                        config.part(index).model_dump(mode="json"), sort_keys=False))
                    log = Path(tmp) / f"{name}.log"
                    with open(log, "wb") as sink:
                        process = subprocess.Popen(
                            [sys.executable, "-m", module, "--config", str(config_file),
                             "--out", out.uri],
                            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                            env=env)
                    running[index] = (process, log)
                for index, (process, log) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    del running[index]
                    name = part_name(index, count)
                    if code == 0:
                        say(command, f"{name} done")
                        continue
                    failed[index] = code
                    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()
                    say(command, f"{name} failed (exit {code}); the end of its log:\n  "
                                 + "\n  ".join(tail[-15:]))
                if running and time.monotonic() - shown >= PROGRESS_EVERY_SECONDS:
                    shown = time.monotonic()
                    for index in sorted(running):
                        progress = read_progress(part_store(out, index, count))
                        say(command, f"{part_name(index, count)}: "
                                     + (describe_progress(progress) if progress
                                        else "starting"))
                time.sleep(0.1)
        finally:
            for process, _ in running.values():  # interrupted: stop what still runs
                process.terminate()
            for process, _ in running.values():
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    if failed:
        names = ", ".join(f"{part_name(i, count)} (exit {code})"
                          for i, code in sorted(failed.items()))
        raise PartitionsFailed(
            f"{len(failed)} of {count} partitions of {out.uri} failed: {names}; the "
            f"{count - len(failed)} finished ones are kept, so a rerun runs only these",
            [failed[i] for i in sorted(failed)])
    return {"ran": [part_name(i, count) for i in todo], "reused": reused}


# -- merging ----------------------------------------------------------------------------


def merge_jsonl_by_id(blobs: Iterable[bytes]) -> bytes:
    """The lines of several JSONL documents (one row per id, each ``{"id", ...}``),
    sorted by ``str(id)``, byte for byte as they were written: what one run writing
    every row sorted by id writes. Raises ValueError if an id appears twice or a line
    is not a JSON object with an id."""
    keyed: dict[str, bytes] = {}
    for blob in blobs:
        for line in blob.split(b"\n"):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("a line without an id")
            key = str(row["id"])
            if key in keyed:
                raise ValueError(f"id {key!r} is in two partitions")
            keyed[key] = line
    return b"".join(keyed[key] + b"\n" for key in sorted(keyed))


def sum_counts(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The counts of several parts as one step's: numbers summed, dicts merged key by
    key (recursively, keys sorted), anything else kept when every part agrees, else the
    list of the parts' values. Raises nothing."""
    counts = list(counts)
    keys = sorted({key for c in counts for key in c})
    merged: dict[str, Any] = {}
    for key in keys:
        values = [c[key] for c in counts if key in c]
        if all(isinstance(v, bool) for v in values):
            merged[key] = values[0] if len(set(values)) == 1 else values
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            total = sum(values)
            merged[key] = round(total, 6) if isinstance(total, float) else total
        elif all(isinstance(v, dict) for v in values):
            merged[key] = sum_counts(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = values
    return merged


def part_summary(parts: list[tuple[Store, dict[str, Any]]]) -> dict[str, Any]:
    """The ``partitions`` record of a merged manifest: the count and each part's
    folder, counts and timings. Raises nothing."""
    return {"count": len(parts),
            "parts": [{"folder": store.uri.rstrip("/").rpartition("/")[2],
                       "counts": manifest.get("counts", {}),
                       "timings": manifest.get("timings", {})}
                      for store, manifest in parts]}
