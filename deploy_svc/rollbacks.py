"""Rollbacks that really redeploy the last good release (domain layer; the seed's execute_rollback).

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

from deploy_svc.deployments import lock_slot, new_deployment
from deploy_svc.releases import refresh_status
from shared.framework.errors import FailedPrecondition
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.identity.auth import require
from shared.persistence import audit_log
from shared.persistence.db import load, replay
from shared.persistence.models import (
    STANDARD_STAGES,
    Deployment,
    DeploymentStatus,
    Environment,
    EnvironmentType,
    Release,
    ReleaseStatus,
    Rollback,
    RollbackStatus,
)

ROLLBACK_FROM = (DeploymentStatus.SUCCEEDED, DeploymentStatus.FAILED)


async def execute_rollback(
    session: AsyncSession,
    actor: Actor,
    deployment_id: uuid.UUID,
    reason: str,
    request_id: uuid.UUID | None,
) -> Rollback:
    reason = text("reason", reason, 10_000)
    if earlier := await replay(session, Rollback, request_id, {"deployment_id": deployment_id}):
        return earlier
    deployment = await load(session, Deployment, deployment_id, for_update=True)
    environment = await session.get(Environment, deployment.environment_id)
    if environment.environment_type == EnvironmentType.PRODUCTION:
        require(actor, "deployments.write.production")
    if deployment.status not in ROLLBACK_FROM:
        raise FailedPrecondition(
            f"only a succeeded or failed deployment can be rolled back, this one is "
            f"{deployment.status}",
            reason="NOT_ROLLBACKABLE",
            metadata={"deployment_id": str(deployment_id), "status": deployment.status},
        )
    # Nothing else may start here meanwhile (and nothing is active: this is the newest).
    await lock_slot(session, deployment.service_id, environment)
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
            metadata={"deployment_id": str(deployment_id), "newer_deployment_id": str(newer)},
        )
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
            metadata={"deployment_id": str(deployment_id)},
        )

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
