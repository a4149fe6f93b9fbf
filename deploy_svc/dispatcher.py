"""The webhook dispatcher (domain layer): a background task of every deploy_svc process.
(Being built.)"""

from __future__ import annotations

import asyncio
import contextlib

from shared.framework.config import Settings
from shared.persistence.db import Database


async def dispatch_forever(database: Database, settings: Settings) -> None:
    await asyncio.Event().wait()


def start(database: Database, settings: Settings):
    """Starts the dispatcher; returns the coroutine function that stops it."""
    task = asyncio.create_task(dispatch_forever(database, settings))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
