"""Request ids (AIP-155): a retried call gets the first call's answer, and changes nothing.

A request id is its caller's own, for one method, and apart from the id of what the
request made: the key (caller, method, request_id) in `idempotency_keys` points at the
resource the first call answered with, beside a hash of the request. A use case that
takes a `RequestKey` calls `replay` first in its transaction, which claims the key, and
`remember` in the same transaction as its change, which fills in the answer: a call that
fails leaves no key, so its retry runs again. Two statements per call: the claim is
also what makes a concurrent call with the same key wait (PostgreSQL holds a second
insert of a key until the first one's transaction ends). Keys are kept at least
KEPT_FOR (the sweeper purges older ones, `purge`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument
from shared.persistence.db import driver_connection, load

T = TypeVar("T")

KEPT_FOR = timedelta(hours=24)

# A key in flight in another transaction makes the claim wait until that one ends: then
# it inserts (the other rolled back) or does nothing (the other committed its answer).
_CLAIM = (
    "INSERT INTO idempotency_keys (caller_id, method, request_id, request_hash)"
    " VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (caller_id, method, request_id) DO NOTHING RETURNING request_id"
)
_EARLIER = (
    "SELECT request_hash, resource_id FROM idempotency_keys"
    " WHERE caller_id = $1 AND method = $2 AND request_id = $3"
)
_ANSWER = (
    "UPDATE idempotency_keys SET resource_type = $4, resource_id = $5"
    " WHERE caller_id = $1 AND method = $2 AND request_id = $3"
)
# One replica purges at a time, the others skip their turn: FOR UPDATE SKIP LOCKED would
# need the UPDATE the runtime role does not hold on the table.
_PURGE_TURN = text("SELECT pg_try_advisory_xact_lock(hashtextextended('request-ids:purge', 0))")
# Oldest first, a batch at a time (the index on created_at).
_PURGE = text(
    """
    DELETE FROM idempotency_keys WHERE (caller_id, method, request_id) IN (
        SELECT caller_id, method, request_id FROM idempotency_keys
        WHERE created_at < now() - make_interval(secs => :kept_s)
        ORDER BY created_at LIMIT :batch)
    """
)


@dataclass(frozen=True)
class RequestKey:
    """A request id as its caller used it: `request_hash` is the SHA-256 of the request
    without its request_id (and without a password), which a retry must match."""

    caller_id: uuid.UUID
    method: str
    request_id: uuid.UUID
    request_hash: bytes


async def replay(session: AsyncSession, key: RequestKey | None, model: type[T]) -> T | None:
    """The row of `model` the first call with `key` answered with, as it stands now; None
    for a first call (or no key), whose key this claims. Called first in the use case's
    transaction: a concurrent call with the same key waits on the claim until this one
    ends and then, under READ COMMITTED, reads the answer this one wrote. The same key
    with another request is INVALID_ARGUMENT (REQUEST_ID_REUSED); a resource deleted
    since is NOT_FOUND."""
    if key is None:
        return None
    answered = await claim(await driver_connection(session), key)
    return None if answered is None else await load(session, model, answered)


async def claim(connection: asyncpg.Connection, key: RequestKey | None) -> uuid.UUID | None:
    """`replay` on the asyncpg connection of a unit of work: the id of the resource the
    first call with `key` answered with (its caller reads it), None for a first call."""
    if key is None:
        return None
    where = (key.caller_id, key.method, key.request_id)
    if await connection.fetchval(_CLAIM, *where, key.request_hash) is not None:
        return None
    earlier = await connection.fetchrow(_EARLIER, *where)
    if earlier["request_hash"] != key.request_hash:
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )
    return earlier["resource_id"]  # None: claimed and committed unanswered, no answer to give


async def remember(
    session: AsyncSession, key: RequestKey | None, resource_type: str, resource_id: uuid.UUID
) -> None:
    """Records that the call with `key` answered with this resource, in the transaction of
    the change itself (no key: nothing)."""
    if key is not None:
        await answer(await driver_connection(session), key, resource_type, resource_id)


async def answer(
    connection: asyncpg.Connection, key: RequestKey | None, resource_type: str, resource_id
) -> None:
    """`remember` on the asyncpg connection of a unit of work."""
    if key is not None:
        where = (key.caller_id, key.method, key.request_id)
        await connection.execute(_ANSWER, *where, resource_type, resource_id)


async def purge(session: AsyncSession, batch: int) -> int:
    """Deletes up to `batch` keys older than KEPT_FOR; returns how many (0 while another
    replica's transaction is purging)."""
    if not await session.scalar(_PURGE_TURN):
        return 0
    result = await session.execute(_PURGE, {"kept_s": KEPT_FOR.total_seconds(), "batch": batch})
    return result.rowcount
