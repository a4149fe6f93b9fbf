"""DORA metrics: hotfix releases, and the indexes GetDoraMetrics reads by.

Revision ID: 011_dora_metrics
Revises: 010_resource_names
Create Date: 2026-11-30

- releases.hotfix: a fix of something already shipped; its production deployments count
  as rework (false for every existing release).
- ix_deployments_environment_id_completed_at: the deployments that ended (succeeded,
  failed, rolled back) by environment and completion time, the range GetDoraMetrics reads.
- ix_deployments_succeeded: a service's succeeded deployments in an environment by
  completion time, for the next success after a failure (recovery time).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "011_dora_metrics"
down_revision: str | None = "010_resource_names"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "releases",
        sa.Column("hotfix", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_index(
        "ix_deployments_environment_id_completed_at",
        "deployments",
        ["environment_id", "completed_at"],
        postgresql_where=sa.text("status IN ('succeeded', 'failed', 'rolled_back')"),
    )
    op.create_index(
        "ix_deployments_succeeded",
        "deployments",
        ["service_id", "environment_id", "completed_at"],
        postgresql_where=sa.text("status = 'succeeded'"),
    )


def downgrade() -> None:
    op.drop_index("ix_deployments_succeeded", table_name="deployments")
    op.drop_index("ix_deployments_environment_id_completed_at", table_name="deployments")
    op.drop_column("releases", "hotfix")
