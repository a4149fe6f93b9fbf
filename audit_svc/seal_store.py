"""The seals' SQL (persistence layer): the sealer's horizon, the rows' leaf hashes as the
database computes them, and audit_seals' reads and writes, on asyncpg connections.

The leaf hash is computed by PostgreSQL from the same text the export prints for each
cell (audit_svc.export's utc_text, details::text, a NULL as the empty string), so a leaf
computed here equals the one audit_svc.sealing computes from a raw CSV export: the
sealer, VerifyAuditLog and the offline verifier agree by construction (and by test).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from audit_svc.export import utc_text
from audit_svc.sealing import ROW_FIELDS, Seal, SealableRow

# Each encoded field's text, as the export's cell.
_FIELD_TEXT = {
    "sequence": "sequence::text",
    "id": "id::text",
    "created_at": utc_text("created_at"),
    "user_id": "user_id::text",
    "action": "action",
    "resource_type": "resource_type",
    "resource_id": "resource_id",
    "details": "details::text",
    "ip_address": "ip_address",
    "user_agent": "user_agent",
    "origin": "origin",
    "recorded_by": "recorded_by::text",
}


def _field(expression: str) -> str:
    value = f"convert_to(coalesce({expression}, ''), 'UTF8')"
    return f"int4send(octet_length({value})) || {value}"


# SHA-256(0x00 || the row's canonical encoding): audit_svc.sealing.leaf_hash, in SQL.
LEAF = "sha256('\\x00'::bytea || " + " || ".join(_field(_FIELD_TEXT[f]) for f in ROW_FIELDS) + ")"

# The last sequence value handed out (0: none yet); then a new transaction id of its own
# (its own transaction, committed at once): every transaction that took a value by then
# got its id earlier (migration 009's assign_xid), so below this one; once no transaction
# of this database below it is running (OLDEST_RUNNING_HERE), all of them have ended.
# (A snapshot's xmax would not do: it is the newest *completed* id + 1, and a transaction
# newer than all completed ones is below no xmax and in no snapshot's list of running ones.)
LAST_SEQUENCE = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM audit_logs_sequence"
NEW_XID = "SELECT pg_current_xact_id()::text::bigint"
# The oldest transaction of this database still running (else every id below the
# snapshot's xmax has ended). Transaction ids are the server's: the snapshot's own xmin
# would wait for a transaction left open in any other database of the server too. Every
# running id below an id taken earlier (NEW_XID, committed) is in the snapshot's list;
# those of this database's sessions (and of its prepared transactions) count.
OLDEST_RUNNING_HERE = """
    SELECT coalesce(
        (SELECT min(x::text::bigint) FROM pg_snapshot_xip(s) AS x
         WHERE xid(x) IN (SELECT backend_xid FROM pg_stat_activity
                          WHERE datname = current_database() AND backend_xid IS NOT NULL
                          UNION ALL
                          SELECT transaction FROM pg_prepared_xacts
                          WHERE database = current_database())),
        pg_snapshot_xmax(s)::text::bigint)
    FROM pg_current_snapshot() AS s
"""
# How long the oldest committed row not sealed yet has waited (None: every row is sealed).
UNSEALED_AGE = """
    SELECT extract(epoch FROM clock_timestamp() - a.created_at)::float8 FROM audit_logs a
    WHERE a.sequence > coalesce(
        (SELECT last_sequence FROM audit_seals ORDER BY seal_number DESC LIMIT 1), 0)
    ORDER BY a.sequence LIMIT 1
"""
# The session of this database whose transaction is the oldest one running (what holds
# sealing back when it lags).
OLDEST_WRITER = """
    SELECT pid, usename, application_name, xact_start FROM pg_stat_activity
    WHERE datname = current_database() AND backend_xid IS NOT NULL
    ORDER BY age(backend_xid) DESC LIMIT 1
"""
# One sealer at a time across replicas: a transaction-level lock, free at commit.
TRY_SEALER_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('relman_audit_sealer'))"

_SEAL_COLUMNS = (
    "seal_number, first_sequence, last_sequence, row_count, root_hash, row_digests,"
    " previous_seal_hash, seal_hash, key_id, signature, sealed_at, oldest_created_at,"
    " newest_created_at"
)
LAST_SEAL = f"""
    SELECT {_SEAL_COLUMNS},
           -- never later than now: seals' times are not signed (seal_follows refuses a
           -- future one; this holds even for one written around the trigger)
           least((SELECT max(newest_created_at) FROM audit_seals), clock_timestamp())
               AS newest_sealed
    FROM audit_seals ORDER BY seal_number DESC LIMIT 1
"""
# LEAF over a subquery that gives each field's bytes once (`<field>_bytes`): LEAF names
# each field twice, for its length and for itself (4.0 -> 3.2 us of the database's CPU
# a row sealed, measured on 100,000 rows).
_FIELD_BYTES = ", ".join(
    f"convert_to(coalesce({_FIELD_TEXT[f]}, ''), 'UTF8') AS {f}_bytes" for f in ROW_FIELDS
)
_LEAF_OF_BYTES = (
    "sha256('\\x00'::bytea || "
    + " || ".join(f"int4send(octet_length({f}_bytes)) || {f}_bytes" for f in ROW_FIELDS)
    + ")"
)
# In sequence order from the index, never after a sort of the range. Rows sharing a
# sequence (only the owner can write one) come in any order: a check matches them by
# their digests (sealing.check_rows).
SEALABLE_ROWS = f"""
    SELECT sequence, created_at, {_LEAF_OF_BYTES} FROM (
        SELECT sequence, created_at, {_FIELD_BYTES} FROM audit_logs
        WHERE sequence > $1 AND sequence <= $2
        ORDER BY sequence LIMIT $3
    ) AS fields
    ORDER BY sequence
"""
INSERT_SEAL = f"""
    INSERT INTO audit_seals ({_SEAL_COLUMNS})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
"""
# Up to $2 seals from $1 on, and no more once their row_digests pass $3 bytes (the first
# always comes): a page of seals of 10,000 rows each stays far below a message's limit.
SEALS_FROM = f"""
    SELECT {_SEAL_COLUMNS} FROM (
        SELECT *, sum(octet_length(row_digests)) OVER (ORDER BY seal_number) AS digest_bytes
        FROM audit_seals WHERE seal_number >= $1 ORDER BY seal_number LIMIT $2
    ) page
    WHERE digest_bytes - octet_length(row_digests) < $3 OR seal_number = $1
    ORDER BY seal_number
"""
SEAL = f"SELECT {_SEAL_COLUMNS} FROM audit_seals WHERE seal_number = $1"
# The first and last seal holding a row created in [start, end): a seal's rows' times span
# [oldest_created_at, newest_created_at] (signed). Every seal between them is checked too,
# so that the chain is checked without a hole.
SEALS_IN_WINDOW = """
    SELECT min(seal_number), max(seal_number) FROM audit_seals
    WHERE ($1::timestamptz IS NULL OR newest_created_at >= $1)
      AND ($2::timestamptz IS NULL OR oldest_created_at < $2)
"""
SEAL_EXISTS = "SELECT EXISTS (SELECT FROM audit_seals WHERE seal_number = $1)"
LEAVES = f"""
    SELECT sequence, {LEAF} FROM audit_logs
    WHERE sequence >= $1 AND sequence <= $2 ORDER BY sequence
"""


def seal_of(record) -> Seal:
    return Seal(**{name: record[name] for name in Seal.__dataclass_fields__})


async def last_sequence(connection: asyncpg.Connection) -> int:
    """The last sequence value handed out (0: none yet)."""
    return await connection.fetchval(LAST_SEQUENCE)


async def new_xid(connection: asyncpg.Connection) -> int:
    """A transaction id of its own, committed at once (outside any transaction): every
    transaction that took a sequence value before this call is below it."""
    return await connection.fetchval(NEW_XID)


async def oldest_running_here(connection: asyncpg.Connection) -> int:
    """The oldest transaction of this database still running, as of now (or, when none
    is, the id every ended transaction is below)."""
    return await connection.fetchval(OLDEST_RUNNING_HERE)


async def unsealed_age(connection: asyncpg.Connection) -> float:
    return await connection.fetchval(UNSEALED_AGE) or 0.0


async def oldest_writer(connection: asyncpg.Connection) -> str:
    record = await connection.fetchrow(OLDEST_WRITER)
    if record is None:
        return "none"
    return (
        f"pid {record['pid']} ({record['usename']}, {record['application_name']!r},"
        f" in a transaction since {record['xact_start']})"
    )


async def try_sealer_lock(connection: asyncpg.Connection) -> bool:
    return await connection.fetchval(TRY_SEALER_LOCK)


async def last_seal(connection: asyncpg.Connection) -> tuple[Seal | None, datetime | None]:
    """The newest seal and the newest created_at of all sealed rows (None, None: no seal
    yet)."""
    record = await connection.fetchrow(LAST_SEAL)
    if record is None:
        return None, None
    return seal_of(record), record["newest_sealed"]


async def sealable_rows(
    connection: asyncpg.Connection, after: int, up_to: int, limit: int
) -> list[SealableRow]:
    return list(map(SealableRow._make, await connection.fetch(SEALABLE_ROWS, after, up_to, limit)))


async def insert_seal(connection: asyncpg.Connection, seal: Seal) -> None:
    await connection.execute(
        INSERT_SEAL, *(getattr(seal, name) for name in Seal.__dataclass_fields__)
    )


async def seals_from(
    connection: asyncpg.Connection, start: int, limit: int, max_digest_bytes: int
) -> list[Seal]:
    records = await connection.fetch(SEALS_FROM, start, limit, max_digest_bytes)
    return [seal_of(r) for r in records]


async def seal(connection: asyncpg.Connection, seal_number: int) -> Seal | None:
    record = await connection.fetchrow(SEAL, seal_number)
    return None if record is None else seal_of(record)


async def seals_in_window(
    connection: asyncpg.Connection, start: datetime | None, end: datetime | None
) -> tuple[int | None, int | None]:
    """The numbers of the first and last seal of the window (None, None: no seal)."""
    return tuple(await connection.fetchrow(SEALS_IN_WINDOW, start, end))


async def seal_exists(connection: asyncpg.Connection, seal_number: int) -> bool:
    return await connection.fetchval(SEAL_EXISTS, seal_number)


async def leaves(connection: asyncpg.Connection, first: int, last: int) -> list:
    """(sequence, leaf hash) of the rows with sequences first..last, in order."""
    return await connection.fetch(LEAVES, first, last)
