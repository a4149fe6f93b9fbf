"""Test harness: a real PostgreSQL, a fresh database per test run.

The server is the one DATABASE_URL names (its database is only used to connect
for CREATE/DROP DATABASE) or, with DATABASE_URL unset, the embedded PostgreSQL
under .data/. Every run creates `relman_test_<random>`, migrates it to head and
drops it at the end; tests that need a database of their own (migration
round-trips, seed counts) use `scratch_database`.

pytest-asyncio runs every test and fixture in one session-wide event loop
(pyproject.toml), so engines and channels made in fixtures are usable in tests.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import schema
from shared.db import create_engine, database_url, libpq_dsn


@asynccontextmanager
async def scratch_database(server: URL, *, revision: str | None = "head") -> AsyncIterator[URL]:
    """A new database on `server`, migrated to `revision` (None: left empty), dropped after."""
    name = f"relman_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(libpq_dsn(server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = server.set(database=name)
    try:
        if revision is not None:
            await asyncio.to_thread(schema.upgrade, url, revision)
        yield url
    finally:
        admin = await asyncpg.connect(libpq_dsn(server))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def env_for(url: URL) -> dict[str, str]:
    """The environment for a subprocess (CLI, server) that should use database `url`."""
    return {**os.environ, "DATABASE_URL": libpq_dsn(url)}


@pytest.fixture(scope="session")
def server_url() -> URL:
    """The PostgreSQL server under test: DATABASE_URL's, or the embedded one."""
    return database_url()


@pytest.fixture(scope="session")
async def db_url(server_url: URL) -> AsyncIterator[URL]:
    """This run's own database, migrated to head."""
    async with scratch_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
async def engine(db_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(db_url, pool_size=5)
    yield engine
    await engine.dispose()
