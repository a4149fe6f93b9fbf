"""relman behind a real balancer: nginx (docker/nginx.conf) in front of two replicas of
each service, and shared.client's own per-call round robin over the replicas.

What a user of several replicas notices: calls land on both; the audit trail and the
login throttle see each client's own address through nginx (TRUSTED_PROXIES), and a
forged `x-forwarded-for` changes nothing; a replica SIGKILLed under load loses no
acknowledged row, repeatable calls succeed on the other replica, the rest fail
UNAVAILABLE with nothing half-written; a watch outlives the replica that served it.

nginx connects to the replicas from 127.0.0.2 (`grpc_bind`), the address TRUSTED_PROXIES
names; clients connect from 127.0.0.1 and ::1. Without nginx (not on PATH, nor in
/usr/sbin) the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from relman.v1 import audit_pb2, auth_pb2, common_pb2, deploy_pb2
from shared.client import RelmanClient, RelmanError, ResourceExhausted, Unauthenticated, Unavailable
from shared.devtools.seed import seed, seed_id
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, S
from tests.faults.invariants import check_invariants
from tests.harness import (
    RelmanProcess,
    env_for,
    mint_tokens,
    scrape_metrics,
    scratch_database,
    start_service,
    until_streams_hold,
)
from tests.nginx import (
    PROXY_ADDRESS,
    Nginx,
    Replicas,
    require_nginx,
    running_nginx,
    running_replicas,
)

FORGED = "203.0.113.9"  # TEST-NET-3: nobody's address
LOGIN_FAILURES_PER_PEER = 3


class Stack:
    def __init__(self, url, replicas: Replicas, nginx: Nginx, tokens: dict[str, str]) -> None:
        self.url, self.replicas, self.nginx, self.tokens = url, replicas, nginx, tokens

    def client(self, token: str, *, route: str = "nginx", ipv6: bool = False) -> RelmanClient:
        """shared.client through nginx (over IPv4 or IPv6), or straight to the replicas
        with its own round robin (`route="round_robin"`)."""
        if route == "round_robin":
            deploy, audit = self.replicas.target("deploy_svc"), self.replicas.target("audit_svc")
        else:
            deploy = self.nginx.address("deploy_svc", ipv6=ipv6)
            audit = self.nginx.address("audit_svc", ipv6=ipv6)
        return RelmanClient(deploy=deploy, audit=audit, token=token)

    def replica(self, service: str, index: int = 0) -> RelmanClient:
        """shared.client to one replica directly (from 127.0.0.1: not a trusted proxy)."""
        address = self.replicas.addresses[service][index]
        return RelmanClient(deploy=address, audit=address, token=self.tokens["ci-bot"])


@pytest.fixture(scope="module")
async def stack(server_url):
    require_nginx()
    async with scratch_database(server_url) as url:
        await seed(url)
        tokens = await mint_tokens(url, ["admin", "lena"], "balancer")
        async with (
            running_replicas(
                url,
                TRUSTED_PROXIES=PROXY_ADDRESS,
                LOGIN_FAILURES_PER_PEER=str(LOGIN_FAILURES_PER_PEER),
                LOGIN_FAILURES_PER_USER="1000",
            ) as replicas,
            running_nginx(replicas.ports()) as nginx,
        ):
            yield Stack(url, replicas, nginx, tokens)


@pytest.fixture
async def db(stack):
    connection = await asyncpg.connect(libpq_dsn(stack.url))
    yield connection
    await connection.close()


@pytest.fixture
async def revived(stack):
    """Every replica running before the test, and again after it (those it killed come
    back on their addresses)."""
    await stack.replicas.revive()
    yield stack
    await stack.replicas.revive()


async def until(condition: Callable[[], bool | Awaitable[bool]], within_s: float = 30) -> None:
    """Polls `condition` (a function, or a coroutine function) until it holds; fails
    after `within_s`."""
    async with asyncio.timeout(within_s):
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(0.02)


async def started(process: RelmanProcess, method: str) -> float:
    """How many calls of `method` the process has started (its Prometheus metrics)."""
    metrics = await scrape_metrics(process)
    return sum(
        value
        for (name, labels), value in metrics.items()
        if name == "grpc_server_started_total" and dict(labels)["grpc_method"] == method
    )


async def in_flight(process: RelmanProcess, method: str) -> float:
    metrics = await scrape_metrics(process)
    count = {"grpc_server_started_total": 0.0, "grpc_server_handled_total": 0.0}
    for (name, labels), value in metrics.items():
        if name in count and dict(labels)["grpc_method"] == method:
            count[name] += value
    return count["grpc_server_started_total"] - count["grpc_server_handled_total"]


async def until_both_take(stack: Stack, service: str, method: str, call) -> None:
    """Makes `call` until both replicas of `service` have started a `method` call since
    now: nginx leaves a replica it saw refuse connections out for a while (its
    fail_timeout), and a client's round robin uses only replicas it is connected to."""
    processes = stack.replicas.processes[service]
    before = [await started(p, method) for p in processes]

    async def both() -> bool:
        for _ in range(5):
            await call()
        now = [await started(p, method) for p in processes]
        return all(after > first for after, first in zip(now, before, strict=True))

    await until(both)


def log_action(tag: str, **fields) -> audit_pb2.LogActionRequest:
    return audit_pb2.LogActionRequest(
        action="balancer.call", resource_type="test", resource_id=tag, **fields
    )


async def ip_of(db, row_id: str) -> str:
    return await db.fetchval("SELECT ip_address FROM audit_logs WHERE id = $1", uuid.UUID(row_id))


# -- per-call balancing ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ["nginx", "round_robin"])
async def test_calls_spread_over_both_replicas(revived, route):
    stack = revived
    tag = uuid.uuid4().hex
    processes = {s: stack.replicas.processes[s] for s in ("deploy_svc", "audit_svc")}
    async with stack.client(stack.tokens["ci-bot"], route=route) as relman:
        # Connected to both before counting: the round robin uses ready replicas only.
        await until_both_take(
            stack, "audit_svc", "LogAction", lambda: relman.audit.LogAction(log_action(tag))
        )
        await until_both_take(
            stack,
            "deploy_svc",
            "ListEnvironments",
            lambda: relman.deploy.ListEnvironments(deploy_pb2.ListEnvironmentsRequest()),
        )
        before = {
            "audit_svc": [await started(p, "LogAction") for p in processes["audit_svc"]],
            "deploy_svc": [await started(p, "ListEnvironments") for p in processes["deploy_svc"]],
        }
        for _ in range(20):
            await relman.audit.LogAction(log_action(tag))
            await relman.deploy.ListEnvironments(deploy_pb2.ListEnvironmentsRequest())
    after = {
        "audit_svc": [await started(p, "LogAction") for p in processes["audit_svc"]],
        "deploy_svc": [await started(p, "ListEnvironments") for p in processes["deploy_svc"]],
    }
    for service, counts in after.items():
        calls = [a - b for a, b in zip(counts, before[service], strict=True)]
        assert all(n >= 3 for n in calls), (service, calls)  # each replica's metrics show calls


# -- the caller's address behind nginx -------------------------------------------------------


async def test_the_audit_trail_records_each_clients_own_address_through_nginx(stack, db):
    """Through nginx the trail records the client's address (IPv4 or IPv6), not nginx's;
    a forged `x-forwarded-for`, sent through nginx or straight to a replica, changes
    nothing; a refused call (`auth.denied`) is recorded with the client's address too."""
    tag = uuid.uuid4().hex
    forged = (("x-forwarded-for", f"{FORGED}, 198.51.100.7"),)
    token = stack.tokens["ci-bot"]
    async with (
        stack.client(token) as over_ipv4,
        stack.client(token, ipv6=True) as over_ipv6,
        stack.replica("audit_svc") as direct,
        stack.client("rm_not_a_token", ipv6=True) as stranger,
    ):
        through_v4 = await over_ipv4.audit.LogAction(log_action(tag))
        through_v6 = await over_ipv6.audit.LogAction(log_action(tag))
        forged_v4 = await over_ipv4.audit.LogAction(log_action(tag), metadata=forged)
        forged_v6 = await over_ipv6.audit.LogAction(log_action(tag), metadata=forged)
        forged_direct = await direct.audit.LogAction(log_action(tag), metadata=forged)
        with pytest.raises(Unauthenticated):
            await stranger.audit.ListAuditLogs(audit_pb2.ListAuditLogsRequest(), metadata=forged)
    assert [through_v4.ip_address, through_v6.ip_address] == ["127.0.0.1", "::1"]
    assert [await ip_of(db, through_v4.id), await ip_of(db, through_v6.id)] == ["127.0.0.1", "::1"]
    assert [forged_v4.ip_address, forged_v6.ip_address] == ["127.0.0.1", "::1"]
    assert forged_direct.ip_address == "127.0.0.1"  # from an untrusted peer: ignored
    denied = await db.fetch(
        "SELECT ip_address FROM audit_logs WHERE action = 'auth.denied'"
        " AND resource_id = 'relman.v1.AuditService/ListAuditLogs'"
    )
    assert [row["ip_address"] for row in denied] == ["::1"]
    stored = await db.fetch(
        "SELECT DISTINCT ip_address FROM audit_logs WHERE resource_id = $1", tag
    )
    assert {row["ip_address"] for row in stored} == {"127.0.0.1", "::1"}  # never nginx's


async def test_the_login_throttle_counts_each_client_behind_nginx_by_its_own_address(stack, db):
    """A guesser at 127.0.0.1 is throttled after its failures, through nginx and straight
    to a replica, forged header or not; lena at ::1, behind the same nginx, still logs in."""
    async with (
        stack.client("", route="nginx") as guesser,
        stack.client("", ipv6=True) as lena,
        stack.replica("deploy_svc") as direct,
    ):

        async def guess(client, metadata=()) -> RelmanError:
            with pytest.raises(RelmanError) as refused:
                await client.auth.Login(
                    auth_pb2.LoginRequest(username=f"x-{uuid.uuid4().hex[:8]}", password="nope"),
                    metadata=metadata,
                )
            return refused.value

        failures = [await guess(guesser) for _ in range(LOGIN_FAILURES_PER_PEER)]
        assert all(isinstance(error, Unauthenticated) for error in failures), failures
        throttled = [
            await guess(guesser),
            await guess(guesser, (("x-forwarded-for", FORGED),)),  # a forged chain via nginx
            await guess(direct, (("x-forwarded-for", FORGED),)),  # untrusted peer: ignored
        ]
        signed_in = await lena.auth.Login(
            auth_pb2.LoginRequest(username="lena", password="password123")
        )
    assert all(isinstance(error, ResourceExhausted) for error in throttled), throttled
    assert {error.reason for error in throttled} == {"LOGIN_THROTTLED"}
    assert signed_in.access_token
    rows = await db.fetch(
        "SELECT resource_id, ip_address FROM audit_logs WHERE action = 'login_throttled'"
    )
    assert [(row["resource_id"], row["ip_address"]) for row in rows] == [("127.0.0.1", "127.0.0.1")]


async def test_a_bad_trusted_proxies_value_stops_the_service_at_start(db_url):
    process = await RelmanProcess.start(
        ["-m", "audit_svc"],
        env_for(db_url, AUDIT_SVC_ADDR="127.0.0.1:0", TRUSTED_PROXIES="127.0.0.2, 10.0.0.1/8"),
    )
    assert await process.wait(60) == 2
    assert "TRUSTED_PROXIES" in process.output and "10.0.0.1/8" in process.output


async def test_a_trusted_network_wider_than_a_proxy_is_warned_of(db_url):
    audit = await start_service(db_url, "audit_svc", TRUSTED_PROXIES="127.0.0.2, 10.0.0.0/8")
    assert await audit.stop() == 0
    assert "TRUSTED_PROXIES 10.0.0.0/8 may hold more than proxies" in audit.output


# -- a replica SIGKILLed under load ----------------------------------------------------------


def _batch(tag: str, rows: int) -> audit_pb2.LogActionsRequest:
    return audit_pb2.LogActionsRequest(actions=[log_action(tag) for _ in range(rows)])


async def _outcome(stream) -> int | RelmanError:
    """A held LogActions stream finished: its count, or the error it ended with."""
    try:
        await stream.done_writing()
        return (await stream).count
    except RelmanError as error:
        return error


@pytest.mark.parametrize("route", ["nginx", "round_robin"])
async def test_a_replica_killed_under_log_action_load_loses_no_acknowledged_row(revived, db, route):
    """16 callers loop LogAction through the client helper while 4 LogActions streams,
    spread over both replicas, hold 100 written, uncommitted rows each; one replica is
    SIGKILLed. Every LogAction succeeds (retried, with its request_id, on the other
    replica) and is stored once; the streams on the dead replica fail UNAVAILABLE and
    store nothing, those on the other complete."""
    stack = revived
    tag = uuid.uuid4().hex
    audit = stack.replicas.processes["audit_svc"]
    acked: list[str] = []
    failed: list[BaseException] = []
    stop = asyncio.Event()
    async with stack.client(stack.tokens["ci-bot"], route=route) as relman:
        await until_both_take(
            stack, "audit_svc", "LogAction", lambda: relman.audit.LogAction(log_action("warm"))
        )
        before = [await started(p, "LogActions") for p in audit]
        streams = {}
        for n in range(4):
            stream = relman.audit.LogActions()
            await stream.write(_batch(f"{tag}-stream-{n}", 100))
            streams[f"{tag}-stream-{n}"] = stream
        await until_streams_hold(stack.url, 4)
        spread = [await started(p, "LogActions") - b for p, b in zip(audit, before, strict=True)]
        assert all(spread), f"the streams did not reach both replicas: {spread}"

        async def caller() -> None:
            while not stop.is_set():
                try:
                    acked.append((await relman.audit.LogAction(log_action(tag))).id)
                except RelmanError as error:
                    failed.append(error)

        callers = [asyncio.create_task(caller()) for _ in range(16)]
        try:
            await until(lambda: len(acked) >= 100)
            await stack.replicas.kill("audit_svc", 0)
            at_kill = len(acked)
            await until(lambda: len(acked) >= at_kill + 200)
        finally:
            stop.set()
            await asyncio.gather(*callers)
        outcomes = {name: await _outcome(stream) for name, stream in streams.items()}

    assert failed == [], failed[:3]
    stored = await db.fetch("SELECT id FROM audit_logs WHERE resource_id = $1", tag)
    assert len(acked) == len(set(acked))
    assert {str(row["id"]) for row in stored} == set(acked)  # none lost, none twice
    for name, outcome in outcomes.items():
        rows = await db.fetchval("SELECT count(*) FROM audit_logs WHERE resource_id = $1", name)
        if isinstance(outcome, RelmanError):
            assert isinstance(outcome, Unavailable), outcome
            assert rows == 0  # nothing half-written
        else:
            assert outcome == rows == 100
    killed = [o for o in outcomes.values() if isinstance(o, RelmanError)]
    assert 1 <= len(killed) <= 3, outcomes
    await check_invariants(db)


async def test_a_watch_through_nginx_is_reopened_on_the_other_replica(revived, db):
    """The deploy replica serving a watch is SIGKILLed: the watch through nginx ends with
    it, the client helper opens it again on the other replica and sees the next change;
    reads made meanwhile through the helper all succeed."""
    stack = revived
    deploy = stack.replicas.processes["deploy_svc"]
    async with stack.client(stack.tokens["lena"]) as lead:
        service = await lead.deploy.CreateService(
            deploy_pb2.CreateServiceRequest(
                name=f"svc-{uuid.uuid4().hex[:10]}", team_id=str(seed_id("team", "Platform"))
            )
        )
        release = await lead.deploy.CreateRelease(
            deploy_pb2.CreateReleaseRequest(service_id=service.id, version="1.0.0")
        )
        deployment = await lead.deploy.PromoteRelease(
            deploy_pb2.PromoteReleaseRequest(release_id=release.id, target_environment_id=DEV)
        )
        seen: list[common_pb2.Deployment] = []

        async def watch() -> None:
            async for snapshot in lead.watch_deployment(deployment.id):
                seen.append(snapshot)

        watcher = asyncio.create_task(watch())
        try:
            await until(lambda: bool(seen))
            holders = [n for n, p in enumerate(deploy) if await in_flight(p, "WatchDeployment")]
            assert len(holders) == 1, holders
            await stack.replicas.kill("deploy_svc", holders[0])
            reads = [
                await lead.deploy.GetDeployment(
                    deploy_pb2.GetDeploymentRequest(deployment_id=deployment.id)
                )
                for _ in range(10)
            ]
            first = deployment.stages[0]
            await lead.deploy.UpdatePipelineStage(
                deploy_pb2.UpdatePipelineStageRequest(
                    stage_id=first.id, status=S.STAGE_STATUS_RUNNING
                )
            )
            await until(lambda: seen[-1].stages[0].status == S.STAGE_STATUS_RUNNING)
            survivor = deploy[1 - holders[0]]
            assert await in_flight(survivor, "WatchDeployment") == 1  # re-opened there
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    assert [r.id for r in reads] == [deployment.id] * 10
    assert seen[0].status == S.DEPLOYMENT_STATUS_PENDING
    assert seen[-1].status == S.DEPLOYMENT_STATUS_IN_PROGRESS
    await check_invariants(db)


async def test_nginx_answers_unavailable_when_no_replica_is_left(revived, db):
    """Both audit replicas gone: a call through nginx fails UNAVAILABLE (retried by the
    helper, then raised), not a hang or an INTERNAL, and stores nothing."""
    stack = revived
    tag = uuid.uuid4().hex
    async with stack.client(stack.tokens["ci-bot"]) as relman:
        for index in (0, 1):
            await stack.replicas.kill("audit_svc", index)
        with pytest.raises(Unavailable):
            await relman.audit.LogAction(log_action(tag))
    assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE resource_id = $1", tag) == 0
