"""Alembic from Python: the migration chain's head and upgrading a database to it.

Alembic's env.py runs its own event loop (asyncio.run), so these helpers are
synchronous; async callers run them in a worker thread (asyncio.to_thread).
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import URL

from shared import PROJECT_ROOT


def alembic_config(url: URL | None = None) -> Config:
    """The project's Alembic config, aimed at `url` (default: shared.db.database_url())."""
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


def upgrade(url: URL, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: URL, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
