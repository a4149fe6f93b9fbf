"""Alembic from Python: the migration chain's head and upgrading a database to it.

Alembic's env.py runs its own event loop (asyncio.run), so these helpers are
synchronous; async callers run them in a worker thread (asyncio.to_thread).

`python -m shared.persistence.schema` (`make migrate`, compose's migrate step) upgrades the
database as its owner (MIGRATION_DATABASE_URL) and grants the services' role
(DATABASE_URL's user, when it is another role) what shared.persistence.roles says.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import URL

from shared import PROJECT_ROOT
from shared.persistence import roles


def alembic_config(url: URL | None = None) -> Config:
    """The project's Alembic config, aimed at `url` (default: the owner's,
    shared.persistence.db.migration_database_url())."""
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    if url is not None:
        config.attributes["database_url"] = url.render_as_string(hide_password=False)
    config.attributes["configure_logging"] = False
    return config


def head_revision() -> str:
    """The single head of the migration chain (a test asserts there is only one)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migration chain must have one head, found {heads}")
    return heads[0]


def upgrade(url: URL, revision: str = "head", runtime_role: str | None = None) -> None:
    """Migrates as `url`'s role; then grants `runtime_role` (if any) its privileges."""
    command.upgrade(alembic_config(url), revision)
    if runtime_role is not None:
        asyncio.run(_grant(url, runtime_role))


async def _grant(url: URL, runtime_role: str) -> None:
    from shared.persistence.db import libpq_dsn

    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        await roles.grant_runtime(connection, runtime_role)
    finally:
        await connection.close()


def runtime_role(owner_url: URL, runtime_url: URL) -> str | None:
    """The services' role when it is not the owner's (None: one role does everything)."""
    runtime = runtime_url.username or ""
    return runtime if runtime and runtime != (owner_url.username or "") else None


def main() -> int:
    from shared.persistence.db import (
        DatabaseUrlError,
        database_url,
        describe,
        migration_database_url,
    )

    try:
        owner, runtime = migration_database_url(), database_url()
    except DatabaseUrlError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2
    role = runtime_role(owner, runtime)
    upgrade(owner, runtime_role=role)
    granted = f"; granted {role} the services' privileges" if role else ""
    print(f"migrated the {describe(owner)} to {head_revision()}{granted}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def downgrade(url: URL, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
