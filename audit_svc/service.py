"""The audit trail (domain layer; the seed's AuditService: log_action, get_audit_logs, and
export_audit_logs_csv, now a stream in audit_svc.export).

The caller, its address and user agent come from the call (the Actor). A request
may name another user, address or user agent only with `audit.write.on_behalf`
(service and admin roles); the row still says who wrote it (`recorded_by`, the
caller) and that a client sent it (origin `client`), so it never passes for
relman's own record. Reading the trail is itself recorded (`audit.read`).
"""

from __future__ import annotations

import json
import operator
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument, PermissionDenied
from shared.framework.validation import canonical_ip, text
from shared.identity.actor import USER_AGENT_MAX, Actor
from shared.identity.auth import may
from shared.persistence.db import check_same_request, driver_connection
from shared.persistence.models import AuditLog, AuditOrigin, User
from shared.persistence.pagination import Page, list_page

ACTION = re.compile(r"[a-z][a-z0-9_.]{0,49}")
DETAILS_MAX_BYTES = 64 * 1024
# One encoder for every row: json.dumps with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Entry:
    """One audit row to append, as a request gave it (already decoded from protobuf)."""

    action: str
    resource_type: str
    resource_id: str
    details: dict[str, Any]
    user_id: str
    ip_address: str
    user_agent: str
    request_id: str


@dataclass(frozen=True)
class Filter:
    user_id: uuid.UUID | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    start_time: datetime | None = None  # inclusive
    end_time: datetime | None = None  # exclusive
    origin: AuditOrigin | None = None

    def describe(self) -> dict[str, str]:
        """The filters that are set, as audit details and as the page token's fingerprint."""
        return {
            k: str(v) if not isinstance(v, datetime) else v.isoformat()
            for k, v in self.__dict__.items()
            if v is not None
        }


def check_filter(f: Filter) -> Filter:
    text("filter.action", f.action or "", 50, required=False, pattern=ACTION)
    text("filter.resource_type", f.resource_type or "", 50, required=False)
    text("filter.resource_id", f.resource_id or "", 100, required=False)
    if f.start_time and f.end_time and f.start_time > f.end_time:
        raise InvalidArgument.field("filter.start_time", "is after filter.end_time")
    return f


def conditions(f: Filter) -> dict[str, Any]:
    """The set filters as SQL conditions on audit_logs, each served by an index (migration 005)."""
    every = {
        "user_id": lambda: AuditLog.user_id == f.user_id,
        "action": lambda: AuditLog.action == f.action,
        "resource_type": lambda: AuditLog.resource_type == f.resource_type,
        "resource_id": lambda: AuditLog.resource_id == f.resource_id,
        "start_time": lambda: AuditLog.created_at >= f.start_time,
        "end_time": lambda: AuditLog.created_at < f.end_time,
        "origin": lambda: AuditLog.origin == f.origin,
    }
    return {name: every[name]() for name in f.describe()}


def validate(actor: Actor, entry: Entry, field: str = "") -> dict[str, Any]:
    """The row `entry` asks for, as column values; refuses anything bad before a write.

    The row is a client's (origin `client`) recorded by the caller, whoever it names as
    the user: no request field sets either, so a row written on behalf of someone can
    always be told from relman's own record of what they did."""

    def name(part: str) -> str:
        return f"{field}{part}"

    text(name("action"), entry.action, 50, pattern=ACTION)
    on_behalf = {
        k: getattr(entry, k) for k in ("user_id", "ip_address", "user_agent") if getattr(entry, k)
    }
    if on_behalf and not may(actor, "audit.write.on_behalf"):
        raise PermissionDenied(
            f"setting {', '.join(name(k) for k in on_behalf)} needs audit.write.on_behalf",
            reason="MISSING_PERMISSION",
            metadata={"permission": "audit.write.on_behalf", "field": name(next(iter(on_behalf)))},
        )
    user_id = actor.user_id
    if entry.user_id:
        try:
            user_id = uuid.UUID(entry.user_id)
        except ValueError:
            raise InvalidArgument.field(name("user_id"), "is not a UUID") from None
    ip = actor.peer
    if entry.ip_address:
        ip = canonical_ip(entry.ip_address)
        if ip is None:
            raise InvalidArgument.field(name("ip_address"), "is not an IPv4 or IPv6 address")
    try:
        serialized = _COMPACT_JSON.encode(entry.details)
    except ValueError:  # NaN or infinity: not JSON
        raise InvalidArgument.field(name("details"), "numbers must be finite") from None
    if len(serialized.encode()) > DETAILS_MAX_BYTES:
        raise InvalidArgument.field(name("details"), f"is larger than {DETAILS_MAX_BYTES} bytes")
    if "\\u0000" in serialized or "\x00" in serialized:
        raise InvalidArgument.field(name("details"), "must not contain NUL characters")
    row_id = None  # a new row's id is made where it is written, many at a time
    if entry.request_id:
        try:
            row_id = uuid.UUID(entry.request_id)
        except ValueError:
            raise InvalidArgument.field(name("request_id"), "is not a UUID") from None
    return {
        "id": row_id,
        "user_id": user_id,
        "action": entry.action,
        "resource_type": text(name("resource_type"), entry.resource_type, 50),
        "resource_id": text(name("resource_id"), entry.resource_id, 100, required=False),
        "details": serialized,
        "ip_address": ip,
        "user_agent": (
            text(name("user_agent"), entry.user_agent, USER_AGENT_MAX, required=False)
            if entry.user_agent
            else actor.user_agent
        ),
        "origin": AuditOrigin.CLIENT.value,
        "recorded_by": actor.user_id,
    }


async def check_users(session: AsyncSession, rows: Iterable[tuple[str, dict]]) -> None:
    """Every named user exists (a failed COPY could not say which row was wrong)."""
    wanted = {row["user_id"]: field for field, row in rows if row["user_id"] is not None}
    if not wanted:
        return
    found = set(await session.scalars(select(User.id).where(User.id.in_(wanted))))
    for user_id, field in wanted.items():
        if user_id not in found:
            raise InvalidArgument.field(f"{field}user_id", f"no user {user_id}")


# One statement, so one round trip and its own transaction: rows naming a user that
# does not exist and rows whose id is taken are left out, and each row comes back
# with its creation time and the usernames of its user and of its recorder.
INSERT_NEW_ROWS = """
    INSERT INTO audit_logs
        (id, user_id, action, resource_type, resource_id, details, ip_address, user_agent,
         origin, recorded_by)
    SELECT r.* FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                           $6::jsonb[], $7::text[], $8::text[], $9::text[], $10::uuid[])
        AS r(id, user_id, action, resource_type, resource_id, details, ip_address, user_agent,
             origin, recorded_by)
    WHERE r.user_id IS NULL OR EXISTS (SELECT FROM users u WHERE u.id = r.user_id)
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at, (SELECT username FROM users u WHERE u.id = audit_logs.user_id),
              (SELECT username FROM users u WHERE u.id = audit_logs.recorded_by)
"""
STORED_ROWS = """
    SELECT a.id, a.created_at, a.user_id, a.action, a.resource_type, a.resource_id, a.details,
           a.ip_address, a.user_agent, a.origin, a.recorded_by, u.username,
           r.username AS recorded_by_username
    FROM audit_logs a
    LEFT JOIN users u ON u.id = a.user_id
    LEFT JOIN users r ON r.id = a.recorded_by
    WHERE a.id = ANY($1)
"""


class Stored(NamedTuple):
    """An audit row as stored (the fields the API returns)."""

    id: uuid.UUID
    created_at: datetime
    user_id: uuid.UUID | None
    action: str
    resource_type: str
    resource_id: str | None
    details: dict[str, Any]
    ip_address: str | None
    user_agent: str | None
    origin: str | None
    recorded_by: uuid.UUID | None


async def write_rows(connection: asyncpg.Connection, rows: Sequence[dict]) -> list[Any]:
    """Appends validated rows (the LogAction group commit's writer), usually in one
    statement.

    Returns, for each row, `(Stored, username, recorded_by_username)` or the error its
    caller gets: a user that does not exist, or a request_id reused for another request.
    A row whose id (request_id) is already stored is a retry: it gets the stored row.
    """
    for row in rows:
        if row["id"] is None:
            row["id"] = uuid.uuid4()
    first_of_id: dict[uuid.UUID, int] = {}
    for index, row in enumerate(rows):
        first_of_id.setdefault(row["id"], index)
    new = [rows[index] for index in first_of_id.values()]
    created = {
        record[0]: record
        for record in await connection.fetch(
            INSERT_NEW_ROWS, *([row[c] for row in new] for c in COPY_COLUMNS)
        )
    }
    outcomes: list[Any] = [None] * len(rows)
    left_out = {}
    for index, row in enumerate(rows):
        if first_of_id[row["id"]] == index and row["id"] in created:
            _, created_at, username, recorded_by_username = created[row["id"]]
            details = json.loads(row["details"])
            outcomes[index] = (
                Stored(**{**row, "details": details}, created_at=created_at),
                username,
                recorded_by_username,
            )
        else:
            left_out[index] = row
    if left_out:
        stored = {
            record["id"]: record
            for record in await connection.fetch(
                STORED_ROWS, list({row["id"] for row in left_out.values()})
            )
        }
        for index, row in left_out.items():
            outcomes[index] = _retry_or_refusal(row, stored.get(row["id"]))
    return outcomes


def _retry_or_refusal(row: dict, record) -> Any:
    """The outcome of a row the INSERT left out: its id was taken, or its user is unknown."""
    if record is None:
        return InvalidArgument.field("user_id", f"no user {row['user_id']}")
    earlier = Stored(**{k: record[k] for k in Stored._fields})  # the jsonb codec decodes details
    try:
        check_same_request(earlier, {k: row[k] for k in ("action", "resource_type")})
    except InvalidArgument as error:
        return error
    return earlier, record["username"], record["recorded_by_username"]


COPY_COLUMNS = (
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


async def append_batch(session: AsyncSession, rows: list[dict]) -> None:
    """COPYs validated rows into audit_logs inside the session's transaction."""
    driver = await driver_connection(session)
    given = [row for row in rows if row["id"] is not None]  # rows sent with a request_id
    new = [row for row in rows if row["id"] is None] if given else rows
    # Without an id column PostgreSQL makes the ids (gen_random_uuid()): no uuid4() per row here.
    for batch, columns in ((given, COPY_COLUMNS), (new, COPY_COLUMNS[1:])):
        if batch:
            values = operator.itemgetter(*columns)
            await driver.copy_records_to_table(
                "audit_logs", columns=columns, records=[values(row) for row in batch]
            )


async def get_audit_logs(
    session: AsyncSession, f: Filter, page_size: int, page_token: str
) -> tuple[Page, dict[uuid.UUID, str]]:
    """A page of the trail, newest first, with the usernames of its rows' users and
    recorders."""
    described = f.describe()
    page = await list_page(
        session,
        AuditLog,
        page_size=page_size,
        page_token=page_token,
        where={name: (described[name], condition) for name, condition in conditions(f).items()},
    )
    user_ids = {row.user_id for row in page.items} | {row.recorded_by for row in page.items}
    user_ids.discard(None)
    usernames = (
        dict(
            (
                await session.execute(select(User.id, User.username).where(User.id.in_(user_ids)))
            ).all()
        )
        if user_ids
        else {}
    )
    return page, usernames


def read_row(actor: Actor, action: str, f: Filter, extra: dict[str, Any] | None = None) -> dict:
    """The row recording that `actor` read the trail (`audit.read`, `audit.export`), to be
    written like a LogAction row (write_rows) but relman's own (origin `relman`)."""
    return {
        "id": None,
        "user_id": actor.user_id,
        "action": action,
        "resource_type": "audit_log",
        "resource_id": None,
        "details": _COMPACT_JSON.encode({"filter": f.describe(), **(extra or {})}),
        "ip_address": actor.peer,
        "user_agent": actor.user_agent,
        "origin": AuditOrigin.RELMAN.value,
        "recorded_by": actor.user_id,
    }
