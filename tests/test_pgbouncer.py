"""relman behind a real PgBouncer in transaction mode (docker/pgbouncer.ini, its defaults).

Both services connect through PgBouncer with DB_STATEMENT_CACHE=0 and deploy_svc's
LISTEN goes to PostgreSQL itself (DATABASE_LISTEN_URL), as the README says to run them.
The life of a release (the README's block), a 10,000-row LogActions stream, an export,
a watch and 32 concurrent reads and LogActions all work through it; the sessions are
bounded by the runtime role's defaults; readiness follows PostgreSQL refusing
PgBouncer, and SERVING means calls work. Without a pgbouncer binary these tests are
skipped, saying so (tests.pgbouncer).
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import URL

from relman.v1 import audit_pb2, audit_pb2_grpc, common_pb2, deploy_pb2
from shared import PROJECT_ROOT
from shared.devtools.seed import seed, seed_id
from shared.framework.server import READINESS_INTERVAL_S, READINESS_PING_TIMEOUT_S
from shared.persistence import roles
from shared.persistence.db import Database, connect_arguments, libpq_dsn
from shared.persistence.roles import RUNTIME_ROLE, SESSION_BOUNDS
from tests.deploying import DEV, Client
from tests.harness import (
    RelmanProcess,
    bearer,
    check_life_of_a_release,
    client_address,
    env_for,
    mint_tokens,
    owner_url,
    run_cli,
    runtime_url,
    scratch_database,
    start_service,
)
from tests.pgbouncer import PgBouncer, PgBouncerMissing, find_pgbouncer, running_pgbouncer

# PgBouncer waits this long after a failed server login before it tries again (its
# default server_login_retry, which docker/pgbouncer.ini keeps).
SERVER_LOGIN_RETRY_S = 15
# Readiness checks every READINESS_INTERVAL_S; a check gives up after the ping timeout.
# The next check after the refusal, its ping's timeout, and room for a busy machine.
READINESS_BOUND_S = READINESS_INTERVAL_S + READINESS_PING_TIMEOUT_S + 4


@pytest.fixture(scope="module")
def pgbouncer_installed() -> None:
    try:
        find_pgbouncer()
    except PgBouncerMissing as missing:
        pytest.skip(str(missing))


@dataclass
class Bounced:
    """A seeded database, a PgBouncer in front of it, both services through it."""

    url: URL  # the database itself, as the server's superuser
    bouncer: PgBouncer
    deploy: RelmanProcess
    audit: RelmanProcess
    deploy_channel: grpc.aio.Channel
    audit_channel: grpc.aio.Channel
    tokens: dict[str, str]


def behind_pgbouncer(url: URL) -> dict[str, str]:
    """The settings of a service behind PgBouncer, as the README gives them: LISTEN on
    `url`'s database itself."""
    return {
        "DB_STATEMENT_CACHE": "0",
        "DATABASE_LISTEN_URL": libpq_dsn(runtime_url(url)),
    }


@pytest.fixture(scope="module")
async def bounced(pgbouncer_installed, server_url) -> AsyncIterator[Bounced]:
    async with scratch_database(server_url) as url, running_pgbouncer(url) as bouncer:
        await seed(url)
        tokens = await mint_tokens(url, ["admin"], "pgbouncer")
        through = bouncer.url_through(url)
        deploy, audit = await asyncio.gather(
            start_service(through, "deploy_svc", **behind_pgbouncer(url)),
            start_service(through, "audit_svc", **behind_pgbouncer(url)),
        )
        try:
            async with (
                grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
                grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
            ):
                yield Bounced(url, bouncer, deploy, audit, dch, ach, tokens)
        finally:
            codes = await asyncio.gather(deploy.stop(), audit.stop())
            assert codes == [0, 0], deploy.output + audit.output


async def readiness(channel: grpc.aio.Channel, service: str) -> str:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def until_readiness(channel, service: str, status: str, within_s: float) -> float:
    """Seconds until the health service reports `status` for `service`, polled."""
    started = time.monotonic()
    async with asyncio.timeout(within_s):
        while await readiness(channel, service) != status:  # noqa: ASYNC110 - polled, bounded
            await asyncio.sleep(0.05)
    return time.monotonic() - started


def _life_of_a_release() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    return next(block for block in blocks if "ApproveDeployment" in block)


async def test_the_life_of_a_release_runs_through_pgbouncer(bounced):
    """The README's block, as written, against deploy_svc behind PgBouncer; and readiness
    SERVING there means what it says (it did while every call failed)."""
    assert await readiness(bounced.deploy_channel, "relman.v1.DeployService") == "SERVING"
    script = _life_of_a_release().replace(
        "localhost:50051", client_address(bounced.deploy.addresses["deploy_svc"])
    )
    process = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, env=env_for(bounced.url), cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    printed = out.decode()
    assert process.returncode == 0, f"{err.decode()}\n{bounced.deploy.output[-3000:]}"
    check_life_of_a_release(printed)


async def test_a_10000_row_stream_an_export_and_a_watch_through_pgbouncer(bounced):
    audit = audit_pb2_grpc.AuditServiceStub(bounced.audit_channel)
    service_auth = bearer(bounced.tokens["ci-bot"])
    tag = f"pgbouncer-{uuid.uuid4().hex[:8]}"

    def batches():
        for first in range(0, 10_000, 1_000):
            yield audit_pb2.LogActionsRequest(
                actions=[
                    audit_pb2.LogActionRequest(
                        action="bulk.import", resource_type="row", resource_id=tag,
                        details={"n": n},
                    )
                    for n in range(first, first + 1_000)
                ]
            )  # fmt: skip

    stored = await audit.LogActions(batches(), metadata=service_auth, timeout=120)
    assert stored.count == 10_000

    request = audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id=tag))
    text = "".join(
        [
            chunk.data
            async for chunk in audit.ExportAuditLogs(
                request, metadata=bearer(bounced.tokens["admin"]), timeout=120
            )
        ]
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 10_000 and {row["resource_id"] for row in rows} == {tag}

    admin = Client(bounced.deploy_channel, bounced.tokens["admin"])
    service = await admin.CreateService(
        name=f"svc-{uuid.uuid4().hex[:8]}", team_id=str(seed_id("team", "Platform"))
    )
    release = await admin.CreateRelease(service_id=service.id, version="1.0.0")
    deployment = await admin.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    watch = admin.stub.WatchDeployment(
        deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
        metadata=admin.auth,
        timeout=60,
    )
    await watch.read()  # open: no change is missed from here on
    for stage in deployment.stages:
        for status in (common_pb2.STAGE_STATUS_RUNNING, common_pb2.STAGE_STATUS_SUCCEEDED):
            await admin.UpdatePipelineStage(stage_id=stage.id, status=status)
    last = None
    while (message := await watch.read()) is not grpc.aio.EOF:  # it ends at a terminal status
        last = message
    assert last.status == common_pb2.DEPLOYMENT_STATUS_SUCCEEDED
    assert all(s.status == common_pb2.STAGE_STATUS_SUCCEEDED for s in last.stages)


async def test_32_concurrent_reads_and_log_actions_through_pgbouncer(bounced):
    """Reads (no transaction) and the group commit share 8 server connections among the
    services' pooled connections: no statement depends on which server connection
    PgBouncer hands its next message to (named statements did: "prepared statement ...
    does not exist")."""
    audit = audit_pb2_grpc.AuditServiceStub(bounced.audit_channel)
    deploy = Client(bounced.deploy_channel, bounced.tokens["admin"])
    service_auth, admin_auth = bearer(bounced.tokens["ci-bot"]), bearer(bounced.tokens["admin"])
    tag = f"busy-{uuid.uuid4().hex[:8]}"

    async def caller(n: int) -> None:
        for i in range(15):
            await audit.LogAction(
                audit_pb2.LogActionRequest(
                    action="busy.call", resource_type="caller", resource_id=tag,
                    details={"caller": n, "i": i},
                ),
                metadata=service_auth, timeout=30,
            )  # fmt: skip
            page = await audit.ListAuditLogs(
                audit_pb2.ListAuditLogsRequest(
                    filter=audit_pb2.AuditLogFilter(resource_id=tag), page_size=5
                ),
                metadata=admin_auth,
                timeout=30,
            )
            assert page.audit_logs
            await deploy.ListEnvironments(page_size=10)

    await asyncio.gather(*(caller(n) for n in range(32)))
    connection = await asyncpg.connect(libpq_dsn(bounced.url))
    try:
        logged = await connection.fetchval(
            "SELECT count(*) FROM audit_logs WHERE resource_id = $1 AND action = 'busy.call'", tag
        )
        servers = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND usename = $1 AND application_name NOT LIKE '%listen'",
            RUNTIME_ROLE,
        )
    finally:
        await connection.close()
    assert logged == 32 * 15
    clients = await bounced.bouncer.admin("SHOW CLIENTS")
    # The services' pools opened more connections to PgBouncer than it has to PostgreSQL.
    assert servers <= 8 < len([c for c in clients if c["user"] == RUNTIME_ROLE]), (servers, clients)


async def test_the_tokens_command_line_works_with_the_services_settings(bounced):
    """An operator runs the command line with the services' environment: behind PgBouncer
    it must connect as they do, not fail on a startup parameter PgBouncer refuses."""
    env = env_for(bounced.bouncer.url_through(bounced.url), **behind_pgbouncer(bounced.url))
    listing = await asyncio.to_thread(
        run_cli, bounced.url, "shared.identity.tokens", "list", "--user", "admin", env=env
    )
    assert listing.returncode == 0, listing.stderr
    assert "pgbouncer" in listing.stdout  # the token the fixture minted for admin


async def test_sessions_through_pgbouncer_are_bounded_by_the_roles_defaults(bounced):
    """No startup parameter PgBouncer refuses; the bounds come from the runtime role, and
    a service whose role lacks them says so at start-up."""
    through = runtime_url(bounced.bouncer.url_through(bounced.url))
    database = Database(through, pool_size=2, statement_cache=False, application_name="t")
    try:
        # The probe connects as the pool does; only its application_name differs.
        pool_arguments = connect_arguments(through, statement_cache=False, application_name="t")
        assert database.probe_arguments == {
            **pool_arguments,
            "server_settings": {"application_name": "t probe"},
        }
        assert pool_arguments["server_settings"] == {"application_name": "t"}
        async with database.autocommit_connection(5) as connection:
            shown = {name: await connection.fetchval(f"SHOW {name}") for name in SESSION_BOUNDS}
            assert await roles.unbounded_settings(connection) == []
        await database.ping(5)
    finally:
        await database.dispose()
    assert shown == {  # as PostgreSQL shows 60s, 120s and 250ms
        "statement_timeout": "1min",
        "idle_in_transaction_session_timeout": "2min",
        "client_connection_check_interval": "250ms",
    }
    assert not [line for line in bounced.audit.lines if "run without" in line]

    # The owner role has no such defaults: a service running as it warns, naming the fix.
    owner = libpq_dsn(owner_url(bounced.bouncer.url_through(bounced.url)))
    process = await start_service(
        bounced.url, "audit_svc", DATABASE_URL=owner, DB_STATEMENT_CACHE="0"
    )
    try:
        line = await process.wait_for_line("run without")
    finally:
        assert await process.stop() == 0, process.output
    assert "statement_timeout" in line and "idle_in_transaction_session_timeout" in line
    assert "ALTER ROLE relman_owner SET statement_timeout = '60s'" in line


async def test_settings_for_postgresql_itself_behind_pgbouncer_stop_the_start_in_one_line(
    bounced,
):
    """DB_STATEMENT_CACHE left on behind PgBouncer: the startup parameters it refuses.
    The start-up check connects as the pool does, so the process says why and exits 2
    (before, the check passed and the first pooled connection failed)."""
    env = env_for(bounced.bouncer.url_through(bounced.url), AUDIT_SVC_ADDR="127.0.0.1:0")
    process = await RelmanProcess.start(["-m", "audit_svc"], env)
    assert await process.wait(within_s=30) == 2, process.output
    assert len(process.lines) == 1, process.output
    assert process.lines[0].startswith("audit_svc: cannot reach the database ")
    assert "unsupported startup parameter: statement_timeout" in process.lines[0]


def test_the_compose_database_gives_the_runtime_role_its_session_bounds():
    init = (PROJECT_ROOT / "docker/postgres-init.sh").read_text()
    for statement in roles.session_bound_statements(RUNTIME_ROLE):
        assert f"{statement};" in init, statement


async def test_readiness_follows_postgresql_refusing_pgbouncer(pgbouncer_installed, server_url):
    """PgBouncer stays up while PostgreSQL refuses it (the database closed to new
    connections, its server connections ended): readiness turns NOT_SERVING within a
    check and calls fail UNAVAILABLE; once PostgreSQL accepts again, SERVING returns,
    and calls work again."""
    async with scratch_database(server_url) as url, running_pgbouncer(url) as bouncer:
        tokens = await mint_tokens(url, [], "refusal")
        process = await start_service(
            bouncer.url_through(url), "audit_svc", **behind_pgbouncer(url)
        )
        admin = await asyncpg.connect(libpq_dsn(server_url))  # another database of the server
        try:
            async with grpc.aio.insecure_channel(
                client_address(process.addresses["audit_svc"])
            ) as channel:
                audit = audit_pb2_grpc.AuditServiceStub(channel)

                async def log_action():
                    return await audit.LogAction(
                        audit_pb2.LogActionRequest(
                            action="probe.call", resource_type="t", resource_id="r"
                        ),
                        metadata=bearer(tokens["ci-bot"]),
                        timeout=10,
                    )

                assert await readiness(channel, "relman.v1.AuditService") == "SERVING"
                await log_action()

                await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    url.database,
                )
                took = await until_readiness(
                    channel, "relman.v1.AuditService", "NOT_SERVING", READINESS_BOUND_S
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await log_action()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

                await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')
                back = await until_readiness(
                    channel,
                    "relman.v1.AuditService",
                    "SERVING",
                    SERVER_LOGIN_RETRY_S + READINESS_BOUND_S + 2,
                )
                await log_action()
        finally:
            await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')
            await admin.close()
            assert await process.stop() == 0, process.output
    print(f"NOT_SERVING after {took:.1f} s, SERVING again after {back:.1f} s")
