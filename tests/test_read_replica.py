"""DATABASE_READ_URL: the list and get reads served by a real streaming replica.

A cluster of this module's own (tests/faults/cluster.py) and a hot standby of it made
with pg_basebackup; both services run as processes with DATABASE_READ_URL naming the
standby. Replay on the standby is paused (pg_wal_replay_pause), or the standby cut off from
the primary (its primary_conninfo emptied), to tell the two servers apart: what the primary
commits then is missing from every read the replica serves, and present in every read the
primary serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy import URL, text

from relman.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    deploy_pb2,
    deploy_pb2_grpc,
)
from shared.devtools.seed import seed
from shared.framework.config import ConfigError, Settings
from shared.persistence.db import (
    REPLICA_CONNECT_TIMEOUT_S,
    REPLICA_HOLD_S,
    Database,
    libpq_dsn,
)
from tests.deploying import DEV, Client
from tests.faults.cluster import StoppableCluster
from tests.faults.conftest import new_service_id
from tests.faults.load import Acknowledged, Outcomes, log_action_caller, until
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    mint_tokens,
    poll,
    runtime_url,
    scrape_metrics,
    scratch_database,
    start_service,
)

FALLBACK_LIMIT_S = 10.0
LOAD_CALLERS = 8
UNREACHABLE = "read replica .* unreachable"


# -- fixtures: a primary, its standby, a seeded database, both services reading there --------


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[StoppableCluster, StoppableCluster]]:
    # Short paths: each Unix socket's path must stay under about 100 characters.
    primary = StoppableCluster(Path(tempfile.mkdtemp(prefix="relman-primary-")))
    try:
        standby = primary.replica(Path(tempfile.mkdtemp(prefix="relman-standby-")))
    except BaseException:
        primary.remove()
        raise
    try:
        yield primary, standby
    finally:  # side by side: each stop is a helper process of its own
        with ThreadPoolExecutor(2) as removing:
            for done in [removing.submit(c.remove) for c in (standby, primary)]:
                done.result()


async def fetch(url: URL, query: str, *args):
    """The rows of one statement on `url`'s server, as its superuser."""
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


async def replayed(primary: URL, standby: URL, within_s: float = 30) -> None:
    """Waits until the standby has replayed everything the primary has written so far."""
    lsn = (await fetch(primary, "SELECT pg_current_wal_lsn()::text"))[0][0]
    await poll(lambda: _replayed_past(standby, lsn), within_s, f"replay past {lsn} on the standby")


async def _replayed_past(standby: URL, lsn: str) -> bool:
    rows = await fetch(
        standby.set(database="postgres"), "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn
    )
    return rows[0][0]


@pytest.fixture(scope="module")
async def databases(clusters) -> AsyncIterator[tuple[URL, URL]]:
    """A migrated, seeded database on the primary, and the same database on the standby
    (as the superuser of each), once the standby has it."""
    primary, standby = clusters
    async with scratch_database(primary.url) as url:
        await seed(url)
        replica = standby.url.set(database=url.database)
        await replayed(url, replica)
        yield url, replica


@pytest.fixture(scope="module")
async def tokens(databases) -> dict[str, str]:
    return await mint_tokens(databases[0], ["admin", "lena"], "replica")


class Running:
    def __init__(self, deploy: RelmanProcess, audit: RelmanProcess, deploy_ch, audit_ch):
        self.deploy, self.audit = deploy, audit
        self.deploy_channel, self.audit_channel = deploy_ch, audit_ch
        self.audit_stub = audit_pb2_grpc.AuditServiceStub(audit_ch)
        self.auth_stub = auth_pb2_grpc.AuthServiceStub(deploy_ch)
        self.deploy_stub = deploy_pb2_grpc.DeployServiceStub(deploy_ch)


def read_settings(replica: URL, **more: str) -> dict[str, str]:
    return {"DATABASE_READ_URL": libpq_dsn(runtime_url(replica)), **more}


@pytest.fixture(scope="module")
async def running(databases) -> AsyncIterator[Running]:
    url, replica = databases
    settings = read_settings(replica, DEPLOY_METRICS_PORT="0", AUDIT_METRICS_PORT="0")
    deploy = await start_service(url, "deploy_svc", **settings)
    audit = await start_service(url, "audit_svc", **settings)
    try:
        async with (
            grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
            grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
        ):
            yield Running(deploy, audit, dch, ach)
    finally:
        for process in (deploy, audit):
            assert await process.stop() == 0, process.output
        for process in (deploy, audit):
            assert "unexpected error" not in process.output, process.output


# -- calls ----------------------------------------------------------------------------------


async def listed(stub, token: str, **fields) -> list:
    response = await stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(**fields), page_size=100),
        metadata=bearer(token),
        timeout=5,
    )
    return list(response.audit_logs)


async def exported(stub, token: str, **fields) -> list[str]:
    """The export's CSV records (the header first)."""
    chunks = [
        reply.data
        async for reply in stub.ExportAuditLogs(
            audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(**fields)),
            metadata=bearer(token),
            timeout=10,
        )
    ]
    return "".join(chunks).splitlines()


async def log_action(stub, token: str, resource_id: str) -> None:
    await stub.LogAction(
        audit_pb2.LogActionRequest(
            action="replica.marker", resource_type="replica", resource_id=resource_id
        ),
        metadata=bearer(token),
        timeout=5,
    )


async def sessions_on(server: URL, application: str) -> list[str]:
    """The last statement of each session `application` holds on `server` (its pool's)."""
    rows = await fetch(
        server,
        "SELECT query FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database()",
        application,
    )
    return [row["query"] for row in rows]


async def metric(process: RelmanProcess, name: str) -> float:
    return (await scrape_metrics(process))[(name, frozenset())]


# -- the tests ------------------------------------------------------------------------------


async def test_reads_come_from_the_replica_while_the_primary_takes_the_writes(
    clusters, databases, tokens, running
):
    url, replica = databases
    admin = tokens["admin"]
    stub = running.audit_stub
    tag = uuid.uuid4().hex
    stop, outcomes, acked = asyncio.Event(), Outcomes(), Acknowledged()
    load = [
        asyncio.create_task(
            log_action_caller(running.audit_channel, tokens["ci-bot"], tag, stop, outcomes, acked)
        )
        for _ in range(LOAD_CALLERS)
    ]
    try:
        await until(lambda: outcomes.ok >= 200, 30, "LogAction load")
        # The load's rows reach the replica's reads as replay catches up.
        assert await poll(lambda: listed(stub, admin, resource_id=tag), 10, "rows on the replica")
        assert len(await exported(stub, admin, resource_id=tag)) > 1
        await Client(running.deploy_channel, admin).ListReleases(page_size=5)
        for application in ("audit_svc", "deploy_svc"):  # their pools' sessions are there
            assert await sessions_on(replica, application), f"no {application} on the replica"

        # Replay paused: what the primary commits now is not on the replica.
        await fetch(replica, "SELECT pg_wal_replay_pause()")
        await poll(lambda: _paused(replica), 10, "replay paused")
        marker = f"paused-{uuid.uuid4().hex}"
        await log_action(stub, tokens["ci-bot"], marker)  # a write: to the primary, OK
        on_primary = await fetch(
            url, "SELECT count(*) FROM audit_logs WHERE resource_id = $1", marker
        )
        assert on_primary[0][0] == 1
        # ListAuditLogs and ExportAuditLogs are served by the replica (while the load goes on).
        assert await listed(stub, admin, resource_id=marker) == []
        assert len(await exported(stub, admin, resource_id=marker)) == 1  # the header alone

        # deploy_svc: a release made now is on the primary only. The Get/List RPCs read the
        # replica; CheckPromotion, the deploy path, WatchDeployment and the tokens the primary.
        lead = Client(running.deploy_channel, tokens["lena"])
        service_id = await new_service_id(url)
        release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await lead.GetRelease(release_id=release.id)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert list((await lead.ListReleases(service_id=service_id)).releases) == []
        check = await lead.CheckPromotion(release_id=release.id, target_environment_id=DEV)
        assert check.allowed, check
        deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
        watch = running.deploy_stub.WatchDeployment(
            deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
            metadata=bearer(tokens["lena"]),
            timeout=10,
        )
        first = await anext(aiter(watch))
        assert first.id == deployment.id
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await lead.GetDeployment(deployment_id=deployment.id)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        # A token made now authenticates, and once revoked stops at once: tokens are read
        # on the primary, never on a replica that has not seen the revocation.
        me = await running.auth_stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(admin))
        minted = await running.auth_stub.CreateApiToken(
            auth_pb2.CreateApiTokenRequest(user_id=me.id, name=f"paused-{tag[:8]}"),
            metadata=bearer(admin),
        )
        fresh = Client(running.deploy_channel, minted.token)
        await fresh.ListTeams(page_size=1)
        await running.auth_stub.RevokeApiToken(
            auth_pb2.RevokeApiTokenRequest(token_id=minted.api_token.id), metadata=bearer(admin)
        )
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await fresh.ListTeams(page_size=1)
        assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Both processes say how far behind the paused replica is.
        for process in (running.audit, running.deploy):
            await poll(
                lambda p=process: _metric_above(p, "relman_replica_lag_seconds", 0),
                10,
                "a lag above 0",
            )
            assert await metric(process, "relman_replica_serving_reads") == 1

        # Replay resumed: the row appears in the replica's reads once it is replayed.
        resumed_at = time.monotonic()
        await fetch(replica, "SELECT pg_wal_replay_resume()")
        rows = await poll(lambda: listed(stub, admin, resource_id=marker), 10, "the marker")
        assert [row.resource_id for row in rows] == [marker]
        caught_up_s = time.monotonic() - resumed_at
        assert (await lead.GetRelease(release_id=release.id)).id == release.id
        assert len(await exported(stub, admin, resource_id=marker)) == 2
    finally:
        await fetch(replica, "SELECT pg_wal_replay_resume()")
        stop.set()
        await asyncio.gather(*load)
    # The load never failed: no write went to the replica, which would have refused it.
    assert outcomes.failures == {}, outcomes.summary()
    assert outcomes.ok > 200
    writes = [
        query
        for application in ("audit_svc", "deploy_svc")
        for query in await sessions_on(replica, application)
        if query.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
    ]
    assert writes == []
    print(f"replica caught up {caught_up_s:.2f} s after replay resumed; {outcomes.summary()}")


async def _paused(replica: URL) -> bool:
    return (await fetch(replica, "SELECT pg_get_wal_replay_pause_state()"))[0][0] == "paused"


async def _metric_above(process: RelmanProcess, name: str, bound: float) -> bool:
    return await metric(process, name) > bound


async def test_reads_go_to_the_primary_within_10_s_of_the_replica_stopping(
    clusters, databases, tokens, running
):
    _, standby = clusters
    url, replica = databases
    admin, stub = tokens["admin"], running.audit_stub
    lead = Client(running.deploy_channel, tokens["lena"], timeout_s=5)
    audit_lines, deploy_lines = len(running.audit.lines), len(running.deploy.lines)
    failures: list[str] = []

    async def both_answer() -> bool:
        try:
            await listed(stub, admin, resource_id="nothing")
            await lead.ListReleases(page_size=5)
        except grpc.aio.AioRpcError as error:
            failures.append(error.code().name)
            return False
        return True

    await asyncio.to_thread(standby.stop, "immediate")
    stopped_at = time.monotonic()
    try:
        await poll(both_answer, FALLBACK_LIMIT_S, "OK from the primary")
        answered_s = time.monotonic() - stopped_at
        # None failed: the pooled connections the replica closed are replaced at checkout,
        # and the new ones, refused, send the reads to the primary.
        assert failures == [], failures
        # From the primary: a row written after the stop is listed.
        marker = f"stopped-{uuid.uuid4().hex}"
        await log_action(stub, tokens["ci-bot"], marker)
        assert [row.resource_id for row in await listed(stub, admin, resource_id=marker)] == [
            marker
        ]
        assert len(await exported(stub, admin, resource_id=marker)) == 2
        for process in (running.audit, running.deploy):
            await poll(
                lambda p=process: _metric_is(p, "relman_replica_serving_reads", 0),
                FALLBACK_LIMIT_S,
                "relman_replica_serving_reads 0",
            )
            assert await metric(process, "relman_replica_lag_seconds") == -1
        # Many reads, many failed checks: one WARNING per process.
        for _ in range(5):
            assert await both_answer()
        await running.audit.wait_for_line(UNREACHABLE, since=audit_lines)
        await running.deploy.wait_for_line(UNREACHABLE, since=deploy_lines)
        for process, since in ((running.audit, audit_lines), (running.deploy, deploy_lines)):
            warned = [line for line in process.lines[since:] if "unreachable" in line]
            assert len(warned) == 1, warned
    finally:
        await asyncio.to_thread(standby.start)
        restarted_at = time.monotonic()

    # Back: after its hold, reads go to the replica again.
    await replayed(url, replica)
    for process in (running.audit, running.deploy):
        await poll(
            lambda p=process: _metric_is(p, "relman_replica_serving_reads", 1),
            REPLICA_HOLD_S + 10,
            "relman_replica_serving_reads 1 again",
        )
    back_s = time.monotonic() - restarted_at
    # The restart ended every session there: these are new, made by reads that came back.
    await listed(stub, admin, resource_id="nothing")
    assert await sessions_on(replica, "audit_svc")
    await lead.ListReleases(page_size=5)
    assert await sessions_on(replica, "deploy_svc")
    await running.audit.wait_for_line("reachable again", since=audit_lines)
    print(
        f"reads OK from the primary {answered_s:.2f} s after the replica stopped"
        f" ({len(failures)} failed: {failures}); on the replica again {back_s:.1f} s after"
        " its start"
    )


async def _metric_is(process: RelmanProcess, name: str, value: float) -> bool:
    return await metric(process, name) == value


async def test_a_replica_lagging_past_the_bound_leaves_its_reads_to_the_primary(databases, tokens):
    url, replica = databases
    audit = await start_service(
        url, "audit_svc", **read_settings(replica, DATABASE_READ_MAX_LAG_S="1")
    )
    try:
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            admin = tokens["admin"]
            await fetch(replica, "SELECT pg_wal_replay_pause()")
            try:
                await poll(lambda: _paused(replica), 10, "replay paused")
                marker = f"lagging-{uuid.uuid4().hex}"
                paused_at = time.monotonic()
                # Writes go on on the primary (the replica receives them, replays nothing).
                await log_action(stub, tokens["ci-bot"], marker)
                assert await listed(stub, admin, resource_id=marker) == []  # the replica's
                rows = await poll(
                    lambda: listed(stub, admin, resource_id=marker),
                    10,
                    "the primary serving the reads of a replica too far behind",
                )
                left_s = time.monotonic() - paused_at
                assert [row.resource_id for row in rows] == [marker]
                await audit.wait_for_line("lags .* behind the primary, more than")
            finally:
                await fetch(replica, "SELECT pg_wal_replay_resume()")
            await audit.wait_for_line("caught up .*: reads go to it again")
    finally:
        assert await audit.stop() == 0, audit.output
    print(f"reads left the paused replica {left_s:.1f} s after the pause (bound 1 s)")


async def cut_off(replica: URL) -> str:
    """Ends the standby's walreceiver for good (primary_conninfo emptied and reloaded), as a
    lost network, a changed password or a dropped slot would; returns the conninfo that
    `reconnect` restores."""
    conninfo = (await fetch(replica, "SHOW primary_conninfo"))[0][0]
    assert conninfo
    await _set_conninfo(replica, "")
    await poll(lambda: _not(_receiving(replica)), 10, "the walreceiver ended")
    return conninfo


async def reconnect(replica: URL, conninfo: str) -> None:
    await _set_conninfo(replica, conninfo)
    await poll(lambda: _receiving(replica, "streaming"), 10, "the walreceiver streaming again")


async def _set_conninfo(replica: URL, conninfo: str) -> None:
    statement = await fetch(
        replica, "SELECT format('ALTER SYSTEM SET primary_conninfo = %L', $1::text)", conninfo
    )
    await fetch(replica, statement[0][0])
    await fetch(replica, "SELECT pg_reload_conf()")


async def _receiving(replica: URL, status: str | None = None) -> bool:
    rows = await fetch(
        replica,
        "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE $1::text IS NULL OR status = $1)",
        status,
    )
    return rows[0][0]


async def _not(check) -> bool:
    return not await check


async def _looks_current_alone(replica: URL) -> bool:
    """What the replica alone says: it has replayed all it received."""
    rows = await fetch(replica, "SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()")
    return rows[0][0]


async def test_a_replica_cut_off_from_its_primary_leaves_its_reads_to_the_primary(
    databases, tokens
):
    """Cut off, the replica replays all it received and then looks current to itself while
    the primary moves on. Measured against the primary, its lag rises past the bound and
    reads leave it; a process that starts meanwhile reads on the primary from its first
    read; reconnected, the replica serves reads again."""
    url, replica = databases
    audit = await start_service(
        url,
        "audit_svc",
        **read_settings(replica, DATABASE_READ_MAX_LAG_S="1", AUDIT_METRICS_PORT="0"),
    )
    try:
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            admin, writer = tokens["admin"], tokens["ci-bot"]
            await poll(
                lambda: _metric_is(audit, "relman_replica_serving_reads", 1), 10, "reads served"
            )
            conninfo = await cut_off(replica)
            try:
                marker = f"cut-off-{uuid.uuid4().hex}"
                cut_at = time.monotonic()
                await log_action(stub, writer, marker)  # the primary moves on
                assert await listed(stub, admin, resource_id=marker) == []  # the replica's
                assert await _looks_current_alone(replica)  # the measure of old: lag 0
                await poll(
                    lambda: _metric_above(audit, "relman_replica_lag_seconds", 0),
                    10,
                    "a lag above 0",
                )
                rows = await poll(
                    lambda: listed(stub, admin, resource_id=marker),
                    15,
                    "the primary serving the reads of a cut-off replica",
                )
                left_s = time.monotonic() - cut_at
                assert [row.resource_id for row in rows] == [marker]
                await audit.wait_for_line("lags .* behind the primary, more than")
                assert await metric(audit, "relman_replica_serving_reads") == 0
                assert await metric(audit, "relman_replica_lag_seconds") > 1
                assert await _looks_current_alone(replica)

                # A process starting now: its reads go to the primary before any check, and
                # after the first, which dates the lag back to the replica's last commit.
                database = Database(
                    runtime_url(url), pool_size=1, read_url=runtime_url(replica), read_max_lag_s=1
                )
                try:
                    assert not database.replica.serving()
                    await database.replica.refresh()
                    assert database.replica.lag_s > 1
                    assert not database.replica.serving()
                    async with database.replica_read() as session:
                        found = await session.scalar(
                            text("SELECT count(*) FROM audit_logs WHERE resource_id = :marker"),
                            {"marker": marker},
                        )
                    assert found == 1
                finally:
                    await database.dispose()
            finally:
                await reconnect(replica, conninfo)
                reconnected_at = time.monotonic()
            await audit.wait_for_line("caught up .*: reads go to it again")
            await poll(
                lambda: _metric_is(audit, "relman_replica_serving_reads", 1), 10, "reads back"
            )
            back_s = time.monotonic() - reconnected_at
            assert await metric(audit, "relman_replica_lag_seconds") < 1
        assert "WAL position cannot be read" not in audit.output
    finally:
        assert await audit.stop() == 0, audit.output
    await replayed(url, replica)
    print(
        f"reads left the cut-off replica {left_s:.1f} s after the cut (bound 1 s),"
        f" returned {back_s:.1f} s after it reconnected"
    )


async def test_without_the_primarys_position_the_lag_is_the_replicas_own(databases, caplog):
    """The primary out of reach of the checks (no server at DATABASE_URL): the lag is what
    the replica alone can tell, with one WARNING however many checks."""
    url, replica = databases
    nowhere = runtime_url(url).update_query_dict({"host": "/nonexistent-relman-socket-dir"})
    database = Database(nowhere, pool_size=1, read_url=runtime_url(replica))
    try:
        with caplog.at_level(logging.WARNING, logger="relman.db"):
            for _ in range(3):
                await database.replica.refresh()
        assert database.replica.lag_s is not None
        assert database.replica.serving()
        warnings = [r for r in caplog.records if "WAL position cannot be read" in r.getMessage()]
        assert len(warnings) == 1, warnings
    finally:
        await database.dispose()


async def test_a_database_read_url_that_names_a_writable_server_takes_no_write(databases):
    """DATABASE_READ_URL naming the primary by mistake: its sessions are read-only. (And no
    read goes to a replica before a check has passed.)"""
    url, _ = databases
    database = Database(runtime_url(url), pool_size=1, read_url=runtime_url(url))
    try:
        async with database.replica_read() as session:  # no check yet: the primary pool's
            assert (await session.scalar(text("SHOW default_transaction_read_only"))) == "off"
        await database.replica.refresh()
        assert database.replica.serving()
        async with database.replica_read() as session:
            assert (await session.scalar(text("SHOW default_transaction_read_only"))) == "on"
            with pytest.raises(Exception, match="read-only transaction"):
                await session.execute(
                    text("INSERT INTO teams (id, name) VALUES (gen_random_uuid(), 'x')")
                )
    finally:
        await database.dispose()


@pytest.mark.parametrize("way", ["refused", "silent"])
async def test_an_unreachable_replica_serves_from_the_primary_with_one_warning(
    databases, caplog, way
):
    """No server running (no checks run here, but one passed before): the first read that
    tries a replica out of reach, refused at once or silent past REPLICA_CONNECT_TIMEOUT_S,
    is served by the primary, and the next ones go there without trying; one WARNING,
    however many reads."""
    url, _ = databases
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        replica = runtime_url(url).difference_update_query(["host"])
        if way == "refused":
            replica = replica.update_query_dict({"host": "/nonexistent-relman-socket-dir"})
        else:
            replica = replica.set(host="127.0.0.1", port=silent.getsockname()[1])
        database = Database(runtime_url(url), pool_size=1, read_url=replica)
        database.replica.measured(0.0, standby=True)  # a check that passed before it went
        try:
            with caplog.at_level(logging.WARNING, logger="relman.db"):
                for attempt in range(3):
                    started = time.monotonic()
                    async with database.replica_read() as session:
                        # The primary's session: the replica's are read-only.
                        read_only = await session.scalar(text("SHOW default_transaction_read_only"))
                        assert read_only == "off"
                        assert (await session.scalar(text("SELECT count(*) FROM teams"))) > 0
                    took_s = time.monotonic() - started
                    assert took_s < (REPLICA_CONNECT_TIMEOUT_S + 2 if attempt == 0 else 1)
                    connection = await database.replica_connection()
                    try:
                        assert (await connection.scalar(text("SELECT 1"))) == 1
                    finally:
                        await connection.close()
            assert not database.replica.serving()
            assert database.replica.lag_s is None
            warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(warnings) == 1, warnings
        finally:
            await database.dispose()


@pytest.mark.parametrize(("value", "expected"), [(None, 30.0), ("0", None), ("2.5", 2.5)])
def test_the_lag_bound_setting(value, expected):
    env = {} if value is None else {"DATABASE_READ_MAX_LAG_S": value}
    assert Settings.from_env(env).db_read_max_lag_s == expected


@pytest.mark.parametrize("value", ["-1", "soon", "100000"])
def test_a_bad_lag_bound_is_refused(value):
    with pytest.raises(ConfigError, match="DATABASE_READ_MAX_LAG_S"):
        Settings.from_env({"DATABASE_READ_MAX_LAG_S": value})


async def test_a_bad_database_read_url_stops_the_start_naming_it(databases):
    url, _ = databases
    process = await RelmanProcess.start(
        ["-m", "audit_svc"],
        env_for(url, AUDIT_SVC_ADDR="127.0.0.1:0", DATABASE_READ_URL="mysql://u@db/relman"),
    )
    assert await process.wait(30) == 2
    assert "audit_svc: DATABASE_READ_URL must start with postgresql://" in process.output
