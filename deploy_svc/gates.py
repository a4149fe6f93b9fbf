"""The promotion gates (domain layer): every rule a new deployment passes, named.

PromoteRelease and CreateDeployment refuse with the first gate that fails, CheckPromotion
lists them all: both read them from `evaluate`, so they cannot disagree. In order:
- promotion_order: the environment and the service are active, and the release
  succeeded in an environment of the previous type (development -> staging -> production);
- required_stages: in such a deployment every stage that environment's policy requires
  SUCCEEDED (skipped is no evidence that a test or scan passed);
- bake_time: that deployment completed at least the earlier environment's bake_minutes ago;
- freeze: no freeze window covers the target and the service now, or an admin passes
  it with a reason (audited freeze.override by the deploy path);
- deployer_role: the caller's role is one the target's policy lets deploy;
- active_deployment: nothing else is active for the service there (the deploy path
  evaluates this one under the slot's lock);
- approvals: informational, how many votes the deployment will wait for.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import freezes
from deploy_svc.freezes import timestamp_text
from deploy_svc.policies import Policy, in_force
from shared.framework.errors import DomainError, FailedPrecondition, PermissionDenied
from shared.identity.actor import Actor
from shared.identity.auth import may
from shared.persistence.db import Database, driver_connection, missing
from shared.persistence.models import (
    ACTIVE_DEPLOYMENT_STATUSES,
    Environment,
    EnvironmentPolicy,
    EnvironmentType,
    Release,
    Service,
)

PROMOTION_ORDER = list(EnvironmentType)


@dataclass(frozen=True)
class Gate:
    """One gate's verdict: `refusal` is what the deploy path raises when it failed."""

    name: str
    passed: bool
    detail: str
    refusal: DomainError | None = None
    freeze_window_id: str | None = None  # the freeze gate passed by an admin's override


@dataclass(frozen=True)
class Target:
    """What a new deployment is checked against, read once (plain rows: `_Columns`)."""

    release: Release
    service: Service
    environment: Environment
    policy: Policy


def _words(roles) -> str:
    return ", ".join(str(role) for role in roles)


# The succeeded deployments of a release in one environment type, newest first, each with
# its environment's policy and the names of its stages that succeeded.
POLICY_COLUMNS = EnvironmentPolicy.__table__.c
_POLICIES = EnvironmentPolicy.__table__


def _columns(alias: str, table) -> str:
    return ", ".join(f'{alias}."{column.name}"' for column in table.c)


# What the gates decide from, in one statement (after the slot's lock, taken by the
# target's read): the deployment active in the slot ($1 service, $2 environment) and the
# freeze windows that may be in force at $3.
_GATE_FACTS = f"""
SELECT
    (SELECT id FROM deployments WHERE service_id = $1 AND environment_id = $2
       AND status IN ({", ".join(f"'{status}'" for status in ACTIVE_DEPLOYMENT_STATUSES)})
     LIMIT 1) AS active,
    ARRAY(SELECT ROW({", ".join(f'w."{name}"' for name in freezes.WINDOW_COLUMNS)})
          FROM ({freezes.maybe_in_force("$2", "$1", "$3")}) AS w) AS windows
"""
# The release's ($1) succeeded deployments in active environments of one type ($2, the
# one before the target's), newest first: id, completed_at, the stages that succeeded,
# then the policy of its environment (POLICY_COLUMNS, in table order). A statement of its
# own: asyncpg decodes no array inside an anonymous record.
_SUCCEEDED_BEFORE = f"""
SELECT d.id, d.completed_at, array_agg(s.name) FILTER (WHERE s.status = 'succeeded'),
    {_columns("p", _POLICIES)}
FROM deployments d
JOIN environments e ON e.id = d.environment_id
JOIN environment_policies p ON p.environment_id = d.environment_id
LEFT JOIN pipeline_stages s ON s.deployment_id = d.id
WHERE d.release_id = $1 AND d.status = 'succeeded' AND e.environment_type = $2 AND e.is_active
GROUP BY d.id, p.id
ORDER BY d.completed_at DESC, d.id DESC
"""


async def evaluate(
    connection: asyncpg.Connection,
    actor: Actor,
    target: Target,
    now: datetime,
    freeze_override_reason: str | None,
) -> list[Gate]:
    """Every gate, in the module docstring's order, for `actor` deploying `target` at `now`
    (on the asyncpg connection of the deploy's unit of work, after its target's read, or
    of CheckPromotion's read): their facts in one round trip (_GATE_FACTS), and one more
    past the first environment type (_SUCCEEDED_BEFORE)."""
    previous = _previous_type(target)
    facts = await connection.fetchrow(_GATE_FACTS, target.service.id, target.environment.id, now)
    succeeded = (
        []
        if previous is None
        else await connection.fetch(_SUCCEEDED_BEFORE, target.release.id, previous.value)
    )
    gates = _earlier_environment_gates(target, now, previous, succeeded)
    frozen = freezes.in_force_of(facts["windows"], now)
    gates.append(_freeze_gate(actor, frozen, freeze_override_reason))
    gates.append(_deployer_gate(actor, target))
    gates.append(_active_gate(target, facts["active"]))
    gates.append(_approvals_gate(target))
    return gates


def _previous_type(target: Target) -> EnvironmentType | None:
    """The environment type a release must have succeeded in before the target's; None
    for the first, and for a deactivated environment or service (no gate is read then)."""
    if _inactive(target) is not None:
        return None
    position = PROMOTION_ORDER.index(EnvironmentType(target.environment.environment_type))
    return PROMOTION_ORDER[position - 1] if position else None


def first_refusal(gates: list[Gate]) -> DomainError | None:
    return next((gate.refusal for gate in gates if not gate.passed), None)


def _earlier_environment_gates(
    target: Target, now: datetime, previous: EnvironmentType | None, succeeded_rows
) -> list[Gate]:
    """promotion_order, required_stages and bake_time, from the release's deployments in
    the previous environment type."""
    release, environment = target.release, target.environment
    inactive = _inactive(target)
    if inactive is not None:
        return [
            inactive,
            Gate("required_stages", False, "not checked: the promotion order gate failed"),
            Gate("bake_time", False, "not checked: the promotion order gate failed"),
        ]
    if previous is None:
        first = f"{environment.environment_type} comes first: nothing is required before it"
        return [
            Gate("promotion_order", True, first),
            Gate("required_stages", True, first),
            Gate("bake_time", True, first),
        ]
    succeeded = [(row[0], row[1], policy_in_row(row, 3, now), row[2]) for row in succeeded_rows]
    if not succeeded:
        return [
            Gate(
                "promotion_order",
                False,
                f"release {release.version} has not succeeded in {previous} yet",
                FailedPrecondition(
                    f"release {release.version} has not succeeded in {previous} yet",
                    reason="PROMOTION_ORDER",
                    metadata={
                        "missing_environment_type": previous.value,
                        "release_id": str(release.id),
                    },
                ),
            ),
            Gate("required_stages", False, f"not checked: nothing succeeded in {previous}"),
            Gate("bake_time", False, f"not checked: nothing succeeded in {previous}"),
        ]
    order = Gate("promotion_order", True, f"release {release.version} succeeded in {previous}")
    qualifying = []  # (deployment id, completed_at, that environment's policy)
    for deployment_id, completed_at, policy, passed in succeeded:
        if set(policy.rules.required_stages) <= set(passed or ()):
            qualifying.append((deployment_id, completed_at, policy))
    if not qualifying:
        newest_id, _, newest_policy, passed = succeeded[0]
        required = newest_policy.rules.required_stages
        missing = [name for name in required if name not in (passed or ())]
        message = f"release {release.version} has not passed {', '.join(missing)} in {previous}"
        return [
            order,
            Gate(
                "required_stages",
                False,
                f"{message} (deployment {newest_id}; skipped stages do not count)",
                FailedPrecondition(
                    message,
                    reason="REQUIRED_STAGES_NOT_PASSED",
                    metadata={
                        "release_id": str(release.id),
                        f"{previous}_deployment_id": str(newest_id),
                        "stages_not_passed": ",".join(missing),
                    },
                ),
            ),
            Gate("bake_time", False, "not checked: the required stages gate failed"),
        ]
    stages = Gate(
        "required_stages",
        True,
        f"deployment {qualifying[0][0]} in {previous} passed every stage its policy requires",
    )
    ready_at = min(done + timedelta(minutes=p.rules.bake_minutes) for _, done, p in qualifying)
    if ready_at <= now:
        bake = Gate("bake_time", True, f"baked in {previous} since {timestamp_text(ready_at)}")
    else:
        message = (
            f"release {release.version} is baking in {previous} until {timestamp_text(ready_at)}"
        )
        bake = Gate(
            "bake_time",
            False,
            message,
            FailedPrecondition(
                message,
                reason="BAKE_TIME_NOT_ELAPSED",
                metadata={"release_id": str(release.id), "ready_at": timestamp_text(ready_at)},
            ),
        )
    return [order, stages, bake]


def inactive_refusal(kind: str, row) -> FailedPrecondition | None:
    """FAILED_PRECONDITION `<KIND>_INACTIVE` when the environment or service `row` is
    deactivated (deploys and rollbacks alike)."""
    if row.is_active:
        return None
    return FailedPrecondition(
        f"{kind} {row.name} is deactivated",
        reason=f"{kind.upper()}_INACTIVE",
        metadata={f"{kind}_id": str(row.id)},
    )


def _inactive(target: Target) -> Gate | None:
    """The promotion_order gate, failed, when the environment or the service is deactivated."""
    for kind, row in (("environment", target.environment), ("service", target.service)):
        if (refusal := inactive_refusal(kind, row)) is not None:
            return Gate("promotion_order", False, refusal.message, refusal)
    return None


def _freeze_gate(actor: Actor, frozen: list[freezes.Frozen], override_reason: str | None) -> Gate:
    if not frozen:
        return Gate("freeze", True, "no freeze window is in force")
    window = frozen[0].window
    refusal = frozen[0].refusal()
    if override_reason and may(actor, "freezes.override"):
        return Gate(
            "freeze",
            True,
            f"freeze window {window.id} ({window.reason}) passed by an admin: {override_reason}",
            freeze_window_id=str(window.id),
        )
    if override_reason:
        message = "only an admin may pass a freeze window"
        return Gate(
            "freeze",
            False,
            f"{message}; {refusal.message}",
            PermissionDenied(
                message, reason="FREEZE_OVERRIDE_NOT_ALLOWED", metadata=refusal.metadata
            ),
        )
    return Gate(
        "freeze",
        False,
        f"{refusal.message} (window {window.id}; an admin may pass it with freeze_override_reason)",
        refusal,
    )


def deployer_refusal(actor: Actor, environment: Environment, policy: Policy) -> DomainError | None:
    """PERMISSION_DENIED unless the caller's role may deploy to, and change deployments
    in, the environment."""
    if actor.role in policy.rules.deployer_roles:
        return None
    return PermissionDenied(
        f"role {actor.role or 'none'} may not deploy to {environment.name} "
        f"(its policy allows {_words(policy.rules.deployer_roles)})",
        reason="DEPLOYER_ROLE_NOT_ALLOWED",
        metadata={"environment_id": str(environment.id), "role": str(actor.role or "")},
    )


def _deployer_gate(actor: Actor, target: Target) -> Gate:
    refusal = deployer_refusal(actor, target.environment, target.policy)
    if refusal is None:
        return Gate("deployer_role", True, f"role {actor.role} may deploy here")
    return Gate("deployer_role", False, refusal.message, refusal)


def _active_gate(target: Target, blocking: uuid.UUID | None) -> Gate:
    if blocking is None:
        return Gate("active_deployment", True, "no other deployment is active here")
    message = f"deployment {blocking} is still active in {target.environment.name}"
    return Gate(
        "active_deployment",
        False,
        message,
        FailedPrecondition(
            message,
            reason="ACTIVE_DEPLOYMENT_EXISTS",
            metadata={
                "blocking_deployment_id": str(blocking),
                "environment_id": str(target.environment.id),
            },
        ),
    )


def _approvals_gate(target: Target) -> Gate:
    rules = target.policy.rules
    if rules.required_approvals == 0:
        return Gate("approvals", True, "the deployment will start without waiting for votes")
    return Gate(
        "approvals",
        True,
        f"the deployment will wait for {rules.required_approvals} approval(s) from "
        f"{_words(rules.approver_roles)} other than the deployer",
    )


# -- reading the target ----------------------------------------------------------------------


class _Columns:
    """The columns of one table in a joined Core row, by name, from position `start`:
    what the ORM's loading of four entities per call did, at a fraction of its CPU
    (CheckPromotion and every deploy read these; make bench, check_promotion)."""

    __slots__ = ("_names", "_row", "_start")

    def __init__(self, row, start: int, names: dict[str, int] | None = None) -> None:
        self._row, self._start = row, start
        self._names = names or _POLICY_COLUMNS

    def __getattr__(self, name: str):
        return self._row[self._start + self._names[name]]


def policy_in_row(row, start: int, now: datetime) -> Policy:
    """The policy in force whose columns (`POLICY_COLUMNS`, in table order) a Core or ORM
    row holds from position `start`."""
    return in_force(_Columns(row, start), now)


def _positions(table) -> dict[str, int]:
    return {column.name: index for index, column in enumerate(table.c)}


_POLICY_COLUMNS = _positions(_POLICIES)


def slot_lock(service: str, environment: str) -> str:
    """The call that takes a slot's lock (a service in an environment) until the end of
    the transaction, from SQL text expressions of the two ids: every change of what runs
    in a slot holds it (deploy_svc.deployments.lock_slot)."""
    key = f"'deploy:' || {service} || ':' || {environment}"
    return f"pg_advisory_xact_lock(hashtextextended({key}, 0))"


_PARTS = (Release.__table__, Service.__table__, Environment.__table__, _POLICIES)
# The release, its service, the environment and its policy, each table's columns in
# table order; $1 the release, $2 the environment.
_TARGET = f"""
SELECT {_columns("r", Release.__table__)}, {_columns("s", Service.__table__)},
    {_columns("e", Environment.__table__)}, {_columns("p", _POLICIES)}
FROM releases r
JOIN services s ON s.id = r.service_id
JOIN environments e ON e.id = $2
JOIN environment_policies p ON p.environment_id = e.id
WHERE r.id = $1
"""
# The deploy path's read: the environment's and the service's rows KEY SHARE locked (as
# the deployment's foreign keys will lock them anyway), so an UpdateEnvironment or
# UpdateService that deactivates one (FOR UPDATE) either commits first and is seen here,
# or waits for this deployment; and the slot's lock taken (its last column), so that
# the gates' facts, read by the next statement, are read under it.
_TARGET_LOCKED = (
    _TARGET.replace(
        "\nFROM releases r",
        f", {slot_lock('r.service_id::text', 'e.id::text')}\nFROM releases r",
        1,
    )
    + "FOR KEY SHARE OF e, s\n"
)
# Which of a target's parts exist, when the read found none.
_PARTS_FOUND = """
SELECT EXISTS (SELECT FROM releases WHERE id = $1),
    EXISTS (SELECT FROM environments WHERE id = $2)
"""
_HELD_ENVIRONMENT = (
    select(Environment.id, Environment.name, Environment.is_active)
    .where(Environment.id == bindparam("environment_id"))
    .with_for_update(read=True, key_share=True)
)
_OFFSETS = [sum(len(table.c) for table in _PARTS[:i]) for i in range(len(_PARTS))]
_NAMES = [_positions(table) for table in _PARTS[:3]]  # the policy: policy_in_row


async def hold_environment(session: AsyncSession, environment_id: uuid.UUID):
    """The environment's id, name and is_active as they are now, its row held KEY SHARE
    against a deactivation in flight (a rollback's redeployment; a deploy's read holds it
    in _TARGET_LOCKED)."""
    return (await session.execute(_HELD_ENVIRONMENT, {"environment_id": environment_id})).one()


async def read_target(
    connection: asyncpg.Connection,
    release_id: uuid.UUID,
    environment_id: uuid.UUID,
    now: datetime,
    *,
    lock: bool = False,
) -> Target:
    """The release, its service, the environment and its policy in force, in one round trip
    (`lock`: for a deploy, with the environment held against a change of is_active)."""
    found = await connection.fetchrow(
        _TARGET_LOCKED if lock else _TARGET, release_id, environment_id
    )
    if found is None:  # NOT_FOUND naming whichever is missing
        release_found, environment_found = await connection.fetchrow(
            _PARTS_FOUND, release_id, environment_id
        )
        if not release_found:
            raise missing(Release, release_id)
        if not environment_found:
            raise missing(Environment, environment_id)
        # Every environment has a policy (007) and every release a service (a foreign key).
        raise LookupError(f"release {release_id} or environment {environment_id} is incomplete")
    release, service, environment = (
        _Columns(found, start, names) for start, names in zip(_OFFSETS[:3], _NAMES, strict=True)
    )
    return Target(release, service, environment, policy_in_row(found, _OFFSETS[3], now))


async def check_promotion(
    database: Database, actor: Actor, release_id: uuid.UUID, environment_id: uuid.UUID
) -> list[Gate]:
    """Every gate as PromoteRelease would find it for `actor` now; writes nothing."""
    async with database.read() as session:
        connection = await driver_connection(session)  # a read's: no transaction
        now = datetime.now(UTC)
        target = await read_target(connection, release_id, environment_id, now)
        return await evaluate(connection, actor, target, now, None)
