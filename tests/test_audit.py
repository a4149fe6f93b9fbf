"""AuditService through real servers: appends, bulk appends, listing, CSV export, append-only."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, select, text

from audit_svc import trail
from audit_svc.export import export_query
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.devtools.seed import seed_id
from shared.identity.actor import Actor
from shared.identity.tokens import issue_token
from shared.persistence import audit_log
from shared.persistence.db import driver_connection, libpq_dsn
from shared.persistence.models import AuditLog, AuditOrigin, AuditRequest, Role, User
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    error_details,
    fails,
    scratch_database,
    until_streams_hold,
)

HEADER = (
    "id,created_at,user_id,username,action,resource_type,resource_id,details,ip_address,"
    "user_agent,origin,recorded_by,sequence"
).split(",")


def details(**values) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


@pytest.fixture(scope="module")
def stub(audit_channel):
    return audit_pb2_grpc.AuditServiceStub(audit_channel)


@pytest.fixture(scope="module")
def as_role(tokens):
    return {role: bearer(token) for role, token in tokens.items()}


@pytest.fixture
def marker() -> str:
    """A resource type no other test uses, to find this test's rows."""
    return f"t{uuid.uuid4().hex[:12]}"


async def rows_of(database, resource_type: str) -> list[AuditLog]:
    async with database.transaction() as session:
        return list(
            await session.scalars(
                select(AuditLog)
                .where(AuditLog.resource_type == resource_type)
                .order_by(AuditLog.created_at, AuditLog.id)
            )
        )


# -- LogAction --------------------------------------------------------------------------------


async def test_log_action_records_the_caller(stub, as_role, database, marker):
    logged = await stub.LogAction(
        audit_pb2.LogActionRequest(
            action="deploy.started",
            resource_type=marker,
            resource_id="svc-1",
            details=details(version="1.2.3", steps=[1, 2]),
        ),
        metadata=as_role[Role.DEVELOPER],
    )
    assert (logged.action, logged.username, logged.ip_address) == (
        "deploy.started",
        "priya",
        "127.0.0.1",
    )
    assert logged.user_id == str(seed_id("user", "priya"))
    assert logged.user_agent.startswith("grpc-python")
    assert dict(logged.details) == {"version": "1.2.3", "steps": [1.0, 2.0]}
    [row] = await rows_of(database, marker)
    assert str(row.id) == logged.id and row.details == {"version": "1.2.3", "steps": [1, 2]}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"action": "Deploy"}, "action"),
        ({"action": "x" * 51}, "action"),
        ({"action": ""}, "action"),
        ({"resource_type": ""}, "resource_type"),
        ({"resource_id": "r" * 101}, "resource_id"),
        ({"details": details(blob="x" * (64 * 1024))}, "details"),
        ({"details": details(bad="a\x00b")}, "details"),
        ({"details": details(ratio=float("nan"))}, "details"),
        ({"details": details(deep={"er": [1, float("inf")]})}, "details"),
        ({"request_id": "not-a-uuid"}, "request_id"),
    ],
)
async def test_bad_log_action_input_writes_nothing(stub, as_role, database, marker, fields, field):
    request = {"action": "create", "resource_type": marker, **fields}
    if fields.get("resource_type") == "":
        request["resource_type"] = ""
    error = await fails(
        stub.LogAction(audit_pb2.LogActionRequest(**request), metadata=as_role[Role.DEVELOPER]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == [field]
    assert await rows_of(database, marker) == []


async def test_on_behalf_fields_need_the_service_or_admin_role(stub, as_role, database, marker):
    wendy = str(seed_id("user", "wendy"))
    on_behalf = audit_pb2.LogActionRequest(
        action="login",
        resource_type=marker,
        user_id=wendy,
        ip_address="2001:db8::7",
        user_agent="sso-gateway/3",
    )
    for role in (Role.DEVELOPER, Role.LEAD):
        error = await fails(
            stub.LogAction(on_behalf, metadata=as_role[role]),
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_PERMISSION",
        )
        assert error_details(error)[0].metadata["permission"] == "audit.write.on_behalf"
    logged = await stub.LogAction(on_behalf, metadata=as_role[Role.SERVICE])
    assert (logged.user_id, logged.username, logged.ip_address, logged.user_agent) == (
        wendy,
        "wendy",
        "2001:db8::7",
        "sso-gateway/3",
    )
    for bad, field in (
        (dict(user_id=str(uuid.uuid4())), "user_id"),
        (dict(user_id="x"), "user_id"),
        (dict(ip_address="10.0.0.300"), "ip_address"),
    ):
        error = await fails(
            stub.LogAction(
                audit_pb2.LogActionRequest(action="login", resource_type=marker, **bad),
                metadata=as_role[Role.ADMIN],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == [field]
    assert len(await rows_of(database, marker)) == 1
    await fails(
        stub.LogAction(on_behalf, metadata=as_role[Role.VIEWER]), grpc.StatusCode.PERMISSION_DENIED
    )


async def test_a_retried_log_action_is_stored_once(stub, as_role, database, marker):
    request = audit_pb2.LogActionRequest(
        action="create", resource_type=marker, request_id=str(uuid.uuid4())
    )
    first = await stub.LogAction(request, metadata=as_role[Role.DEVELOPER])
    again = await stub.LogAction(request, metadata=as_role[Role.DEVELOPER])
    assert first.id == again.id != request.request_id  # the request id is not the row's
    assert len(await rows_of(database, marker)) == 1


async def test_another_callers_request_id_does_not_return_their_row(
    stub, as_role, database, marker
):
    """A request_id is a retry only for the caller who sent it: anyone else, even with the
    same action, is refused and sees nothing of the stored row."""
    request = audit_pb2.LogActionRequest(
        action="create",
        resource_type=marker,
        details=details(secret="s3"),
        request_id=str(uuid.uuid4()),
    )
    await stub.LogAction(request, metadata=as_role[Role.DEVELOPER])
    error = await fails(
        stub.LogAction(request, metadata=as_role[Role.LEAD]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert "s3" not in error.details()
    assert len(await rows_of(database, marker)) == 1


async def test_concurrent_log_actions_each_get_their_own_outcome(stub, as_role, database, marker):
    """Calls arriving together are written together (group commit), yet each caller gets
    its own row or its own error, and an answer means the row is stored."""
    service_user = as_role[Role.SERVICE]
    retried, reused = str(uuid.uuid4()), str(uuid.uuid4())

    def request(n: int, **fields) -> audit_pb2.LogActionRequest:
        return audit_pb2.LogActionRequest(
            action="concurrent.write", resource_type=marker, resource_id=str(n), **fields
        )

    good = [request(n, details=details(n=n)) for n in range(40)]
    unknown_user = request(100, user_id=str(uuid.uuid4()))
    twice = [request(200, request_id=retried), request(200, request_id=retried)]
    clashing = [
        request(300, request_id=reused),
        audit_pb2.LogActionRequest(action="other", resource_type=marker, request_id=reused),
    ]
    calls = [*good, unknown_user, *twice, *clashing]
    outcomes = await asyncio.gather(
        *(stub.LogAction(r, metadata=service_user) for r in calls), return_exceptions=True
    )
    answered = dict(zip(map(id, calls), outcomes, strict=True))

    stored = {str(row.id): row for row in await rows_of(database, marker)}
    for call in good:
        logged = answered[id(call)]
        row = stored[logged.id]
        assert (row.resource_id, row.details) == (call.resource_id, {"n": int(call.resource_id)})
        assert logged.created_at.ToDatetime(tzinfo=UTC) == row.created_at
        assert logged.username == "ci-bot"
    error = answered[id(unknown_user)]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error_details(error)[1]] == ["user_id"]
    assert answered[id(twice[0])].id == answered[id(twice[1])].id
    clash = [answered[id(c)] for c in clashing]
    refused = [o for o in clash if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and error_details(refused[0])[0].reason == "REQUEST_ID_REUSED"
    assert len(stored) == len(good) + 2  # the retried row and one of the clashing pair


# -- LogActions --------------------------------------------------------------------------------


def batches(marker: str, total: int, size: int, bad_at: int | None = None):
    for start in range(0, total, size):
        actions = []
        for n in range(start, min(start + size, total)):
            action = "Bad Action" if n == bad_at else "bulk.write"
            actions.append(
                audit_pb2.LogActionRequest(
                    action=action, resource_type=marker, resource_id=str(n), details=details(n=n)
                )
            )
        yield audit_pb2.LogActionsRequest(actions=actions)


async def test_ten_thousand_rows_in_one_stream_all_land(stub, as_role, database, marker):
    response = await stub.LogActions(batches(marker, 10_000, 1_000), metadata=as_role[Role.SERVICE])
    assert response.count == 10_000
    async with database.transaction() as session:
        count = await session.scalar(
            select(func.count()).select_from(AuditLog).where(AuditLog.resource_type == marker)
        )
        ci_bot = await session.scalar(select(User.id).where(User.username == "ci-bot"))
        sample = await session.scalar(
            select(AuditLog).where(AuditLog.resource_type == marker, AuditLog.resource_id == "9999")
        )
    assert count == 10_000
    assert (sample.user_id, sample.details, sample.ip_address) == (ci_bot, {"n": 9999}, "127.0.0.1")


async def test_one_bad_row_keeps_nothing_of_the_stream(stub, as_role, database, marker):
    error = await fails(
        stub.LogActions(
            batches(marker, 6_000, 1_000, bad_at=5_500), metadata=as_role[Role.SERVICE]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["actions[5500].action"]
    assert await rows_of(database, marker) == []
    on_behalf = iter(
        [
            audit_pb2.LogActionsRequest(
                actions=[
                    audit_pb2.LogActionRequest(
                        action="x", resource_type=marker, user_id=str(seed_id("user", "tom"))
                    )
                ]
            )
        ]
    )
    await fails(
        stub.LogActions(on_behalf, metadata=as_role[Role.DEVELOPER]),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_a_cancelled_stream_keeps_nothing(stub, as_role, db_url, marker):
    observer = await asyncpg.connect(libpq_dsn(db_url))

    async def open_transactions() -> int:
        await observer.execute("SELECT pg_stat_clear_snapshot()")
        return await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )

    async def until(condition) -> None:
        async with asyncio.timeout(30):
            while not await condition():  # noqa: ASYNC110 - polling the database
                await asyncio.sleep(0.02)

    try:
        call = stub.LogActions(metadata=as_role[Role.SERVICE])
        for batch in batches(marker, 2_000, 1_000):
            await call.write(batch)
        await until(lambda: _positive(open_transactions()))  # the batches are written
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: _zero(open_transactions()))  # the stream's transaction has ended
        assert (
            await observer.fetchval(
                "SELECT count(*) FROM audit_logs WHERE resource_type = $1", marker
            )
            == 0
        )
    finally:
        await observer.close()


async def test_streams_cancelled_together_keep_nothing(stub, as_role, db_url):
    """gRPC tells a handler of a cancel as the end of its request stream first: with
    several streams cancelled at once, waiting one event-loop turn before committing let
    about 1 stream in 20 be stored. Forty streams, in rounds of four."""
    observer = await asyncpg.connect(libpq_dsn(db_url))
    callers = [as_role[role] for role in (Role.SERVICE, Role.ADMIN, Role.LEAD, Role.DEVELOPER)]

    try:
        stored = []
        for _ in range(10):
            marker = f"t{uuid.uuid4().hex[:12]}"
            calls = [stub.LogActions(metadata=caller) for caller in callers]
            for call in calls:
                await call.write(next(batches(marker, 1, 1)))
            await until_streams_hold(db_url, len(calls))
            for call in calls:
                call.cancel()
            await until_streams_hold(db_url, 0)
            stored.append(
                await observer.fetchval(
                    "SELECT count(*) FROM audit_logs WHERE resource_type = $1", marker
                )
            )
        assert stored == [0] * 10
    finally:
        await observer.close()


async def _positive(count) -> bool:
    return await count > 0


async def _zero(count) -> bool:
    return await count == 0


async def test_a_bulk_append_is_part_of_its_transaction(database, marker):
    """COPY goes straight to the driver; it must still roll back with its transaction."""
    row = audit_log.client_row(
        Actor.anonymous(None, None),
        request_id=(request_id := uuid.uuid4()),
        user_id=None,
        action="x",
        resource_type=marker,
        resource_id=None,
        details="{}",
        ip_address=None,
        user_agent=None,
    )
    with pytest.raises(RuntimeError):
        async with database.transaction() as session:
            await trail.append_batch(session, [row])
            raise RuntimeError("the stream failed later")
    assert await rows_of(database, marker) == []
    async with database.read() as session:  # its request id was not claimed either
        assert await session.get(AuditRequest, request_id) is None


# -- ListAuditLogs ---------------------------------------------------------------------------


async def test_listing_filters_alone_and_combined(stub, as_role, marker):
    developer, service_role = as_role[Role.DEVELOPER], as_role[Role.SERVICE]
    priya, tom = str(seed_id("user", "priya")), str(seed_id("user", "tom"))
    for user, action, resource in (
        (priya, "create", "a"),
        (priya, "update", "a"),
        (tom, "create", "b"),
        (tom, "delete", "b"),
    ):
        await stub.LogAction(
            audit_pb2.LogActionRequest(
                action=action, resource_type=marker, resource_id=resource, user_id=user
            ),
            metadata=service_role,
        )
    lead = as_role[Role.LEAD]

    async def listed(**filters):
        response = await stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(resource_type=marker, **filters)
            ),
            metadata=lead,
        )
        assert response.total_size == len(response.audit_logs)
        return [(log.username, log.action, log.resource_id) for log in response.audit_logs]

    assert await listed() == [
        ("tom", "delete", "b"),
        ("tom", "create", "b"),
        ("priya", "update", "a"),
        ("priya", "create", "a"),
    ]
    assert await listed(action="create") == [("tom", "create", "b"), ("priya", "create", "a")]
    assert await listed(user_id=priya) == [("priya", "update", "a"), ("priya", "create", "a")]
    assert await listed(resource_id="b", action="delete") == [("tom", "delete", "b")]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await listed(start_time=stamp(future)) == []
    assert (
        len(await listed(end_time=stamp(future), start_time=stamp(future - timedelta(days=1)))) == 4
    )
    await fails(
        stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(
                    start_time=stamp(future), end_time=stamp(future - timedelta(days=1))
                )
            ),
            metadata=lead,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await fails(
        stub.ListAuditLogs(audit_pb2.ListAuditLogsRequest(), metadata=developer),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_pages_visit_every_row_once_while_rows_arrive(stub, as_role, marker):
    await stub.LogActions(batches(marker, 230, 100), metadata=as_role[Role.SERVICE])
    lead = as_role[Role.LEAD]
    seen, token = [], ""
    while True:
        page = await stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(resource_type=marker),
                page_size=40,
                page_token=token,
            ),
            metadata=lead,
        )
        seen += [log.resource_id for log in page.audit_logs]
        # New rows keep arriving during the walk; they are newer than its start.
        await stub.LogAction(
            audit_pb2.LogActionRequest(action="late", resource_type=marker),
            metadata=as_role[Role.SERVICE],
        )
        token = page.next_page_token
        if not token:
            break
    walked = [r for r in seen if r]
    assert sorted(walked, key=int) == [str(n) for n in range(230)]  # each once
    assert len(seen) == len(set(zip(seen, range(len(seen)), strict=True)))
    for bad in ("%%%", "eyJ4IjoxfQ"):
        await fails(
            stub.ListAuditLogs(audit_pb2.ListAuditLogsRequest(page_token=bad), metadata=lead),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    first = await stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(resource_type=marker), page_size=5
        ),
        metadata=lead,
    )
    await fails(
        stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(
                filter=audit_pb2.AuditLogFilter(action="late"),
                page_size=5,
                page_token=first.next_page_token,
            ),
            metadata=lead,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_FILTER_MISMATCH",
    )


async def test_reading_the_trail_is_audited(stub, as_role, database, marker):
    await stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_type=marker)),
        metadata=as_role[Role.LEAD],
    )
    async with database.transaction() as session:
        row = await session.scalar(
            select(AuditLog).where(
                AuditLog.action == "audit.read",
                AuditLog.details["filter"]["resource_type"].astext == marker,
            )
        )
    assert row is not None and row.user_id == seed_id("user", "lena")


# Each common filter and the index that serves it in (created_at, id) order. A filter on
# resource_type alone, or on client rows, walks (created_at, id) (the key) and filters.
INDEX_OF_FILTER = [
    ({}, "pk_audit_logs"),
    ({"action": "create"}, "ix_audit_logs_action_created_at_id"),
    ({"user_id": uuid.UUID(int=1)}, "ix_audit_logs_user_id_created_at_id"),
    ({"resource_type": "release"}, "pk_audit_logs"),
    (
        {"resource_type": "release", "resource_id": "x"},
        "ix_audit_logs_resource_type_resource_id_created_at_id",
    ),
    (
        {"action": "create", "start_time": datetime(2026, 1, 1, tzinfo=UTC)},
        "ix_audit_logs_action_created_at_id",
    ),
    ({"origin": AuditOrigin.RELMAN}, "ix_audit_logs_relman_created_at_id"),
    ({"origin": AuditOrigin.CLIENT}, "pk_audit_logs"),
]


# A scan of one month's partition in a plan, and the index it walks.
_PARTITION_SCAN = re.compile(r"Index Scan(?: Backward)? using (\S+) on (audit_logs_y\d{4}m\d{2})")


async def _walks_only(session, plan: str, index: str) -> None:
    """Every partition the plan reads, it reads through its own part of `index` (the
    partitioned index on audit_logs), and it reads at least one."""
    driver = await driver_connection(session)
    parts = {
        row[0]
        for row in await driver.fetch(
            "SELECT i.inhrelid::regclass::text FROM pg_inherits i WHERE i.inhparent = $1::regclass",
            index,
        )
    }
    scans = _PARTITION_SCAN.findall(plan)
    assert scans, plan
    assert {used for used, _ in scans} <= parts, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan


async def _plan(session, query: str, *args) -> str:
    """EXPLAIN of `query` with its parameters bound, where only an index can serve the
    filter *and* the (created_at, id) order: no sequential or bitmap scan, no sort."""
    for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
        await session.execute(text(f"SET LOCAL {setting} = off"))
    driver = await driver_connection(session)
    return "\n".join(row[0] for row in await driver.fetch(f"EXPLAIN {query}", *args))


@pytest.mark.parametrize(("filters", "index"), INDEX_OF_FILTER, ids=str)
async def test_every_common_filter_is_served_by_an_index(database, filters, index):
    f = trail.Filter(**filters)
    query = (
        select(AuditLog)
        .where(*trail.conditions(f).values())
        .order_by(AuditLog.created_at.desc(), AuditLog.id.desc())
        .limit(51)
    )
    async with database.transaction() as session:
        compiled = query.compile(
            dialect=session.bind.dialect, compile_kwargs={"literal_binds": True}
        )
        plan = await _plan(session, str(compiled))
        await _walks_only(session, plan, index)
    assert "Index Scan Backward" in plan, plan


@pytest.mark.parametrize(("filters", "index"), INDEX_OF_FILTER, ids=str)
async def test_the_export_walks_the_index_of_its_filter(database, filters, index):
    """The export's COPY query, as export_query builds it, takes the list's filter and its
    index, oldest first, the users joined row by row (no sort of the trail)."""
    query, args = export_query(trail.Filter(**filters), raw=False)
    async with database.transaction() as session:
        plan = await _plan(session, query, *args)
        await _walks_only(session, plan, index)
    assert "Index Scan Backward" not in plan, plan


# -- ExportAuditLogs -----------------------------------------------------------------------------


async def export(stub, metadata, raw=False, form=audit_pb2.EXPORT_FORMAT_CSV, **filters) -> str:
    request = audit_pb2.ExportAuditLogsRequest(
        filter=audit_pb2.AuditLogFilter(**filters), raw=raw, format=form
    )
    return "".join([chunk.data async for chunk in stub.ExportAuditLogs(request, metadata=metadata)])


async def test_export_of_the_trail_equals_the_database(stub, as_role, database):
    exported_csv = await export(stub, as_role[Role.LEAD])
    rows = list(csv.reader(io.StringIO(exported_csv, newline="")))
    assert rows[0] == HEADER
    exported = {row[0]: row for row in rows[1:]}
    assert {str(seed_id("audit", str(n))) for n in range(20)} <= set(exported)
    async with database.transaction() as session:
        stored = (
            await session.execute(
                select(AuditLog, User.username)
                .outerjoin(User, User.id == AuditLog.user_id)
                .where(AuditLog.id.in_([uuid.UUID(i) for i in exported]))
            )
        ).all()
    assert len(stored) == len(exported)
    times = [row[1] for row in rows[1:]]
    assert times == sorted(times)  # oldest first
    for log, username in stored:
        row = exported[str(log.id)]
        assert row[1] == log.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert row[2:7] == [
            str(log.user_id or ""),
            username or "",
            log.action,
            log.resource_type,
            log.resource_id or "",
        ]
        assert json.loads(row[7]) == log.details
        assert row[8:] == [
            log.ip_address or "",
            log.user_agent or "",
            log.origin or "",
            str(log.recorded_by or ""),
            str(log.sequence),
        ]


async def test_export_keeps_awkward_text_and_defuses_formulas(stub, as_role, marker):
    service_role = as_role[Role.SERVICE]
    awkward = 'a, "quoted"\nsecond line - ünïcødé ✓'
    await stub.LogAction(
        audit_pb2.LogActionRequest(
            action="edit", resource_type=marker, resource_id=awkward, details=details(note=awkward)
        ),
        metadata=service_role,
    )
    await stub.LogAction(
        audit_pb2.LogActionRequest(
            action="edit", resource_type=marker, resource_id="=1+2", user_agent="@evil"
        ),
        metadata=service_role,
    )
    lead = as_role[Role.LEAD]
    safe = list(
        csv.DictReader(io.StringIO(await export(stub, lead, resource_type=marker), newline=""))
    )
    raw = list(
        csv.DictReader(
            io.StringIO(await export(stub, lead, raw=True, resource_type=marker), newline="")
        )
    )
    assert [r["resource_id"] for r in safe] == [awkward, "'=1+2"]
    assert [r["resource_id"] for r in raw] == [awkward, "=1+2"]
    assert safe[1]["user_agent"] == "'@evil" and raw[1]["user_agent"] == "@evil"
    assert json.loads(safe[0]["details"]) == {"note": awkward}
    empty = await export(stub, lead, resource_type=f"{marker}-none")
    assert empty == ",".join(HEADER) + "\n"


async def test_json_lines_hold_the_csv_field_by_field(stub, as_role, marker):
    """EXPORT_FORMAT_JSONL: one object per line with the CSV's fields as keys, the same
    values (null where the CSV cell is empty, details as an object), in the same order,
    raw or with formulas defused; text that JSON must escape (quotes, backslashes, a
    newline, a tab, a control character) arrives intact."""
    awkward = 'a, "quoted" \\ back\\slash\nsecond line\t\x01 ünïcødé ✓'
    for resource_id in (awkward, "=1+2", "plain"):
        await stub.LogAction(
            audit_pb2.LogActionRequest(
                action="edit",
                resource_type=marker,
                resource_id=resource_id,
                details=details(note=resource_id, n=3),
            ),
            metadata=as_role[Role.SERVICE],
        )
    lead = as_role[Role.LEAD]
    for raw in (False, True):
        table = list(
            csv.DictReader(
                io.StringIO(await export(stub, lead, raw, resource_type=marker), newline="")
            )
        )
        text = await export(stub, lead, raw, audit_pb2.EXPORT_FORMAT_JSONL, resource_type=marker)
        assert text.endswith("\n") and "\n\n" not in text
        objects = [json.loads(line) for line in text.splitlines()]
        assert len(objects) == len(table) == 3
        for cells, record in zip(table, objects, strict=True):
            assert list(record) == HEADER
            assert record["details"] == json.loads(cells["details"])
            for name in HEADER:
                if name != "details":  # sequence is a JSON number
                    assert str(record[name] or "") == cells[name], name
        assert objects[0]["resource_id"] == awkward
        assert objects[1]["resource_id"] == ("=1+2" if raw else "'=1+2")
    assert (
        await export(stub, lead, False, audit_pb2.EXPORT_FORMAT_JSONL, resource_type="none") == ""
    )


async def test_grpcurl_and_jq_give_the_same_bytes(
    relman, stub, as_role, tokens, db_url, marker, tmp_path
):
    await stub.LogActions(batches(marker, 50, 50), metadata=as_role[Role.SERVICE])
    expected = await export(stub, as_role[Role.LEAD], resource_type=marker)
    address = client_address(relman.addresses["audit_svc"])
    target = tmp_path / "audit.csv"
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        f"grpcurl -plaintext -H 'authorization: Bearer {tokens[Role.LEAD]}'"
        f' -d \'{{"filter": {{"resource_type": "{marker}"}}}}\' {address}'
        f" relman.v1.AuditService/ExportAuditLogs | jq -j .data > {target}",
        env=env_for(db_url),
    )
    assert await process.wait() == 0
    assert target.read_bytes() == expected.encode()
    env = {**env_for(db_url), "RELMAN_TOKEN": tokens[Role.LEAD]}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "audit_svc.export_cli",
        "--address",
        address,
        "--resource-type",
        marker,
        "-o",
        str(tmp_path / "cli.csv"),
        env=env,
    )
    assert await process.wait() == 0
    assert (tmp_path / "cli.csv").read_bytes() == expected.encode()


# -- a large export, in a database of its own ----------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def _load_200k_rows(url) -> str:
    """Fills the trail of a database of its own with 200,000 rows; returns an admin's token."""
    connection = await asyncpg.connect(libpq_dsn(url))
    try:
        admin_id = uuid.uuid4()
        await connection.execute(
            "INSERT INTO users (id, email, username, hashed_password, role, is_admin)"
            " VALUES ($1, 'a@x.example', 'auditor', '!', 'admin', true)",
            admin_id,
        )
        await connection.copy_records_to_table(
            "audit_logs",
            columns=["user_id", "action", "resource_type", "resource_id", "details"],
            records=(
                (admin_id, "bulk", "load", f"r{n}", json.dumps({"n": n, "pad": "x" * 80}))
                for n in range(200_000)
            ),
        )
    finally:
        await connection.close()
    from shared.persistence.db import Database

    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            admin = await session.get(User, admin_id)
            token, _ = await issue_token(session, admin, "export-test", None)
    finally:
        await database.dispose()
    return token


async def test_a_200k_row_export_keeps_memory_flat_and_a_cancel_frees_the_query(server_url):
    async with scratch_database(server_url) as url:
        token = await _load_200k_rows(url)
        process = await RelmanProcess.start(
            ["-m", "audit_svc"], env_for(url, AUDIT_SVC_ADDR="127.0.0.1:0")
        )
        try:
            address = client_address((await process.wait_listening("audit_svc"))["audit_svc"])
            async with grpc.aio.insecure_channel(address) as channel:
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                await export(stub, bearer(token), resource_type="none")  # warm up
                before = _peak_rss_kib(process.process.pid)
                lines = chunks = 0
                request = audit_pb2.ExportAuditLogsRequest()
                async for chunk in stub.ExportAuditLogs(request, metadata=bearer(token)):
                    lines += chunk.data.count("\n")
                    chunks += 1
                    assert chunk.data.endswith("\n")  # cut at row boundaries
                growth_mib = (_peak_rss_kib(process.process.pid) - before) / 1024
                assert lines == 200_000 + 1 + 2  # rows, header, both exports' own audit rows
                assert chunks > 100
                assert growth_mib < 50, f"server RSS grew {growth_mib:.1f} MiB"

                call = stub.ExportAuditLogs(request, metadata=bearer(token))
                await call.read()
                call.cancel()
            observer = await asyncpg.connect(libpq_dsn(url))
            try:
                async with asyncio.timeout(10):
                    while await observer.fetchval(  # noqa: ASYNC110 - polling the database
                        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'COPY%'"
                        " AND datname = current_database()"
                    ):
                        await asyncio.sleep(0.05)
            finally:
                await observer.close()
        finally:
            await process.stop()


# -- append-only -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_logs SET action = 'forged' WHERE id = (SELECT id FROM audit_logs LIMIT 1)",
        "DELETE FROM audit_logs WHERE id = (SELECT id FROM audit_logs LIMIT 1)",
        "TRUNCATE audit_logs",
    ],
)
async def test_the_database_refuses_to_rewrite_history(db_url, statement):
    connection = await asyncpg.connect(libpq_dsn(db_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await connection.execute(statement)
    finally:
        await connection.close()
