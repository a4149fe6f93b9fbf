"""Initial schema: the 12 tables relman started with.

Revision ID: 001_initial_schema
Revises:
Create Date: 2026-11-24

Column names, sizes, defaults and CHECKs are those the project started with (the
README's Layout names each table's purpose). Every listed index exists, except where a unique
constraint on exactly that column already provides it (teams.name,
users.email, users.username, environments.name, services.name): a second index
on the same column would only slow writes. One deliberate change from the
first design: deployment_metrics is unique on (deployment_id, metric_name), so a
deployment carries several metrics.

Names are spelled out and wrapped in op.f() so that the models' naming
convention, which env.py hands to Alembic, is not applied a second time.
A migration is frozen history: the vocabularies are spelled out here rather
than imported from the models, which may grow later.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "001_initial_schema"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RELEASE_STATUSES = ("draft", "promoted", "in_progress", "testing", "completed", "rolled_back")
DEPLOYMENT_STATUSES = (
    "pending",
    "awaiting_approval",
    "in_progress",
    "succeeded",
    "failed",
    "rejected",
    "cancelled",
    "rolled_back",
)
STAGE_STATUSES = ("pending", "running", "succeeded", "failed", "skipped")
APPROVAL_STATUSES = ("pending", "approved", "rejected")
ROLLBACK_STATUSES = ("pending", "in_progress", "completed", "failed")
ENVIRONMENT_TYPES = ("development", "staging", "production")


def _one_of(table: str, column: str, words: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{word}'" for word in words)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{column}"))


def _id(table: str) -> list:
    return [
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
    ]


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
    ]


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=f"fk_{table}_{column}_{target}", ondelete=ondelete
    )


def _indexes(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(f"ix_{table}_{column}", table, [column])


def _status(default: str) -> sa.Column:
    return sa.Column(
        "status", sa.String(20), server_default=sa.text(f"'{default}'"), nullable=False
    )


def _is_active() -> sa.Column:
    return sa.Column("is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "teams",
        *_id("teams"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("slack_channel", sa.String(100)),
        sa.Column("member_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        *_timestamps(),
        sa.UniqueConstraint("name", name="uq_teams_name"),
        sa.CheckConstraint("member_count >= 0", name=op.f("ck_teams_member_count")),
    )
    _indexes("teams", "created_at")

    op.create_table(
        "users",
        *_id("users"),
        sa.Column("email", sa.String(255), nullable=False),
        sa.Column("username", sa.String(100), nullable=False),
        sa.Column("full_name", sa.String(200)),
        sa.Column("hashed_password", sa.String(255), nullable=False),
        _is_active(),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        *_timestamps(),
        sa.UniqueConstraint("email", name="uq_users_email"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    _indexes("users", "created_at")

    op.create_table(
        "environments",
        *_id("environments"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("environment_type", sa.String(20), nullable=False),
        sa.Column("config_path", sa.String(500)),
        _is_active(),
        *_timestamps(),
        sa.UniqueConstraint("name", name="uq_environments_name"),
        _one_of("environments", "environment_type", ENVIRONMENT_TYPES),
    )
    _indexes("environments", "environment_type")

    op.create_table(
        "services",
        *_id("services"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("repository_url", sa.String(500)),
        sa.Column("team_id", sa.Uuid(), nullable=False),
        sa.Column("slack_channel", sa.String(100)),
        sa.Column("owner_id", sa.Uuid()),
        _is_active(),
        *_timestamps(),
        sa.UniqueConstraint("name", name="uq_services_name"),
        _fk("services", "team_id", "teams", "RESTRICT"),
        _fk("services", "owner_id", "users", "RESTRICT"),
    )
    _indexes("services", "team_id", "owner_id", "created_at")

    op.create_table(
        "releases",
        *_id("releases"),
        sa.Column("service_id", sa.Uuid(), nullable=False),
        sa.Column("version", sa.String(50), nullable=False),
        _status("draft"),
        sa.Column("release_notes", sa.Text()),
        sa.Column("git_commit", sa.String(40)),
        sa.Column("created_by", sa.Uuid(), nullable=False),
        *_timestamps(),
        sa.UniqueConstraint("service_id", "version", name="uq_releases_service_id_version"),
        _fk("releases", "service_id", "services", "RESTRICT"),
        _fk("releases", "created_by", "users", "RESTRICT"),
        _one_of("releases", "status", RELEASE_STATUSES),
    )
    _indexes("releases", "service_id", "version", "status", "created_by")

    op.create_table(
        "deployments",
        *_id("deployments"),
        sa.Column("release_id", sa.Uuid(), nullable=False),
        sa.Column("environment_id", sa.Uuid(), nullable=False),
        _status("pending"),
        sa.Column("deployed_by", sa.Uuid(), nullable=False),
        sa.Column("deployed_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        _fk("deployments", "release_id", "releases", "RESTRICT"),
        _fk("deployments", "environment_id", "environments", "RESTRICT"),
        _fk("deployments", "deployed_by", "users", "RESTRICT"),
        _one_of("deployments", "status", DEPLOYMENT_STATUSES),
    )
    _indexes("deployments", "release_id", "environment_id", "status", "deployed_by")
    op.create_index(
        "ix_deployments_release_id_environment_id",
        "deployments",
        ["release_id", "environment_id"],
    )

    op.create_table(
        "approvals",
        *_id("approvals"),
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("approver_id", sa.Uuid(), nullable=False),
        _status("pending"),
        sa.Column("notes", sa.Text()),
        sa.Column("approved_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        _fk("approvals", "deployment_id", "deployments", "CASCADE"),
        _fk("approvals", "approver_id", "users", "RESTRICT"),
        _one_of("approvals", "status", APPROVAL_STATUSES),
    )
    _indexes("approvals", "deployment_id", "approver_id", "status")

    op.create_table(
        "audit_logs",
        *_id("audit_logs"),
        sa.Column("user_id", sa.Uuid()),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("resource_type", sa.String(50), nullable=False),
        sa.Column("resource_id", sa.String(100)),
        sa.Column(
            "details",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("ip_address", sa.String(45)),
        sa.Column("user_agent", sa.String(255)),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        _fk("audit_logs", "user_id", "users", "RESTRICT"),
    )
    _indexes("audit_logs", "action", "user_id", "created_at")
    op.create_index(
        "ix_audit_logs_resource_type_resource_id",
        "audit_logs",
        ["resource_type", "resource_id"],
    )

    op.create_table(
        "rollbacks",
        *_id("rollbacks"),
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("target_release_id", sa.Uuid(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _status("pending"),
        sa.Column("initiated_by", sa.Uuid(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        _fk("rollbacks", "deployment_id", "deployments", "CASCADE"),
        _fk("rollbacks", "target_release_id", "releases", "RESTRICT"),
        _fk("rollbacks", "initiated_by", "users", "RESTRICT"),
        _one_of("rollbacks", "status", ROLLBACK_STATUSES),
    )
    _indexes("rollbacks", "deployment_id", "target_release_id", "initiated_by", "status")

    op.create_table(
        "runbooks",
        *_id("runbooks"),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("service_id", sa.Uuid()),
        sa.Column("environment_id", sa.Uuid()),
        sa.Column(
            "tags", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column("created_by", sa.Uuid(), nullable=False),
        _is_active(),
        *_timestamps(),
        _fk("runbooks", "service_id", "services", "RESTRICT"),
        _fk("runbooks", "environment_id", "environments", "RESTRICT"),
        _fk("runbooks", "created_by", "users", "RESTRICT"),
    )
    _indexes("runbooks", "title", "service_id", "environment_id", "created_by")

    op.create_table(
        "deployment_metrics",
        *_id("deployment_metrics"),
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("metric_name", sa.String(100), nullable=False),
        sa.Column("metric_value", sa.Double(), nullable=False),
        sa.Column("unit", sa.String(20)),
        *_timestamps(),
        sa.UniqueConstraint(
            "deployment_id", "metric_name", name="uq_deployment_metrics_deployment_id_metric_name"
        ),
        _fk("deployment_metrics", "deployment_id", "deployments", "CASCADE"),
    )
    _indexes("deployment_metrics", "deployment_id", "metric_name")

    op.create_table(
        "pipeline_stages",
        *_id("pipeline_stages"),
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("order", sa.Integer(), nullable=False),
        _status("pending"),
        sa.Column("timeout_seconds", sa.Integer(), server_default=sa.text("1800"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("output", sa.Text()),
        *_timestamps(),
        _fk("pipeline_stages", "deployment_id", "deployments", "CASCADE"),
        _one_of("pipeline_stages", "status", STAGE_STATUSES),
        sa.CheckConstraint('"order" >= 0', name=op.f("ck_pipeline_stages_order")),
        sa.CheckConstraint("timeout_seconds > 0", name=op.f("ck_pipeline_stages_timeout_seconds")),
    )
    _indexes("pipeline_stages", "deployment_id", "status")


def downgrade() -> None:
    # Children first; dropping a table drops its indexes and constraints with it.
    for table in (
        "pipeline_stages",
        "deployment_metrics",
        "runbooks",
        "rollbacks",
        "audit_logs",
        "approvals",
        "deployments",
        "releases",
        "services",
        "environments",
        "users",
        "teams",
    ):
        op.drop_table(table)
