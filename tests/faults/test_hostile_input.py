"""Fault 6: hostile input, generated from the protos for every RPC of both services.

Hypothesis (derandomized, a fixed number of examples per RPC) builds well-formed
request messages whose values are hostile: random and malformed ids mixed with real
ones, `_UNSPECIFIED` and out-of-range enum numbers, empty, huge and NUL-containing
strings, SQL fragments, extreme numbers, deeply nested details. Every answer must be
a deliberate status, never INTERNAL, UNKNOWN or a hang; afterwards the database must
hold no partial row (the deployment rules' invariants, checked by queries) and both
servers must be healthy. Hypothesis runs in a worker thread and hands each call to
the test's event loop, where the channels live.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relman.v1 import audit_pb2, audit_pb2_grpc, auth_pb2, auth_pb2_grpc
from shared.devtools.seed import seed_id
from shared.framework.protos import rpc_methods
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, PROD, STAGING, Client
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.invariants import check_invariants
from tests.harness import bearer, client_address

EXAMPLES_PER_RPC = 30
FORBIDDEN = {"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}
SQL = [
    "'; DROP TABLE audit_logs; --",
    "' OR '1'='1",
    "1; SELECT pg_sleep(10)",
    "$1",
    "%s%s%n",
    "\\x00",
    "*/ COMMIT; /*",
]
HOSTILE_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "x" * 70_000,  # over every string limit, under the message limit
    "é" * 40_000,  # over limits counted in bytes, not characters
    "\u202e\u200b\ufeff",
    "💥" * 30,
    "../../etc/passwd",
    "=cmd|' /C calc'!A0",
    "not-a-uuid",
    "00000000-0000-0000-0000-000000000000",
    "{" + str(uuid.uuid4()) + "}",
    str(uuid.uuid4()).upper(),
    str(uuid.uuid4()) + "\x00",
    "production",
    "1.0.0",
    "v1.0.0-rc.1+build",
    "99999999999999999999.0.0",
    *SQL,
]
INT32 = [0, 1, -1, 2, 50, 1_000, 1_001, 2**31 - 1, -(2**31)]
INT64 = [*INT32, 2**63 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324]


def _struct_values(max_depth: int):
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from([0, -1, 1e308, 2**53]),
        st.sampled_from(["", "\x00", *SQL]),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
        ),
        max_leaves=20,
    )


DEEP = ("deep",)  # a Struct nested 200 levels: past protobuf's parsing depth


def _fill_struct(target: struct_pb2.Struct, value) -> None:
    """Sets a Struct field in place (a nested message cannot be assigned)."""
    if value is DEEP:
        # Built level by level: copying it would re-parse it, which protobuf refuses.
        level = target
        for _ in range(200):
            level = level.fields["a"].struct_value
    else:
        target.update(value)


class Requests:
    """Strategies for the request messages of RPCs, with ids taken from `known_ids`."""

    def __init__(self, known_ids: list[str]) -> None:
        self.ids = st.sampled_from(known_ids)
        self.text = st.one_of(
            st.sampled_from(HOSTILE_TEXT),
            self.ids,
            st.text(max_size=40),
            st.uuids().map(str),
        )

    def message(self, descriptor: d.Descriptor, depth: int = 0):
        cls = message_factory.GetMessageClass(descriptor)
        name = descriptor.full_name
        if name == "google.protobuf.Struct":
            values = st.dictionaries(st.text(max_size=10), _struct_values(4), max_size=4)
            # Too deep only at the request's top level: nested messages are copied.
            return values | st.just(DEEP) if depth == 1 else values
        if name == "google.protobuf.Timestamp":
            return st.builds(
                cls,
                seconds=st.sampled_from([0, -1, -62135596801, 253402300800, 2**62, 1_700_000_000]),
                nanos=st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
            )
        if name == "google.protobuf.FieldMask":
            return st.builds(cls, paths=st.lists(self.text, max_size=3))
        fields = {}
        for field in descriptor.fields:
            if field.type == d.FieldDescriptor.TYPE_MESSAGE and depth >= 3:
                continue
            value = self._field(field, depth)
            if field.is_repeated:
                value = st.lists(value, max_size=3)
            fields[field.name] = st.none() | value
        return st.fixed_dictionaries(fields).map(
            lambda chosen: _make(cls, {k: v for k, v in chosen.items() if v is not None})
        )

    def _field(self, field: d.FieldDescriptor, depth: int):
        kind = field.type
        if kind == d.FieldDescriptor.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        if kind == d.FieldDescriptor.TYPE_ENUM:
            numbers = [value.number for value in field.enum_type.values]
            return st.sampled_from([*numbers, max(numbers) + 1, 99, -1, 2**31 - 1])
        if kind == d.FieldDescriptor.TYPE_STRING:
            return self.text
        if kind == d.FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
            return st.sampled_from(FLOATS)
        if kind in (d.FieldDescriptor.TYPE_INT64, d.FieldDescriptor.TYPE_SINT64):
            return st.sampled_from(INT64)
        if kind == d.FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=32)
        return st.sampled_from(INT32)


def _make(cls, values: dict):
    message = cls()
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        struct = (
            field.type == d.FieldDescriptor.TYPE_MESSAGE
            and field.message_type.full_name == "google.protobuf.Struct"
        )
        if field.is_repeated:
            for item in value:
                if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    target.add().MergeFrom(item)
                else:
                    target.append(item)
        elif struct:
            _fill_struct(target, value)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
            target.MergeFrom(value)
        else:
            setattr(message, name, value)
    return message


METHODS = [(method.containing_service, method) for method in rpc_methods()]


@pytest.fixture(scope="module")
async def hostile_stack(fault_db, fault_tokens):
    """Both services, and ids of real rows for the generated requests to mix in."""
    service_id = await new_service_id(fault_db)
    async with services(fault_db) as running:
        lead = Client(running.deploy_channel, fault_tokens["lena"])
        release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
        deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
        known = [
            service_id,
            release.id,
            deployment.id,
            deployment.stages[0].id,
            DEV,
            STAGING,
            PROD,
            str(seed_id("team", "Platform")),
            str(seed_id("user", "victor")),
        ]
        yield running, known


async def _call(channel: grpc.aio.Channel, path: str, method, request, token: str) -> str:
    codec = {
        "request_serializer": lambda message: message.SerializeToString(),
        "response_deserializer": bytes,
    }
    options = {"metadata": bearer(token), "timeout": 10}
    try:
        if method.client_streaming and method.server_streaming:
            async for _ in channel.stream_stream(path, **codec)(iter([request]), **options):
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **codec)(iter([request, request]), **options)
        elif method.server_streaming:
            call = channel.unary_stream(path, **codec)(request, **options)
            async for _ in call:  # a watch that would run on: two messages are enough
                break
            call.cancel()
        else:
            await channel.unary_unary(path, **codec)(request, **options)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


@pytest.mark.parametrize(
    ("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS]
)
async def test_hostile_requests_get_a_deliberate_answer(
    hostile_stack, fault_tokens, service, method
):
    running, known = hostile_stack
    channel = running.audit_channel if service.name == "AuditService" else running.deploy_channel
    path = f"/{service.full_name}/{method.name}"
    loop = asyncio.get_running_loop()
    requests = Requests(known)
    seen: collections.Counter = collections.Counter()
    # The admin reaches every rule; a lead and the service user meet the permission checks.
    tokens = st.sampled_from([fault_tokens["admin"], fault_tokens["lena"], fault_tokens["ci-bot"]])
    if method.name == "Logout":  # it revokes the token it is called with: one of its own
        login = await auth_pb2_grpc.AuthServiceStub(running.deploy_channel).Login(
            auth_pb2.LoginRequest(username="marco", password="password123")
        )
        tokens = st.just(login.access_token)

    @settings(
        max_examples=EXAMPLES_PER_RPC,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=requests.message(method.input_type), token=tokens)
    def answer(request, token):
        code = asyncio.run_coroutine_threadsafe(
            _call(channel, path, method, request, token), loop
        ).result(timeout=30)
        seen[code] += 1
        assert code not in FORBIDDEN, (code, request)

    await asyncio.to_thread(answer)
    assert seen  # fewer than EXAMPLES_PER_RPC when the request has few fields to vary
    _ANSWERS[path] = seen


_ANSWERS: dict[str, collections.Counter] = {}


async def test_sql_fragments_are_stored_verbatim_and_oversize_requests_refused(
    hostile_stack, fault_tokens, fault_report
):
    running, known = hostile_stack
    audit = audit_pb2_grpc.AuditServiceStub(running.audit_channel)
    lead = Client(running.deploy_channel, fault_tokens["lena"])
    auth = bearer(fault_tokens["ci-bot"])
    for fragment in SQL:
        logged = await audit.LogAction(
            audit_pb2.LogActionRequest(
                action="fault.sql",
                resource_type="fault",
                resource_id=fragment,
                details=_struct({"query": fragment}),
            ),
            metadata=auth,
        )
        assert (logged.resource_id, logged.details["query"]) == (fragment, fragment)
        release = await lead.CreateRelease(
            service_id=known[0], version=f"3.{SQL.index(fragment)}.0", release_notes=fragment
        )
        assert (await lead.GetRelease(release_id=release.id)).release_notes == fragment
    # Above the 4 MiB message limit: refused before any handler runs.
    huge = audit_pb2.LogActionRequest(action="fault.huge", resource_type="x" * (5 * 2**20))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit.LogAction(huge, metadata=auth)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
        await audit.LogActions(iter([audit_pb2.LogActionsRequest(actions=[huge])]), metadata=auth)
    assert refused_stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fault_report(
        f"{len(SQL)} SQL fragments as audit resource ids, details and release notes: read "
        "back verbatim; a 5 MiB LogAction and LogActions message: RESOURCE_EXHAUSTED"
    )


def _struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


async def test_after_the_hostile_inputs_the_data_and_the_servers_are_sound(
    hostile_stack, fault_db, fault_report
):
    running, _ = hostile_stack
    for process, name, channel in (
        (running.deploy, "relman.v1.DeployService", running.deploy_channel),
        (running.audit, "relman.v1.AuditService", running.audit_channel),
    ):
        assert process.process.returncode is None
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", name):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # Raw garbage on the wire: not HTTP/2, then an HTTP/2 preface followed by junk frames.
    for address in (running.deploy.addresses["deploy_svc"], running.audit.addresses["audit_svc"]):
        host, _, port = client_address(address).rpartition(":")
        for junk in (os.urandom(4096), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096)):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(junk)
            await writer.drain()
            await reader.read()  # the server closes the connection
            writer.close()
    still = health_pb2_grpc.HealthStub(running.deploy_channel)
    answer = await still.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert_no_internal_errors(running)
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        tables = await db.fetchval(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('audit_logs', 'deployments')"
        )
        assert tables == 2  # SQL fragments were data, never statements
        await check_invariants(db)
        verbatim = await db.fetchval(
            "SELECT count(*) FROM audit_logs WHERE resource_id = ANY($1::text[])"
            " AND details->>'query' = resource_id",
            SQL,
        )
    finally:
        await db.close()
    total = sum(sum(counter.values()) for counter in _ANSWERS.values())
    codes = collections.Counter()
    for counter in _ANSWERS.values():
        codes.update(counter)
    fault_report(
        f"{total} generated hostile requests over {len(_ANSWERS)} RPCs (up to {EXAMPLES_PER_RPC} "
        f"each): {dict(sorted(codes.items()))}; never INTERNAL, UNKNOWN or a hang; "
        f"{verbatim} audit rows hold an SQL fragment verbatim; raw garbage on both ports; "
        "both servers SERVING; every invariant of the deployment rules holds"
    )
