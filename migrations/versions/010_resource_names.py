"""Names for people: names that are unique and fixed, etags, and request ids of their own.

Revision ID: 010_resource_names
Revises: 009_audit_seals
Create Date: 2026-11-30

- teams, environments and services are named by `teams/{name}`, `environments/{name}`
  and `services/{name}` (AIP-122): a name is unique whatever its case (a unique index on
  lower(name), which also serves the lookup of a name), holds no `/` (CHECK), and never
  changes once made (trigger `relman_names_fixed`, which also holds users' usernames,
  the `users/{username}` of a user, and an environment's type, which its policy and the
  promotion order were made from). Existing names that break the first two rules stop
  the migration with the names to fix.
- services, environments and runbooks get `version`, raised by the database on every
  UPDATE (trigger `relman_bump_version`), whatever makes it: their etag (AIP-154).
- idempotency_keys: a request id (AIP-155) is the caller's own, per method, apart from
  the id of what the request made: (caller_id, method, request_id) -> the resource the
  first call answered with, and a hash of the request, so that the same id sent with
  another request is refused. A call claims its key first (the resource still NULL; a
  concurrent call with the same key waits on it) and fills in its answer in the same
  transaction. Kept at least 24 hours (the sweeper deletes older ones).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "010_resource_names"
down_revision: str | None = "009_audit_seals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAMED = ("teams", "environments", "services")
VERSIONED = ("services", "environments", "runbooks")

NAMES_FIXED = """
CREATE FUNCTION relman_names_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        IF NEW.username IS DISTINCT FROM OLD.username THEN
            RAISE EXCEPTION 'a username never changes: it names the user (users/%)',
                OLD.username USING ERRCODE = 'check_violation',
                CONSTRAINT = 'relman_names_fixed';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.name IS DISTINCT FROM OLD.name THEN
        RAISE EXCEPTION 'a name in % never changes: it is part of the resource name (%/%)',
            TG_TABLE_NAME, TG_TABLE_NAME, OLD.name USING ERRCODE = 'check_violation',
            CONSTRAINT = 'relman_names_fixed';
    END IF;
    -- Nested: PL/pgSQL does not short-circuit AND, and a team's row has no type.
    IF TG_TABLE_NAME = 'environments' THEN
        IF NEW.environment_type IS DISTINCT FROM OLD.environment_type THEN
            RAISE EXCEPTION 'an environment''s type never changes' USING
                ERRCODE = 'check_violation', CONSTRAINT = 'relman_names_fixed';
        END IF;
    END IF;
    RETURN NEW;
END $$
"""

BUMP_VERSION = """
CREATE FUNCTION relman_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END $$
"""


def _refuse_bad_names() -> None:
    connection = op.get_bind()
    problems = []
    for table in NAMED:
        rows = connection.execute(
            sa.text(
                f"SELECT name FROM {table} WHERE strpos(name, '/') > 0 "
                f"UNION SELECT min(name) FROM {table} GROUP BY lower(name) HAVING count(*) > 1"
            )
        ).scalars()
        problems += [f"{table}: {name!r}" for name in rows]
    if problems:
        raise RuntimeError(
            "names must hold no '/' and be unique whatever their case; rename these "
            "before migrating: " + ", ".join(problems)
        )


def upgrade() -> None:
    _refuse_bad_names()
    op.execute(NAMES_FIXED)
    op.execute(BUMP_VERSION)
    for table in NAMED:
        op.create_check_constraint(
            op.f(f"ck_{table}_name_has_no_slash"), table, "strpos(name, '/') = 0"
        )
        op.execute(f"CREATE UNIQUE INDEX uq_{table}_name_any_case ON {table} (lower(name))")
        op.execute(
            f"CREATE TRIGGER names_fixed BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION relman_names_fixed()"
        )
    op.execute(
        "CREATE TRIGGER names_fixed BEFORE UPDATE ON users "
        "FOR EACH ROW EXECUTE FUNCTION relman_names_fixed()"
    )
    for table in VERSIONED:
        op.add_column(
            table, sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False)
        )
        op.execute(
            f"CREATE TRIGGER bump_version BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION relman_bump_version()"
        )
    op.create_table(
        "idempotency_keys",
        sa.Column("caller_id", sa.Uuid(), nullable=False),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(), nullable=False),
        sa.Column("resource_type", sa.String(50), nullable=True),
        sa.Column("resource_id", sa.Uuid(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["caller_id"],
            ["users.id"],
            name="fk_idempotency_keys_caller_id_users",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("caller_id", "method", "request_id", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    for table in VERSIONED:
        op.execute(f"DROP TRIGGER bump_version ON {table}")
        op.drop_column(table, "version")
    op.execute("DROP TRIGGER names_fixed ON users")
    for table in NAMED:
        op.execute(f"DROP TRIGGER names_fixed ON {table}")
        op.execute(f"DROP INDEX uq_{table}_name_any_case")
        op.drop_constraint(f"ck_{table}_name_has_no_slash", table)
    op.execute("DROP FUNCTION relman_bump_version()")
    op.execute("DROP FUNCTION relman_names_fixed()")
