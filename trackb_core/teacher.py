"""Teachers: whatever writes the gold response for a task, behind one small interface.

Two teachers exist:

* :class:`ReferenceTeacher` derives the answer from the task's own source function
  (its docstring, the original code, the mutation that made the bug, AST facts). No
  network, no model, fully deterministic: the CPU demo and the tests run on it.
* :class:`OpenAITeacher` asks any OpenAI-compatible chat server (vLLM in production)
  with bounded concurrency, retries with backoff on transient failures, and rejects
  truncated answers instead of keeping them (the seed kept them silently).

Every answer is a :class:`TeacherResult`; a task a teacher cannot or should not answer
comes back with ``status`` "skipped" or "rejected" and a ``reason``, never dropped
silently, so the generate stage can count it.
"""

from __future__ import annotations

import ast
import difflib
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlparse

from trackb_core.errors import ConfigError, UnavailableError

OK, SKIPPED, REJECTED = "ok", "skipped", "rejected"


@dataclass(frozen=True)
class TeacherResult:
    """One task's outcome: a response (status "ok") or why there is none."""

    id: str
    status: str  # "ok" | "skipped" (teacher has no answer) | "rejected" (answer unusable)
    response: str | None = None
    reason: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    model: str = ""
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == OK


class Teacher(Protocol):
    """Answers tasks. ``answer_all`` yields one result per task, in any order."""

    name: str
    model: str

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]: ...


# ------------------------------------------------------------------------------------
# Reference teacher: gold from the source itself
# ------------------------------------------------------------------------------------


class ReferenceTeacher:
    """Gold answers derived from each task's ``source_function``; no network.

    docstring -> the function's own docstring; complete -> the original function;
    bugfix -> what the mutation changed and why it is wrong, then the original;
    explain -> a structured explanation from AST facts and the docstring;
    unit_test -> skipped (there is no reference test).
    """

    name = "reference"
    model = "reference"

    def answer_all(self, tasks: list[dict[str, Any]]) -> Iterator[TeacherResult]:
        for task in tasks:
            yield self.answer(task)

    def answer(self, task: dict[str, Any]) -> TeacherResult:
        """The reference answer for one task row (never raises on odd source)."""
        task_id = str(task["id"])
        category = task.get("category")
        source = str(task.get("source_function") or "").strip("\n")
        if category == "unit_test":
            return self._skip(task_id, "no_reference_unit_test")
        builder = {
            "docstring": _reference_docstring,
            "complete": _reference_complete,
            "bugfix": _reference_bugfix,
            "explain": _reference_explain,
        }.get(str(category))
        if builder is None:
            return self._skip(task_id, "unknown_category")
        func = _function_node(source)
        if func is None:
            return self._skip(task_id, "unparsable_source")
        response, reason = builder(task, source, func)
        if response is None:
            return self._skip(task_id, str(reason))
        return TeacherResult(id=task_id, status=OK, response=response, finish_reason="stop",
                             model=self.model)

    def _skip(self, task_id: str, reason: str) -> TeacherResult:
        return TeacherResult(id=task_id, status=SKIPPED, reason=reason, model=self.model)


def _function_node(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    try:
        module = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in module.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node
    return None


def _python_block(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def _reference_docstring(task, source, func) -> tuple[str | None, str | None]:
    doc = ast.get_docstring(func)
    if not doc or not doc.strip():
        return None, "no_reference_docstring"
    return _python_block(render_docstring(doc)), None


def render_docstring(doc: str) -> str:
    """``doc`` as a triple-quoted docstring literal (multi-line ones close on their own line)."""
    doc = doc.strip()
    quote = "'''" if '"""' in doc else '"""'
    prefix = "r" if "\\" in doc and not doc.endswith("\\") else ""
    if "\n" in doc:
        return f"{prefix}{quote}{doc}\n{quote}"
    # a closing quote right after a quote character would end the literal early
    pad = " " if doc.endswith(quote[0]) or doc.endswith("\\") else ""
    return f"{prefix}{quote}{doc}{pad}{quote}"


def _reference_complete(task, source, func) -> tuple[str | None, str | None]:
    return _python_block(source), None


# -- bugfix ------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|==|!=|<=|>=|\*\*|//|->|\S")
_COMPARISONS = {"==", "!=", "<", "<=", ">", ">=", "is", "is not", "in", "not in"}
_BOUNDARY_PAIRS = {frozenset({"<", "<="}), frozenset({">", ">="})}


def _reference_bugfix(task, source, func) -> tuple[str | None, str | None]:
    mutation = task.get("mutation")
    if not isinstance(mutation, dict):
        return None, "no_mutation"
    return describe_mutation(mutation, source, task.get("buggy_source")) + "\n\n" + (
        "Fixed function:\n\n" + _python_block(source)
    ), None


def describe_mutation(mutation: dict[str, Any], source: str, buggy_source: str | None) -> str:
    """A short explanation of what a mutation changed and why the result is wrong."""
    line_no = int(mutation.get("line") or 0)
    before = str(mutation.get("before", ""))
    after = str(mutation.get("after", ""))
    good_line = _line(source, line_no) or before
    bad_line = _line(buggy_source or "", line_no) or after
    # before/after may be whole lines or just the changed fragment: narrow lines down
    if mutation.get("op_before") and mutation.get("op_after"):
        good, bad = str(mutation["op_before"]).strip(), str(mutation["op_after"]).strip()
    elif before.strip() and before.strip() != good_line.strip():
        good, bad = before.strip(), after.strip()
    else:
        good, bad = _changed_fragment(good_line, bad_line)
    where = f"Line {line_no}" if line_no else "The changed line"
    what, why = _explain_change(good, bad, good_line, bad_line)
    head = f"The bug is on line {line_no}: `{_short(bad_line)}`." if line_no else (
        f"The bug is in `{_short(bad_line)}`.")
    return f"{head}\n{where} {what}: {why} The fix restores `{_short(good_line)}`."


def _line(text: str, number: int) -> str:
    lines = text.splitlines()
    return lines[number - 1] if 1 <= number <= len(lines) else ""


def _changed_fragment(good_line: str, bad_line: str) -> tuple[str, str]:
    a, b = _TOKEN.findall(good_line), _TOKEN.findall(bad_line)
    codes = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
             if op[0] != "equal"]
    if not codes:
        return good_line.strip(), bad_line.strip()
    i1, j1 = codes[0][1], codes[0][3]
    i2, j2 = codes[-1][2], codes[-1][4]
    return " ".join(a[i1:i2]), " ".join(b[j1:j2])


def _explain_change(good: str, bad: str, good_line: str, bad_line: str) -> tuple[str, str]:
    if bad_line.lstrip().startswith("#") and good_line.lstrip().startswith("return"):
        return ("has its `return` statement commented out",
                "the function falls through and returns `None` instead of the computed value.")
    if good in _COMPARISONS and bad in _COMPARISONS:
        if frozenset({good, bad}) in _BOUNDARY_PAIRS:
            return (f"compares with `{bad}` where the logic needs `{good}`",
                    "the boundary case where both sides are equal is handled the wrong way "
                    "(an off-by-one error).")
        return (f"compares with `{bad}` where the logic needs `{good}`",
                "the test is inverted, so the wrong branch runs.")
    if {good, bad} == {"and", "or"}:
        return (f"joins the conditions with `{bad}` where the logic needs `{good}`",
                "the combined condition holds in the wrong cases.")
    if {good, bad} == {"True", "False"}:
        return (f"uses `{bad}` where the logic needs `{good}`",
                "the flag is flipped, so callers see the opposite behavior.")
    good_tokens, bad_tokens = good.split(), bad.split()
    if "not" in good_tokens and [t for t in good_tokens if t != "not"] == bad_tokens:
        return ("drops a `not`", "the condition is inverted, so the wrong branch runs.")
    if re.search(r"[+-]\s*1\b", f"{good} {bad}"):
        return (f"reads `{bad}` where the logic needs `{good}`",
                "the value is off by one, so an index, count or bound is shifted.")
    return (f"reads `{bad}` where the correct code is `{good}`",
            "this changes what the function computes, so its result is wrong.")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- explain -------------------------------------------------------------------------

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``func``'s body in source order, not descending into nested scopes."""
    stack = list(reversed(func.body))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _code(node: ast.AST, limit: int = 60) -> str:
    return f"`{_short(ast.unparse(node), limit)}`"


def _reference_explain(task, source, func) -> tuple[str | None, str | None]:
    return explain_function(func), None


def explain_function(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """A deterministic markdown explanation of ``func`` built from its AST and docstring."""
    nodes = list(_own_nodes(func))
    is_async = isinstance(func, ast.AsyncFunctionDef)
    is_generator = any(isinstance(n, ast.Yield | ast.YieldFrom) for n in nodes)
    kind = ("async " if is_async else "") + ("generator " if is_generator else "") + "function"

    doc = ast.get_docstring(func)
    if doc and doc.strip():
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        purpose = f"The {kind} `{func.name}`: {summary}"
    else:
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", func.name).replace("_", " ").strip().lower()
        purpose = f"The {kind} `{func.name}` has no docstring; judging by its name it deals with: {words}."

    lines = [f"**Purpose:** {purpose}", "", "**Parameters:**"]
    lines += _parameter_bullets(func.args) or ["- none (it takes no arguments)"]
    lines += ["", f"**Returns:** {_returns_line(func, nodes, is_generator)}", "", "**Behavior:**"]
    lines += _behavior_bullets(func, nodes, is_async, is_generator)
    return "\n".join(lines)


def _parameter_bullets(args: ast.arguments) -> list[str]:
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    bullets = []
    for index, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if index == 0 and arg.arg in ("self", "cls") and arg.annotation is None:
            bullets.append(f"- `{arg.arg}`: the {'instance' if arg.arg == 'self' else 'class'} "
                           "the method is called on")
            continue
        bullets.append(_param(arg.arg, arg.annotation, default))
    if args.vararg:
        bullets.append(_param("*" + args.vararg.arg, args.vararg.annotation, None,
                              "extra positional arguments"))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        bullets.append(_param(arg.arg, arg.annotation, default, "keyword-only"))
    if args.kwarg:
        bullets.append(_param("**" + args.kwarg.arg, args.kwarg.annotation, None,
                              "extra keyword arguments"))
    return bullets


def _param(name: str, annotation, default, note: str = "") -> str:
    parts = [f"type {_code(annotation)}" if annotation is not None else "no type annotation"]
    parts.append(f"default {_code(default)}" if default is not None else "required"
                 if not name.startswith("*") else "optional")
    if note:
        parts.append(note)
    return f"- `{name}`: " + ", ".join(parts)


def _returns_line(func, nodes: list[ast.AST], is_generator: bool) -> str:
    annotation = f"{_code(func.returns)}. " if func.returns is not None else ""
    if is_generator:
        yielded = _unique(_code(n.value) for n in nodes
                          if isinstance(n, ast.Yield | ast.YieldFrom) and n.value is not None)
        what = f"yielding {', '.join(yielded[:4])}" if yielded else "yielding values"
        return f"{annotation}A generator {what}."
    returned = _unique(_code(n.value) if n.value is not None else "`None`"
                       for n in nodes if isinstance(n, ast.Return))
    if returned:
        more = f" (and {len(returned) - 4} more)" if len(returned) > 4 else ""
        return f"{annotation}Returns {' or '.join(returned[:4])}{more}."
    if annotation:
        return annotation.strip()
    return "Nothing explicitly (the function returns `None`)."


def _behavior_bullets(func, nodes: list[ast.AST], is_async: bool, is_generator: bool) -> list[str]:
    bullets: list[str] = []
    if is_async:
        awaited = _unique(_code(n.value) for n in nodes if isinstance(n, ast.Await))
        detail = f", awaiting {', '.join(awaited[:3])}" if awaited else ""
        bullets.append(f"- Runs as a coroutine (`async def`){detail}.")
    if is_generator:
        bullets.append("- Produces its results lazily with `yield`.")
    for node in nodes:
        if isinstance(node, ast.For | ast.AsyncFor):
            bullets.append(f"- Loops over {_code(node.iter)} (as {_code(node.target, 30)}).")
        elif isinstance(node, ast.While):
            bullets.append(f"- Repeats while {_code(node.test)} holds.")
    conditions = [n for n in nodes if isinstance(n, ast.If)]
    for node in conditions[:3]:
        bullets.append(f"- Branches on {_code(node.test)}.")
    if len(conditions) > 3:
        bullets.append(f"- Checks {len(conditions) - 3} more conditions.")
    for node in nodes:
        if isinstance(node, ast.Match):
            bullets.append(f"- Matches on {_code(node.subject)}.")
        elif isinstance(node, ast.With | ast.AsyncWith):
            managers = ", ".join(_code(item.context_expr) for item in node.items)
            bullets.append(f"- Uses the context manager {managers}.")
        elif isinstance(node, ast.Assert):
            bullets.append(f"- Asserts {_code(node.test)}.")
    caught = _unique(_code(h.type) if h.type is not None else "any exception"
                     for n in nodes if isinstance(n, ast.Try | ast.TryStar) for h in n.handlers)
    if caught:
        bullets.append(f"- Catches {', '.join(caught)}.")
    raised = _unique(
        (_code(n.exc.func) if isinstance(n.exc, ast.Call) else _code(n.exc))
        if n.exc is not None else "the current exception again (bare `raise`)"
        for n in nodes if isinstance(n, ast.Raise))
    if raised:
        bullets.append(f"- Raises {', '.join(raised)}.")
    calls = _unique(_code(n.func, 40) for n in nodes
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Name | ast.Attribute))
    if calls:
        more = f" and {len(calls) - 8} more" if len(calls) > 8 else ""
        bullets.append(f"- Calls {', '.join(calls[:8])}{more}.")
    nested = [n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if nested:
        bullets.append(f"- Defines the nested function(s) {', '.join(f'`{n}`' for n in nested)}.")
    if not bullets:
        bullets.append("- Runs straight-line code: no loops, branches, calls or exceptions.")
    return bullets


# ------------------------------------------------------------------------------------
# OpenAI-compatible teacher
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
    return _short(text or exc.reason or "", 200)


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
