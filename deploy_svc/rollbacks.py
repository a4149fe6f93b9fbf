"""Rollbacks (domain layer): rolling a deployment back redeploys the last good release.

Only the newest deployment of a service in an environment, succeeded or failed,
can be rolled back. The target is the release of the newest other succeeded
deployment of that service there whose release was not itself rolled back. In
one transaction the deployment becomes rolled_back and a Rollback (in progress)
and a redeployment of the target with the five standard stages are created;
the rollback completes or fails with that redeployment (deploy_svc.deployments).

Restoring service always passes: a rollback needs a role the environment's policy names
as deployer, but no new approval, no bake time, and no freeze override (its
redeployment's stages run inside a window; its audit row names the window it passed). A
deployment of the service there that has not started its first stage, held by a freeze
or waiting for votes, is cancelled first (audited), so it never blocks restoring service.

GetRollback and ListRollbacks read them (a list filters by the rolled-back deployment's
service, environment or id, and by status).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import events, freezes
from deploy_svc.deployments import (
    end_deployment,
    lock_deployment_for_change,
    lock_slot,
    new_deployment,
)
from deploy_svc.events import EventType
from deploy_svc.freezes import timestamp_text
from deploy_svc.gates import hold_environment, inactive_refusal
from deploy_svc.policies import Policy
from shared.framework.errors import FailedPrecondition
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import (
    ACTIVE_DEPLOYMENT_STATUSES,
    Deployment,
    DeploymentStatus,
    Environment,
    Release,
    ReleaseStatus,
    Rollback,
    RollbackStatus,
)
from shared.persistence.pagination import Page, paginate

ROLLBACK_FROM = (DeploymentStatus.SUCCEEDED, DeploymentStatus.FAILED)
NOT_STARTED = (DeploymentStatus.PENDING, DeploymentStatus.AWAITING_APPROVAL)
# Ended without running a stage: never changed what runs, so never "newer" than the
# deployment being rolled back.
NEVER_RAN = (DeploymentStatus.CANCELLED, DeploymentStatus.REJECTED)


async def rollback_deployment(
    database: Database,
    actor: Actor,
    deployment_id: uuid.UUID,
    reason: str,
    key: RequestKey | None,
) -> Rollback:
    """Rolls the deployment back to the last good release (a retried request_id returns
    the rollback it made)."""
    reason = text("reason", reason, 10_000)
    async with database.transaction() as session:
        if earlier := await replay(session, key, Rollback):
            return earlier
        deployment, environment, policy = await lock_deployment_for_change(
            session, actor, deployment_id
        )
        held = await hold_environment(session, environment.id)
        if (refusal := inactive_refusal("environment", held)) is not None:
            raise refusal
        _check_rollbackable(deployment)
        # Nothing else may start here meanwhile.
        await lock_slot(session, deployment.service_id, environment.id)
        waiting = await _not_started(session, deployment)
        await _check_newest(session, deployment, waiting)
        target = await _target(session, deployment)
        await _lock_releases(session, deployment, target, waiting)
        if waiting is not None:
            await _cancel(session, actor, deployment, waiting)
        rollback = await _redeploy(session, actor, deployment, environment, policy, target, reason)
        await remember(session, key, "rollback", rollback.id)
        return rollback


async def _not_started(session: AsyncSession, deployment: Deployment) -> Deployment | None:
    """The deployment of the service there that has not started its first stage, locked,
    to be cancelled; one that has started blocks the rollback (ACTIVE_DEPLOYMENT_EXISTS)."""
    active = await session.scalar(
        select(Deployment)
        .where(
            Deployment.service_id == deployment.service_id,
            Deployment.environment_id == deployment.environment_id,
            Deployment.status.in_(ACTIVE_DEPLOYMENT_STATUSES),
        )
        .with_for_update()
    )
    if active is None:
        return None
    if active.status not in NOT_STARTED:
        raise FailedPrecondition(
            f"deployment {active.id} is running here; cancel it or let it end first",
            reason="ACTIVE_DEPLOYMENT_EXISTS",
            metadata={
                "blocking_deployment_id": str(active.id),
                "environment_id": str(deployment.environment_id),
            },
        )
    return active


async def _lock_releases(
    session: AsyncSession, deployment: Deployment, target: Release, waiting: Deployment | None
) -> None:
    """The rows of the releases whose deployments this rollback changes, locked in the
    order of their ids before any change: each change's trigger then finds its release
    held (migration 015), and two rollbacks between the same releases in two
    environments cannot each hold one the other waits for."""
    ids = {deployment.release_id, target.id}
    if waiting is not None:
        ids.add(waiting.release_id)
    await session.execute(
        select(Release.id)
        .where(Release.id.in_(ids))
        .order_by(Release.id)
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE
    )


async def _cancel(
    session: AsyncSession, actor: Actor, deployment: Deployment, waiting: Deployment
) -> None:
    """Cancels (audited) the deployment there that had not started."""
    await end_deployment(session, waiting, DeploymentStatus.CANCELLED)
    await session.flush()
    await audit_log.append(
        session,
        actor,
        "cancel",
        "deployment",
        waiting.id,
        {"reason": f"cancelled to roll back deployment {deployment.id}"},
    )
    await events.deployment_ended(session, waiting)


def _check_rollbackable(deployment: Deployment) -> None:
    if deployment.status not in ROLLBACK_FROM:
        raise FailedPrecondition(
            f"only a succeeded or failed deployment can be rolled back, this one is "
            f"{deployment.status}",
            reason="NOT_ROLLBACKABLE",
            metadata={"deployment_id": str(deployment.id), "status": deployment.status},
        )


async def _check_newest(
    session: AsyncSession, deployment: Deployment, waiting: Deployment | None
) -> None:
    """No deployment there that ran is newer (`waiting`, about to be cancelled, never ran)."""
    query = select(Deployment.id).where(
        Deployment.service_id == deployment.service_id,
        Deployment.environment_id == deployment.environment_id,
        Deployment.created_at > deployment.created_at,
        ~(Deployment.status.in_(NEVER_RAN) & Deployment.deployed_at.is_(None)),
    )
    if waiting is not None:
        query = query.where(Deployment.id != waiting.id)
    newer = await session.scalar(query.limit(1))
    if newer is not None:
        raise FailedPrecondition(
            "only the newest deployment of a service in an environment can be rolled back",
            reason="NOT_NEWEST",
            metadata={"deployment_id": str(deployment.id), "newer_deployment_id": str(newer)},
        )


async def _target(session: AsyncSession, deployment: Deployment) -> Release:
    """The release of the newest other succeeded deployment there, not itself rolled back."""
    target = await session.scalar(
        select(Release)
        .join(Deployment, Deployment.release_id == Release.id)
        .where(
            Deployment.service_id == deployment.service_id,
            Deployment.environment_id == deployment.environment_id,
            Deployment.id != deployment.id,
            Deployment.status == DeploymentStatus.SUCCEEDED,
            Release.id != deployment.release_id,
            Release.status != ReleaseStatus.ROLLED_BACK,
        )
        .order_by(Deployment.completed_at.desc(), Deployment.created_at.desc())
        .limit(1)
    )
    if target is None:
        raise FailedPrecondition(
            "no earlier release succeeded here to roll back to",
            reason="NO_ROLLBACK_TARGET",
            metadata={"deployment_id": str(deployment.id)},
        )
    return target


async def _redeploy(
    session: AsyncSession,
    actor: Actor,
    deployment: Deployment,
    environment: Environment,
    policy: Policy,
    target: Release,
    reason: str,
) -> Rollback:
    """Marks the deployment rolled back and creates the rollback with its redeployment."""
    deployment.status = DeploymentStatus.ROLLED_BACK.value
    redeployment = await new_deployment(
        session,
        actor,
        target,
        environment,
        policy.rules.default_stages(),
        status=DeploymentStatus.PENDING,  # no new approval: restoring service always passes
        is_rollback=True,
    )
    rollback = Rollback(
        deployment_id=deployment.id,
        target_release_id=target.id,
        reason=reason,
        status=RollbackStatus.IN_PROGRESS.value,
        initiated_by=actor.user_id,
        redeployment_id=redeployment.id,
    )
    session.add(rollback)
    await session.flush()
    details = {
        "rollback_id": str(rollback.id),
        "target_release_id": str(target.id),
        "target_version": target.version,
        "redeployment_id": str(redeployment.id),
        "reason": reason,
    }
    now = datetime.now(UTC)
    frozen = await freezes.in_force(session, environment.id, deployment.service_id, now)
    if frozen:  # restoring service passed a freeze: the trail says which
        details["passed_freeze_window_id"] = str(frozen[0].window.id)
        details["freeze_ends_at"] = timestamp_text(frozen[0].ends_at)
    await audit_log.append(session, actor, "rollback", "deployment", deployment.id, details)
    await session.refresh(rollback)
    await events.resource_event(
        session, EventType.ROLLBACK_STARTED, deployment.service_id, "rollback", rollback
    )
    await events.deployment_event(session, EventType.DEPLOYMENT_CREATED, redeployment)
    return rollback


# -- reads -----------------------------------------------------------------------------------


async def get_rollback(database: Database, rollback_id: uuid.UUID) -> Rollback:
    async with database.replica_read() as session:
        return await load(session, Rollback, rollback_id)


async def list_rollbacks(
    database: Database,
    *,
    service_id: uuid.UUID | None,
    environment_id: uuid.UUID | None,
    deployment_id: uuid.UUID | None,
    status: str | None,
    page_size: int,
    page_token: str,
) -> Page:
    """Rollbacks, newest first; the service and environment are those of the deployment
    rolled back (joined only when one of them filters)."""
    filters = {
        "service_id": service_id,
        "environment_id": environment_id,
        "deployment_id": deployment_id,
        "status": status,
    }
    query = select(Rollback)
    if service_id is not None or environment_id is not None:
        query = query.join(Deployment, Deployment.id == Rollback.deployment_id)
    for column, value in (
        (Deployment.service_id, service_id),
        (Deployment.environment_id, environment_id),
        (Rollback.deployment_id, deployment_id),
        (Rollback.status, status),
    ):
        if value is not None:
            query = query.where(column == value)
    async with database.replica_read() as session:
        return await paginate(
            session,
            query,
            created_at=Rollback.created_at,
            row_id=Rollback.id,
            filters={name: "" if value is None else str(value) for name, value in filters.items()},
            requested_size=page_size,
            page_token=page_token,
        )
