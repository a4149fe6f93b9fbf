"""Rollbacks (domain layer): rolling a deployment back redeploys the last good release.

Only the newest deployment of a service in an environment, succeeded or failed,
can be rolled back. The target is the release of the newest other succeeded
deployment of that service there whose release was not itself rolled back. In
one transaction the deployment becomes rolled_back and a Rollback (in progress)
and a redeployment of the target with the five standard stages are created;
the rollback completes or fails with that redeployment (deploy_svc.deployments).
A production rollback needs the lead role but no new approval.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc.deployments import lock_deployment_for_change, lock_slot, new_deployment
from deploy_svc.releases import refresh_status
from shared.framework.errors import FailedPrecondition
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, replay
from shared.persistence.models import (
    STANDARD_STAGES,
    Deployment,
    DeploymentStatus,
    Environment,
    Release,
    ReleaseStatus,
    Rollback,
    RollbackStatus,
)

ROLLBACK_FROM = (DeploymentStatus.SUCCEEDED, DeploymentStatus.FAILED)


async def rollback_deployment(
    database: Database,
    actor: Actor,
    deployment_id: uuid.UUID,
    reason: str,
    request_id: uuid.UUID | None,
) -> Rollback:
    """Rolls the deployment back to the last good release (a retried request_id returns
    the rollback it made)."""
    reason = text("reason", reason, 10_000)
    async with database.transaction() as session:
        same = {"deployment_id": deployment_id, "initiated_by": actor.user_id}
        if earlier := await replay(session, Rollback, request_id, same):
            return earlier
        deployment, environment = await lock_deployment_for_change(session, actor, deployment_id)
        _check_rollbackable(deployment)
        # Nothing else may start here meanwhile (and nothing is active: this is the newest).
        await lock_slot(session, deployment.service_id, environment)
        await _check_newest(session, deployment)
        target = await _target(session, deployment)
        return await _redeploy(session, actor, deployment, environment, target, reason, request_id)


def _check_rollbackable(deployment: Deployment) -> None:
    if deployment.status not in ROLLBACK_FROM:
        raise FailedPrecondition(
            f"only a succeeded or failed deployment can be rolled back, this one is "
            f"{deployment.status}",
            reason="NOT_ROLLBACKABLE",
            metadata={"deployment_id": str(deployment.id), "status": deployment.status},
        )


async def _check_newest(session: AsyncSession, deployment: Deployment) -> None:
    newer = await session.scalar(
        select(Deployment.id)
        .where(
            Deployment.service_id == deployment.service_id,
            Deployment.environment_id == deployment.environment_id,
            Deployment.created_at > deployment.created_at,
        )
        .limit(1)
    )
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
    target: Release,
    reason: str,
    request_id: uuid.UUID | None,
) -> Rollback:
    """Marks the deployment rolled back and creates the rollback with its redeployment."""
    deployment.status = DeploymentStatus.ROLLED_BACK.value
    redeployment = await new_deployment(
        session,
        actor,
        target,
        environment,
        STANDARD_STAGES,
        None,
        status=DeploymentStatus.PENDING,  # no new approval: the rollback needed the lead role
    )
    rollback = Rollback(
        id=request_id or uuid.uuid4(),
        deployment_id=deployment.id,
        target_release_id=target.id,
        reason=reason,
        status=RollbackStatus.IN_PROGRESS.value,
        initiated_by=actor.user_id,
        redeployment_id=redeployment.id,
    )
    session.add(rollback)
    await session.flush()
    await refresh_status(session, deployment.release_id)
    await refresh_status(session, target.id)
    await audit_log.append(
        session,
        actor,
        "rollback",
        "deployment",
        deployment.id,
        {
            "rollback_id": str(rollback.id),
            "target_release_id": str(target.id),
            "target_version": target.version,
            "redeployment_id": str(redeployment.id),
            "reason": reason,
        },
    )
    await session.refresh(rollback)
    return rollback
