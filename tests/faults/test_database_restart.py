"""Fault 1: PostgreSQL restarts while both services are under load."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import grpc

from relman.v1 import deploy_pb2, deploy_pb2_grpc
from tests.deploying import DEV, Client
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.load import (
    CALL_TIMEOUT_S,
    Acknowledged,
    HealthLog,
    Outcomes,
    check_acknowledged_stored,
    deployment_loop,
    log_action_caller,
    poll_health,
    until,
    until_ok,
)
from tests.harness import bearer

LOG_ACTION_CALLERS = 32
# Stops alternate between "fast" (a restart: sessions ended) and "immediate" (a crash:
# PostgreSQL recovers from its WAL on start). `make test` does each once, `make soak` more.
RESTARTS = int(os.environ.get("FAULT_RESTARTS", "2"))
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
        watch_seen: list = []
        watch_ended: dict = {}

        def open_watch() -> asyncio.Task:
            return asyncio.create_task(
                _watch(
                    running.deploy_channel,
                    fault_tokens["lena"],
                    watched.id,
                    watch_seen,
                    watch_ended,
                )
            )

        watcher = {"task": open_watch()}

        async def restart(cycle: int) -> str:
            failures_before = dict(audit_outcomes.failures)
            failed_before = sum(failures_before.values())
            ok_before = audit_outcomes.ok
            mode = ("fast", "immediate")[cycle % 2]
            down_at = time.monotonic()
            await asyncio.to_thread(cluster.stop, mode)
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
                lambda: sum(audit_outcomes.failures.values()) >= failed_before + LOG_ACTION_CALLERS,
                10,
                "failures",
            )
            unavailable = audit_outcomes.failures["UNAVAILABLE"] - failures_before.get(
                "UNAVAILABLE", 0
            )
            assert unavailable > 0

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
            # The watch resumed or ended UNAVAILABLE: after a change it must not hang.
            metric = f"restart_{cycle}"
            await until_ok(
                deploy_outcomes,
                lead.RecordDeploymentMetric,
                deployment_id=watched.id,
                metric_name=metric,
                metric_value=cycle,
            )
            await until(
                lambda: watch_ended or _delivered(watch_seen, metric),
                10,
                "the watch to deliver the change or end",
            )
            watch_outcome = watch_ended.get("code", "resumed")
            if watch_ended:  # a client watches again
                assert watch_ended["code"] == "UNAVAILABLE", watch_ended
                watch_seen.clear()
                watch_ended.clear()
                watcher["task"] = open_watch()
                await until(lambda: watch_seen, 10, "a snapshot of the new watch")
            ok_at_recovery = audit_outcomes.ok
            await until(lambda: audit_outcomes.ok >= ok_at_recovery + 300, 30, "load")
            return (
                f"stopped ({mode}) after {ok_before} OK LogAction calls, started "
                f"{up_at - down_at:.1f} s later, LogAction failing until "
                f"{audit_outcomes.last_failure_at - down_at:.1f} s after the stop "
                f"({unavailable} UNAVAILABLE), readiness SERVING {ready_at - up_at:.1f} s "
                f"after the return, watch {watch_outcome}"
            )

        cycles = []
        try:
            await until(lambda: audit_outcomes.ok >= 300 and acked.stage_ranks, 30, "load")
            await until(lambda: watch_seen, 10, "first watch snapshot")
            for cycle in range(RESTARTS):
                cycles.append(await restart(cycle))
        finally:
            stop_load.set()
            done = await asyncio.gather(*tasks, loop, return_exceptions=True)
            stop_health.set()
            await asyncio.gather(*pollers)
            watcher["task"].cancel()
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
        assert audit_outcomes.slowest_failure_s < 2.0 + 0.5
        # Liveness never wavered; the processes were not restarted.
        for log in health.values():
            assert set(log.statuses("")) == {"SERVING"}, log.statuses("")
        assert running.deploy.process.returncode is None
        assert running.audit.process.returncode is None
        assert (running.deploy.process.pid, running.audit.process.pid) == (deploy_pid, audit_pid)

        stored = await check_acknowledged_stored(fault_db, acked, [loop_service, watched_service])
        fault_report(
            f"{LOG_ACTION_CALLERS} LogAction callers + a Promote/UpdatePipelineStage loop "
            f"+ a watch, PostgreSQL stopped and started {RESTARTS} times: "
            + "; ".join(cycles)
            + f"; in all LogAction {audit_outcomes.summary()}; deploy loop "
            f"{deploy_outcomes.summary()}; {stored}; lost: nothing"
        )


def _delivered(seen: list, metric: str) -> bool:
    """Whether a snapshot holding `metric` arrived. The name alone tells the change (one
    per restart): its snapshot may arrive before the call that made it has returned."""
    return any(any(m.metric_name == metric for m in snapshot.metrics) for _, snapshot in seen)
