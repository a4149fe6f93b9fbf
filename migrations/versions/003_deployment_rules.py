"""Deployment rules the database enforces too.

Revision ID: 003_deployment_rules
Revises: 002_identity
Create Date: 2026-11-24

- deployments.service_id (copied from the release, and kept equal to it by a
  composite foreign key to releases (id, service_id)) so that a partial unique
  index can allow at most one active deployment per service and environment;
- approvals unique per (deployment, approver): a vote is cast once;
- pipeline stages unique per (deployment, order).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "003_deployment_rules"
down_revision: str | None = "002_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "status IN ('pending', 'awaiting_approval', 'in_progress')"


def upgrade() -> None:
    op.create_unique_constraint(op.f("uq_releases_id_service_id"), "releases", ["id", "service_id"])
    op.add_column("deployments", sa.Column("service_id", sa.Uuid()))
    op.execute(
        "UPDATE deployments d SET service_id = r.service_id"
        " FROM releases r WHERE r.id = d.release_id"
    )
    op.alter_column("deployments", "service_id", nullable=False)
    op.create_foreign_key(
        op.f("fk_deployments_release_id_service_id_releases"),
        "deployments",
        "releases",
        ["release_id", "service_id"],
        ["id", "service_id"],
        ondelete="RESTRICT",
    )
    op.create_index(op.f("ix_deployments_service_id"), "deployments", ["service_id"])
    op.create_index(
        op.f("uq_deployments_one_active"),
        "deployments",
        ["service_id", "environment_id"],
        unique=True,
        postgresql_where=sa.text(ACTIVE),
    )
    op.create_unique_constraint(
        op.f("uq_approvals_deployment_id_approver_id"),
        "approvals",
        ["deployment_id", "approver_id"],
    )
    op.create_unique_constraint(
        op.f("uq_pipeline_stages_deployment_id_order"),
        "pipeline_stages",
        ["deployment_id", "order"],
    )


def downgrade() -> None:
    op.drop_constraint(op.f("uq_pipeline_stages_deployment_id_order"), "pipeline_stages")
    op.drop_constraint(op.f("uq_approvals_deployment_id_approver_id"), "approvals")
    op.drop_index(op.f("uq_deployments_one_active"), "deployments")
    op.drop_index(op.f("ix_deployments_service_id"), "deployments")
    op.drop_constraint(op.f("fk_deployments_release_id_service_id_releases"), "deployments")
    op.drop_column("deployments", "service_id")
    op.drop_constraint(op.f("uq_releases_id_service_id"), "releases")
