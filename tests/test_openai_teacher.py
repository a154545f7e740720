"""Tests for trackb_core.openai_teacher: the async OpenAI-compatible teacher client.

The client talks real HTTP to tests/fault_server.py (an aiohttp server on 127.0.0.1)
scripted to answer 429 with Retry-After, 500, 400, to hang, to drop the connection and
to truncate; the end-to-end runs against ``transformers serve`` are in test_generate.py.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from fault_server import FaultServer

from trackb_core import openai_teacher
from trackb_core.errors import ConfigError, UnavailableError
from trackb_core.openai_teacher import (
    RETRY_AFTER_CEILING,
    TEACHER_PROMPT_VERSION,
    OpenAITeacher,
    backoff_delay,
    parse_retry_after,
    teacher_messages,
    teacher_prompt_sha256,
)


@pytest.fixture
def fault_server():
    servers = []

    def start(**kwargs) -> FaultServer:
        servers.append(FaultServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def chat_task(task_id: str, text: str, category: str = "complete") -> dict:
    return {"id": task_id, "category": category, "instruction": text}


def fast_teacher(server: FaultServer, **kwargs) -> OpenAITeacher:
    """A client with test-sized waits (the defaults suit a real vLLM server)."""
    settings = {"timeout": 5.0, "backoff_base": 0.01, "ready_timeout": 5.0, **kwargs}
    return OpenAITeacher(server.base_url, **settings)


# -- retry timing ------------------------------------------------------------------------


def test_backoff_delay_doubles_and_jitters_within_its_bounds():
    rng = random.Random(0)
    for attempt in range(1, 10):
        ceiling = min(8.0, 0.5 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        # jittered: clients that failed together do not all come back at once
        assert max(delays) - min(delays) > ceiling / 4
    assert backoff_delay(30, 0.5, 8.0, rng) <= 8.0  # capped, no overflow


def test_parse_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    in_ten = format_datetime(now + timedelta(seconds=10), usegmt=True)
    assert parse_retry_after(in_ten, now=now.timestamp()) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now.timestamp()) == 0.0
    assert parse_retry_after("7") == 7.0 and parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("99999") == RETRY_AFTER_CEILING
    for bogus in (None, "", "soon", "nan"):
        assert parse_retry_after(bogus) is None


def test_teacher_sees_the_instruction_verbatim_plus_versioned_guidance():
    instruction = "Write pytest tests for `f`:\n```python\ndef f():\n    return 1\n```"
    messages = teacher_messages({"id": "a", "category": "unit_test", "instruction": instruction})
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == instruction  # exactly what the student is shown
    assert "pytest" in messages[0]["content"]
    assert TEACHER_PROMPT_VERSION == "v2" and len(teacher_prompt_sha256()) == 64


# -- answering ----------------------------------------------------------------------------


def test_retries_transient_failures_and_records_usage(fault_server):
    server = fault_server(script={"busy": ["429"], "flaky": ["500", "500"], "dropped": ["reset"],
                                  "stuck": ["hang"], "refused": ["400"]}, hang_seconds=10)
    teacher = fast_teacher(server, timeout=0.5, max_retries=3, concurrency=5)
    texts = ["plain", "busy", "flaky", "dropped", "stuck", "refused"]
    results = {r.id: r for r in teacher.answer_all([chat_task(t, t) for t in texts])}

    assert teacher.model == "fault-teacher"  # auto-detected from /v1/models
    assert set(server.requested_models) == {"fault-teacher"}
    for text in ("plain", "busy", "flaky", "dropped", "stuck"):
        assert results[text].ok and results[text].response == server.answer_text(text)
        assert results[text].finish_reason == "stop"
        assert results[text].usage["total_tokens"] == \
            results[text].usage["prompt_tokens"] + results[text].usage["completion_tokens"] > 0
    assert dict(server.hits) == {"plain": 1, "busy": 2, "flaky": 3, "dropped": 2, "stuck": 2,
                                 "refused": 1}  # a 400 is not retried
    assert teacher.retries == {"http_429": 1, "http_5xx": 2, "connection": 1, "timeout": 1}
    assert results["refused"].status == "rejected" and results["refused"].reason == "http_400"
    assert not results["refused"].transient
    assert teacher.usage_spent["total_tokens"] == sum(r.usage.get("total_tokens", 0)
                                                      for r in results.values())


def test_honours_retry_after(fault_server):
    server = fault_server(script={"busy": ["429"]}, retry_after="1")
    teacher = fast_teacher(server, backoff_base=0.001)
    teacher.connect()
    start = time.monotonic()
    result = next(teacher.answer_all([chat_task("a", "busy")]))
    assert result.ok and time.monotonic() - start >= 0.95  # not the 1 ms backoff


def test_gives_up_after_max_retries_as_a_transient_rejection(fault_server):
    server = fault_server(script={"stuck": ["500"] * 5})
    teacher = fast_teacher(server, max_retries=2)
    result = next(teacher.answer_all([chat_task("a", "stuck")]))
    assert result.status == "rejected" and result.reason == "http_5xx" and result.transient
    assert server.hits["stuck"] == 3


def test_truncated_answers_are_asked_again_with_more_tokens_then_rejected(fault_server):
    server = fault_server(answer_tokens=(20, 20))
    teacher = fast_teacher(server, max_tokens=8, max_tokens_cap=32)
    result = next(teacher.answer_all([chat_task("a", "long answer")]))
    # 8 -> 16 (both truncated) -> 32: complete
    assert result.ok and result.truncated_retries == 2 and teacher.truncated_retried == 2
    assert result.response == server.answer_text("long answer")
    assert result.usage["completion_tokens"] == 20  # the kept answer's usage only
    assert teacher.usage_spent["completion_tokens"] == 8 + 16 + 20

    capped = fast_teacher(server, max_tokens=8, max_tokens_cap=16)
    result = next(capped.answer_all([chat_task("b", "another long answer")]))
    assert result.status == "rejected" and result.reason == "truncated"
    assert result.response is None and capped.truncated_retried == 1


@pytest.mark.parametrize("honour_n", [True, False])
def test_n_candidates_even_from_a_server_that_ignores_n(fault_server, honour_n):
    server = fault_server(honour_n=honour_n)
    teacher = fast_teacher(server, n=3, temperature=0.8)
    result = next(teacher.answer_all([chat_task("a", "sample me")]))
    assert result.ok and len(result.candidates) == 3
    assert result.response == result.candidates[0] == server.answer_text("sample me")
    # one request asking n=3, or three asking one each (transformers serve ignores n)
    assert server.hits["sample me"] == (1 if honour_n else 3)


def test_bounds_concurrency(fault_server):
    server = fault_server(latency=0.1)
    teacher = fast_teacher(server, concurrency=3)
    results = list(teacher.answer_all([chat_task(str(i), f"t{i}") for i in range(12)]))
    assert len(results) == 12 and all(r.ok for r in results)
    assert server.max_in_flight == 3


def test_closing_the_iterator_early_stops_asking(fault_server):
    server = fault_server(latency=0.2)
    teacher = fast_teacher(server, concurrency=2)
    results = teacher.answer_all([chat_task(str(i), f"t{i}") for i in range(20)])
    next(results)
    results.close()
    time.sleep(0.5)
    assert server.requests <= 4  # the two in flight, perhaps one more each; not all 20


# -- readiness and fatal errors ------------------------------------------------------------


def test_waits_for_a_server_that_is_still_loading(fault_server):
    server = fault_server(ready_after=1.0)
    start = time.monotonic()
    assert fast_teacher(server, ready_timeout=10).connect() == "fault-teacher"
    assert time.monotonic() - start >= 0.9

    loading = fault_server(ready_after=60)
    with pytest.raises(UnavailableError, match=r"not ready after 0.5 s.*serves no model yet"):
        fast_teacher(loading, ready_timeout=0.5).connect()


def test_unreachable_server_is_unavailable_after_the_ready_budget(closed_port):
    start = time.monotonic()
    teacher = OpenAITeacher(f"http://127.0.0.1:{closed_port}/v1", ready_timeout=1.0)
    with pytest.raises(UnavailableError, match="unreachable or not ready after 1 s"):
        list(teacher.answer_all([chat_task("a", "x")]))
    assert time.monotonic() - start < 60  # a guard against hanging, not a speed test


def test_server_that_dies_mid_run_is_unavailable(fault_server):
    server = fault_server()
    teacher = fast_teacher(server, max_retries=1)
    teacher.connect()
    server.stop()
    with pytest.raises(UnavailableError, match="unreachable after 2 attempts"):
        list(teacher.answer_all([chat_task("a", "x")]))


def test_refused_credentials_are_a_config_error_naming_the_variable(fault_server):
    server = fault_server(require_key="sekrit")
    with pytest.raises(ConfigError, match=r"refused the credentials \(HTTP 401\).*\$MY_KEY"):
        fast_teacher(server, api_key="wrong", key_hint="the API key in $MY_KEY").connect()
    teacher = fast_teacher(server, api_key="sekrit")
    assert next(teacher.answer_all([chat_task("a", "x")])).ok


def test_model_not_served_and_bad_url_are_config_errors(fault_server):
    server = fault_server(models=("m1", "m2"))
    with pytest.raises(ConfigError, match=r"does not serve model 'nope' \(it serves: m1, m2\)"):
        fast_teacher(server, model="nope").connect()
    assert fast_teacher(server, model="m2").connect() == "m2"
    # a bare host gets the conventional /v1
    assert OpenAITeacher(server.base_url.removesuffix("/v1")).connect() == "m1"
    with pytest.raises(ConfigError, match="must look like"):
        OpenAITeacher("localhost:8000")


def test_identity_changes_with_model_sampling_and_prompt_version(monkeypatch):
    base = OpenAITeacher("http://127.0.0.1:1/v1", model="m").identity()
    assert OpenAITeacher("http://127.0.0.1:1/v1", model="m").identity() == base
    assert OpenAITeacher("http://127.0.0.1:1/v1", model="other").identity() != base
    assert OpenAITeacher("http://127.0.0.1:1/v1", model="m", temperature=0.7).identity() != base
    assert OpenAITeacher("http://127.0.0.1:1/v1", model="m", n=2).identity() != base
    monkeypatch.setattr(openai_teacher, "TEACHER_PROMPT_VERSION", "v3")
    assert OpenAITeacher("http://127.0.0.1:1/v1", model="m").identity() != base


# -- hostile or broken replies --------------------------------------------------------------

BAD_BODIES = {
    "choices-not-a-list": b'{"choices": "x"}',
    "message-a-string": b'{"choices": [{"message": "hi", "finish_reason": "stop"}]}',
    "content-a-number": b'{"choices": [{"message": {"content": 5}, "finish_reason": "stop"}]}',
    "not-json": b"<html>gateway</html>",
    "a-json-list": b"[1, 2]",
    "nested-deep": b"[" * 200_000 + b"]" * 200_000,
    "huge": b'{"choices": [{"message": {"content": "' + b"x" * (9 << 20) + b'"}}]}',
}
GOOD_BUT_ODD = b'{"choices": [{"message": {"content": "def f(): pass"}, "finish_reason": ' \
               b'"stop"}], "usage": [1, 2], "model": {"not": "a string"}}'


@pytest.fixture
def crafted_server():
    """A server answering /v1/models normally and each chat request with the body named
    by the request's message (``BAD_BODIES``), over plain HTTP."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self._send(b'{"data": [{"id": "m"}]}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body["messages"][-1]["content"]
            self._send(BAD_BODIES.get(name, GOOD_BUT_ODD))

        def _send(self, payload: bytes):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except OSError:
                pass  # the client stopped reading a reply it will not keep

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_malformed_and_oversized_replies_are_bad_responses_never_a_crash(crafted_server):
    teacher = OpenAITeacher(crafted_server, model="m", timeout=20, max_retries=0)
    tasks = [chat_task(name, name) for name in BAD_BODIES] + [chat_task("odd", "odd")]
    results = {r.id: r for r in teacher.answer_all(tasks)}
    for name in BAD_BODIES:
        assert results[name].status == "rejected" and results[name].reason == "bad_response", \
            (name, results[name])
    # Odd fields around a good answer are ignored, not trusted.
    assert results["odd"].ok and results["odd"].response == "def f(): pass"
    assert results["odd"].model == "m" and results["odd"].usage == {}
