"""The two database roles: an owner that migrates and seeds, and the services' own.

The services connect as a runtime role that is not a superuser and owns nothing of
relman's. On `audit_logs` it holds INSERT and SELECT only, so with the services'
own credentials UPDATE, DELETE, TRUNCATE, `ALTER TABLE ... DISABLE TRIGGER` and
DROP all fail: the append-only trigger is not the only guard, and nobody holding
the services' credentials can switch it off. On every other table it may read and
write (it records deployments, approvals and users). The owner role owns the
schema; migrations and the seed run as it. `grant_runtime` runs after every
migration, so tables added later are covered too.

On audit_logs' monthly partitions it holds nothing (rows reach them through
audit_logs, whose grants are the ones checked), and it makes none itself: it may only
call `relman_audit_partitions_ahead`, which makes the next months' as the owner.

It may not choose a row's `created_at` or `sequence` either (its INSERT grant leaves
those columns out), so it cannot backdate a row or slip one into a sealed range; on
audit_seals it holds INSERT and SELECT only. What it can still do, since it is what relman
writes with: append rows that claim to be relman's own, now.

`trail_exposure` tells a starting service what its own role could do to the trail
(superuser, owner, UPDATE...), so that a deployment with one all-powerful URL is
visible: a WARNING line and `relman_audit_trail_protected 0`.

The runtime role also carries the bounds of its sessions as role defaults
(`SESSION_BOUNDS`, `ALTER ROLE ... SET`), set where the role is made (the embedded
database, docker/postgres-init.sh, the tests) and by operators (README). Connected to
PostgreSQL itself, the services send the same values as startup parameters; behind
PgBouncer, which refuses those parameters, the role's defaults are what bounds a
session, at no cost per transaction. `unbounded_settings` tells a starting service
which of them its sessions lack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import asyncpg

from shared.persistence.models import AUDIT_PARTITION, AuditLog

# The embedded database's and docker-compose's role names (any names work elsewhere).
OWNER_ROLE = "relman_owner"
RUNTIME_ROLE = "relman_app"


# What bounds every session of the runtime role: a statement no deadline bounds (60 s);
# a transaction a client holds open between messages (120 s: a LogActions stream ends
# itself after AUDIT_STREAM_IDLE_S, at most 90 s; past this the server ends the session,
# so a stuck caller cannot pin a pooled connection and its locks for ever); and how
# often the server looks whether the client of a running statement is still there
# (250 ms: a statement whose call gave up stops even when asyncpg's cancel request loses
# the race with closing the connection, waiting on a lock included).
SESSION_BOUNDS = {
    "statement_timeout": "60s",
    "idle_in_transaction_session_timeout": "120s",
    "client_connection_check_interval": "250ms",
}


def quote(identifier: str) -> str:
    """A role name as an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


# Every column of an audit row but its time and its sequence, which the database sets.
_AUDIT_INSERT_COLUMNS = ", ".join(
    c.name for c in AuditLog.__table__.columns if c.name not in ("created_at", "sequence")
)


_PARTITION_PATTERN = "^" + AUDIT_PARTITION.pattern + "$"


def _literal(value: str) -> str:
    """`value` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def grant_statements(runtime_role: str, database: str) -> list[str]:
    """What the owner grants the runtime role, in the database and schema it owns."""
    role = quote(runtime_role)
    return [
        # Nobody else may connect, or create objects relman's own SQL could pick up.
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f"REVOKE ALL ON DATABASE {quote(database)} FROM PUBLIC",
        f"GRANT CONNECT ON DATABASE {quote(database)} TO {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
        # The trail only grows, stamped with the database's time. ALL first: a stray
        # grant (TRUNCATE, TRIGGER, an operator's GRANT ALL) goes with the next migration.
        f"REVOKE ALL ON audit_logs FROM {role}",
        f"GRANT SELECT, INSERT ({_AUDIT_INSERT_COLUMNS}) ON audit_logs TO {role}",
        # Rows reach a month's partition through audit_logs, whose grants are the only
        # ones checked then: the partitions themselves it may not touch (the grant on
        # ALL TABLES above reached them too, as it reaches a partition retention has
        # detached and not yet dropped: hence by name, not through pg_inherits).
        f"""DO $$ DECLARE part regclass; BEGIN
            FOR part IN SELECT c.oid::regclass FROM pg_class c
                        JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = 'public' AND c.relkind = 'r'
                          AND c.relname ~ '{_PARTITION_PATTERN}'
            LOOP
                EXECUTE format('REVOKE ALL ON %s FROM %I', part, {_literal(runtime_role)});
            END LOOP;
        END $$""",
        # It keeps partitions ahead of time through the one function that can make them.
        f"GRANT EXECUTE ON FUNCTION relman_audit_partitions_ahead(integer) TO {role}",
        # A request id, once claimed, stays claimed (retention removes it with its row).
        # Nor may it date a claim (audit_created_at points a retry at its row's month).
        f"REVOKE ALL ON audit_requests FROM {role}",
        f"GRANT SELECT, INSERT (request_id, audit_id) ON audit_requests TO {role}",
        # Every environment keeps its policy (the votes trigger counts on it); a change
        # to one is an UPDATE the domain audits.
        f"REVOKE DELETE ON environment_policies FROM {role}",
        # A request id's caller, method and hash never change; the first call fills in
        # its answer. The role still inserts keys and purges old ones: whoever holds its
        # credentials can replace a key, and so point a retry at another row of the same
        # kind, which that role could read anyway; nothing more.
        f"REVOKE UPDATE ON idempotency_keys FROM {role}",
        f"GRANT UPDATE (resource_type, resource_id) ON idempotency_keys TO {role}",
        # The column's default takes values as the inserting role (USAGE) and the sealer
        # reads the last one handed out (SELECT); setval (UPDATE) would let it hand out
        # numbers already sealed.
        f"REVOKE ALL ON SEQUENCE audit_logs_sequence FROM {role}",
        f"GRANT USAGE, SELECT ON SEQUENCE audit_logs_sequence TO {role}",
        # Seals are written once and never changed, like the rows they seal.
        f"REVOKE ALL ON audit_seals FROM {role}",
        f"GRANT SELECT, INSERT ON audit_seals TO {role}",
        # The DORA facts follow the deployments (migration 012's triggers), nothing else.
        f"REVOKE ALL ON deployment_outcomes, deployment_outcomes_derived FROM {role}",
        f"GRANT SELECT ON deployment_outcomes, deployment_outcomes_derived TO {role}",
        f"REVOKE ALL ON alembic_version FROM {role}",
        f"GRANT SELECT ON alembic_version TO {role}",
    ]


async def grant_runtime(connection: asyncpg.Connection, runtime_role: str) -> None:
    """Grants the runtime role its privileges (as the owner, after migrating)."""
    database = await connection.fetchval("SELECT current_database()")
    async with connection.transaction():
        for statement in grant_statements(runtime_role, database):
            await connection.execute(statement)


# What the connected role could do to audit_logs beyond appending and reading. A
# superuser counts as a member of every role; CREATEROLE can grant itself the owner's
# role; the schema's or the database's owner can drop them with the table inside; CREATE
# in the schema can shadow an operator or function the owner's migrations then run;
# the server-file roles can rewrite the data files.
_EXPOSURE = """
SELECT r.rolsuper AS superuser,
       r.rolcreaterole AS createrole,
       pg_has_role(current_user, c.relowner, 'MEMBER') AS owner,
       pg_has_role(current_user, n.nspowner, 'MEMBER') AS schema_owner,
       pg_has_role(current_user, d.datdba, 'MEMBER') AS database_owner,
       has_schema_privilege(n.oid, 'CREATE') AS create_in_schema,
       pg_has_role(current_user, 'pg_write_server_files', 'MEMBER')
         OR pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER') AS server_files,
       has_any_column_privilege(c.oid, 'UPDATE') AS update,
       has_table_privilege(c.oid, 'DELETE') AS delete,
       has_table_privilege(c.oid, 'TRUNCATE') AS truncate,
       has_table_privilege(c.oid, 'TRIGGER') AS trigger,
       has_column_privilege(c.oid, 'created_at', 'INSERT') AS backdate,
       EXISTS (SELECT FROM pg_class p
               WHERE p.relnamespace = n.oid AND p.relkind = 'r' AND p.relname ~ $1
                 AND (has_any_column_privilege(p.oid, 'INSERT')
                      OR has_any_column_privilege(p.oid, 'UPDATE')
                      OR has_table_privilege(p.oid, 'DELETE, TRUNCATE, TRIGGER'))) AS partitions
FROM pg_roles r, pg_database d, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE r.rolname = current_user AND d.datname = current_database()
  AND c.oid = 'audit_logs'::regclass
"""
_EXPOSURE_WORDS = {
    "superuser": "is a superuser",
    "createrole": "has CREATEROLE",
    "owner": "owns audit_logs (ALTER TABLE ... DISABLE TRIGGER, DROP)",
    "schema_owner": "owns its schema (DROP SCHEMA ... CASCADE)",
    "database_owner": "owns the database (DROP DATABASE)",
    "create_in_schema": "may CREATE in its schema",
    "server_files": "may write server files or run server programs",
    "update": "may UPDATE",
    "delete": "may DELETE",
    "truncate": "may TRUNCATE",
    "trigger": "may create triggers on it",
    "backdate": "may set created_at (backdate rows)",
    "partitions": "may write to, delete from or truncate its monthly partitions directly",
}


async def trail_exposure(connection: asyncpg.Connection) -> list[str]:
    """What the connected role could do to the audit trail; empty when it is protected."""
    row = await connection.fetchrow(_EXPOSURE, _PARTITION_PATTERN)
    return [words for key, words in _EXPOSURE_WORDS.items() if row[key]]


def session_bound_statements(role: str, names: Iterable[str] = SESSION_BOUNDS) -> list[str]:
    """`ALTER ROLE ... SET` for each of SESSION_BOUNDS in `names` (as a superuser, or a
    role with CREATEROLE): what README tells operators to run for the runtime role."""
    name = role if re.fullmatch(r"[a-z_][a-z0-9_]*", role) else quote(role)
    return [f"ALTER ROLE {name} SET {bound} = '{SESSION_BOUNDS[bound]}'" for bound in names]


async def set_session_bounds(connection: asyncpg.Connection, role: str) -> None:
    """Gives `role` the defaults of SESSION_BOUNDS it lacks. Only the missing ones: two
    processes altering the same role at once may fail ("tuple concurrently updated")."""
    current = await connection.fetchval(
        "SELECT setconfig FROM pg_db_role_setting"
        " WHERE setrole = (SELECT oid FROM pg_roles WHERE rolname = $1) AND setdatabase = 0",
        role,
    )
    present = set(current or ())
    missing = [name for name, value in SESSION_BOUNDS.items() if f"{name}={value}" not in present]
    for statement in session_bound_statements(role, missing):
        await connection.execute(statement)


async def unbounded_settings(connection: asyncpg.Connection) -> list[str]:
    """Which of SESSION_BOUNDS the connection's session runs without (0: disabled)."""
    rows = await connection.fetch(
        "SELECT name FROM pg_settings WHERE name = ANY($1::text[]) AND setting = '0' ORDER BY name",
        list(SESSION_BOUNDS),
    )
    return [row["name"] for row in rows]
