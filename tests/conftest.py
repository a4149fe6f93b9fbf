"""Test fixtures: a real PostgreSQL, a fresh database per test run, real relman processes.

The server is the one DATABASE_URL names (its database is only used to connect
for CREATE/DROP DATABASE) or, with DATABASE_URL unset, the embedded PostgreSQL
under .data/. Every run creates `relman_test_<random>`, migrates it to head and
drops it at the end; tests that need a database of their own use
`tests.harness.scratch_database`.

pytest-asyncio runs every test and fixture in one session-wide event loop
(pyproject.toml), so engines, processes and channels made in fixtures are
usable in every test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import URL

from shared.db import database_url
from tests.harness import RelmanProcess, client_address, env_for, scratch_database


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
async def relman(db_url: URL) -> AsyncIterator[RelmanProcess]:
    """Both services started the way `make run` starts them, on free ports, seeded database."""
    process = await RelmanProcess.start(
        ["-m", "shared.run"],
        env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0", AUDIT_SVC_ADDR="127.0.0.1:0"),
    )
    try:
        await process.wait_listening("deploy_svc", "audit_svc")
        yield process
    finally:
        code = await process.stop()
        assert code == 0, process.output


@pytest.fixture(scope="session")
async def deploy_channel(relman: RelmanProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(client_address(relman.addresses["deploy_svc"])) as ch:
        yield ch


@pytest.fixture(scope="session")
async def audit_channel(relman: RelmanProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(client_address(relman.addresses["audit_svc"])) as ch:
        yield ch
