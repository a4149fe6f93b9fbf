"""Rollbacks that redeploy, and change notifications for WatchDeployment.

Revision ID: 004_rollbacks_and_watch
Revises: 003_deployment_rules
Create Date: 2026-11-24

- rollbacks.redeployment_id: the deployment of the target release a rollback
  created; the rollback completes or fails with it. A deployment is rolled back
  at most once (unique deployment_id).
- Every change to a deployment or its stages, approvals and metrics sends
  NOTIFY relman_deployment with the deployment id, from whichever process made
  it, when its transaction commits (identical notifications of one transaction
  are folded into one by PostgreSQL).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "004_rollbacks_and_watch"
down_revision: str | None = "003_deployment_rules"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHILD_TABLES = ("pipeline_stages", "approvals", "deployment_metrics")


def upgrade() -> None:
    op.add_column("rollbacks", sa.Column("redeployment_id", sa.Uuid()))
    op.create_foreign_key(
        op.f("fk_rollbacks_redeployment_id_deployments"),
        "rollbacks",
        "deployments",
        ["redeployment_id"],
        ["id"],
        ondelete="RESTRICT",
    )
    op.create_index(op.f("ix_rollbacks_redeployment_id"), "rollbacks", ["redeployment_id"])
    op.create_unique_constraint(op.f("uq_rollbacks_deployment_id"), "rollbacks", ["deployment_id"])

    op.execute(
        """
        CREATE FUNCTION relman_notify_deployment() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- TG_ARGV[0] names the column holding the deployment id.
            PERFORM pg_notify('relman_deployment', to_jsonb(NEW) ->> TG_ARGV[0]);
            RETURN NULL;
        END $$
        """
    )
    for table in ("deployments", *CHILD_TABLES):
        column = "id" if table == "deployments" else "deployment_id"
        op.execute(
            f"CREATE TRIGGER notify_deployment AFTER INSERT OR UPDATE ON {table}"
            f" FOR EACH ROW EXECUTE FUNCTION relman_notify_deployment('{column}')"
        )


def downgrade() -> None:
    for table in ("deployments", *CHILD_TABLES):
        op.execute(f"DROP TRIGGER notify_deployment ON {table}")
    op.execute("DROP FUNCTION relman_notify_deployment()")
    op.drop_constraint(op.f("uq_rollbacks_deployment_id"), "rollbacks")
    op.drop_index(op.f("ix_rollbacks_redeployment_id"), "rollbacks")
    op.drop_constraint(op.f("fk_rollbacks_redeployment_id_deployments"), "rollbacks")
    op.drop_column("rollbacks", "redeployment_id")
