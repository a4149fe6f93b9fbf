"""Insiders against the deployment rules (issue 15, attacks 1, 2 and 7).

Each test performs the attack through the API with the insider's own token, asserts the
refusal and that nothing was written, and shows that the legitimate path still works.
The vote tests at the end run two deploy_svc processes on one database, as replicas.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared.persistence.db import libpq_dsn
from shared.persistence.models import STANDARD_STAGES, AuditLog, Deployment, Environment, Role
from tests.deploying import (
    DEV,
    PROD,
    STAGING,
    Client,
    S,
    deployed,
    production_requiring,
    release_status,
    run_all_stages,
)
from tests.harness import (
    bearer,
    client_address,
    error_details,
    fails,
    new_lead,
    start_service,
)


async def deployments_of(database, service_id: str) -> list[str]:
    """The environment ids of the service's deployments, oldest first."""
    async with database.transaction() as session:
        return [
            str(environment_id)
            for environment_id in await session.scalars(
                select(Deployment.environment_id)
                .where(Deployment.service_id == uuid.UUID(service_id))
                .order_by(Deployment.created_at)
            )
        ]


# -- attack 1: stages before production -----------------------------------------------------


async def test_staging_and_production_carry_the_standard_stages(clients, service_id, database):
    """A developer deploys to staging with `stage_names: ["x"]` (or without test and
    security_scan, or with them out of order) so that they never run before production."""
    developer, lead = clients["developer"], clients["lead"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    development = await developer.CreateDeployment(
        release_id=release.id, environment_id=DEV, stage_names=["x"]
    )
    await run_all_stages(developer, development)  # development may run any stages
    for insider, environment, names in (
        (developer, STAGING, ["x"]),
        (developer, STAGING, ["build", "deploy", "smoke_test"]),
        (developer, STAGING, ["test", "build", "security_scan", "deploy", "smoke_test"]),
        (developer, STAGING, ["x", *STANDARD_STAGES]),
        (lead, PROD, ["x"]),
    ):
        error = await fails(
            insider.CreateDeployment(
                release_id=release.id, environment_id=environment, stage_names=names
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["stage_names"], names
    assert await deployments_of(database, service_id) == [DEV]  # nothing written
    assert await release_status(developer, release.id) == "testing"

    # Stages of one's own after the standard five are fine, and open production.
    staging = await developer.CreateDeployment(
        release_id=release.id, environment_id=STAGING, stage_names=[*STANDARD_STAGES, "canary"]
    )
    assert [s.name for s in staging.stages] == [*STANDARD_STAGES, "canary"]
    await run_all_stages(developer, staging)
    production = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    assert production.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    assert [s.name for s in production.stages] == list(STANDARD_STAGES)


async def test_production_needs_every_standard_stage_succeeded_in_staging(
    clients, service_id, database
):
    """A developer marks test and security_scan SKIPPED in staging; the staging deployment
    succeeds, and a lead then tries to promote the release to production."""
    developer, lead = clients["developer"], clients["lead"]
    release = await deployed(developer, service_id, "1.0.0", DEV)
    staging = await developer.PromoteRelease(release_id=release.id, target_environment_id=STAGING)
    build, test, scan, deploy, smoke = staging.stages
    await run_all_stages(developer, type(staging)(stages=[build]))
    for stage in (test, scan):
        await developer.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_SKIPPED)
    await run_all_stages(developer, type(staging)(stages=[deploy, smoke]))
    done = await developer.GetDeployment(deployment_id=staging.id)
    assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED

    for attempt in (
        lead.PromoteRelease(release_id=release.id, target_environment_id=PROD),
        lead.CreateDeployment(release_id=release.id, environment_id=PROD),
    ):
        error = await fails(
            attempt, grpc.StatusCode.FAILED_PRECONDITION, "REQUIRED_STAGES_NOT_PASSED"
        )
        metadata = error_details(error)[0].metadata
        assert metadata["release_id"] == release.id
        assert metadata["stages_not_passed"] == "test,security_scan"
        assert metadata["staging_deployment_id"] == staging.id
    assert await deployments_of(database, service_id) == [DEV, STAGING]  # nothing written
    assert await release_status(lead, release.id) == "testing"

    # The legitimate path: a staging run whose five standard stages all succeeded.
    again = await developer.PromoteRelease(release_id=release.id, target_environment_id=STAGING)
    await run_all_stages(developer, again)
    production = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    assert production.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL


# -- attack 2: environments ---------------------------------------------------------------------


async def test_only_admins_create_environments(clients, service_id, database):
    """A lead creates `prod-eu` with type DEVELOPMENT, to deploy there with no approval."""
    lead, admin = clients["lead"], clients["admin"]
    name = f"prod-eu-{uuid.uuid4().hex[:6]}"
    error = await fails(
        lead.CreateEnvironment(name=name, environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT),
        grpc.StatusCode.PERMISSION_DENIED,
        "MISSING_PERMISSION",
    )
    assert error_details(error)[0].metadata["permission"] == "environments.write"
    async with database.transaction() as session:  # nothing written
        assert await session.scalar(select(Environment.id).where(Environment.name == name)) is None
        assert (
            await session.scalar(
                select(func.count())
                .select_from(AuditLog)
                .where(
                    AuditLog.resource_type == "environment", AuditLog.details["name"].astext == name
                )
            )
            == 0
        )

    # An admin creates it, as production: the lead's deployment there waits for approval.
    environment = await admin.CreateEnvironment(
        name=name, environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    there = await lead.PromoteRelease(release_id=release.id, target_environment_id=environment.id)
    assert there.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL


# -- attack 7: votes -----------------------------------------------------------------------------


async def test_votes_of_deactivated_or_demoted_approvers_do_not_count(
    deploy_channel, tokens, service_id
):
    """With a policy of two approvals: a lead votes and is demoted, another votes and is
    deactivated; the admin's vote then makes one counted approval, not three, and the
    deployment keeps waiting until a second active lead approves."""
    channel = deploy_channel
    auth = auth_pb2_grpc.AuthServiceStub(channel)
    as_admin = bearer(tokens[Role.ADMIN])

    async def lead_of_its_own() -> tuple[str, Client]:
        user_id, token = await new_lead(channel, tokens[Role.ADMIN])
        return user_id, Client(channel, token)

    async def change(user_id: str, field: str, **values) -> None:
        await auth.UpdateUser(
            auth_pb2.UpdateUserRequest(
                user=common_pb2.User(id=user_id, **values),
                update_mask=field_mask_pb2.FieldMask(paths=[field]),
            ),
            metadata=as_admin,
        )

    lead = Client(channel, tokens[Role.LEAD])
    admin = Client(channel, tokens[Role.ADMIN])
    (demoted_id, demoted), (leaving_id, leaving), (_, third) = [
        await lead_of_its_own() for _ in range(3)
    ]
    production = await production_requiring(admin, 2)
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    waiting = await lead.PromoteRelease(release_id=release.id, target_environment_id=production)

    await demoted.ApproveDeployment(deployment_id=waiting.id)
    await change(demoted_id, "role", role=common_pb2.ROLE_DEVELOPER)
    await leaving.ApproveDeployment(deployment_id=waiting.id)
    state = await lead.GetDeployment(deployment_id=waiting.id)
    assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL  # one vote counts
    await change(leaving_id, "is_active", is_active=False)
    await admin.ApproveDeployment(deployment_id=waiting.id)
    state = await lead.GetDeployment(deployment_id=waiting.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    assert [a.status for a in state.approvals] == [S.APPROVAL_STATUS_APPROVED] * 3
    await fails(
        lead.UpdatePipelineStage(stage_id=waiting.stages[0].id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AWAITING_APPROVAL",
    )

    await third.ApproveDeployment(deployment_id=waiting.id)  # two that count
    approved = await lead.GetDeployment(deployment_id=waiting.id)
    assert approved.status == S.DEPLOYMENT_STATUS_PENDING


@pytest.fixture(scope="module")
async def two_replicas(db_url) -> AsyncIterator[list[grpc.aio.Channel]]:
    """Two deploy_svc processes on the test database, a channel to each: a token verified
    by one stays cached there for up to 5 s, whatever the other changes."""
    processes = [await start_service(db_url, "deploy_svc") for _ in range(2)]
    channels = [
        grpc.aio.insecure_channel(client_address(process.addresses["deploy_svc"]))
        for process in processes
    ]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()
        for process in processes:
            assert await process.stop() == 0, process.output


async def test_a_lead_demoted_or_deactivated_on_another_replica_cannot_vote(
    two_replicas, tokens, service_id
):
    """Replica B has verified a lead's token; replica A demotes her (then deactivates
    another); at once, through B, whose cache still says lead, each rejects (a rejection
    ends the deployment at once) and approves: PERMISSION_DENIED APPROVER_NOT_ELIGIBLE, no
    vote recorded, the deployment still waiting."""
    a, b = two_replicas
    admin_on_a = auth_pb2_grpc.AuthServiceStub(a)
    lead = Client(b, tokens[Role.LEAD])
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    waiting = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    for field, change in (
        ("role", common_pb2.User(role=common_pb2.ROLE_DEVELOPER)),
        ("is_active", common_pb2.User(is_active=False)),
    ):
        user_id, token = await new_lead(a, tokens[Role.ADMIN])
        voter = Client(b, token)
        await voter.GetDeployment(deployment_id=waiting.id)  # B verifies the token: a lead
        change.id = user_id
        await admin_on_a.UpdateUser(
            auth_pb2.UpdateUserRequest(
                user=change, update_mask=field_mask_pb2.FieldMask(paths=[field])
            ),
            metadata=bearer(tokens[Role.ADMIN]),
        )
        for vote in (voter.RejectDeployment, voter.ApproveDeployment):
            error = await fails(
                vote(deployment_id=waiting.id),
                grpc.StatusCode.PERMISSION_DENIED,
                "APPROVER_NOT_ELIGIBLE",
            )
            assert error_details(error)[0].metadata["user_id"] == user_id, field
        state = await lead.GetDeployment(deployment_id=waiting.id, view=S.DEPLOYMENT_VIEW_FULL)
        assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL, field
        assert not state.approvals, field


async def test_a_demotion_committing_during_a_vote_is_counted(
    two_replicas, tokens, service_id, db_url
):
    """Two approvals needed, one cast. While that approver's demotion is in flight (a
    transaction holding her row, as UpdateUser's does), a second lead approves: the vote
    waits for the demotion and counts one approval, not two, so the deployment keeps
    waiting; an eligible second approval then opens it."""
    a, _ = two_replicas
    lead = Client(a, tokens[Role.LEAD])
    production = await production_requiring(Client(a, tokens[Role.ADMIN]), 2)
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    waiting = await lead.PromoteRelease(release_id=release.id, target_environment_id=production)
    (first_id, first), (_, second) = [await new_lead(a, tokens[Role.ADMIN]) for _ in "12"]
    await Client(a, first).ApproveDeployment(deployment_id=waiting.id)

    demoting = await asyncpg.connect(libpq_dsn(db_url))
    watching = await asyncpg.connect(libpq_dsn(db_url))
    try:
        demotion = demoting.transaction()
        await demotion.start()
        await demoting.execute(
            "UPDATE users SET role = 'developer' WHERE id = $1", uuid.UUID(first_id)
        )
        vote = asyncio.create_task(Client(a, second).ApproveDeployment(deployment_id=waiting.id))
        # Until the vote waits for the demotion's row lock (or, not waiting, has finished):
        # the database has no event for it, so pg_stat_activity is polled.
        async with asyncio.timeout(30):
            while not vote.done() and not await watching.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'deploy_svc' AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.02)
        await demotion.commit()
        approval = await vote
    finally:
        await demoting.close()
        await watching.close()
    assert approval.status == S.APPROVAL_STATUS_APPROVED
    state = await lead.GetDeployment(deployment_id=waiting.id)
    assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    await Client(a, tokens[Role.ADMIN]).ApproveDeployment(deployment_id=waiting.id)
    state = await lead.GetDeployment(deployment_id=waiting.id)
    assert state.status == S.DEPLOYMENT_STATUS_PENDING
