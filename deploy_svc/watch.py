"""Deployment changes pushed to watchers as they happen, whichever process made them
(domain layer: WatchDeployment's use case, which opens its own units of work).

Triggers send `NOTIFY relman_deployment, '<deployment id>'` on every change to a
deployment or its stages, approvals and metrics (migration 004). Each process
LISTENs on one dedicated connection outside the pool, reads a changed deployment
once for all its watchers (never once per watcher; a burst of changes during a
read costs one more read) and hands the snapshot to every watcher of it, in
order. After the connection is lost (a database restart) it reconnects
and sends every watched deployment again, so nothing missed meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg

from deploy_svc.deployments import FullDeployment, load_full_deployment
from shared.framework.errors import Unavailable
from shared.persistence.db import Database

log = logging.getLogger("relman.watch")

CHANNEL = "relman_deployment"
MAILBOX_SIZE = 64  # snapshots a slow watcher may lag behind before the oldest are dropped
RECONNECT_DELAY_S = (0.2, 0.5, 1.0, 2.0)
LISTEN_WAIT_S = 10.0


class Mailbox:
    """One watcher's queue of snapshots: bounded, the oldest dropped first."""

    def __init__(self) -> None:
        self._snapshots: collections.deque[FullDeployment] = collections.deque(maxlen=MAILBOX_SIZE)
        self._arrived = asyncio.Event()

    def put(self, snapshot: FullDeployment) -> None:
        self._snapshots.append(snapshot)
        self._arrived.set()

    async def get(self) -> FullDeployment:
        while not self._snapshots:
            self._arrived.clear()
            await self._arrived.wait()
        return self._snapshots.popleft()


class DeploymentWatcher:
    """The process's LISTEN connection and the watchers it serves."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._mailboxes: dict[uuid.UUID, set[Mailbox]] = collections.defaultdict(set)
        self._listener: asyncio.Task | None = None
        self._listening = asyncio.Event()
        self._pending: set[asyncio.Task] = set()
        # Deployments being read, and whether another change arrived meanwhile.
        self._reading: dict[uuid.UUID, bool] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, deployment_id: uuid.UUID) -> AsyncIterator[Mailbox]:
        """A mailbox for changes of one deployment, open from the moment this returns."""
        if self._listener is None:
            # A context of its own: not the first watcher's call (and its deadline).
            self._listener = asyncio.create_task(self._listen(), context=contextvars.Context())
        try:
            await asyncio.wait_for(self._listening.wait(), LISTEN_WAIT_S)
        except TimeoutError:
            raise Unavailable(
                "cannot listen for deployment changes: the database is away",
                reason="DATABASE_UNAVAILABLE",
            ) from None
        mailbox = Mailbox()
        self._mailboxes[deployment_id].add(mailbox)
        try:
            yield mailbox
        finally:
            watchers = self._mailboxes.get(deployment_id)
            if watchers is not None:
                watchers.discard(mailbox)
                if not watchers:
                    del self._mailboxes[deployment_id]

    async def read(self, deployment_id: uuid.UUID) -> FullDeployment:
        """The deployment in full, within 10 s: a fan-out runs outside any call, where no
        caller's deadline would bound it."""
        async with self.database.autocommit_connection(10) as connection:
            return await load_full_deployment(connection, deployment_id)

    def _notified(self, connection, pid, channel, payload: str) -> None:
        try:
            deployment_id = uuid.UUID(payload)
        except ValueError:
            return
        if deployment_id in self._mailboxes:
            self._fan_out_later(deployment_id)

    def _fan_out_later(self, deployment_id: uuid.UUID) -> None:
        task = asyncio.create_task(self._fan_out(deployment_id), context=contextvars.Context())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _fan_out(self, deployment_id: uuid.UUID) -> None:
        try:
            snapshot = await self.read(deployment_id)
        except Exception:
            log.warning(
                "could not read deployment %s for its watchers", deployment_id, exc_info=True
            )
            return
        for mailbox in list(self._mailboxes.get(deployment_id, ())):
            mailbox.put(snapshot)

    async def _listen(self) -> None:
        attempt = 0
        while True:
            lost = asyncio.Event()
            try:
                connection = await self.database.connect_listener()
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                delay = RECONNECT_DELAY_S[min(attempt, len(RECONNECT_DELAY_S) - 1)]
                attempt += 1
                log.warning("LISTEN connection failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            try:
                connection.add_termination_listener(lambda _, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._notified)
                if attempt:  # changes may have been missed while disconnected
                    for deployment_id in list(self._mailboxes):
                        self._fan_out_later(deployment_id)
                attempt = 0
                self._listening.set()
                await lost.wait()
                log.warning("LISTEN connection lost; reconnecting")
                attempt = 1
            finally:
                with contextlib.suppress(Exception):
                    await connection.close(timeout=2)

    async def close(self) -> None:
        tasks = [t for t in (self._listener, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
