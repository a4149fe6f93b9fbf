"""Faults 2 and 3: a process killed (SIGKILL) mid-call, and stopped (SIGTERM) under load.

To kill a call in the middle of its transaction, the test holds a row lock the call
needs (PromoteRelease's statement, inserting the deployment, locks its release's row:
the foreign key's check, then migration 015's trigger deriving its status) and waits
until pg_stat_activity shows the service's backend waiting on it.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
import uuid

import asyncpg
import grpc

from relman.v1 import audit_pb2, audit_pb2_grpc, deploy_pb2
from shared.framework.interceptors import STOPPED
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, Client
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.load import code_of, deployment_parts
from tests.harness import bearer, client_address, start_service

SHUTDOWN_GRACE_S = 5
IN_FLIGHT = 50


async def _backends(db: asyncpg.Connection, application: str, **where: str) -> int:
    """How many backends of `application` are in the given pg_stat_activity state."""
    conditions = "".join(f" AND {column} = ${i + 2}" for i, column in enumerate(where))
    return await db.fetchval(
        f"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1{conditions}",
        application,
        *where.values(),
    )


async def _wait_for_backends(db, application: str, count: int, **where: str) -> None:
    """Polls pg_stat_activity until `count` backends of `application` match `where`."""
    try:
        async with asyncio.timeout(15):
            while await _backends(db, application, **where) != count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        rows = await db.fetch(
            "SELECT * FROM pg_stat_activity WHERE application_name = $1", application
        )
        raise AssertionError(f"backends of {application}: {rows}") from None


def _rows(n: int, tag: str) -> audit_pb2.LogActionsRequest:
    return audit_pb2.LogActionsRequest(
        actions=[
            audit_pb2.LogActionRequest(action="fault.kill", resource_type="fault", resource_id=tag)
            for _ in range(n)
        ]
    )


async def test_sigkill_mid_log_actions_stream_stores_no_partial_batch(
    fault_db, fault_tokens, fault_report
):
    db = await asyncpg.connect(libpq_dsn(fault_db))
    audit = await start_service(fault_db, "audit_svc")
    tag = uuid.uuid4().hex
    hold_stream = asyncio.Event()  # never set: the stream stays open until the kill

    async def batches():
        for _ in range(5):
            yield _rows(1_000, tag)
        await hold_stream.wait()

    try:
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            call = stub.LogActions(batches(), metadata=bearer(fault_tokens["ci-bot"]), timeout=60)
            # The five batches are written, inside the stream's open transaction.
            await _wait_for_backends(db, "audit_svc", 1, state="idle in transaction")
            audit.signal(signal.SIGKILL)
            outcome = await code_of(call)
        assert outcome == "UNAVAILABLE"
        assert await audit.wait(10) == -signal.SIGKILL
        # PostgreSQL ends the dead process's session and rolls its transaction back.
        await _wait_for_backends(db, "audit_svc", 0)
        stored = await db.fetchval("SELECT count(*) FROM audit_logs WHERE resource_id = $1", tag)
        assert stored == 0

        # A new process serves the same stream in full.
        audit = await start_service(fault_db, "audit_svc")
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            response = await stub.LogActions(
                iter([_rows(1_000, tag)] * 5), metadata=bearer(fault_tokens["ci-bot"]), timeout=60
            )
        assert response.count == 5_000
        stored_after = await db.fetchval(
            "SELECT count(*) FROM audit_logs WHERE resource_id = $1", tag
        )
        assert stored_after == 5_000
    finally:
        await audit.stop()
        await db.close()
    assert "unexpected error" not in audit.output
    fault_report(
        f"SIGKILL with a LogActions stream of 5 x 1,000 rows written and uncommitted: "
        f"caller got {outcome}, {stored} rows stored (no partial batch); a new process "
        f"stored the same stream in full ({stored_after} rows)"
    )


async def test_sigkill_mid_promote_leaves_no_deployment_without_stages_or_audit(
    fault_db, fault_tokens, fault_report
):
    service_id = await new_service_id(fault_db)
    db = await asyncpg.connect(libpq_dsn(fault_db))
    deploy = await start_service(fault_db, "deploy_svc")
    request_id = str(uuid.uuid4())
    try:
        async with grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as ch:
            lead = Client(ch, fault_tokens["lena"])
            release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
            # On a connection of its own: pg_stat_activity, read in a transaction, would
            # show the snapshot of its first read.
            locker = await asyncpg.connect(libpq_dsn(fault_db))
            lock = locker.transaction()
            await lock.start()
            await locker.execute("SELECT FROM releases WHERE id = $1 FOR UPDATE", release.id)
            promote = asyncio.create_task(
                lead.PromoteRelease(
                    release_id=release.id, target_environment_id=DEV, request_id=request_id
                )
            )
            # PromoteRelease's statement waits on the release's row.
            await _wait_for_backends(db, "deploy_svc", 1, wait_event_type="Lock")
            deploy.signal(signal.SIGKILL)
            outcome = await code_of(promote)
            await deploy.wait(10)
            await _wait_for_backends(db, "deploy_svc", 0)
            await locker.close()
        assert outcome == "UNAVAILABLE"
        partial = await db.fetchval(
            "SELECT count(*) FROM deployments WHERE release_id = $1", release.id
        )
        assert partial == 0

        # The caller's retry, with the same request_id, on a new process.
        deploy = await start_service(fault_db, "deploy_svc")
        async with grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as ch:
            lead = Client(ch, fault_tokens["lena"])
            deployment = await lead.PromoteRelease(
                release_id=release.id, target_environment_id=DEV, request_id=request_id
            )
        complete = await db.fetchrow(
            """
            SELECT (SELECT count(*) FROM pipeline_stages WHERE deployment_id = $1) stages,
                   (SELECT count(*) FROM audit_logs
                     WHERE resource_type = 'deployment' AND resource_id = $1::text) audits
            """,
            uuid.UUID(deployment.id),
        )
        assert (complete["stages"], complete["audits"]) == (5, 1)
    finally:
        await deploy.stop()
        await db.close()
    assert "unexpected error" not in deploy.output
    fault_report(
        "SIGKILL while PromoteRelease had inserted its deployment and stages, uncommitted: "
        f"caller got {outcome}, {partial} deployments stored; the retry with the same "
        "request_id on a new process made one deployment with 5 stages and its audit row"
    )


async def test_sigterm_with_calls_in_flight_loses_nothing_acknowledged(
    fault_db, fault_tokens, fault_report
):
    """50 PromoteRelease calls in flight when SIGTERM arrives, held by row locks (10 in
    transactions waiting, 40 waiting for a pooled connection): the locks of 45 go 1 s
    into the grace period, those of 5 only after the process exited. A watch is open."""
    service_ids = [await new_service_id(fault_db) for _ in range(IN_FLIGHT + 1)]
    db = await asyncpg.connect(libpq_dsn(fault_db))
    async with services(fault_db, SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S)) as running:
        lead = Client(running.deploy_channel, fault_tokens["lena"], timeout_s=30)
        releases = [
            await lead.CreateRelease(service_id=service_id, version="1.0.0")
            for service_id in service_ids
        ]
        watched = await lead.PromoteRelease(release_id=releases.pop().id, target_environment_id=DEV)
        watch = lead.stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=watched.id), metadata=lead.auth
        )
        await watch.read()  # the first snapshot: the watch is open
        released, stuck = releases[:-5], releases[-5:]
        lockers = []
        for group in (released, stuck):
            locker = await asyncpg.connect(libpq_dsn(fault_db))
            await locker.execute("BEGIN")
            await locker.execute(
                "SELECT FROM releases WHERE id = ANY($1::uuid[]) FOR UPDATE",
                [release.id for release in group],
            )
            lockers.append(locker)

        def promote(group):
            return [
                asyncio.create_task(
                    lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
                )
                for release in group
            ]

        # The 5 held past the grace first, so that they are surely under way.
        stuck_calls = promote(stuck)
        await _wait_for_backends(db, "deploy_svc", 5, wait_event_type="Lock")
        released_calls = promote(released)
        await _wait_for_backends(db, "deploy_svc", 10, wait_event_type="Lock")
        stopped_at = time.monotonic()
        running.deploy.signal(signal.SIGTERM)
        stopping = await running.deploy.wait_for_line(r"(\d+) calls in flight have")
        # The calls the server had begun (the watch among them); the rest are refused.
        begun = int(re.search(r"(\d+) calls in flight", stopping)[1]) - 1
        # A new call is refused at once while those in flight go on.
        late = await asyncio.gather(
            lead.GetRelease(release_id=releases[0].id), return_exceptions=True
        )
        watch_code = await watch.code()
        watch_ended_after = time.monotonic() - stopped_at
        await asyncio.sleep(1)  # a lock held a while into the grace period, as a slow call
        await lockers[0].close()
        outcomes = await asyncio.gather(*released_calls, return_exceptions=True)
        ended = await asyncio.gather(*stuck_calls, return_exceptions=True)
        code = await running.deploy.wait(SHUTDOWN_GRACE_S + 5)
        exited_after = time.monotonic() - stopped_at
        await lockers[1].close()
    try:
        codes = collections.Counter(
            outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK"
            for outcome in outcomes
        )
        # Under way and released: OK; not yet begun by the server at SIGTERM: refused.
        expected = {"OK": begun - 5, "UNAVAILABLE": len(released) - (begun - 5)}
        assert codes == collections.Counter(expected), codes
        # Under way past the grace: ended, each with UNAVAILABLE.
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in ended), ended
        assert [(e.code(), e.details()) for e in ended] == [
            (grpc.StatusCode.UNAVAILABLE, STOPPED.message)
        ] * 5
        assert isinstance(late[0], grpc.aio.AioRpcError)
        assert late[0].code() == grpc.StatusCode.UNAVAILABLE
        assert watch_code == grpc.StatusCode.UNAVAILABLE and watch_ended_after < 1
        assert code == 0 and exited_after < SHUTDOWN_GRACE_S + 0.5
        acked = [o.id for o in outcomes if not isinstance(o, BaseException)]
        stored = await deployment_parts(db, "release_id", [release.id for release in releases])
        assert {row["id"] for row in stored} == set(acked)  # the 5 ended wrote nothing
        assert all((row["stages"], row["audits"]) == (5, 1) for row in stored)
    finally:
        await db.close()
    assert_no_internal_errors(running)
    fault_report(
        f"SIGTERM with {IN_FLIGHT} PromoteRelease calls in flight (grace {SHUTDOWN_GRACE_S} s, "
        f"5 of them held past it) and a watch open: {begun} under way at SIGTERM; the 45 "
        f"released: {dict(codes)} (UNAVAILABLE: refused, not yet begun); the 5 held past "
        f"the grace: UNAVAILABLE, nothing of theirs stored; a new call during the grace: "
        f"UNAVAILABLE; the watch ended UNAVAILABLE at once; exit code {code} after "
        f"{exited_after:.1f} s; {len(acked)} acknowledged deployments all stored with 5 "
        "stages and their audit row; lost: nothing"
    )
