"""Load the fault tests hold while something breaks, and the record of what was acknowledged.

Every call's outcome is kept: an OK means "stored", so afterwards each acknowledged
audit row, deployment and stage transition must be found in the database
(`check_acknowledged_stored`). Failures are counted by status code with their
durations, so a test can assert that none was INTERNAL or UNKNOWN and none
outlived its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import URL

from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, Client, S
from tests.harness import RELEASE_STATUS_MISMATCHES, RelmanProcess, bearer, poll

CALL_TIMEOUT_S = 2.0
RETRY_BACKOFF_S = 0.05  # what a client's retry policy would wait before trying again
# Codes a caller may meet while the database or a process is away: retry later.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
STAGE_RANK = {
    S.STAGE_STATUS_PENDING: 0,
    S.STAGE_STATUS_RUNNING: 1,
    S.STAGE_STATUS_SUCCEEDED: 2,
}


@dataclass
class Outcomes:
    """What the callers saw."""

    ok: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    slowest_failure_s: float = 0.0
    last_ok_at: float = 0.0  # time.monotonic() of the latest OK
    last_failure_at: float = 0.0

    def record_ok(self) -> None:
        self.ok += 1
        self.last_ok_at = time.monotonic()

    def record_failure(self, error: grpc.aio.AioRpcError, started: float) -> None:
        self.failures[error.code().name] += 1
        self.last_failure_at = time.monotonic()
        self.slowest_failure_s = max(self.slowest_failure_s, time.monotonic() - started)

    @property
    def unexpected(self) -> dict[str, int]:
        """Failures other than UNAVAILABLE and DEADLINE_EXCEEDED."""
        allowed = {code.name for code in TRANSIENT}
        return {code: n for code, n in self.failures.items() if code not in allowed}

    def summary(self) -> str:
        failures = ", ".join(f"{n} {code}" for code, n in sorted(self.failures.items())) or "none"
        return f"{self.ok} OK, failures: {failures}, slowest failure {self.slowest_failure_s:.2f} s"


@dataclass
class Acknowledged:
    """Everything the services answered OK to."""

    audit_ids: set[str] = field(default_factory=set)
    deployment_ids: set[str] = field(default_factory=set)
    stage_ranks: dict[str, int] = field(default_factory=dict)  # stage id -> highest acked rank


async def log_action_caller(
    channel: grpc.aio.Channel,
    token: str,
    tag: str,
    stop: asyncio.Event,
    outcomes: Outcomes,
    acked: Acknowledged,
) -> None:
    """LogAction in a loop, each with a request_id of its own, until `stop`."""
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    while not stop.is_set():
        request_id = str(uuid.uuid4())
        started = time.monotonic()
        try:
            logged = await stub.LogAction(
                audit_pb2.LogActionRequest(
                    action="fault.load",
                    resource_type="fault",
                    resource_id=tag,
                    request_id=request_id,
                ),
                metadata=bearer(token),
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            outcomes.record_failure(error, started)
            await asyncio.sleep(RETRY_BACKOFF_S)
            continue
        acked.audit_ids.add(logged.id)  # the stored row's id (its request id is apart)
        outcomes.record_ok()


async def until(condition, within_s: float, what: str) -> float:
    """Polls `condition()` (tests.harness.poll); returns the time.monotonic() at which it held."""
    await poll(condition, within_s, what)
    return time.monotonic()


async def until_ok(outcomes: Outcomes, rpc, **fields):
    """Calls `rpc(**fields)` (a tests.deploying.Client method) until it is not refused as
    transient; returns its response."""
    while True:
        started = time.monotonic()
        try:
            response = await rpc(**fields)
        except grpc.aio.AioRpcError as error:
            outcomes.record_failure(error, started)
            if error.code() not in TRANSIENT:
                raise
            await asyncio.sleep(RETRY_BACKOFF_S)
            continue
        outcomes.record_ok()
        return response


async def deployment_loop(
    client: Client,
    service_id: str,
    stop: asyncio.Event,
    outcomes: Outcomes,
    acked: Acknowledged,
) -> int:
    """Creates releases and runs each through development, until `stop`; returns how many
    deployments succeeded. Creates carry request ids, so retrying them is safe; a stage
    update whose answer was lost is read back before it is tried again."""
    done = 0
    while not stop.is_set():
        version = f"1.{done}.{uuid.uuid4().int % 10_000}"
        release_request = str(uuid.uuid4())
        release = await until_ok(
            outcomes,
            client.CreateRelease,
            service_id=service_id,
            version=version,
            request_id=release_request,
        )
        promote_request = str(uuid.uuid4())
        deployment = await until_ok(
            outcomes,
            client.PromoteRelease,
            release_id=release.id,
            target_environment_id=DEV,
            request_id=promote_request,
        )
        acked.deployment_ids.add(deployment.id)
        for stage in deployment.stages:
            for status in (S.STAGE_STATUS_RUNNING, S.STAGE_STATUS_SUCCEEDED):
                await _stage_to(client, deployment.id, stage.id, status, outcomes)
                acked.stage_ranks[stage.id] = STAGE_RANK[status]
        done += 1
    return done


async def _stage_to(client: Client, deployment_id: str, stage_id: str, status, outcomes) -> None:
    while True:
        started = time.monotonic()
        try:
            await client.UpdatePipelineStage(stage_id=stage_id, status=status)
            outcomes.record_ok()
            return
        except grpc.aio.AioRpcError as error:
            outcomes.record_failure(error, started)
            if error.code() not in TRANSIENT | {grpc.StatusCode.FAILED_PRECONDITION}:
                raise
        # The answer was lost, or the update was made by the attempt that failed: look.
        deployment = await until_ok(
            outcomes,
            client.GetDeployment,
            deployment_id=deployment_id,
            view=S.DEPLOYMENT_VIEW_WITH_STAGES,
        )
        stored = next(s for s in deployment.stages if s.id == stage_id)
        if STAGE_RANK.get(stored.status, -1) >= STAGE_RANK[status]:
            return
        await asyncio.sleep(RETRY_BACKOFF_S)


@dataclass
class HealthLog:
    """Health answers of one process over time: (monotonic time, service, status name)."""

    answers: list[tuple[float, str, str]] = field(default_factory=list)

    def statuses(self, service: str, since: float = 0.0) -> list[str]:
        return [status for t, s, status in self.answers if s == service and t >= since]

    def first(self, service: str, status: str, since: float) -> float | None:
        return next(
            (t for t, s, st in self.answers if s == service and st == status and t >= since),
            None,
        )


async def poll_health(
    channel: grpc.aio.Channel, services: list[str], stop: asyncio.Event, log: HealthLog
) -> None:
    """Asks each of `services` ("" = liveness) for its health every 50 ms until `stop`."""
    stub = health_pb2_grpc.HealthStub(channel)
    while not stop.is_set():
        for service in services:
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            log.answers.append((time.monotonic(), service, status))
        await asyncio.sleep(0.05)


async def code_of(call) -> str:
    """How an awaited call ended: "OK" or its status code's name."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def deployment_parts(connection: asyncpg.Connection, column: str, ids) -> list:
    """The deployments whose `column` (service_id, release_id) is one of `ids`, each with
    its number of stages and of audit rows."""
    assert column in ("service_id", "release_id")
    return await connection.fetch(
        f"""
        SELECT d.id::text,
               (SELECT count(*) FROM pipeline_stages s WHERE s.deployment_id = d.id) stages,
               (SELECT count(*) FROM audit_logs a
                 WHERE a.resource_type = 'deployment' AND a.resource_id = d.id::text) audits
        FROM deployments d WHERE d.{column} = ANY($1::uuid[])
        """,
        ids,
    )


async def check_acknowledged_stored(url: URL, acked: Acknowledged, service_ids: list[str]) -> str:
    """Asserts that the database holds everything acknowledged, and that no deployment of
    `service_ids` lacks its stages or its audit row; returns a summary."""
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        stored_audit = await connection.fetchval(
            "SELECT count(*) FROM audit_logs WHERE id = ANY($1::uuid[])", list(acked.audit_ids)
        )
        assert stored_audit == len(acked.audit_ids), "acknowledged audit rows are missing"
        deployments = await deployment_parts(connection, "service_id", service_ids)
        stored = {row["id"] for row in deployments}
        assert acked.deployment_ids <= stored, acked.deployment_ids - stored
        incomplete = [dict(row) for row in deployments if row["stages"] != 5 or row["audits"] < 1]
        assert not incomplete, f"deployments without their stages or audit row: {incomplete}"
        stages = await connection.fetch(
            "SELECT id::text, status FROM pipeline_stages WHERE id = ANY($1::uuid[])",
            list(acked.stage_ranks),
        )
        rank = {"pending": 0, "running": 1, "succeeded": 2}
        behind = [
            row["id"] for row in stages if rank.get(row["status"], 3) < acked.stage_ranks[row["id"]]
        ]
        assert len(stages) == len(acked.stage_ranks) and not behind, behind
        mismatches = await connection.fetch(RELEASE_STATUS_MISMATCHES)
        assert not mismatches, mismatches
    finally:
        await connection.close()
    return (
        f"stored: {stored_audit}/{len(acked.audit_ids)} acknowledged audit rows, "
        f"{len(acked.deployment_ids)}/{len(acked.deployment_ids)} acknowledged deployments "
        f"({len(stored)} in all, each with 5 stages and its audit row), "
        f"{len(acked.stage_ranks)} acknowledged stage transitions"
    )


# -- what a process holds (its SIGUSR1 state line) -----------------------------------------

STATE = re.compile(r"state: (\d+) calls in flight, (\d+) tasks, (\d+) pooled connections in use")


async def process_state(process: RelmanProcess) -> tuple[int, int, int]:
    """(calls in flight, asyncio tasks, pooled connections in use) of a running service."""
    since = len(process.lines)
    process.signal(signal.SIGUSR1)
    line = await process.wait_for_line(STATE.pattern, 10, since=since)
    calls, tasks, in_use = STATE.search(line).groups()
    return int(calls), int(tasks), int(in_use)


async def settled(process: RelmanProcess, tasks_before: int | None = None) -> int:
    """Polls the process's state until no call is in flight, no pooled connection is in
    use and (if given) no more tasks run than `tasks_before`; returns the task count."""
    now = None
    try:
        async with asyncio.timeout(10):
            while True:
                now = calls, tasks, in_use = await process_state(process)
                if calls == in_use == 0 and (tasks_before is None or tasks <= tasks_before):
                    return tasks
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"state {now}, tasks before: {tasks_before}") from None
