"""Request ids (AIP-155): a retried call gets the first call's answer, and changes nothing.

A request id is its caller's own, for one method, and apart from the id of what the
request made: the key (caller, method, request_id) in `idempotency_keys` points at the
resource the first call answered with, beside a hash of the request. A use case that
takes a `RequestKey` calls `replay` first in its transaction and `remember` in the same
transaction as its change: a call that fails leaves no key, so its retry runs again.
Keys are kept at least KEPT_FOR (the sweeper purges older ones, `purge`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import bindparam, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument
from shared.persistence.db import load
from shared.persistence.models import IdempotencyKey

T = TypeVar("T")

KEPT_FOR = timedelta(hours=24)

_KEYS = IdempotencyKey.__table__
# Transaction-scoped: a second call with the same key waits until the first one ends.
_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_EARLIER = select(_KEYS.c.request_hash, _KEYS.c.resource_id).where(
    _KEYS.c.caller_id == bindparam("caller_id"),
    _KEYS.c.method == bindparam("method"),
    _KEYS.c.request_id == bindparam("request_id"),
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
    for a first call (or no key). Called first in the use case's transaction: it takes a
    lock on the key, so that a concurrent call with the same key runs after this one
    ends and, under READ COMMITTED, sees the key this one wrote. The same key with
    another request is INVALID_ARGUMENT (REQUEST_ID_REUSED); a resource deleted since is
    NOT_FOUND."""
    if key is None:
        return None
    await session.execute(_LOCK, {"key": f"request:{key.caller_id}:{key.method}:{key.request_id}"})
    where = {"caller_id": key.caller_id, "method": key.method, "request_id": key.request_id}
    earlier = (await session.execute(_EARLIER, where)).one_or_none()
    if earlier is None:
        return None
    if earlier.request_hash != key.request_hash:
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )
    return await load(session, model, earlier.resource_id)


async def remember(
    session: AsyncSession, key: RequestKey | None, resource_type: str, resource_id: uuid.UUID
) -> None:
    """Records that the call with `key` answered with this resource, in the transaction of
    the change itself (no key: nothing)."""
    if key is None:
        return
    await session.execute(
        insert(_KEYS).values(
            caller_id=key.caller_id,
            method=key.method,
            request_id=key.request_id,
            request_hash=key.request_hash,
            resource_type=resource_type,
            resource_id=resource_id,
        )
    )


async def purge(session: AsyncSession, batch: int) -> int:
    """Deletes up to `batch` keys older than KEPT_FOR; returns how many (0 while another
    replica's transaction is purging)."""
    if not await session.scalar(_PURGE_TURN):
        return 0
    result = await session.execute(_PURGE, {"kept_s": KEPT_FOR.total_seconds(), "batch": batch})
    return result.rowcount
