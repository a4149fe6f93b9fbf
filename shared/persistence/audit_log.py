"""The shape of an audit row, and `append`, the writer of relman's own (persistence layer).

Every writer of audit_logs sets the columns in COLUMNS (created_at is the
database's: the services' role may not set it) from a row built here, so who
wrote it is never left to the writer: `relman_row` for relman's own records
(origin `relman`), `client_row` for what a client sent (origin `client`); both
are recorded by the caller. The writers:

- `append` (here): one row inside the caller's transaction, so a change and its
  audit record commit or roll back together (both services' use cases);
- audit_svc.trail.write_rows: the LogAction group commit, one INSERT on asyncpg (also
  the retention command's rows, on its own connection);
- audit_svc.trail.append_batch: LogActions, COPY on asyncpg.

The last two are apart from `append` for speed (their docstrings say how much).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.identity.actor import Actor
from shared.persistence.db import driver_connection
from shared.persistence.models import AuditOrigin

# The columns a writer sets, in the order of the asyncpg writers' statements.
COLUMNS = (
    "id",
    "user_id",
    "action",
    "resource_type",
    "resource_id",
    "details",
    "ip_address",
    "user_agent",
    "origin",
    "recorded_by",
)

# The types of COLUMNS, for parameters sent as text (asyncpg then needs no codec for
# jsonb, and the ids come as the text an Actor may hold them in).
_KINDS = ("uuid", "uuid", "text", "text", "text", "jsonb", "text", "text", "text", "uuid")


def text_values(first: int) -> str:
    """COLUMNS' values as parameters from $`first` on, each sent as text (`as_text`)."""
    return ", ".join(f"${n}::text::{kind}" for n, kind in enumerate(_KINDS, first))


def as_text(row: dict[str, Any]) -> list[str | None]:
    """A row of relman_row (its details already JSON text), as text_values takes it."""
    return [None if row[column] is None else str(row[column]) for column in COLUMNS]


# Built once: plain SQL on the unit of work's asyncpg connection, not an ORM or Core
# INSERT built or compiled per call (both showed in the profile of every write RPC).
_APPEND = f"INSERT INTO audit_logs ({', '.join(COLUMNS)}) VALUES ({text_values(1)}) RETURNING id"


def relman_row(
    actor: Actor,
    action: str,
    resource_type: str,
    resource_id: uuid.UUID | str | None = None,
    details: Any = None,
) -> dict[str, Any]:
    """relman's own record that `actor` did `action`: the caller's user, address and user
    agent, recorded by the caller (None for anonymous calls: a failed login, a refused
    call without a valid token, the command lines, the stage sweeper). `details` comes
    as its writer sends it: a dict through SQLAlchemy, JSON text on asyncpg."""
    return {
        "id": uuid.uuid4(),
        "user_id": actor.user_id,
        "action": action,
        "resource_type": resource_type,
        "resource_id": None if resource_id is None else str(resource_id),
        "details": {} if details is None else details,
        "ip_address": actor.peer,
        "user_agent": actor.user_agent,
        "origin": AuditOrigin.RELMAN.value,
        "recorded_by": actor.user_id,
    }


def client_row(
    actor: Actor,
    request_id: uuid.UUID | None,
    user_id: uuid.UUID | None,
    action: str,
    resource_type: str,
    resource_id: str | None,
    details: str,
    ip_address: str | None,
    user_agent: str | None,
) -> dict[str, Any]:
    """A row a client sent (LogAction, LogActions), its values already checked: whoever
    it names as the user, it is recorded by the caller with origin `client`, so it never
    passes for relman's own record. Its id is made where it is written; `request_id`
    (not a column: audit_requests holds it) makes a retry find the row it stored."""
    return {
        "id": None,
        "request_id": request_id,
        "user_id": user_id,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "details": details,
        "ip_address": ip_address,
        "user_agent": user_agent,
        "origin": AuditOrigin.CLIENT.value,
        "recorded_by": actor.user_id,
    }


# How many months past the current one keep a partition ready (services at start-up and
# hourly; a write refused for want of one makes them at once).
PARTITIONS_AHEAD = 2


async def make_partitions(connection: asyncpg.Connection) -> int:
    """Makes the partitions of audit_logs missing from this month to PARTITIONS_AHEAD
    months on (migration 008's SECURITY DEFINER function: the services' role may create
    no table itself); returns how many it made."""
    return await connection.fetchval("SELECT relman_audit_partitions_ahead($1)", PARTITIONS_AHEAD)


async def make_months(session: AsyncSession, moments: list[datetime]) -> None:
    """Makes the partitions of the months of `moments` that are missing, as the owner
    (the seed, tests loading a past trail): the services' role may not."""
    months = sorted({moment.astimezone(UTC).date().replace(day=1) for moment in moments})
    for month in months:
        await session.execute(text("SELECT relman_audit_make_partition(:month)"), {"month": month})


# Months after the current one whose partition is attached (the gauge: a WARNING below 1).
_MONTHS_AHEAD = """
    SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'audit_logs'::regclass AND NOT i.inhdetachpending
      AND c.relname > 'audit_logs_' || to_char(now() AT TIME ZONE 'UTC', '"y"YYYY"m"MM')
"""


async def months_ahead(connection: asyncpg.Connection) -> int:
    """How many months after this one have their partition of audit_logs ready."""
    return await connection.fetchval(_MONTHS_AHEAD)


async def append(
    session: AsyncSession,
    actor: Actor,
    action: str,
    resource_type: str,
    resource_id: uuid.UUID | str | None = None,
    details: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Appends relman's record that `actor` did `action` to a resource, in the session's
    transaction, as plain SQL on its asyncpg connection; returns its id."""
    connection = await driver_connection(session)
    details_text = json.dumps(details or {}, separators=(",", ":"))
    row = relman_row(actor, action, resource_type, resource_id, details_text)
    return await connection.fetchval(_APPEND, *as_text(row))
