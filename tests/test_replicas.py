"""Two processes of each service on one database, as two replicas behind a balancer.

A release goes from development to production with every step sent to one replica
or the other, watched on the other; a stage that times out is failed once although
both replicas' sweepers look for it; audit rows written through either replica are
read through the other. The second replica of each service runs behind a real
PgBouncer in transaction mode (tests.pgbouncer), as the README says to run it; where
PgBouncer is not installed it connects to PostgreSQL itself with the same settings,
and a warning says so.
"""

from __future__ import annotations

import contextlib
import uuid
import warnings

import asyncpg
import grpc
import pytest

from relman.v1 import audit_pb2, audit_pb2_grpc, deploy_pb2
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Role
from shared.persistence.roles import RUNTIME_ROLE
from tests.deploying import DEV, PROD, STAGING, Client, S
from tests.faults.invariants import check_invariants
from tests.harness import bearer, client_address, fails, runtime_url, start_service
from tests.pgbouncer import PgBouncerMissing, running_pgbouncer


@pytest.fixture(scope="module")
async def replicas(db_url):
    """Two deploy_svc and two audit_svc processes, each with its channel."""
    async with contextlib.AsyncExitStack() as held:
        try:
            bouncer = await held.enter_async_context(running_pgbouncer(db_url))
            behind = bouncer.url_through(db_url)
        except PgBouncerMissing as missing:
            warnings.warn(
                f"{missing}; the PgBouncer-mode replicas connect to PostgreSQL itself",
                stacklevel=1,
            )
            behind = db_url
        # The second of each runs behind PgBouncer in transaction mode: no statement
        # cache, LISTEN on PostgreSQL itself.
        pgbouncer_mode = {
            "DB_STATEMENT_CACHE": "0",
            "DATABASE_LISTEN_URL": libpq_dsn(runtime_url(db_url)),
        }
        processes = [
            await start_service(url, module, **settings)
            for module, url, settings in (
                ("deploy_svc", db_url, {}),
                ("deploy_svc", behind, pgbouncer_mode),
                ("audit_svc", db_url, {}),
                ("audit_svc", behind, pgbouncer_mode),
            )
        ]
        channels = [
            grpc.aio.insecure_channel(client_address(next(iter(p.addresses.values()))))
            for p in processes
        ]
        try:
            yield processes, channels
        finally:
            for channel in channels:
                await channel.close()
            for process in processes:
                assert await process.stop() == 0, process.output


async def _watch_to_the_end(client: Client, deployment_id: str):
    call = client.stub.WatchDeployment(
        deploy_pb2.WatchDeploymentRequest(deployment_id=deployment_id),
        metadata=client.auth,
        timeout=60,
    )
    await call.read()  # open: from here on, no change is missed
    return call


async def _last(call):
    """The watch's last message: it ends after a terminal status."""
    last = None
    while (message := await call.read()) is not grpc.aio.EOF:
        last = message
    return last


async def _run_stages(deployment, *clients: Client) -> None:
    """Every stage through the replicas in turn."""
    for n, stage in enumerate(deployment.stages):
        one, other = clients[n % 2], clients[(n + 1) % 2]
        await one.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_RUNNING)
        await other.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_SUCCEEDED)


async def test_a_release_goes_to_production_through_two_replicas(
    replicas, tokens, marco_token, db_url, service_id
):
    _, (deploy_a, deploy_b, _, _) = replicas
    lead_a, lead_b = Client(deploy_a, tokens[Role.LEAD]), Client(deploy_b, tokens[Role.LEAD])
    reviewer_a = Client(deploy_a, marco_token)
    release = await lead_a.CreateRelease(service_id=service_id, version="1.0.0")
    for n, environment in enumerate((DEV, STAGING, PROD)):
        deployer, watcher = (lead_b, lead_a) if n % 2 == 0 else (lead_a, lead_b)
        deployment = await deployer.PromoteRelease(
            release_id=release.id, target_environment_id=environment
        )
        watch = await _watch_to_the_end(watcher, deployment.id)
        if environment == PROD:
            await reviewer_a.ApproveDeployment(deployment_id=deployment.id)
        await _run_stages(deployment, lead_a, lead_b)
        last = await _last(watch)
        assert last.status == S.DEPLOYMENT_STATUS_SUCCEEDED
    final = await lead_b.GetRelease(release_id=release.id)
    assert final.status == S.RELEASE_STATUS_COMPLETED


async def test_a_replica_decides_each_move_from_what_the_other_wrote_since(
    replicas, tokens, service_id
):
    """Replica A starts a stage and B finishes it: A, which decides a move of a deployment
    it moved last from what it wrote then, refuses to finish the stage again (its write
    finds the stage changed, and a new read refuses) and starts the next one (what it
    knew said the first was still running: a refusal is always decided again from a
    read). Once B has ended the deployment, A's move of it is refused as ended."""
    _, (deploy_a, deploy_b, _, _) = replicas
    lead_a, lead_b = Client(deploy_a, tokens[Role.LEAD]), Client(deploy_b, tokens[Role.LEAD])
    release = await lead_a.CreateRelease(service_id=service_id, version="1.5.0")
    deployment = await lead_a.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    first, second, *rest = deployment.stages
    await lead_a.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
    await lead_b.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED)
    await fails(
        lead_a.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_STAGE_TRANSITION",
    )
    started = await lead_a.UpdatePipelineStage(stage_id=second.id, status=S.STAGE_STATUS_RUNNING)
    assert started.status == S.STAGE_STATUS_RUNNING
    await lead_b.UpdatePipelineStage(stage_id=second.id, status=S.STAGE_STATUS_FAILED)
    await fails(
        lead_a.UpdatePipelineStage(stage_id=second.id, status=S.STAGE_STATUS_SUCCEEDED),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEPLOYMENT_ENDED",
    )
    final = await lead_a.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert final.status == S.DEPLOYMENT_STATUS_FAILED
    assert [s.status for s in final.stages] == [
        S.STAGE_STATUS_SUCCEEDED,
        S.STAGE_STATUS_FAILED,
        *[S.STAGE_STATUS_SKIPPED] * len(rest),
    ]


async def test_a_timed_out_stage_is_failed_once_with_two_sweepers(
    replicas, tokens, db_url, service_id
):
    _, (deploy_a, deploy_b, _, _) = replicas
    lead_a, lead_b = Client(deploy_a, tokens[Role.LEAD]), Client(deploy_b, tokens[Role.LEAD])
    release = await lead_a.CreateRelease(service_id=service_id, version="2.0.0")
    deployment = await lead_b.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    watch = await _watch_to_the_end(lead_a, deployment.id)
    await lead_b.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    db = await asyncpg.connect(libpq_dsn(db_url))
    try:
        await db.execute(
            "UPDATE pipeline_stages SET timeout_seconds = 60,"
            " started_at = now() - interval '1 hour' WHERE id = $1",
            uuid.UUID(build.id),
        )
        last = await _last(watch)
        timeouts = await db.fetchval(
            "SELECT count(*) FROM audit_logs WHERE action = 'timeout' AND resource_id = $1",
            build.id,
        )
        await check_invariants(db)
    finally:
        await db.close()
    assert last.status == S.DEPLOYMENT_STATUS_FAILED
    assert (last.stages[0].status, last.stages[0].output) == (S.STAGE_STATUS_FAILED, "timed out")
    assert timeouts == 1


async def test_audit_rows_written_through_one_replica_are_read_through_the_other(replicas, tokens):
    _, (_, _, audit_a, audit_b) = replicas
    tag = uuid.uuid4().hex
    for n, channel in enumerate((audit_a, audit_b) * 3):
        await audit_pb2_grpc.AuditServiceStub(channel).LogAction(
            audit_pb2.LogActionRequest(
                action="replica.write",
                resource_type="test",
                resource_id=tag,
                details={"n": n},
            ),
            metadata=bearer(tokens[Role.SERVICE]),
        )
    for channel in (audit_a, audit_b):
        page = await audit_pb2_grpc.AuditServiceStub(channel).ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id=tag)),
            metadata=bearer(tokens[Role.LEAD]),
        )
        assert sorted(row.details["n"] for row in page.audit_logs) == list(range(6))


async def test_every_replica_connects_as_the_runtime_role(replicas, db_url):
    """Pools, readiness probes and LISTEN connections of all four processes belong to the
    runtime role: not a superuser, owner of nothing, INSERT and SELECT only on audit_logs."""
    del replicas  # running: their connections are what is looked at
    db = await asyncpg.connect(libpq_dsn(db_url))
    try:
        rows = await db.fetch(
            """
            SELECT a.pid, a.application_name, a.usename, r.rolsuper,
                   (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid
                      AND c.relnamespace = 'public'::regnamespace) AS owned,
                   has_table_privilege(a.usename, 'audit_logs', 'UPDATE, DELETE, TRUNCATE')
                     AS may_alter_trail
            FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
            WHERE a.datname = $1 AND a.client_port IS DISTINCT FROM NULL
              AND (a.application_name LIKE 'deploy_svc%' OR a.application_name LIKE 'audit_svc%')
            """,
            db_url.database,
        )
    finally:
        await db.close()
    names = {row["application_name"] for row in rows}
    assert {"deploy_svc", "audit_svc"} <= names, names
    assert any(name.startswith("deploy_svc") and "listen" in name for name in names), names
    for row in rows:
        assert row["usename"] == RUNTIME_ROLE, dict(row)
        assert not row["rolsuper"] and row["owned"] == 0 and not row["may_alter_trail"], dict(row)
