"""Helpers the tests share: scratch databases, relman processes, channels, error details.

Everything is real: databases are created on the server under test, services run
as `python -m deploy_svc` / `python -m audit_svc` processes (or through
`python -m shared.devtools.run`, as `make run` does) on free ports, and waits are for
events (a log line, a health status), never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import URL, select

from shared import PROJECT_ROOT
from shared.persistence import roles, schema
from shared.persistence.db import libpq_dsn
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE

VENV_BIN = os.path.dirname(sys.executable)
# Each test database's audit signing keys, as a deployment keeps its own.
KEYS_DIR = os.path.join(tempfile.gettempdir(), f"relman-test-keys-{os.getuid()}")

# The derivation of a release's status (README, "Deployment rules"), written independently
# of the domain's: the releases whose stored status disagrees with it.
RELEASE_STATUS_MISMATCHES = """
    WITH derived AS (
        SELECT r.id, r.version, r.status, CASE
            WHEN bool_or(d.status = 'rolled_back' AND e.environment_type = 'production')
                THEN 'rolled_back'
            WHEN bool_or(d.status = 'succeeded' AND e.environment_type = 'production')
                THEN 'completed'
            WHEN bool_or(d.status = 'in_progress') THEN 'in_progress'
            WHEN bool_or(d.status IN ('pending', 'awaiting_approval')) THEN 'promoted'
            WHEN bool_or(d.status = 'succeeded' AND e.environment_type <> 'production')
                THEN 'testing'
            ELSE 'draft' END AS expected
        FROM releases r
        LEFT JOIN deployments d ON d.release_id = r.id
        LEFT JOIN environments e ON e.id = d.environment_id
        GROUP BY r.id, r.status)
    SELECT id, version, status, expected FROM derived WHERE status <> expected
"""
LISTENING = re.compile(r"(?P<service>\w+) listening on (?P<address>\S+)")
START_TIMEOUT_S = 60


def server_url() -> URL:
    """The PostgreSQL server the tests and the bench use: DATABASE_URL's, or the embedded
    one as its superuser (they make databases and roles; the services never run as it)."""
    from shared.devtools import embedded_pg
    from shared.persistence.db import database_url, normalize_url

    if os.environ.get("DATABASE_URL", "").strip():
        return database_url()
    return normalize_url(embedded_pg.start())


@asynccontextmanager
async def scratch_database(server: URL, *, revision: str | None = "head") -> AsyncIterator[URL]:
    """A new database on `server`, owned by relman's owner role and migrated to `revision`
    as that role (None: left empty), with the runtime role granted its privileges; dropped
    after. Yields the URL as `server`'s own (super)user: the tests' view of everything."""
    name = f"relman_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(libpq_dsn(server))
    try:
        for role in (OWNER_ROLE, RUNTIME_ROLE):
            if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                with contextlib.suppress(
                    asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError
                ):
                    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await roles.set_session_bounds(admin, RUNTIME_ROLE)  # as the README asks of operators
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{OWNER_ROLE}"')
    finally:
        await admin.close()
    url = server.set(database=name)
    try:
        if revision is not None:
            # The grants name head's columns: only a database at head gets them.
            runtime = RUNTIME_ROLE if revision == "head" else None
            await asyncio.to_thread(schema.upgrade, owner_url(url), revision, runtime)
        yield url
    finally:
        admin = await asyncpg.connect(libpq_dsn(server))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def owner_url(url: URL) -> URL:
    """`url`'s database as relman's owner role (migrations, the seed)."""
    return url.set(username=OWNER_ROLE, password=None)


def runtime_url(url: URL) -> URL:
    """`url`'s database as the services' runtime role."""
    return url.set(username=RUNTIME_ROLE, password=None)


def env_for(url: URL, **settings: str) -> dict[str, str]:
    """The environment of a subprocess that should use database `url` (and `settings`) the
    way a deployment does: the services as the runtime role, migrations and the seed as
    the owner."""
    return {
        **os.environ,
        "DATABASE_URL": libpq_dsn(runtime_url(url)),
        "MIGRATION_DATABASE_URL": libpq_dsn(owner_url(url)),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AUDIT_SIGNING_KEY_FILE": signing_key_file(url),
        "WEBHOOK_SECRET_KEY_FILE": webhook_key_file(url),
        **settings,
    }


def webhook_key_file(url: URL) -> str:
    """The webhook secret key file of the services of `url`'s database (outside the
    project's .data/, like the signing key)."""
    return os.path.join(KEYS_DIR, f"{url.database}.webhook-key")


def signing_key_file(url: URL) -> str:
    """Where the audit_svc processes of database `url` keep their signing key."""
    return os.path.join(KEYS_DIR, f"{url.database}.pem")


def run_cli(
    url: URL, module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m module args` against database `url` (in `env`: default env_for(url))."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT_ROOT,
        env=env_for(url) if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def poll(check, within_s: float, what: str, every_s: float = 0.02):
    """Calls `check()` (awaited when it returns an awaitable) every `every_s` until it
    gives something true, and returns that; an AssertionError naming `what` after
    `within_s`. For state another process or server changes."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                found = check()
                if inspect.isawaitable(found):
                    found = await found
                if found:
                    return found
                await asyncio.sleep(every_s)
    except TimeoutError:
        raise AssertionError(f"no {what} within {within_s} s") from None


async def waiting_on_locks(watcher: asyncpg.Connection, count: int) -> None:
    """Until `count` other sessions of `watcher`'s database wait on a lock (a test holding
    rows in an open transaction, and the calls it makes wait behind them)."""

    async def waiting() -> bool:
        return count <= await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )

    await poll(waiting, 10, f"{count} sessions waiting on a lock")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


@dataclass
class RelmanProcess:
    """A running relman process; its stderr is collected line by line as it comes."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # service name -> host:port
    _reader: asyncio.Task | None = None
    _line_seen: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, args: Sequence[str], env: dict[str, str]) -> RelmanProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        running = cls(process)
        running._reader = asyncio.create_task(running._read())
        return running

    async def _read(self) -> None:
        """Collects stderr a chunk at a time (a service logs a line per call: reading them
        one by one cost the bench's client a share of its CPU)."""
        assert self.process.stderr is not None
        partial = b""
        while chunk := await self.process.stderr.read(1 << 16):
            *complete, partial = (partial + chunk).split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if "listening on" in line and (match := LISTENING.search(line)):
                    self.addresses[match["service"]] = match["address"]
            self._line_seen.set()
        if partial:
            self.lines.append(partial.decode(errors="replace"))
        self._line_seen.set()

    async def wait_for_line(
        self, pattern: str, within_s: float = START_TIMEOUT_S, *, since: int = 0
    ) -> str:
        """The first stderr line matching `pattern` (from line number `since` on), waiting
        for it as lines arrive."""
        regex = re.compile(pattern)
        async with asyncio.timeout(within_s):
            while True:
                for line in self.lines[since:]:
                    if regex.search(line):
                        return line
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"process ended before {pattern!r}:\n{self.output}")
                self._line_seen.clear()
                await self._line_seen.wait()

    async def wait_listening(self, *services: str) -> dict[str, str]:
        for service in services:
            await self.wait_for_line(rf"{service} listening on ")
        return {service: self.addresses[service] for service in services}

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait(self, within_s: float) -> int:
        async with asyncio.timeout(within_s):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
            return code

    async def stop(self, within_s: float = 30) -> int:
        if self.process.returncode is None:
            self.signal(signal.SIGTERM)
        try:
            return await self.wait(within_s)
        except TimeoutError:
            self.process.kill()
            return await self.wait(within_s)


async def start_service(url: URL, module: str, **settings: str) -> RelmanProcess:
    """`python -m module` (deploy_svc or audit_svc) on a free port, once it listens."""
    env = env_for(url, DEPLOY_SVC_ADDR="127.0.0.1:0", AUDIT_SVC_ADDR="127.0.0.1:0", **settings)
    process = await RelmanProcess.start(["-m", module], env)
    try:
        await process.wait_listening(module)
    except BaseException:  # never leave a half-started service behind
        await process.stop()
        raise
    return process


async def mint_tokens(url: URL, usernames: Sequence[str], name: str) -> dict[str, str]:
    """A bearer token for each of `usernames` (seeded users) and for `ci-bot`, a service
    user the tokens CLI creates."""
    from shared.identity.tokens import issue_token
    from shared.persistence.db import Database
    from shared.persistence.models import User

    minted = await asyncio.to_thread(
        run_cli, url, "shared.identity.tokens", "create", "--user", "ci-bot", "--name", name,
        "--service-user",
    )  # fmt: skip
    if minted.returncode != 0:
        raise RuntimeError(minted.stderr)
    tokens = {"ci-bot": minted.stdout.strip()}
    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            for username in usernames:
                user = await session.scalar(select(User).where(User.username == username))
                tokens[username], _ = await issue_token(session, user, name, None)
    finally:
        await database.dispose()
    return tokens


async def new_lead(channel: grpc.aio.Channel, admin_token: str) -> tuple[str, str]:
    """A lead of the test's own, created by an admin through AuthService and logged in:
    her id and her login token (the seeded leads' tokens serve other tests)."""
    from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2

    auth = auth_pb2_grpc.AuthServiceStub(channel)
    username = f"lead-{uuid.uuid4().hex[:8]}"
    user = await auth.CreateUser(
        auth_pb2.CreateUserRequest(
            username=username,
            email=f"{username}@relman.example",
            password="password123",
            role=common_pb2.ROLE_LEAD,
        ),
        metadata=bearer(admin_token),
    )
    login = await auth.Login(auth_pb2.LoginRequest(username=username, password="password123"))
    return user.id, login.access_token


def client_address(address: str) -> str:
    """Where a client connects to a server listening on `address` ([::] or 0.0.0.0 -> loopback)."""
    host, _, port = address.rpartition(":")
    if host in ("[::]", "0.0.0.0", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


METRICS_AT = re.compile(r"metrics on (http://\S+/metrics)")


async def scrape_metrics(process: RelmanProcess) -> dict[tuple[str, frozenset], float]:
    """Every sample of the process's endpoint: (name, labels) -> value."""
    url = METRICS_AT.search(await process.wait_for_line(METRICS_AT.pattern))[1]
    url = url.replace("0.0.0.0", "127.0.0.1")
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def error_details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list]:
    """The google.rpc.ErrorInfo of a failed call, and its BadRequest field violations."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            break
    else:
        raise AssertionError(f"no rich status details on {error.code()}: {error.details()}")
    info = error_details_pb2.ErrorInfo()
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(bad_request.field_violations)
    assert info.domain == "relman", status
    return info, violations


async def grpcurl(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Runs the real grpcurl; returns its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        "grpcurl", *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def call_empty(
    channel: grpc.aio.Channel,
    method: str,
    metadata=(),
    *,
    client_streaming: bool = False,
    server_streaming: bool = False,
) -> grpc.aio.AioRpcError | None:
    """Calls any RPC ("pkg.Service/Method") with an empty request; returns its error, if any."""
    path = f"/{method}"
    codec = {"request_serializer": lambda _: b"", "response_deserializer": bytes}
    options = {"metadata": metadata, "timeout": 30}
    try:
        if client_streaming and server_streaming:
            async for _ in channel.stream_stream(path, **codec)(iter([b""]), **options):
                pass
        elif client_streaming:
            await channel.stream_unary(path, **codec)(iter([b""]), **options)
        elif server_streaming:
            async for _ in channel.unary_stream(path, **codec)(b"", **options):
                pass
        else:
            await channel.unary_unary(path, **codec)(b"", **options)
    except grpc.aio.AioRpcError as error:
        return error
    return None


def method_shape(method: str) -> dict[str, bool]:
    """Whether a relman RPC streams requests and/or responses, from the proto descriptors."""
    from shared.framework.protos import rpc_methods

    for descriptor in rpc_methods():
        if f"{descriptor.containing_service.full_name}/{descriptor.name}" == method:
            return {
                "client_streaming": descriptor.client_streaming,
                "server_streaming": descriptor.server_streaming,
            }
    raise KeyError(method)


async def fails(call, code: grpc.StatusCode, reason: str | None = None):
    """Awaits a call that must fail with `code` (and ErrorInfo `reason`); returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert failure.value.code() == code, failure.value.details()
    if reason is not None:
        assert error_details(failure.value)[0].reason == reason
    return failure.value


async def until_streams_hold(url: URL, count: int) -> None:
    """Waits until `count` LogActions streams hold a connection each, in the transaction
    that holds their rows (idle in it after their COPY, waiting for the next batch)."""
    observer = await asyncpg.connect(libpq_dsn(url))
    try:
        async with asyncio.timeout(30):
            while count != await observer.fetchval(  # noqa: ASYNC110 - polling the database
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'idle in transaction' AND query LIKE 'COPY%'"
            ):
                await asyncio.sleep(0.02)
    finally:
        await observer.close()


def free_port(ipv6: bool) -> int:
    """A port free on 127.0.0.1, and on ::1 if `ipv6`, now: for a helper process that
    must be told its port (PgBouncer, nginx, which listens on both)."""
    while True:
        with socket.socket() as v4:
            v4.bind(("127.0.0.1", 0))
            port = v4.getsockname()[1]
            if not ipv6:
                return port
            with socket.socket(socket.AF_INET6) as v6, contextlib.suppress(OSError):
                v6.bind(("::1", port))
                return port


def ipv6_loopback() -> bool:
    """Whether ::1 exists here (containers may run without IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def check_life_of_a_release(printed: str) -> None:
    """What the README's life of a release prints, in the order it tells it."""
    story = [
        "DEPLOYMENT_STATUS_AWAITING_APPROVAL",
        "APPROVAL_STATUS_APPROVED",
        "RELEASE_STATUS_COMPLETED",
        '"name":"smoke_test","status":"STAGE_STATUS_FAILED"',
        "ROLLBACK_STATUS_IN_PROGRESS",
        "RELEASE_STATUS_ROLLED_BACK",
    ]
    positions = [printed.find(line) for line in story]
    assert -1 not in positions and positions == sorted(positions), printed
    # Development, staging and production, five stages each, before 1.4.0's.
    assert printed.count('"status":"STAGE_STATUS_SUCCEEDED"') == 15, printed
    # 1.3.0 live in all three environments, and in production again after the rollback.
    assert printed.count('"version":"1.3.0"') == 3, printed
    assert printed.rstrip().endswith('{"production":"1.3.0"}'), printed
