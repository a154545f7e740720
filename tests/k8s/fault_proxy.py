"""A fault-injecting HTTP proxy in front of the Kubernetes API emulator.

The launcher talks to the proxy; the fake controller talks to the emulator directly, so
only the launcher meets the faults, as it would meet a flaky API server, a restarting
control plane or a load balancer dropping connections. Which request fails is a pure
function of its kind and how many of that kind came before (no randomness, no clock):

- lists (GET without ``watch``) of Jobs and pods: the 2nd, 5th, 8th, ... fail, cycling
  through 500, 429 (with Retry-After: 0) and a connection reset (TCP RST);
- watches: the 2nd, 4th, 6th, ... are cut after their first chunk (an event may be half
  sent), the 3rd, 7th, 11th, ... answer 503 before any data;
- everything else (creates, gets, deletes, logs, leases) passes untouched.

``faults`` counts what was injected, so a test can prove each kind happened.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from typing import Any

LIST_FAULTS = ("500", "429", "reset")


class FaultProxy:
    """The proxy on a free port of 127.0.0.1, served from a background event loop."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")

    # -- which request fails --------------------------------------------------------------
    def _kind(self, request: Any) -> str | None:
        path, query = request.path, request.query
        if request.method != "GET" or not (path.endswith("/jobs") or path.endswith("/pods")):
            return None
        return "watch" if query.get("watch") in ("true", "1", "True") else "list"

    def _fault(self, kind: str | None) -> str | None:
        if kind is None:
            return None
        with self._lock:
            self._seen[kind] += 1
            n = self._seen[kind]
        if kind == "list" and n % 3 == 2:
            return LIST_FAULTS[(n // 3) % len(LIST_FAULTS)]
        if kind == "watch" and n % 2 == 0:
            return "cut"
        if kind == "watch" and n % 4 == 3:
            return "503"
        return None

    # -- serving --------------------------------------------------------------------------
    def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, web

        async def handle(request: web.Request) -> web.StreamResponse:
            fault = self._fault(self._kind(request))
            if fault:
                with self._lock:
                    self.faults[fault] += 1
            if fault in ("500", "503", "429"):
                return web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "message": f"injected {fault}", "code": int(fault)},
                    status=int(fault), headers={"Retry-After": "0"} if fault == "429" else {})
            if fault == "reset":
                _reset(request)
            body = await request.read()
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length")}
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             data=body or None, headers=headers) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    "Content-Type": upstream.headers.get("Content-Type", "application/json")})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                    if fault == "cut":
                        _reset(request)
                await response.write_eof()
                return response

        async def main() -> None:
            self._session = ClientSession(timeout=ClientTimeout(total=None))
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await self._session.close()
            await runner.cleanup()

        asyncio.run(main())

    def client(self):
        from trackb_core.k8s.client import for_host

        return for_host(self.url)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


def _reset(request: Any) -> None:
    """Drop the connection with a TCP RST, as a crashed server or proxy would."""
    sock = request.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()
    raise asyncio.CancelledError
