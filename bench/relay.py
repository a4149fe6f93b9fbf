"""A TCP relay that counts the bytes a server sends back: what a call costs on the wire.

A gRPC client decompresses what it receives before the caller sees it, so only the
bytes on the connection tell whether a response was compressed, and by how much.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class Relay:
    """A relay listening on 127.0.0.1:`port`; `downstream_bytes` came from the server."""

    port: int
    downstream_bytes: int = 0


@contextlib.asynccontextmanager
async def relay_to(host: str, port: int) -> AsyncIterator[Relay]:
    """A relay to host:port for the block's duration; its connections end with it."""
    pipes: set[asyncio.Task] = set()

    async def pipe(reader, writer, counted: Relay | None) -> None:
        try:
            while data := await reader.read(1 << 16):
                if counted is not None:
                    counted.downstream_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def accept(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, port)
        for task in (
            asyncio.create_task(pipe(client_reader, server_writer, None)),
            asyncio.create_task(pipe(server_reader, client_writer, relay)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    listener = await asyncio.start_server(accept, "127.0.0.1", 0)
    relay = Relay(listener.sockets[0].getsockname()[1])
    try:
        yield relay
    finally:
        listener.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await listener.wait_closed()
