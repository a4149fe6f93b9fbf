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

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import URL, select

from relman.v1 import auth_pb2, auth_pb2_grpc
from shared.devtools.seed import seed_id
from shared.identity.tokens import issue_token
from shared.persistence.db import Database
from shared.persistence.models import Role, Service, User
from tests import harness
from tests.deploying import Client
from tests.harness import RelmanProcess, client_address, env_for, run_cli, scratch_database

# A seeded user of each role (the service user is made by the tokens CLI).
USER_OF_ROLE = {
    Role.ADMIN: "admin",
    Role.LEAD: "lena",
    Role.DEVELOPER: "priya",
    Role.VIEWER: "victor",
    Role.SERVICE: "ci-bot",
}


@pytest.fixture(scope="session")
def server_url() -> URL:
    """The PostgreSQL server under test (tests.harness.server_url)."""
    return harness.server_url()


@pytest.fixture(scope="session")
async def db_url(server_url: URL) -> AsyncIterator[URL]:
    """This run's own database, migrated to head."""
    async with scratch_database(server_url) as url:
        yield url


@pytest.fixture(scope="session")
async def relman(db_url: URL) -> AsyncIterator[RelmanProcess]:
    """Both services started the way `make run` starts them, on free ports, seeded database."""
    process = await RelmanProcess.start(
        ["-m", "shared.devtools.run"],
        env_for(
            db_url,
            DEPLOY_SVC_ADDR="127.0.0.1:0",
            AUDIT_SVC_ADDR="127.0.0.1:0",
            SEED="1",
            # Every test calls from 127.0.0.1, and many fail logins on purpose: the login
            # throttle is tested on processes of its own (tests/test_insiders_identity.py).
            LOGIN_FAILURES_PER_PEER="100000",
            LOGIN_FAILURES_PER_USER="1000",
        ),
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


@pytest.fixture(scope="session")
async def database(relman: RelmanProcess, db_url: URL) -> AsyncIterator[Database]:
    """The test run's database, migrated and seeded (by `make run`'s path)."""
    database = Database(db_url, pool_size=2)
    yield database
    await database.dispose()


@pytest.fixture(scope="session")
async def tokens(database: Database, db_url: URL) -> dict[Role, str]:
    """A bearer token for a user of each role."""
    result = run_cli(
        db_url,
        "shared.identity.tokens",
        "create",
        "--user",
        USER_OF_ROLE[Role.SERVICE],
        "--name",
        "tests",
        "--service-user",
    )
    assert result.returncode == 0, result.stderr
    minted = {Role.SERVICE: result.stdout.strip()}
    async with database.transaction() as session:
        for role, username in USER_OF_ROLE.items():
            if role != Role.SERVICE:
                user = await session.scalar(select(User).where(User.username == username))
                minted[role], _ = await issue_token(session, user, "tests", None)
    return minted


@pytest.fixture(scope="session")
async def marco_token(deploy_channel) -> str:
    """A login token of marco, the lead who is not the seeded `tokens` lead (lena)."""
    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    response = await stub.Login(auth_pb2.LoginRequest(username="marco", password="password123"))
    return response.access_token


@pytest.fixture(scope="session")
def clients(deploy_channel, tokens, marco_token) -> dict[str, Client]:
    """DeployService as a developer (priya), a lead (lena), a reviewing lead (marco), an
    admin and a viewer."""
    return {
        "developer": Client(deploy_channel, tokens[Role.DEVELOPER]),
        "lead": Client(deploy_channel, tokens[Role.LEAD]),
        "reviewer": Client(deploy_channel, marco_token),
        "admin": Client(deploy_channel, tokens[Role.ADMIN]),
        "viewer": Client(deploy_channel, tokens[Role.VIEWER]),
    }


@pytest.fixture
async def service_id(database: Database) -> str:
    """A service of its own for each test, so that tests never share deployments."""
    async with database.transaction() as session:
        service = Service(name=f"svc-{uuid.uuid4().hex[:10]}", team_id=seed_id("team", "Platform"))
        session.add(service)
        await session.flush()
        return str(service.id)
