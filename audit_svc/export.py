"""The export of the audit trail (domain layer): one `COPY (query) TO STDOUT`, streamed.

PostgreSQL builds the whole CSV (RFC 4180, header, ISO 8601 UTC times, details
as JSON text) in one consistent snapshot, oldest first; JSON Lines are the same
records, one `json_build_object` of the same cells per line (details as an object).
The query orders by the table's columns `audit_logs.created_at, audit_logs.id`, never
by the formatted column of the same name, so rows flow from the (created_at, id) index at once
instead of after a sort of everything. Chunks are passed on as they come, gathered to
about 64 KiB at row boundaries; the COPY waits while the client reads, so memory
stays flat for any row count. A cancelled call ends the query at once (its
connection is closed, not returned to the pool).

Text cells that a spreadsheet would run as a formula (starting with = + - @,
tab or CR) get a leading ' unless `raw` is asked for. The filter is the one
ListAuditLogs applies (audit_svc.trail.conditions), compiled into the query.

An export whose reader takes nothing for EXPORT_READER_IDLE_S is ended by the
servicer (audit_svc.servicer), which closes this stream and so its connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sqlalchemy import and_
from sqlalchemy.dialects.postgresql import asyncpg as postgresql_asyncpg

from audit_svc.trail import Filter, conditions
from shared.persistence.db import Database, time_left

CHUNK_BYTES = 64 * 1024
NEUTRALIZED = ("username", "action", "resource_type", "resource_id", "user_agent")
FORMULA_START = r"^[=+\-@\t\r]"
# The dialect of the engine (asyncpg): $n parameters, as the COPY takes them.
_DIALECT = postgresql_asyncpg.dialect()
CSV = "csv"
JSONL = "jsonl"
# How COPY writes each format. JSON Lines go in CSV mode with a quote (\x01) and a
# delimiter (\x02) that JSON text always escapes: no line is ever quoted, each is the
# object itself (COPY's text mode would double every backslash).
_COPY_OPTIONS = {
    CSV: {"format": "csv", "header": True},
    JSONL: {"format": "csv", "header": False, "quote": "\x01", "delimiter": "\x02"},
}
# (format, raw, the filters set) -> the COPY's SELECT and the filters whose values fill
# its $n, in order: built once for each of the 512 shapes a request can take, not per
# export.
_QUERIES: dict[tuple[str, bool, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}


def export_query(f: Filter, raw: bool, form: str = CSV) -> tuple[str, list]:
    """The COPY's SELECT with $n parameters for the filters, and their values."""
    shape = (form, raw, tuple(name for name, value in vars(f).items() if value is not None))
    built = _QUERIES.get(shape)
    if built is None:
        built = _QUERIES[shape] = _build_query(f, raw, form)
    query, names = built
    return query, [getattr(f, name) for name in names]


def _cell(column: str, expression: str, raw: bool) -> str:
    """A text cell, with a leading ' where a spreadsheet would run it as a formula."""
    if raw or column not in NEUTRALIZED:
        return expression
    return (
        f"CASE WHEN {expression} ~ '{FORMULA_START}' THEN '''' || {expression}"
        f" ELSE {expression} END"
    )


# The export's fields: the CSV header, and the keys of each JSON Lines object, in order.
HEADER = (
    "id",
    "created_at",
    "user_id",
    "username",
    "action",
    "resource_type",
    "resource_id",
    "details",
    "ip_address",
    "user_agent",
    "origin",
    "recorded_by",
    "sequence",
)


def utc_text(expression: str) -> str:
    """A timestamptz as the export writes it: RFC 3339 in UTC, microseconds, `Z`."""
    return f"""to_char({expression} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


def _build_query(f: Filter, raw: bool, form: str) -> tuple[str, tuple[str, ...]]:
    # Each field's SQL; audit_logs is not aliased: the compiled conditions name the table.
    # details is JSON text in CSV, an object in JSON Lines.
    sql_of = {
        "id": "audit_logs.id",
        "created_at": utc_text("audit_logs.created_at"),
        "user_id": "audit_logs.user_id",
        "username": _cell("username", "u.username", raw),
        "action": _cell("action", "audit_logs.action", raw),
        "resource_type": _cell("resource_type", "audit_logs.resource_type", raw),
        "resource_id": _cell("resource_id", "audit_logs.resource_id", raw),
        "details": "audit_logs.details::text" if form == CSV else "audit_logs.details",
        "ip_address": "audit_logs.ip_address",
        "user_agent": _cell("user_agent", "audit_logs.user_agent", raw),
        # Set by relman only (`relman` or `client`, and the caller's id): never a formula.
        "origin": "audit_logs.origin",
        "recorded_by": "audit_logs.recorded_by",
        # The row's place in the sealed order (audit_svc.sealing): the offline verifier's key.
        "sequence": "audit_logs.sequence",
    }
    columns = [(name, sql_of[name]) for name in HEADER]
    if form == CSV:
        selected = ", ".join(f"{sql} AS {name}" for name, sql in columns)
    else:
        pairs = ", ".join(f"'{name}', {sql}" for name, sql in columns)
        selected = f"json_build_object({pairs})::text"
    query = f"SELECT {selected} FROM audit_logs LEFT JOIN users u ON u.id = audit_logs.user_id"
    names: tuple[str, ...] = ()
    tests = list(conditions(f).values())
    if tests:
        where = and_(*tests).compile(dialect=_DIALECT)
        query += f" WHERE {where}"
        names = tuple(where.positiontup)
    # The table's columns, not the formatted created_at: an index walk, no sort.
    return query + " ORDER BY audit_logs.created_at, audit_logs.id", names


async def export_audit_logs(
    database: Database, f: Filter, raw: bool, form: str = CSV
) -> AsyncIterator[str]:
    """The filtered trail as CSV or JSON Lines text chunks cut at record boundaries; opens
    its own connection and transaction (one snapshot), held for the stream's life."""
    query, args = export_query(f, raw, form)
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)  # backpressure on the COPY

    async def sink(data: bytes) -> None:
        await pieces.put(data)

    # A range of seals (by sequence) is exported from the primary, whose seals it is
    # checked against: a lagging replica would leave the newest rows out.
    by_sequence = f.start_sequence is not None or f.end_sequence is not None
    connection = await (database.engine.connect() if by_sequence else database.replica_connection())
    try:
        raw_connection = (await connection.get_raw_connection()).driver_connection
        await connection.begin()
        # The call's deadline bounds the COPY; without one, an export of any size may run
        # past the connection's statement timeout (0: none).
        deadline_s = time_left()
        timeout_ms = 0 if deadline_s is None else max(1, int(deadline_s * 1000))
        await connection.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")
        # Rows must flow in index order from the first one: with stale statistics (right
        # after a bulk load) the planner may prefer reading everything and sorting it,
        # which holds the first row back for seconds (make bench, 1M rows: 1.3 s).
        await connection.exec_driver_sql("SET LOCAL enable_sort = off")

        async def copy() -> None:
            await raw_connection.copy_from_query(query, *args, output=sink, **_COPY_OPTIONS[form])
            await pieces.put(None)

        producer = asyncio.create_task(copy())
        buffered: list[bytes] = []
        size = 0
        try:
            while True:
                piece = await _next(pieces, producer)
                if piece is None:
                    break
                buffered.append(piece)
                size += len(piece)
                if size >= CHUNK_BYTES:
                    yield b"".join(buffered).decode()
                    buffered, size = [], 0
            if buffered:
                yield b"".join(buffered).decode()
            await producer
            await connection.commit()
        except BaseException:
            # Interrupted (the caller left, a deadline, an error) while the server may
            # still be sending: close the socket at once and drop the connection. A
            # polite close waits for the COPY to wind down, which a paused reader never
            # sees (tests/faults: the connection and the call's task held for > 10 s).
            raw_connection.terminate()
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await connection.invalidate()
            raise
    finally:
        await connection.close()


async def _next(pieces: asyncio.Queue, producer: asyncio.Task) -> bytes | None:
    """The next piece, or the COPY's error if it failed before sending its end."""
    getter = asyncio.ensure_future(pieces.get())
    try:
        done, _ = await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the call ended: no task left waiting on the queue (a leak)
        getter.cancel()
        raise
    if getter in done:
        return getter.result()
    getter.cancel()
    producer.result()  # raises the COPY's error
    return await pieces.get()  # it finished: its last pieces and the end mark are queued


if __name__ == "__main__":  # the command line's old home: say where it went, fail loudly
    raise SystemExit("python -m audit_svc.export moved: run python -m audit_svc.export_cli")
