"""The migration chain: one linear history, a clean round trip, and models that match it."""

from __future__ import annotations

import asyncio
import re

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL

from shared.persistence import schema
from shared.persistence.db import create_engine, libpq_dsn
from shared.persistence.models import Base, described_here
from tests.harness import scratch_database

REVISION_ID = re.compile(r"^(\d{3})_[a-z0-9_]+$")


def test_one_linear_chain_with_a_single_head():
    script = ScriptDirectory.from_config(schema.alembic_config())
    assert len(script.get_heads()) == 1
    # Walk from the head down: each revision is NNN_topic, numbered one below its child.
    revisions = list(script.walk_revisions())
    numbers = []
    for revision in revisions:
        match = REVISION_ID.match(revision.revision)
        assert match, f"revision id {revision.revision!r} is not NNN_topic"
        numbers.append(int(match.group(1)))
        assert not isinstance(revision.down_revision, tuple), "no merge revisions"
    assert numbers == list(range(len(numbers), 0, -1))
    assert revisions[-1].revision == "001_initial_schema"
    assert revisions[-1].down_revision is None


SNAPSHOT_QUERY = """
SELECT 'relation', c.relkind::text || ':' || c.relname FROM pg_class c
  WHERE c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT 'constraint', conrelid::regclass::text || ':' || conname || ':' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'column', table_name || '.' || column_name || ':' || data_type || ':' || is_nullable
       || ':' || coalesce(column_default, '')
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'function', proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'type', typname FROM pg_type
  WHERE typnamespace = 'public'::regnamespace AND typtype IN ('e', 'd', 'c') AND typrelid = 0
UNION ALL
SELECT 'trigger', tgrelid::regclass::text || ':' || tgname FROM pg_trigger
  WHERE NOT tgisinternal
"""


async def _snapshot(url: URL) -> set[tuple[str, str]]:
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        return {tuple(row) for row in await connection.fetch(SNAPSHOT_QUERY)}
    finally:
        await connection.close()


async def test_upgrade_downgrade_upgrade_leaves_nothing_behind(server_url: URL):
    async with scratch_database(server_url, revision=None) as url:
        empty = await _snapshot(url)
        await asyncio.to_thread(schema.upgrade, url, "head")
        first = await _snapshot(url)
        assert len(first) > len(empty)

        await asyncio.to_thread(schema.downgrade, url, "base")
        after_downgrade = await _snapshot(url)
        # Only Alembic's own bookkeeping table may remain, and it is empty.
        leftovers = {item for item in after_downgrade - empty if "alembic_version" not in item[1]}
        assert leftovers == set()
        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            assert await connection.fetchval("SELECT count(*) FROM alembic_version") == 0
        finally:
            await connection.close()

        await asyncio.to_thread(schema.upgrade, url, "head")
        assert await _snapshot(url) == first


async def test_models_match_the_migrated_schema(db_url: URL):
    """Alembic's autogenerate finds nothing to do: the models and migrations agree."""
    engine = create_engine(db_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync,
                        opts={
                            "compare_type": True,
                            "compare_server_default": True,
                            "include_name": described_here,
                        },
                    ),
                    Base.metadata,
                )
            )
    finally:
        await engine.dispose()
    assert diff == [], diff


async def test_database_is_at_the_single_head(db_url: URL):
    connection = await asyncpg.connect(libpq_dsn(db_url))
    try:
        assert await connection.fetchval("SELECT version_num FROM alembic_version") == (
            schema.head_revision()
        )
    finally:
        await connection.close()
