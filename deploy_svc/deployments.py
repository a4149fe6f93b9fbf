"""Deployments (domain layer): the one deploy path, approvals, pipeline stages, cancel,
metrics, reads and stage timeouts.

Each use case the servicer calls takes the `Database` and opens its own unit of work;
the functions that take a session are its steps. The rules, each also held by the
database where it can be (migrations 003 and 007):
- a new deployment passes every promotion gate (deploy_svc.gates: order, required
  stages, bake time, freeze windows, deployer role, one active deployment per service and
  environment) and carries its environment's required stages first; a transaction-scoped
  advisory lock serializes concurrent attempts, and a partial unique index backs it;
- only the roles the environment's policy names as deployers change its deployments;
- where the policy requires approvals, a deployment waits for that many votes of users
  whose role the policy names as approvers, other than the deployer, counted only while
  each is still active in such a role; one rejection ends it; votes are final;
- a deployment whose first stage has not started cannot start it inside a freeze
  window, unless an admin passed the freeze or it is a rollback's redeployment;
- stages run in order, timestamps are the server's, a failed stage fails the
  deployment and skips the rest, and the deployment follows its stages;
- every change writes its audit row in the same transaction; the release's status
  follows its deployments by the database's own triggers (migration 015).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections import OrderedDict, namedtuple
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime

import asyncpg
from sqlalchemy import bindparam, func, select, true, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from deploy_svc import events, freezes, gates
from deploy_svc.events import EventType
from deploy_svc.policies import Policy, check_stage_list
from shared.framework.errors import (
    CONSTRAINT_ERRORS,
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from shared.framework.validation import text as text_field
from shared.identity.actor import Actor
from shared.persistence import audit_log, pagination
from shared.persistence.db import Database, driver_connection, load, missing
from shared.persistence.idempotency import RequestKey, answer, claim, remember, replay
from shared.persistence.models import (
    ACTIVE_DEPLOYMENT_STATUSES,
    Approval,
    ApprovalStatus,
    Deployment,
    DeploymentMetric,
    DeploymentStatus,
    Environment,
    EnvironmentPolicy,
    PipelineStage,
    Release,
    RollbackStatus,
    Service,
    StageStatus,
    User,
)
from shared.persistence.pagination import Page, list_page

STAGE_OUTPUT_MAX = 64 * 1024
METRIC_NAME = re.compile(r"[a-z][a-z0-9_.]*")
DONE_STAGES = (StageStatus.SUCCEEDED, StageStatus.SKIPPED)
TERMINAL = {
    DeploymentStatus.SUCCEEDED,
    DeploymentStatus.FAILED,
    DeploymentStatus.REJECTED,
    DeploymentStatus.CANCELLED,
    DeploymentStatus.ROLLED_BACK,
}
STAGE_MOVES = {  # from -> the statuses it may move to
    StageStatus.PENDING: {StageStatus.RUNNING, StageStatus.SKIPPED},
    StageStatus.RUNNING: {StageStatus.SUCCEEDED, StageStatus.FAILED},
}


@dataclass(frozen=True)
class DeployRequest:
    release_id: uuid.UUID
    environment_id: uuid.UUID
    stage_names: Sequence[str]
    reviewer_ids: Sequence[uuid.UUID]
    key: RequestKey | None
    action: str  # "deploy" (CreateDeployment) or "promote" (PromoteRelease)
    freeze_override_reason: str | None


@dataclass(frozen=True, slots=True)
class StageRecord:
    """A pipeline stage as stored, a plain record: stage moves are written by one prebuilt
    Core UPDATE, not through the ORM (UpdatePipelineStage is the hottest write)."""

    id: uuid.UUID
    deployment_id: uuid.UUID
    name: str
    order: int
    status: str
    timeout_seconds: int
    started_at: datetime | None
    completed_at: datetime | None
    output: str | None
    created_at: datetime
    updated_at: datetime


_STAGE_FIELDS = tuple(field.name for field in fields(StageRecord))


def _columns(alias: str, names: Sequence[str]) -> str:
    return ", ".join(f'{alias}."{name}"' for name in names)


@dataclass(slots=True)
class DeploymentRecord:
    """A deployment as stored, a plain record of its table's columns: UpdatePipelineStage
    reads and writes it with asyncpg, not through the ORM (it is the hottest write)."""

    id: uuid.UUID
    release_id: uuid.UUID
    service_id: uuid.UUID
    environment_id: uuid.UUID
    status: str
    deployed_by: uuid.UUID
    deployed_at: datetime | None
    completed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    freeze_override_reason: str | None
    is_rollback: bool
    stages: Sequence[StageRecord] = ()  # when read with it (new_deployment)


_DEPLOYMENT_RECORD_FIELDS = tuple(field.name for field in fields(DeploymentRecord))[:-1]
_POLICY_NAMES = tuple(column.name for column in gates.POLICY_COLUMNS)


# An approval and a metric as stored, plain records of their tables' columns.
ApprovalRow = namedtuple("ApprovalRow", [c.name for c in Approval.__table__.columns])
MetricRow = namedtuple("MetricRow", [c.name for c in DeploymentMetric.__table__.columns])


@dataclass(slots=True)
class FullDeployment(DeploymentRecord):
    """A deployment with its stages, approvals and metrics (the full view, and what
    watchers are sent), read as plain rows: the ORM's loading cost three times the CPU."""

    approvals: Sequence[ApprovalRow] = ()
    metrics: Sequence[MetricRow] = ()


def _now() -> datetime:
    return datetime.now(UTC)


# The votes trigger of migration 007 refuses at commit what a policy changed meanwhile.
CONSTRAINT_ERRORS["check_approvals"] = lambda: FailedPrecondition(
    "the environment's policy came to require approvals while this call ran: "
    "a new deployment will wait for them, an existing one needs them before it runs",
    reason="APPROVALS_REQUIRED",
)


def check_deployer(actor: Actor, environment: Environment, policy: Policy) -> None:
    """Changing what runs in an environment needs a role its policy names as deployer."""
    if (refusal := gates.deployer_refusal(actor, environment, policy)) is not None:
        raise refusal


# The policy as plain columns (gates.policy_in_row): an ORM entity per call cost more.
_LOCK_DEPLOYMENT = (
    select(Deployment, Environment, *gates.POLICY_COLUMNS)
    .join(Environment, Environment.id == Deployment.environment_id)
    .join(EnvironmentPolicy, EnvironmentPolicy.environment_id == Deployment.environment_id)
    .where(Deployment.id == bindparam("deployment_id"))
    .with_for_update(of=Deployment)
    .execution_options(populate_existing=True)
)


async def _lock_deployment(
    session: AsyncSession, deployment_id: uuid.UUID
) -> tuple[Deployment, Environment, Policy]:
    """The deployment, locked FOR UPDATE until the unit of work ends, its environment and
    the environment's policy in force, in one round trip."""
    found = (
        await session.execute(_LOCK_DEPLOYMENT, {"deployment_id": deployment_id})
    ).one_or_none()
    if found is None:
        await load(session, Deployment, deployment_id)  # NOT_FOUND, naming the deployment
    return found[0], found[1], gates.policy_in_row(found, 2, _now())


async def lock_deployment_for_change(
    session: AsyncSession, actor: Actor, deployment_id: uuid.UUID
) -> tuple[Deployment, Environment, Policy]:
    """The opening of a change to a deployment: it locked, its environment and policy, and
    the caller's right to change deployments there."""
    deployment, environment, policy = await _lock_deployment(session, deployment_id)
    check_deployer(actor, environment, policy)
    return deployment, environment, policy


async def _with_stages(session: AsyncSession, deployment_id: uuid.UUID) -> Deployment:
    """The deployment with its stages loaded; also reloads what a flush left unloaded."""
    deployment = await session.scalar(
        select(Deployment)
        .where(Deployment.id == deployment_id)
        .options(selectinload(Deployment.stages))
    )
    return deployment or await load(session, Deployment, deployment_id)


# -- the one deploy path ----------------------------------------------------------------------


async def create_deployment(
    database: Database,
    actor: Actor,
    release_id: uuid.UUID,
    environment_id: uuid.UUID,
    stage_names: Sequence[str],
    key: RequestKey | None,
    freeze_override_reason: str = "",
) -> Deployment | DeploymentRecord:
    """Deploys a release to an environment, with `stage_names` (starting with the
    environment's required stages) or its default stages; the deployment returned has its
    stages loaded."""
    return await _deploy(
        database,
        actor,
        DeployRequest(
            release_id,
            environment_id,
            stage_names,
            (),
            key,
            "deploy",
            _override_reason(freeze_override_reason),
        ),
    )


async def promote_release(
    database: Database,
    actor: Actor,
    release_id: uuid.UUID,
    target_env_id: uuid.UUID,
    reviewer_ids: Sequence[uuid.UUID],
    key: RequestKey | None,
    freeze_override_reason: str = "",
) -> Deployment | DeploymentRecord:
    """Promotes a release to the next environment with that environment's default stages."""
    return await _deploy(
        database,
        actor,
        DeployRequest(
            release_id,
            target_env_id,
            (),
            reviewer_ids,
            key,
            "promote",
            _override_reason(freeze_override_reason),
        ),
    )


def _override_reason(reason: str) -> str | None:
    return text_field("freeze_override_reason", reason, freezes.REASON_MAX, required=False)


def _stages_for(stage_names: list[str], environment: Environment, policy: Policy) -> list[str]:
    """The stages of a new deployment: the environment's required ones come first, in
    order (custom stages may only add to them); none named: its default stages."""
    if not stage_names:
        return policy.rules.default_stages()
    required = list(policy.rules.required_stages)
    if stage_names[: len(required)] != required:
        raise InvalidArgument.field(
            "stage_names", f"in {environment.name} must start with {', '.join(required)}"
        )
    return stage_names


async def _deploy(
    database: Database, actor: Actor, request: DeployRequest
) -> Deployment | DeploymentRecord:
    named_stages = check_stage_list("stage_names", request.stage_names)
    async with database.transaction() as session:
        if earlier := await replay(session, request.key, Deployment):
            return await _with_stages(session, earlier.id)
        now = _now()
        connection = await driver_connection(session)  # plain SQL on the hot path
        target = await gates.read_target(  # and the slot's lock
            connection, request.release_id, request.environment_id, now, lock=True
        )
        release, environment, policy = target.release, target.environment, target.policy
        stage_names = _stages_for(named_stages, environment, policy)
        verdicts = await gates.evaluate(
            connection, actor, target, now, request.freeze_override_reason
        )
        if (refusal := gates.first_refusal(verdicts)) is not None:
            raise refusal
        reviewers = await _reviewers(session, actor, request.reviewer_ids, policy)
        passed_freeze = next(g for g in verdicts if g.name == "freeze").freeze_window_id
        status = (
            DeploymentStatus.AWAITING_APPROVAL
            if policy.rules.required_approvals
            else DeploymentStatus.PENDING
        )
        deployment_id = uuid.uuid4()
        details = {
            "release_id": str(release.id),
            "version": release.version,
            "environment": environment.name,
            "stages": stage_names,
            "reviewer_ids": [str(r.id) for r in reviewers],
        }
        audit = audit_log.relman_row(
            actor, request.action, "deployment", deployment_id, json.dumps(details)
        )
        # As the statement will store it, but for its times (the statement's).
        deployment = DeploymentRecord(
            deployment_id,
            release.id,
            release.service_id,
            environment.id,
            status.value,
            actor.user_id,
            None,
            None,
            None,
            None,
            request.freeze_override_reason if passed_freeze else None,
            False,
        )
        *columns, stages = await connection.fetchrow(
            _DEPLOYED,
            deployment.id,
            deployment.release_id,
            deployment.service_id,
            deployment.environment_id,
            deployment.status,
            deployment.deployed_by,
            deployment.freeze_override_reason,
            deployment.is_rollback,
            list(stage_names),
            [reviewer.id for reviewer in reviewers],
            *audit_log.as_text(audit),
            EventType.DEPLOYMENT_CREATED.value,
            events.deployment_data(deployment),
        )
        deployment = DeploymentRecord(*columns, stages=[StageRecord(*stage) for stage in stages])
        if passed_freeze:
            await audit_log.append(
                session,
                actor,
                "freeze.override",
                "deployment",
                deployment.id,
                {
                    "reason": request.freeze_override_reason,
                    "freeze_window_id": passed_freeze,
                    "environment": environment.name,
                    "release_id": str(release.id),
                },
            )
        if deployment.status == DeploymentStatus.AWAITING_APPROVAL:
            await events.deployment_event(
                session, EventType.DEPLOYMENT_AWAITING_APPROVAL, deployment
            )
        if passed_freeze:
            await events.deployment_event(session, EventType.FREEZE_OVERRIDE, deployment)
        await remember(session, request.key, "deployment", deployment.id)
        return deployment


_LOCK_SLOT = f"SELECT {gates.slot_lock('$1::text', '$2::text')}"


async def lock_slot(
    session: AsyncSession, service_id: uuid.UUID, environment_id: uuid.UUID
) -> None:
    """Serializes every change of what runs for a service in an environment (transaction
    scoped): the active_deployment gate and a rollback's checks are read under it (a
    deploy takes it with its target's read, gates.slot_lock)."""
    connection = await driver_connection(session)
    await connection.execute(_LOCK_SLOT, str(service_id), str(environment_id))


# A deployment ($1-$8) and its stages ($9, in order from 0), both as stored: through the
# ORM's flush it was most of PromoteRelease's CPU.
_MADE = f"""
made AS (
    INSERT INTO deployments (id, release_id, service_id, environment_id, status, deployed_by,
        freeze_override_reason, is_rollback)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    RETURNING {_columns("deployments", _DEPLOYMENT_RECORD_FIELDS)}
), staged AS (
    INSERT INTO pipeline_stages (id, deployment_id, name, "order", status)
    SELECT gen_random_uuid(), $1, stage.name, stage.position - 1, 'pending'
    FROM unnest($9::text[]) WITH ORDINALITY AS stage(name, position)
    RETURNING {_columns("pipeline_stages", _STAGE_FIELDS)}
)"""
_MADE_AND_STAGED = (
    'SELECT made.*, ARRAY(SELECT ROW(staged.*) FROM staged ORDER BY staged."order") FROM made'
)
_NEW_DEPLOYMENT = f"WITH {_MADE}\n{_MADE_AND_STAGED}"
# A deploy's writes in one statement: the deployment and its stages, the votes asked of
# its reviewers ($10), its audit row ($11-$20) and its event ($21, its data the deployment
# as the API returns it, $22). Its release's status follows (migration 015's trigger).
_CREATED_EVENT = events.written_with(
    "$21", "made", "$22", "deployment", ("created_at", "updated_at")
)
_DEPLOYED = f"""
WITH {_MADE}, asked AS (
    INSERT INTO approvals (id, deployment_id, approver_id, status)
    SELECT gen_random_uuid(), $1, reviewer, 'pending' FROM unnest($10::uuid[]) AS reviewer
), audited AS (
    INSERT INTO audit_logs ({", ".join(audit_log.COLUMNS)}) VALUES ({audit_log.text_values(11)})
), evented AS ({_CREATED_EVENT}
)
{_MADE_AND_STAGED}
"""


async def new_deployment(
    session: AsyncSession,
    actor: Actor,
    release,
    environment,
    stage_names: Sequence[str],
    *,
    status: DeploymentStatus,
    freeze_override_reason: str | None = None,
    is_rollback: bool = False,
) -> DeploymentRecord:
    """Inserts a deployment with its pipeline stages (the caller holds the slot's lock);
    returns it as stored, its stages with it."""
    connection = await driver_connection(session)
    *columns, stages = await connection.fetchrow(
        _NEW_DEPLOYMENT,
        uuid.uuid4(),
        release.id,
        release.service_id,
        environment.id,
        status.value,
        actor.user_id,
        freeze_override_reason,
        is_rollback,
        list(stage_names),
    )
    return DeploymentRecord(*columns, stages=[StageRecord(*stage) for stage in stages])


async def _reviewers(
    session: AsyncSession, actor: Actor, reviewer_ids: Sequence[uuid.UUID], policy: Policy
) -> list[User]:
    """The users asked to vote: only where the policy requires votes, each one who may."""
    if reviewer_ids and not policy.rules.required_approvals:
        raise InvalidArgument.field(
            "reviewer_ids",
            "only deployments into an environment that requires approvals have reviewers",
        )
    if len(set(reviewer_ids)) != len(reviewer_ids):
        raise InvalidArgument.field("reviewer_ids", "must not repeat a reviewer")
    reviewers = []
    for index, reviewer_id in enumerate(reviewer_ids):
        field = f"reviewer_ids[{index}]"
        user = await session.get(User, reviewer_id)
        # One answer for no such user, an inactive one and one who may not vote: a
        # deployer who may not list users cannot tell them apart (shared.framework.names).
        if user is None or not user.is_active or user.role not in policy.rules.approver_roles:
            raise InvalidArgument.field(
                field,
                "is not an active user whose role the policy lets vote "
                f"({', '.join(policy.rules.approver_roles)})",
            )
        if user.id == actor.user_id:
            raise InvalidArgument.field(field, "the deployer cannot review their own deployment")
        reviewers.append(user)
    return reviewers


# -- approvals ---------------------------------------------------------------------------------

# A vote counts only while its approver is active in a role the policy lets vote:
# deactivating or demoting an approver withdraws the vote's effect on a deployment still
# waiting (the row stays,
# as the record of the vote). The approvers' rows are locked FOR SHARE: a demotion or
# deactivation in flight (UpdateUser holds the row FOR UPDATE) commits first and is seen
# here, or starts after this vote has committed; it never lands between count and commit.
_COUNTED_APPROVERS = (
    select(User.id)
    .join(Approval, Approval.approver_id == User.id)
    .where(
        Approval.deployment_id == bindparam("deployment_id"),
        Approval.status == ApprovalStatus.APPROVED,
        User.is_active,
        User.role.in_(bindparam("approver_roles", expanding=True)),
    )
    .with_for_update(read=True, of=User)
)


async def _eligible_voter(
    session: AsyncSession, actor: Actor, deployment_id: uuid.UUID, policy: Policy
) -> None:
    """The voter's own row, locked FOR SHARE, must be active in a role the policy lets
    vote, now: the token's role may be up to 5 s old on another replica, and a rejection
    ends the deployment at once."""
    voter = await session.get(
        User, actor.user_id, with_for_update={"read": True}, populate_existing=True
    )
    if voter is None or not voter.is_active or voter.role not in policy.rules.approver_roles:
        raise PermissionDenied(
            f"only an active {' or '.join(policy.rules.approver_roles)} may vote here",
            reason="APPROVER_NOT_ELIGIBLE",
            metadata={
                "deployment_id": str(deployment_id),
                "user_id": str(actor.user_id),
                "role": voter.role if voter else "",
                "is_active": str(bool(voter and voter.is_active)).lower(),
            },
        )


async def vote(
    database: Database,
    actor: Actor,
    deployment_id: uuid.UUID,
    approve: bool,
    notes: str,
    key: RequestKey | None,
) -> Approval:
    """An approver's final vote on a deployment awaiting approval."""
    notes = text_field("notes", notes, 10_000, required=False)
    async with database.transaction() as session:
        if earlier := await replay(session, key, Approval):
            return earlier
        deployment, _, policy = await _lock_deployment(session, deployment_id)
        await _eligible_voter(session, actor, deployment_id, policy)
        _check_votable(actor, deployment)
        approval = await _cast(session, actor, deployment_id, approve, notes)
        if not approve:
            await end_deployment(session, deployment, DeploymentStatus.REJECTED)
        else:
            approvers = await session.scalars(
                _COUNTED_APPROVERS,
                {
                    "deployment_id": deployment_id,
                    "approver_roles": [str(r) for r in policy.rules.approver_roles],
                },
            )
            if len(approvers.all()) >= policy.rules.required_approvals:
                deployment.status = DeploymentStatus.PENDING.value
        await session.flush()
        await audit_log.append(
            session,
            actor,
            "approve" if approve else "reject",
            "deployment",
            deployment_id,
            {"approval_id": str(approval.id), "deployment_status": deployment.status},
        )
        await remember(session, key, "approval", approval.id)
        await session.refresh(approval)
        await events.resource_event(
            session,
            EventType.APPROVAL_APPROVED if approve else EventType.APPROVAL_REJECTED,
            deployment.service_id,
            "approval",
            approval,
        )
        await events.deployment_ended(session, deployment)
        return approval


def _check_votable(actor: Actor, deployment: Deployment) -> None:
    if deployment.status != DeploymentStatus.AWAITING_APPROVAL:
        raise FailedPrecondition(
            f"deployment is {deployment.status}, not awaiting approval",
            reason="NOT_AWAITING_APPROVAL",
            metadata={"deployment_id": str(deployment.id), "status": deployment.status},
        )
    if deployment.deployed_by == actor.user_id:
        raise PermissionDenied(
            "the deployer cannot vote on their own deployment",
            reason="SELF_APPROVAL",
            metadata={"deployment_id": str(deployment.id)},
        )


async def _cast(
    session: AsyncSession, actor: Actor, deployment_id: uuid.UUID, approve: bool, notes: str | None
) -> Approval:
    """The voter's approval row (asked for as a reviewer, or new), voted; a vote is final."""
    approval = await session.scalar(
        select(Approval).where(
            Approval.deployment_id == deployment_id, Approval.approver_id == actor.user_id
        )
    )
    if approval is not None and approval.status != ApprovalStatus.PENDING:
        raise AlreadyExists(
            "this approver has voted already; a vote is final",
            reason="ALREADY_VOTED",
            metadata={"approval_id": str(approval.id)},
        )
    if approval is None:
        approval = Approval(deployment_id=deployment_id, approver_id=actor.user_id)
        session.add(approval)
    approval.status = (ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED).value
    approval.notes = notes
    approval.approved_at = _now()
    await session.flush()
    return approval


# -- stages and cancel ---------------------------------------------------------------------------


# A rollback completes ($2: completed) or fails with the redeployment ($1) it created.
_SETTLE_ROLLBACK = """
UPDATE rollbacks SET status = $2, completed_at = $3, updated_at = now()
WHERE redeployment_id = $1 AND status = 'in_progress'
"""


async def _settle_rollback(session: AsyncSession, deployment) -> None:
    """A rollback completes or fails with the redeployment it created (a stage's move
    settles it in its own statement, _WRITE_DEPLOYMENT_MOVE)."""
    connection = await driver_connection(session)
    outcome = (
        RollbackStatus.COMPLETED
        if deployment.status == DeploymentStatus.SUCCEEDED
        else RollbackStatus.FAILED
    )
    await connection.execute(
        _SETTLE_ROLLBACK, deployment.id, outcome.value, deployment.completed_at
    )


async def end_deployment(
    session: AsyncSession, deployment: Deployment, status: DeploymentStatus
) -> None:
    """Ends a deployment: its stages that did not run are skipped."""
    now = _now()
    deployment.status = status.value
    deployment.completed_at = now
    await _settle_rollback(session, deployment)
    stages = await session.scalars(
        select(PipelineStage).where(
            PipelineStage.deployment_id == deployment.id,
            PipelineStage.status.in_((StageStatus.PENDING, StageStatus.RUNNING)),
        )
    )
    for stage in stages:
        stage.status = StageStatus.SKIPPED.value
        stage.completed_at = now


# UpdatePipelineStage reads its stage's deployment, the environment's id and name, its
# policy in table order (gates.policy_in_row), the deployment's stages and, before it
# starts, the freeze windows that may be in force now ($2) in one statement, without a
# lock; it writes the move in one more, which changes nothing unless
# the stage is still as read (the stage's row decides races, see update_pipeline_stage).
# Before, a transaction of five statements (BEGIN, the deployment locked, the stages, the
# move, COMMIT); through the ORM session, about 1.6 ms of the service's CPU per call.
_MOVE_READ = f"""
SELECT {_columns("d", _DEPLOYMENT_RECORD_FIELDS)}, e.id, e.name, {_columns("p", _POLICY_NAMES)},
    ARRAY(SELECT ROW({_columns("s", _STAGE_FIELDS)}) FROM pipeline_stages s
          WHERE s.deployment_id = d.id ORDER BY s."order") AS stages,
    CASE WHEN d.status = 'pending' AND NOT d.is_rollback AND d.freeze_override_reason IS NULL
        THEN ARRAY(SELECT ROW({_columns("w", freezes.WINDOW_COLUMNS)}) FROM (
            {freezes.maybe_in_force("d.environment_id", "d.service_id", "$2")}) AS w)
    END AS windows
FROM pipeline_stages target
JOIN deployments d ON d.id = target.deployment_id
JOIN environments e ON e.id = d.environment_id
JOIN environment_policies p ON p.environment_id = d.environment_id
WHERE target.id = $1
"""
_STAGE_BY_ID = f"SELECT {_columns('s', _STAGE_FIELDS)} FROM pipeline_stages s WHERE s.id = $1"


# A stage's move ($1-$5) if its status is still as read ($6), its deployment's too ($18)
# and its environment's policy still at the version read ($19), and only then its audit
# row ($7-$16); back: the stage's updated_at, NULL if any had changed (nothing
# written). The deployment's row is held first (`held`: FOR SHARE for
# a plain move, which leaves other moves alone but waits for a cancel, a rejection or a
# policy that makes it wait for votes again; FOR NO KEY UPDATE for a move that changes
# it), in the order of every other change of a deployment and its stages; a concurrent
# writer of either row makes this wait, then find the row as that one left it (READ
# COMMITTED), so of two racing changes one writes and the other finds its read stale.
# `status || ''` keeps the planner on the stage's key (on `status`, it chose the status
# index for rare statuses).
_MOVED = f"""
held AS (
    SELECT FROM deployments d WHERE d.id = $17 AND d.status = $18 AND EXISTS (
        SELECT FROM environment_policies p
        WHERE p.environment_id = d.environment_id AND p.version = $19
    ) FOR {{lock}} OF d
), moved AS (
    UPDATE pipeline_stages
    SET status = $2, output = $3, started_at = $4, completed_at = $5, updated_at = now()
    WHERE id = $1 AND status || '' = $6 AND EXISTS (SELECT FROM held)
    RETURNING updated_at
), audited AS (
    INSERT INTO audit_logs ({", ".join(audit_log.COLUMNS)})
    SELECT {audit_log.text_values(7)} WHERE EXISTS (SELECT FROM moved)
)"""
_WRITE_STAGE_MOVE = f"""
WITH {_MOVED.format(lock="SHARE")}
SELECT (SELECT updated_at FROM moved), NULL::timestamptz
"""
# The same for a move that changes its deployment ($20-$22), and only if the stage moved:
# its other stages skipped when it failed, the rollback it settles when it ends, the
# event of its end ($23, NULL otherwise; the deployment as the API returns it, $24); its
# release's status follows (migration 015's trigger, after the statement). A statement
# of its own, not the first with flags: with flags PostgreSQL planned it anew on every
# call (a plan for the flags' values is cheaper than one for any), about 1 ms each time.
_WRITE_DEPLOYMENT_MOVE = f"""
WITH {_MOVED.format(lock="NO KEY UPDATE")}, changed AS (
    UPDATE deployments
    SET status = $20, deployed_at = $21, completed_at = $22, updated_at = now()
    WHERE id = $17 AND EXISTS (SELECT FROM moved)
    RETURNING service_id, updated_at
), skipped AS (
    UPDATE pipeline_stages SET status = 'skipped', completed_at = $22, updated_at = now()
    WHERE deployment_id = $17 AND id <> $1 AND status IN ('pending', 'running')
      AND $20 = 'failed' AND EXISTS (SELECT FROM moved)
), settled AS (
    UPDATE rollbacks
    SET status = CASE WHEN $20 = 'succeeded' THEN 'completed' ELSE 'failed' END,
        completed_at = $22, updated_at = now()
    WHERE redeployment_id = $17 AND status = 'in_progress'
      AND $20 IN ('succeeded', 'failed') AND EXISTS (SELECT FROM moved)
), evented AS ({events.written_with("$23", "changed", "$24", "deployment", ("updated_at",))}
)
SELECT (SELECT updated_at FROM moved), (SELECT updated_at FROM changed)
"""
# Reads and writes that find the stage changed between them before one of them holds.
MOVE_ATTEMPTS = 3


class _StageChanged(Exception):
    """The stage changed between the move's read and its write (nothing was written)."""


class _Unit:
    """A move's connection, and its transaction once it needs one (`begin`)."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self._transaction = None

    async def begin(self) -> None:
        if self._transaction is None:
            transaction = self.connection.transaction()
            await transaction.start()
            self._transaction = transaction  # once BEGIN is through: nothing to undo before

    async def commit(self) -> None:
        if self._transaction is not None:
            await self._transaction.commit()

    async def roll_back(self) -> None:
        """Undoes the transaction, if any, while an error is on its way up: one that
        cannot be undone (a lost connection) leaves the connection to be closed
        (autocommit_connection) and the first error to be reported."""
        if self._transaction is not None:
            with contextlib.suppress(Exception):
                await self._transaction.rollback()


async def update_pipeline_stage(
    database: Database,
    actor: Actor,
    stage_id: uuid.UUID,
    status: StageStatus,
    output: str,
    key: RequestKey | None,
) -> StageRecord:
    """Moves a stage on, and its deployment with it; returns the stage as stored.

    The hottest write, on the pooled asyncpg connection: one read without a lock, then
    one write that holds only if the stage, its deployment and the environment's policy
    are still as read. That write is one statement with all that follows, its
    deployment's end and the event of it included, and commits on its own: two round
    trips in all. One that ends a rollback's redeployment (whose rollback's event
    follows), or has a request id (whose claim must commit with it), runs in a
    transaction. What the read decides stays true while those rows are as read: the
    deployment's row changes with every change that ends it or makes it wait for votes,
    the stage's with every other move of it, the policy's version with every change of
    it, and earlier stages only ever become done. A write that finds any changed writes
    nothing, and the move is decided again from a new read, at most MOVE_ATTEMPTS times
    (then ABORTED, STAGE_CHANGED: in practice the new read refuses the move first).

    A move of a deployment in progress that this process moved last is decided from
    what it wrote then (_KNOWN_MOVES), without the read: one round trip. The write's
    guard makes that as safe as a read; only a move can come of it, and a refusal or a
    write that finds the rows changed is decided again from a read."""
    output = _stage_output(output)
    known = _KNOWN_MOVES.get(stage_id)
    for _ in range(MOVE_ATTEMPTS):
        async with database.autocommit_connection(None) as connection:
            unit = _Unit(connection)
            try:
                moved, after = await _move(unit, actor, stage_id, status, output, key, known)
            except _StageChanged:
                await unit.roll_back()
                known = None
                continue
            except BaseException:
                await unit.roll_back()
                raise
            await unit.commit()
            _KNOWN_MOVES.remember(after)
            return moved
    raise Aborted(
        "the stage kept changing while this call ran; read it again and retry",
        reason="STAGE_CHANGED",
        metadata={"stage_id": str(stage_id)},
    )


@dataclass(frozen=True, slots=True)
class _MoveFacts:
    """What a stage's move is decided from (_MOVE_READ's row, or what a move wrote)."""

    deployment: DeploymentRecord
    environment: EnvironmentRef
    policy_row: tuple  # POLICY_COLUMNS' values in table order (gates.policy_in_row)
    stages: tuple[StageRecord, ...]
    windows: Sequence | None  # freeze windows maybe in force, before the deployment starts

    @property
    def policy_version(self) -> int:
        return self.policy_row[_POLICY_VERSION]


_POLICY_VERSION = _POLICY_NAMES.index("version")


class _KnownMoves:
    """The facts of the deployments in progress that this process moved last, by the
    ids of their stages: the next move of one of them is decided from them, and holds
    only if its write finds the stage, the deployment and the policy's version as they
    were (update_pipeline_stage). At most SIZE deployments, the least recently moved
    forgotten first."""

    SIZE = 4_096

    def __init__(self) -> None:
        self._by_deployment: OrderedDict[uuid.UUID, _MoveFacts] = OrderedDict()
        self._deployment_of: dict[uuid.UUID, uuid.UUID] = {}

    def get(self, stage_id: uuid.UUID) -> _MoveFacts | None:
        deployment_id = self._deployment_of.get(stage_id)
        return None if deployment_id is None else self._by_deployment.get(deployment_id)

    def remember(self, facts: _MoveFacts | None) -> None:
        """Keeps `facts` of a deployment in progress; forgets one that is not (a
        pending one's first move needs the freeze windows read now)."""
        if facts is None:
            return
        deployment_id = facts.deployment.id
        self.forget(deployment_id)
        if facts.deployment.status != DeploymentStatus.IN_PROGRESS:
            return
        self._by_deployment[deployment_id] = facts
        for stage in facts.stages:
            self._deployment_of[stage.id] = deployment_id
        while len(self._by_deployment) > self.SIZE:
            self.forget(next(iter(self._by_deployment)))

    def forget(self, deployment_id: uuid.UUID) -> None:
        facts = self._by_deployment.pop(deployment_id, None)
        if facts is not None:
            for stage in facts.stages:
                self._deployment_of.pop(stage.id, None)


# One per process: its entries are only ever a guess that the write checks.
_KNOWN_MOVES = _KnownMoves()


async def _move(
    unit: _Unit,
    actor: Actor,
    stage_id: uuid.UUID,
    status: StageStatus,
    output: str | None,
    key: RequestKey | None,
    known: _MoveFacts | None,
) -> tuple[StageRecord, _MoveFacts | None]:
    """One attempt of update_pipeline_stage: the stage as stored, and the facts after
    the move (None for a retried request). Decided from `known` if given, and if that
    refuses the move or its write finds the rows changed, again from a read; raises
    _StageChanged when the write after a read finds them changed."""
    connection = unit.connection
    if key is not None:
        await unit.begin()
        if (answered := await claim(connection, key)) is not None:
            return await _stage_record(connection, answered), None
    now = _now()
    written = None
    if known is not None:
        try:
            written = await _decide_and_write(unit, actor, known, stage_id, status, output, now)
        except (DomainError, _StageChanged):  # nothing written: decided from a read
            _KNOWN_MOVES.forget(known.deployment.id)
    if written is None:
        facts = await _read_facts(connection, stage_id, now)
        written = await _decide_and_write(unit, actor, facts, stage_id, status, output, now)
    await answer(connection, key, "pipeline_stage", written[0].id)
    return written


async def _read_facts(
    connection: asyncpg.Connection, stage_id: uuid.UUID, now: datetime
) -> _MoveFacts:
    found = await connection.fetchrow(_MOVE_READ, stage_id, now)
    if found is None:
        raise missing(PipelineStage, stage_id)
    width = len(_DEPLOYMENT_RECORD_FIELDS)
    return _MoveFacts(
        DeploymentRecord(*found[:width]),
        EnvironmentRef(found[width], found[width + 1]),
        tuple(found[width + 2 : width + 2 + len(_POLICY_NAMES)]),
        tuple(StageRecord(*row) for row in found["stages"]),
        found["windows"],
    )


async def _decide_and_write(
    unit: _Unit,
    actor: Actor,
    facts: _MoveFacts,
    stage_id: uuid.UUID,
    status: StageStatus,
    output: str | None,
    now: datetime,
) -> tuple[StageRecord, _MoveFacts]:
    """The move's rules applied to `facts`, then its write (_write_move); raises the
    refusal, having written nothing, or _StageChanged if the rows changed since."""
    deployment = replace(facts.deployment)  # changed below: `facts` stay as they were
    stages = list(facts.stages)
    stage = next(s for s in stages if s.id == stage_id)
    policy = gates.policy_in_row(facts.policy_row, 0, now)
    check_deployer(actor, facts.environment, policy)
    _check_stage_move(deployment, stages, stage, status)
    if facts.windows and (frozen := freezes.in_force_of(facts.windows, now)):
        # Not started, not a rollback's, no freeze passed (_MOVE_READ): its first move,
        # running or skipped (skipping every stage would succeed it), waits for the end.
        raise frozen[0].refusal(deployment_id=str(deployment.id))

    status_before = deployment.status
    moved = _stage_moved(stage, status, output, now)
    if status == StageStatus.FAILED:  # the deployment fails, the rest are skipped
        deployment.status = DeploymentStatus.FAILED.value
        deployment.completed_at = now
    else:
        _advance_deployment(deployment, stages, moved, now)
    if deployment.status in TERMINAL and deployment.is_rollback:  # settled with the move
        await unit.begin()
    details = {
        "deployment_id": str(deployment.id),
        "stage": stage.name,
        "from": stage.status,
        "to": status.value,
        "deployment_status": deployment.status,
    }
    audit = audit_log.relman_row(actor, "update", "pipeline_stage", stage.id, json.dumps(details))
    moved = await _write_move(
        unit.connection, moved, stage.status, deployment, status_before, facts.policy_version, audit
    )
    after = replace(
        facts,
        deployment=deployment,
        stages=tuple(moved if s.id == moved.id else s for s in stages),
        windows=None,
    )
    return moved, after


async def _stage_record(connection: asyncpg.Connection, stage_id: uuid.UUID) -> StageRecord:
    found = await connection.fetchrow(_STAGE_BY_ID, stage_id)
    if found is None:
        raise missing(PipelineStage, stage_id)
    return StageRecord(*found)


async def _write_move(
    connection: asyncpg.Connection,
    moved: StageRecord,
    status_read: str,
    deployment: DeploymentRecord,
    status_before: str,
    policy_version: int,
    audit: dict,
) -> StageRecord:
    """Writes a stage's move if the stage's status is still `status_read`, its
    deployment's still `status_before` and its environment's policy still at
    `policy_version`, with what follows (_WRITE_DEPLOYMENT_MOVE: the event of a
    deployment it ended among it) and its audit row (`audit`, its details as JSON text),
    then a rollback's events if it ended a rollback's redeployment (in the caller's
    transaction). Returns the stage as stored; raises _StageChanged, having written
    nothing, if any had changed."""
    changed = deployment.status != status_before
    stage_move = (
        moved.id,
        moved.status,
        moved.output,
        moved.started_at,
        moved.completed_at,
        status_read,
        *audit_log.as_text(audit),
        deployment.id,
        status_before,
        policy_version,
    )
    if changed:
        ended = events.ENDED.get(deployment.status)
        stage_updated_at, deployment_updated_at = await connection.fetchrow(
            _WRITE_DEPLOYMENT_MOVE,
            *stage_move,
            deployment.status,
            deployment.deployed_at,
            deployment.completed_at,
            None if ended is None else ended.value,
            None if ended is None else events.deployment_data(deployment),
        )
    else:
        stage_updated_at, deployment_updated_at = await connection.fetchrow(
            _WRITE_STAGE_MOVE, *stage_move
        )
    if stage_updated_at is None:
        raise _StageChanged
    if changed:
        deployment.updated_at = deployment_updated_at
        await events.rollback_ended_on(connection, deployment)
    return replace(moved, updated_at=stage_updated_at)


@dataclass(frozen=True, slots=True)
class EnvironmentRef:
    """What a stage's move needs of its environment: its id and name (check_deployer)."""

    id: uuid.UUID
    name: str


def _stage_output(output: str) -> str | None:
    output = text_field("output", output, STAGE_OUTPUT_MAX, required=False)
    if output is not None and len(output.encode()) > STAGE_OUTPUT_MAX:
        raise InvalidArgument.field("output", f"is larger than {STAGE_OUTPUT_MAX} bytes")
    return output


def _check_stage_move(
    deployment: DeploymentRecord, stages: list[StageRecord], stage: StageRecord, status: StageStatus
) -> None:
    """The deployment may run (approved, not ended), the move is one STAGE_MOVES allows,
    and a stage starts only after every earlier one is done."""
    if deployment.status == DeploymentStatus.AWAITING_APPROVAL:
        raise FailedPrecondition(
            "the deployment is waiting for approval",
            reason="AWAITING_APPROVAL",
            metadata={"deployment_id": str(deployment.id)},
        )
    if deployment.status in TERMINAL:
        raise FailedPrecondition(
            f"the deployment has ended ({deployment.status})",
            reason="DEPLOYMENT_ENDED",
            metadata={"deployment_id": str(deployment.id), "status": deployment.status},
        )
    current = StageStatus(stage.status)
    if status not in STAGE_MOVES.get(current, set()):
        raise FailedPrecondition(
            f"a {current} stage cannot become {status}",
            reason="INVALID_STAGE_TRANSITION",
            metadata={"stage_id": str(stage.id), "from": current.value, "to": status.value},
        )
    earlier = [s for s in stages if s.order < stage.order]
    if current == StageStatus.PENDING and any(s.status not in DONE_STAGES for s in earlier):
        waiting = next(s for s in earlier if s.status not in DONE_STAGES)
        raise FailedPrecondition(
            f"stage {waiting.name} has not finished",
            reason="PREVIOUS_STAGE_NOT_DONE",
            metadata={"stage_id": str(stage.id), "waiting_for_stage_id": str(waiting.id)},
        )


def _stage_moved(
    stage: StageRecord, status: StageStatus, output: str | None, now: datetime
) -> StageRecord:
    """The stage after its move (its updated_at is the database's, read back)."""
    running = status == StageStatus.RUNNING
    return replace(
        stage,
        status=status.value,
        output=output if output is not None else stage.output,
        started_at=now if running else stage.started_at,
        completed_at=stage.completed_at if running else now,
    )


def _advance_deployment(
    deployment: DeploymentRecord, stages: list[StageRecord], moved: StageRecord, now: datetime
) -> None:
    """The deployment follows its stages: the first to run starts it, and it succeeds
    once every stage succeeded or was skipped."""
    if moved.status == StageStatus.RUNNING and deployment.status == DeploymentStatus.PENDING:
        deployment.status = DeploymentStatus.IN_PROGRESS.value
        deployment.deployed_at = now
    if all((moved if s.id == moved.id else s).status in DONE_STAGES for s in stages):
        deployment.status = DeploymentStatus.SUCCEEDED.value
        deployment.completed_at = now
        deployment.deployed_at = deployment.deployed_at or now


async def cancel_deployment(
    database: Database,
    actor: Actor,
    deployment_id: uuid.UUID,
    reason: str,
    key: RequestKey | None,
) -> Deployment:
    """Ends an active deployment as cancelled; returns it with its stages."""
    reason = text_field("reason", reason, 10_000, required=False)
    async with database.transaction() as session:
        if earlier := await replay(session, key, Deployment):
            return await _with_stages(session, earlier.id)
        deployment, _, _ = await lock_deployment_for_change(session, actor, deployment_id)
        if deployment.status not in ACTIVE_DEPLOYMENT_STATUSES:
            raise FailedPrecondition(
                f"only an active deployment can be cancelled, this one is {deployment.status}",
                reason="DEPLOYMENT_NOT_ACTIVE",
                metadata={"deployment_id": str(deployment_id), "status": deployment.status},
            )
        await end_deployment(session, deployment, DeploymentStatus.CANCELLED)
        await session.flush()
        await audit_log.append(
            session, actor, "cancel", "deployment", deployment_id, {"reason": reason}
        )
        await events.deployment_ended(session, deployment)
        await remember(session, key, "deployment", deployment_id)
        return await _with_stages(session, deployment_id)


# -- reads -----------------------------------------------------------------------------------


async def get_deployment(database: Database, deployment_id: uuid.UUID) -> Deployment:
    async with database.replica_read() as session:
        return await load(session, Deployment, deployment_id)


async def get_deployment_with_stages(database: Database, deployment_id: uuid.UUID) -> Deployment:
    async with database.replica_read() as session:
        return await _with_stages(session, deployment_id)


async def get_full_deployment(database: Database, deployment_id: uuid.UUID) -> FullDeployment:
    async with database.replica_read_connection() as connection:
        return await load_full_deployment(connection, deployment_id)


def _record_of(alias: str, columns: Sequence[str]) -> str:
    return "ROW(" + ", ".join(f'{alias}."{name}"' for name in columns) + ")"


# The full view in one statement, its children as arrays of anonymous records (asyncpg
# decodes them as tuples, with no type to look up, behind PgBouncer too), on the
# asyncpg connection itself: four Core queries through SQLAlchemy cost about 1.3 ms of
# the service's CPU per call at 16 in flight (python -m bench --only lifecycles).
_FULL_DEPLOYMENT = f"""
SELECT {", ".join(f'd."{name}"' for name in _DEPLOYMENT_RECORD_FIELDS)},
    ARRAY(SELECT {_record_of("s", _STAGE_FIELDS)} FROM pipeline_stages s
          WHERE s.deployment_id = d.id ORDER BY s."order") AS stages,
    ARRAY(SELECT {_record_of("a", ApprovalRow._fields)} FROM approvals a
          WHERE a.deployment_id = d.id ORDER BY a.created_at) AS approvals,
    ARRAY(SELECT {_record_of("m", MetricRow._fields)} FROM deployment_metrics m
          WHERE m.deployment_id = d.id ORDER BY m.metric_name) AS metrics
FROM deployments d WHERE d.id = $1
"""


async def load_full_deployment(
    connection: asyncpg.Connection, deployment_id: uuid.UUID
) -> FullDeployment:
    """The deployment with its stages, approvals and metrics (a step of GetDeployment's
    full view, and of the watcher's reads, which have a unit of work of their own), on
    an asyncpg connection outside any transaction."""
    found = await connection.fetchrow(_FULL_DEPLOYMENT, deployment_id)
    if found is None:
        raise missing(Deployment, deployment_id)
    *columns, stages, approvals, metrics = found
    return FullDeployment(
        *columns,
        stages=[StageRecord(*stage) for stage in stages],
        approvals=[ApprovalRow(*approval) for approval in approvals],
        metrics=[MetricRow(*metric) for metric in metrics],
    )


async def list_deployments(
    database: Database,
    *,
    service_id: uuid.UUID | None,
    release_id: uuid.UUID | None,
    environment_id: uuid.UUID | None,
    status: str | None,
    page_size: int,
    page_token: str,
) -> Page:
    equal = {
        "service_id": service_id,
        "release_id": release_id,
        "environment_id": environment_id,
        "status": status,
    }
    async with database.replica_read() as session:
        return await list_page(
            session, Deployment, page_size=page_size, page_token=page_token, equal=equal
        )


@dataclass(frozen=True)
class LiveDeployment:
    service_id: uuid.UUID
    environment_id: uuid.UUID
    live_release: Release | None
    live_deployment: Deployment | None
    active_deployment: Deployment | None


# A slot (a service in an environment) is live while a deployment there succeeded or runs.
_LIVE_STATUSES = (DeploymentStatus.SUCCEEDED, *ACTIVE_DEPLOYMENT_STATUSES)
_SLOTS = (
    select(Service.id.label("service_id"), Environment.id.label("environment_id"))
    .select_from(Service)
    .join(Environment, true())
    .where(
        select(Deployment.id)
        .where(
            Deployment.service_id == Service.id,
            Deployment.environment_id == Environment.id,
            Deployment.status.in_(_LIVE_STATUSES),
        )
        .exists()
    )
)


async def list_live_deployments(
    database: Database, service_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    """Per service and environment where a deployment succeeded or runs, in the order of
    (service id, environment id): the newest succeeded deployment with its release, and the
    active one.

    Pages walk that key over services x environments (both small tables, in their keys'
    order), keeping a slot where a deployment is live, so a page reads the deployments of
    its own slots, never the whole table; then one read each for the page's newest
    succeeded deployments (with their releases) and its active ones."""
    size = pagination.page_size(page_size)
    filters = {"service_id": "" if service_id is None else str(service_id)}
    slots = _SLOTS if service_id is None else _SLOTS.where(Service.id == service_id)
    page_query = slots
    if page_token:
        after = pagination.decode_ids_token(page_token, filters, 2)
        page_query = page_query.where(
            Service.id >= after[0], tuple_(Service.id, Environment.id) > tuple_(*after)
        )
    async with database.replica_read() as session:
        keys = [
            tuple(key)
            for key in await session.execute(
                page_query.order_by(Service.id, Environment.id).limit(size + 1)
            )
        ]
        next_token = ""
        if len(keys) > size:
            keys = keys[:size]
            next_token = pagination.encode_ids_token(keys[-1], filters)
        whole = not page_token and not next_token  # this page is the whole list
        total = len(keys) if whole else await pagination.total_size(session, slots)
        if not keys:
            return Page([], next_token, total)
        in_page = tuple_(Deployment.service_id, Deployment.environment_id).in_(keys)
        newest_succeeded = (
            select(Deployment, Release)
            .join(Release, Release.id == Deployment.release_id)
            .where(in_page, Deployment.status == DeploymentStatus.SUCCEEDED)
            .distinct(Deployment.service_id, Deployment.environment_id)
            .order_by(
                Deployment.service_id,
                Deployment.environment_id,
                Deployment.completed_at.desc(),
                Deployment.id.desc(),
            )
        )
        live = {
            (d.service_id, d.environment_id): (d, r)
            for d, r in await session.execute(newest_succeeded)
        }
        active = select(Deployment).where(
            in_page, Deployment.status.in_(ACTIVE_DEPLOYMENT_STATUSES)
        )
        running = {(d.service_id, d.environment_id): d for d in await session.scalars(active)}
    items = [
        LiveDeployment(
            *key,
            live[key][1] if key in live else None,
            live[key][0] if key in live else None,
            running.get(key),
        )
        for key in keys
    ]
    return Page(items, next_token, total)


# -- metrics ----------------------------------------------------------------------------------


async def record_deployment_metric(
    database: Database,
    actor: Actor,
    deployment_id: uuid.UUID,
    metric_name: str,
    metric_value: float,
    unit: str,
) -> DeploymentMetric:
    """Records one metric of a deployment; recording the same name again replaces it."""
    metric_name = text_field(
        "metric_name",
        metric_name,
        100,
        pattern=METRIC_NAME,
        hint="must be lowercase letters, digits, . and _ (e.g. cpu_usage)",
    )
    unit = text_field("unit", unit, 20, required=False)
    if not math.isfinite(metric_value):
        raise InvalidArgument.field("metric_value", "must be a finite number")
    async with database.transaction() as session:
        await lock_deployment_for_change(session, actor, deployment_id)
        metric_id = await session.scalar(
            pg_insert(DeploymentMetric)
            .values(
                deployment_id=deployment_id,
                metric_name=metric_name,
                metric_value=metric_value,
                unit=unit,
            )
            .on_conflict_do_update(
                index_elements=["deployment_id", "metric_name"],
                set_={"metric_value": metric_value, "unit": unit, "updated_at": func.now()},
            )
            .returning(DeploymentMetric.id)
        )
        await audit_log.append(
            session,
            actor,
            "record",
            "deployment_metric",
            metric_id,
            {
                "deployment_id": str(deployment_id),
                "metric_name": metric_name,
                "metric_value": metric_value,
                "unit": unit,
            },
        )
        return await session.get(DeploymentMetric, metric_id, populate_existing=True)


# -- stage timeouts ------------------------------------------------------------------------------

SWEEPER = Actor(None, "stage-sweeper", None, None, "relman-deploy-svc")
_OVERDUE = (
    PipelineStage.status == StageStatus.RUNNING,
    PipelineStage.started_at + func.make_interval(0, 0, 0, 0, 0, 0, PipelineStage.timeout_seconds)
    < func.now(),
)


# The deployment of an overdue stage, if no other change holds it (the sweeper's turn),
# and its environment's policy version (_write_move's guard); then the stage, still
# overdue under that lock.
_LOCK_IF_FREE = f"""
SELECT {_columns("d", _DEPLOYMENT_RECORD_FIELDS)},
    (SELECT p.version FROM environment_policies p WHERE p.environment_id = d.environment_id)
FROM deployments d WHERE d.id = $1
FOR UPDATE OF d SKIP LOCKED
"""
_STILL_OVERDUE = f"""
SELECT {_columns("s", _STAGE_FIELDS)} FROM pipeline_stages s
WHERE s.id = $1 AND s.status = 'running'
  AND s.started_at + make_interval(secs => s.timeout_seconds) < now()
"""


async def fail_timed_out_stages(session: AsyncSession, limit: int = 100) -> int:
    """Fails running stages past their timeout_seconds ("timed out"), failing their deployment.

    A step of the sweeper, which owns the unit of work. Safe with several replicas at
    once: each deployment is taken with FOR UPDATE SKIP LOCKED (a busy one waits for the
    next sweep) and the stage is checked again under it. The move is written as
    UpdatePipelineStage writes a failed stage (_write_move).
    """
    candidates = (
        await session.execute(
            select(PipelineStage.id, PipelineStage.deployment_id, Deployment.release_id)
            .join(Deployment, Deployment.id == PipelineStage.deployment_id)
            .where(*_OVERDUE)
            .limit(limit)
        )
    ).all()
    connection = await driver_connection(session)
    failed = 0
    # In the order of their releases, whose rows each failure locks until this commits
    # (migration 015), as a rollback locks its releases: no two wait on each other.
    for stage_id, deployment_id, _ in sorted(candidates, key=lambda row: row.release_id):
        found = await connection.fetchrow(_LOCK_IF_FREE, deployment_id)
        if found is None:
            continue
        row = await connection.fetchrow(_STILL_OVERDUE, stage_id)
        if row is None:
            continue
        *columns, policy_version = found
        deployment, stage, now = DeploymentRecord(*columns), StageRecord(*row), _now()
        status_before = deployment.status
        deployment.status, deployment.completed_at = DeploymentStatus.FAILED.value, now
        details = {
            "deployment_id": str(deployment.id),
            "stage": stage.name,
            "timeout_seconds": stage.timeout_seconds,
        }
        audit = audit_log.relman_row(
            SWEEPER, "timeout", "pipeline_stage", stage.id, json.dumps(details)
        )
        moved = _stage_moved(stage, StageStatus.FAILED, "timed out", now)
        try:
            await _write_move(
                connection, moved, stage.status, deployment, status_before, policy_version, audit
            )
        except _StageChanged:  # moved on before the sweeper held it: not overdue
            continue
        failed += 1
    return failed
