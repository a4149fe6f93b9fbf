"""The sealed trail in bulk: the sealer's pace on rows written at once, and VerifyAuditLog
over the whole trail, each beside PostgreSQL computing the same rows' leaf hashes alone
(audit_svc.seal_store.LEAF in one statement, in one process: the share of either that
relman's Python cannot make cheaper).

The rows are written as the owner, not through the API (bench.scale's GENERATED_ROWS,
LOADERS statements at once), each row's created_at its statement's start, as the
column's default gives it; the running audit_svc seals them as it seals any row.
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg

from audit_svc.seal_store import LEAF
from bench.report import Result, at_least_figure, at_most, info
from bench.scale import GENERATED_ROWS
from bench.scenarios import LAST_SEQUENCE, Size, _settle, connected, wait_sealed
from bench.stack import Stack
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.db import libpq_dsn
from tests.harness import bearer, owner_url

LOADERS = 2  # statements writing at once: one per core of the machine the bench was made on
VERIFY_TARGET_ROWS_S = 200_000
VERIFY_DEADLINE_S = 600
PROBLEMS_SHOWN = 5
LEAVES_ALONE = f"SELECT count({LEAF}) FROM audit_logs WHERE sequence BETWEEN $1 AND $2"


async def _write(stack: Stack, rows: int) -> float:
    """Writes `rows` rows into the trail as the owner, LOADERS statements at once; returns
    the seconds it took."""
    dsn = libpq_dsn(owner_url(stack.url))
    statement = GENERATED_ROWS.format(table="audit_logs", created_at="statement_timestamp()")
    share, extra = divmod(rows, LOADERS)
    counts = [share + (n < extra) for n in range(LOADERS)]
    firsts = [sum(counts[:n]) for n in range(LOADERS)]

    async def write(first: int, count: int) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(statement, first, count)
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(write(f, c) for f, c in zip(firsts, counts, strict=True)))
    return time.perf_counter() - started


async def _leaves_alone(connection: asyncpg.Connection, first: int, last: int) -> float:
    """Seconds PostgreSQL takes to compute the leaf hashes of the rows with sequences
    first..last in one statement, without parallel workers (VerifyAuditLog reads through
    a cursor, which gets none)."""
    async with connection.transaction():
        await connection.execute("SET LOCAL max_parallel_workers_per_gather = 0")
        started = time.perf_counter()
        await connection.fetchval(LEAVES_ALONE, first, last)
        return time.perf_counter() - started


async def verify_audit_log(stack: Stack, size: Size) -> list[Result]:
    """size.rows rows written at once, the seconds until the running audit_svc has sealed
    them all (a seal holds 10,000 rows at most, a run makes 20 seals at most), then one
    VerifyAuditLog of the whole trail, timed by its caller."""
    async with connected(stack) as connection:
        await wait_sealed(connection, await connection.fetchval(LAST_SEQUENCE))
        first = await connection.fetchval(LAST_SEQUENCE) + 1
        await _write(stack, size.rows)
        last = await connection.fetchval(LAST_SEQUENCE)
        sealing_s = await wait_sealed(connection, last)
        leaves_s = await _leaves_alone(connection, first, last)
    await _settle(stack)
    stub = audit_pb2_grpc.AuditServiceStub(stack.audit_channel)
    started = time.perf_counter()
    verified = await stub.VerifyAuditLog(
        audit_pb2.VerifyAuditLogRequest(),
        metadata=bearer(stack.admin_token),
        timeout=VERIFY_DEADLINE_S,
    )
    verify_s = time.perf_counter() - started
    for problem in verified.problems[:PROBLEMS_SHOWN]:
        kind = audit_pb2.AuditIntegrityProblem.Kind.Name(problem.kind)
        print(
            f"bench: VerifyAuditLog: {kind} (seal {problem.seal_number},"
            f" sequence {problem.sequence}): {problem.detail}",
            file=sys.stderr,
        )
    leaves_rate = (last - first + 1) / leaves_s
    baseline = "(baseline: PostgreSQL's leaf hashes of the rows alone)"
    trail = f"whole trail of {verified.rows_checked:,} rows"
    return [
        info(
            f"Sealer, {size.rows:,} rows written at once: rows sealed/s {baseline}",
            size.rows / sealing_s,
            leaves_rate,
        ),
        at_least_figure(
            f"VerifyAuditLog, {trail}: rows/s {baseline}",
            verified.rows_checked / verify_s,
            VERIFY_TARGET_ROWS_S,
            "rows/s",
            leaves_rate,
        ),
        # A trail the bench wrote is intact: anything found is a fault of the sealer's
        # or the verifier's (the first few are printed above).
        at_most(f"VerifyAuditLog, {trail}: problems found", len(verified.problems), 0, "problems"),
    ]
