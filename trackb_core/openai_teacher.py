"""The OpenAI-compatible teacher: a client for vLLM (or any ``/v1/chat/completions`` server).

It asks with bounded concurrency, retries transient failures with backoff and rejects
truncated answers instead of keeping them (the seed kept them silently).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse

from trackb_core.errors import ConfigError, UnavailableError
from trackb_core.teacher import OK, REJECTED, TeacherResult, short

# ------------------------------------------------------------------------------------

TEACHER_SYSTEM_PROMPT = (
    "You are an expert Python engineer writing gold answers for a code instruction "
    "dataset. Answer exactly the task given, concisely and correctly. Put code in one "
    "```python fenced block. Never write placeholders such as TODO or <insert ...>."
)

CATEGORY_GUIDANCE = {
    "docstring": "Answer with only the docstring: a triple-quoted Google-style docstring "
                 "(summary, Args:, Returns:, Raises: when relevant) in one ```python block.",
    "explain": "Explain in markdown: a **Purpose** line, then **Parameters**, **Returns** and "
               "**Behavior** bullets. At most 250 words; do not repeat the code.",
    "bugfix": "Say in one or two sentences which line is wrong and why, then give the whole "
              "corrected function in one ```python block.",
    "complete": "Give the whole completed function in one ```python block and nothing else.",
    "unit_test": "Write self-contained pytest tests in one ```python block: import what you "
                 "test, name the functions test_..., use plain assert statements.",
}

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF_SECONDS = 60.0


def teacher_messages(task: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages a teacher model gets for ``task`` (system guidance + instruction)."""
    guidance = CATEGORY_GUIDANCE.get(str(task.get("category")), "")
    system = f"{TEACHER_SYSTEM_PROMPT} {guidance}".strip()
    return [{"role": "system", "content": system},
            {"role": "user", "content": str(task["instruction"])}]


class _Transient(Exception):
    """A failure worth retrying; ``kind`` names it, ``wait`` is the server's Retry-After."""

    def __init__(self, kind: str, detail: str, wait: float | None = None):
        super().__init__(detail)
        self.kind, self.wait = kind, wait


class OpenAITeacher:
    """A client for any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, ...).

    Raises (from :meth:`connect` / :meth:`answer_all`) UnavailableError when the server
    cannot be reached, ConfigError when it refuses the credentials, does not serve
    ``model``, or says the endpoint does not exist. Per-task failures that retrying
    cannot fix (a truncated or empty answer, a 400) come back as rejected results.
    """

    name = "openai"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 32, max_tokens: int = 2048, temperature: float = 0.2,
                 timeout: float = 120.0, max_retries: int = 5, backoff_base: float = 0.5,
                 key_hint: str = "the API key"):
        parsed = urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"teacher base URL {base_url!r} must look like http://host:port/v1")
        # The OpenAI convention is a base URL ending in /v1; accept a bare host too.
        self.base_url = base_url.rstrip("/") + ("/v1" if parsed.path in ("", "/") else "")
        self.model = model or ""
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = backoff_base
        self.key_hint = key_hint
        self.retries: dict[str, int] = {}
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._connected = False
        self._jitter = random.Random()

    # -- HTTP ------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        """One HTTP exchange. Raises _Transient, ConfigError, or _Rejected."""
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code in (401, 403):
                raise ConfigError(f"teacher server at {self.base_url} refused the credentials "
                                  f"(HTTP {exc.code}): check {self.key_hint}") from exc
            if exc.code == 404:
                raise ConfigError(f"teacher server at {self.base_url} answered 404 for {path}"
                                  f"{' (model ' + repr(self.model) + ')' if self.model else ''}: "
                                  f"{detail}") from exc
            if exc.code in RETRY_STATUS or exc.code >= 500:
                kind = "http_429" if exc.code == 429 else "http_5xx"
                raise _Transient(kind, f"HTTP {exc.code}: {detail}",
                                 _retry_after(exc.headers.get("Retry-After"))) from exc
            raise _Rejected(f"http_{exc.code}", detail) from exc
        except TimeoutError as exc:
            raise _Transient("timeout", f"no answer within {timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Transient("timeout", f"no answer within {timeout:g} s") from exc
            raise _Transient("connection", str(exc.reason)) from exc
        except OSError as exc:  # reset, refused, remote closed mid-answer
            raise _Transient("connection", str(exc) or type(exc).__name__) from exc
        try:
            decoded = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Rejected("bad_response", "the server's answer is not JSON") from exc
        if not isinstance(decoded, dict):
            raise _Rejected("bad_response", "the server's answer is not a JSON object")
        return decoded

    def connect(self) -> str:
        """Check the server answers ``/v1/models`` and pick the model; returns the model.

        Raises UnavailableError if the server is unreachable, ConfigError on refused
        credentials or a model the server does not serve.
        """
        try:
            listing = self._request("GET", "/models", None, timeout=min(self.timeout, 10.0))
        except (_Transient, _Rejected) as exc:
            raise UnavailableError(
                f"teacher server at {self.base_url} is unreachable: {exc}") from exc
        served = [str(m.get("id")) for m in listing.get("data") or [] if isinstance(m, dict)]
        if not self.model:
            if not served:
                raise UnavailableError(f"teacher server at {self.base_url} serves no model yet")
            self.model = served[0]
        elif served and self.model not in served:
            raise ConfigError(f"teacher server at {self.base_url} does not serve model "
                              f"{self.model!r} (it serves: {', '.join(served)})")
        self._connected = True
        return self.model

    # -- answering -------------------------------------------------------------------
    def answer(self, task: dict[str, Any]) -> TeacherResult:
        """Ask for one task, retrying transient failures. Raises as :meth:`connect`."""
        task_id = str(task["id"])
        body = {"model": self.model, "messages": teacher_messages(task),
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        attempt = 0
        while True:
            attempt += 1
            try:
                reply = self._request("POST", "/chat/completions", body, timeout=self.timeout)
                return self._result(task_id, reply, attempt)
            except _Rejected as exc:
                return TeacherResult(id=task_id, status=REJECTED, reason=exc.reason,
                                     model=self.model, attempts=attempt)
            except _Transient as exc:
                if attempt > self.max_retries or self._abort.is_set():
                    if exc.kind == "connection":
                        raise UnavailableError(f"teacher server at {self.base_url} is unreachable "
                                               f"after {attempt} attempts: {exc}") from exc
                    return TeacherResult(id=task_id, status=REJECTED, reason=exc.kind,
                                         model=self.model, attempts=attempt)
                with self._lock:
                    self.retries[exc.kind] = self.retries.get(exc.kind, 0) + 1
                self._sleep(exc.wait if exc.wait is not None else self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        # "full jitter": spread retries of many threads so they do not arrive in lockstep
        ceiling = min(MAX_BACKOFF_SECONDS, self.backoff_base * 2 ** (attempt - 1))
        return ceiling * self._jitter.uniform(0.5, 1.0)

    def _sleep(self, seconds: float) -> None:
        self._abort.wait(min(max(seconds, 0.0), MAX_BACKOFF_SECONDS))

    def _result(self, task_id: str, reply: dict, attempt: int) -> TeacherResult:
        usage = {k: int(v) for k, v in (reply.get("usage") or {}).items()
                 if k in ("prompt_tokens", "completion_tokens", "total_tokens")
                 and isinstance(v, int)}
        model = str(reply.get("model") or self.model)
        choices = reply.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            raise _Rejected("bad_response", "no choices in the answer")
        choice = choices[0]
        finish = choice.get("finish_reason")
        content = (choice.get("message") or {}).get("content")
        common = {"id": task_id, "finish_reason": finish, "usage": usage, "model": model,
                  "attempts": attempt}
        if finish == "length":
            return TeacherResult(status=REJECTED, reason="truncated", **common)
        if not isinstance(content, str) or not content.strip():
            return TeacherResult(status=REJECTED, reason="empty_response", **common)
        return TeacherResult(status=OK, response=content.strip(), **common)

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]:
        """Results as they arrive, at most ``concurrency`` requests in flight.

        Raises UnavailableError / ConfigError (see the class); pending requests are
        cancelled first.
        """
        if not self._connected:
            self.connect()
        self._abort.clear()
        with ThreadPoolExecutor(max_workers=self.concurrency,
                                thread_name_prefix="teacher") as pool:
            futures = [pool.submit(self.answer, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    yield future.result()
            finally:
                self._abort.set()
                for future in futures:
                    future.cancel()


class _Rejected(Exception):
    """A failure retrying cannot fix, for this task only."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    return short(text or exc.reason or "", 200)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
