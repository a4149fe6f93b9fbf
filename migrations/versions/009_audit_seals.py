"""Audit trail beyond doubt: a sequence on every row, and signed, chained seals.

Revision ID: 009_audit_seals
Revises: 008_audit_partitions
Create Date: 2026-11-30

- audit_logs.sequence: from `audit_logs_sequence` (not OWNED BY the column, whose
  default would then reflect as none; CACHE 1: a value handed out is the
  sequence's last_value at once, which the sealer's horizon counts on), unique by its
  generator. Existing rows are numbered in (created_at, id) order, with the append-only
  trigger of each partition off for the act. Indexed on every partition (the sealer and
  the verifier read in sequence order; exports take a sequence range).
- `assign_xid`, a statement-level trigger on audit_logs: a statement that inserts rows
  holds a transaction id before it takes its first sequence value, so a sequence value
  handed out belongs to a transaction whose id the sealer can wait for (it seals only
  below that horizon: a row that commits late is never passed over).
- created_at (and audit_requests.audit_created_at, which must equal it) become the
  statement's start, not the transaction's: a row's time is when it was written, so a
  long LogActions stream's rows do not look backdated next to rows sealed meanwhile.
- audit_seals: the signed seals, append-only like the trail, and each must follow the
  last one (number, first sequence, previous hash) and cover only sequence values
  already handed out (trigger `seal_follows`).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "009_audit_seals"
down_revision: str | None = "008_audit_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTITIONS = """
    SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'audit_logs'::regclass
"""


# A seal must follow the last one and cover only sequence values handed out: with the
# services' credentials (INSERT on audit_seals) a forged seal claiming every sequence to
# come would leave the sealer nothing to seal, silently. The sealer's lock makes inserts
# one at a time; the key refuses a second seal of a number.
SEAL_FOLLOWS = """
CREATE FUNCTION relman_audit_seal_follows() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    previous record;
    handed_out bigint;
BEGIN
    SELECT seal_number, last_sequence, seal_hash INTO previous FROM public.audit_seals
    ORDER BY seal_number DESC LIMIT 1;
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO handed_out
    FROM public.audit_logs_sequence;
    IF NEW.seal_number IS DISTINCT FROM coalesce(previous.seal_number, 0) + 1
       OR NEW.first_sequence IS DISTINCT FROM coalesce(previous.last_sequence, 0) + 1
       OR NEW.previous_seal_hash IS DISTINCT FROM coalesce(previous.seal_hash, ''::bytea)
       OR NEW.last_sequence > handed_out THEN
        RAISE EXCEPTION 'seal % does not follow seal % or covers sequences not handed out',
            NEW.seal_number, previous.seal_number
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- The shapes the sealer writes, and times not in the future: a seal the services'
    -- credentials forge can neither make every later row look backdated nor stop the
    -- pages of ListAuditSeals with one huge value.
    IF octet_length(NEW.root_hash) <> 32 OR octet_length(NEW.seal_hash) <> 32
       OR octet_length(NEW.signature) <> 64 OR NEW.key_id !~ '^[0-9a-f]{16}$'
       OR NEW.row_count NOT BETWEEN 0 AND 10000
       OR octet_length(NEW.row_digests) <> 16 * NEW.row_count
       OR NEW.sealed_at > clock_timestamp()
       OR NEW.newest_created_at > NEW.sealed_at
       OR NEW.oldest_created_at > NEW.newest_created_at THEN
        RAISE EXCEPTION 'seal % is not shaped as the sealer makes seals', NEW.seal_number
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$
"""


def _partitions() -> list[str]:
    return [row[0] for row in op.get_bind().exec_driver_sql(PARTITIONS).fetchall()]


def upgrade() -> None:
    op.execute("LOCK TABLE audit_logs IN ACCESS EXCLUSIVE MODE")
    op.execute("CREATE SEQUENCE audit_logs_sequence AS bigint CACHE 1")
    op.execute("ALTER TABLE audit_logs ADD COLUMN sequence bigint")
    partitions = _partitions()
    for part in partitions:
        op.execute(f"ALTER TABLE {part} DISABLE TRIGGER append_only")
    op.execute(
        """
        UPDATE audit_logs a SET sequence = n.sequence
        FROM (SELECT created_at, id, row_number() OVER (ORDER BY created_at, id) AS sequence
              FROM audit_logs) n
        WHERE a.created_at = n.created_at AND a.id = n.id
        """
    )
    for part in partitions:
        op.execute(f"ALTER TABLE {part} ENABLE TRIGGER append_only")
    op.execute(
        "SELECT setval('audit_logs_sequence', max(sequence)) FROM audit_logs"
        " HAVING max(sequence) IS NOT NULL"
    )
    op.execute(
        "ALTER TABLE audit_logs ALTER COLUMN sequence SET DEFAULT nextval('audit_logs_sequence')"
    )
    op.execute("ALTER TABLE audit_logs ALTER COLUMN sequence SET NOT NULL")
    op.execute("CREATE INDEX ix_audit_logs_sequence ON audit_logs (sequence)")
    op.execute(
        """
        CREATE FUNCTION relman_audit_assign_xid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_current_xact_id();
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER assign_xid BEFORE INSERT ON audit_logs"
        " FOR EACH STATEMENT EXECUTE FUNCTION relman_audit_assign_xid()"
    )
    op.execute("ALTER TABLE audit_logs ALTER COLUMN created_at SET DEFAULT statement_timestamp()")
    op.execute(
        "ALTER TABLE audit_requests ALTER COLUMN audit_created_at SET DEFAULT statement_timestamp()"
    )
    op.execute(
        """
        CREATE TABLE audit_seals (
            seal_number bigint NOT NULL,
            first_sequence bigint NOT NULL,
            last_sequence bigint NOT NULL,
            row_count integer NOT NULL,
            root_hash bytea NOT NULL,
            row_digests bytea NOT NULL,
            previous_seal_hash bytea NOT NULL,
            seal_hash bytea NOT NULL,
            key_id varchar(64) NOT NULL,
            signature bytea NOT NULL,
            sealed_at timestamptz NOT NULL,
            oldest_created_at timestamptz,
            newest_created_at timestamptz,
            CONSTRAINT pk_audit_seals PRIMARY KEY (seal_number),
            CONSTRAINT uq_audit_seals_first_sequence UNIQUE (first_sequence),
            CONSTRAINT ck_audit_seals_range CHECK (first_sequence <= last_sequence)
        )
        """
    )
    op.execute("CREATE INDEX ix_audit_seals_newest_created_at ON audit_seals (newest_created_at)")
    op.execute(
        """
        CREATE FUNCTION relman_audit_seals_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_seals is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(SEAL_FOLLOWS)
    op.execute(
        "CREATE TRIGGER seal_follows BEFORE INSERT ON audit_seals"
        " FOR EACH ROW EXECUTE FUNCTION relman_audit_seal_follows()"
    )
    op.execute(
        "CREATE TRIGGER append_only BEFORE UPDATE OR DELETE ON audit_seals"
        " FOR EACH ROW EXECUTE FUNCTION relman_audit_seals_append_only()"
    )
    op.execute(
        "CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON audit_seals"
        " FOR EACH STATEMENT EXECUTE FUNCTION relman_audit_seals_append_only()"
    )


def downgrade() -> None:
    op.execute("DROP TABLE audit_seals")
    op.execute("DROP FUNCTION relman_audit_seals_append_only()")
    op.execute("DROP FUNCTION relman_audit_seal_follows()")
    op.execute("ALTER TABLE audit_requests ALTER COLUMN audit_created_at SET DEFAULT now()")
    op.execute("ALTER TABLE audit_logs ALTER COLUMN created_at SET DEFAULT now()")
    op.execute("DROP TRIGGER assign_xid ON audit_logs")
    op.execute("DROP FUNCTION relman_audit_assign_xid()")
    op.execute("DROP INDEX ix_audit_logs_sequence")
    op.execute("ALTER TABLE audit_logs DROP COLUMN sequence")
    op.execute("DROP SEQUENCE audit_logs_sequence")
