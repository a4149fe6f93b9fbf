"""Both servers as real processes: health, reflection, errors, limits, start-up and shutdown."""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
import socket

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from audit_svc.servicer import AuditServicer
from deploy_svc.auth_servicer import AuthServicer
from deploy_svc.servicer import DeployServicer
from relman.v1 import audit_pb2, auth_pb2, deploy_pb2, deploy_pb2_grpc
from shared import PROJECT_ROOT
from shared.devtools.seed import seed_id
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Role
from tests.harness import (
    RelmanProcess,
    bearer,
    check_life_of_a_release,
    client_address,
    env_for,
    error_details,
    grpcurl,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = {
    "deploy_svc": ["relman.v1.DeployService", "relman.v1.AuthService"],
    "audit_svc": ["relman.v1.AuditService"],
}
DESCRIBED_MESSAGES = {
    "deploy_svc": (
        "relman.v1.Release",
        ["string version = 3;", ".relman.v1.ReleaseStatus status = 4;"],
    ),
    "audit_svc": (
        "relman.v1.AuditLog",
        ["string action = 5;", ".google.protobuf.Struct details = 8;"],
    ),
}
GUIDE_ID = str(seed_id("runbook", "Deployment guide"))


@pytest.fixture(scope="module")
def viewer(tokens):
    """Call metadata of a viewer, who may read the catalogue."""
    return bearer(tokens[Role.VIEWER])


@pytest.mark.parametrize("process_name", list(SERVICES))
async def test_liveness_and_readiness_are_serving(relman, process_name):
    address = client_address(relman.addresses[process_name])
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *SERVICES[process_name]]:
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="relman.v1.Nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("process_name", list(SERVICES))
async def test_grpcurl_lists_and_describes_through_reflection(relman, db_url, process_name):
    address = client_address(relman.addresses[process_name])
    env = env_for(db_url)
    code, out, err = await grpcurl("-plaintext", address, "list", env=env)
    assert code == 0, err
    listed = set(out.split())
    assert set(SERVICES[process_name]) <= listed
    assert "grpc.health.v1.Health" in listed

    service = SERVICES[process_name][0]
    code, out, err = await grpcurl("-plaintext", address, "describe", service, env=env)
    assert code == 0, err
    assert f"service {service.rpartition('.')[2]} {{" in out
    message, fields = DESCRIBED_MESSAGES[process_name]
    code, out, err = await grpcurl("-plaintext", address, "describe", message, env=env)
    assert code == 0, err
    for declaration in fields:
        assert declaration in out


SERVICERS = {
    "relman.v1.DeployService": DeployServicer,
    "relman.v1.AuthService": AuthServicer,
    "relman.v1.AuditService": AuditServicer,
}


def test_every_rpc_of_the_protos_has_an_async_handler():
    """A new RPC in the protos cannot ship unserved (the generated placeholders are sync)."""
    for module in (deploy_pb2, auth_pb2, audit_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                handler = getattr(SERVICERS[service.full_name], method.name)
                assert inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(
                    handler
                ), f"{service.full_name}/{method.name}"


async def test_get_runbook_returns_the_seeded_markdown(deploy_channel, viewer):
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    runbook = await stub.GetRunbook(
        deploy_pb2.GetRunbookRequest(runbook_id=GUIDE_ID), metadata=viewer
    )
    assert runbook.id == GUIDE_ID
    assert runbook.title == "Deployment guide"
    assert runbook.content.startswith("# Deployment guide")
    assert list(runbook.tags) == ["deployment", "guide"]
    assert runbook.created_by == str(seed_id("user", "lena"))
    assert runbook.created_at.seconds > 0


async def test_unknown_runbook_is_not_found_with_its_id(deploy_channel, viewer):
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetRunbook(deploy_pb2.GetRunbookRequest(runbook_id=missing), metadata=viewer)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    info, violations = error_details(failure.value)
    assert info.reason == "RUNBOOK_NOT_FOUND"
    assert info.metadata["runbook_id"] == missing
    assert violations == []


@pytest.mark.parametrize(
    ("runbook_id", "complaint"),
    [
        ("", "is required"),
        ("not-a-uuid", "is not a UUID"),
        ("x\x00y", "is not a UUID"),
        ("{" + GUIDE_ID + "}", "must be a UUID like"),
    ],
)
async def test_malformed_runbook_id_is_a_field_violation(
    deploy_channel, viewer, runbook_id, complaint
):
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetRunbook(deploy_pb2.GetRunbookRequest(runbook_id=runbook_id), metadata=viewer)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, violations = error_details(failure.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert [(v.field, complaint in v.description) for v in violations] == [("runbook_id", True)]


async def test_requests_over_the_size_limit_are_refused(deploy_channel, viewer):
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetRunbook(
            deploy_pb2.GetRunbookRequest(runbook_id="a" * (5 * 1024 * 1024)), metadata=viewer
        )
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server is unharmed.
    runbook = await stub.GetRunbook(
        deploy_pb2.GetRunbookRequest(runbook_id=GUIDE_ID), metadata=viewer
    )
    assert runbook.title == "Deployment guide"


async def _blocked_on(connection: asyncpg.Connection, table: str) -> int:
    """How many other backends wait for a lock with a query on `table`."""
    # Inside a transaction pg_stat_activity is a snapshot: take a fresh one each time.
    await connection.execute("SELECT pg_stat_clear_snapshot()")
    return await connection.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query ILIKE $1 AND pid <> pg_backend_pid()",
        f"%{table}%",
    )


async def _blocked_on_none(connection: asyncpg.Connection) -> bool:
    return await _blocked_on(connection, "runbooks") == 0


async def _poll(condition, within_s: float = 30) -> None:
    """Polls an async condition until it holds (the database has no event for it)."""
    async with asyncio.timeout(within_s):
        while not await condition():  # noqa: ASYNC110 - nothing to await but the poll
            await asyncio.sleep(0.02)


async def test_deadline_bounds_the_database_work(deploy_channel, db_url, viewer):
    """A call stuck behind a lock ends at its deadline, and so does its query."""
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    locker = await asyncpg.connect(libpq_dsn(db_url))
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE runbooks IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.GetRunbook(
                    deploy_pb2.GetRunbookRequest(runbook_id=GUIDE_ID), timeout=0.5, metadata=viewer
                )
            assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The query ended in the database as well (cancel request, or the closed
            # connection noticed by the server): no backend is left waiting on the lock.
            await _poll(lambda: _blocked_on_none(locker))
    finally:
        await locker.close()


async def test_calls_recover_when_the_database_drops_every_connection(
    deploy_channel, db_url, viewer
):
    """No ping before each checkout: a dropped connection fails at most the one call that
    meets it (UNAVAILABLE, which clients retry), then the pool opens fresh connections."""
    stub = deploy_pb2_grpc.DeployServiceStub(deploy_channel)
    request = deploy_pb2.GetRunbookRequest(runbook_id=GUIDE_ID)
    await asyncio.gather(*(stub.GetRunbook(request, metadata=viewer) for _ in range(5)))
    admin = await asyncpg.connect(libpq_dsn(db_url))
    try:
        dropped = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'deploy_svc'"
        )
    finally:
        await admin.close()
    assert dropped >= 1
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append((await stub.GetRunbook(request, metadata=viewer)).title)
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code())
    assert outcomes[1:] == ["Deployment guide"] * 4, outcomes
    assert outcomes[0] in ("Deployment guide", grpc.StatusCode.UNAVAILABLE), outcomes


async def test_sigterm_lets_the_call_in_flight_finish(relman, db_url, viewer):
    """Readiness turns NOT_SERVING first, the blocked call then completes, exit code 0."""
    process = await RelmanProcess.start(
        ["-m", "deploy_svc"],
        env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0", SHUTDOWN_GRACE_S="20"),
    )
    locker = await asyncpg.connect(libpq_dsn(db_url))
    try:
        address = client_address((await process.wait_listening("deploy_svc"))["deploy_svc"])
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = deploy_pb2_grpc.DeployServiceStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="relman.v1.DeployService"))
            assert (await watch.read()).status == SERVING

            lock = locker.transaction()
            await lock.start()
            await locker.execute("LOCK TABLE runbooks IN ACCESS EXCLUSIVE MODE")
            in_flight = stub.GetRunbook(  # the call starts now; awaited below
                deploy_pb2.GetRunbookRequest(runbook_id=GUIDE_ID), timeout=60, metadata=viewer
            )
            await _poll(lambda: _blocked_on(locker, "runbooks"))

            process.signal(signal.SIGTERM)
            assert (await watch.read()).status == NOT_SERVING
            assert not in_flight.done()
            watch.cancel()

            await lock.rollback()  # let the call through
            runbook = await in_flight
            assert runbook.title == "Deployment guide"
        assert await process.wait(within_s=20) == 0
        assert any("stopped" in line for line in process.lines)
    finally:
        await locker.close()
        await process.stop()


def _free_port_held() -> socket.socket:
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"DATABASE_URL": "mysql://root@127.0.0.1/relman"}, r"DATABASE_URL must start with"),
        (
            {"DATABASE_URL": "postgresql://relman@127.0.0.1:1/relman"},
            r"cannot reach the database relman on 127\.0\.0\.1:1 after",
        ),
        ({"SHUTDOWN_GRACE_S": "soon"}, r"SHUTDOWN_GRACE_S='soon' is not a number"),
        ({"DB_POOL_SIZE": "0"}, r"DB_POOL_SIZE=0 is out of range"),
        ({"DEPLOY_SVC_ADDR": "50051"}, r"DEPLOY_SVC_ADDR='50051' is not host:port"),
        ({"TLS_CERT": "/nonexistent/cert.pem"}, r"TLS_CERT and TLS_KEY must be set together"),
        ({"LOG_LEVEL": "chatty"}, r"LOG_LEVEL='CHATTY' is not a log level"),
    ],
    ids=["bad-url", "unreachable", "grace", "pool", "address", "tls", "log-level"],
)
async def test_start_up_failures_are_one_line_and_exit_2(db_url, settings, message):
    env = env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0")
    env.update(settings)
    process = await RelmanProcess.start(["-m", "deploy_svc"], env)
    assert await process.wait(within_s=30) == 2
    assert len(process.lines) == 1, process.output
    assert process.lines[0].startswith("deploy_svc: ")
    assert re.search(message, process.lines[0]), process.lines[0]


async def test_port_in_use_is_one_line_and_exit_2(db_url):
    held = _free_port_held()
    try:
        port = held.getsockname()[1]
        process = await RelmanProcess.start(
            ["-m", "audit_svc"], env_for(db_url, AUDIT_SVC_ADDR=f"127.0.0.1:{port}")
        )
        assert await process.wait(within_s=30) == 2
        errors = [line for line in process.lines if line.startswith("audit_svc: ")]
        assert errors == [
            f"audit_svc: cannot listen on 127.0.0.1:{port}: the address is in use or not available"
        ]
        assert "Traceback" not in process.output
    finally:
        held.close()


def _readme_grpcurl_blocks() -> list[str]:
    """The README's ```sh blocks that call grpcurl, each a script run as written."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
    return [block for block in blocks if "grpcurl " in block]


README_BLOCKS = _readme_grpcurl_blocks()


def test_readme_has_grpcurl_examples():
    lines = [line for block in README_BLOCKS for line in block.splitlines()]
    assert any(line.startswith("grpcurl -plaintext localhost:50051 list") for line in lines)
    assert any("grpc.health.v1.Health/Check" in line for line in lines)
    assert any('-H "authorization: Bearer $TOKEN"' in line for line in lines)


@pytest.mark.parametrize("block", README_BLOCKS, ids=lambda b: b.splitlines()[0][:60])
async def test_readme_grpcurl_block_works(relman, db_url, block):
    """Each grpcurl example of the README, run as written against `make run`'s addresses."""
    script = block.replace("localhost:50051", client_address(relman.addresses["deploy_svc"]))
    script = script.replace("localhost:50052", client_address(relman.addresses["audit_svc"]))
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env=env_for(db_url),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"{script}\n{err.decode()}"
    assert "ERROR" not in out.decode()
    if "Health/Check" in script:
        assert '"status": "SERVING"' in out.decode()
    if "ApproveDeployment" in script:  # the life of a release, as the README tells it
        check_life_of_a_release(out.decode())
        # Names instead of looking ids up: 22 lines where it took 37 with ids.
        assert len(script.strip().splitlines()) <= 22
    if "audit_svc.verify" in script:  # the auditor's recipe: the shared trail checks out
        assert "ok: " in out.decode(), out.decode()
