"""SQLAlchemy 2.0 typed models of every table, matching the migrations exactly.

The migrations are the source of truth for the schema; a test runs Alembic's
autogenerate comparison at head and fails on any difference, so these models
cannot drift from them. Constraint and index names follow one naming
convention, which the migrations spell out literally.

Status columns are VARCHAR(20) holding the lowercase words of the StrEnums
below, guarded by CHECK constraints in the database.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    FetchedValue,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    func,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class ReleaseStatus(StrEnum):
    DRAFT = "draft"
    PROMOTED = "promoted"
    IN_PROGRESS = "in_progress"
    TESTING = "testing"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class DeploymentStatus(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"


class StageStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class RollbackStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class Role(StrEnum):
    """What a user may do (shared.identity.auth maps each role to its permissions)."""

    ADMIN = "admin"
    LEAD = "lead"
    DEVELOPER = "developer"
    VIEWER = "viewer"
    SERVICE = "service"


class AuditOrigin(StrEnum):
    """Who wrote an audit row: relman about its own work, or a client through LogAction(s)."""

    RELMAN = "relman"
    CLIENT = "client"


class EnvironmentType(StrEnum):
    """Declared in promotion order: development -> staging -> production."""

    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"


ACTIVE_DEPLOYMENT_STATUSES = (
    DeploymentStatus.PENDING,
    DeploymentStatus.AWAITING_APPROVAL,
    DeploymentStatus.IN_PROGRESS,
)

STANDARD_STAGES = ("build", "test", "security_scan", "deploy", "smoke_test")


def _one_of(column: str, vocabulary: type[StrEnum]) -> CheckConstraint:
    """CHECK that a column holds one word of its vocabulary (named ck_<table>_<column>)."""
    words = ", ".join(f"'{member.value}'" for member in vocabulary)
    return CheckConstraint(f"{column} IN ({words})", name=column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Server-made values (created_at, updated_at, defaults) come back by RETURNING in the
    # INSERT or UPDATE itself, not by a SELECT afterwards.
    __mapper_args__ = {"eager_defaults": True}
    type_annotation_map = {
        uuid.UUID: Uuid(),
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[str]: JSONB,
    }


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        primary_key=True, default=uuid.uuid4, server_default=func.gen_random_uuid()
    )


def _created_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now(), onupdate=func.now())


def _version() -> Mapped[int]:
    """Raised by the database on every UPDATE (trigger relman_bump_version, migration 010)
    and read back by RETURNING: the resource's etag (AIP-154)."""
    return mapped_column(Integer, server_default=text("1"), server_onupdate=FetchedValue())


def _named(table: str) -> tuple:
    """A name that is also a resource name (`teams/{name}`): unique whatever its case, and
    without a `/`. The database also keeps it from changing (trigger relman_names_fixed)."""
    return (
        Index(f"uq_{table}_name_any_case", func.lower(text("name")), unique=True),
        CheckConstraint("strpos(name, '/') = 0", name="name_has_no_slash"),
    )


def _user_fk(nullable: bool = False) -> Mapped[Any]:
    """Users are deactivated, never deleted: every reference to them restricts deletion."""
    return mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), nullable=nullable, index=True)


class Team(Base):
    __tablename__ = "teams"
    __table_args__ = (
        UniqueConstraint("name"),
        *_named("teams"),
        CheckConstraint("member_count >= 0", name="member_count"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    slack_channel: Mapped[str | None] = mapped_column(String(100))
    member_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
    updated_at: Mapped[datetime] = _updated_at()


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("email"),
        UniqueConstraint("username"),
        _one_of("role", Role),
        CheckConstraint("is_admin = (role = 'admin')", name="is_admin_matches_role"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(100))
    full_name: Mapped[str | None] = mapped_column(String(200))
    hashed_password: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(server_default=true())
    is_admin: Mapped[bool] = mapped_column(server_default=false())
    role: Mapped[str] = mapped_column(String(20), server_default=Role.VIEWER.value)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
    updated_at: Mapped[datetime] = _updated_at()


class ApiToken(Base):
    """A bearer token: Login's (name "login") or a long-lived one for an internal caller.

    Only the SHA-256 of the token is stored; the token itself is shown once.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("token_hash"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    token_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # Who minted it (None: the tokens command line). A token minted by someone else
    # works only while its user's role is service (migration 006).
    created_by: Mapped[uuid.UUID | None] = _user_fk(nullable=True)


class LoginThrottle(Base):
    """Failed logins of one key (`user:<username>|<peer>` or `peer:<peer>`) in a fixed
    window, shared by every replica; `throttled` counts the attempts refused in it."""

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[datetime]
    failures: Mapped[int] = mapped_column(server_default=text("0"))
    throttled: Mapped[int] = mapped_column(server_default=text("0"))


class Environment(Base):
    __tablename__ = "environments"
    __table_args__ = (
        UniqueConstraint("name"),
        *_named("environments"),
        _one_of("environment_type", EnvironmentType),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    environment_type: Mapped[str] = mapped_column(String(20), index=True)
    config_path: Mapped[str | None] = mapped_column(String(500))
    is_active: Mapped[bool] = mapped_column(server_default=true())
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    version: Mapped[int] = _version()


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (UniqueConstraint("name"), *_named("services"))

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    repository_url: Mapped[str | None] = mapped_column(String(500))
    team_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("teams.id", ondelete="RESTRICT"), index=True
    )
    slack_channel: Mapped[str | None] = mapped_column(String(100))
    owner_id: Mapped[uuid.UUID | None] = _user_fk(nullable=True)
    is_active: Mapped[bool] = mapped_column(server_default=true())
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
    updated_at: Mapped[datetime] = _updated_at()
    version: Mapped[int] = _version()


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (
        UniqueConstraint("service_id", "version"),
        # The target of deployments' composite key: a deployment's service is its release's.
        UniqueConstraint("id", "service_id"),
        _one_of("status", ReleaseStatus),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    service_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("services.id", ondelete="RESTRICT"), index=True
    )
    version: Mapped[str] = mapped_column(String(50), index=True)
    status: Mapped[str] = mapped_column(
        String(20), server_default=ReleaseStatus.DRAFT.value, index=True
    )
    release_notes: Mapped[str | None] = mapped_column(Text)
    git_commit: Mapped[str | None] = mapped_column(String(40))
    # A fix of something already shipped: its production deployments are rework (DORA).
    hotfix: Mapped[bool] = mapped_column(server_default=false())
    created_by: Mapped[uuid.UUID] = _user_fk()
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


# Its service's name, for the release's resource name (services/{name}/releases/{version}):
# read by every ORM read of a release in the same statement, one primary-key lookup. After
# an INSERT it is not loaded until the row is refreshed (create_release does).
Release.service_name = column_property(
    select(Service.name).where(Service.id == Release.service_id).scalar_subquery()
)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        Index("ix_deployments_release_id_environment_id", "release_id", "environment_id"),
        # At most one active deployment per service and environment, whatever the code does.
        Index(
            "uq_deployments_one_active",
            "service_id",
            "environment_id",
            unique=True,
            postgresql_where=text("status IN ('pending', 'awaiting_approval', 'in_progress')"),
        ),
        ForeignKeyConstraint(
            ["release_id", "service_id"],
            ["releases.id", "releases.service_id"],
            name="fk_deployments_release_id_service_id_releases",
            ondelete="RESTRICT",
        ),
        _one_of("status", DeploymentStatus),
        # GetDoraMetrics: the deployments that ended, by environment and time...
        Index(
            "ix_deployments_environment_id_completed_at",
            "environment_id",
            "completed_at",
            postgresql_where=text("status IN ('succeeded', 'failed', 'rolled_back')"),
        ),
        # ... and the next success after a failure (also a live release's lookup).
        Index(
            "ix_deployments_succeeded",
            "service_id",
            "environment_id",
            "completed_at",
            postgresql_where=text("status = 'succeeded'"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    release_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("releases.id", ondelete="RESTRICT"), index=True
    )
    service_id: Mapped[uuid.UUID] = mapped_column(index=True)
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("environments.id", ondelete="RESTRICT"), index=True
    )
    status: Mapped[str] = mapped_column(
        String(20), server_default=DeploymentStatus.PENDING.value, index=True
    )
    deployed_by: Mapped[uuid.UUID] = _user_fk()
    deployed_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    # An admin's reason for creating it inside a freeze window (audited freeze.override).
    freeze_override_reason: Mapped[str | None] = mapped_column(Text)
    # A rollback's redeployment: restoring service passes freezes and approvals.
    is_rollback: Mapped[bool] = mapped_column(server_default=false())

    stages: Mapped[list[PipelineStage]] = relationship(
        order_by="PipelineStage.order", lazy="raise", passive_deletes=True
    )
    approvals: Mapped[list[Approval]] = relationship(
        order_by="Approval.created_at", lazy="raise", passive_deletes=True
    )
    metrics: Mapped[list[DeploymentMetric]] = relationship(
        order_by="DeploymentMetric.metric_name", lazy="raise", passive_deletes=True
    )


# What GetDoraMetrics aggregates, in each of its indexes: the rows are read from them alone.
_OUTCOME_FIGURES = ["lead_time_s", "recovery_s", "succeeded", "rework"]


class DeploymentOutcome(Base):
    """An ended deployment's DORA facts (deploy_svc.dora), derived by the view
    deployment_outcomes_derived and kept equal to it by triggers at commit (migration 012):
    never written by the services, whose role may only read it."""

    __tablename__ = "deployment_outcomes"
    __table_args__ = (
        Index(
            "ix_deployment_outcomes_environment_id_completed_at",
            "environment_id",
            "completed_at",
            postgresql_include=_OUTCOME_FIGURES,
        ),
        Index(
            "ix_deployment_outcomes_production_completed_at",
            "completed_at",
            postgresql_include=_OUTCOME_FIGURES,
            postgresql_where=text("production"),
        ),
        Index(
            "ix_deployment_outcomes_service_id_completed_at",
            "service_id",
            "completed_at",
            postgresql_include=[*_OUTCOME_FIGURES, "environment_id", "production"],
        ),
        # A success's pair's failures still to recover, or recovered after it.
        Index(
            "ix_deployment_outcomes_failures",
            "service_id",
            "environment_id",
            "recovered_at",
            postgresql_where=text("NOT succeeded"),
        ),
    )

    deployment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[uuid.UUID]
    environment_id: Mapped[uuid.UUID]
    production: Mapped[bool]  # its environment is of type production
    completed_at: Mapped[datetime]
    succeeded: Mapped[bool]  # else FAILED or ROLLED_BACK
    # completed_at - its release's created_at; a succeeded one not a rollback's only
    lead_time_s: Mapped[float | None] = mapped_column(Double)
    rework: Mapped[bool]  # succeeded, and a rollback's redeployment or a hotfix release
    failed_at: Mapped[datetime | None]  # FAILED: completed_at; ROLLED_BACK: its rollback's
    recovered_at: Mapped[datetime | None]  # the next success of its service in its environment
    recovery_s: Mapped[float | None] = mapped_column(Double)


def _deployment_child_fk() -> Mapped[uuid.UUID]:
    """Children of a deployment go with it."""
    return mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)


class Approval(Base):
    __tablename__ = "approvals"
    __table_args__ = (
        UniqueConstraint("deployment_id", "approver_id"),  # a vote is cast once
        _one_of("status", ApprovalStatus),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    deployment_id: Mapped[uuid.UUID] = _deployment_child_fk()
    approver_id: Mapped[uuid.UUID] = _user_fk()
    status: Mapped[str] = mapped_column(
        String(20), server_default=ApprovalStatus.PENDING.value, index=True
    )
    notes: Mapped[str | None] = mapped_column(Text)
    approved_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class AuditLog(Base):
    """Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE (migration 005), and the
    services' own database role holds only INSERT and SELECT on it (shared.persistence.roles).

    Partitioned by month of created_at (migration 008): tables `audit_logs_yYYYYmMM`, made
    ahead by `relman_audit_partitions_ahead` and never described here. The key is
    (created_at, id), the keyset order, since a partitioned table's keys must hold its
    partition key; ids are unique by their generators."""

    __tablename__ = "audit_logs"
    __table_args__ = (
        PrimaryKeyConstraint("created_at", "id", name="pk_audit_logs"),
        # Keyset order after each listing filter (the key is the order alone).
        Index("ix_audit_logs_action_created_at_id", "action", "created_at", "id"),
        Index("ix_audit_logs_user_id_created_at_id", "user_id", "created_at", "id"),
        Index(
            "ix_audit_logs_resource_type_resource_id_created_at_id",
            "resource_type",
            "resource_id",
            "created_at",
            "id",
        ),
        # relman's own rows in keyset order (the filter by origin); client rows, the bulk,
        # are most of (created_at, id) and pay for no index of their own.
        Index(
            "ix_audit_logs_relman_created_at_id",
            "created_at",
            "id",
            postgresql_where=text("origin = 'relman'"),
        ),
        # The sealer's and the verifier's order, and exports of a range of seals.
        Index("ix_audit_logs_sequence", "sequence"),
        _one_of("origin", AuditOrigin),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[uuid.UUID] = mapped_column(default=uuid.uuid4, server_default=func.gen_random_uuid())
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    action: Mapped[str] = mapped_column(String(50))
    resource_type: Mapped[str] = mapped_column(String(50))
    resource_id: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    ip_address: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(255))
    # The start of the statement that wrote it (migration 009): when it was written, even
    # in a long transaction.
    created_at: Mapped[datetime] = mapped_column(server_default=func.statement_timestamp())
    # Set by the server only (NULL on rows older than migration 006): relman or client,
    # and the authenticated principal whose call wrote the row (no foreign key: always
    # the caller's own user, and a per-row key check would slow the bulk path).
    origin: Mapped[str | None] = mapped_column(String(10))
    recorded_by: Mapped[uuid.UUID | None]
    # The row's place in the sealed order (migration 009): from the database's sequence
    # only (the services' role may not set it), unique by that generator.
    sequence: Mapped[int] = mapped_column(
        BigInteger, server_default=text("nextval('audit_logs_sequence')")
    )


class AuditSeal(Base):
    """A signed, chained seal over the audit rows first_sequence..last_sequence
    (audit_svc.sealing). Append-only like the trail (migration 009); the services' role
    holds INSERT and SELECT only. oldest/newest_created_at are the sealed rows' times,
    which select the seals of a time window; they are not part of what is signed."""

    __tablename__ = "audit_seals"
    __table_args__ = (
        UniqueConstraint("first_sequence"),
        CheckConstraint("first_sequence <= last_sequence", name="range"),
        Index("ix_audit_seals_newest_created_at", "newest_created_at"),
    )

    seal_number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    first_sequence: Mapped[int] = mapped_column(BigInteger)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    row_count: Mapped[int]
    root_hash: Mapped[bytes]
    row_digests: Mapped[bytes]
    previous_seal_hash: Mapped[bytes]
    seal_hash: Mapped[bytes]
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes]
    sealed_at: Mapped[datetime]
    oldest_created_at: Mapped[datetime | None]
    newest_created_at: Mapped[datetime | None]


# The name of a month's partition of audit_logs: audit_logs_y2026m11.
AUDIT_PARTITION = re.compile(r"audit_logs_y(\d{4})m(\d{2})")


def described_here(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's include_name: every table but audit_logs' partitions, which are made at
    run time (a comparison would call each one a table to drop)."""
    return not (type_ == "table" and name is not None and AUDIT_PARTITION.fullmatch(name))


class AuditRequest(Base):
    """The request id of a LogAction/LogActions row and the row it stored: a retry finds
    its row here, and another request reusing the id is refused by the key. Apart from
    audit_logs, whose key must hold created_at (migration 008)."""

    __tablename__ = "audit_requests"
    __table_args__ = (Index("ix_audit_requests_audit_created_at", "audit_created_at"),)

    request_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    audit_id: Mapped[uuid.UUID]
    # The stored row's created_at (both the statement's start): the row's partition.
    audit_created_at: Mapped[datetime] = mapped_column(server_default=func.statement_timestamp())


class IdempotencyKey(Base):
    """A request id (AIP-155) as its caller used it for one method: a retry within its
    lifetime (at least 24 hours) is answered with the resource the first call answered
    with; the same id with another request is refused (request_hash differs). Apart from
    the resource's own id, and the caller's own: another caller's id is another request.
    The resource is NULL only inside the first call's transaction (claimed, not answered
    yet)."""

    __tablename__ = "idempotency_keys"

    caller_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), primary_key=True
    )
    method: Mapped[str] = mapped_column(String(100), primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    # SHA-256 of the request without its request_id (and without a password).
    request_hash: Mapped[bytes]
    resource_type: Mapped[str | None] = mapped_column(String(50))
    resource_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)


class Rollback(Base):
    __tablename__ = "rollbacks"
    __table_args__ = (
        UniqueConstraint("deployment_id"),  # a deployment is rolled back at most once
        _one_of("status", RollbackStatus),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    deployment_id: Mapped[uuid.UUID] = _deployment_child_fk()
    target_release_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("releases.id", ondelete="RESTRICT"), index=True
    )
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(
        String(20), server_default=RollbackStatus.PENDING.value, index=True
    )
    initiated_by: Mapped[uuid.UUID] = _user_fk()
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    # The deployment of the target release this rollback created (none for old seed rows).
    redeployment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="RESTRICT"), index=True
    )


class Runbook(Base):
    __tablename__ = "runbooks"

    id: Mapped[uuid.UUID] = _uuid_pk()
    title: Mapped[str] = mapped_column(String(200), index=True)
    content: Mapped[str] = mapped_column(Text)
    service_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("services.id", ondelete="RESTRICT"), index=True
    )
    environment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("environments.id", ondelete="RESTRICT"), index=True
    )
    tags: Mapped[list[str]] = mapped_column(server_default=text("'[]'::jsonb"))
    created_by: Mapped[uuid.UUID] = _user_fk()
    is_active: Mapped[bool] = mapped_column(server_default=true())
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    version: Mapped[int] = _version()


class DeploymentMetric(Base):
    """One value per (deployment, metric name): a deployment carries duration, CPU and memory."""

    __tablename__ = "deployment_metrics"
    __table_args__ = (UniqueConstraint("deployment_id", "metric_name"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    deployment_id: Mapped[uuid.UUID] = _deployment_child_fk()
    metric_name: Mapped[str] = mapped_column(String(100), index=True)
    metric_value: Mapped[float] = mapped_column(Double)
    unit: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class PipelineStage(Base):
    __tablename__ = "pipeline_stages"
    __table_args__ = (
        UniqueConstraint("deployment_id", "order"),
        _one_of("status", StageStatus),
        CheckConstraint('"order" >= 0', name="order"),
        CheckConstraint("timeout_seconds > 0", name="timeout_seconds"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    deployment_id: Mapped[uuid.UUID] = _deployment_child_fk()
    name: Mapped[str] = mapped_column(String(100))
    order: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(
        String(20), server_default=StageStatus.PENDING.value, index=True
    )
    timeout_seconds: Mapped[int] = mapped_column(Integer, server_default=text("1800"))
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    output: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class EnvironmentPolicy(Base):
    """The rules of one environment (one row each, made by the database when the
    environment is inserted, migration 007). `pending` is the whole policy as it will be
    once a weakening change takes effect at `pending_effective_at`; `version` makes the etag."""

    __tablename__ = "environment_policies"
    __table_args__ = (
        UniqueConstraint("environment_id"),
        CheckConstraint("required_approvals BETWEEN 0 AND 10", name="approvals"),
        CheckConstraint("bake_minutes BETWEEN 0 AND 43200", name="bake"),
        CheckConstraint("(pending IS NULL) = (pending_effective_at IS NULL)", name="pending"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    environment_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("environments.id", ondelete="RESTRICT")
    )
    required_approvals: Mapped[int] = mapped_column(Integer)
    approver_roles: Mapped[list[str]] = mapped_column(ARRAY(Text))
    deployer_roles: Mapped[list[str]] = mapped_column(ARRAY(Text))
    required_stages: Mapped[list[str]] = mapped_column(ARRAY(Text))
    bake_minutes: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    pending: Mapped[dict[str, Any] | None] = mapped_column(JSONB(none_as_null=True))
    pending_effective_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class WebhookFormat(StrEnum):
    JSON = "json"
    SLACK = "slack"


class WebhookDeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"


class Webhook(Base):
    """A receiver of relman's events (migration 013): its URL, the event types it takes
    (optionally one service's or one team's), its format, its secret (encrypted with the
    key file, deploy_svc.webhook_secrets), whether it is active, its failures in a row,
    and audit_cursor, the last audit sequence handed to it for `audit.logged`."""

    __tablename__ = "webhooks"
    __table_args__ = (
        _one_of("format", WebhookFormat),
        CheckConstraint("cardinality(event_types) BETWEEN 1 AND 50", name="event_types"),
        CheckConstraint("char_length(url) <= 2048", name="url_length"),
        Index("ix_webhooks_created_at_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list[str]] = mapped_column(ARRAY(Text))
    service_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("services.id", ondelete="RESTRICT"), index=True
    )
    team_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("teams.id", ondelete="RESTRICT"), index=True
    )
    format: Mapped[str] = mapped_column(String(10))
    secret_encrypted: Mapped[bytes]
    active: Mapped[bool] = mapped_column(server_default=true())
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    audit_cursor: Mapped[int | None] = mapped_column(BigInteger)
    created_by: Mapped[uuid.UUID] = _user_fk()
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    version: Mapped[int] = _version()


class WebhookEvent(Base):
    """The outbox: an event written in the transaction of its change, turned into one
    delivery per matching webhook by the dispatcher (then `dispatched`)."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index(
            "ix_webhook_events_undispatched",
            "occurred_at",
            postgresql_where=text("NOT dispatched"),
        ),
        # The sweeper's purge of those dispatched a day ago (deploy_svc.events.purge).
        Index("ix_webhook_events_dispatched", "occurred_at", postgresql_where=text("dispatched")),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    event_type: Mapped[str] = mapped_column(String(50))
    # The clock's time, not the transaction's: one change's events keep their order.
    occurred_at: Mapped[datetime] = mapped_column(server_default=func.clock_timestamp())
    service_id: Mapped[uuid.UUID | None]
    team_id: Mapped[uuid.UUID | None]
    data: Mapped[dict] = mapped_column(JSONB)
    dispatched: Mapped[bool] = mapped_column(server_default=false())


class WebhookDelivery(Base):
    """One event for one webhook: the body sent on every attempt under this id (the
    X-Relman-Delivery header), its status and attempts. A due delivery (pending,
    next_attempt_at passed) is claimed by moving next_attempt_at past a lease first."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        _one_of("status", WebhookDeliveryStatus),
        UniqueConstraint("webhook_id", "event_id"),
        UniqueConstraint("webhook_id", "audit_sequence"),
        CheckConstraint(
            "(event_type = 'audit.logged') = (audit_sequence IS NOT NULL)", name="audit_sequence"
        ),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_webhook_id_created_at_id", "webhook_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="SET NULL"), index=True
    )
    audit_sequence: Mapped[int | None] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(50))
    body: Mapped[bytes]
    status: Mapped[str] = mapped_column(
        String(10), server_default=WebhookDeliveryStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class FreezeWindow(Base):
    """A time in which deployments into its scope (an environment or all, a service or
    all) are refused: one-off (start_time, end_time) or recurring (cron in time_zone, each
    occurrence lasting duration_minutes), never both."""

    __tablename__ = "freeze_windows"
    __table_args__ = (
        CheckConstraint(
            "(start_time IS NOT NULL AND end_time > start_time AND cron IS NULL"
            " AND time_zone IS NULL AND duration_minutes IS NULL)"
            " OR (start_time IS NULL AND end_time IS NULL AND cron IS NOT NULL"
            " AND time_zone IS NOT NULL AND duration_minutes BETWEEN 1 AND 44640)",
            name="one_form",
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    environment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("environments.id", ondelete="RESTRICT"), index=True
    )
    service_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("services.id", ondelete="RESTRICT"), index=True
    )
    reason: Mapped[str] = mapped_column(Text)
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    cron: Mapped[str | None] = mapped_column(String(200))
    time_zone: Mapped[str | None] = mapped_column(String(64))
    duration_minutes: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[uuid.UUID] = _user_fk()
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
