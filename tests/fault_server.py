"""A fault-injecting OpenAI-compatible server for the teacher tests and benchmark.

An aiohttp server on 127.0.0.1 (in a background thread, or as its own process with
``python tests/fault_server.py``) that answers ``/v1/models`` and
``/v1/chat/completions`` like vLLM, after a fixed ``latency``, and fails a share of
requests on purpose. Which request fails, and how, is a pure function of the seed, the
request's user message and how often that message was asked before, so two runs of the
same tasks meet the same faults.

Fault kinds: ``429`` (with Retry-After), ``500``, ``hang`` (no answer until the client
gives up), ``reset`` (the connection is dropped without an answer) and ``length`` (a
truncated answer, ``finish_reason == "length"``). Independently of faults, every answer
"needs" a number of tokens derived from its message (``answer_tokens``): asked with fewer
``max_tokens`` it comes back truncated, as a real model's would.

``script`` pins faults for chosen messages instead: ``{"msg": ["429", None, "500"]}``
fails the first and third request for "msg" (None: answer normally), then answers.

``hits`` counts chat requests per user message (the task's instruction), which is how
the tests prove that a resumed run does not ask again for what it already has.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter

FAULT_KINDS = ("429", "500", "hang", "reset", "length")
# Only by script: a request the server refuses for good.
SCRIPT_ONLY_KINDS = ("400",)


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FaultServer:
    """See the module docstring. Use as a context manager or call :meth:`stop`."""

    def __init__(self, *, fault_rate: float = 0.0, kinds: tuple[str, ...] = FAULT_KINDS,
                 latency: float = 0.0, seed: int = 0, retry_after: str = "0",
                 hang_seconds: float = 30.0, answer_tokens: tuple[int, int] = (8, 8),
                 models: tuple[str, ...] = ("fault-teacher",), ready_after: float = 0.0,
                 require_key: str | None = None, script: dict[str, list] | None = None,
                 honour_n: bool = True, port: int = 0, max_concurrent: int | None = None):
        unknown = set(kinds) - set(FAULT_KINDS)
        unknown |= {k for ks in (script or {}).values() for k in ks if k is not None} - set(
            FAULT_KINDS + SCRIPT_ONLY_KINDS)
        assert not unknown, f"unknown fault kinds {unknown}"
        self.fault_rate, self.kinds, self.latency, self.seed = fault_rate, tuple(kinds), latency, seed
        self.retry_after, self.hang_seconds = retry_after, hang_seconds
        self.answer_tokens, self.models = answer_tokens, list(models)
        self.require_key = require_key
        self.script, self.honour_n = dict(script or {}), honour_n
        self.ready_at = time.monotonic() + ready_after
        self.hits: Counter[str] = Counter()  # chat requests per user message
        self.faults: Counter[str] = Counter()  # injected faults per kind
        self.requested_models: Counter[str] = Counter()
        self.requests = self.in_flight = self.max_in_flight = 0
        # Like a model server's batch: at most this many chat requests are served at
        # once (each for ``latency``); the others wait in a queue. None: no limit.
        self.max_concurrent = max_concurrent
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        # Wall-clock (time.time()) of the first chat request's arrival and of the last
        # answer, for throughput measured by the server itself.
        self.first_arrival: float | None = None
        self.last_answer: float | None = None
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(port,), daemon=True,
                                        name="fault-server")
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("fault server did not start")
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle ------------------------------------------------------------------
    def _serve(self, port: int) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a client that gave up on a hang frees its handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        self.port = listener.getsockname()[1]
        site = web.SockSite(self._runner, listener, backlog=1024)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.hits.clear()
            self.faults.clear()
            self.requested_models.clear()
            self.requests = self.max_in_flight = 0

    # -- handlers ---------------------------------------------------------------------
    def _refused(self, request):
        from aiohttp import web

        if self.require_key and request.headers.get("Authorization") != \
                f"Bearer {self.require_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        return None

    async def _models(self, request):
        from aiohttp import web

        if (refused := self._refused(request)) is not None:
            return refused
        if time.monotonic() < self.ready_at:  # vLLM answers, but has no model loaded yet
            return web.json_response({"object": "list", "data": []})
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "fault-server"} for m in self.models]})

    async def _chat(self, request):
        from aiohttp import web

        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        user = body["messages"][-1]["content"]
        with self._lock:
            self.requests += 1
            self.hits[user] += 1
            attempt = self.hits[user]
            self.requested_models[body.get("model")] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.first_arrival is None:
                self.first_arrival = time.time()
        try:
            if self._slots is not None:
                async with self._slots:
                    if self.latency:
                        await asyncio.sleep(self.latency)
            elif self.latency:
                await asyncio.sleep(self.latency)
            fault = self._fault(user, attempt)
            if fault:
                with self._lock:
                    self.faults[fault] += 1
            if fault == "429":
                return web.json_response({"error": "slow down"}, status=429,
                                         headers={"Retry-After": self.retry_after})
            if fault == "400":
                return web.json_response({"error": "context too long"}, status=400)
            if fault == "500":
                return web.json_response({"error": "internal error"}, status=500)
            if fault == "hang":
                await asyncio.sleep(self.hang_seconds)
            if fault == "reset":
                sock = request.transport.get_extra_info("socket")
                # SO_LINGER 0: close with a TCP RST, as a crashed server would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.transport.abort()
                raise asyncio.CancelledError
            return web.json_response(self._completion(body, user, truncate=fault == "length"))
        finally:
            with self._lock:
                self.in_flight -= 1
                self.last_answer = time.time()

    def _fault(self, user: str, attempt: int) -> str | None:
        if user in self.script:
            planned = self.script[user]
            return planned[attempt - 1] if attempt <= len(planned) else None
        if not self.kinds or _unit(self.seed, "fault?", user, attempt) >= self.fault_rate:
            return None
        pick = _unit(self.seed, "kind", user, attempt)
        return self.kinds[int(pick * len(self.kinds))]

    def needed_tokens(self, user: str) -> int:
        """How many tokens the answer to ``user`` takes (deterministic)."""
        low, high = self.answer_tokens
        return low + int(_unit(self.seed, "tokens", user) * (high - low + 1))

    def answer_text(self, user: str) -> str:
        """The full answer to ``user`` (deterministic)."""
        digest = hashlib.sha256(user.encode()).hexdigest()[:16]
        return f"```python\ndef answer():\n    return {digest!r}\n```"

    def _completion(self, body: dict, user: str, truncate: bool) -> dict:
        need = self.needed_tokens(user)
        asked = int(body.get("max_tokens") or need)
        n = max(1, int(body.get("n") or 1)) if self.honour_n else 1
        truncated = truncate or asked < need
        text = self.answer_text(user)
        if truncated:
            text = text[: max(1, len(text) // 2)]
        completion = min(asked, need)
        prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        return {
            "id": "cmpl-" + hashlib.sha256(user.encode()).hexdigest()[:8],
            "object": "chat.completion", "model": body.get("model") or self.models[0],
            "choices": [{"index": i, "finish_reason": "length" if truncated else "stop",
                         "message": {"role": "assistant",
                                     "content": text if i == 0 else f"{text}\n# candidate {i}"}}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion * n,
                      "total_tokens": prompt + completion * n},
        }


def main() -> None:
    """Run one server in the foreground; prints ``port N`` once it listens."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="serve at most this many chat requests at once; queue the rest")
    args = parser.parse_args()
    server = FaultServer(port=args.port, latency=args.latency, fault_rate=args.fault_rate,
                         seed=args.seed, max_concurrent=args.max_concurrent)
    print(f"port {server.port}", flush=True)
    try:
        sys.stdin.read()  # serve until stdin closes (the parent closes it or exits)
    finally:
        server.stop()
        # what it served, for a benchmark that measures throughput at the server
        print(json.dumps({"requests": server.requests, "max_in_flight": server.max_in_flight,
                          "first_arrival": server.first_arrival,
                          "last_answer": server.last_answer}), flush=True)


if __name__ == "__main__":
    main()
