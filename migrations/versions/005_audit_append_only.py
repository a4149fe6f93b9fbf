"""Audit log: append-only, and indexed for every listing filter in (created_at, id) order.

Revision ID: 005_audit_append_only
Revises: 004_rollbacks_and_watch
Create Date: 2026-11-24

- A trigger rejects UPDATE, DELETE and TRUNCATE on audit_logs: the trail can
  only grow (`--reset` of the seed still works: it drops the whole schema).
- Keyset pages walk (created_at, id); each filter gets an index ending in that
  order, so a filtered page reads only its own rows. They replace the
  single-column indexes of 001 on action, user_id, (resource_type,
  resource_id) and created_at, whose every use they serve as well.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "005_audit_append_only"
down_revision: str | None = "004_rollbacks_and_watch"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REPLACED = {
    "ix_audit_logs_action": ["action"],
    "ix_audit_logs_user_id": ["user_id"],
    "ix_audit_logs_resource_type_resource_id": ["resource_type", "resource_id"],
    "ix_audit_logs_created_at": ["created_at"],
}
KEYSET = {
    "ix_audit_logs_created_at_id": ["created_at", "id"],
    "ix_audit_logs_action_created_at_id": ["action", "created_at", "id"],
    "ix_audit_logs_user_id_created_at_id": ["user_id", "created_at", "id"],
    "ix_audit_logs_resource_type_resource_id_created_at_id": [
        "resource_type",
        "resource_id",
        "created_at",
        "id",
    ],
}


def upgrade() -> None:
    for name, columns in KEYSET.items():
        op.create_index(op.f(name), "audit_logs", columns)
    for name in REPLACED:
        op.drop_index(op.f(name), "audit_logs")
    op.execute(
        """
        CREATE FUNCTION relman_audit_logs_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON audit_logs"
        " FOR EACH ROW EXECUTE FUNCTION relman_audit_logs_append_only()"
    )
    op.execute(
        "CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit_logs"
        " FOR EACH STATEMENT EXECUTE FUNCTION relman_audit_logs_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER append_only_truncate ON audit_logs")
    op.execute("DROP TRIGGER append_only ON audit_logs")
    op.execute("DROP FUNCTION relman_audit_logs_append_only()")
    for name, columns in REPLACED.items():
        op.create_index(op.f(name), "audit_logs", columns)
    for name in KEYSET:
        op.drop_index(op.f(name), "audit_logs")
