"""Fault 4: the client goes away (cancels, or its deadline passes) mid-export and
mid-watch, or reads an export very slowly.

What a process holds comes from its SIGUSR1 state line (calls in flight, asyncio
tasks, pooled connections in use) and from pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import asyncpg

from relman.v1 import audit_pb2, audit_pb2_grpc, deploy_pb2
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, Client
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.load import settled
from tests.harness import RelmanProcess, bearer

EXPORT_ROWS = 300_000


async def _audit_rows(db: asyncpg.Connection, count: int) -> str:
    """Inserts `count` audit rows (straight into the table: set-up, not the API under
    test); returns the resource_id they share."""
    tag = uuid.uuid4().hex
    await db.execute(
        "INSERT INTO audit_logs (action, resource_type, resource_id, details)"
        " SELECT 'fault.bulk', 'fault', $1, '{\"n\": 1}' FROM generate_series(1, $2)",
        tag,
        count,
    )
    return tag


async def _busy_backends(db: asyncpg.Connection, application: str) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state <> 'idle'",
        application,
    )


def _rss_bytes(process: RelmanProcess) -> int:
    with open(f"/proc/{process.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_cancelled_and_expired_exports_and_watches_free_what_they_held(
    fault_db, fault_tokens, fault_report
):
    db = await asyncpg.connect(libpq_dsn(fault_db))
    tag = await _audit_rows(db, EXPORT_ROWS)
    service_id = await new_service_id(fault_db)
    outcomes = []
    try:
        async with services(fault_db) as running:
            lead = Client(running.deploy_channel, fault_tokens["lena"])
            release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
            deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
            audit = audit_pb2_grpc.AuditServiceStub(running.audit_channel)
            request = audit_pb2.ExportAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(resource_id=tag)
            )
            auth = bearer(fault_tokens["lena"])
            # Warm: every path once, so that what is created once per process exists.
            async for _ in audit.ExportAuditLogs(
                audit_pb2.ExportAuditLogsRequest(
                    filter=audit_pb2.AuditLogFilter(resource_id="none")
                ),
                metadata=auth,
            ):
                pass
            watch = lead.stub.WatchDeployment(
                deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id), metadata=lead.auth
            )
            await watch.read()
            watch.cancel()
            audit_tasks = await settled(running.audit)
            deploy_tasks = await settled(running.deploy)

            for how in ("cancelled", "deadline"):
                call = audit.ExportAuditLogs(
                    request, metadata=auth, timeout=1.0 if how == "deadline" else None
                )
                await call.read()  # the export is under way: COPY running, first chunk out
                assert await _busy_backends(db, "audit_svc") == 1
                if how == "cancelled":
                    call.cancel()
                # else: read no more; the deadline passes while the server waits to send.
                code = await call.code()
                await settled(running.audit, audit_tasks)
                await until_no_busy_backend(db, "audit_svc")
                outcomes.append(f"export {how}: {code.name}, freed")

                watch = lead.stub.WatchDeployment(
                    deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
                    metadata=lead.auth,
                    timeout=1.0 if how == "deadline" else None,
                )
                await watch.read()
                if how == "cancelled":
                    watch.cancel()
                code = await watch.code()
                await settled(running.deploy, deploy_tasks)
                outcomes.append(f"watch {how}: {code.name}, freed")
            assert_no_internal_errors(running)
    finally:
        await db.close()
    assert outcomes == [
        "export cancelled: CANCELLED, freed",
        "watch cancelled: CANCELLED, freed",
        "export deadline: DEADLINE_EXCEEDED, freed",
        "watch deadline: DEADLINE_EXCEEDED, freed",
    ]
    fault_report(
        f"export of {EXPORT_ROWS:,} rows and a watch, each cancelled and each past its "
        f"deadline mid-stream: {'; '.join(outcomes)} (calls in flight, tasks and pooled "
        "connections back to their level before; no busy backend left)"
    )


async def until_no_busy_backend(db: asyncpg.Connection, application: str) -> None:
    async with asyncio.timeout(10):
        while await _busy_backends(db, application):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_very_slow_export_reader_holds_memory_flat(fault_db, fault_tokens, fault_report):
    db = await asyncpg.connect(libpq_dsn(fault_db))
    tag = await _audit_rows(db, EXPORT_ROWS)
    await db.close()
    async with services(fault_db) as running:
        audit = audit_pb2_grpc.AuditServiceStub(running.audit_channel)
        reader_auth = bearer(fault_tokens["lena"])
        writer_auth = bearer(fault_tokens["ci-bot"])

        async def log_action_latencies(n: int) -> list[float]:
            latencies = []
            for _ in range(n):
                started = time.perf_counter()
                await audit.LogAction(
                    audit_pb2.LogActionRequest(action="fault.slow_reader", resource_type="fault"),
                    metadata=writer_auth,
                    timeout=5,
                )
                latencies.append(time.perf_counter() - started)
            return latencies

        quiet = await log_action_latencies(200)
        call = audit.ExportAuditLogs(
            audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id=tag)),
            metadata=reader_auth,
        )
        await call.read()
        rss_start = rss_peak = _rss_bytes(running.audit)
        read = 1
        busy: list[float] = []
        stop_at = time.monotonic() + 3
        while time.monotonic() < stop_at:
            # One message every 50 ms (about 1.3 MB/s), LogAction calls in between.
            busy += await log_action_latencies(5)
            await asyncio.sleep(0.05)  # the slow reader's pace, not a wait for state
            await call.read()
            read += 1
            rss_peak = max(rss_peak, _rss_bytes(running.audit))
        call.cancel()
        assert_no_internal_errors(running)
    growth_mb = (rss_peak - rss_start) / 2**20
    p99 = lambda xs: statistics.quantiles(xs, n=100)[98] * 1000  # noqa: E731
    assert growth_mb < 16, growth_mb
    # Reported, not asserted: how much the reader slows others is a timing goal, measured
    # against a same-run baseline by `make bench` (log_action_beside_slow_export).
    fault_report(
        f"export of {EXPORT_ROWS:,} rows read at one 64 KiB message per 50 ms for 3 s "
        f"({read} messages): audit_svc RSS +{growth_mb:.1f} MB; LogAction p99 "
        f"{p99(quiet):.1f} ms quiet, {p99(busy):.1f} ms beside the slow reader"
    )
