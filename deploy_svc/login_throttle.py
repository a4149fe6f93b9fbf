"""Failed logins throttled per (username, peer) and per peer, shared by every replica.

Without it a guesser tries passwords as fast as bcrypt allows, and an unauthenticated
flood queues bcrypt without bound and writes an audit row per attempt. Each key
(`user:<username>|<peer>`, `peer:<peer>`) allows a number of failures in a fixed window
that starts at its first failure; beyond that, Login answers RESOURCE_EXHAUSTED with the
time left, before any bcrypt. Successes count against nothing, and reset their
(username, peer) pair. The first refused attempt of a window writes one
`login_throttled` audit row; the rest only count in `login_throttle.throttled`.

Counts live in the database (`login_throttle`), so replicas share them. Within a
process the logins of one peer run one at a time (`one_at_a_time`), so that a burst
of concurrent guesses is checked against the failures before it instead of all
passing the check together: bcrypt runs one check at a time anyway. At most
WAITING_PER_PEER_MAX more wait behind it; beyond that LOGIN_BUSY at once, so one
address (an insider looping logins of their own account, which are never throttled)
cannot hold the whole process's password-check queue.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import case, delete, func, literal, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import ResourceExhausted
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.models import LoginThrottle

LOCAL_PEER = "local"  # calls over a Unix socket have no address
# Logins of one peer that may wait behind the one being checked: enough for an office
# behind one NAT address and for `make bench`'s 8 looping callers, few enough that the
# last waits seconds, not minutes. One peer never holds more than one place of the
# process's queue, however many wait.
WAITING_PER_PEER_MAX = 8
_TABLE = LoginThrottle.__table__
_ROW = _TABLE.c


@dataclass(frozen=True)
class LoginLimits:
    per_user: int  # failures per (username, peer) in one window
    per_peer: int  # failures per peer in one window, whatever the usernames
    window_s: int
    queue_max: int  # password checks queued or running in one process


def _peer(actor: Actor) -> str:
    """Whom an attempt counts against: the caller's address, or for a global IPv6 address
    its /64, which one client holds whole and could walk through address by address."""
    if actor.peer is None:
        return LOCAL_PEER
    address = ipaddress.ip_address(actor.peer)
    if address.version == 6 and address.is_global:
        return str(ipaddress.ip_network((address, 64), strict=False))
    return actor.peer


def _keys(username: str, actor: Actor, limits: LoginLimits) -> dict[str, int]:
    """The keys an attempt counts against and their limits, in lock order."""
    peer = _peer(actor)
    return {f"peer:{peer}": limits.per_peer, f"user:{username}|{peer}": limits.per_user}


def busy() -> ResourceExhausted:
    """The answer to a login refused for want of room, before any work (no audit row)."""
    return ResourceExhausted(
        "too many logins are being checked; retry shortly",
        reason="LOGIN_BUSY",
        retry_after_s=1.0,
    )


class PeerQueue:
    """In-process: one login at a time per peer, at most WAITING_PER_PEER_MAX waiting
    (beyond: LOGIN_BUSY at once); holds no lock for idle peers."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @asynccontextmanager
    async def one_at_a_time(self, actor: Actor) -> AsyncIterator[None]:
        peer = _peer(actor)
        if self._holders.get(peer, 0) > WAITING_PER_PEER_MAX:  # one checked, the rest waiting
            raise busy()
        lock = self._locks.setdefault(peer, asyncio.Lock())
        self._holders[peer] = self._holders.get(peer, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[peer] -= 1
            if not self._holders[peer]:
                del self._holders[peer], self._locks[peer]


async def refusal(
    session: AsyncSession, actor: Actor, username: str, limits: LoginLimits
) -> ResourceExhausted | None:
    """None while every key is under its limit; else the refusal to raise once this
    transaction has committed its bookkeeping (the count, the window's one audit row)."""
    keys = _keys(username, actor, limits)
    window = timedelta(seconds=limits.window_s)
    limit = case(*((_ROW.key == key, key_limit) for key, key_limit in keys.items()), else_=None)
    refused = (
        await session.execute(
            update(_TABLE)
            .where(
                _ROW.key.in_(keys),
                _ROW.window_start > func.now() - literal(window),
                _ROW.failures >= limit,
            )
            .values(throttled=_ROW.throttled + 1)
            .returning(_ROW.key, _ROW.throttled, _ROW.failures, _ROW.window_start, func.now())
        )
    ).all()
    for key, throttled, failures, window_start, _ in refused:
        if throttled == 1:  # the window's first refusal: its one audit row
            # resource_id is the peer (at most 45 characters): the key holds the username,
            # up to 100, and would not fit the column's 100.
            await audit_log.append(
                session,
                actor,
                "login_throttled",
                "login_throttle",
                _peer(actor),
                {
                    "key": key,
                    "username": username,
                    "failures": failures,
                    "limit": keys[key],
                    "window_start": window_start.isoformat(),
                    "window_end": (window_start + window).isoformat(),
                },
            )
    if not refused:
        return None
    retry_after = max(start + window - now for _, _, _, start, now in refused)
    return ResourceExhausted(
        "too many failed logins; retry later",
        reason="LOGIN_THROTTLED",
        metadata={"window_s": limits.window_s},
        retry_after_s=retry_after.total_seconds(),
    )


async def failed(session: AsyncSession, actor: Actor, username: str, limits: LoginLimits):
    """Counts a failure against each key; a window that has ended starts again with it."""
    window = literal(timedelta(seconds=limits.window_s))
    for key in _keys(username, actor, limits):
        ended = _ROW.window_start <= func.now() - window
        await session.execute(
            insert(_TABLE)
            .values(key=key, window_start=func.now(), failures=1, throttled=0)
            .on_conflict_do_update(
                index_elements=[_ROW.key],
                set_={
                    "window_start": case((ended, func.now()), else_=_ROW.window_start),
                    "failures": case((ended, 1), else_=_ROW.failures + 1),
                    "throttled": case((ended, 0), else_=_ROW.throttled),
                },
            )
        )


async def succeeded(session: AsyncSession, actor: Actor, username: str, limits: LoginLimits):
    """A success resets its (username, peer) pair (the peer's count stays)."""
    user_key = next(key for key in _keys(username, actor, limits) if key.startswith("user:"))
    await session.execute(delete(_TABLE).where(_ROW.key == user_key))
