"""Fault 5: far more concurrent calls than pooled connections (DB_POOL_SIZE=10)."""

from __future__ import annotations

import asyncio
import collections
import time

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, Client
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.load import settled
from tests.harness import bearer

CONCURRENT = 500
POOL_SIZE = 10
DEADLINE_S = 1.0


async def _outcome(call) -> tuple[str, float]:
    started = time.monotonic()
    try:
        await call
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    return code, time.monotonic() - started


async def _wait_for_lock_waiters(db: asyncpg.Connection, count: int) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'deploy_svc' AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(15):
        while await db.fetchval(query) != count:  # noqa: ASYNC110 - polling the server
            await asyncio.sleep(0.02)


async def test_500_concurrent_calls_on_a_pool_of_10_queue_or_fail_within_deadline(
    fault_db, fault_tokens, fault_report
):
    service_id = await new_service_id(fault_db)
    blocked_services = [await new_service_id(fault_db) for _ in range(POOL_SIZE)]
    db = await asyncpg.connect(libpq_dsn(fault_db))
    async with services(fault_db, DB_POOL_SIZE=str(POOL_SIZE)) as running:
        lead = Client(running.deploy_channel, fault_tokens["lena"], timeout_s=30)
        audit = audit_pb2_grpc.AuditServiceStub(running.audit_channel)
        health = {
            name: health_pb2_grpc.HealthStub(channel)
            for name, channel in (
                ("relman.v1.DeployService", running.deploy_channel),
                ("relman.v1.AuditService", running.audit_channel),
            )
        }
        release = await lead.CreateRelease(service_id=service_id, version="0.0.1")

        # 1. 500 calls at once on each service: they queue for the 10 connections.
        deploy_calls = [
            lead.GetRelease(release_id=release.id)
            if i % 5
            else lead.CreateRelease(service_id=service_id, version=f"1.{i}.0")
            for i in range(CONCURRENT)
        ]
        audit_calls = [
            audit.LogAction(
                audit_pb2.LogActionRequest(action="fault.pool", resource_type="fault"),
                metadata=bearer(fault_tokens["ci-bot"]),
                timeout=30,
            )
            for _ in range(CONCURRENT)
        ]
        started = time.monotonic()
        queued = await asyncio.gather(*map(_outcome, deploy_calls + audit_calls))
        queued_s = time.monotonic() - started
        queued_codes = collections.Counter(code for code, _ in queued)

        # 2. Every connection held by a transaction waiting on a lock the test holds:
        # calls with a 1 s deadline wait for a connection and give up in time.
        locker = await asyncpg.connect(libpq_dsn(fault_db))
        releases = [
            await lead.CreateRelease(service_id=s, version="1.0.0") for s in blocked_services
        ]
        await locker.execute("BEGIN")
        await locker.execute(
            "SELECT FROM releases WHERE id = ANY($1::uuid[]) FOR UPDATE", [r.id for r in releases]
        )
        holders = [
            asyncio.create_task(lead.PromoteRelease(release_id=r.id, target_environment_id=DEV))
            for r in releases
        ]
        await _wait_for_lock_waiters(db, POOL_SIZE)
        hurried = Client(running.deploy_channel, fault_tokens["lena"], timeout_s=DEADLINE_S)
        starved = await asyncio.gather(
            *(_outcome(hurried.GetRelease(release_id=release.id)) for _ in range(100))
        )
        readiness = [
            (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status
            for name, stub in health.items()
        ]
        await locker.close()
        held = await asyncio.gather(*holders)
        after = await lead.GetRelease(release_id=release.id)
        await settled(running.deploy, None)
        assert_no_internal_errors(running)
    await db.close()

    assert queued_codes == {"OK": 2 * CONCURRENT}, queued_codes
    starved_codes = collections.Counter(code for code, _ in starved)
    assert set(starved_codes) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, starved_codes
    slowest = max(seconds for _, seconds in starved)
    assert slowest < DEADLINE_S + 0.5
    assert readiness == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert all(deployment.id for deployment in held) and after.id == release.id
    fault_report(
        f"{CONCURRENT} concurrent calls on each service, pools of {POOL_SIZE}: all OK in "
        f"{queued_s:.1f} s; with every deploy_svc connection held by a blocked transaction, "
        f"100 calls with a {DEADLINE_S:.0f} s deadline: {dict(starved_codes)}, the slowest "
        f"after {slowest:.2f} s; readiness stayed SERVING; the 10 blocked calls completed "
        "OK once the lock went; nothing left in flight after"
    )
