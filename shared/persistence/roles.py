"""The two database roles: an owner that migrates and seeds, and the services' own.

The services connect as a runtime role that is not a superuser and owns nothing of
relman's. On `audit_logs` it holds INSERT and SELECT only, so with the services'
own credentials UPDATE, DELETE, TRUNCATE, `ALTER TABLE ... DISABLE TRIGGER` and
DROP all fail: the append-only trigger is not the only guard, and nobody holding
the services' credentials can switch it off. On every other table it may read and
write (it records deployments, approvals and users). The owner role owns the
schema; migrations and the seed run as it. `grant_runtime` runs after every
migration, so tables added later are covered too.

It may not choose a row's `created_at` either (its INSERT grant leaves that column
out), so it cannot backdate a row. What it can still do, since it is what relman
writes with: append rows that claim to be relman's own, now.

`trail_exposure` tells a starting service what its own role could do to the trail
(superuser, owner, UPDATE...), so that a deployment with one all-powerful URL is
visible: a WARNING line and `relman_audit_trail_protected 0`.
"""

from __future__ import annotations

import asyncpg

from shared.persistence.models import AuditLog

# The embedded database's and docker-compose's role names (any names work elsewhere).
OWNER_ROLE = "relman_owner"
RUNTIME_ROLE = "relman_app"


def quote(identifier: str) -> str:
    """A role name as an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


# Every column of an audit row but its time, which the database sets (now()).
_AUDIT_INSERT_COLUMNS = ", ".join(
    c.name for c in AuditLog.__table__.columns if c.name != "created_at"
)


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
        # The trail only grows, stamped with the database's time; TRUNCATE, TRIGGER and
        # REFERENCES were never granted.
        f"REVOKE INSERT, UPDATE, DELETE ON audit_logs FROM {role}",
        f"GRANT INSERT ({_AUDIT_INSERT_COLUMNS}) ON audit_logs TO {role}",
        f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {role}",
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
       has_column_privilege(c.oid, 'created_at', 'INSERT') AS backdate
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
}


async def trail_exposure(connection: asyncpg.Connection) -> list[str]:
    """What the connected role could do to the audit trail; empty when it is protected."""
    row = await connection.fetchrow(_EXPOSURE)
    return [words for key, words in _EXPOSURE_WORDS.items() if row[key]]
