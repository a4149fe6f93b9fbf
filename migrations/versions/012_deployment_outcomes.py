"""Deployment outcomes: each ended deployment's DORA facts, kept by the database.

Revision ID: 012_deployment_outcomes
Revises: 011_dora_metrics
Create Date: 2026-11-30

GetDoraMetrics read a year of deployments, joined each to its release, environment and
rollback, and looked up the next success after each failure: 876 ms at p99 for 100,000
production deployments. It now aggregates one narrow row per ended deployment, read from
covering indexes, where those facts are already worked out:

- deployment_outcomes_derived (a view) is the one definition of the facts, from the
  deployments as they are: whether it counts as production, succeeded or failed, its lead
  time, whether it is rework, when it failed and when the next success of its service in
  its environment recovered it.
- deployment_outcomes holds that view's rows, kept equal to it by constraint triggers
  checked at commit, whatever SQL makes the change (the services, the schema owner, a
  bulk load): a deployment that ends or changes after it ended, a rollback written or
  moved, a release's created_at or hotfix changed. A success (or a success undone)
  re-derives the failures of its service and environment it may recover, those still
  unrecovered or recovered at or after it; TRUNCATE rollbacks re-derives every
  rolled-back deployment. Each change first takes a transaction lock on the service and
  environment of every row it re-derives (in one order), so two commits of one pair cannot
  each miss the other's row; a REPEATABLE READ transaction, whose snapshot predates the
  lock, may not change them (the services run in READ COMMITTED). An environment's type
  never changes (migration 010's trigger).
- The services' role may only read the table: its rows follow the deployments and
  nothing else (shared.persistence.roles).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "012_deployment_outcomes"
down_revision: str | None = "011_dora_metrics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENDED = "('succeeded', 'failed', 'rolled_back')"
COLUMNS = (
    "deployment_id, service_id, environment_id, production, completed_at, succeeded,"
    " lead_time_s, rework, failed_at, recovered_at, recovery_s"
)
EXCLUDED = ", ".join(f"EXCLUDED.{column.strip()}" for column in COLUMNS.split(","))
# A failure is a FAILED deployment's completed_at, or a ROLLED_BACK one's rollback (none
# for a seed row without one: never recovered). Its recovery is the next SUCCEEDED
# deployment of its service in its environment to complete after it.
DERIVED = f"""
CREATE VIEW deployment_outcomes_derived AS
SELECT d.id AS deployment_id,
       d.service_id,
       d.environment_id,
       e.environment_type = 'production' AS production,
       d.completed_at,
       d.status = 'succeeded' AS succeeded,
       CASE WHEN d.status = 'succeeded' AND NOT d.is_rollback
            THEN CAST(extract(epoch FROM d.completed_at - r.created_at) AS double precision)
       END AS lead_time_s,
       d.status = 'succeeded' AND (d.is_rollback OR r.hotfix) AS rework,
       f.failed_at,
       n.recovered_at,
       CAST(extract(epoch FROM n.recovered_at - f.failed_at) AS double precision)
           AS recovery_s
FROM deployments d
JOIN releases r ON r.id = d.release_id
JOIN environments e ON e.id = d.environment_id
LEFT JOIN rollbacks rb ON rb.deployment_id = d.id AND d.status = 'rolled_back'
CROSS JOIN LATERAL (
    SELECT CASE d.status WHEN 'failed' THEN d.completed_at
                         WHEN 'rolled_back' THEN rb.created_at END AS failed_at
) f
LEFT JOIN LATERAL (
    SELECT min(s.completed_at) AS recovered_at FROM deployments s
    WHERE s.service_id = d.service_id AND s.environment_id = d.environment_id
      AND s.status = 'succeeded' AND s.completed_at > f.failed_at
) n ON true
WHERE d.status IN {ENDED} AND d.completed_at IS NOT NULL
"""
# Both look rows up by key. A plan is cached by each session: one made while the table
# was small (a new database, a bulk load whose commit runs these once per row) must not
# go on scanning it as it grows, hence no sequential scan (ANALYZE would replan, but
# none runs inside a commit).
REFRESH = f"""
CREATE FUNCTION relman_refresh_outcomes(deployment_ids uuid[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off AS $$
-- These deployments' rows, derived again (none for one that has not ended).
DECLARE
    kept uuid[];
BEGIN
    IF coalesce(cardinality(deployment_ids), 0) = 0 THEN
        RETURN;
    END IF;
    WITH derived AS (
        INSERT INTO public.deployment_outcomes AS o ({COLUMNS})
        SELECT {COLUMNS} FROM public.deployment_outcomes_derived
        WHERE deployment_id = ANY (deployment_ids)
        ON CONFLICT (deployment_id) DO UPDATE SET ({COLUMNS}) = ROW({EXCLUDED})
        RETURNING o.deployment_id
    )
    SELECT array_agg(deployment_id) INTO kept FROM derived;
    IF coalesce(cardinality(kept), 0) < cardinality(deployment_ids) THEN
        DELETE FROM public.deployment_outcomes
        WHERE deployment_id = ANY (deployment_ids)
          AND deployment_id <> ALL (coalesce(kept, ARRAY[]::uuid[]));
    END IF;
END $$
"""
RECOVERIES = """
CREATE FUNCTION relman_refresh_recoveries(service uuid, environment uuid, since timestamptz)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off AS $$
-- A success at `since` came or went: the pair's failures it may recover or have recovered.
BEGIN
    PERFORM public.relman_refresh_outcomes(ARRAY(
        SELECT deployment_id FROM public.deployment_outcomes
        WHERE service_id = service AND environment_id = environment AND NOT succeeded
          AND (recovered_at IS NULL OR recovered_at >= since)
    ));
END $$
"""
# The lock of each (service, environment) whose rows a change re-derives, taken in one
# order (no two commits wait on each other). REPEATABLE READ is refused: its snapshot,
# taken before the lock was granted, would miss the commit the lock waited for.
LOCK_PAIRS = """
CREATE FUNCTION relman_lock_outcomes(services uuid[], environments uuid[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_isolation') = 'repeatable read' THEN
        RAISE EXCEPTION 'deployments, rollbacks and releases change only in READ COMMITTED'
                        ' or SERIALIZABLE transactions (deployment_outcomes follows them)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('relman_deployment_outcomes'),
                                  hashtext(pair.service::text || pair.environment::text))
    FROM (SELECT DISTINCT service, environment
          FROM unnest(services, environments) AS given (service, environment)
          WHERE service IS NOT NULL AND environment IS NOT NULL
          ORDER BY service, environment) pair;
END $$
"""
DEPLOYMENT_CHANGED = """
CREATE FUNCTION relman_deployment_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    services uuid[] := ARRAY[]::uuid[];
    environments uuid[] := ARRAY[]::uuid[];
BEGIN
    IF TG_OP <> 'INSERT' THEN
        services := services || OLD.service_id;
        environments := environments || OLD.environment_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        services := services || NEW.service_id;
        environments := environments || NEW.environment_id;
    END IF;
    PERFORM public.relman_lock_outcomes(services, environments);
    IF TG_OP <> 'DELETE' THEN
        PERFORM public.relman_refresh_outcomes(ARRAY[NEW.id]);
        IF NEW.status = 'succeeded' THEN
            PERFORM public.relman_refresh_recoveries(
                NEW.service_id, NEW.environment_id, NEW.completed_at);
        END IF;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        IF OLD.status = 'succeeded' THEN
            PERFORM public.relman_refresh_recoveries(
                OLD.service_id, OLD.environment_id, OLD.completed_at);
        END IF;
    END IF;
    RETURN NULL;
END $$
"""
# The deployments given, their pairs locked first (their rows as they are now).
REFRESH_LOCKED = """
CREATE FUNCTION relman_refresh_outcomes_locked(deployment_ids uuid[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM public.relman_lock_outcomes(array_agg(d.service_id), array_agg(d.environment_id))
    FROM public.deployments d WHERE d.id = ANY (deployment_ids);
    PERFORM public.relman_refresh_outcomes(deployment_ids);
END $$
"""
ROLLBACK_CHANGED = """
CREATE FUNCTION relman_rollback_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rolled_back uuid[] := ARRAY[]::uuid[];
BEGIN
    IF TG_OP <> 'INSERT' THEN
        rolled_back := rolled_back || OLD.deployment_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        rolled_back := rolled_back || NEW.deployment_id;
    END IF;
    PERFORM public.relman_refresh_outcomes_locked(rolled_back);
    RETURN NULL;
END $$
"""
# TRUNCATE rollbacks: every rolled-back deployment loses the time it failed.
ROLLBACKS_TRUNCATED = """
CREATE FUNCTION relman_rollbacks_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM public.relman_refresh_outcomes_locked(ARRAY(
        SELECT id FROM public.deployments WHERE status = 'rolled_back'
    ));
    RETURN NULL;
END $$
"""
RELEASE_CHANGED = """
CREATE FUNCTION relman_release_outcome() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM public.relman_refresh_outcomes_locked(ARRAY(
        SELECT id FROM public.deployments WHERE release_id = NEW.id
    ));
    RETURN NULL;
END $$
"""
# name: (table, events, WHEN, function); every one checked at commit, on the rows as
# they are then (the rollback row is written after its deployment's status).
TRIGGERS = {
    "deployment_outcome_inserted": (
        "deployments",
        "INSERT",
        f"NEW.status IN {ENDED}",
        "relman_deployment_outcome",
    ),
    "deployment_outcome_updated": (
        "deployments",
        "UPDATE OF status, completed_at, release_id, is_rollback, service_id, environment_id",
        f"(OLD.status IN {ENDED} OR NEW.status IN {ENDED})"
        " AND (OLD.status, OLD.completed_at, OLD.release_id, OLD.is_rollback,"
        " OLD.service_id, OLD.environment_id) IS DISTINCT FROM (NEW.status,"
        " NEW.completed_at, NEW.release_id, NEW.is_rollback, NEW.service_id,"
        " NEW.environment_id)",
        "relman_deployment_outcome",
    ),
    "deployment_outcome_deleted": (
        "deployments",
        "DELETE",
        f"OLD.status IN {ENDED}",
        "relman_deployment_outcome",
    ),
    "rollback_outcome": (
        "rollbacks",
        "INSERT OR DELETE OR UPDATE OF created_at, deployment_id",
        "true",
        "relman_rollback_outcome",
    ),
    "release_outcome": (
        "releases",
        "UPDATE OF created_at, hotfix",
        "(OLD.created_at, OLD.hotfix) IS DISTINCT FROM (NEW.created_at, NEW.hotfix)",
        "relman_release_outcome",
    ),
}
TRIGGER_FUNCTIONS = (
    "relman_release_outcome()",
    "relman_rollbacks_truncated()",
    "relman_rollback_outcome()",
    "relman_deployment_outcome()",
)
# Only through the triggers, as their owner: the services' role calls none of these.
HELPERS = (
    "relman_refresh_outcomes_locked(uuid[])",
    "relman_lock_outcomes(uuid[], uuid[])",
    "relman_refresh_recoveries(uuid, uuid, timestamptz)",
    "relman_refresh_outcomes(uuid[])",
)
# What GetDoraMetrics reads, in each of its indexes (no heap visit), ordered so that
# nothing pads: every index tuple read costs, a year of a busy environment is 100,000.
FIGURES = ["lead_time_s", "recovery_s", "succeeded", "rework"]


def upgrade() -> None:
    # No deployment, rollback or release changes between the backfill and the triggers.
    op.execute("LOCK TABLE deployments, rollbacks, releases IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        "deployment_outcomes",
        sa.Column("deployment_id", sa.Uuid(), nullable=False),
        sa.Column("service_id", sa.Uuid(), nullable=False),
        sa.Column("environment_id", sa.Uuid(), nullable=False),
        sa.Column("production", sa.Boolean(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.Column("lead_time_s", sa.Double()),
        sa.Column("rework", sa.Boolean(), nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True)),
        sa.Column("recovered_at", sa.DateTime(timezone=True)),
        sa.Column("recovery_s", sa.Double()),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_deployment_outcomes_deployment_id_deployments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("deployment_id", name=op.f("pk_deployment_outcomes")),
    )
    op.create_index(
        "ix_deployment_outcomes_environment_id_completed_at",
        "deployment_outcomes",
        ["environment_id", "completed_at"],
        postgresql_include=FIGURES,
    )
    op.create_index(
        "ix_deployment_outcomes_production_completed_at",
        "deployment_outcomes",
        ["completed_at"],
        postgresql_include=FIGURES,
        postgresql_where=sa.text("production"),
    )
    op.create_index(
        "ix_deployment_outcomes_service_id_completed_at",
        "deployment_outcomes",
        ["service_id", "completed_at"],
        postgresql_include=[*FIGURES, "environment_id", "production"],  # also a team's
    )
    op.create_index(
        "ix_deployment_outcomes_failures",
        "deployment_outcomes",
        ["service_id", "environment_id", "recovered_at"],
        postgresql_where=sa.text("NOT succeeded"),
    )
    op.execute(DERIVED)
    op.execute(
        f"INSERT INTO deployment_outcomes ({COLUMNS})"
        f" SELECT {COLUMNS} FROM deployment_outcomes_derived"
    )
    for function in (
        REFRESH,
        RECOVERIES,
        LOCK_PAIRS,
        DEPLOYMENT_CHANGED,
        REFRESH_LOCKED,
        ROLLBACK_CHANGED,
        ROLLBACKS_TRUNCATED,
        RELEASE_CHANGED,
    ):
        op.execute(function)
    for name, (table, events, condition, function) in TRIGGERS.items():
        op.execute(
            f"CREATE CONSTRAINT TRIGGER {name} AFTER {events} ON {table}"
            f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({condition})"
            f" EXECUTE FUNCTION {function}()"
        )
    op.execute(
        "CREATE TRIGGER rollbacks_truncated AFTER TRUNCATE ON rollbacks"
        " FOR EACH STATEMENT EXECUTE FUNCTION relman_rollbacks_truncated()"
    )
    for function in HELPERS:
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP TRIGGER rollbacks_truncated ON rollbacks")
    for name, (table, *_) in TRIGGERS.items():
        op.execute(f"DROP TRIGGER {name} ON {table}")
    for function in (*TRIGGER_FUNCTIONS, *HELPERS):
        op.execute(f"DROP FUNCTION {function}")
    op.execute("DROP VIEW deployment_outcomes_derived")
    op.drop_table("deployment_outcomes")
