"""The OpenAI-compatible teacher: an async client for vLLM (or any ``/v1/chat/completions``).

What the model is asked: the system turn carries the teacher's format guidance (a
versioned template, :data:`TEACHER_PROMPT_VERSION`, hashed into the manifest and the
response cache); the user turn is the task's stored ``instruction``, unchanged, which is
exactly what training and evaluation show the student.

How it asks (the seed ran one ``curl`` per request, 2 in flight, and kept truncated
answers):

* asyncio + aiohttp, at most ``concurrency`` requests in flight over one connection pool;
* waits for the server to list a model at ``/v1/models`` (vLLM loads for minutes) within
  ``ready_timeout``, then picks the model from that list;
* retries 429, 5xx, timeouts and dropped connections with exponential backoff and
  jitter, honouring ``Retry-After``, at most ``max_retries`` times per request;
* never keeps a truncated answer (``finish_reason == "length"``): it asks again with
  twice the tokens, up to ``max_tokens_cap``, then rejects the task as truncated;
* records token usage per answer and in total; ``n > 1`` asks for several candidates.

:meth:`OpenAITeacher.answer_all` is a plain iterator (the event loop runs in a
background thread), so the generate stage consumes this teacher and the reference
teacher through the same loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

from trackb_core import families
from trackb_core.errors import ConfigError, UnavailableError
from trackb_core.pyast import short
from trackb_core.teacher import OK, REJECTED, TeacherResult

# -- the teacher's prompt templates (versioned: a change here must bump the version) ----

TEACHER_PROMPT_VERSION = "v2"

TEACHER_SYSTEM_PROMPT = (
    "You are an expert Python engineer writing gold answers for a code instruction "
    "dataset. Answer exactly the task given, concisely and correctly. Put code in one "
    "```python fenced block. Never write placeholders such as TODO or <insert ...>."
)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# The most bytes kept of one reply: a completion of max_tokens_cap tokens is a few
# hundred kilobytes at most; a server (or a proxy) sending more is not answering.
MAX_REPLY_BYTES = 8 << 20
# A server asking for a longer pause than this is treated as asking for this long.
RETRY_AFTER_CEILING = 300.0
# Fatal errors stop the remaining requests; the loop thread gets this long to wind down.
SHUTDOWN_SECONDS = 10.0


def teacher_messages(task: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages a teacher model gets for ``task``: its family's guidance
    (:attr:`trackb_core.families.Family.guidance`) + the instruction as is."""
    try:
        guidance = families.get(str(task.get("category"))).guidance
    except ValueError:
        guidance = ""
    system = f"{TEACHER_SYSTEM_PROMPT} {guidance}".strip()
    return [{"role": "system", "content": system},
            {"role": "user", "content": str(task["instruction"])}]


def teacher_prompt_sha256() -> str:
    """sha256 over every teacher template (the system prompt and each registered family's
    guidance): recorded in the manifest and the cache key."""
    guidance = {family.name: family.guidance for family in families.all_families()}
    templates = {"system": TEACHER_SYSTEM_PROMPT, "guidance": guidance}
    return hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest()


# -- retry timing --------------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Exponential (``base * 2**(attempt-1)``, at most ``cap``) with "equal jitter": a
    uniform draw from the upper half, so many clients that failed together do not retry
    in lockstep, yet none retries much sooner than the schedule says.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return rng.uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date.

    None when absent or unparsable; never negative; at most RETRY_AFTER_CEILING.
    """
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if moment.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(RETRY_AFTER_CEILING, max(0.0, seconds))


# -- results and failures -------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIResult(TeacherResult):
    """A :class:`TeacherResult` that also counts its truncation retries.

    ``usage`` is the usage of the replies the kept candidates came from;
    ``truncated_retries`` counts the times the task was asked again with more tokens.
    """

    truncated_retries: int = 0


class _Transient(Exception):
    """A failure worth retrying; ``kind`` names it, ``wait`` is the server's Retry-After."""

    def __init__(self, kind: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.kind, self.wait = kind, wait


class _Rejected(Exception):
    """A failure retrying cannot fix, for this task only."""

    def __init__(self, reason: str, detail: str, *, transient: bool = False):
        super().__init__(detail)
        self.reason, self.transient = reason, transient


class OpenAITeacher:
    """An async client for any OpenAI-compatible ``/v1/chat/completions`` server.

    Raises (from :meth:`connect` and :meth:`answer_all`) UnavailableError when the
    server is not ready within ``ready_timeout`` or stops answering altogether,
    ConfigError when it refuses the credentials (naming ``key_hint``), does not serve
    ``model`` (listing what it serves) or has no such endpoint. Per-task failures
    that retrying cannot fix come back as rejected results with a reason.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 32, max_tokens: int = 2048, max_tokens_cap: int = 8192,
                 temperature: float = 0.2, n: int = 1, timeout: float = 120.0,
                 max_retries: int = 5, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 ready_timeout: float = 600.0, key_hint: str = "the API key",
                 rng: random.Random | None = None):
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"teacher base URL {base_url!r} must look like http://host:port/v1")
        # The OpenAI convention is a base URL ending in /v1; accept a bare host too.
        self.base_url = base_url.rstrip("/") + ("/v1" if parsed.path in ("", "/") else "")
        self.model = model or ""
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))
        self.max_tokens = max(1, int(max_tokens))
        self.max_tokens_cap = max(self.max_tokens, int(max_tokens_cap))
        self.temperature = float(temperature)
        self.n = max(1, int(n))
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = float(backoff_base)
        self.backoff_cap = float(backoff_cap)
        self.ready_timeout = max(0.0, float(ready_timeout))
        self.key_hint = key_hint
        self.rng = rng or random.Random()
        # What this run cost and survived, for the manifest (the loop is one thread).
        self.retries: Counter[str] = Counter()
        self.truncated_retried = 0
        self.usage_spent: Counter[str] = Counter()
        self._connected = False

    # -- identity -----------------------------------------------------------------------
    def sampling(self) -> dict[str, Any]:
        """The request settings an answer depends on (part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens,
                "max_tokens_cap": self.max_tokens_cap, "n": self.n}

    def identity(self) -> dict[str, Any]:
        """What decides whether an earlier answer to the same instruction is reusable."""
        return {"teacher": self.name, "model": self.model, "sampling": self.sampling(),
                "prompt_version": TEACHER_PROMPT_VERSION,
                "prompt_sha256": teacher_prompt_sha256()}

    # -- HTTP ---------------------------------------------------------------------------
    def _session(self):
        import aiohttp

        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # One pool sized to the concurrency: no request waits for a connection slot.
        connector = aiohttp.TCPConnector(limit=self.concurrency + 1, ttl_dns_cache=300)
        return aiohttp.ClientSession(headers=headers, connector=connector)

    async def _request(self, session, method: str, path: str, body: dict | None,
                       timeout: float) -> dict:
        """One HTTP exchange. Raises _Transient, _Rejected or ConfigError."""
        import aiohttp

        try:
            async with session.request(method, self.base_url + path, json=body,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                status, retry_after = reply.status, reply.headers.get("Retry-After")
                payload = await _read_capped(reply, MAX_REPLY_BYTES)
        except TimeoutError as exc:
            raise _Transient("timeout", f"no answer within {timeout:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:  # refused, reset, closed mid-answer
            raise _Transient("connection", str(exc) or type(exc).__name__) from exc
        if status >= 400:
            detail = short((payload or b"(too long)").decode("utf-8", "replace"), 200)
            if status in (401, 403):
                raise ConfigError(f"teacher server at {self.base_url} refused the credentials "
                                  f"(HTTP {status}): check {self.key_hint}")
            if status == 404:
                model = f" (model {self.model!r})" if self.model else ""
                raise ConfigError(f"teacher server at {self.base_url} answered 404 for "
                                  f"{path}{model}: {detail}")
            if status in RETRY_STATUS or status >= 500:
                raise _Transient("http_429" if status == 429 else "http_5xx",
                                 f"HTTP {status}: {detail}", parse_retry_after(retry_after))
            raise _Rejected(f"http_{status}", detail)
        if payload is None:
            raise _Rejected("bad_response", f"the server's answer is larger than "
                                            f"{MAX_REPLY_BYTES} bytes")
        try:
            decoded = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _Rejected("bad_response", "the server's answer is not JSON") from exc
        if not isinstance(decoded, dict):
            raise _Rejected("bad_response", "the server's answer is not a JSON object")
        return decoded

    async def _request_with_retries(self, session, body: dict) -> dict:
        """POST a chat completion, retrying transient failures. Raises _Rejected."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._request(session, "POST", "/chat/completions", body,
                                           self.timeout)
            except _Transient as exc:
                if attempt > self.max_retries:
                    if exc.kind == "connection" and not await self._alive(session):
                        raise UnavailableError(
                            f"teacher server at {self.base_url} is unreachable after "
                            f"{attempt} attempts: {exc}") from exc
                    raise _Rejected(exc.kind, str(exc), transient=True) from exc
                self.retries[exc.kind] += 1
                wait = exc.wait if exc.wait is not None else backoff_delay(
                    attempt, self.backoff_base, self.backoff_cap, self.rng)
                await asyncio.sleep(wait)

    async def _alive(self, session) -> bool:
        """Whether the server still answers /v1/models (tells a dead server from a flaky one)."""
        try:
            await self._request(session, "GET", "/models", None, min(self.timeout, 10.0))
        except (_Transient, _Rejected):
            return False
        return True

    # -- readiness ------------------------------------------------------------------------
    def connect(self, progress: Callable[[str], None] | None = None) -> str:
        """Wait until the server lists a model (within ``ready_timeout``); returns the model.

        ``progress`` hears what is waited for. Raises UnavailableError if it is not ready
        in time, ConfigError on refused credentials or a model the server does not serve.
        """
        if progress is not None:
            progress(f"waiting up to {self.ready_timeout:g} s for the teacher server "
                     f"{self.base_url}")
        return asyncio.run(self._connect())

    def describe(self) -> dict[str, Any]:
        """Where the teacher ran and which prompt templates it used (for the manifest)."""
        return {"base_url": self.base_url, "prompt_version": TEACHER_PROMPT_VERSION,
                "prompt_sha256": teacher_prompt_sha256()}

    def run_counts(self) -> dict[str, Any]:
        """Retries, truncation retries and every token the server reported in this run
        (truncated attempts included)."""
        return {"retries": dict(sorted(self.retries.items())),
                "truncated_retried": self.truncated_retried,
                "usage_spent": dict(sorted(self.usage_spent.items()))}

    async def _connect(self) -> str:
        deadline = time.monotonic() + self.ready_timeout
        pause = 0.25
        async with self._session() as session:
            while True:
                try:
                    listing = await self._request(session, "GET", "/models", None,
                                                  min(self.timeout, 10.0))
                    data = listing.get("data")
                    served = [str(m["id"]) for m in (data if isinstance(data, list) else [])
                              if isinstance(m, dict) and isinstance(m.get("id"), str)
                              and m["id"]]
                    problem = "it serves no model yet"
                except (_Transient, _Rejected) as exc:
                    served, problem = [], str(exc)
                if served:
                    return self._pick_model(served)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UnavailableError(
                        f"teacher server at {self.base_url} is unreachable or not ready after "
                        f"{self.ready_timeout:g} s (--ready-timeout): {problem}")
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, 5.0)

    def _pick_model(self, served: list[str]) -> str:
        if not self.model:
            self.model = served[0]
        elif self.model not in served:
            raise ConfigError(f"teacher server at {self.base_url} does not serve model "
                              f"{self.model!r} (it serves: {', '.join(served)})")
        self._connected = True
        return self.model

    # -- answering --------------------------------------------------------------------------
    async def answer(self, session, task: dict[str, Any]) -> OpenAIResult:
        """Ask for one task (``n`` candidates, never truncated). Raises as the class says."""
        task_id = str(task["id"])
        messages = teacher_messages(task)
        kept: list[str] = []
        usage: Counter[str] = Counter()
        tokens, truncated_retries, model, finish = self.max_tokens, 0, self.model, "stop"
        last_failure = "empty_response"
        # Each pass asks for the candidates still missing; a server that ignores ``n``
        # (transformers serve does) is asked again, one candidate at a time. Bounded:
        # n passes that keep something, plus one per doubling of max_tokens.
        passes = self.n + (self.max_tokens_cap // self.max_tokens).bit_length() + 1
        for _ in range(passes):
            body = {"model": self.model, "messages": messages, "max_tokens": tokens,
                    "temperature": self.temperature}
            if self.n - len(kept) > 1:
                body["n"] = self.n - len(kept)
            try:
                reply = await self._request_with_retries(session, body)
            except _Rejected as exc:
                return self._rejected(task_id, exc.reason, truncated_retries, exc.transient)
            reply_usage = _usage(reply)
            self.usage_spent.update(reply_usage)
            listed = reply.get("choices")
            choices = [c for c in (listed if isinstance(listed, list) else [])
                       if isinstance(c, dict) and _content(c) is not None]
            if not choices:
                return self._rejected(task_id, "bad_response", truncated_retries)
            complete = [c for c in choices if c.get("finish_reason") != "length"
                        and _content(c).strip()]
            truncated = sum(c.get("finish_reason") == "length" for c in choices)
            last_failure = "truncated" if truncated else "empty_response"
            if complete:
                if not kept:
                    served = reply.get("model")
                    model = served if isinstance(served, str) and served else self.model
                    finish = str(complete[0].get("finish_reason") or "stop")
                kept += [_content(c).strip() for c in complete]
                usage.update(reply_usage)
            if len(kept) >= self.n:
                break
            if truncated and tokens < self.max_tokens_cap:
                tokens = min(self.max_tokens_cap, tokens * 2)
                truncated_retries += 1
                self.truncated_retried += 1
                continue
            if not complete:
                if kept:
                    break  # fewer candidates than asked beats none
                return self._rejected(task_id, last_failure, truncated_retries)
        if not kept:
            return self._rejected(task_id, last_failure, truncated_retries)
        candidates = tuple(kept[: self.n])
        return OpenAIResult(id=task_id, status=OK, response=candidates[0], finish_reason=finish,
                            usage=dict(sorted(usage.items())), model=model,
                            candidates=candidates if self.n > 1 else (),
                            truncated_retries=truncated_retries)

    def _rejected(self, task_id: str, reason: str, truncated_retries: int,
                  transient: bool = False) -> OpenAIResult:
        return OpenAIResult(id=task_id, status=REJECTED, reason=reason, model=self.model,
                            truncated_retries=truncated_retries, transient=transient)

    async def _answer_many(self, tasks: list[dict[str, Any]],
                           deliver: Callable[[Any], None]) -> None:
        """Answer every task with ``concurrency`` workers, handing each result to ``deliver``."""
        pending: asyncio.Queue = asyncio.Queue()
        for task in tasks:
            pending.put_nowait(task)

        async def worker(session) -> None:
            while True:
                try:
                    task = pending.get_nowait()
                except asyncio.QueueEmpty:
                    return
                deliver(await self.answer(session, task))

        async with self._session() as session:
            workers = [asyncio.create_task(worker(session))
                       for _ in range(min(self.concurrency, len(tasks)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for running in workers:
                    running.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[OpenAIResult]:
        """Results as they arrive, at most ``concurrency`` requests in flight.

        Connects first if :meth:`connect` was not called. Raises UnavailableError /
        ConfigError (see the class) after cancelling the requests still in flight;
        closing the iterator early cancels them too.
        """
        if not self._connected:
            self.connect()
        if not tasks:
            return
        arrived: queue.Queue = queue.Queue()
        done = object()
        loop = asyncio.new_event_loop()

        async def main() -> None:
            try:
                await self._answer_many(tasks, arrived.put)
            except BaseException as exc:  # handed to the consumer thread, raised there
                arrived.put(exc)
            finally:
                arrived.put(done)

        job = loop.create_task(main())
        thread = threading.Thread(target=loop.run_until_complete, args=(job,),
                                  name="teacher-loop", daemon=True)
        thread.start()
        try:
            while (item := arrived.get()) is not done:
                if isinstance(item, asyncio.CancelledError):
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(job.cancel)
            thread.join(SHUTDOWN_SECONDS)
            if not thread.is_alive():
                loop.close()


async def _read_capped(reply, cap: int) -> bytes | None:
    """The reply's body, or None when it is longer than ``cap`` bytes (read no further)."""
    declared = reply.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > cap:
        return None
    body = bytearray()
    while chunk := await reply.content.read(65536):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _usage(reply: dict[str, Any]) -> dict[str, int]:
    usage = reply.get("usage")
    if not isinstance(usage, dict):
        return {}
    return {k: int(v) for k, v in usage.items()
            if k in ("prompt_tokens", "completion_tokens", "total_tokens")
            and isinstance(v, int) and not isinstance(v, bool)}


def _content(choice: dict[str, Any]) -> str | None:
    """The choice's text ('' when the model said nothing); None when the choice is not
    shaped like an OpenAI chat answer at all."""
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if content is None and isinstance(message, dict) and message.get("role"):
        return ""  # an answer without content (a refusal or a tool call)
    return content if isinstance(content, str) else None
