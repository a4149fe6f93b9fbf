"""Audit trail at scale: audit_logs in monthly partitions, request ids in a table of their own.

Revision ID: 008_audit_partitions
Revises: 007_environment_policies
Create Date: 2026-11-30

- audit_logs becomes a table partitioned by range of created_at, one partition per
  UTC month named `audit_logs_yYYYYmMM`, and no default partition (a row there would
  block the creation of its month's partition). The rows move across with INSERT ...
  SELECT in this transaction: every month from the oldest row's to two months ahead
  gets its partition, gaps included. ATTACHing the old table instead would be quicker
  but would make one partition of many months, which monthly retention cannot drop.
- The primary key is (created_at, id): a partitioned table's unique keys must hold
  its partition key. It is also the keyset index, so ix_audit_logs_created_at_id
  goes. Ids stay unique by their generators (gen_random_uuid(), uuid4()).
- Append-only on every partition: the row trigger is cloned to each partition, the
  statement-level TRUNCATE trigger is not (PostgreSQL 15 to 18), so each partition
  gets its own.
- `relman_audit_make_partition(month)` makes one month's partition (the owner's: the
  migration, the seed); `relman_audit_partitions_ahead(n)` makes the
  current month's and the next n, SECURITY DEFINER with a fixed search_path, so that
  the services' role, which may create no table, keeps partitions ahead of time. It
  can make nothing else: no caller-given name, bound or SQL.
- audit_requests: the request ids of LogAction/LogActions rows, each with the row it
  stored. Until now a row's id was its request id, but with (created_at, id) as the
  key a retried id could no longer be refused by the key. Existing client rows carry
  their ids over, so a retry of a call made before the upgrade is still a retry.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "008_audit_partitions"
down_revision: str | None = "007_environment_policies"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    "id, user_id, action, resource_type, resource_id, details, ip_address, user_agent,"
    " created_at, origin, recorded_by"
)
# The indexes every partition carries (the key aside); made on the parent after the
# rows are in, they cascade to each partition.
INDEXES = {
    "ix_audit_logs_action_created_at_id": "(action, created_at, id)",
    "ix_audit_logs_user_id_created_at_id": "(user_id, created_at, id)",
    "ix_audit_logs_resource_type_resource_id_created_at_id": (
        "(resource_type, resource_id, created_at, id)"
    ),
    "ix_audit_logs_relman_created_at_id": "(created_at, id) WHERE origin = 'relman'",
}
TABLE = """
CREATE TABLE audit_logs (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id uuid,
    action varchar(50) NOT NULL,
    resource_type varchar(50) NOT NULL,
    resource_id varchar(100),
    details jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    ip_address varchar(45),
    user_agent varchar(255),
    created_at timestamptz NOT NULL DEFAULT now(),
    origin varchar(10),
    recorded_by uuid,
    CONSTRAINT {key},
    CONSTRAINT fk_audit_logs_user_id_users FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE RESTRICT,
    CONSTRAINT ck_audit_logs_origin CHECK (origin IN ('relman', 'client'))
){partitioned}
"""
APPEND_ONLY = (
    "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON audit_logs"
    " FOR EACH ROW EXECUTE FUNCTION relman_audit_logs_append_only()",
    "CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit_logs"
    " FOR EACH STATEMENT EXECUTE FUNCTION relman_audit_logs_append_only()",
)

MAKE_PARTITION = """
CREATE FUNCTION relman_audit_make_partition(month date) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD' AS $$
-- Makes the partition of the UTC month holding `month`, append-only like its parent;
-- false when it exists already. LIKE ... INCLUDING CONSTRAINTS then ATTACH, rather than
-- CREATE TABLE ... PARTITION OF: ATTACH needs no ACCESS EXCLUSIVE lock on audit_logs,
-- so it does not queue behind (or in front of) a running export.
DECLARE
    first_day timestamp := date_trunc('month', month::timestamp);
    part text := 'audit_logs_' || to_char(first_day, '"y"YYYY"m"MM');
BEGIN
    IF to_regclass('public.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.audit_logs'
                   ' INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    EXECUTE format('CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON public.%I'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION public.relman_audit_logs_append_only()',
                   part);
    EXECUTE format('ALTER TABLE public.audit_logs ATTACH PARTITION public.%I'
                   ' FOR VALUES FROM (%L) TO (%L)', part,
                   first_day AT TIME ZONE 'UTC',
                   (first_day + interval '1 month') AT TIME ZONE 'UTC');
    RETURN true;
END $$
"""
PARTITIONS_AHEAD = """
CREATE FUNCTION relman_audit_partitions_ahead(months_ahead integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
-- Makes the partitions of this UTC month and of the next `months_ahead` (0..12) that do
-- not exist yet; returns how many it made. Run with its owner's rights by the services'
-- role, which may create no table itself: it chooses only how far ahead.
DECLARE
    this_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    made integer := 0;
BEGIN
    IF months_ahead IS NULL OR months_ahead NOT BETWEEN 0 AND 12 THEN
        RAISE EXCEPTION 'months_ahead must be between 0 and 12, not %', months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Every replica of both services calls this as it starts: one at a time.
    PERFORM pg_advisory_xact_lock(hashtext('relman_audit_partitions_ahead'));
    FOR i IN 0..months_ahead LOOP
        IF public.relman_audit_make_partition(
               (this_month + make_interval(months => i))::date) THEN
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$
"""


def upgrade() -> None:
    op.execute("LOCK TABLE audit_logs IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE audit_logs RENAME TO audit_logs_unpartitioned")
    # Index and constraint names are schema-wide: the old ones go before the new exist.
    for name in (*INDEXES, "ix_audit_logs_created_at_id"):
        op.execute(f"DROP INDEX {name}")
    for constraint in ("pk_audit_logs", "fk_audit_logs_user_id_users", "ck_audit_logs_origin"):
        op.execute(f"ALTER TABLE audit_logs_unpartitioned DROP CONSTRAINT {constraint}")
    op.execute(
        TABLE.format(
            key="pk_audit_logs PRIMARY KEY (created_at, id)",
            partitioned=" PARTITION BY RANGE (created_at)",
        )
    )
    op.execute(MAKE_PARTITION)
    op.execute(PARTITIONS_AHEAD)
    op.execute("REVOKE ALL ON FUNCTION relman_audit_make_partition(date) FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION relman_audit_partitions_ahead(integer) FROM PUBLIC")
    # Every month from the oldest row's to two months ahead of now or of the newest row.
    op.execute(
        """
        SELECT relman_audit_make_partition(month::date)
        FROM generate_series(
            date_trunc('month', (SELECT coalesce(min(created_at), now())
                                 FROM audit_logs_unpartitioned) AT TIME ZONE 'UTC'),
            date_trunc('month', greatest(now(), (SELECT max(created_at)
                                                 FROM audit_logs_unpartitioned))
                                AT TIME ZONE 'UTC') + interval '2 months',
            interval '1 month') AS month
        """
    )
    op.execute(f"INSERT INTO audit_logs ({COLUMNS}) SELECT {COLUMNS} FROM audit_logs_unpartitioned")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON audit_logs {columns}")
    for statement in APPEND_ONLY:
        op.execute(statement)

    op.execute(
        """
        CREATE TABLE audit_requests (
            request_id uuid NOT NULL,
            audit_id uuid NOT NULL,
            audit_created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_audit_requests PRIMARY KEY (request_id)
        )
        """
    )
    op.execute(
        "CREATE INDEX ix_audit_requests_audit_created_at ON audit_requests (audit_created_at)"
    )
    op.execute(
        "INSERT INTO audit_requests (request_id, audit_id, audit_created_at)"
        " SELECT id, id, created_at FROM audit_logs_unpartitioned"
        " WHERE origin IS DISTINCT FROM 'relman'"
    )
    op.execute("DROP TABLE audit_logs_unpartitioned")


def downgrade() -> None:
    op.execute("DROP TABLE audit_requests")
    op.execute("ALTER TABLE audit_logs RENAME TO audit_logs_partitioned")
    for name in INDEXES:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_partitioned")
    # Its key's index name is schema-wide (other constraints' names are per table).
    op.execute("ALTER INDEX pk_audit_logs RENAME TO pk_audit_logs_partitioned")
    op.execute(TABLE.format(key="pk_audit_logs PRIMARY KEY (id)", partitioned=""))
    op.execute(f"INSERT INTO audit_logs ({COLUMNS}) SELECT {COLUMNS} FROM audit_logs_partitioned")
    op.execute("DROP TABLE audit_logs_partitioned")  # its partitions go with it
    op.execute("DROP FUNCTION relman_audit_partitions_ahead(integer)")
    op.execute("DROP FUNCTION relman_audit_make_partition(date)")
    op.execute("CREATE INDEX ix_audit_logs_created_at_id ON audit_logs (created_at, id)")
    for name, columns in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON audit_logs {columns}")
    for statement in APPEND_ONLY:
        op.execute(statement)
