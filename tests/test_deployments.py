"""DeployService through real channels: the life of a release, and every rule under attack."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from deploy_svc import deployments
from relman.v1 import common_pb2
from shared.devtools.seed import seed_id
from shared.framework.errors import NotFound
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import AuditLog, Deployment, Release
from tests.deploying import (
    DEV,
    PROD,
    STAGING,
    S,
    deployed,
    production_requiring,
    release_status,
    run_all_stages,
)
from tests.harness import (
    RELEASE_STATUS_MISMATCHES,
    error_details,
    fails,
    runtime_url,
    waiting_on_locks,
)

# -- the whole life ------------------------------------------------------------------------


async def test_the_life_of_a_release(clients, service_id, database):
    developer, lead, reviewer = clients["developer"], clients["lead"], clients["reviewer"]
    release = await developer.CreateRelease(
        service_id=service_id, version="1.0.0", release_notes="First.", git_commit="a1b2c3d"
    )
    assert release.status == S.RELEASE_STATUS_DRAFT

    for environment, after in ((DEV, "testing"), (STAGING, "testing")):
        deployment = await developer.PromoteRelease(
            release_id=release.id, target_environment_id=environment
        )
        assert deployment.status == S.DEPLOYMENT_STATUS_PENDING
        assert [s.name for s in deployment.stages] == [
            "build",
            "test",
            "security_scan",
            "deploy",
            "smoke_test",
        ]
        assert await release_status(developer, release.id) == "promoted"
        first = deployment.stages[0]
        await developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
        assert await release_status(developer, release.id) == "in_progress"
        running = await developer.GetDeployment(deployment_id=deployment.id)
        assert running.status == S.DEPLOYMENT_STATUS_IN_PROGRESS
        assert running.HasField("deployed_at")
        await developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED)
        await run_all_stages(developer, type(deployment)(stages=deployment.stages[1:]))
        done = await developer.GetDeployment(
            deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED
        assert {s.status for s in done.stages} == {S.STAGE_STATUS_SUCCEEDED}
        assert all(s.completed_at.ToDatetime() >= s.started_at.ToDatetime() for s in done.stages)
        assert await release_status(developer, release.id) == after

    marco = str(seed_id("user", "marco"))
    production = await lead.PromoteRelease(
        release_id=release.id, target_environment_id=PROD, reviewer_ids=[marco]
    )
    assert production.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    assert await release_status(lead, release.id) == "promoted"
    full = await lead.GetDeployment(deployment_id=production.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert [(a.approver_id, a.status) for a in full.approvals] == [
        (marco, S.APPROVAL_STATUS_PENDING)
    ]
    await fails(
        lead.UpdatePipelineStage(stage_id=production.stages[0].id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AWAITING_APPROVAL",
    )

    vote = await reviewer.ApproveDeployment(deployment_id=production.id, notes="Looks good.")
    assert vote.status == S.APPROVAL_STATUS_APPROVED and vote.HasField("approved_at")
    assert (await lead.GetDeployment(deployment_id=production.id)).status == (
        S.DEPLOYMENT_STATUS_PENDING
    )
    await run_all_stages(lead, production)
    assert await release_status(lead, release.id) == "completed"

    live = await lead.ListLiveDeployments(service_id=service_id)
    where = {item.environment_id: item for item in live.live_deployments}
    assert set(where) == {DEV, STAGING, PROD}
    assert all(item.live_release.version == "1.0.0" for item in where.values())
    assert all(not item.HasField("active_deployment") for item in where.values())

    async with database.transaction() as session:
        actions = list(
            await session.scalars(
                select(AuditLog.action)
                .where(AuditLog.resource_id.in_([release.id, production.id]))
                .order_by(AuditLog.created_at)
            )
        )
    assert actions == ["create", "promote", "approve"]


# -- promotion order and permissions -----------------------------------------------------------


async def test_promotion_order_names_the_missing_environment(clients, service_id):
    developer, lead = clients["developer"], clients["lead"]
    release = await developer.CreateRelease(service_id=service_id, version="2.0.0")
    error = await fails(
        developer.PromoteRelease(release_id=release.id, target_environment_id=STAGING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROMOTION_ORDER",
    )
    assert error_details(error)[0].metadata["missing_environment_type"] == "development"
    await deployed(developer, service_id, "2.0.1", DEV)
    error = await fails(
        lead.PromoteRelease(release_id=release.id, target_environment_id=PROD),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROMOTION_ORDER",
    )
    assert error_details(error)[0].metadata["missing_environment_type"] == "staging"
    assert await release_status(developer, release.id) == "draft"  # nothing was written


async def test_developers_do_not_deploy_to_production(clients, service_id):
    developer = clients["developer"]
    release = await deployed(developer, service_id, "1.0.0", DEV, STAGING)
    error = await fails(
        developer.PromoteRelease(release_id=release.id, target_environment_id=PROD),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    assert error_details(error)[0].metadata["role"] == "developer"
    await fails(
        clients["viewer"].CreateRelease(service_id=service_id, version="9.0.0"),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_PERMISSION",
    )


async def test_reviewers_must_be_other_active_leads_in_production(clients, service_id):
    lead = clients["lead"]
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    for reviewers, field in [
        ([str(seed_id("user", "priya"))], "reviewer_ids[0]"),  # a developer
        ([str(seed_id("user", "lena"))], "reviewer_ids[0]"),  # the deployer
        ([str(uuid.uuid4())], "reviewer_ids[0]"),  # nobody
        ([str(seed_id("user", "marco"))] * 2, "reviewer_ids"),
    ]:
        error = await fails(
            lead.PromoteRelease(
                release_id=release.id, target_environment_id=PROD, reviewer_ids=reviewers
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == [field]
    await fails(
        lead.PromoteRelease(
            release_id=release.id,
            target_environment_id=DEV,
            reviewer_ids=[str(seed_id("user", "marco"))],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# -- one active deployment -------------------------------------------------------------------


async def test_twenty_concurrent_promotions_make_exactly_one_deployment(
    clients, service_id, database
):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="3.0.0")
    results = await asyncio.gather(
        *(
            developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(winners) == 1 and len(losers) == 19
    for error in losers:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        info, _ = error_details(error)
        assert info.reason == "ACTIVE_DEPLOYMENT_EXISTS"
        assert info.metadata["blocking_deployment_id"] == winners[0].id
    async with database.transaction() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(Deployment)
            .where(Deployment.service_id == uuid.UUID(service_id))
        )
    assert count == 1


async def test_the_database_refuses_a_second_active_deployment(db_url, clients, service_id):
    """The partial unique index holds even against a writer that skips the domain."""
    release = await clients["developer"].CreateRelease(service_id=service_id, version="1.0.0")
    first = await clients["developer"].PromoteRelease(
        release_id=release.id, target_environment_id=DEV
    )
    connection = await asyncpg.connect(libpq_dsn(db_url))
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(
                "INSERT INTO deployments (release_id, service_id, environment_id, deployed_by)"
                " SELECT release_id, service_id, environment_id, deployed_by"
                " FROM deployments WHERE id = $1",
                uuid.UUID(first.id),
            )
        with pytest.raises(asyncpg.ForeignKeyViolationError):  # service must be the release's
            await connection.execute(
                "UPDATE deployments SET service_id = $2 WHERE id = $1",
                uuid.UUID(first.id),
                seed_id("service", "auth-service"),
            )
    finally:
        await connection.close()


# -- approvals -----------------------------------------------------------------------------------


async def waiting_production(clients, service_id, version="1.0.0", reviewers=(), target=PROD):
    lead = clients["lead"]
    release = await deployed(lead, service_id, version, DEV, STAGING)
    return await lead.PromoteRelease(
        release_id=release.id, target_environment_id=target, reviewer_ids=list(reviewers)
    )


async def test_votes_are_final_and_never_the_deployers(clients, service_id):
    deployment = await waiting_production(clients, service_id)
    await fails(
        clients["lead"].ApproveDeployment(deployment_id=deployment.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "SELF_APPROVAL",
    )
    await fails(
        clients["developer"].ApproveDeployment(deployment_id=deployment.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_PERMISSION",
    )
    await clients["reviewer"].ApproveDeployment(deployment_id=deployment.id)
    # Now pending (one approval needed): a second vote is on a deployment no longer waiting.
    await fails(
        clients["admin"].ApproveDeployment(deployment_id=deployment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_AWAITING_APPROVAL",
    )
    await fails(
        clients["reviewer"].RejectDeployment(deployment_id=deployment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_AWAITING_APPROVAL",
    )


async def test_one_rejection_ends_the_deployment(clients, service_id):
    deployment = await waiting_production(clients, service_id)
    vote = await clients["admin"].RejectDeployment(
        deployment_id=deployment.id, notes="Not this week."
    )
    assert vote.status == S.APPROVAL_STATUS_REJECTED
    ended = await clients["lead"].GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert ended.status == S.DEPLOYMENT_STATUS_REJECTED
    assert {s.status for s in ended.stages} == {S.STAGE_STATUS_SKIPPED}
    assert await release_status(clients["lead"], ended.release_id) == "testing"
    await fails(
        clients["reviewer"].ApproveDeployment(deployment_id=deployment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_AWAITING_APPROVAL",
    )


async def test_votes_only_on_deployments_awaiting_approval(clients, service_id):
    release = await clients["developer"].CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await clients["developer"].PromoteRelease(
        release_id=release.id, target_environment_id=DEV
    )
    await fails(
        clients["reviewer"].ApproveDeployment(deployment_id=deployment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_AWAITING_APPROVAL",
    )


async def test_required_approvals_and_concurrent_votes(clients, service_id):
    """With a policy of two approvals: one vote is not enough, and votes cast at once count
    once each; the same approver voting twice at once is refused once."""
    lead, marco, admin = clients["lead"], clients["reviewer"], clients["admin"]
    production = await production_requiring(admin, 2)
    first = await waiting_production(clients, service_id, "1.0.0", target=production)
    results = await asyncio.gather(
        marco.ApproveDeployment(deployment_id=first.id),
        marco.ApproveDeployment(deployment_id=first.id),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["AioRpcError", "Approval"]
    refused = next(r for r in results if isinstance(r, Exception))
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
    state = await lead.GetDeployment(deployment_id=first.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    assert len(state.approvals) == 1

    await admin.ApproveDeployment(deployment_id=first.id)
    state = await lead.GetDeployment(deployment_id=first.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert state.status == S.DEPLOYMENT_STATUS_PENDING
    assert [a.status for a in state.approvals] == [S.APPROVAL_STATUS_APPROVED] * 2


# -- stages and cancel -------------------------------------------------------------------------


async def test_stage_rules(clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.CreateDeployment(
        release_id=release.id, environment_id=DEV, stage_names=["build", "migrate", "deploy"]
    )
    build, migrate, deploy = deployment.stages
    await fails(
        developer.UpdatePipelineStage(stage_id=migrate.id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PREVIOUS_STAGE_NOT_DONE",
    )
    await fails(
        developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_SUCCEEDED),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INVALID_STAGE_TRANSITION",
    )
    error = await fails(
        developer.UpdatePipelineStage(stage_id=build.id, status=0), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [v.field for v in error_details(error)[1]] == ["status"]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    await fails(
        developer.UpdatePipelineStage(
            stage_id=build.id, status=S.STAGE_STATUS_SUCCEEDED, output="x" * (64 * 1024 + 1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await developer.UpdatePipelineStage(
        stage_id=build.id, status=S.STAGE_STATUS_SUCCEEDED, output="x" * (64 * 1024)
    )
    await developer.UpdatePipelineStage(stage_id=migrate.id, status=S.STAGE_STATUS_SKIPPED)
    await developer.UpdatePipelineStage(stage_id=deploy.id, status=S.STAGE_STATUS_RUNNING)
    failed = await developer.UpdatePipelineStage(
        stage_id=deploy.id, status=S.STAGE_STATUS_FAILED, output="rollout stuck"
    )
    assert failed.HasField("completed_at") and failed.output == "rollout stuck"
    ended = await developer.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert ended.status == S.DEPLOYMENT_STATUS_FAILED
    assert [s.status for s in ended.stages] == [
        S.STAGE_STATUS_SUCCEEDED,
        S.STAGE_STATUS_SKIPPED,
        S.STAGE_STATUS_FAILED,
    ]
    assert await release_status(developer, release.id) == "draft"
    await fails(
        developer.UpdatePipelineStage(stage_id=deploy.id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEPLOYMENT_ENDED",
    )


async def test_a_failed_stage_skips_the_rest(clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_FAILED)
    ended = await developer.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert ended.status == S.DEPLOYMENT_STATUS_FAILED and ended.HasField("completed_at")
    assert [s.status for s in ended.stages[1:]] == [S.STAGE_STATUS_SKIPPED] * 4


async def test_cancel_an_active_deployment(clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    await developer.UpdatePipelineStage(
        stage_id=deployment.stages[0].id, status=S.STAGE_STATUS_RUNNING
    )
    cancelled = await developer.CancelDeployment(deployment_id=deployment.id, reason="wrong build")
    assert cancelled.status == S.DEPLOYMENT_STATUS_CANCELLED
    assert {s.status for s in cancelled.stages} == {S.STAGE_STATUS_SKIPPED}
    assert await release_status(developer, release.id) == "draft"
    await fails(
        developer.CancelDeployment(deployment_id=deployment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEPLOYMENT_NOT_ACTIVE",
    )
    again = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    assert again.status == S.DEPLOYMENT_STATUS_PENDING  # the slot is free again


async def test_racing_moves_of_one_stage_write_once(clients, service_id, database):
    """UpdatePipelineStage takes no lock on its read: the write holds only if the stage
    is still as read. Ten callers starting the same stage at once: one moves it, nine
    find it running (INVALID_STAGE_TRANSITION), one audit row; ten failing the running
    stage while ten cancel the deployment: it ends once, as one of them."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    started = await asyncio.gather(
        *(
            developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
            for _ in range(10)
        ),
        return_exceptions=True,
    )
    refused = [r for r in started if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 9, started
    assert {error_details(r)[0].reason for r in refused} == {"INVALID_STAGE_TRANSITION"}
    async with database.transaction() as session:
        rows = (
            await session.execute(
                select(AuditLog.ip_address, AuditLog.origin).where(
                    AuditLog.resource_id == build.id, AuditLog.action == "update"
                )
            )
        ).all()
    # One row, the caller's address as it came (no netmask), relman's own record.
    assert [(row.ip_address, row.origin) for row in rows] == [("127.0.0.1", "relman")]

    ended = await asyncio.gather(
        *(
            call
            for _ in range(10)
            for call in (
                developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_FAILED),
                developer.CancelDeployment(deployment_id=deployment.id),
            )
        ),
        return_exceptions=True,
    )
    assert len([r for r in ended if not isinstance(r, grpc.aio.AioRpcError)]) == 1, ended
    assert {error_details(r)[0].reason for r in ended if isinstance(r, grpc.aio.AioRpcError)} <= {
        "DEPLOYMENT_ENDED",
        "DEPLOYMENT_NOT_ACTIVE",
        "INVALID_STAGE_TRANSITION",
    }
    final = await developer.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert final.status in (S.DEPLOYMENT_STATUS_FAILED, S.DEPLOYMENT_STATUS_CANCELLED)
    assert final.stages[0].status in (S.STAGE_STATUS_FAILED, S.STAGE_STATUS_SKIPPED)
    assert {s.status for s in final.stages[1:]} == {S.STAGE_STATUS_SKIPPED}


async def _stage_row_held(db_url, stage_id: str):
    """A session of the owner holding a stage's row (FOR UPDATE) in an open transaction,
    so that a move of that stage waits at its write, after its read."""
    blocker = await asyncpg.connect(libpq_dsn(db_url))
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute(
        "SELECT FROM pipeline_stages WHERE id = $1 FOR UPDATE", uuid.UUID(stage_id)
    )
    return blocker, transaction


async def test_a_cancel_never_overwrites_a_stage_that_moved_meanwhile(clients, service_id, db_url):
    """A stage move read before a cancel and written after it started: the cancel waits
    for the move (its deployment's row, held by the move's write), then skips what is
    left; the stage the caller was told succeeded stays succeeded."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    build = deployment.stages[0]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    blocker, held = await _stage_row_held(db_url, build.id)
    try:
        succeed = asyncio.create_task(
            developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_SUCCEEDED)
        )
        await waiting_on_locks(blocker, 1)
        cancel = asyncio.create_task(developer.CancelDeployment(deployment_id=deployment.id))
        await waiting_on_locks(blocker, 2)
        await held.rollback()
        moved, cancelled = await asyncio.gather(succeed, cancel)
    finally:
        await blocker.close()
    assert moved.status == S.STAGE_STATUS_SUCCEEDED
    assert cancelled.status == S.DEPLOYMENT_STATUS_CANCELLED
    final = await developer.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert final.stages[0].status == S.STAGE_STATUS_SUCCEEDED
    assert {s.status for s in final.stages[1:]} == {S.STAGE_STATUS_SKIPPED}


async def test_a_policy_that_makes_deployments_wait_waits_for_a_start_in_flight(
    clients, service_id, db_url
):
    """A policy that comes to require approvals sends deployments that have not started
    back to awaiting_approval. A first stage's start written meanwhile holds its
    deployment's row from before its stage's: the policy's change waits for it and then
    finds the deployment started, so it runs on; never a stage running under a
    deployment that waits for votes."""
    developer, admin = clients["developer"], clients["admin"]
    staging = await admin.CreateEnvironment(
        name=f"stg-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    release = await deployed(developer, service_id, "1.0.0", DEV)
    deployment = await developer.PromoteRelease(
        release_id=release.id, target_environment_id=staging.id
    )
    assert deployment.status == S.DEPLOYMENT_STATUS_PENDING
    first = deployment.stages[0]
    blocker, held = await _stage_row_held(db_url, first.id)
    try:
        start = asyncio.create_task(
            developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
        )
        await waiting_on_locks(blocker, 1)
        tighten = asyncio.create_task(
            admin.UpdateEnvironmentPolicy(
                policy=common_pb2.EnvironmentPolicy(
                    environment_id=staging.id, required_approvals=1
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["required_approvals"]),
            )
        )
        await waiting_on_locks(blocker, 2)  # the policy waits for the start
        await held.rollback()
        started, _ = await asyncio.gather(start, tighten)
    finally:
        await blocker.close()
    assert started.status == S.STAGE_STATUS_RUNNING
    final = await developer.GetDeployment(deployment_id=deployment.id)
    assert final.status == S.DEPLOYMENT_STATUS_IN_PROGRESS
    await developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED)


async def test_two_deployments_of_a_release_ending_at_once_both_count_in_its_status(
    clients, service_id, db_url
):
    """Two deployments of one release, in two development environments, end at the same
    moment: each move's statement starts, then waits for a session holding both
    deployments' rows, so neither statement's snapshot holds the other's end. The status
    is derived after the release's row is locked (migration 015): the second to derive
    sees both ends, testing. Derived from the statements' snapshots it stayed in_progress
    (and a status each derivation left unchanged never locked the release's row, hence
    the deployments' rows as the barrier)."""
    developer, admin = clients["developer"], clients["admin"]
    other_development = await admin.CreateEnvironment(
        name=f"dev-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment_ids, last_stages = [], []
    for environment in (DEV, other_development.id):
        deployment = await developer.CreateDeployment(
            release_id=release.id, environment_id=environment, stage_names=["deploy"]
        )
        stage = deployment.stages[0]
        await developer.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_RUNNING)
        deployment_ids.append(uuid.UUID(deployment.id))
        last_stages.append(stage.id)
    assert await release_status(developer, release.id) == "in_progress"

    blocker = await asyncpg.connect(libpq_dsn(db_url))
    try:
        held = blocker.transaction()
        await held.start()
        await blocker.execute(
            "SELECT FROM deployments WHERE id = ANY ($1::uuid[]) FOR UPDATE", deployment_ids
        )
        ends = [
            asyncio.create_task(
                developer.UpdatePipelineStage(stage_id=stage_id, status=S.STAGE_STATUS_SUCCEEDED)
            )
            for stage_id in last_stages
        ]
        await waiting_on_locks(blocker, 2)
        await held.commit()
        await asyncio.gather(*ends)
        wrong = await blocker.fetch(RELEASE_STATUS_MISMATCHES)
    finally:
        await blocker.close()
    assert [tuple(row) for row in wrong if str(row["id"]) == release.id] == []
    assert await release_status(developer, release.id) == "testing"


async def test_a_release_status_follows_a_deployment_changed_outside_the_domain(
    clients, service_id, db_url
):
    """With the services' own credentials and no domain code, the release's status still
    follows its deployment (migration 015's trigger); a REPEATABLE READ or SERIALIZABLE
    change, whose snapshot predates the release's lock, is refused whole."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.CreateDeployment(
        release_id=release.id, environment_id=DEV, stage_names=["deploy"]
    )
    assert await release_status(developer, release.id) == "promoted"
    cancel = """
        WITH skipped AS (UPDATE pipeline_stages SET status = 'skipped', completed_at = now()
                         WHERE deployment_id = $1)
        UPDATE deployments SET status = 'cancelled', completed_at = now() WHERE id = $1"""
    connection = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        for isolation in ("repeatable_read", "serializable"):
            with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="READ COMMITTED"):
                async with connection.transaction(isolation=isolation):
                    await connection.execute(cancel, uuid.UUID(deployment.id))
        assert await release_status(developer, release.id) == "promoted"
        await connection.execute(cancel, uuid.UUID(deployment.id))
    finally:
        await connection.close()
    assert await release_status(developer, release.id) == "draft"


async def test_a_deployment_not_found_keeps_its_pooled_connection(db_url):
    """GetDeployment(FULL) of an unknown id is NOT_FOUND, and the pooled connection that
    answered it serves the next read (no reconnection per refused read)."""
    database = Database(runtime_url(db_url), pool_size=1)
    try:
        async with database.autocommit_connection(None) as connection:
            before = await connection.fetchval("SELECT pg_backend_pid()")
        for _ in range(3):
            with pytest.raises(NotFound):
                await deployments.get_full_deployment(database, uuid.uuid4())
        async with database.autocommit_connection(None) as connection:
            assert await connection.fetchval("SELECT pg_backend_pid()") == before
    finally:
        await database.dispose()


async def test_a_deployment_not_found_on_the_replica_keeps_its_pooled_connection(db_url):
    """The same with reads on a replica (DATABASE_READ_URL, here naming the primary): a
    refused read does not cost the replica's pool a connection either."""
    database = Database(runtime_url(db_url), pool_size=1, read_url=runtime_url(db_url))
    try:
        await database.replica.refresh()
        assert database.replica.serving()
        async with database.replica_read_connection() as connection:
            before = await connection.fetchval("SELECT pg_backend_pid()")
        for _ in range(3):
            with pytest.raises(NotFound):
                await deployments.get_full_deployment(database, uuid.uuid4())
        async with database.replica_read_connection() as connection:
            assert await connection.fetchval("SELECT pg_backend_pid()") == before
    finally:
        await database.dispose()


# -- idempotency and atomicity --------------------------------------------------------------------


async def test_retries_with_a_request_id_create_nothing_new(clients, service_id, database):
    developer = clients["developer"]
    request_id = str(uuid.uuid4())
    first = await developer.CreateRelease(
        service_id=service_id, version="1.0.0", request_id=request_id
    )
    again = await developer.CreateRelease(
        service_id=service_id, version="1.0.0", request_id=request_id
    )
    assert first == again and first.id != request_id  # a request id is not the resource's id
    await fails(
        developer.CreateRelease(service_id=service_id, version="1.0.1", request_id=request_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )

    promote_id = str(uuid.uuid4())
    deployment = await developer.PromoteRelease(
        release_id=first.id, target_environment_id=DEV, request_id=promote_id
    )
    retried = await developer.PromoteRelease(
        release_id=first.id, target_environment_id=DEV, request_id=promote_id
    )
    assert deployment == retried and deployment.id != promote_id
    await fails(
        developer.PromoteRelease(
            release_id=first.id, target_environment_id=STAGING, request_id=promote_id
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    # Another caller's request_id is a request of its own, judged on its own merits: no one
    # gets back what someone else made.
    await fails(
        clients["lead"].PromoteRelease(
            release_id=first.id, target_environment_id=DEV, request_id=promote_id
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACTIVE_DEPLOYMENT_EXISTS",
    )
    await fails(
        clients["lead"].CreateRelease(
            service_id=service_id, version="1.0.0", request_id=request_id
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "RELEASE_EXISTS",
    )
    await developer.CancelDeployment(deployment_id=deployment.id)
    create_id = str(uuid.uuid4())
    created = await developer.CreateDeployment(
        release_id=first.id, environment_id=DEV, request_id=create_id
    )
    assert (
        await developer.CreateDeployment(
            release_id=first.id, environment_id=DEV, request_id=create_id
        )
    ).id == created.id
    async with database.transaction() as session:
        releases = await session.scalar(
            select(func.count())
            .select_from(Release)
            .where(Release.service_id == uuid.UUID(service_id))
        )
        deployments = await session.scalar(
            select(func.count())
            .select_from(Deployment)
            .where(Deployment.service_id == uuid.UUID(service_id))
        )
    assert (releases, deployments) == (1, 2)


async def test_a_change_and_its_audit_row_commit_together(db_url, clients, service_id, database):
    """Make the audit insert fail after the state change: neither survives."""
    connection = await asyncpg.connect(libpq_dsn(db_url))
    marker = f"9.9.{uuid.uuid4().int % 10_000}-auditfail"
    await connection.execute(f"""
        CREATE FUNCTION fail_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.details->>'version' = '{marker}' THEN
                RAISE EXCEPTION 'audit insert refused for the test';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER fail_audit BEFORE INSERT ON audit_logs
            FOR EACH ROW EXECUTE FUNCTION fail_audit();
    """)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await clients["developer"].CreateRelease(service_id=service_id, version=marker)
    finally:
        await connection.execute(
            "DROP TRIGGER fail_audit ON audit_logs; DROP FUNCTION fail_audit();"
        )
        await connection.close()
    async with database.transaction() as session:
        assert await session.scalar(select(Release).where(Release.version == marker)) is None
        assert (
            await session.scalar(
                select(func.count())
                .select_from(AuditLog)
                .where(AuditLog.details["version"].astext == marker)
            )
            == 0
        )


# -- reads -------------------------------------------------------------------------------------


async def test_deployment_views(clients, service_id):
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    basic = await developer.GetDeployment(deployment_id=deployment.id)
    assert basic.release_id == release.id and len(basic.stages) == 0
    with_stages = await developer.GetDeployment(
        deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    assert [s.order for s in with_stages.stages] == [0, 1, 2, 3, 4]
    assert len(with_stages.approvals) == 0
    full = await developer.GetDeployment(deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert len(full.stages) == 5 and list(full.metrics) == [] and list(full.approvals) == []
    await fails(
        developer.GetDeployment(deployment_id=deployment.id, view=7),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_lists_filter_and_page(clients, service_id):
    developer = clients["developer"]
    versions = [f"1.{minor}.0" for minor in range(5)]
    for version in versions:
        await developer.CreateRelease(service_id=service_id, version=version)
    await deployed(developer, service_id, "2.0.0", DEV)
    seen, token = [], ""
    while True:
        page = await developer.ListReleases(service_id=service_id, page_size=2, page_token=token)
        assert page.total_size == 6
        seen += [r.version for r in page.releases]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["2.0.0", *reversed(versions)]  # newest first, each once
    testing = await developer.ListReleases(service_id=service_id, status=S.RELEASE_STATUS_TESTING)
    assert [r.version for r in testing.releases] == ["2.0.0"] and testing.total_size == 1
    deployments = await developer.ListDeployments(
        service_id=service_id, status=S.DEPLOYMENT_STATUS_SUCCEEDED
    )
    assert deployments.total_size == 1 and deployments.deployments[0].environment_id == DEV
    none = await developer.ListDeployments(service_id=service_id, environment_id=PROD)
    assert none.total_size == 0 and not none.next_page_token
    first = await developer.ListReleases(service_id=service_id, page_size=1)
    await fails(
        developer.ListReleases(page_size=1, page_token=first.next_page_token),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_FILTER_MISMATCH",
    )
    await fails(developer.ListReleases(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT)


async def test_catalogue_reads(clients):
    viewer = clients["viewer"]
    environments = await viewer.ListEnvironments()
    assert {e.name for e in environments.environments} >= {"development", "staging", "production"}
    teams = await viewer.ListTeams()
    assert {t.name for t in teams.teams} >= {"Platform", "Backend", "Frontend"}
    frontend = await viewer.ListServices(team_id=str(seed_id("team", "Frontend")))
    assert [s.name for s in frontend.services] == ["user-dashboard"]
    rollback = await viewer.ListRunbooks(tag="rollback")
    assert [r.title for r in rollback.runbooks] == ["Rollback procedure"]
    production = await viewer.ListRunbooks(environment_id=PROD)
    assert production.total_size == 2


# -- bad input changes nothing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "code"),
    [
        ({"service_id": "nope", "version": "1.0.0"}, "service_id", "INVALID_ARGUMENT"),
        ({"version": "1.0"}, "version", "INVALID_ARGUMENT"),
        ({"version": "v1.0.0"}, "version", "INVALID_ARGUMENT"),
        ({"version": "1.0.0-" + "a" * 50}, "version", "INVALID_ARGUMENT"),
        ({"version": ""}, "version", "INVALID_ARGUMENT"),
        ({"version": "1.0.0", "release_notes": "a\x00b"}, "release_notes", "INVALID_ARGUMENT"),
        ({"version": "1.0.0", "git_commit": "xyz"}, "git_commit", "INVALID_ARGUMENT"),
        ({"version": "1.0.0", "request_id": "123"}, "request_id", "INVALID_ARGUMENT"),
        ({"service_id": str(uuid.uuid4()), "version": "1.0.0"}, None, "NOT_FOUND"),
    ],
)
async def test_bad_release_input_changes_nothing(
    clients, service_id, database, fields, field, code
):
    request = {"service_id": service_id, **fields}
    error = await fails(
        clients["developer"].CreateRelease(**request), getattr(grpc.StatusCode, code)
    )
    if field is not None:
        assert [v.field for v in error_details(error)[1]] == [field]
    async with database.transaction() as session:
        assert (
            await session.scalar(
                select(func.count())
                .select_from(Release)
                .where(Release.service_id == uuid.UUID(service_id))
            )
            == 0
        )


async def test_duplicate_version_is_already_exists(clients, service_id):
    await clients["developer"].CreateRelease(service_id=service_id, version="1.0.0")
    error = await fails(
        clients["developer"].CreateRelease(service_id=service_id, version="1.0.0"),
        grpc.StatusCode.ALREADY_EXISTS,
        "RELEASE_EXISTS",
    )
    assert error_details(error)[0].metadata["service_id"] == service_id


@pytest.mark.parametrize(
    ("rpc", "fields", "code"),
    [
        ("GetRelease", {"release_id": "x"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("GetRelease", {"release_id": str(uuid.uuid4())}, grpc.StatusCode.NOT_FOUND),
        ("GetDeployment", {"deployment_id": str(uuid.uuid4())}, grpc.StatusCode.NOT_FOUND),
        (
            "PromoteRelease",
            {"release_id": str(uuid.uuid4()), "target_environment_id": DEV},
            grpc.StatusCode.NOT_FOUND,
        ),
        ("PromoteRelease", {"release_id": str(uuid.uuid4())}, grpc.StatusCode.INVALID_ARGUMENT),
        (
            "CreateDeployment",
            {"release_id": str(uuid.uuid4()), "environment_id": DEV, "stage_names": ["a", "a"]},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "CreateDeployment",
            {"release_id": str(uuid.uuid4()), "environment_id": DEV, "stage_names": [""]},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "UpdatePipelineStage",
            {"stage_id": str(uuid.uuid4()), "status": S.STAGE_STATUS_RUNNING},
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "UpdatePipelineStage",
            {"stage_id": str(uuid.uuid4()), "status": 99},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("CancelDeployment", {"deployment_id": str(uuid.uuid4())}, grpc.StatusCode.NOT_FOUND),
        ("ApproveDeployment", {"deployment_id": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ("ListReleases", {"status": 42}, grpc.StatusCode.INVALID_ARGUMENT),
        ("ListDeployments", {"release_id": "not-a-uuid"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("ListRunbooks", {"tag": "a\x00"}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_input_gets_the_right_code(clients, rpc, fields, code):
    await fails(getattr(clients["lead"], rpc)(**fields), code)


# -- invariants over everything the tests above did ---------------------------------------------


async def test_every_release_status_matches_the_derivation_rule(db_url):
    """Runs last in this module: after all the lives above, no release disagrees with §4."""
    connection = await asyncpg.connect(libpq_dsn(db_url))
    try:
        wrong = await connection.fetch(RELEASE_STATUS_MISMATCHES)
        active = await connection.fetch(
            "SELECT service_id, environment_id FROM deployments"
            " WHERE status IN ('pending', 'awaiting_approval', 'in_progress')"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        )
        self_votes = await connection.fetch(
            "SELECT a.id FROM approvals a JOIN deployments d ON d.id = a.deployment_id"
            " WHERE a.approver_id = d.deployed_by"
        )
    finally:
        await connection.close()
    assert wrong == [] and active == [] and self_votes == []
