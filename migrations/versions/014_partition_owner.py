"""A partition of audit_logs belongs to audit_logs' owner, whoever makes it.

relman_audit_make_partition runs with its caller's rights: the owner's, the services'
through relman_audit_partitions_ahead (SECURITY DEFINER, the owner's), and a superuser's
when the seed runs as one (the tests, the bench). A month made by a superuser was the
superuser's, so the owner could not read it: on the first day of a month, the seed's
rows of the month before made such a partition, and the owner's load of the trail at
scale (make bench-scale) was refused. The function now hands the partition to the
parent's owner.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "014_partition_owner"
down_revision: str | None = "013_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAKE_PARTITION = """
CREATE OR REPLACE FUNCTION relman_audit_make_partition(month date) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC'
SET DateStyle = 'ISO, YMD' AS $$
-- Makes the partition of the UTC month holding `month`, append-only like its parent and
-- owned by the parent's owner; false when it exists already. LIKE ... INCLUDING
-- CONSTRAINTS then ATTACH, rather than CREATE TABLE ... PARTITION OF: ATTACH needs no
-- ACCESS EXCLUSIVE lock on audit_logs, so it does not queue behind (or in front of) a
-- running export.
DECLARE
    first_day timestamp := date_trunc('month', month::timestamp);
    part text := 'audit_logs_' || to_char(first_day, '"y"YYYY"m"MM');
    parent_owner name := (SELECT tableowner FROM pg_tables
                          WHERE schemaname = 'public' AND tablename = 'audit_logs');
BEGIN
    IF to_regclass('public.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.audit_logs'
                   ' INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    IF parent_owner IS DISTINCT FROM current_user THEN
        EXECUTE format('ALTER TABLE public.%I OWNER TO %I', part, parent_owner);
    END IF;
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
# 008's text, for the downgrade.
MADE_BEFORE = """
CREATE OR REPLACE FUNCTION relman_audit_make_partition(month date) RETURNS boolean
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


def upgrade() -> None:
    op.execute(MAKE_PARTITION)


def downgrade() -> None:
    op.execute(MADE_BEFORE)  # CREATE OR REPLACE keeps the function's grants
