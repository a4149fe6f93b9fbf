"""DeployService part 2 through real servers: rollbacks, metrics, watches, timeouts, admin."""

from __future__ import annotations

import asyncio
import math
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from deploy_svc import convert
from relman.v1 import common_pb2, deploy_pb2
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Deployment, Role, Rollback
from tests.deploying import DEV, PROD, STAGING, Client, S, deployed, release_status, run_all_stages
from tests.harness import (
    RelmanProcess,
    client_address,
    env_for,
    error_details,
    fails,
    waiting_on_locks,
)


async def in_production(clients, service_id: str, version: str, *, succeed: bool = True):
    """A release through dev and staging to production, approved, its stages run."""
    lead = clients["lead"]
    release = await deployed(lead, service_id, version, DEV, STAGING)
    deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    await clients["reviewer"].ApproveDeployment(deployment_id=deployment.id)
    if succeed:
        await run_all_stages(lead, deployment)
    else:  # the smoke test fails
        *good, smoke = deployment.stages
        await run_all_stages(lead, type(deployment)(stages=good))
        await lead.UpdatePipelineStage(stage_id=smoke.id, status=S.STAGE_STATUS_RUNNING)
        await lead.UpdatePipelineStage(
            stage_id=smoke.id, status=S.STAGE_STATUS_FAILED, output="login flow returned 503"
        )
    return release, deployment


# -- rollbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("redeployment_succeeds", [True, False], ids=["completes", "fails"])
async def test_a_failed_smoke_test_rolled_back_to_the_previous_release(
    clients, service_id, rollbacks_of, redeployment_succeeds
):
    lead = clients["lead"]
    good, _ = await in_production(clients, service_id, "1.0.0")
    bad, failed = await in_production(clients, service_id, "1.1.0", succeed=False)
    assert (await lead.GetDeployment(deployment_id=failed.id)).status == (
        S.DEPLOYMENT_STATUS_FAILED
    )

    rollback = await lead.RollbackDeployment(deployment_id=failed.id, reason="smoke test failed")
    assert rollback.status == S.ROLLBACK_STATUS_IN_PROGRESS
    assert rollback.target_release_id == good.id
    assert (await lead.GetDeployment(deployment_id=failed.id)).status == (
        S.DEPLOYMENT_STATUS_ROLLED_BACK
    )
    assert await release_status(lead, bad.id) == "rolled_back"
    redeployment = await lead.GetDeployment(
        deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert redeployment.release_id == good.id and redeployment.environment_id == PROD
    assert redeployment.status == S.DEPLOYMENT_STATUS_PENDING  # no new approval needed
    assert [s.name for s in redeployment.stages] == [
        "build",
        "test",
        "security_scan",
        "deploy",
        "smoke_test",
    ]

    if redeployment_succeeds:
        await run_all_stages(lead, redeployment)
        expected = S.ROLLBACK_STATUS_COMPLETED
    else:
        first = redeployment.stages[0]
        await lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
        await lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_FAILED)
        expected = S.ROLLBACK_STATUS_FAILED
    rollbacks = await rollbacks_of(failed.id)
    assert [(r.status, r.HasField("completed_at")) for r in rollbacks] == [(expected, True)]
    assert await release_status(lead, good.id) == "completed"
    assert await release_status(lead, bad.id) == "rolled_back"


@pytest.fixture
def rollbacks_of(database):
    """Reads the rollbacks of a deployment (there is no List RPC for them)."""

    async def read(deployment_id: str):
        async with database.transaction() as session:
            rows = await session.scalars(
                select(Rollback).where(Rollback.deployment_id == uuid.UUID(deployment_id))
            )
            return [convert.rollback(row) for row in rows]

    return read


async def test_rollback_without_a_target_writes_nothing(clients, service_id, database):
    lead = clients["lead"]
    _, only = await in_production(clients, service_id, "1.0.0")
    await fails(
        lead.RollbackDeployment(deployment_id=only.id, reason="nothing earlier"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_ROLLBACK_TARGET",
    )
    assert (await lead.GetDeployment(deployment_id=only.id)).status == (
        S.DEPLOYMENT_STATUS_SUCCEEDED
    )
    async with database.transaction() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Deployment)
            .where(Deployment.service_id == uuid.UUID(service_id))
        )
    assert count == 3  # dev, staging, production: no redeployment


async def test_only_the_newest_deployment_is_rolled_back(clients, service_id):
    lead = clients["lead"]
    await in_production(clients, service_id, "1.0.0")
    _, older = await in_production(clients, service_id, "1.1.0")
    await in_production(clients, service_id, "1.2.0")
    error = await fails(
        lead.RollbackDeployment(deployment_id=older.id, reason="too late"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_NEWEST",
    )
    assert error_details(error)[0].metadata["deployment_id"] == older.id


async def test_concurrent_rollbacks_of_one_deployment_one_wins(clients, service_id, rollbacks_of):
    lead = clients["lead"]
    await in_production(clients, service_id, "1.0.0")
    _, newest = await in_production(clients, service_id, "1.1.0", succeed=False)
    results = await asyncio.gather(
        *(lead.RollbackDeployment(deployment_id=newest.id, reason=f"race {i}") for i in range(8)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert {r.code() for r in results if isinstance(r, Exception)} == {
        grpc.StatusCode.FAILED_PRECONDITION
    }
    assert len(await rollbacks_of(newest.id)) == 1


async def test_opposite_rollbacks_in_two_environments_both_go_through(clients, service_id, db_url):
    """Two rollbacks at once between the same two releases, one each way, in two
    environments: each changes deployments of both, whose status follows under their
    rows' locks (migration 015), so each locks both rows in the order of their ids before
    its first change. A session holding both rows makes them wait together; once it
    commits, neither holds a row the other waits for, and both go through."""
    admin, lead = clients["admin"], clients["lead"]
    other = await admin.CreateEnvironment(
        name=f"dev-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    first = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    second = await lead.CreateRelease(service_id=service_id, version="1.1.0")
    newest = []
    for environment, releases in ((DEV, (second, first)), (other.id, (first, second))):
        for release in releases:
            deployment = await lead.CreateDeployment(
                release_id=release.id, environment_id=environment, stage_names=["deploy"]
            )
            await run_all_stages(lead, deployment)
        newest.append(deployment.id)

    blocker = await asyncpg.connect(libpq_dsn(db_url))
    try:
        held = blocker.transaction()
        await held.start()
        await blocker.execute(
            "SELECT FROM releases WHERE id = ANY ($1::uuid[]) FOR NO KEY UPDATE",
            [uuid.UUID(first.id), uuid.UUID(second.id)],
        )
        rollbacks = [
            asyncio.create_task(lead.RollbackDeployment(deployment_id=id_, reason="one each way"))
            for id_ in newest
        ]
        await waiting_on_locks(blocker, 2)  # both rollbacks, on the releases' rows
        await held.commit()
        done = await asyncio.gather(*rollbacks)
    finally:
        await blocker.close()
    assert [r.target_release_id for r in done] == [second.id, first.id]
    for release in (first, second):
        assert await release_status(lead, release.id) == "promoted"  # its redeployment


async def test_rollback_rules(clients, service_id):
    developer, lead = clients["developer"], clients["lead"]
    await in_production(clients, service_id, "1.0.0")
    _, newest = await in_production(clients, service_id, "1.1.0")
    error = await fails(
        developer.RollbackDeployment(deployment_id=newest.id, reason="x"),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    assert error_details(error)[0].metadata["role"] == "developer"
    await fails(
        lead.RollbackDeployment(deployment_id=newest.id, reason=""),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    request_id = str(uuid.uuid4())
    first = await lead.RollbackDeployment(
        deployment_id=newest.id, reason="retry me", request_id=request_id
    )
    again = await lead.RollbackDeployment(
        deployment_id=newest.id, reason="retry me", request_id=request_id
    )
    assert first == again and first.id != request_id

    # The redeployment is active: nothing else may start in production meanwhile.
    release = await lead.CreateRelease(service_id=service_id, version="1.2.0")
    await fails(
        lead.CreateDeployment(release_id=release.id, environment_id=PROD),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    pending = await lead.GetDeployment(deployment_id=first.redeployment_id)
    await fails(
        lead.RollbackDeployment(deployment_id=pending.id, reason="not ended"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_ROLLBACKABLE",
    )


# -- metrics ------------------------------------------------------------------------------------


async def test_metrics_upsert_and_show_in_the_full_view(clients, service_id):
    developer = clients["developer"]
    release = await deployed(developer, service_id, "1.0.0", DEV)
    deployment = (await developer.ListDeployments(release_id=release.id)).deployments[0]
    await developer.RecordDeploymentMetric(
        deployment_id=deployment.id,
        metric_name="duration_seconds",
        metric_value=120,
        unit="seconds",
    )
    updated = await developer.RecordDeploymentMetric(
        deployment_id=deployment.id,
        metric_name="duration_seconds",
        metric_value=95.5,
        unit="seconds",
    )
    await developer.RecordDeploymentMetric(
        deployment_id=deployment.id,
        metric_name="cpu_usage_percent",
        metric_value=41.0,
        unit="percent",
    )
    full = await developer.GetDeployment(deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert sorted((m.metric_name, m.metric_value, m.unit) for m in full.metrics) == [
        ("cpu_usage_percent", 41.0, "percent"),
        ("duration_seconds", 95.5, "seconds"),
    ]
    assert updated.metric_value == 95.5
    for value in (math.nan, math.inf, -math.inf):
        await fails(
            developer.RecordDeploymentMetric(
                deployment_id=deployment.id, metric_name="x", metric_value=value
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    for name, unit in (("", "s"), ("Bad Name", "s"), ("ok", "u" * 21), ("n\x00", "s")):
        await fails(
            developer.RecordDeploymentMetric(
                deployment_id=deployment.id, metric_name=name, metric_value=1, unit=unit
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    await fails(
        developer.RecordDeploymentMetric(
            deployment_id=str(uuid.uuid4()), metric_name="x", metric_value=1
        ),
        grpc.StatusCode.NOT_FOUND,
    )


# -- WatchDeployment ------------------------------------------------------------------------------


async def test_a_watch_sees_changes_made_by_another_process_and_ends(
    db_url, relman, tokens, clients, service_id
):
    """Watch on the `make run` server; change everything through a second deploy_svc."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    other = await RelmanProcess.start(
        ["-m", "deploy_svc"], env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0")
    )
    try:
        address = client_address((await other.wait_listening("deploy_svc"))["deploy_svc"])
        watch = developer.stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
            metadata=developer.auth,
            timeout=60,
        )
        first = await watch.read()
        assert first.status == S.DEPLOYMENT_STATUS_PENDING and len(first.stages) == 5
        async with grpc.aio.insecure_channel(address) as channel:
            elsewhere = Client(channel, tokens[Role.DEVELOPER])
            seen = []
            for stage in deployment.stages:
                for status in (S.STAGE_STATUS_RUNNING, S.STAGE_STATUS_SUCCEEDED):
                    await elsewhere.UpdatePipelineStage(stage_id=stage.id, status=status)
                    update = await watch.read()
                    changed = next(s for s in update.stages if s.id == stage.id)
                    seen.append((stage.name, changed.status))
                    assert changed.status == status
        assert len(seen) == 10
        assert update.status == S.DEPLOYMENT_STATUS_SUCCEEDED
        assert await watch.read() == grpc.aio.EOF  # ended after the terminal status
        assert await watch.code() == grpc.StatusCode.OK
    finally:
        await other.stop()


async def _backends(connection: asyncpg.Connection) -> int:
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    return await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
    )


async def test_cancelled_watches_leave_no_connection_behind(db_url, clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    observer = await asyncpg.connect(libpq_dsn(db_url))
    try:
        # One watch first, so that the process's single LISTEN connection exists.
        warm = developer.stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id), metadata=developer.auth
        )
        await warm.read()
        warm.cancel()
        before = await _backends(observer)
        watches = [
            developer.stub.WatchDeployment(
                deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
                metadata=developer.auth,
            )
            for _ in range(20)
        ]
        for watch in watches:
            assert (await watch.read()).id == deployment.id
        assert await _backends(observer) <= before  # no connection per watcher
        for watch in watches:
            watch.cancel()
        await developer.CancelDeployment(deployment_id=deployment.id)  # a change after cancel
        assert await _backends(observer) <= before
    finally:
        await observer.close()


async def test_watch_of_an_ended_deployment_sends_it_once_and_ends(clients, service_id):
    developer = clients["developer"]
    release = await deployed(developer, service_id, "1.0.0", DEV)
    deployment = (await developer.ListDeployments(release_id=release.id)).deployments[0]
    watch = developer.stub.WatchDeployment(
        deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id), metadata=developer.auth
    )
    messages = [message async for message in watch]
    assert [m.status for m in messages] == [S.DEPLOYMENT_STATUS_SUCCEEDED]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        async for _ in developer.stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=str(uuid.uuid4())),
            metadata=developer.auth,
        ):
            pass
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- stage timeouts ------------------------------------------------------------------------------


async def test_a_running_stage_past_its_timeout_fails_the_deployment(db_url, clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    connection = await asyncpg.connect(libpq_dsn(db_url))
    try:  # the build has been running for an hour, its timeout is a minute
        await connection.execute(
            "UPDATE pipeline_stages SET timeout_seconds = 60,"
            " started_at = now() - interval '1 hour' WHERE id = $1",
            uuid.UUID(build.id),
        )
    finally:
        await connection.close()
    watch = developer.stub.WatchDeployment(
        deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
        metadata=developer.auth,
        timeout=60,
    )
    # The sweeper fails it; the watch ends on that terminal status.
    last = [message async for message in watch][-1]
    assert last.status == S.DEPLOYMENT_STATUS_FAILED
    timed_out = next(s for s in last.stages if s.id == build.id)
    assert (timed_out.status, timed_out.output) == (S.STAGE_STATUS_FAILED, "timed out")
    assert [s.status for s in last.stages[1:]] == [S.STAGE_STATUS_SKIPPED] * 4


# -- catalogue administration --------------------------------------------------------------------


async def test_catalogue_admin_creates_updates_and_refuses_duplicates(clients):
    lead, developer = clients["lead"], clients["developer"]
    team = await lead.CreateTeam(name=f"Team {uuid.uuid4().hex[:6]}", slack_channel="#t")
    await fails(lead.CreateTeam(name=team.name), grpc.StatusCode.ALREADY_EXISTS, "TEAM_EXISTS")
    admin = clients["admin"]  # environments are admin only
    environment = await admin.CreateEnvironment(
        name=f"qa-{uuid.uuid4().hex[:6]}", environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    assert environment.environment_type == S.ENVIRONMENT_TYPE_STAGING and environment.is_active
    await fails(
        admin.CreateEnvironment(name="x", environment_type=0), grpc.StatusCode.INVALID_ARGUMENT
    )
    name = f"billing-{uuid.uuid4().hex[:6]}"
    create = {
        "name": name,
        "team_id": team.id,
        "request_id": str(uuid.uuid4()),
        "repository_url": "https://git.example/billing",
    }
    service = await lead.CreateService(**create)
    assert (await lead.CreateService(**create)) == service  # a retry
    await fails(
        lead.CreateService(name=name, team_id=team.id),
        grpc.StatusCode.ALREADY_EXISTS,
        "SERVICE_EXISTS",
    )
    await fails(
        lead.CreateService(name="Bad Name", team_id=team.id), grpc.StatusCode.INVALID_ARGUMENT
    )
    await fails(
        lead.CreateService(name="orphan", team_id=str(uuid.uuid4())),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    renamed = await lead.UpdateService(
        service=common_pb2.Service(id=service.id, slack_channel="#billing", is_active=False),
        update_mask=field_mask_pb2.FieldMask(paths=["slack_channel", "is_active"]),
    )
    assert (renamed.slack_channel, renamed.is_active, renamed.name) == ("#billing", False, name)
    await fails(
        lead.UpdateService(
            service=common_pb2.Service(id=service.id),
            update_mask=field_mask_pb2.FieldMask(paths=["created_at"]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    runbook = await lead.CreateRunbook(
        title="Billing on-call",
        content="# Billing\n\nSteps.",
        service_id=service.id,
        tags=["billing", "on-call"],
    )
    assert list(runbook.tags) == ["billing", "on-call"]
    edited = await lead.UpdateRunbook(
        runbook=common_pb2.Runbook(id=runbook.id, tags=["billing"]),
        update_mask=field_mask_pb2.FieldMask(paths=["tags"]),
    )
    assert list(edited.tags) == ["billing"] and edited.title == "Billing on-call"
    for call in (
        developer.CreateTeam(name="nope"),
        developer.CreateRunbook(title="t", content="c"),
        clients["viewer"].UpdateService(service=common_pb2.Service(id=service.id)),
    ):
        await fails(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    await fails(
        lead.CreateRelease(service_id=service.id, version="1.0.0"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SERVICE_INACTIVE",
    )


async def test_two_sweepers_at_once_fail_a_stage_once(database, clients, service_id):
    """Replica safety: concurrent sweeps (as two processes would run them) act once."""
    from deploy_svc.deployments import fail_timed_out_stages
    from shared.persistence.models import AuditLog, PipelineStage

    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    async with database.transaction() as session:
        stage = await session.get(PipelineStage, uuid.UUID(build.id))
        stage.timeout_seconds = 1
        stage.started_at = stage.started_at.replace(year=stage.started_at.year - 1)

    async def sweep() -> int:
        async with database.transaction() as session:
            return await fail_timed_out_stages(session)

    # The servers' own sweepers may get there first; together, exactly one acts.
    await asyncio.gather(sweep(), sweep(), sweep())
    async with database.transaction() as session:
        timeouts = await session.scalar(
            select(func.count())
            .select_from(AuditLog)
            .where(AuditLog.action == "timeout", AuditLog.resource_id == build.id)
        )
    assert timeouts == 1
    ended = await developer.GetDeployment(deployment_id=deployment.id)
    assert ended.status == S.DEPLOYMENT_STATUS_FAILED


async def test_the_first_watchers_deadline_does_not_bind_later_watchers(
    db_url, tokens, clients, service_id
):
    """The process's LISTEN task outlives the call that started it."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    fresh = await RelmanProcess.start(
        ["-m", "deploy_svc"], env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0")
    )
    try:
        address = client_address((await fresh.wait_listening("deploy_svc"))["deploy_svc"])
        async with grpc.aio.insecure_channel(address) as channel:
            watcher = Client(channel, tokens[Role.DEVELOPER])
            request = deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id)
            short = watcher.stub.WatchDeployment(request, metadata=watcher.auth, timeout=1)
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                async for _ in short:
                    pass
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            later = watcher.stub.WatchDeployment(request, metadata=watcher.auth, timeout=60)
            assert (await later.read()).status == S.DEPLOYMENT_STATUS_PENDING
            await developer.UpdatePipelineStage(
                stage_id=deployment.stages[0].id, status=S.STAGE_STATUS_RUNNING
            )
            assert (await later.read()).status == S.DEPLOYMENT_STATUS_IN_PROGRESS
            later.cancel()
    finally:
        await fresh.stop()
