"""The audit trail's rules (domain layer): what a caller may record, how the trail is
filtered, and the use cases that open their own unit of work.

The caller, its address and user agent come from the call (the Actor). A request
may name another user, address or user agent only with `audit.write.on_behalf`
(service and admin roles); the row still says who wrote it (`recorded_by`, the
caller) and that a client sent it (origin `client`), so it never passes for
relman's own record. Reading the trail is itself recorded (`audit.read`).
Rows are shaped by shared.persistence.audit_log; the two asyncpg writers here
(`write_rows`, `append_batch`) are the LogAction and LogActions hot paths, and
`get_audit_logs` reads ListAuditLogs' pages on asyncpg too.
"""

from __future__ import annotations

import json
import operator
import os
import re
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
from asyncpg.pgproto.pgproto import UUID as DriverUUID
from sqlalchemy import and_, bindparam, select
from sqlalchemy.dialects.postgresql import asyncpg as postgresql_asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument, PermissionDenied, missing_partition
from shared.framework.validation import canonical_ip, text
from shared.identity.actor import USER_AGENT_MAX, Actor
from shared.identity.auth import may
from shared.persistence import audit_log, pagination, resource_names
from shared.persistence.db import Database, check_same_request, driver_connection
from shared.persistence.models import AuditLog, AuditOrigin, User
from shared.persistence.pagination import PROBE_LIMIT, Page

ACTION = re.compile(r"[a-z][a-z0-9_.]{0,49}")
DETAILS_MAX_BYTES = 64 * 1024
# PostgreSQL prints a jsonb number in full (1e308: 309 digits), and the trail is read,
# exported and sealed as printed: a magnitude out of these bounds would let 64 KiB of
# details print as megabytes.
NUMBER_MIN, NUMBER_MAX = 1e-40, 1e40
# One encoder for every row: json.dumps with options builds a new one per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _details_encoder() -> Callable[[Any], str]:
    """_COMPACT_JSON.encode for a row's details, its C encoder made once: encode() makes
    one per call, which was two thirds of the 1.3 us a small details object took. No
    check for circular references: details come from a Struct, a tree."""
    make = json.encoder.c_make_encoder
    if make is None:  # no C accelerator: the encoder as it is
        return _COMPACT_JSON.encode
    encode = make(
        None, _COMPACT_JSON.default, json.encoder.c_encode_basestring, None, ":", ",",
        False, False, False,
    )  # fmt: skip
    return lambda details: "".join(encode(details, 0))


_encode_details = _details_encoder()


class Entry(NamedTuple):
    """One audit row to append, as a request gave it (already decoded from protobuf). A
    named tuple, not a frozen dataclass: a LogActions stream makes one per row, and a
    frozen dataclass took three times as long to make."""

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
    start_sequence: int | None = None  # inclusive
    end_sequence: int | None = None  # inclusive

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
    if f.start_sequence and f.end_sequence and f.start_sequence > f.end_sequence:
        raise InvalidArgument.field("filter.start_sequence", "is after filter.end_sequence")
    return f


# Each filter: the column it tests and how (migrations 005 and 009 give each an index).
_FILTER_TESTS = {
    "user_id": (AuditLog.user_id, operator.eq),
    "action": (AuditLog.action, operator.eq),
    "resource_type": (AuditLog.resource_type, operator.eq),
    "resource_id": (AuditLog.resource_id, operator.eq),
    "start_time": (AuditLog.created_at, operator.ge),
    "end_time": (AuditLog.created_at, operator.lt),
    "origin": (AuditLog.origin, operator.eq),
    "start_sequence": (AuditLog.sequence, operator.ge),
    "end_sequence": (AuditLog.sequence, operator.le),
}


def conditions(f: Filter) -> dict[str, Any]:
    """The set filters as SQL conditions on audit_logs, each served by an index: the one
    translation of a Filter, run through SQLAlchemy by ListAuditLogs and compiled into its
    COPY by the export. Each value is a bound parameter named for its filter, typed as its
    column, so a compiled form says which value goes where."""
    return {
        name: compare(column, bindparam(name, value, type_=column.type))
        for name, (column, compare) in _FILTER_TESTS.items()
        if (value := getattr(f, name)) is not None
    }


def _numbers_in_range(value: Any) -> bool:
    """Every number of a details value is 0 or of a magnitude within NUMBER_MIN and
    NUMBER_MAX (bools are not numbers)."""
    if isinstance(value, float):
        return value == 0 or NUMBER_MIN <= abs(value) < NUMBER_MAX
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return True
    for item in value:
        if isinstance(item, float):
            if not (item == 0 or NUMBER_MIN <= abs(item) < NUMBER_MAX):
                return False
        elif isinstance(item, (dict, list)) and not _numbers_in_range(item):
            return False
    return True


def check_on_behalf(actor: Actor, entry: Entry, field: str = "") -> None:
    """PERMISSION_DENIED unless the caller may name another user, address or user agent
    (`audit.write.on_behalf`), when `entry` does."""
    on_behalf = [k for k in ("user_id", "ip_address", "user_agent") if getattr(entry, k)]
    if on_behalf and not may(actor, "audit.write.on_behalf"):
        raise PermissionDenied(
            f"setting {', '.join(field + k for k in on_behalf)} needs audit.write.on_behalf",
            reason="MISSING_PERMISSION",
            metadata={"permission": "audit.write.on_behalf", "field": field + on_behalf[0]},
        )


_USER = resource_names.KINDS["user"]

# uuid.uuid4()'s version (4) and variant (RFC 4122) bits, set in a byte of a random id.
_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes(b & 0x3F | 0x80 for b in range(256))


def new_ids(count: int) -> list[uuid.UUID]:
    """`count` random UUIDs as uuid.uuid4() makes them, from one read of the system's
    random source: 0.1 us an id against uuid4()'s 1.3. Of asyncpg's own UUID type (a
    uuid.UUID), which it sends as it is."""
    data = bytearray(os.urandom(16 * count))
    data[6::16] = data[6::16].translate(_VERSION_4)
    data[8::16] = data[8::16].translate(_VARIANT_RFC_4122)
    raw = bytes(data)
    return [DriverUUID(raw[start : start + 16]) for start in range(0, len(raw), 16)]


def checked_row(
    actor: Actor, entry: Entry, field: str = "", *, names: bool = False
) -> dict[str, Any]:
    """The row `entry` asks for (audit_log.client_row), refused before any write if a field
    is bad or names someone else without the right to (check_on_behalf, checked after
    `action`). `field` prefixes the fields' names in errors (`actions[3].`).

    With `names` (LogActions, whose names the server's interceptor leaves to it) user_id
    may be `users/{username}`: the row then holds `user_name` for check_users to resolve.
    """
    return RowChecker(actor, field.replace("{", "{{").replace("}", "}}"), names=names).row(entry)


def _plain(value: str, max_length: int) -> bool:
    """Whether text() would return `value` as it is: set, not blank, short enough, no NUL."""
    return bool(value) and len(value) <= max_length and "\x00" not in value and not value.isspace()


# Actions and resource types found valid, and user ids parsed, whoever sent them: most
# rows repeat a few of each. At most _REMEMBERED of each kind, then that kind starts over.
_REMEMBERED = 4096
_valid_actions: set[str] = set()
_valid_resource_types: set[str] = set()
_parsed_user_ids: dict[str, uuid.UUID] = {}


def _remember(seen: set[str], value: str) -> None:
    if len(seen) >= _REMEMBERED:
        seen.clear()
    seen.add(value)


class RowChecker:
    """checked_row for the entries of one caller (a LogAction, or each row of a LogActions
    stream), in the same order of checks with the same errors. The caller's right to write
    on behalf of others is worked out once, and an action, resource type or user id that
    passed before is not checked again (_REMEMBERED). `fields` is the prefix of the
    fields' names in errors, with `{}` for the row's index (`actions[{}].`)."""

    def __init__(self, actor: Actor, fields: str = "", *, names: bool = False) -> None:
        self.actor = actor
        self.fields = fields
        self.names = names
        self.on_behalf = may(actor, "audit.write.on_behalf")

    def row(self, entry: Entry, index: int = 0) -> dict[str, Any]:
        actor = self.actor
        action = entry.action
        if action not in _valid_actions:
            text(f"{self._field(index)}action", action, 50, pattern=ACTION)
            _remember(_valid_actions, action)
        given_user, given_ip, given_agent = entry.user_id, entry.ip_address, entry.user_agent
        if (given_user or given_ip or given_agent) and not self.on_behalf:
            check_on_behalf(actor, entry, self._field(index))
        user_id, user_name = actor.user_id, None
        if given_user:
            user_id = _parsed_user_ids.get(given_user)
            if user_id is None:
                user_id, user_name = self._user(given_user, index)
        ip = actor.peer
        if given_ip:
            ip = canonical_ip(given_ip)
            if ip is None:
                raise InvalidArgument.field(
                    f"{self._field(index)}ip_address", "is not an IPv4 or IPv6 address"
                )
        details = entry.details
        try:
            serialized = _encode_details(details)
        except ValueError:  # NaN or infinity: not JSON
            raise self._bad_details(index, "numbers must be finite") from None
        # A character is at most 4 bytes: only a long text needs encoding to be measured.
        if (
            len(serialized) > DETAILS_MAX_BYTES // 4
            and len(serialized.encode()) > DETAILS_MAX_BYTES
        ):
            raise self._bad_details(index, f"is larger than {DETAILS_MAX_BYTES} bytes")
        if "\\u0000" in serialized or "\x00" in serialized:
            raise self._bad_details(index, "must not contain NUL characters")
        # Only a number printed with an exponent (1e-05, 1e+16) can be out of range.
        if ("e-" in serialized or "e+" in serialized) and not _numbers_in_range(details):
            raise self._bad_details(
                index,
                f"numbers must be 0 or between {NUMBER_MIN:g} and {NUMBER_MAX:g} in magnitude",
            )
        request_id = None
        if entry.request_id:
            try:
                request_id = uuid.UUID(entry.request_id)
            except ValueError:
                raise InvalidArgument.field(
                    f"{self._field(index)}request_id", "is not a UUID"
                ) from None
        resource_type = entry.resource_type
        if resource_type not in _valid_resource_types:
            text(f"{self._field(index)}resource_type", resource_type, 50)
            _remember(_valid_resource_types, resource_type)
        resource_id = entry.resource_id
        if not _plain(resource_id, 100):
            resource_id = text(f"{self._field(index)}resource_id", resource_id, 100, required=False)
        user_agent = actor.user_agent
        if given_agent:
            user_agent = given_agent
            if not _plain(given_agent, USER_AGENT_MAX):
                user_agent = text(
                    f"{self._field(index)}user_agent", given_agent, USER_AGENT_MAX, required=False
                )
        row = audit_log.client_row(
            actor,
            request_id,
            user_id,
            action,
            resource_type,
            resource_id,
            serialized,
            ip,
            user_agent,
        )
        if user_name is not None:
            row["user_name"] = user_name
        return row

    def _field(self, index: int) -> str:
        """The prefix of the row's fields' names (made only for an error or a new value)."""
        return self.fields.format(index)

    def _bad_details(self, index: int, why: str) -> InvalidArgument:
        return InvalidArgument.field(f"{self._field(index)}details", why)

    def _user(self, given: str, index: int) -> tuple[uuid.UUID | None, str | None]:
        """(user id, None) for an id, (None, username) for a user's name (with `names`)."""
        try:
            user_id = uuid.UUID(given)
        except ValueError:
            segments = _USER.parse(given) if self.names else None
            if segments is None:
                raise resource_names.not_an_id(
                    f"{self._field(index)}user_id", given, _USER
                ) from None
            (user_name,) = segments
            return None, user_name
        if len(_parsed_user_ids) >= _REMEMBERED:
            _parsed_user_ids.clear()
        _parsed_user_ids[given] = user_id
        return user_id, None


async def check_users(
    session: AsyncSession, rows: list[dict], field_of: Callable[[int], str]
) -> None:
    """Every named user exists (a failed COPY could not say which row was wrong); a row
    naming its user by username gets the user's id (one query for the batch). Only a
    caller who may write on others' behalf names users, and may learn which exist.
    An error names the fields of the last row naming that user (`field_of(index)`)."""
    named = {row["user_name"]: index for index, row in enumerate(rows) if "user_name" in row}
    if named:
        ids = dict(
            (await session.execute(select(User.username, User.id).where(User.username.in_(named))))
            .tuples()
            .all()
        )
        for username, index in named.items():
            if username not in ids:
                raise resource_names.not_found(
                    f"{field_of(index)}user_id", f"users/{username}", _USER
                )
        for row in rows:
            if "user_name" in row:
                row["user_id"] = ids[row.pop("user_name")]
    wanted = {row["user_id"]: index for index, row in enumerate(rows) if row["user_id"] is not None}
    if not wanted:
        return
    found = set(await session.scalars(select(User.id).where(User.id.in_(wanted))))
    for user_id, index in wanted.items():
        if user_id not in found:
            raise InvalidArgument.field(f"{field_of(index)}user_id", f"no user {user_id}")


# The type each column's values are sent as by write_rows, one array per column.
_SENT_AS = {
    "id": "uuid",
    "user_id": "uuid",
    "action": "text",
    "resource_type": "text",
    "resource_id": "text",
    "details": "jsonb",
    "ip_address": "text",
    "user_agent": "text",
    "origin": "text",
    "recorded_by": "uuid",
    "request_id": "uuid",
}
_SENT = (*audit_log.COLUMNS, "request_id")
_COLUMN_VALUES = operator.itemgetter(*audit_log.COLUMNS)
_COLUMN_LIST = ", ".join(audit_log.COLUMNS)
_ARRAYS = ", ".join(f"${n}::{_SENT_AS[c]}[]" for n, c in enumerate(_SENT, 1))
_ROW_ARRAYS = _ARRAYS.rsplit(", ", 1)[0]  # the columns alone, without request_id
# One statement, so one round trip and its own transaction. Rows naming a user that does
# not exist are left out; so are rows whose request id is claimed already (audit_requests'
# key: by an earlier call, or by an earlier row of this batch). Each stored row comes back
# with its creation time and the usernames of its user and of its recorder.
INSERT_NEW_ROWS = f"""
    WITH r AS (
        SELECT * FROM unnest({_ARRAYS}) AS r({_COLUMN_LIST}, request_id)
        WHERE r.user_id IS NULL OR EXISTS (SELECT FROM users u WHERE u.id = r.user_id)
    ), claimed AS (
        INSERT INTO audit_requests (request_id, audit_id)
        SELECT r.request_id, r.id FROM r WHERE r.request_id IS NOT NULL
        ON CONFLICT (request_id) DO NOTHING
        RETURNING request_id
    ), stored AS (
        INSERT INTO audit_logs ({_COLUMN_LIST})
        SELECT {_COLUMN_LIST} FROM r
        WHERE r.request_id IS NULL OR r.request_id IN (SELECT request_id FROM claimed)
        RETURNING id, created_at, user_id, recorded_by, sequence
    )
    SELECT s.id, s.created_at, u.username, rb.username, s.sequence FROM stored s
    LEFT JOIN users u ON u.id = s.user_id
    LEFT JOIN users rb ON rb.id = s.recorded_by
"""
# The same for a batch without request ids (most LogAction calls, and relman's records
# of reads): nothing to claim, so one INSERT, not three statements in one (make bench:
# LogAction calls/s, README "Performance").
INSERT_ROWS = f"""
    INSERT INTO audit_logs ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM unnest({_ROW_ARRAYS}) AS r({_COLUMN_LIST})
    WHERE r.user_id IS NULL OR EXISTS (SELECT FROM users u WHERE u.id = r.user_id)
    RETURNING id, created_at, (SELECT username FROM users u WHERE u.id = audit_logs.user_id),
              (SELECT username FROM users u WHERE u.id = audit_logs.recorded_by), sequence
"""
# The rows stored for request ids (a retry's): audit_requests names each row's month, so
# only that partition is read.
STORED_ROWS = """
    SELECT q.request_id, a.id, a.created_at, a.user_id, a.action, a.resource_type,
           a.resource_id, a.details, a.ip_address, a.user_agent, a.origin, a.recorded_by,
           a.sequence, u.username, r.username AS recorded_by_username
    FROM audit_requests q
    LEFT JOIN audit_logs a ON a.created_at = q.audit_created_at AND a.id = q.audit_id
    LEFT JOIN users u ON u.id = a.user_id
    LEFT JOIN users r ON r.id = a.recorded_by
    WHERE q.request_id = ANY($1)
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
    sequence: int


async def write_rows(connection: asyncpg.Connection, rows: Sequence[dict]) -> list[Any]:
    """Appends checked rows (the LogAction group commit's writer: LogAction rows, and
    relman's records of reads of the trail), usually in one statement.

    Apart from audit_log.append for speed: one INSERT on asyncpg for the rows of many
    calls, where one ORM transaction per call managed 467 LogAction calls/s (make
    bench; 3,600 with this statement, README "Performance").

    Returns, for each row, `(Stored, username, recorded_by_username)` or the error its
    caller gets: a user that does not exist, or a request_id reused for another request.
    A row whose request_id is already claimed is a retry: it gets the stored row.
    """
    if not rows:
        return []
    missing = [row for row in rows if row["id"] is None]
    for row, row_id in zip(missing, new_ids(len(missing)), strict=True):
        row["id"] = row_id
    keys = [row.get("request_id") or row["id"] for row in rows]
    first_of_request: dict[Any, int] = {}
    for index, key in enumerate(keys):
        first_of_request.setdefault(key, index)
    new = (
        rows if len(first_of_request) == len(rows) else [rows[i] for i in first_of_request.values()]
    )
    # One array per column (the rows' values turned around), then the request ids.
    arrays = list(zip(*map(_COLUMN_VALUES, new), strict=True))
    request_ids = [row.get("request_id") for row in new]
    if any(request_ids):
        statement = INSERT_NEW_ROWS
        arrays.append(request_ids)
    else:
        statement = INSERT_ROWS
    try:
        records = await connection.fetch(statement, *arrays)
    except asyncpg.CheckViolationError as error:
        if not missing_partition(error):
            raise
        # A month without its partition (the hourly maker is late): make it, then again.
        # If that fails too (another replica holds the maker's lock past its timeout),
        # the caller gets the missing partition (UNAVAILABLE, retry), not the maker's error.
        try:
            await audit_log.make_partitions(connection)
        except asyncpg.PostgresError:
            raise error from None
        records = await connection.fetch(statement, *arrays)
    created = {record[0]: record for record in records}
    outcomes: list[Any] = [None] * len(rows)
    left_out = {}
    for index, (row, key) in enumerate(zip(rows, keys, strict=True)):
        record = created.get(row["id"]) if first_of_request[key] == index else None
        if record is None:
            left_out[index] = row
            continue
        _, created_at, username, recorded_by_username, sequence = record
        stored = Stored(
            row["id"], created_at, row["user_id"], row["action"], row["resource_type"],
            row["resource_id"], json.loads(row["details"]), row["ip_address"],
            row["user_agent"], row["origin"], row["recorded_by"], sequence,
        )  # fmt: skip
        outcomes[index] = (stored, username, recorded_by_username)
    if left_out:
        asked = list({row["request_id"] for row in left_out.values() if row.get("request_id")})
        stored = (
            {record["request_id"]: record for record in await connection.fetch(STORED_ROWS, asked)}
            if asked
            else {}
        )
        for index, row in left_out.items():
            outcomes[index] = _retry_or_refusal(row, stored.get(row.get("request_id")))
    return outcomes


# What makes a LogAction a retry of the stored row with its id.
_SAME_REQUEST = ("action", "resource_type", "user_id", "origin", "recorded_by")


def _retry_or_refusal(row: dict, record) -> Any:
    """The outcome of a row the INSERT left out: its request id was claimed, or its user
    is unknown.

    A claimed request id is a retry only if the same caller sent the same request:
    another caller's id is REQUEST_ID_REUSED, never that row handed back with its user,
    address and details."""
    if record is None:  # not claimed: the INSERT left it out for its user
        return InvalidArgument.field("user_id", f"no user {row['user_id']}")
    if record["id"] is None:  # claimed, its row gone (retention, its month detached)
        return InvalidArgument.field(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )
    earlier = Stored(**{k: record[k] for k in Stored._fields})  # the jsonb codec decodes details
    try:
        check_same_request(earlier, {k: row[k] for k in _SAME_REQUEST})
    except InvalidArgument as error:
        return error
    return earlier, record["username"], record["recorded_by_username"]


# LogActions rows with request ids: claimed and stored in one statement, so that the
# claim's audit_created_at is its row's created_at (both the statement's start). A claimed
# id fails the stream: 23505 on pk_audit_requests (ALREADY_EXISTS).
INSERT_CLAIMED_ROWS = f"""
    WITH r AS (
        SELECT * FROM unnest({_ARRAYS}) AS r({_COLUMN_LIST}, request_id)
    ), claimed AS (
        INSERT INTO audit_requests (request_id, audit_id) SELECT r.request_id, r.id FROM r
    )
    INSERT INTO audit_logs ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM r
"""


async def append_batch(session: AsyncSession, rows: list[dict]) -> None:
    """COPYs checked rows (audit_log.client_row) into audit_logs inside the session's
    transaction (LogActions).

    Apart from audit_log.append for speed: a COPY on the driver connection takes a
    batch of thousands of rows in one message. The ids are made here, all at once
    (new_ids): made by PostgreSQL (gen_random_uuid()) they cost it 3.3 us a row, a
    quarter of its COPY. Rows with request ids go in with their claims
    (INSERT_CLAIMED_ROWS)."""
    driver = await driver_connection(session)
    for row, row_id in zip(rows, new_ids(len(rows)), strict=True):
        row["id"] = row_id
    asked = [row for row in rows if row["request_id"] is not None]
    new = [row for row in rows if row["request_id"] is None] if asked else rows
    if new:
        # Each record made as the COPY takes it: gone before the next, not thousands
        # for the collector to walk until the COPY ends.
        await driver.copy_records_to_table(
            "audit_logs", columns=audit_log.COLUMNS, records=map(_COLUMN_VALUES, new)
        )
    if asked:
        await driver.execute(INSERT_CLAIMED_ROWS, *([row.get(c) for row in asked] for c in _SENT))


async def log_actions(
    database: Database,
    actor: Actor,
    batches: AsyncIterable[Iterable[Entry]],
    before_commit: Callable[[], Awaitable[Any]],
) -> int:
    """LogActions: every row of the stream or none; returns how many were stored.

    Each batch is checked and COPYed as it arrives, in one transaction that commits only
    after the last batch and after `before_commit` (the transport's last word: a call
    cancelled by then is rolled back). A bad row fails the stream naming its position.
    """
    count = 0
    fields = "actions[{}]."
    check = RowChecker(actor, fields, names=True).row
    async with database.transaction() as session:
        async for entries in batches:
            rows = [check(entry, index) for index, entry in enumerate(entries, count)]
            await check_users(
                session, rows, lambda index, first=count: fields.format(first + index)
            )
            if rows:
                await append_batch(session, rows)
            count += len(rows)
        await before_commit()
    return count


# ListAuditLogs' statements for each shape of request (the filters set, whether a page
# token bounds the page), built once. The filters are the conditions() every read of the
# trail applies, compiled with $n parameters; each value stays a parameter.
_DIALECT = postgresql_asyncpg.dialect()
_LISTED = ", ".join(f"audit_logs.{name}" for name in Stored._fields)
_LIST_STATEMENTS: dict[tuple[tuple[str, ...], bool], _ListStatements] = {}


class _ListStatements(NamedTuple):
    # The page with its rows' usernames and the first count of total_size, in one
    # statement (one plan, one round trip, one snapshot), always one row at least: $1..$n
    # the filters' values, then the token's (created_at, id) if any, then the limit.
    page: str
    # The planner's estimate of the matches ($1..$n), past pagination.PROBE_LIMIT only.
    estimate: str
    # The matches up to a bound ($1..$n, then bound + 1), when the estimate is low.
    count: str
    names: tuple[str, ...]  # the filters whose values fill $1..$n, in order


def _list_statements(f: Filter, after: bool) -> _ListStatements:
    shape = (tuple(name for name, value in vars(f).items() if value is not None), after)
    built = _LIST_STATEMENTS.get(shape)
    if built is None:
        built = _LIST_STATEMENTS[shape] = _build_list_statements(f, after)
    return built


def _build_list_statements(f: Filter, after: bool) -> _ListStatements:
    tests = list(conditions(f).values())
    where, names = [], ()
    if tests:
        compiled = and_(*tests).compile(dialect=_DIALECT)
        where, names = [str(compiled)], tuple(compiled.positiontup)
    n = len(names)
    page_where = where
    if after:
        # The plain bound on created_at, implied by the row comparison, lets the planner
        # skip every month after the token's (pagination.paginate's). Both come before the
        # filters: with end_time's bound first, the descending index scan began at end_time,
        # not at the token (a time range six months deep read 655 index pages, not 5).
        page_where = [
            f"(audit_logs.created_at, audit_logs.id) < (${n + 1}::timestamptz, ${n + 2}::uuid)"
            f" AND audit_logs.created_at <= ${n + 1}::timestamptz",
            *where,
        ]
    matching, on_page = _rows_where(where), _rows_where(page_where)
    # The limit stays a parameter, as the ORM sent it: planned for each call (a custom
    # plan), as a value the planner knows. Written into the text, it let PostgreSQL reuse
    # one plan for every value (a generic plan), which saved the planning but took the
    # primary key's order for a rare value (resource_type alone, 2,000,000 rows: 0.7 s).
    limit = f"${n + 3 if after else n + 1}::integer"
    page = f"""
        SELECT {", ".join(f"page.{name}" for name in Stored._fields)},
               (SELECT u.username FROM users u WHERE u.id = page.user_id),
               (SELECT u.username FROM users u WHERE u.id = page.recorded_by),
               probe.n
        FROM (SELECT count(*) AS n FROM (SELECT 1 {matching} LIMIT {PROBE_LIMIT + 1}) AS m)
             AS probe
        LEFT JOIN (SELECT {_LISTED} {on_page}
                   ORDER BY audit_logs.created_at DESC, audit_logs.id DESC LIMIT {limit})
             AS page ON true
        ORDER BY page.created_at DESC, page.id DESC
    """
    return _ListStatements(
        page,
        f"EXPLAIN (FORMAT JSON) SELECT {_LISTED} {matching}",
        f"SELECT count(*) FROM (SELECT 1 {matching} LIMIT ${n + 1}::integer) AS m",
        names,
    )


def _rows_where(tests: list[str]) -> str:
    return " WHERE ".join(["FROM audit_logs", " AND ".join(tests)]) if tests else "FROM audit_logs"


async def get_audit_logs(
    database: Database, f: Filter, page_size: int, page_token: str
) -> tuple[Page, dict[uuid.UUID, str]]:
    """A page of the trail, newest first, with the usernames of its rows' users and
    recorders; total_size as pagination.total_size gives it (exact up to
    EXACT_TOTAL_LIMIT, else the planner's estimate), page tokens as list_page's.

    On the asyncpg connection itself, in one statement, and a second past PROBE_LIMIT
    matches (the estimate): four statements through the ORM, each planned across the
    monthly partitions, and their Python were most of a call (README "Performance")."""
    size = pagination.page_size(page_size)
    described = f.describe()  # list_page's fingerprint: every filter set, as text
    statements = _list_statements(f, bool(page_token))
    values = [getattr(f, name) for name in statements.names]
    args = [*values, *pagination.decode_token(page_token, described)] if page_token else values
    async with database.replica_read_connection() as connection:
        records = await connection.fetch(statements.page, *args, size + 1)

        async def estimate() -> int:
            return pagination.planned_rows(await connection.fetchval(statements.estimate, *values))

        async def count_up_to(limit: int) -> int:
            return await connection.fetchval(statements.count, *values, limit + 1)

        total = await pagination.total_after_probe(records[0][-1], estimate, count_up_to)
    if records[0][0] is None:  # no row: the probe's alone
        return Page([], "", total), {}
    rows, usernames = [], {}
    for record in records[:size]:
        row = Stored(*record[:_FIELDS])
        rows.append(row)
        if record[_FIELDS] is not None:
            usernames[row.user_id] = record[_FIELDS]
        if record[_FIELDS + 1] is not None:
            usernames[row.recorded_by] = record[_FIELDS + 1]
    next_token = ""
    if len(records) > size:
        last = rows[-1]
        next_token = pagination.encode_token(last.created_at, last.id, described)
    return Page(rows, next_token, total), usernames


_FIELDS = len(Stored._fields)


def read_row(actor: Actor, action: str, f: Filter, extra: dict[str, Any] | None = None) -> dict:
    """The row recording that `actor` read the trail (`audit.read`, `audit.export`): relman's
    own, written by the group commit like a LogAction row (write_rows)."""
    details = _COMPACT_JSON.encode({"filter": f.describe(), **(extra or {})})
    return audit_log.relman_row(actor, action, "audit_log", None, details)
