"""Fault 1: PostgreSQL restarts while both services are under load."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from relman.v1 import deploy_pb2, deploy_pb2_grpc
from tests.deploying import DEV, Client, S
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.load import (
    CALL_TIMEOUT_S,
    TRANSIENT,
    Acknowledged,
    HealthLog,
    Outcomes,
    _stage_to,
    check_acknowledged_stored,
    deployment_loop,
    log_action_caller,
    poll_health,
    until,
)
from tests.harness import bearer

LOG_ACTION_CALLERS = 32
RECOVERY_LIMIT_S = 10.0
AUDIT = "relman.v1.AuditService"
DEPLOY = "relman.v1.DeployService"


async def _watch(channel, token: str, deployment_id: str, seen: list, ended: dict) -> None:
    """Collects the snapshots of one watch; records how it ended."""
    stub = deploy_pb2_grpc.DeployServiceStub(channel)
    try:
        async for snapshot in stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=deployment_id), metadata=bearer(token)
        ):
            seen.append((time.monotonic(), snapshot))
        ended["code"] = "OK"
    except grpc.aio.AioRpcError as error:
        ended["code"] = error.code().name
    ended["at"] = time.monotonic()


async def test_database_restart_under_load(cluster, fault_db, fault_tokens, fault_report):
    loop_service, watched_service = (
        await new_service_id(fault_db),
        await new_service_id(fault_db),
    )
    async with services(fault_db) as running:
        deploy_pid, audit_pid = running.deploy.process.pid, running.audit.process.pid
        lead = Client(running.deploy_channel, fault_tokens["lena"], timeout_s=CALL_TIMEOUT_S)
        # A deployment to watch across the restart, left pending.
        release = await lead.CreateRelease(service_id=watched_service, version="9.0.0")
        watched = await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)

        stop_load, stop_health = asyncio.Event(), asyncio.Event()
        audit_outcomes, deploy_outcomes, acked = Outcomes(), Outcomes(), Acknowledged()
        health = {"audit": HealthLog(), "deploy": HealthLog()}
        watch_seen: list = []
        watch_ended: dict = {}
        tag = uuid.uuid4().hex
        tasks = [
            asyncio.create_task(
                log_action_caller(
                    running.audit_channel,
                    fault_tokens["ci-bot"],
                    tag,
                    stop_load,
                    audit_outcomes,
                    acked,
                )
            )
            for _ in range(LOG_ACTION_CALLERS)
        ]
        loop = asyncio.create_task(
            deployment_loop(lead, loop_service, stop_load, deploy_outcomes, acked)
        )
        pollers = [
            asyncio.create_task(
                poll_health(running.audit_channel, ["", AUDIT], stop_health, health["audit"])
            ),
            asyncio.create_task(
                poll_health(running.deploy_channel, ["", DEPLOY], stop_health, health["deploy"])
            ),
        ]
        watch = asyncio.create_task(
            _watch(
                running.deploy_channel, fault_tokens["lena"], watched.id, watch_seen, watch_ended
            )
        )
        try:
            await until(lambda: audit_outcomes.ok >= 300 and acked.stage_ranks, 30, "load")
            await until(lambda: watch_seen, 10, "first watch snapshot")
            ok_before = audit_outcomes.ok

            down_at = time.monotonic()
            await asyncio.to_thread(cluster.stop, "fast")
            # Readiness follows the database; liveness does not.
            await until(
                lambda: (
                    health["audit"].first(AUDIT, "NOT_SERVING", down_at)
                    and health["deploy"].first(DEPLOY, "NOT_SERVING", down_at)
                ),
                10,
                "readiness NOT_SERVING",
            )
            await until(
                lambda: sum(audit_outcomes.failures.values()) >= LOG_ACTION_CALLERS, 10, "failures"
            )
            failures_during_outage = dict(audit_outcomes.failures)

            await asyncio.to_thread(cluster.start)
            up_at = time.monotonic()
            ready_at = await until(
                lambda: (
                    health["audit"].first(AUDIT, "SERVING", up_at)
                    and health["deploy"].first(DEPLOY, "SERVING", up_at)
                ),
                RECOVERY_LIMIT_S,
                "readiness SERVING again",
            )
            await until(
                lambda: audit_outcomes.last_ok_at > up_at and deploy_outcomes.last_ok_at > up_at,
                RECOVERY_LIMIT_S,
                "calls OK again",
            )
            last_failure_at = audit_outcomes.last_failure_at
            # The watch either resumed or ended UNAVAILABLE; after a change it must not hang.
            first_stage = watched.stages[0]
            await _stage_to(
                lead, watched.id, first_stage.id, S.STAGE_STATUS_RUNNING, deploy_outcomes
            )
            changed_at = time.monotonic()
            await until(
                lambda: (
                    watch_ended
                    or any(
                        t > changed_at and snap.stages[0].status == S.STAGE_STATUS_RUNNING
                        for t, snap in watch_seen
                    )
                ),
                10,
                "the watch to deliver the change or end",
            )
            ok_at_recovery = audit_outcomes.ok
            await until(lambda: audit_outcomes.ok >= ok_at_recovery + 300, 30, "load after")
        finally:
            stop_load.set()
            done = await asyncio.gather(*tasks, loop, return_exceptions=True)
            stop_health.set()
            await asyncio.gather(*pollers)
            watch.cancel()
            if not cluster.running:
                cluster.start()
        errors = [outcome for outcome in done if isinstance(outcome, BaseException)]
        assert not errors, errors

        # Never INTERNAL or UNKNOWN; failures end within the caller's deadline.
        assert_no_internal_errors(running)
        assert not audit_outcomes.unexpected, audit_outcomes.summary()
        assert not deploy_outcomes.unexpected.keys() - {"FAILED_PRECONDITION"}, (
            deploy_outcomes.summary()
        )
        assert failures_during_outage.get("UNAVAILABLE", 0) > 0, failures_during_outage
        assert audit_outcomes.slowest_failure_s < 2.0 + 0.5
        # Liveness never wavered; the processes were not restarted.
        for log in health.values():
            assert set(log.statuses("")) == {"SERVING"}, log.statuses("")
        assert running.deploy.process.returncode is None
        assert running.audit.process.returncode is None
        assert (running.deploy.process.pid, running.audit.process.pid) == (deploy_pid, audit_pid)
        assert watch_ended.get("code", "UNAVAILABLE") in {c.name for c in TRANSIENT} | {"OK"}

        stored = await check_acknowledged_stored(fault_db, acked, [loop_service, watched_service])
        watch_outcome = (
            f"ended {watch_ended['code']}"
            if watch_ended
            else f"resumed ({len(watch_seen)} snapshots, the post-restart change included)"
        )
        fault_report(
            f"{LOG_ACTION_CALLERS} LogAction callers + a Promote/UpdatePipelineStage loop; "
            f"PostgreSQL stopped (fast) after {ok_before} OK calls and started "
            f"{up_at - down_at:.1f} s later; LogAction failed until "
            f"{last_failure_at - down_at:.1f} s after the stop; "
            f"readiness SERVING {ready_at - up_at:.1f} s after the return "
            f"(checked every 2 s; limit 10 s); "
            f"LogAction {audit_outcomes.summary()}; deploy loop {deploy_outcomes.summary()}; "
            f"watch {watch_outcome}; {stored}; lost: nothing"
        )
