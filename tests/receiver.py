"""Real HTTP receivers for the webhook tests: an aiohttp server on a free port of 127.0.0.1
(or the port a test gives it, to be started later) that records every request and answers
with the statuses a test scripts, and a tripwire that counts the TCP connections made to it.

A receiver checks what a real one would: the signature (`Received.signed_with`, computed
here with hashlib from the DESIGN's words, not with the dispatcher's code) and that the
timestamp is recent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.harness import poll


@dataclass(frozen=True)
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def delivery(self) -> str:
        return self.headers["X-Relman-Delivery"]

    def signed_with(self, secret: str, *, fresh_s: float = 300) -> bool:
        """Whether X-Relman-Signature-256 is HMAC-SHA256(secret, timestamp "." body) and the
        timestamp is within `fresh_s` of now, as a receiver should check."""
        timestamp = self.headers.get("X-Relman-Timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > fresh_s:
            return False
        expected = hmac.new(
            secret.encode(), timestamp.encode() + b"." + self.body, hashlib.sha256
        ).hexdigest()
        return hmac.compare_digest(
            self.headers.get("X-Relman-Signature-256", ""), f"sha256={expected}"
        )


class Receiver:
    """An HTTP receiver: answers each request with the next of `statuses`, then 200.

    `gate`: when given, each request waits for it to be set before it is answered (a
    receiver stuck until the test lets it go); `delay_s`: each answer takes this long (a
    slow one). `port`: a given port (0: a free one, known once started). Usable as
    `async with Receiver(...) as receiver`, or started and stopped by hand (a receiver
    that is down, then up on the same port)."""

    def __init__(
        self,
        statuses: Iterable[int] = (),
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        gate: asyncio.Event | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.statuses = deque(statuses)
        self.host, self.port = host, port
        self.gate = gate
        self.delay_s = delay_s
        self.requests: list[Received] = []
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            Received(
                request.method, request.path, CIMultiDict(request.headers), body, time.monotonic()
            )
        )
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.statuses.popleft() if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "no")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Receiver:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def wait_for(self, count: int, within_s: float = 10) -> list[Received]:
        """The first `count` requests, once that many have arrived."""
        await poll(lambda: len(self.requests) >= count, within_s, f"{count} request(s)")
        return self.requests[:count]


class Tripwire:
    """A TCP listener that only counts the connections made to it (and closes them)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aenter__(self) -> Tripwire:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def _serve(port: int) -> None:
    """A receiver of its own process (`python -m tests.receiver`): answers 200 to every
    POST and counts them; GET /count says how many. Prints its port, then serves until
    stdin closes. The bench's receiver: in the bench's own process it would take the load
    generator's event loop and CPU."""
    import sys

    count = 0

    async def post(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(text="ok")

    async def counted(request: web.Request) -> web.Response:
        return web.Response(text=str(count))

    app = web.Application()
    app.router.add_get("/count", counted)
    app.router.add_post("/{tail:.*}", post)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    import sys

    asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
