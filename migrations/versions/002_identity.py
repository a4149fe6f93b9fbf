"""Identity: users.role and api_tokens.

Revision ID: 002_identity
Revises: 001_initial_schema
Create Date: 2026-11-24

Every user gets a role (admin, lead, developer, viewer, service); is_admin stays
from the first schema (001) and a CHECK keeps it equal to `role = 'admin'`.
Existing admins become admins, everyone else a viewer (least privilege).
api_tokens holds only the SHA-256 of each bearer token, unique for the per-call
look-up, and is indexed by user for listing and for revoking a user's tokens.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "002_identity"
down_revision: str | None = "001_initial_schema"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("admin", "lead", "developer", "viewer", "service")


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("role", sa.String(20), server_default=sa.text("'viewer'"), nullable=False),
    )
    op.execute("UPDATE users SET role = 'admin' WHERE is_admin")
    listed = ", ".join(f"'{role}'" for role in ROLES)
    op.create_check_constraint(op.f("ck_users_role"), "users", f"role IN ({listed})")
    op.create_check_constraint(
        op.f("ck_users_is_admin_matches_role"), "users", "is_admin = (role = 'admin')"
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"), ondelete="RESTRICT"
        ),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_constraint(op.f("ck_users_is_admin_matches_role"), "users", type_="check")
    op.drop_constraint(op.f("ck_users_role"), "users", type_="check")
    op.drop_column("users", "role")
