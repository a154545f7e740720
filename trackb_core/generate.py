"""The generate stage: a teacher writes the gold response for every task.

Reads ``tasks.jsonl`` (from extract), asks the chosen teacher, and writes
``responses.jsonl``: every answered task row plus the response and where it came from.
Tasks the teacher skips (no reference answer) or whose answer is rejected (truncated,
empty, refused) are counted by reason in the manifest, never dropped silently.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any, Literal

from pydantic import Field

from trackb_core.config import StageConfig, input_field
from trackb_core.errors import InputError
from trackb_core.openai_teacher import OpenAITeacher
from trackb_core.stage import say, stage_run
from trackb_core.store import Store
from trackb_core.teacher import ReferenceTeacher, Teacher

STAGE = "generate"
REQUIRED_TASK_FIELDS = ("id", "category", "instruction")


class GenerateConfig(StageConfig):
    """Ask a teacher for a gold response to every task.

    Reads tasks.jsonl (the extract stage's output folder or the file itself). Writes
    responses.jsonl: each answered task row plus response, teacher, teacher_model,
    finish_reason and usage, sorted by id. The reference teacher derives answers from
    the source itself (no network); the openai teacher calls an OpenAI-compatible
    server such as vLLM.
    """

    tasks: str = input_field("", kind="file", filename="tasks.jsonl",
                             description="Tasks to answer: tasks.jsonl or the folder holding it")
    teacher: Literal["reference", "openai"] = Field(
        "reference", description="Who answers: 'reference' (gold from the source, offline) "
        "or 'openai' (an OpenAI-compatible server at --base-url)")
    base_url: str = Field("http://localhost:8000/v1",
                          description="Base URL of the OpenAI-compatible server (openai teacher)")
    model: str | None = Field(None, description="Model name on the server; empty means the "
                              "first model the server lists at /v1/models")
    concurrency: int = Field(32, ge=1, description="Requests in flight at once (openai teacher)")
    max_tokens: int = Field(2048, ge=1, description="Most tokens per answer; longer answers "
                            "are rejected as truncated")
    temperature: float = Field(0.2, ge=0.0, description="Sampling temperature of the teacher")
    timeout: float = Field(120.0, gt=0, description="Seconds to wait for one answer")
    max_retries: int = Field(5, ge=0, description="Retries per request on 429, 5xx, timeouts "
                             "and connection errors (exponential backoff with jitter)")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable "
                             "holding the server's API key (the key itself is never stored)")


def make_teacher(config: GenerateConfig) -> Teacher:
    """The teacher ``config`` names. Raises ConfigError on a malformed base URL."""
    if config.teacher == "reference":
        return ReferenceTeacher()
    return OpenAITeacher(
        config.base_url, model=config.model or None,
        api_key=os.environ.get(config.api_key_env) or None,
        concurrency=config.concurrency, max_tokens=config.max_tokens,
        temperature=config.temperature, timeout=config.timeout,
        max_retries=config.max_retries, key_hint=f"the API key in ${config.api_key_env}",
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


def run(config: GenerateConfig, out: Store) -> dict:
    """Run the generate stage into ``out``; returns the manifest.

    Raises MissingInputError (no tasks file), InputError (malformed tasks),
    UnavailableError (teacher server unreachable), ConfigError (credentials, model).
    """
    from tqdm import tqdm

    with stage_run(STAGE, config, out) as run:
        tasks = run.read_jsonl("tasks")
        check_tasks(tasks, run.input_uri("tasks"))
        by_id = {str(t["id"]): t for t in tasks}
        teacher = make_teacher(config)
        if isinstance(teacher, OpenAITeacher):
            say(STAGE, f"teacher server {teacher.base_url}: model {teacher.connect()}")
        say(STAGE, f"{len(tasks)} tasks, teacher {teacher.name}")

        kept: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        usage: Counter[str] = Counter()
        with run.timed("generate"), tqdm(total=len(tasks), desc=STAGE, unit="task",
                                         file=sys.stderr, dynamic_ncols=True) as bar:
            for result in teacher.answer_all(tasks):
                usage.update(result.usage)
                if result.ok:
                    kept.append({**by_id[result.id], "response": result.response,
                                 "teacher": teacher.name, "teacher_model": result.model,
                                 "finish_reason": result.finish_reason,
                                 "usage": dict(sorted(result.usage.items()))})
                else:
                    (skipped if result.status == "skipped" else rejected)[str(result.reason)] += 1
                    bar.set_postfix(failures=sum(rejected.values()), refresh=False)
                bar.update(1)

        # Teachers answer in arrival order; the file must not depend on it.
        kept.sort(key=lambda row: str(row["id"]))
        run.write_jsonl("responses.jsonl", kept)
        run.counts.update({
            "tasks": len(tasks),
            "responses": len(kept),
            "responses_by_category": dict(sorted(Counter(r["category"] for r in kept).items())),
            "skipped": dict(sorted(skipped.items())),
            "rejected": dict(sorted(rejected.items())),
            "usage": dict(sorted(usage.items())),
        })
        run.extra["teacher"] = {"name": teacher.name, "model": teacher.model}
        if isinstance(teacher, OpenAITeacher):
            run.extra["teacher"]["base_url"] = teacher.base_url
            run.counts["retries"] = dict(sorted(teacher.retries.items()))
        say(STAGE, f"{len(kept)} responses; skipped {dict(skipped) or 0}; "
                   f"rejected {dict(rejected) or 0}")
        if not kept:
            say(STAGE, "warning: no task got a usable response")
    return run.manifest
