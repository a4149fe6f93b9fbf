"""Environment policies (domain layer): the rules of each environment as data.

One policy per environment, made by the database when the environment is inserted
(migration 007), with defaults that reproduce relman's rules before policies. Who can
walk around a policy is the question each rule here answers:
- only admins change one (UpdateEnvironmentPolicy), and a stale etag changes nothing;
- one admin cannot switch production's protection off, deploy, and switch it back: a
  change that weakens (fewer approvals, an approver or deployer role added, a required
  stage removed or reordered, a shorter bake) waits POLICY_WEAKEN_DELAY_S in `pending`,
  audited when asked for and when it takes effect; what strengthens applies at once;
- the rules read the policy in force at the moment of the call (`in_force`), so a
  pending change takes effect at its time exactly; the sweeper writes it down shortly
  after (`apply_due_changes`), with its audit row.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Text, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import events
from deploy_svc.events import EventType
from shared.framework.errors import InvalidArgument
from shared.framework.validation import text as text_field
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, check_etag, load
from shared.persistence.models import (
    STANDARD_STAGES,
    Deployment,
    Environment,
    EnvironmentPolicy,
    Role,
)

FIELDS = (
    "required_approvals",
    "approver_roles",
    "deployer_roles",
    "required_stages",
    "bake_minutes",
)
# A policy narrows what the role model allows; it never grants a role more.
APPROVER_CHOICES = (Role.ADMIN, Role.LEAD)
DEPLOYER_CHOICES = (Role.ADMIN, Role.LEAD, Role.DEVELOPER)
MAX_APPROVALS = 10
MAX_BAKE_MINUTES = 43_200  # 30 days
MAX_STAGES = 20
SCHEDULER = Actor(None, "policy-scheduler", None, None, "relman-deploy-svc")
_ROLE_ORDER = {role: index for index, role in enumerate(Role)}


def sorted_roles(roles: Sequence[Role | str]) -> tuple[Role, ...]:
    """Roles without repeats, in the enum's order (admin, lead, developer, ...)."""
    return tuple(sorted({Role(r) for r in roles}, key=_ROLE_ORDER.__getitem__))


@dataclass(frozen=True)
class Rules:
    """The five fields of a policy that decide what is allowed."""

    required_approvals: int
    approver_roles: tuple[Role, ...]
    deployer_roles: tuple[Role, ...]
    required_stages: tuple[str, ...]
    bake_minutes: int

    @classmethod
    def of(cls, source: Any) -> Rules:
        """From a policy row, or from the JSON of a pending change."""
        get = source.get if isinstance(source, Mapping) else lambda name: getattr(source, name)
        return cls(
            required_approvals=int(get("required_approvals")),
            approver_roles=sorted_roles(get("approver_roles")),
            deployer_roles=sorted_roles(get("deployer_roles")),
            required_stages=tuple(get("required_stages")),
            bake_minutes=int(get("bake_minutes")),
        )

    def as_json(self) -> dict[str, Any]:
        """As stored in `pending` and written in audit rows (roles as their words)."""
        return {
            name: [str(v) for v in value] if isinstance(value, tuple) else value
            for name, value in asdict(self).items()
        }

    def weakened_by(self, field: str, value: Any) -> bool:
        """Whether setting `field` to `value` lets through something this policy stops."""
        old = getattr(self, field)
        if field in ("required_approvals", "bake_minutes"):
            return value < old
        if field in ("approver_roles", "deployer_roles"):
            return bool(set(value) - set(old))
        return not _is_subsequence(old, value)  # required_stages: one removed or reordered

    def default_stages(self) -> list[str]:
        """A new deployment's stages when the caller names none."""
        return list(self.required_stages or STANDARD_STAGES)


def _is_subsequence(short: Sequence[str], long: Sequence[str]) -> bool:
    remaining = iter(long)
    return all(name in remaining for name in short)


@dataclass(frozen=True)
class Policy:
    """A policy as in force at one moment, with the weakening change still waiting."""

    environment_id: uuid.UUID
    rules: Rules
    version: int
    update_time: datetime
    pending: Rules | None
    pending_effective_at: datetime | None

    @property
    def etag(self) -> str:
        return str(self.version)

    @property
    def pending_policy(self) -> Policy | None:
        """The policy as it will be once the pending change takes effect."""
        if self.pending is None:
            return None
        return replace(
            self,
            rules=self.pending,
            version=self.version + 1,
            update_time=self.pending_effective_at,
            pending=None,
            pending_effective_at=None,
        )


def in_force(row: EnvironmentPolicy, now: datetime) -> Policy:
    """The policy `row` holds as in force at `now`: a pending change whose time has come
    counts already, as the version the sweeper will write (same etag)."""
    policy = Policy(
        environment_id=row.environment_id,
        rules=Rules.of(row),
        version=row.version,
        update_time=row.updated_at,
        pending=Rules.of(row.pending) if row.pending is not None else None,
        pending_effective_at=row.pending_effective_at,
    )
    if policy.pending is not None and policy.pending_effective_at <= now:
        return policy.pending_policy
    return policy


def _now() -> datetime:
    return datetime.now(UTC)


async def _row(
    session: AsyncSession, environment_id: uuid.UUID, *, for_update: bool = False
) -> EnvironmentPolicy:
    query = select(EnvironmentPolicy).where(EnvironmentPolicy.environment_id == environment_id)
    if for_update:
        query = query.with_for_update()
    row = await session.scalar(query.execution_options(populate_existing=True))
    if row is None:
        await load(session, Environment, environment_id)  # NOT_FOUND, naming the environment
        raise LookupError(f"environment {environment_id} has no policy")  # migration 007 makes one
    return row


async def policy_of(session: AsyncSession, environment_id: uuid.UUID, now: datetime) -> Policy:
    """The environment's policy in force at `now` (a step of a use case)."""
    return in_force(await _row(session, environment_id), now)


async def get_policy(database: Database, environment_id: uuid.UUID) -> Policy:
    """On the primary, not a read replica: its etag is what an update must name, and one
    read from a lagging replica would only fail the update that follows."""
    async with database.read() as session:
        return await policy_of(session, environment_id, _now())


# -- checking a requested change -----------------------------------------------------------


def check_required_approvals(value: int) -> int:
    if not 0 <= value <= MAX_APPROVALS:
        raise InvalidArgument.field(
            "policy.required_approvals", f"must be from 0 to {MAX_APPROVALS}"
        )
    return value


def check_roles(field: str, values: Sequence[int | str], choices: tuple[Role, ...]) -> tuple:
    """`values` are Role words (the transport converts enum numbers)."""
    if not values:
        raise InvalidArgument.field(f"policy.{field}", "must name at least one role")
    roles = []
    for index, value in enumerate(values):
        if value not in {str(c) for c in choices}:
            raise InvalidArgument.field(
                f"policy.{field}[{index}]",
                f"must be one of {', '.join(str(c).upper() for c in choices)}",
            )
        roles.append(Role(value))
    return sorted_roles(roles)


def check_stage_list(field: str, values: Sequence[str]) -> list[str]:
    """Stage names, as a deployment's stages or a policy's required ones: at most
    MAX_STAGES, each 1 to 100 characters, none twice."""
    if len(values) > MAX_STAGES:
        raise InvalidArgument.field(field, f"at most {MAX_STAGES} stages")
    names = [text_field(f"{field}[{i}]", name, 100) for i, name in enumerate(values)]
    if len(set(names)) != len(names):
        raise InvalidArgument.field(field, "must not repeat a name")
    return names


def check_required_stages(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(check_stage_list("policy.required_stages", values))


def check_bake_minutes(value: int) -> int:
    if not 0 <= value <= MAX_BAKE_MINUTES:
        raise InvalidArgument.field(
            "policy.bake_minutes", f"must be from 0 to {MAX_BAKE_MINUTES} (30 days)"
        )
    return value


# -- changing a policy ----------------------------------------------------------------------


def _write(row: EnvironmentPolicy, rules: Rules) -> None:
    for name, value in asdict(rules).items():
        setattr(row, name, [str(v) for v in value] if isinstance(value, tuple) else value)


async def _apply_if_due(session: AsyncSession, row: EnvironmentPolicy, now: datetime) -> None:
    """Writes down a pending change whose time has come, with its audit row (the row is
    locked by the caller)."""
    if row.pending is None or row.pending_effective_at > now:
        return
    before = Rules.of(row)
    after = Rules.of(row.pending)
    effective_at = row.pending_effective_at
    _write(row, after)
    row.pending = None
    row.pending_effective_at = None
    row.version += 1
    row.updated_at = effective_at
    await session.flush()
    # A delayed change may still ask for other voters (a role swapped for another).
    await _await_votes_again(session, SCHEDULER, row.environment_id, before, after)
    await audit_log.append(
        session,
        SCHEDULER,
        "policy.update_effective",
        "environment_policy",
        row.environment_id,
        {
            "before": before.as_json(),
            "after": after.as_json(),
            "effective_at": effective_at.isoformat(),
        },
    )
    await session.refresh(row)
    await events.resource_event(
        session, EventType.POLICY_UPDATED, None, "policy", in_force(row, effective_at)
    )


async def update_policy(
    database: Database,
    actor: Actor,
    environment_id: uuid.UUID,
    changes: Mapping[str, Any],
    etag: str,
    weaken_delay_s: int,
) -> Policy:
    """Changes the fields in `changes` (already checked): what strengthens or keeps a
    rule applies now, what weakens one waits `weaken_delay_s` in the pending change
    (whose timer restarts); a field changed again drops its pending value."""
    async with database.transaction() as session:
        row = await _row(session, environment_id, for_update=True)
        now = _now()
        await _apply_if_due(session, row, now)
        check_etag(etag, row.version, "policy", {"environment_id": str(environment_id)})
        before = Rules.of(row)
        pending = Rules.of(row.pending) if row.pending is not None else None
        waiting = {
            name: getattr(pending, name)
            for name in FIELDS
            if pending is not None and getattr(pending, name) != getattr(before, name)
        }
        now_values = asdict(before)
        weakened = False
        for name, value in changes.items():
            waiting.pop(name, None)
            if weaken_delay_s and before.weakened_by(name, value):
                waiting[name] = value
                weakened = True
            else:
                now_values[name] = value
        after = Rules(**now_values)
        _write(row, after)
        if waiting:
            row.pending = Rules(**{**now_values, **waiting}).as_json()
            if weakened or row.pending_effective_at is None:
                row.pending_effective_at = now + timedelta(seconds=weaken_delay_s)
        else:
            row.pending = None
            row.pending_effective_at = None
        row.version += 1
        await session.flush()
        await _await_votes_again(session, actor, environment_id, before, after)
        await audit_log.append(
            session,
            actor,
            "policy.update",
            "environment_policy",
            environment_id,
            {
                "before": before.as_json(),
                "after": after.as_json(),
                "pending": row.pending,
                "pending_effective_at": (
                    row.pending_effective_at.isoformat() if row.pending_effective_at else None
                ),
            },
        )
        await session.refresh(row)
        result = in_force(row, now)
        await events.resource_event(session, EventType.POLICY_UPDATED, None, "policy", result)
        return result


# Deployments there that have not started and lack the votes the policy now asks for.
# Their releases' status stays as it is (pending and awaiting_approval count alike), so
# migration 015's triggers lock none of them: nothing here waits on a release's row.
_AWAIT_VOTES_AGAIN = text(
    """
    UPDATE deployments d SET status = 'awaiting_approval', updated_at = now()
    WHERE d.environment_id = :environment_id AND d.status = 'pending' AND NOT d.is_rollback
      AND (SELECT count(*) FROM approvals a JOIN users u ON u.id = a.approver_id
           WHERE a.deployment_id = d.id AND a.status = 'approved' AND u.is_active
             AND u.role = ANY (:approver_roles) AND u.id <> d.deployed_by) < :required
    RETURNING d.id
    """
).bindparams(bindparam("approver_roles", type_=ARRAY(Text)))


async def _await_votes_again(
    session: AsyncSession, actor: Actor, environment_id: uuid.UUID, before: Rules, rules: Rules
) -> None:
    """A stronger approval rule applies at once, also to deployments that have not started
    yet: each that lacks the votes now asked for waits for them again (audited), so a
    deployment made while the rule was weaker cannot run without them later."""
    if rules.required_approvals <= before.required_approvals and set(rules.approver_roles) >= set(
        before.approver_roles
    ):
        return  # every vote that counted still counts, and no more are asked for
    moved = (
        await session.scalars(
            _AWAIT_VOTES_AGAIN,
            {
                "environment_id": environment_id,
                "approver_roles": [str(r) for r in rules.approver_roles],
                "required": rules.required_approvals,
            },
        )
    ).all()
    for deployment_id in moved:
        await audit_log.append(
            session,
            actor,
            "await_approval",
            "deployment",
            deployment_id,
            {"reason": f"the policy now requires {rules.required_approvals} approval(s)"},
        )
        deployment = await session.get(Deployment, deployment_id, populate_existing=True)
        await events.deployment_event(session, EventType.DEPLOYMENT_AWAITING_APPROVAL, deployment)


async def apply_due_changes(session: AsyncSession, limit: int = 100) -> int:
    """Writes down the pending changes whose time has come (a step of the sweeper; safe
    with several replicas: each row is taken with SKIP LOCKED)."""
    rows = (
        await session.scalars(
            select(EnvironmentPolicy)
            .where(EnvironmentPolicy.pending_effective_at <= _now())
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    now = _now()
    for row in rows:
        await _apply_if_due(session, row, now)
    return len(rows)
