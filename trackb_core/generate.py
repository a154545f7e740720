"""The generate stage: a teacher writes the gold response for every task.

Reads ``tasks.jsonl`` (from extract), asks the chosen teacher, and writes
``responses.jsonl``: every answered task row plus the response and where it came from,
sorted by id. Tasks the teacher skips (no reference answer) or whose answer is rejected
(truncated at the token cap, empty, refused) are counted by reason in the manifest,
never dropped silently.

The openai teacher's answers are expensive, so each one is appended to a cache shard
under ``cache/`` in the output folder the moment it arrives. A killed run, started again
on the same output, reads the shards back and asks only for what is missing;
``responses.jsonl`` is then byte-identical to an uninterrupted run's (nothing in it
depends on timing, attempts or arrival order). The reference teacher is free and
deterministic and runs without the cache.

With ``partitions: N`` the tasks are answered in N parts (:mod:`trackb_core.partition`),
each into ``partitions/part-0000I-of-0000N/`` with its own ``responses.jsonl``, cache
shards and manifest; :func:`merge` then writes the step's ``responses.jsonl``,
byte-identical to one part's. Each part may talk to its own server (``base_urls``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from trackb_core.config import input_field
from trackb_core.errors import InputError, StoreError
from trackb_core.openai_teacher import OpenAITeacher
from trackb_core.partition import (
    PartitionOptions,
    Progress,
    finished_parts,
    member,
    merge_jsonl_by_id,
    part_store,
    part_summary,
    run_parts,
    sum_counts,
)
from trackb_core.stage import say, stage_run
from trackb_core.store import LocalStore, Store
from trackb_core.teacher import (
    OK,
    TEACHER_KINDS,
    ReferenceTeacher,
    Teacher,
    TeacherKind,
    TeacherResult,
)

STAGE = "generate"
REQUIRED_TASK_FIELDS = ("id", "category", "instruction")
CACHE_DIR = "cache"
# A shard is closed (fsync'd, or uploaded to a remote store) after this many results or
# seconds, so a kill -9 loses at most that much on S3 and nothing locally.
CACHE_ROLL_RESULTS = 256
CACHE_ROLL_SECONDS = 60.0
_SHARD_NAME = re.compile(r"^shard-(\d+)\.jsonl$")


class GenerateConfig(PartitionOptions):
    """Ask a teacher for a gold response to every task.

    Reads tasks.jsonl (the extract stage's output folder or the file itself). Writes
    responses.jsonl: each answered task row plus response, teacher, teacher_model,
    finish_reason and usage (and candidates when n > 1), sorted by id. The reference
    teacher derives answers from the source itself (no network); the openai teacher
    calls an OpenAI-compatible server such as vLLM, keeps every answer in cache/ shards
    as it arrives, and on a rerun into the same --out asks only for the missing ones.
    """

    tasks: str = input_field("", kind="file", filename="tasks.jsonl",
                             description="Tasks to answer: tasks.jsonl or the folder holding it")
    teacher: Literal["reference", "openai"] = Field(
        "reference", description="Who answers: 'reference' (gold from the source, offline) "
        "or 'openai' (an OpenAI-compatible server at --base-url)")
    base_url: str = Field("http://localhost:8000/v1",
                          description="Base URL of the OpenAI-compatible server (openai teacher)")
    base_urls: list[str] = Field(
        [], description="One base URL per partition: part I asks base_urls[I % count] "
        "(several servers on one machine); empty: every part asks --base-url (on "
        "Kubernetes each pod has its own server there)")
    model: str | None = Field(None, description="Model name on the server; empty means the "
                              "first model the server lists at /v1/models")
    # 64 saturates one vLLM replica of the default teacher on a T4 (16 GB): AWQ weights
    # ~5.4 GiB of the 0.9 x 15 GiB vLLM may use leave ~6.5 GiB of KV cache after
    # activations and CUDA graphs; Qwen2.5-7B keeps 28 layers x 4 KV heads x 128 dims x
    # 2 (K, V) x 2 bytes = 56 KiB per token, so ~120k tokens, ~110 requests of a typical
    # ~1.1k tokens (prompt ~500 + answer ~600). 64 keeps the batch full (vLLM's
    # max_num_seqs is 256, above it) with headroom for answers that grow toward
    # max_tokens and retries at twice the budget, so vLLM rarely preempts, and each
    # answer's wait stays within --timeout; more would only queue in the server.
    concurrency: int = Field(64, ge=1, description="Requests in flight at once per "
                             "partition (openai teacher); 64 keeps one vLLM replica of a "
                             "7B AWQ teacher on a T4 busy (KV cache for ~110 typical "
                             "requests), more only queue in the server")
    max_tokens: int = Field(2048, ge=1, description="Tokens asked for per answer at first; a "
                            "truncated answer is asked again with twice as many")
    max_tokens_cap: int = Field(8192, ge=1, description="Most tokens per answer (at least "
                                "max_tokens); an answer still truncated there is rejected")
    temperature: float = Field(0.2, ge=0.0, description="Sampling temperature of the teacher")
    n: int = Field(1, ge=1, description="Candidates per task; rows keep them all in "
                   "'candidates' and the first as 'response' (openai teacher)")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for one answer")
    max_retries: int = Field(5, ge=0, description="Retries per request on 429, 5xx, timeouts "
                             "and connection errors (exponential backoff with jitter, "
                             "honouring Retry-After)")
    ready_timeout: float = Field(600.0, ge=0, description="Seconds to wait at start for the "
                                 "server to list a model at /v1/models (vLLM loads for "
                                 "minutes); then exit 75")
    cache: bool = Field(True, description="Keep each answer in cache/ shards under --out as "
                        "it arrives, and reuse matching ones (openai teacher)")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable "
                             "holding the server's API key (the key itself is never stored)")

    @property
    def teacher_url(self) -> str:
        """The base URL this run's teacher asks: its partition's entry of ``base_urls``
        (part 0 for an unpartitioned run), else ``base_url``."""
        if not self.base_urls:
            return self.base_url
        return self.base_urls[(self.partition or 0) % len(self.base_urls)]

    @property
    def kind(self) -> TeacherKind:
        """What the chosen teacher is, for code that has no teacher object (a cluster run
        needs a server when ``kind.needs_server``)."""
        return TEACHER_KINDS[self.teacher]


def make_teacher(config: GenerateConfig) -> Teacher:
    """The teacher ``config`` names. Raises ConfigError on a malformed base URL."""
    if config.teacher == "reference":
        return ReferenceTeacher()
    return OpenAITeacher(
        config.teacher_url, model=config.model or None,
        api_key=os.environ.get(config.api_key_env) or None,
        concurrency=config.concurrency, max_tokens=config.max_tokens,
        max_tokens_cap=config.max_tokens_cap, temperature=config.temperature, n=config.n,
        timeout=config.timeout, max_retries=config.max_retries,
        ready_timeout=config.ready_timeout, key_hint=f"the API key in ${config.api_key_env}",
    )


def check_tasks(rows: list[dict[str, Any]], where: str) -> None:
    """Raises InputError if ``rows`` is empty, lacks a required field or repeats an id."""
    if not rows:
        raise InputError(f"{where} holds no tasks")
    seen: set[str] = set()
    for number, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED_TASK_FIELDS if not row.get(k)]
        if missing:
            raise InputError(f"{where}: task {number} lacks {', '.join(missing)}")
        if str(row["id"]) in seen:
            raise InputError(f"{where}: task id {row['id']!r} appears twice")
        seen.add(str(row["id"]))


# -- the response cache ------------------------------------------------------------------


def cache_key(task: dict[str, Any], identity: dict[str, Any]) -> str:
    """The key an answer to ``task`` is cached under.

    Covers the task id, the instruction's sha256 and the teacher's ``identity`` (model,
    sampling settings, prompt template version and hash): change any and the old answer
    is not reused.
    """
    payload = {"id": str(task["id"]),
               "instruction_sha256": hashlib.sha256(
                   str(task["instruction"]).encode("utf-8")).hexdigest(),
               "teacher": identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def outcome(result: TeacherResult) -> dict[str, Any]:
    """What is kept of a teacher result: a cache entry and the makings of a row."""
    entry = {"id": result.id, "status": result.status, "reason": result.reason,
             "response": result.response, "finish_reason": result.finish_reason,
             "usage": dict(sorted(result.usage.items())), "model": result.model}
    if result.candidates:
        entry["candidates"] = list(result.candidates)
    return entry


class ResponseCache:
    """Answers as JSONL shards under ``cache/`` of the output store.

    Each entry is one line, written and flushed as its answer arrives. The open shard is
    a local file: inside the output folder for a local store, in a temp folder for a
    remote one. A shard is closed after ``roll_results`` entries or ``roll_seconds``
    (checked as entries arrive) and at :meth:`close`: locally fsync'd, remotely uploaded
    as a new immutable object. Shards are never appended to once closed, so the torn
    last line a kill -9 may leave is only ever at a shard's end, and is skipped.
    """

    def __init__(self, out: Store, *, roll_results: int | None = None,
                 roll_seconds: float | None = None):
        self.out = out
        self.roll_results = roll_results or CACHE_ROLL_RESULTS
        self.roll_seconds = roll_seconds if roll_seconds is not None else CACHE_ROLL_SECONDS
        self.local = isinstance(out, LocalStore)
        self.stats: Counter[str] = Counter()
        self._next = 1 + max((int(m.group(1)) for key in self._shard_keys()
                              if (m := _SHARD_NAME.match(key.rpartition("/")[2]))), default=0)
        self._tmp = None if self.local else Path(tempfile.mkdtemp(prefix="trackb-cache-"))
        self._file = None
        self._path: Path | None = None
        self._key = ""
        self._lines = 0
        self._opened = 0.0

    def _shard_keys(self) -> list[str]:
        return [key for key in self.out.list(CACHE_DIR) if key.endswith(".jsonl")]

    def load(self, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Entries whose key matches ``wanted[id]``; torn, corrupt and stale lines are skipped.

        Raises StoreError if a shard cannot be read.
        """
        found: dict[str, dict[str, Any]] = {}
        for key in self._shard_keys():
            self.stats["shards_read"] += 1
            text = self.out.get_bytes(key).decode("utf-8", "replace")
            lines = text.split("\n")
            if lines[-1]:  # no newline after the last line: the write was cut short
                self.stats["torn_lines"] += 1
            for line in lines[:-1]:
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    self.stats["corrupt_lines"] += 1
                    continue
                if not isinstance(entry, dict) or wanted.get(str(entry.get("id"))) is None:
                    self.stats["stale_entries"] += 1
                elif entry.get("key") != wanted[str(entry["id"])]:
                    self.stats["stale_entries"] += 1
                else:
                    found[str(entry["id"])] = entry
        return found

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry now (flushed to the OS, so a killed process keeps it).

        Raises StoreError if the shard cannot be written.
        """
        try:
            if self._file is None:
                self._open()
            self._file.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
            self._file.flush()
        except OSError as exc:
            raise StoreError(f"cannot write the cache shard {self._path}: "
                             f"{exc.strerror or exc}") from exc
        self._lines += 1
        if (self._lines >= self.roll_results
                or time.monotonic() - self._opened >= self.roll_seconds):
            self._roll()

    def _open(self) -> None:
        self._key = f"{CACHE_DIR}/shard-{self._next:06d}.jsonl"
        self._next += 1
        if self.local:
            self._path = self.out.local_path(self._key)
            self._path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._path = self._tmp / self._key.rpartition("/")[2]
        self._file = open(self._path, "x", encoding="utf-8")
        self._lines, self._opened = 0, time.monotonic()

    def _roll(self) -> None:
        """Close the open shard: fsync it, or upload it (remote), and start afresh."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if not self.local:
            self.out.put_file(self._key, self._path)
            self._path.unlink()
        self.stats["shards_written"] += 1

    def close(self) -> None:
        """Close the open shard (see :meth:`_roll`). Raises StoreError if the upload fails."""
        try:
            self._roll()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)


def response_row(task: dict[str, Any], entry: dict[str, Any], teacher: str) -> dict[str, Any]:
    """The responses.jsonl row for an accepted answer (the task row plus the answer)."""
    row = {**task, "response": entry["response"], "teacher": teacher,
           "teacher_model": entry["model"], "finish_reason": entry["finish_reason"],
           "usage": dict(sorted(entry["usage"].items()))}
    if entry.get("candidates"):
        row["candidates"] = list(entry["candidates"])
    return row


def run(config: GenerateConfig, out: Store) -> dict:
    """Run the generate stage into ``out``; returns the manifest.

    With ``partition`` set: only that part's tasks, into its part folder of ``out``.
    With ``partitions`` > 1 and no ``partition``: every unfinished part as a process here
    (:func:`trackb_core.partition.run_parts`), then :func:`merge`.

    Raises MissingInputError (no tasks file), InputError (malformed tasks),
    UnavailableError (teacher server not ready in time or gone), ConfigError
    (credentials, model), StoreError (cache shards unreadable or unwritable),
    PartitionsFailed (naming the parts that failed; the others are kept).
    """
    if config.partition is not None:
        part = config.part(config.partition)
        return _generate(part, part_store(out, config.partition, config.partitions))
    if config.partitions > 1:
        # Answering is network-bound: every part runs at once unless told otherwise.
        run_parts(STAGE, config, out, parallel=None if config.teacher == "reference"
                  else config.partitions)
        return merge(config, out)
    return _generate(config, out)


def _generate(config: GenerateConfig, out: Store) -> dict:
    """One stage run: every task, or the tasks of ``config.partition``; see :func:`run`."""
    from tqdm import tqdm

    with stage_run(STAGE, config, out) as run:
        tasks = run.read_jsonl("tasks")
        check_tasks(tasks, run.input_uri("tasks"))
        progress = None
        if config.partition is not None:
            tasks = [t for t in tasks
                     if member(str(t["id"]), config.partitions) == config.partition]
            progress = Progress(out, len(tasks))
        by_id = {str(t["id"]): t for t in tasks}
        teacher = make_teacher(config)
        model = teacher.connect(lambda message: say(STAGE, message))
        say(STAGE, f"teacher {teacher.name}: model {model}")
        sampling = teacher.sampling()
        run.extra["teacher"] = {"name": teacher.name, **teacher.describe(),
                                **({"sampling": sampling} if sampling else {}),
                                "model": teacher.model,
                                "derives_from_source": config.kind.derives_from_source}
        identity = teacher.identity()
        cache: ResponseCache | None = None
        outcomes: dict[str, dict[str, Any]] = {}
        if config.cache and identity is not None:
            keys = {task_id: cache_key(task, identity) for task_id, task in by_id.items()}
            cache = ResponseCache(out)
            outcomes = cache.load(keys)
        pending = [task for task in tasks if str(task["id"]) not in outcomes]
        say(STAGE, f"{len(tasks)} tasks, teacher {teacher.name}: {len(outcomes)} from the "
                   f"cache, {len(pending)} to ask")
        if progress is not None:
            progress.advance(len(outcomes))

        failures: Counter[str] = Counter()
        try:
            with run.timed("generate"), tqdm(total=len(tasks), initial=len(outcomes),
                                             desc=STAGE, unit="task", file=sys.stderr,
                                             dynamic_ncols=True) as bar:
                for result in teacher.answer_all(pending):
                    entry = outcome(result)
                    outcomes[result.id] = entry
                    # A rejection another run would repeat (truncated at the cap, a 400) is
                    # cached too; one that ran out of retries (timeouts, 429, 5xx) is not.
                    if cache is not None and not result.transient:
                        cache.append({"key": keys[result.id], **entry})
                    if result.status != OK:
                        failures[str(result.reason)] += 1
                        bar.set_postfix(failed=sum(failures.values()), refresh=False)
                    bar.update(1)
                    if progress is not None:
                        progress.advance()
        finally:
            if cache is not None:
                cache.close()

        # Teachers answer in arrival order; the file must not depend on it.
        kept = [response_row(by_id[task_id], outcomes[task_id], teacher.name)
                for task_id in sorted(outcomes) if outcomes[task_id]["status"] == OK]
        run.write_jsonl("responses.jsonl", kept)
        skipped = Counter(e["reason"] for e in outcomes.values() if e["status"] == "skipped")
        rejected = Counter(e["reason"] for e in outcomes.values() if e["status"] == "rejected")
        run.counts.update({
            "tasks": len(tasks),
            "responses": len(kept),
            "responses_by_category": dict(sorted(Counter(r["category"] for r in kept).items())),
            "skipped": dict(sorted(skipped.items())),
            "rejected": dict(sorted(rejected.items())),
            "usage": _sum_usage(row["usage"] for row in kept),
        })
        run.counts.update(teacher.run_counts())
        if identity is not None:  # a teacher whose answers cost something
            run.counts.update({"requested": len(pending), "cached": len(tasks) - len(pending)})
        if cache is not None:
            run.counts["cache"] = dict(sorted(cache.stats.items()))
        say(STAGE, f"{len(kept)} responses; skipped {dict(skipped) or 0}; "
                   f"rejected {dict(rejected) or 0}")
        if not kept:
            say(STAGE, "warning: no task got a usable response")
        if progress is not None:
            progress.finish()
    return run.manifest


def merge(config: GenerateConfig, out: Store) -> dict:
    """Write the step's ``responses.jsonl`` and manifest into ``out`` from its finished
    parts; returns the manifest. The file is the parts' rows sorted by id, byte-identical
    to an unpartitioned run's; counts are summed (tokens and retries too), timings are
    the longest part's (``generate``: the parts ran side by side) and their sum
    (``generate_sum``); the manifest's ``partitions`` lists each part's counts.

    Raises MissingInputError naming the parts that are not finished, InputError if the
    parts were answered by different teacher models or overlap, StoreError if a part
    cannot be read or ``out`` written.
    """
    with stage_run(STAGE, config, out) as run:
        parts = finished_parts(config, out, run.inputs)
        teachers = [dict(manifest.get("teacher") or {}) for _, manifest in parts]
        models = sorted({str(t.get("model")) for t in teachers})
        if len(models) > 1:
            raise InputError(f"the partitions of {out.uri} were answered by different "
                             f"teacher models ({', '.join(models)}); rerun them against "
                             "one model")
        urls = [t.pop("base_url", None) for t in teachers]
        run.extra["teacher"] = {**teachers[0], **({"base_url": urls[0]} if len(set(urls)) == 1
                                                  else {"base_urls": urls})}
        try:
            data = merge_jsonl_by_id(store.get_bytes("responses.jsonl") for store, _ in parts)
        except ValueError as exc:
            raise InputError(f"the partitions of {out.uri} do not merge: {exc}") from exc
        run.write_bytes("responses.jsonl", data)
        run.counts.update(sum_counts(manifest.get("counts", {}) for _, manifest in parts))
        seconds = [float(m.get("timings", {}).get("generate", 0.0)) for _, m in parts]
        run.timings.update({"generate": max(seconds), "generate_sum": round(sum(seconds), 3)})
        run.extra["partitions"] = part_summary(parts)
        say(STAGE, f"merged {len(parts)} partitions: {run.counts.get('responses', 0)} "
                   f"responses of {run.counts.get('tasks', 0)} tasks")
    return run.manifest


def _sum_usage(usages) -> dict[str, int]:
    total: Counter[str] = Counter()
    for usage in usages:
        total.update(usage)
    return dict(sorted(total.items()))
