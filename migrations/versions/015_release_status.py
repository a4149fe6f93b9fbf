"""A release's status, derived by the database from its deployments.

Revision ID: 015_release_status
Revises: 014_partition_owner
Create Date: 2026-12-01

The services derived it in the statement that changed a deployment, from that
statement's snapshot. Two deployments of one release changing at once (two stage moves
ending them) each derived it without the other's change, and the last to write could
leave it stale (in_progress after both had succeeded). Now triggers on deployments
derive it after every change that can move it, whatever SQL makes the change:

- the release's row is locked first (FOR NO KEY UPDATE), and only then is its status
  derived, by a statement of its own: in READ COMMITTED that statement's snapshot holds
  every change committed by whoever held the lock before, and the change that fired it
  (the triggers run after their statement). Whoever derives last sees every change.
- first match wins: rolled back in production, succeeded there (completed), one running
  (in progress), one waiting to run (promoted), one succeeded elsewhere (testing), else
  draft; written (with updated_at) only when it changes.
- pending and awaiting_approval count alike, so a change between them (a vote, a policy
  sending many deployments back to wait) neither derives nor locks anything.
- a deployment moved to another release derives both, in the order of their ids; a
  TRUNCATE leaves every release draft.
- only a READ COMMITTED transaction may change them (the services run in it): a
  REPEATABLE READ or SERIALIZABLE one keeps the snapshot it began with, older than the
  lock, and PostgreSQL's serializable checks do not see a READ COMMITTED writer, so
  beside a stage move it could derive without the move and leave the status stale.

Migration 012's lock for deployment_outcomes (relman_lock_outcomes) accepted SERIALIZABLE
for the same reason and had the same gap: it now refuses all but READ COMMITTED too, its
definition edited where it stands (pg_get_functiondef), not copied here.

The functions run with the rights of whoever changes the deployments: the services'
role already reads deployments and environments and writes releases. Every release's
status is derived again here, which also mends any the old derivation left stale.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "015_release_status"
down_revision: str | None = "014_partition_owner"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A release's status over its deployments `d` and their environments `e`.
DERIVED_STATUS = """CASE
    WHEN bool_or(d.status = 'rolled_back' AND e.environment_type = 'production')
        THEN 'rolled_back'
    WHEN bool_or(d.status = 'succeeded' AND e.environment_type = 'production')
        THEN 'completed'
    WHEN bool_or(d.status = 'in_progress') THEN 'in_progress'
    WHEN bool_or(d.status IN ('pending', 'awaiting_approval')) THEN 'promoted'
    WHEN bool_or(d.status = 'succeeded') THEN 'testing'
    ELSE 'draft' END"""
DERIVE_ALL = f"""
UPDATE releases r SET status = derived.status, updated_at = now()
FROM (
    SELECT r.id, {DERIVED_STATUS} AS status
    FROM releases r
    LEFT JOIN deployments d ON d.release_id = r.id
    LEFT JOIN environments e ON e.id = d.environment_id
    GROUP BY r.id
) AS derived
WHERE r.id = derived.id AND r.status IS DISTINCT FROM derived.status
"""
DEPLOYMENT_CHANGED = f"""
CREATE FUNCTION relman_release_status() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    release_ids uuid[];
    each_release uuid;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'deployments change only in READ COMMITTED transactions'
                        ' (their release''s status follows them)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF TG_OP = 'INSERT' THEN
        release_ids := ARRAY[NEW.release_id];
    ELSIF TG_OP = 'DELETE' OR OLD.release_id = NEW.release_id THEN
        release_ids := ARRAY[OLD.release_id];
    ELSE
        release_ids := ARRAY[least(OLD.release_id, NEW.release_id),
                             greatest(OLD.release_id, NEW.release_id)];
    END IF;
    FOREACH each_release IN ARRAY release_ids LOOP
        -- The lock first: the UPDATE's snapshot, taken after it, then holds the changes
        -- of whoever held it before.
        PERFORM FROM public.releases WHERE id = each_release FOR NO KEY UPDATE;
        UPDATE public.releases r SET status = derived.status, updated_at = now()
        FROM (
            SELECT {DERIVED_STATUS} AS status
            FROM public.deployments d JOIN public.environments e ON e.id = d.environment_id
            WHERE d.release_id = each_release
        ) AS derived
        WHERE r.id = each_release AND r.status IS DISTINCT FROM derived.status;
    END LOOP;
    RETURN NULL;
END $$
"""
DEPLOYMENTS_TRUNCATED = """
CREATE FUNCTION relman_release_status_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE public.releases SET status = 'draft', updated_at = now() WHERE status <> 'draft';
    RETURN NULL;
END $$
"""


def _counted(row: str) -> str:
    """What of a deployment the status is derived from (pending and awaiting_approval
    count alike)."""
    return (
        f"({row}.release_id, {row}.environment_id, CASE WHEN {row}.status"
        f" IN ('pending', 'awaiting_approval') THEN 'pending' ELSE {row}.status END)"
    )


# Migration 012's relman_lock_outcomes: what its isolation check says before -> after.
OUTCOMES_LOCK = "public.relman_lock_outcomes(uuid[], uuid[])"
OUTCOMES_READ_COMMITTED_ONLY = (
    ("= 'repeatable read'", "<> 'read committed'"),
    ("' or SERIALIZABLE transactions", "' transactions"),
)


def _edit_outcomes_lock(edits: Sequence[tuple[str, str]]) -> None:
    """Replaces, in the outcomes lock's definition as the database holds it, each text by
    its replacement; an edit that finds nothing to replace fails the migration."""
    steps = "\n".join(
        f"""    IF strpos(definition, $old${old}$old$) = 0 THEN
        RAISE EXCEPTION 'relman_lock_outcomes: % not found', $old${old}$old$;
    END IF;
    definition := replace(definition, $old${old}$old$, $new${new}$new$);"""
        for old, new in edits
    )
    op.execute(
        f"""DO $edit$
DECLARE definition text := pg_get_functiondef('{OUTCOMES_LOCK}'::regprocedure);
BEGIN
{steps}
    EXECUTE definition;
END $edit$"""
    )


# name: (events, WHEN)
TRIGGERS = {
    "release_status_inserted": ("INSERT", ""),
    "release_status_updated": (
        "UPDATE OF status, release_id, environment_id",
        f" WHEN ({_counted('OLD')} IS DISTINCT FROM {_counted('NEW')})",
    ),
    "release_status_deleted": ("DELETE", ""),
}


def upgrade() -> None:
    # No deployment or release changes between the derivation and the triggers.
    op.execute("LOCK TABLE deployments, releases IN SHARE ROW EXCLUSIVE MODE")
    op.execute(DERIVE_ALL)
    op.execute(DEPLOYMENT_CHANGED)
    op.execute(DEPLOYMENTS_TRUNCATED)
    for name, (events, condition) in TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {name} AFTER {events} ON deployments"
            f" FOR EACH ROW{condition} EXECUTE FUNCTION relman_release_status()"
        )
    op.execute(
        "CREATE TRIGGER release_status_truncated AFTER TRUNCATE ON deployments"
        " FOR EACH STATEMENT EXECUTE FUNCTION relman_release_status_truncated()"
    )
    _edit_outcomes_lock(OUTCOMES_READ_COMMITTED_ONLY)


def downgrade() -> None:
    _edit_outcomes_lock([(new, old) for old, new in OUTCOMES_READ_COMMITTED_ONLY])
    # The services of the revision before derive the status themselves again.
    op.execute("DROP TRIGGER release_status_truncated ON deployments")
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON deployments")
    op.execute("DROP FUNCTION relman_release_status_truncated()")
    op.execute("DROP FUNCTION relman_release_status()")
