"""Trust against insiders: audit provenance, who minted a token, login throttling.

Revision ID: 006_insider_trust
Revises: 005_audit_append_only
Create Date: 2026-11-30

- audit_logs.origin (`relman`: a row relman wrote about its own work; `client`: a
  LogAction/LogActions row) and audit_logs.recorded_by (the authenticated principal
  whose call wrote the row). Both are set by the server only; rows written before
  this migration keep NULL in both. recorded_by has no foreign key: it is always the
  caller's own token's user, and a per-row key check would slow the bulk path.
  Listing relman's own rows walks a partial index of them in keyset order; client rows,
  the bulk of the trail, pay for no index of their own (a full index on origin made
  LogAction's p99 jump beside a busy export, tests/faults) and their listing walks
  (created_at, id), where they are most of the rows.
- api_tokens.created_by: who minted the token (NULL: the tokens command line). A
  token minted by someone else works only while its user's role is service.
  Existing tokens take it from the audit row that recorded their creation; login
  tokens are their user's own. A person's token that never expired gets 90 days.
- login_throttle: failed logins per (username, peer) and per peer in a fixed
  window, shared by every replica.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "006_insider_trust"
down_revision: str | None = "005_audit_append_only"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_logs", sa.Column("origin", sa.String(10)))
    op.add_column("audit_logs", sa.Column("recorded_by", sa.Uuid()))
    op.create_check_constraint(
        op.f("ck_audit_logs_origin"), "audit_logs", "origin IN ('relman', 'client')"
    )
    op.create_index(
        op.f("ix_audit_logs_relman_created_at_id"),
        "audit_logs",
        ["created_at", "id"],
        postgresql_where=sa.text("origin = 'relman'"),
    )

    op.add_column("api_tokens", sa.Column("created_by", sa.Uuid()))
    op.create_foreign_key(
        op.f("fk_api_tokens_created_by_users"),
        "api_tokens",
        "users",
        ["created_by"],
        ["id"],
        ondelete="RESTRICT",
    )
    op.create_index(op.f("ix_api_tokens_created_by"), "api_tokens", ["created_by"])
    # The audit row of a token's creation names its maker; only then are the remaining
    # login tokens their user's own (an admin-made token named "login" is not).
    op.execute(
        """
        UPDATE api_tokens t SET created_by = a.user_id
        FROM audit_logs a
        WHERE t.created_by IS NULL AND a.action = 'create' AND a.resource_type = 'api_token'
          AND a.resource_id = t.id::text AND a.user_id IS NOT NULL
        """
    )
    op.execute(
        "UPDATE api_tokens SET created_by = user_id WHERE created_by IS NULL AND name = 'login'"
    )
    # A person's token that never expires now expires like a new one would, in 90 days.
    op.execute(
        """
        UPDATE api_tokens t SET expires_at = now() + interval '90 days'
        FROM users u
        WHERE u.id = t.user_id AND u.role <> 'service' AND t.expires_at IS NULL
          AND t.revoked_at IS NULL
        """
    )

    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("throttled", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_throttle")),
    )


def downgrade() -> None:
    op.drop_table("login_throttle")
    op.drop_index(op.f("ix_api_tokens_created_by"), "api_tokens")
    op.drop_constraint(op.f("fk_api_tokens_created_by_users"), "api_tokens", type_="foreignkey")
    op.drop_column("api_tokens", "created_by")
    op.drop_index(op.f("ix_audit_logs_relman_created_at_id"), "audit_logs")
    op.drop_constraint(op.f("ck_audit_logs_origin"), "audit_logs", type_="check")
    op.drop_column("audit_logs", "recorded_by")
    op.drop_column("audit_logs", "origin")
