"""Tests for trackb_core.teacher: the reference teacher and the OpenAI-compatible client.

The OpenAI client is tested against a real HTTP server started here (http.server on
127.0.0.1), which can answer 429 with Retry-After, 500, slowly, or truncated.
"""

from __future__ import annotations

import ast
import colorsys
import fnmatch
import inspect
import json
import shlex
import socket
import string
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trackb_core import codeblocks
from trackb_core.errors import ConfigError, UnavailableError
from trackb_core.openai_teacher import OpenAITeacher, _retry_after, teacher_messages
from trackb_core.teacher import ReferenceTeacher, describe_mutation

CATEGORIES = ("docstring", "explain", "bugfix", "complete", "unit_test")

# Real functions from the standard library: with and without docstrings, with
# comparisons to flip, a method, a generator-free loop-heavy function.
REAL_FUNCTIONS = (textwrap.dedent, shlex.quote, fnmatch.fnmatchcase, colorsys.rgb_to_hls,
                  string.capwords, textwrap.TextWrapper._split, textwrap.indent)


# -- task rows built from real sources (shared with test_generate / test_dataset) -------

_FLIPS = {ast.Eq: "!=", ast.NotEq: "==", ast.Lt: ">=", ast.GtE: "<", ast.Gt: "<=",
          ast.LtE: ">", ast.Is: "is not", ast.IsNot: "is", ast.In: "not in", ast.NotIn: "in"}


def flip_first_comparison(source: str) -> tuple[dict, str] | None:
    """``(mutation, buggy_source)`` flipping the first single-line comparison, or None."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or type(node.ops[0]) not in _FLIPS:
            continue
        left, right = node.left, node.comparators[0]
        if left.end_lineno != right.lineno:
            continue
        line = lines[left.end_lineno - 1]
        gap = line[left.end_col_offset:right.col_offset]
        before = gap.strip()
        after = _FLIPS[type(node.ops[0])]
        if before.startswith("("):
            continue
        new_gap = gap.replace(before, after, 1)
        buggy_line = line[:left.end_col_offset] + new_gap + line[right.col_offset:]
        buggy = lines[:left.end_lineno - 1] + [buggy_line] + lines[left.end_lineno:]
        mutation = {"kind": "comparison_flip", "line": left.end_lineno, "before": before,
                    "after": after}
        return mutation, "\n".join(buggy) + "\n"
    return None


def make_tasks(functions=REAL_FUNCTIONS, categories=CATEGORIES,
               source_file: str | None = None) -> list[dict]:
    """Task rows shaped like extract/tasks output, from real function objects or sources."""
    rows = []
    for func in functions:
        source = textwrap.dedent(func if isinstance(func, str) else inspect.getsource(func))
        name = ast.parse(source).body[0].name
        file = source_file or (f"{func.__module__}.py" if not isinstance(func, str) else "x.py")
        function_id = f"{file.removesuffix('.py').replace('/', '.')}.{name}"
        for category in categories:
            row = {"id": f"{function_id}-{category}", "category": category,
                   "instruction": f"Task {category} for `{name}`:\n```python\n{source}```",
                   "source_function": source, "source_file": file,
                   "function_id": function_id, "function_name": name}
            if category == "bugfix":
                flipped = flip_first_comparison(source)
                if flipped is None:
                    continue
                row["mutation"], row["buggy_source"] = flipped
            rows.append(row)
    return rows


# -- a scripted OpenAI-compatible server ------------------------------------------------


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1. Markers in the user message script it.

    ``[429]`` -> the first request answers 429 with Retry-After; ``[500]`` -> the first
    answers 500; ``[length]`` -> finish_reason "length"; ``[slow]`` -> the first request
    stalls past the client timeout; ``[400]`` -> always 400.
    """

    def __init__(self, models=("fake-teacher",), require_key: str | None = None,
                 retry_after: str = "0", delay: float = 0.0):
        self.models, self.require_key = list(models), require_key
        self.retry_after, self.delay = retry_after, delay
        self.attempts: dict[str, int] = {}
        self.requested_models: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code, payload, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _authorised(self):
                if server.require_key and (self.headers.get("Authorization")
                                           != f"Bearer {server.require_key}"):
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model"} for m in server.models]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                with server.lock:
                    server.requested_models.append(body["model"])
                    attempt = server.attempts[user] = server.attempts.get(user, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    self._answer(user, attempt)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, user, attempt):
                if "[429]" in user and attempt == 1:
                    return self._send(429, {"error": "slow down"},
                                      {"Retry-After": server.retry_after})
                if "[500]" in user and attempt == 1:
                    return self._send(500, {"error": "boom"})
                if "[400]" in user:
                    return self._send(400, {"error": "context too long"})
                if "[slow]" in user and attempt == 1:
                    time.sleep(1.5)
                finish = "length" if "[length]" in user else "stop"
                self._send(200, {
                    "id": "cmpl-1", "object": "chat.completion", "model": server.models[0],
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant",
                                             "content": f"answer to: {user.splitlines()[0]}"}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(**kwargs) -> FakeOpenAIServer:
        servers.append(FakeOpenAIServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat_task(task_id: str, text: str, category: str = "complete") -> dict:
    return {"id": task_id, "category": category, "instruction": text}


# -- reference teacher ------------------------------------------------------------------


def answers(tasks):
    return {r.id: r for r in ReferenceTeacher().answer_all(tasks)}


def test_reference_docstring_is_the_functions_own_docstring():
    tasks = make_tasks([textwrap.dedent, shlex.quote], ["docstring"])
    for task in tasks:
        result = answers([task])[task["id"]]
        assert result.ok and result.finish_reason == "stop"
        block = codeblocks.seed_code_blocks(result.response)[0]
        # the block is a string literal whose value is exactly the docstring
        literal = ast.literal_eval(block)
        func = ast.parse(task["source_function"]).body[0]
        assert literal.strip() == ast.get_docstring(func).strip()
        assert result.response.startswith("```python\n")


def test_reference_docstring_skips_functions_without_one():
    source = "def add(a, b):\n    total = a + b\n    if total > 10:\n        return 10\n    return total\n"
    result = answers(make_tasks([source], ["docstring"]))["x.add-docstring"]
    assert result.status == "skipped" and result.reason == "no_reference_docstring"
    assert result.response is None


def test_reference_complete_is_the_original_function():
    task = make_tasks([fnmatch.fnmatchcase], ["complete"])[0]
    result = answers([task])[task["id"]]
    block = codeblocks.seed_code_blocks(result.response)[0]
    assert block == task["source_function"].strip()
    assert codeblocks.compiles(block)


def test_reference_bugfix_explains_the_flip_and_restores_the_original():
    task = make_tasks([textwrap.dedent], ["bugfix"])[0]
    mutation = task["mutation"]
    result = answers([task])[task["id"]]
    text = result.response
    assert f"Line {mutation['line']} compares with `{mutation['after']}` where the logic " \
           f"needs `{mutation['before']}`" in text
    assert "bug" in text.lower() and "fix" in text.lower()
    assert codeblocks.seed_code_blocks(text)[0] == task["source_function"].strip()


@pytest.mark.parametrize(("good", "bad", "expected"), [
    ("    if x == y:", "    if x != y:", "compares with `!=` where the logic needs `==`"),
    ("    while i < n:", "    while i <= n:", "off-by-one"),
    ("    if a and b:", "    if a or b:", "joins the conditions with `or`"),
    ("    return value", "    # return value", "commented out"),
    ("    flag = True", "    flag = False", "uses `False` where the logic needs `True`"),
    ("    if not ready:", "    if ready:", "drops a `not`"),
    ("    end = len(xs) - 1", "    end = len(xs)", "off by one"),
])
def test_describe_mutation_covers_the_seed_mutation_kinds(good, bad, expected):
    source = f"def f(x, y):\n{good}\n        pass\n"
    buggy = f"def f(x, y):\n{bad}\n        pass\n"
    # whole lines as before/after: the changed fragment is found by a token diff
    text = describe_mutation({"kind": "k", "line": 2, "before": good, "after": bad},
                             source, buggy)
    assert expected in text
    assert text.startswith("The bug is on line 2:")


def test_reference_explain_is_structured_and_passes_the_seed_style_checks():
    tasks = make_tasks(REAL_FUNCTIONS, ["explain"])
    results = answers(tasks)
    for task in tasks:
        text = results[task["id"]].response
        for heading in ("**Purpose:**", "**Parameters:**", "**Returns:**", "**Behavior:**"):
            assert heading in text
        assert len(text.split()) >= 20 and "function" in text.lower()
        assert not (text.strip().startswith("```") and text.strip().endswith("```"))
    dedent = results["textwrap.dedent-explain"].response
    assert "Remove any common leading whitespace" in dedent  # docstring summary
    assert "- `text`: no type annotation, required" in dedent
    assert "Loops over" in dedent and "Branches on" in dedent
    # deterministic
    assert answers(tasks) == results


def test_reference_explain_facts_for_async_generator_and_raise():
    source = textwrap.dedent('''
        async def fetch_rows(client, table: str, *, limit: int = 10) -> list:
            async with client.session() as session:
                try:
                    rows = await session.query(table, limit=limit)
                except KeyError:
                    raise ValueError(f"no table {table}")
            for row in rows:
                yield row
    ''')
    text = answers(make_tasks([source], ["explain"]))["x.fetch_rows-explain"].response
    assert "async generator function `fetch_rows` has no docstring" in text
    assert "fetch rows" in text
    assert "- `table`: type `str`, required" in text
    assert "- `limit`: type `int`, default `10`, keyword-only" in text
    assert "Catches `KeyError`" in text and "Raises `ValueError`" in text
    assert "A generator yielding `row`" in text
    assert "awaiting `session.query(table, limit=limit)`" in text


def test_reference_unit_test_and_unknown_are_skipped_with_reasons():
    tasks = make_tasks([shlex.quote], ["unit_test"]) + [
        {"id": "odd", "category": "poetry", "instruction": "x", "source_function": "def f(): pass"},
        {"id": "broken", "category": "complete", "instruction": "x", "source_function": "def ("},
    ]
    results = answers(tasks)
    assert results["shlex.quote-unit_test"].reason == "no_reference_unit_test"
    assert results["odd"].reason == "unknown_category"
    assert results["broken"].reason == "unparsable_source"
    assert all(r.status == "skipped" for r in results.values())


# -- OpenAI-compatible teacher ------------------------------------------------------------


def test_openai_teacher_retries_rejects_truncation_and_records_usage(fake_server):
    server = fake_server()
    teacher = OpenAITeacher(server.base_url, concurrency=4, timeout=5, max_retries=3,
                            backoff_base=0.01)
    tasks = [chat_task("a", "plain"), chat_task("b", "busy [429]"),
             chat_task("c", "flaky [500]"), chat_task("d", "long [length]"),
             chat_task("e", "bad [400]")]
    results = {r.id: r for r in teacher.answer_all(tasks)}

    assert teacher.model == "fake-teacher"  # auto-detected from /v1/models
    assert set(server.requested_models) == {"fake-teacher"}
    assert results["a"].ok and results["a"].response == "answer to: plain"
    assert results["a"].usage == {"prompt_tokens": 10, "completion_tokens": 5,
                                  "total_tokens": 15}
    assert results["b"].ok and results["b"].attempts == 2
    assert results["c"].ok and results["c"].attempts == 2
    assert server.attempts["busy [429]"] == 2 and server.attempts["flaky [500]"] == 2
    assert teacher.retries == {"http_429": 1, "http_5xx": 1}
    assert results["d"].status == "rejected" and results["d"].reason == "truncated"
    assert results["d"].finish_reason == "length" and results["d"].response is None
    assert results["e"].status == "rejected" and results["e"].reason == "http_400"
    assert server.attempts["bad [400]"] == 1  # a 400 is not retried


def test_openai_teacher_honours_retry_after(fake_server):
    server = fake_server(retry_after="7")
    teacher = OpenAITeacher(server.base_url, timeout=5, backoff_base=0.01)
    slept = []
    teacher._sleep = slept.append  # record the wait instead of waiting 7 s
    results = list(teacher.answer_all([chat_task("a", "x [429]")]))
    assert results[0].ok and slept == [7.0]
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert _retry_after("bogus") is None


def test_openai_teacher_retries_a_timeout_then_gives_up_as_rejected(fake_server):
    server = fake_server()
    teacher = OpenAITeacher(server.base_url, timeout=0.5, max_retries=1, backoff_base=0.01)
    result = next(teacher.answer_all([chat_task("a", "x [slow]")]))
    assert result.ok and result.attempts == 2 and teacher.retries == {"timeout": 1}

    teacher = OpenAITeacher(server.base_url, timeout=0.5, max_retries=0, backoff_base=0.01)
    result = next(teacher.answer_all([chat_task("b", "y [slow]")]))
    assert result.status == "rejected" and result.reason == "timeout"


def test_openai_teacher_bounds_concurrency(fake_server):
    server = fake_server(delay=0.1)
    teacher = OpenAITeacher(server.base_url, concurrency=3, timeout=5)
    results = list(teacher.answer_all([chat_task(str(i), f"t{i}") for i in range(12)]))
    assert len(results) == 12 and all(r.ok for r in results)
    assert 2 <= server.max_in_flight <= 3


def test_openai_teacher_sends_the_teacher_guidance():
    messages = teacher_messages({"id": "a", "category": "unit_test", "instruction": "do it"})
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "pytest" in messages[0]["content"] and messages[1]["content"] == "do it"


def test_unreachable_server_is_unavailable_quickly():
    start = time.monotonic()
    teacher = OpenAITeacher(f"http://127.0.0.1:{free_port()}/v1", timeout=2)
    with pytest.raises(UnavailableError, match="teacher server at .* is unreachable"):
        list(teacher.answer_all([chat_task("a", "x")]))
    assert time.monotonic() - start < 5


def test_server_that_dies_mid_run_is_unavailable(fake_server):
    server = fake_server()
    teacher = OpenAITeacher(server.base_url, timeout=2, max_retries=1, backoff_base=0.01)
    teacher.connect()
    server.stop()
    with pytest.raises(UnavailableError, match="unreachable after 2 attempts"):
        list(teacher.answer_all([chat_task("a", "x")]))


def test_refused_credentials_are_a_config_error(fake_server):
    server = fake_server(require_key="sekrit")
    with pytest.raises(ConfigError, match=r"refused the credentials \(HTTP 401\)"):
        OpenAITeacher(server.base_url, api_key="wrong").connect()
    teacher = OpenAITeacher(server.base_url, api_key="sekrit", timeout=5)
    assert next(teacher.answer_all([chat_task("a", "x")])).ok


def test_model_not_served_and_bad_url_are_config_errors(fake_server):
    server = fake_server(models=("m1", "m2"))
    with pytest.raises(ConfigError, match="does not serve model 'nope'"):
        OpenAITeacher(server.base_url, model="nope").connect()
    assert OpenAITeacher(server.base_url, model="m2").connect() == "m2"
    # a bare host gets the conventional /v1
    assert OpenAITeacher(server.base_url.removesuffix("/v1")).connect() == "m1"
    with pytest.raises(ConfigError, match="must look like"):
        OpenAITeacher("localhost:8000")


def test_describe_mutation_prefers_the_operator_fields_of_tasks():
    # trackb_core.tasks stores whole lines in before/after and the operators beside them
    mutation = {"kind": "comparison_flip", "line": 2, "before": "    if a <= b:",
                "after": "    if a < b:", "op_before": "<=", "op_after": "<"}
    text = describe_mutation(mutation, "def f(a, b):\n    if a <= b:\n        return a\n",
                             "def f(a, b):\n    if a < b:\n        return a\n")
    assert "Line 2 compares with `<` where the logic needs `<=`" in text
    assert "off-by-one" in text and "The fix restores `if a <= b:`" in text
