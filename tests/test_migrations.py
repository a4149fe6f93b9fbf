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
from tests.harness import RELEASE_STATUS_MISMATCHES, scratch_database

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


async def test_migration_015_derives_every_release_status_again(server_url: URL):
    """A status the services' own derivation left stale is mended by the upgrade; after it
    the database derives them: both releases' when a deployment moves between them, and
    after a DELETE or a TRUNCATE of deployments."""
    async with scratch_database(server_url, revision="014_partition_owner") as url:
        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            await connection.execute(
                """
                INSERT INTO teams (name) VALUES ('t');
                INSERT INTO users (email, username, hashed_password)
                VALUES ('u@example.com', 'u', 'x');
                INSERT INTO services (name, team_id) SELECT 's', id FROM teams;
                INSERT INTO environments (name, environment_type) VALUES ('dev', 'development');
                INSERT INTO releases (service_id, version, created_by, status)
                SELECT s.id, v.version, u.id, 'in_progress'
                FROM services s, users u, unnest(ARRAY['1.0.0', '1.1.0']) AS v (version);
                INSERT INTO deployments (release_id, service_id, environment_id, status,
                                         deployed_by, deployed_at, completed_at)
                SELECT r.id, r.service_id, e.id, 'succeeded', r.created_by, now(), now()
                FROM releases r, environments e WHERE r.version = '1.0.0';
                """
            )
            statuses = "SELECT version, status FROM releases ORDER BY version"
            stale = [("1.0.0", "in_progress"), ("1.1.0", "in_progress")]
            assert [tuple(row) for row in await connection.fetch(statuses)] == stale

            await asyncio.to_thread(schema.upgrade, url, "head")
            derived = [("1.0.0", "testing"), ("1.1.0", "draft")]
            assert [tuple(row) for row in await connection.fetch(statuses)] == derived

            await connection.execute(
                "UPDATE deployments SET release_id = (SELECT id FROM releases"
                " WHERE version = '1.1.0')"
            )
            moved = [("1.0.0", "draft"), ("1.1.0", "testing")]
            assert [tuple(row) for row in await connection.fetch(statuses)] == moved
            assert await connection.fetch(RELEASE_STATUS_MISMATCHES) == []

            for removal in ("DELETE FROM deployments", "TRUNCATE deployments CASCADE"):
                transaction = connection.transaction()
                await transaction.start()
                await connection.execute(removal)
                drafts = [("1.0.0", "draft"), ("1.1.0", "draft")]
                assert [tuple(row) for row in await connection.fetch(statuses)] == drafts
                await transaction.rollback()
        finally:
            await connection.close()
