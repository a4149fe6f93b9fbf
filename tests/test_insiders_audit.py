"""Issue 15, the audit trail against insiders: provenance of every
row, resources a caller can hold, and filter values that are only data.

Each test performs the attack through the API of relman processes of this module's
own (a seeded database of their own, short idle settings), and asserts what a
reader of the trail, or the attacker, sees.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import URL

from relman.v1 import audit_pb2, audit_pb2_grpc, auth_pb2, auth_pb2_grpc
from shared.devtools.seed import seed, seed_id
from shared.persistence.db import libpq_dsn
from tests.deploying import Client
from tests.faults.load import process_state
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    error_details,
    fails,
    mint_tokens,
    scratch_database,
    start_service,
    until_streams_hold,
)

RELMAN, CLIENT = audit_pb2.AUDIT_ORIGIN_RELMAN, audit_pb2.AUDIT_ORIGIN_CLIENT
IDLE_S = "1"  # AUDIT_STREAM_IDLE_S and EXPORT_READER_IDLE_S of this module's audit_svc


@dataclass
class Trail:
    url: URL
    tokens: dict[str, str]  # username -> bearer token (admin, lena, priya, marco, ci-bot)
    deploy: grpc.aio.Channel
    audit_process: RelmanProcess
    audit: audit_pb2_grpc.AuditServiceStub

    def auth(self, username: str):
        return bearer(self.tokens[username])


@pytest.fixture(scope="module")
async def trail(server_url) -> AsyncIterator[Trail]:
    async with scratch_database(server_url) as url:
        await seed(url)
        tokens = await mint_tokens(url, ["admin", "lena", "priya", "marco"], "insiders")
        deploy = await start_service(url, "deploy_svc")
        audit = await start_service(
            url, "audit_svc", AUDIT_STREAM_IDLE_S=IDLE_S, EXPORT_READER_IDLE_S=IDLE_S
        )
        try:
            async with (
                grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as d,
                grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as a,
            ):
                yield Trail(url, tokens, d, audit, audit_pb2_grpc.AuditServiceStub(a))
        finally:
            await audit.stop()
            await deploy.stop()


def user(username: str) -> str:
    return str(seed_id("user", username))


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


async def database_now(url: URL) -> datetime:
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        return await connection.fetchval("SELECT now()")
    finally:
        await connection.close()


async def listed(trail: Trail, **filters) -> list[audit_pb2.AuditLog]:
    """Every row the filter matches, newest first, walking all pages (as lena, a lead)."""
    rows, token = [], ""
    while True:
        page = await trail.audit.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(**filters), page_size=100, page_token=token
            ),
            metadata=trail.auth("lena"),
        )
        rows += page.audit_logs
        token = page.next_page_token
        if not token:
            return rows


async def exported(trail: Trail, **filters) -> list[dict[str, str]]:
    request = audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(**filters))
    text = "".join(
        [
            chunk.data
            async for chunk in trail.audit.ExportAuditLogs(request, metadata=trail.auth("lena"))
        ]
    )
    return list(csv.DictReader(io.StringIO(text, newline="")))


# -- attack 4: a row written on behalf of someone passes for their own ---------------------


async def test_every_row_says_whether_relman_or_a_client_wrote_it_and_who_recorded_it(trail):
    since = await database_now(trail.url)
    marker = f"t{uuid.uuid4().hex[:12]}"
    # relman's own rows: a change (deploy_svc), a login, a refused call, a read of the trail
    service = await Client(trail.deploy, trail.tokens["lena"]).CreateService(
        name=f"svc-{marker}", team_id=str(seed_id("team", "Platform"))
    )
    await auth_pb2_grpc.AuthServiceStub(trail.deploy).Login(
        auth_pb2.LoginRequest(username="marco", password="password123")
    )
    await fails(
        trail.audit.ListAuditLogs(audit_pb2.ListAuditLogsRequest(), metadata=trail.auth("priya")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # clients' rows: the admin forges lena's approval; the service user sends a batch
    forged = await trail.audit.LogAction(
        audit_pb2.LogActionRequest(
            action="approve",
            resource_type="deployment",
            resource_id=marker,
            user_id=user("lena"),
            ip_address="10.0.0.9",
        ),
        metadata=trail.auth("admin"),
    )
    await trail.audit.LogActions(
        iter(
            [
                audit_pb2.LogActionsRequest(
                    actions=[
                        audit_pb2.LogActionRequest(
                            action="bulk.write", resource_type=marker, user_id=user("priya")
                        )
                    ]
                )
            ]
        ),
        metadata=trail.auth("ci-bot"),
    )
    await trail.audit.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_type=marker)),
        metadata=trail.auth("lena"),
    )

    # The forged row answers for itself: lena is its user, the admin recorded it.
    assert (forged.user_id, forged.username, forged.ip_address) == (
        user("lena"),
        "lena",
        "10.0.0.9",
    )
    assert (forged.origin, forged.recorded_by, forged.recorded_by_username) == (
        CLIENT,
        user("admin"),
        "admin",
    )
    ci_bot = await auth_pb2_grpc.AuthServiceStub(trail.deploy).WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=trail.auth("ci-bot")
    )
    expected = {
        # action: (user, origin, recorded_by)
        "create": ("lena", RELMAN, "lena"),
        "login": ("marco", RELMAN, "marco"),
        "auth.denied": ("priya", RELMAN, "priya"),
        "approve": ("lena", CLIENT, "admin"),
        "bulk.write": ("priya", CLIENT, "ci-bot"),
        "audit.read": ("lena", RELMAN, "lena"),
    }
    rows = {row.action: row for row in await listed(trail, start_time=stamp(since))}
    assert set(expected) <= set(rows), sorted(rows)
    assert rows["create"].resource_id == service.id
    for action, (username, origin, recorder) in expected.items():
        row = rows[action]
        assert (row.username, row.origin, row.recorded_by_username) == (
            username,
            origin,
            recorder,
        ), action
        assert row.recorded_by == (ci_bot.id if recorder == "ci-bot" else user(recorder)), action

    # The CSV says the same; a row older than provenance says nothing.
    csv_rows = {row["id"]: row for row in await exported(trail, start_time=stamp(since))}
    word = {RELMAN: "relman", CLIENT: "client"}
    for row in rows.values():
        assert (csv_rows[row.id]["origin"], csv_rows[row.id]["recorded_by"]) == (
            word[row.origin],
            row.recorded_by,
        )
    old = str(seed_id("audit", "0"))
    [old_csv] = [r for r in await exported(trail, end_time=stamp(since)) if r["id"] == old]
    assert (old_csv["origin"], old_csv["recorded_by"]) == ("", "")
    [old_row] = [r for r in await listed(trail, end_time=stamp(since)) if r.id == old]
    assert (old_row.origin, old_row.recorded_by) == (audit_pb2.AUDIT_ORIGIN_UNSPECIFIED, "")


async def test_the_trail_filters_by_origin(trail):
    since = await database_now(trail.url)
    marker = f"t{uuid.uuid4().hex[:12]}"
    for _ in range(3):
        await trail.audit.LogAction(
            audit_pb2.LogActionRequest(
                action="approve", resource_type=marker, user_id=user("lena")
            ),
            metadata=trail.auth("admin"),
        )
    window = {"start_time": stamp(since)}
    clients = await listed(trail, origin=CLIENT, **window)
    relman = await listed(trail, origin=RELMAN, **window)
    everything = await listed(trail, **window)
    assert [row.resource_type for row in clients] == [marker] * 3
    assert relman and {row.origin for row in relman} == {RELMAN}
    assert {row.id for row in everything} >= {row.id for row in clients + relman}
    # "lena approved" as relman recorded it, versus as a client claimed it
    assert (
        await listed(trail, user_id=user("lena"), action="approve", origin=RELMAN, **window) == []
    )
    assert (
        len(await listed(trail, user_id=user("lena"), action="approve", origin=CLIENT, **window))
        == 3
    )
    # the export (and its command line), the page token and the read's own record know it
    assert [row["resource_type"] for row in await exported(trail, origin=CLIENT, **window)] == [
        marker
    ] * 3
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audit_svc.export_cli", "--origin", "client",
        "--since", since.isoformat(),
        "--address", client_address(trail.audit_process.addresses["audit_svc"]),
        env={**env_for(trail.url), "RELMAN_TOKEN": trail.tokens["lena"]},
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await cli.communicate()
    assert cli.returncode == 0
    assert [row["resource_type"] for row in csv.DictReader(io.StringIO(out.decode()))] == [
        marker
    ] * 3
    first = await trail.audit.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(origin=CLIENT, **window), page_size=1
        ),
        metadata=trail.auth("lena"),
    )
    assert first.total_size == 3
    await fails(
        trail.audit.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(origin=RELMAN, **window),
                page_size=1,
                page_token=first.next_page_token,
            ),
            metadata=trail.auth("lena"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_FILTER_MISMATCH",
    )
    reads = [
        row
        for row in await listed(trail, action="audit.read", **window)
        if dict(row.details["filter"]).get("origin") == "client"
    ]
    assert reads
    error = await fails(
        trail.audit.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(origin=7)),
            metadata=trail.auth("lena"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["filter.origin"]


# -- attack 9: held streams and exports pin the pool's connections -----------------------


def rows(marker: str, count: int, start: int = 0) -> audit_pb2.LogActionsRequest:
    return audit_pb2.LogActionsRequest(
        actions=[
            audit_pb2.LogActionRequest(
                action="bulk.write", resource_type=marker, resource_id=str(n)
            )
            for n in range(start, start + count)
        ]
    )


async def stored(url: URL, marker: str) -> int:
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM audit_logs WHERE resource_type = $1", marker
        )
    finally:
        await connection.close()


async def until_state(process: RelmanProcess, *, in_use: int, calls: int | None = None) -> None:
    """Waits until the process says (SIGUSR1) that it holds `in_use` pooled connections
    (and serves `calls` calls, if given)."""
    state = None
    try:
        async with asyncio.timeout(10):
            while True:
                state = await process_state(process)
                if state[2] == in_use and calls in (None, state[0]):
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"(calls, tasks, connections in use): {state}") from None


async def test_an_idle_stream_is_ended_and_keeps_nothing(trail):
    marker = f"t{uuid.uuid4().hex[:12]}"
    call = trail.audit.LogActions(metadata=trail.auth("priya"), timeout=20)
    await call.write(rows(marker, 500))
    # ... and then nothing, for longer than AUDIT_STREAM_IDLE_S
    error = await fails(call, grpc.StatusCode.ABORTED, "STREAM_IDLE")
    assert error_details(error)[0].metadata["idle_s"] == IDLE_S
    assert await stored(trail.url, marker) == 0
    await until_state(trail.audit_process, calls=0, in_use=0)


async def test_a_caller_holds_at_most_four_streams_at_once(trail):
    process = await start_service(trail.url, "audit_svc", AUDIT_STREAMS_PER_CALLER="4")
    marker = f"t{uuid.uuid4().hex[:12]}"
    try:
        async with grpc.aio.insecure_channel(
            client_address(process.addresses["audit_svc"])
        ) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            developer = trail.auth("priya")
            held = []
            for n in range(4):
                call = stub.LogActions(metadata=developer, timeout=60)
                await call.write(rows(marker, 1, start=n))
                held.append(call)
            await until_streams_hold(trail.url, 4)
            # Refused as it opens, before any message: a client still writing when a
            # client stream ends may be told another status (grpc/grpc#36066).
            await fails(
                stub.LogActions(metadata=developer, timeout=20),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_STREAMS",
            )
            # another caller is not affected
            other = await stub.LogActions(iter([rows(marker, 1, 5)]), metadata=trail.auth("ci-bot"))
            assert other.count == 1
            # one stream ends: the next one is accepted
            await held[0].done_writing()
            assert (await held[0]).count == 1
            again = await stub.LogActions(iter([rows(marker, 1, 6)]), metadata=developer)
            assert again.count == 1
            for call in held[1:]:
                await call.done_writing()
                assert (await call).count == 1
            await until_state(process, calls=0, in_use=0)
        assert await stored(trail.url, marker) == 6  # the held four, ci-bot's and the last
    finally:
        await process.stop()


async def test_an_export_nobody_reads_is_cancelled_and_frees_its_connection(trail):
    tag = uuid.uuid4().hex
    connection = await asyncpg.connect(libpq_dsn(trail.url))
    try:  # set-up straight into the table: some 40 MB, far more than the transport buffers
        await connection.execute(
            "INSERT INTO audit_logs (action, resource_type, resource_id, details)"
            " SELECT 'bulk', 'load', $1, jsonb_build_object('pad', repeat('x', 1000))"
            " FROM generate_series(1, 40000)",
            tag,
        )
    finally:
        await connection.close()
    call = trail.audit.ExportAuditLogs(
        audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id=tag)),
        metadata=trail.auth("lena"),
        timeout=60,
    )
    await call.read()  # the export is under way; then the reader takes nothing more
    # The export ends within EXPORT_READER_IDLE_S: its query stops, its connection is back.
    await until_state(trail.audit_process, in_use=0)
    observer = await asyncpg.connect(libpq_dsn(trail.url))
    try:
        assert not await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE 'COPY%' AND state <> 'idle'"
        )
    finally:
        await observer.close()
    # A reader that comes back gets what was already on its way, then the reason.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() != grpc.aio.EOF:
            pass
    assert ended.value.code() == grpc.StatusCode.ABORTED
    assert error_details(ended.value)[0].reason == "EXPORT_READER_IDLE"
    await until_state(trail.audit_process, in_use=0, calls=0)


# -- attack 10: a filter value that reads as SQL -------------------------------------------

AWKWARD = ["a :x", "it's", 'say "hi"', "back\\slash", "\\:x", "100%", "a::text", "$1"]
MATCHES = 1_010  # more than the 1,000 a first count covers: the planner is asked too


async def test_any_filter_text_is_data_also_past_a_thousand_matches(trail):
    tag = uuid.uuid4().hex[:8]
    values = [f"{value} {tag}" for value in AWKWARD]
    batches = [
        audit_pb2.LogActionsRequest(
            actions=[
                audit_pb2.LogActionRequest(action="bulk.write", resource_type=value)
                for _ in range(MATCHES)
            ]
        )
        for value in values
    ]
    response = await trail.audit.LogActions(iter(batches), metadata=trail.auth("ci-bot"))
    assert response.count == MATCHES * len(values)
    for value in values:
        page = await trail.audit.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(resource_type=value), page_size=1000
            ),
            metadata=trail.auth("lena"),
        )
        assert page.total_size == MATCHES, value
        assert {row.resource_type for row in page.audit_logs} == {value}
        rest = await trail.audit.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(resource_type=value),
                page_size=1000,
                page_token=page.next_page_token,
            ),
            metadata=trail.auth("lena"),
        )
        assert len(page.audit_logs) + len(rest.audit_logs) == MATCHES, value
