"""Environment policies and freeze windows.

Revision ID: 007_environment_policies
Revises: 006_insider_trust
Create Date: 2026-11-30

- environment_policies: one row per environment, made by the database itself when an
  environment is inserted (trigger `default_policy`), with the defaults that reproduce
  the rules relman had before policies. Existing environments get theirs here; the
  production approval count comes from PROD_REQUIRED_APPROVALS when it is set where the
  migration runs (the setting goes away). `pending` holds the whole policy as it will be
  once a weakening change takes effect, at `pending_effective_at`; `version` makes the
  etag.
- freeze_windows: a one-off window (start_time, end_time) or a recurring one (cron,
  time_zone, duration_minutes), never both (CHECK).
- deployments.freeze_override_reason (an admin passed a freeze) and
  deployments.is_rollback (a rollback's redeployment: exempt from freezes and approvals).
- A constraint trigger, checked at commit, refuses a deployment that would run without
  the approvals its environment's policy requires: inserted as pending, in progress or
  succeeded (a rollback's redeployment aside), or moved there out of awaiting_approval
  or pending, with too few counted votes. The domain checks first; this holds whatever
  the code does.
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "007_environment_policies"
down_revision: str | None = "006_insider_trust"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STANDARD = "ARRAY['build', 'test', 'security_scan', 'deploy', 'smoke_test']::text[]"
# The policy an environment gets, by its type: made by the trigger for each new
# environment, and below for every existing one.
DEFAULT_POLICY = f"""
CREATE FUNCTION relman_make_default_policy(environment uuid, kind text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO environment_policies (environment_id, required_approvals, approver_roles,
                                      deployer_roles, required_stages, bake_minutes)
    VALUES (
        environment,
        CASE WHEN kind = 'production' THEN 1 ELSE 0 END,
        ARRAY['admin', 'lead']::text[],
        CASE WHEN kind = 'production' THEN ARRAY['admin', 'lead']::text[]
             ELSE ARRAY['admin', 'lead', 'developer']::text[] END,
        CASE WHEN kind = 'development' THEN ARRAY[]::text[] ELSE {STANDARD} END,
        0
    )
$$
"""
DEFAULT_POLICY_TRIGGER = """
CREATE FUNCTION relman_default_policy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM relman_make_default_policy(NEW.id, NEW.environment_type);
    RETURN NEW;
END $$
"""
# Votes counted as the domain counts them: approved, by an active user (not the deployer)
# whose role the policy in force names.
CHECK_APPROVALS = """
CREATE FUNCTION relman_check_approvals() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    now_row deployments%ROWTYPE;
    needed integer;
    approvers text[];
    counted integer;
BEGIN
    -- Deferred to the commit: the row as it is then, with the votes written after it.
    SELECT * INTO now_row FROM deployments WHERE id = NEW.id;
    IF NOT FOUND OR now_row.status NOT IN ('pending', 'in_progress', 'succeeded') THEN
        RETURN NULL;
    END IF;
    -- A deployment already past its votes is checked again only if it is moved to
    -- another environment or deployer (no code does either; SQL could).
    IF TG_OP = 'UPDATE' AND OLD.status NOT IN ('awaiting_approval', 'pending')
       AND OLD.environment_id = NEW.environment_id AND OLD.deployed_by = NEW.deployed_by THEN
        RETURN NULL;
    END IF;
    -- A rollback's redeployment, known by its rollback row (written in the same
    -- transaction), not by a flag the services' own role could set.
    IF EXISTS (SELECT 1 FROM rollbacks r WHERE r.redeployment_id = now_row.id) THEN
        RETURN NULL;
    END IF;
    SELECT CASE WHEN p.pending_effective_at <= now()
                THEN (p.pending->>'required_approvals')::integer
                ELSE p.required_approvals END,
           CASE WHEN p.pending_effective_at <= now()
                THEN ARRAY(SELECT jsonb_array_elements_text(p.pending->'approver_roles'))
                ELSE p.approver_roles END
      INTO needed, approvers
      FROM environment_policies p WHERE p.environment_id = now_row.environment_id;
    IF NOT FOUND THEN  -- every environment has one (default_policy): never a way around
        RAISE EXCEPTION 'environment % of deployment % has no policy',
            now_row.environment_id, now_row.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'check_approvals';
    END IF;
    IF coalesce(needed, 0) = 0 THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO counted
      FROM approvals a JOIN users u ON u.id = a.approver_id
     WHERE a.deployment_id = now_row.id AND a.status = 'approved' AND u.is_active
       AND u.role = ANY (approvers) AND u.id <> now_row.deployed_by;
    IF counted < needed THEN
        RAISE EXCEPTION 'deployment % has % of the % approvals its environment requires',
            now_row.id, counted, needed
            USING ERRCODE = 'check_violation', CONSTRAINT = 'check_approvals';
    END IF;
    RETURN NULL;
END $$
"""


def _production_approvals() -> int | None:
    """PROD_REQUIRED_APPROVALS where the migration runs (the setting it replaces), within
    the bounds the setting had (1 to 10); None when unset."""
    value = os.environ.get("PROD_REQUIRED_APPROVALS", "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 10:
        raise SystemExit(
            f"PROD_REQUIRED_APPROVALS must be a whole number from 1 to 10, not {value!r}"
        )
    return int(value)


def upgrade() -> None:
    op.create_table(
        "environment_policies",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("environment_id", sa.Uuid(), nullable=False),
        sa.Column("required_approvals", sa.Integer(), nullable=False),
        sa.Column("approver_roles", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("deployer_roles", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("required_stages", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("bake_minutes", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("pending", postgresql.JSONB()),
        sa.Column("pending_effective_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.CheckConstraint(
            "required_approvals BETWEEN 0 AND 10", name=op.f("ck_environment_policies_approvals")
        ),
        sa.CheckConstraint(
            "bake_minutes BETWEEN 0 AND 43200", name=op.f("ck_environment_policies_bake")
        ),
        sa.CheckConstraint(
            "(pending IS NULL) = (pending_effective_at IS NULL)",
            name=op.f("ck_environment_policies_pending"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_environment_policies_environment_id_environments"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_environment_policies")),
        sa.UniqueConstraint("environment_id", name=op.f("uq_environment_policies_environment_id")),
    )
    op.alter_column("environment_policies", "created_at", nullable=False)
    op.alter_column("environment_policies", "updated_at", nullable=False)
    op.execute(DEFAULT_POLICY)
    op.execute(DEFAULT_POLICY_TRIGGER)
    op.execute(
        "CREATE TRIGGER default_policy AFTER INSERT ON environments"
        " FOR EACH ROW EXECUTE FUNCTION relman_default_policy()"
    )
    # Existing environments, as if each had just been inserted.
    op.execute("SELECT relman_make_default_policy(id, environment_type) FROM environments")
    approvals = _production_approvals()
    if approvals is not None:
        op.execute(
            sa.text(
                "UPDATE environment_policies p SET required_approvals = :n FROM environments e"
                " WHERE e.id = p.environment_id AND e.environment_type = 'production'"
            ).bindparams(n=approvals)
        )

    op.create_table(
        "freeze_windows",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("environment_id", sa.Uuid()),
        sa.Column("service_id", sa.Uuid()),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True)),
        sa.Column("end_time", sa.DateTime(timezone=True)),
        sa.Column("cron", sa.String(200)),
        sa.Column("time_zone", sa.String(64)),
        sa.Column("duration_minutes", sa.Integer()),
        sa.Column("created_by", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.CheckConstraint(
            "(start_time IS NOT NULL AND end_time > start_time AND cron IS NULL"
            " AND time_zone IS NULL AND duration_minutes IS NULL)"
            " OR (start_time IS NULL AND end_time IS NULL AND cron IS NOT NULL"
            " AND time_zone IS NOT NULL AND duration_minutes BETWEEN 1 AND 44640)",
            name=op.f("ck_freeze_windows_one_form"),
        ),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_freeze_windows_environment_id_environments"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["service_id"],
            ["services.id"],
            name=op.f("fk_freeze_windows_service_id_services"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["users.id"],
            name=op.f("fk_freeze_windows_created_by_users"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_freeze_windows")),
    )
    op.alter_column("freeze_windows", "created_at", nullable=False)
    op.alter_column("freeze_windows", "updated_at", nullable=False)
    for column in ("environment_id", "service_id", "created_by"):
        op.create_index(op.f(f"ix_freeze_windows_{column}"), "freeze_windows", [column])

    op.add_column("deployments", sa.Column("freeze_override_reason", sa.Text()))
    op.add_column(
        "deployments",
        sa.Column("is_rollback", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.execute(
        "UPDATE deployments d SET is_rollback = true FROM rollbacks r"
        " WHERE r.redeployment_id = d.id"
    )
    op.execute(CHECK_APPROVALS)
    op.execute(
        "CREATE CONSTRAINT TRIGGER check_approvals"
        " AFTER INSERT OR UPDATE OF status, environment_id, deployed_by"
        " ON deployments DEFERRABLE INITIALLY DEFERRED"
        " FOR EACH ROW EXECUTE FUNCTION relman_check_approvals()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER check_approvals ON deployments")
    op.execute("DROP FUNCTION relman_check_approvals()")
    op.drop_column("deployments", "is_rollback")
    op.drop_column("deployments", "freeze_override_reason")
    op.drop_table("freeze_windows")
    op.execute("DROP TRIGGER default_policy ON environments")
    op.execute("DROP FUNCTION relman_default_policy()")
    op.execute("DROP FUNCTION relman_make_default_policy(uuid, text)")
    op.drop_table("environment_policies")
