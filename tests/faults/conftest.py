"""The fault suite's fixtures: its own stoppable PostgreSQL, a seeded database, services.

Every fault test runs real `deploy_svc` / `audit_svc` processes against a cluster
that only this package uses (tests/faults/cluster.py), so stopping the database
or killing a process disturbs nothing else. Each test reports what it tried and
what came of it through `fault_report`; the lines are printed at the end of the
run under "relman fault suite".
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import URL

from shared.devtools.seed import seed, seed_id
from shared.persistence.db import Database
from shared.persistence.models import Service
from tests.faults.cluster import StoppableCluster
from tests.harness import (
    RelmanProcess,
    client_address,
    mint_tokens,
    scratch_database,
    start_service,
)

_REPORT: list[tuple[str, str]] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if _REPORT:
        terminalreporter.section("relman fault suite")
        for test, line in _REPORT:
            terminalreporter.write_line(f"{test}: {line}")


@pytest.fixture
def fault_report(request) -> Callable[[str], None]:
    """Records one line of what the test tried and what came of it."""
    name = request.node.name
    return lambda line: _REPORT.append((name, line))


@pytest.fixture(scope="package")
def cluster() -> Iterator[StoppableCluster]:
    # A short path: the Unix socket's path must stay under about 100 characters.
    root = Path(tempfile.mkdtemp(prefix="relman-faults-"))
    cluster = StoppableCluster(root)
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="package")
async def fault_db(cluster: StoppableCluster) -> AsyncIterator[URL]:
    """A migrated, seeded database on the fault suite's cluster."""
    async with scratch_database(cluster.url) as url:
        await seed(url)
        yield url
        if not cluster.running:  # a failed test may have left it stopped
            cluster.start()


@pytest.fixture(scope="package")
async def fault_tokens(fault_db: URL) -> dict[str, str]:
    """Tokens of ci-bot (service), admin, lena and marco (leads), priya (developer)."""
    return await mint_tokens(fault_db, ["admin", "lena", "marco", "priya"], "faults")


async def new_service_id(url: URL) -> str:
    """A catalogue service of the caller's own, so tests never share deployments."""
    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            service = Service(
                name=f"svc-{uuid.uuid4().hex[:10]}", team_id=seed_id("team", "Platform")
            )
            session.add(service)
            await session.flush()
            return str(service.id)
    finally:
        await database.dispose()


@dataclass
class Services:
    deploy: RelmanProcess
    audit: RelmanProcess
    deploy_channel: grpc.aio.Channel
    audit_channel: grpc.aio.Channel


@asynccontextmanager
async def services(url: URL, **settings: str) -> AsyncIterator[Services]:
    """deploy_svc and audit_svc as processes with `settings`; stopped after (if alive)."""
    deploy = await start_service(url, "deploy_svc", **settings)
    audit = await start_service(url, "audit_svc", **settings)
    try:
        async with (
            grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
            grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
        ):
            yield Services(deploy, audit, dch, ach)
    finally:
        for process in (deploy, audit):
            await process.stop()


def assert_no_internal_errors(running: Services) -> None:
    """No call ended in an unexpected error (INTERNAL) in either process."""
    for process in (running.deploy, running.audit):
        output = process.output
        assert "unexpected error" not in output, output[output.index("unexpected error") :]
