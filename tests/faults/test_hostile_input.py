"""Fault 6: hostile input, generated from the protos for every RPC of both services.

Hypothesis (derandomized, a fixed number of examples per RPC) builds well-formed
request messages whose values are hostile: random and malformed ids mixed with real
ones, `_UNSPECIFIED` and out-of-range enum numbers, empty, huge and NUL-containing
strings, SQL fragments, extreme numbers, deeply nested details. Every answer must be
a deliberate status, never INTERNAL, UNKNOWN or a hang; afterwards the database must
hold no partial row (the deployment rules' invariants, checked by queries) and both
servers must be healthy. Hypothesis runs in a worker thread and hands each call to
the test's event loop, where the channels live.

The environment policy and freeze window RPCs (issue 18) get two more: a table of
requests each wrong in one way only (policy fields and update masks, stale etags, window
forms, crons, zones, times, forged page tokens, override reasons, callers without the
right), each of which must get its own status and leave the database as it was; and
generated requests that mix the real field names and values with hostile ones, scoped to
an environment of the test's own so that no window or policy reaches another test.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import math
import os
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import field_mask_pb2, message_factory, struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relman.v1 import audit_pb2, audit_pb2_grpc, auth_pb2, auth_pb2_grpc, common_pb2
from shared.devtools.seed import seed_id
from shared.framework.protos import rpc_methods
from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, PROD, STAGING, Client, S
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


# -- environment policies and freeze windows (issue 18) ---------------------------------------

# Each case: (what, RPC, caller, request fields, the codes it may get). Every request is
# well formed and wrong in one way only, so each must be refused and change nothing.
INVALID = {"INVALID_ARGUMENT"}
UNKNOWN_ID = {"NOT_FOUND"}
DENIED = {"PERMISSION_DENIED"}
BAD_IDS = ["", "not-a-uuid", str(uuid.uuid4()) + "\x00", "{" + str(uuid.uuid4()) + "}", SQL[0]]
BAD_TEXT_1000 = ["x" * 1001, "é" * 1001, "\x00", "a\x00b", "x" * 70_000]
OUT_OF_RANGE = [(253402300800, 0), (-62135596801, 0), (2**62, 0), (1_700_000_000, -1)]
# A valid cron longer than a column of 200 characters would take.
LONG_CRON = ",".join(str(m) for m in range(60)) + " " + ",".join(str(h) for h in range(24))
LONG_CRON += " * * *"


def _stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _at(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _forged_page_token(created_at: str, row_id: str, filters: dict) -> str:
    """A page token as a client could forge one: the format is plain JSON in base64 and
    the filters' fingerprint a public hash."""
    canonical = json.dumps(filters, sort_keys=True, default=str, separators=(",", ":"))
    payload = {"k": [created_at, row_id], "f": hashlib.sha256(canonical.encode()).hexdigest()[:16]}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _policy_cases(production: str, etag: str) -> list:
    def update(environment_id=production, tag="", paths=None, **fields):
        return {
            "policy": common_pb2.EnvironmentPolicy(
                environment_id=environment_id, etag=tag, **fields
            ),
            "update_mask": field_mask_pb2.FieldMask(paths=list(fields) if paths is None else paths),
        }

    roles = S
    cases = []
    for value in (-1, 11, 2**31 - 1, -(2**31)):
        cases.append(("required_approvals", update(required_approvals=value), INVALID))
    for value in (
        [],
        [0],
        [roles.ROLE_DEVELOPER],
        [roles.ROLE_VIEWER],
        [roles.ROLE_SERVICE],
        [99],
        [-1],
        [roles.ROLE_ADMIN, 99],
        [2**31 - 1],
    ):
        cases.append(("approver_roles", update(approver_roles=value), INVALID))
    for value in ([], [0], [roles.ROLE_VIEWER], [roles.ROLE_SERVICE], [99], [roles.ROLE_LEAD, -5]):
        cases.append(("deployer_roles", update(deployer_roles=value), INVALID))
    for value in (
        [""],
        ["\x00"],
        ["a\x00b"],
        ["x" * 101],
        ["é" * 101],
        ["build", "build"],
        [f"s{i}" for i in range(21)],
        ["x" * 70_000],
    ):
        cases.append(("required_stages", update(required_stages=value), INVALID))
    for value in (-1, 43_201, 2**31 - 1, -(2**31)):
        cases.append(("bake_minutes", update(bake_minutes=value), INVALID))
    for paths in (
        [],
        ["nope"],
        [""],
        ["\x00"],
        ["*"],
        ["policy.required_approvals"],
        ["required_approvals.x"],
        ["etag"],
        ["environment_id"],
        ["pending_change"],
        ["update_time"],
        ["bake_minutes", "nope"],
        [SQL[0]],
        ["x" * 70_000],
    ):
        cases.append(("update_mask", update(paths=paths, bake_minutes=5), INVALID))
    for environment_id in BAD_IDS:
        cases.append(("environment_id", update(environment_id, bake_minutes=5), INVALID))
    cases.append(("unknown environment", update(str(uuid.uuid4()), bake_minutes=5), UNKNOWN_ID))
    for tag in (
        "0",
        "-1",
        str(int(etag) + 1),
        str(int(etag) - 1),
        "99999999999999999999",
        " " + etag,
        etag + "\x00",
        "x" * 70_000,
        SQL[1],
    ):
        cases.append(("stale etag", update(tag=tag, bake_minutes=5), {"ABORTED"}))
    return [("UpdateEnvironmentPolicy", "admin", *case) for case in cases] + [
        ("UpdateEnvironmentPolicy", caller, "not an admin", update(bake_minutes=5), DENIED)
        for caller in ("lena", "priya", "ci-bot")
    ]


def _freeze_cases(environment_id: str, service_id: str, future_window: str) -> list:
    later = datetime.now(UTC) + timedelta(days=10)
    one_off = {"start_time": _at(later), "end_time": _at(later + timedelta(days=1))}
    recurring = {"cron": "0 3 * * *", "time_zone": "UTC", "duration_minutes": 60}
    scope = {"environment_id": environment_id, "service_id": service_id, "reason": "hostile"}

    def window(form=None, **fields):
        form = one_off if form is None else form
        return {"freeze_window": common_pb2.FreezeWindow(**{**scope, **form, **fields})}

    now = datetime.now(UTC)
    cases = [
        ("end before start", window(end_time=_at(later - timedelta(hours=1))), INVALID),
        ("end at start", window(end_time=_at(later)), INVALID),
        (
            "in the past",
            window(
                {
                    "start_time": _at(now - timedelta(hours=2)),
                    "end_time": _at(now - timedelta(hours=1)),
                }
            ),
            INVALID,
        ),
        ("start only", window({"start_time": _at(later)}), INVALID),
        ("end only", window({"end_time": _at(later)}), INVALID),
        ("neither form", window({}), INVALID),
        ("both forms", window({**one_off, **recurring}), INVALID),
        ("one-off and a cron", window({**one_off, "cron": "0 3 * * *"}), INVALID),
        ("one-off and a zone", window({**one_off, "time_zone": "UTC"}), INVALID),
        ("one-off and a duration", window({**one_off, "duration_minutes": 60}), INVALID),
        ("cron alone", window({"cron": "0 3 * * *"}), INVALID),
        ("zone and duration alone", window({"time_zone": "UTC", "duration_minutes": 9}), INVALID),
    ]
    for seconds, nanos in OUT_OF_RANGE:
        cases.append(("start out of range", window(start_time=_stamp(seconds, nanos)), INVALID))
        cases.append(("end out of range", window(end_time=_stamp(seconds, nanos)), INVALID))
    cases.append(("nanos over", window(end_time=_stamp(int(later.timestamp()), 10**9)), INVALID))
    for cron in (
        "",
        " ",
        "* * * *",
        "* * * * * *",
        "61 * * * *",
        "*/0 * * * *",
        "0 0 30 2 *",
        "a b c d e",
        "\x00 * * * *",
        "0 0 1W * *",
        "@yearly",
        SQL[2],
        "x" * 70_000,
        "9" * 40 + " * * * *",
    ):
        cases.append(("cron", window(recurring, cron=cron), INVALID))
    for zone in (
        "",
        "Mars/Olympus",
        "../../etc/passwd",
        "UTC\x00",
        "Europe/Berlin ",
        "/etc/localtime",
        "Europe",
        "zone.tab",
        "x" * 300,
        "x" * 70_000,
        SQL[0],
    ):
        what = f"time zone {zone[:16]!r} ({len(zone)} characters)"
        cases.append((what, window(recurring, time_zone=zone), INVALID))
    for minutes in (0, -1, 44_641, 2**31 - 1, -(2**31)):
        cases.append(("duration", window(recurring, duration_minutes=minutes), INVALID))
    for reason in ["", " ", *BAD_TEXT_1000]:
        cases.append(("reason", window(reason=reason), INVALID))
    for field in ("environment_id", "service_id"):
        for bad in BAD_IDS[1:]:
            cases.append((field, window(**{field: bad}), INVALID))
        cases.append((f"unknown {field}", window(**{field: str(uuid.uuid4())}), UNKNOWN_ID))
    cases.append(("a service as environment", window(environment_id=service_id), UNKNOWN_ID))
    for request_id in ("not-a-uuid", "x" * 70_000, "\x00"):
        cases.append(("request_id", {**window(), "request_id": request_id}, INVALID))
    calls = [("CreateFreezeWindow", "lena", *case) for case in cases]
    calls += [
        ("CreateFreezeWindow", caller, "not a lead", window(), DENIED)
        for caller in ("priya", "ci-bot")
    ]

    filters = {"environment_id": "", "service_id": "", "active_at": ""}
    row = str(uuid.uuid4())
    for seconds, nanos in OUT_OF_RANGE:
        listing = {"active_at": _stamp(seconds, nanos)}
        calls.append(("ListFreezeWindows", "lena", "active_at", listing, INVALID))
    tokens = {
        "garbage": "garbage",
        "an SQL fragment": SQL[0],
        "70,000 characters": "x" * 70_000,
        "NUL": "\x00",
        "base64 JSON of another shape": base64.urlsafe_b64encode(b'{"a":1}').decode(),
        "forged, a time without a zone": _forged_page_token("2026-01-01T00:00:00", row, filters),
        "forged, year 1": _forged_page_token("0001-01-01T00:00:00+00:00", row, filters),
        "forged, past year 9999 in UTC": _forged_page_token(
            "9999-12-31T23:59:59.999999-14:00", row, filters
        ),
        "forged, a bad id": _forged_page_token("2026-01-01T00:00:00+00:00", "nope", filters),
    }
    well_formed = {"forged, a time without a zone", "forged, year 1"}  # a place to start from
    for what, token in tokens.items():
        listing = {"page_token": token}
        expected = {"OK"} if what in well_formed else INVALID
        calls.append(("ListFreezeWindows", "lena", f"page_token {what}", listing, expected))
    calls += [
        ("ListFreezeWindows", "lena", "page_size", {"page_size": -1}, INVALID),
        ("ListFreezeWindows", "lena", "huge page_size", {"page_size": 2**31 - 1}, {"OK"}),
        *[
            ("ListFreezeWindows", "lena", "environment_id", {"environment_id": bad}, INVALID)
            for bad in BAD_IDS[1:]
        ],
        *[
            ("ListFreezeWindows", "lena", "service_id", {"service_id": bad}, INVALID)
            for bad in BAD_IDS[1:]
        ],
    ]
    for bad in BAD_IDS:
        calls.append(("DeleteFreezeWindow", "admin", "id", {"freeze_window_id": bad}, INVALID))
    for unknown in (str(uuid.uuid4()), environment_id, service_id):
        calls.append(
            ("DeleteFreezeWindow", "admin", "unknown id", {"freeze_window_id": unknown}, UNKNOWN_ID)
        )
    for caller in ("lena", "priya", "ci-bot"):
        calls.append(
            (
                "DeleteFreezeWindow",
                caller,
                "not an admin",
                {"freeze_window_id": future_window},
                DENIED,
            )
        )
    return calls


def _deploy_cases(environment_id: str, release_id: str, production: str) -> list:
    """Into `environment_id`, frozen now by a window of its own: reasons that are no reason,
    overrides by those who may not override, and CheckPromotion, which writes nothing."""
    cases = []
    for reason in BAD_TEXT_1000:
        for rpc, target in (
            ("PromoteRelease", "target_environment_id"),
            ("CreateDeployment", "environment_id"),
        ):
            fields = {"release_id": release_id, target: environment_id}
            cases.append(
                (rpc, "admin", "reason", {**fields, "freeze_override_reason": reason}, INVALID)
            )
    promote = {"release_id": release_id, "target_environment_id": environment_id}
    cases += [
        (
            "PromoteRelease",
            "lena",
            "a lead's override",
            {**promote, "freeze_override_reason": SQL[0]},
            {"PERMISSION_DENIED"},
        ),
        (
            "PromoteRelease",
            "priya",
            "a developer's override",
            {**promote, "freeze_override_reason": "urgent"},
            {"PERMISSION_DENIED"},
        ),
        (
            "PromoteRelease",
            "ci-bot",
            "the service user's override",
            {**promote, "freeze_override_reason": "urgent"},
            {"PERMISSION_DENIED"},
        ),
        ("PromoteRelease", "admin", "no reason", promote, {"FAILED_PRECONDITION"}),
        (
            "PromoteRelease",
            "admin",
            "a blank reason",
            {**promote, "freeze_override_reason": " "},
            {"FAILED_PRECONDITION"},
        ),
        (
            "CreateDeployment",
            "admin",
            "bad stages with a reason",
            {
                "release_id": release_id,
                "environment_id": environment_id,
                "stage_names": ["", "\x00"],
                "freeze_override_reason": "urgent",
            },
            INVALID,
        ),
        (
            "PromoteRelease",
            "admin",
            "a reason to production out of order",
            {
                "release_id": release_id,
                "target_environment_id": production,
                "freeze_override_reason": "urgent",
            },
            {"FAILED_PRECONDITION"},
        ),
    ]
    check = {"release_id": release_id, "target_environment_id": environment_id}
    for field in ("release_id", "target_environment_id"):
        for bad in BAD_IDS:
            cases.append(("CheckPromotion", "lena", field, {**check, field: bad}, INVALID))
        cases.append(
            (
                "CheckPromotion",
                "lena",
                "unknown " + field,
                {**check, field: str(uuid.uuid4())},
                UNKNOWN_ID,
            )
        )
    # A service user lacks deployments.read.
    cases.append(("CheckPromotion", "ci-bot", "the service user", check, DENIED))
    for bad in BAD_IDS:
        cases.append(("GetEnvironmentPolicy", "lena", "id", {"environment_id": bad}, INVALID))
    cases.append(
        (
            "GetEnvironmentPolicy",
            "lena",
            "unknown",
            {"environment_id": str(uuid.uuid4())},
            UNKNOWN_ID,
        )
    )
    # A CI pipeline (the service user has catalog.read) may read the rules it deploys under.
    cases.append(
        ("GetEnvironmentPolicy", "ci-bot", "service user", {"environment_id": production}, {"OK"})
    )
    return cases


# What a refused call may leave: the audit row of a refused permission.
_EVERYTHING = """
    SELECT (SELECT count(*) FROM deployments) AS deployments,
           (SELECT count(*) FROM pipeline_stages) AS stages,
           (SELECT count(*) FROM approvals) AS approvals,
           (SELECT count(*) FROM releases) AS releases,
           (SELECT count(*) FROM environments) AS environments,
           (SELECT jsonb_agg(to_jsonb(w) ORDER BY w.id) FROM freeze_windows w) AS windows,
           (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.id) FROM environment_policies p) AS policies,
           (SELECT count(*) FROM audit_logs WHERE action <> 'auth.denied') AS audit_rows"""


async def test_hostile_policy_freeze_and_override_requests_are_refused_and_change_nothing(
    hostile_stack, fault_db, fault_tokens, fault_report
):
    """The new RPCs (and freeze_override_reason) fed requests that are well formed and wrong
    in one way each: every one is refused with its deliberate status (never INTERNAL) and
    the database is as it was (policies, windows, deployments, audit rows)."""
    running, _ = hostile_stack
    since = _lines_now(running)
    clients = {name: Client(running.deploy_channel, token) for name, token in fault_tokens.items()}
    admin = clients["admin"]
    # Everything of its own: a frozen development environment, a production one, a service.
    frozen = await admin.CreateEnvironment(
        name=f"hostile-dev-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    production = await admin.CreateEnvironment(
        name=f"hostile-prod-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    service_id = await new_service_id(fault_db)
    release = await clients["lena"].CreateRelease(service_id=service_id, version="1.0.0")
    now = datetime.now(UTC)
    await admin.CreateFreezeWindow(
        freeze_window=common_pb2.FreezeWindow(
            environment_id=frozen.id,
            reason="frozen for the hostile inputs",
            start_time=_at(now - timedelta(minutes=1)),
            end_time=_at(now + timedelta(hours=3)),
        )
    )
    future = await admin.CreateFreezeWindow(
        freeze_window=common_pb2.FreezeWindow(
            environment_id=frozen.id,
            service_id=service_id,
            reason="later",
            start_time=_at(now + timedelta(days=30)),
            end_time=_at(now + timedelta(days=31)),
        )
    )
    policy = await admin.GetEnvironmentPolicy(environment_id=production.id)
    cases = [
        *_policy_cases(production.id, policy.etag),
        *_freeze_cases(frozen.id, service_id, future.id),
        *_deploy_cases(frozen.id, release.id, production.id),
    ]
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        before = dict(await db.fetchrow(_EVERYTHING))
        seen: collections.Counter = collections.Counter()
        wrong = []
        for rpc, caller, what, fields, expected in cases:
            code, details = await _answer_with_details(getattr(clients[caller], rpc)(**fields))
            seen[code] += 1
            if code not in expected:
                wrong.append(f"{rpc} by {caller}, {what}: {code} ({details})")
        after = dict(await db.fetchrow(_EVERYTHING))
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        # A valid cron longer than 200 characters: kept or refused, but deliberately.
        long_cron, details = await _answer_with_details(
            clients["lena"].CreateFreezeWindow(
                freeze_window=common_pb2.FreezeWindow(
                    environment_id=frozen.id,
                    service_id=service_id,
                    reason="every minute, listed",
                    cron=LONG_CRON,
                    time_zone="UTC",
                    duration_minutes=1,
                )
            )
        )
        if long_cron not in {"OK", "INVALID_ARGUMENT"}:
            wrong.append(f"CreateFreezeWindow by lena, a long valid cron: {long_cron} ({details})")
        checked = await check_invariants(db)
    finally:
        await db.close()
    internal = _unexpected_errors_since(running, since)
    failures = [
        *(["answers other than expected:", *wrong] if wrong else []),
        *([f"changed: {changed}"] if changed else []),
        *(["unexpected errors logged:", *internal] if internal else []),
    ]
    assert not failures, "\n".join(failures)
    fault_report(
        f"{len(cases)} hostile requests to the policy, freeze window and promotion RPCs "
        f"(UpdateEnvironmentPolicy {sum(c[0] == 'UpdateEnvironmentPolicy' for c in cases)}, "
        f"CreateFreezeWindow {sum(c[0] == 'CreateFreezeWindow' for c in cases)}, the rest "
        f"List/Delete/CheckPromotion/Get/overrides) -> {dict(seen)}, each the status its case "
        f"expects; nothing in the database changed; a {len(LONG_CRON)}-character valid cron "
        f"-> {long_cron}; all {checked} invariants hold"
    )


def _unexpected_errors_since(running, since: dict) -> list[str]:
    """The exception of each unexpected error the services logged after `since` (line
    counts per process), one line each: earlier tests share the processes."""
    found = []
    for name, process in (("deploy", running.deploy), ("audit", running.audit)):
        for line in process.lines[since[name] :]:
            if '"unexpected error"' in line:
                try:
                    lines = json.loads(line)["exc"].strip().splitlines()
                except (ValueError, KeyError):
                    lines = [line]
                errors = [x for x in lines if "Error" in x and not x.startswith(("[", " "))]
                found.append((errors or lines)[-1][:300])
    return found


def _lines_now(running) -> dict:
    return {"deploy": len(running.deploy.lines), "audit": len(running.audit.lines)}


async def _answer_with_details(call) -> tuple[str, str]:
    """How a call ended: "OK" or its code, with the start of the error's message."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name, (error.details() or "")[:160]
    return "OK", ""


# Requests built from the policy and window fields' own names and values, valid and not,
# mixed: combinations the table above does not try. Every scope is an environment of the
# test's own (never "every environment", which would freeze the other tests). The values
# the table already finds mishandled are left out here, so that this looks further.
POLICY_FIELDS = ["required_approvals", "approver_roles", "deployer_roles", "required_stages",
                 "bake_minutes"]  # fmt: skip
STAGE_NAMES = ["build", "test", "security_scan", "deploy", "smoke_test", "canary", "", "\x00",
               "x" * 101, "é" * 100, SQL[0], "\u202e"]  # fmt: skip
CRONS = ["0 22 * * *", "30 2 * * *", "0 0 29 2 *", "0 0 29 2 mon", "*/7 * * * *", "0 0 L * *",
         "0 0 * * 5L", "0 0 * * 7#5", "59 23 31 12 *", "0 0 30 2 *", "* * * *", "61 * * * *",
         "", SQL[2], "\x00"]  # fmt: skip
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kathmandu", "Pacific/Chatham",
         "Australia/Lord_Howe", "Pacific/Kiritimati", "Factory", "posixrules", "Mars/Olympus",
         "", "UTC\x00"]  # fmt: skip
INSTANTS = [  # around daylight saving changes, the edges of time, now
    datetime(2027, 3, 28, 0, 59, tzinfo=UTC),
    datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
    datetime(2027, 10, 31, 0, 30, tzinfo=UTC),
    datetime(2027, 10, 31, 1, 30, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
]


def _mixed_requests(environment_id: str, service_id: str, release_id: str):
    """(RPC, caller, fields) strategies, valid values more often than not; an "etag" of
    "current" is filled in with the policy's current one."""
    ints = st.sampled_from([0, 1, 2, 3, 10, 60, 0, 1, 2, 3, 11, -1, 43_201, 2**31 - 1])
    roles = st.lists(st.sampled_from([1, 2, 3, 1, 2, 3, 1, 2, 0, 4, 5, 99, -1]), max_size=4)
    stages = st.lists(st.sampled_from(STAGE_NAMES[:6] * 3 + STAGE_NAMES), max_size=22)
    environment = st.sampled_from([environment_id] * 6 + ["not-a-uuid", str(uuid.uuid4())])
    policy = st.builds(
        lambda paths, approvals, approvers, deployers, names, bake, etag, env: (
            "UpdateEnvironmentPolicy",
            "admin",
            {
                "policy": common_pb2.EnvironmentPolicy(
                    environment_id=env,
                    required_approvals=approvals,
                    approver_roles=approvers,
                    deployer_roles=deployers,
                    required_stages=names,
                    bake_minutes=bake,
                    etag=etag,
                ),
                "update_mask": field_mask_pb2.FieldMask(paths=paths),
            },
        ),
        st.lists(st.sampled_from([*POLICY_FIELDS * 4, "nope"]), min_size=1, max_size=4),
        ints,
        roles,
        roles,
        stages,
        ints,
        st.sampled_from(["", "current", "current", "0", "junk"]),
        environment,
    )
    offsets = st.sampled_from([timedelta(minutes=m) for m in (-120, -1, 0, 1, 90, 57_600)])

    def window(caller, service, reason, start=None, end=None, cron="", zone="", minutes=0):
        now = datetime.now(UTC)
        fields = {"environment_id": environment_id, "service_id": service, "reason": reason}
        if start is not None:
            fields["start_time"] = _at(now + start)
        if end is not None:
            fields["end_time"] = _at(now + end)
        fields.update(cron=cron, time_zone=zone, duration_minutes=minutes)
        return ("CreateFreezeWindow", caller, {"freeze_window": common_pb2.FreezeWindow(**fields)})

    who = {
        "caller": st.sampled_from(["lena", "admin", "lena", "admin", "priya"]),
        "service": st.sampled_from([service_id, "", "not-a-uuid"]),
        "reason": st.sampled_from(["freeze", "freeze", SQL[0], "", "x" * 1001, "\x00"]),
    }
    crons = st.sampled_from(CRONS)
    zones = st.sampled_from(ZONES)
    minutes = st.sampled_from([1, 60, 120, 1440, 44_640, 0, 44_641, -1])
    windows = st.one_of(
        st.builds(window, **who, start=offsets, end=offsets),
        st.builds(window, **who, cron=crons, zone=zones, minutes=minutes),
        st.builds(  # parts of both forms
            window, **who, start=offsets | st.none(), end=offsets | st.none(), cron=crons,
            zone=zones | st.just(""), minutes=minutes | st.just(0),
        ),
    )  # fmt: skip
    listings = st.builds(
        lambda at, env, service, size: (
            "ListFreezeWindows",
            "lena",
            {
                "environment_id": env,
                "service_id": service,
                "page_size": size,
                **({"active_at": _at(at)} if at else {}),
            },
        ),
        st.sampled_from([*INSTANTS, None]),
        st.sampled_from([environment_id, ""]),
        st.sampled_from([service_id, ""]),
        st.sampled_from([0, 1, 2, 1000]),
    )
    deploys = st.builds(
        lambda rpc, caller, reason: (
            rpc,
            caller,
            {"release_id": release_id, "target_environment_id": environment_id}
            | ({"freeze_override_reason": reason} if rpc == "PromoteRelease" else {}),
        ),
        st.sampled_from(["PromoteRelease", "CheckPromotion"]),
        st.sampled_from(["admin", "lena", "priya", "ci-bot"]),
        st.sampled_from(["", "urgent", SQL[0], "x" * 1001]),
    )
    return st.one_of(policy, windows, windows, listings, deploys)


async def test_policy_and_freeze_requests_mixing_real_and_hostile_parts(
    hostile_stack, fault_db, fault_tokens, fault_report
):
    """Generated requests to UpdateEnvironmentPolicy, CreateFreezeWindow, ListFreezeWindows,
    PromoteRelease and CheckPromotion for an environment of the test's own, with real field
    names and values mixed with hostile ones: never INTERNAL, UNKNOWN, UNAVAILABLE (the
    database is up) or a hang; afterwards every invariant holds."""
    running, _ = hostile_stack
    since = _lines_now(running)
    clients = {name: Client(running.deploy_channel, token) for name, token in fault_tokens.items()}
    environment = await clients["admin"].CreateEnvironment(
        name=f"hostile-mix-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    service_id = await new_service_id(fault_db)
    release = await clients["lena"].CreateRelease(service_id=service_id, version="1.0.0")
    loop = asyncio.get_running_loop()
    seen: collections.Counter = collections.Counter()

    async def call(rpc: str, caller: str, fields: dict) -> tuple[str, str]:
        if rpc == "UpdateEnvironmentPolicy" and fields["policy"].etag == "current":
            read = await clients["admin"].GetEnvironmentPolicy(environment_id=environment.id)
            fields["policy"].etag = read.etag
        return await _answer_with_details(getattr(clients[caller], rpc)(**fields))

    @settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=_mixed_requests(environment.id, service_id, release.id))
    def answer(request):
        rpc, caller, fields = request
        code, details = asyncio.run_coroutine_threadsafe(call(rpc, caller, fields), loop).result(
            timeout=30
        )
        seen[(rpc, code)] += 1
        assert code not in FORBIDDEN | {"UNAVAILABLE"}, (
            rpc,
            caller,
            fields,
            code,
            details,
            _unexpected_errors_since(running, since)[-1:],
        )

    await asyncio.to_thread(answer)
    assert not (internal := _unexpected_errors_since(running, since)), internal
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        checked = await check_invariants(db)
        windows = await db.fetchval(
            "SELECT count(*) FROM freeze_windows WHERE environment_id = $1",
            uuid.UUID(environment.id),
        )
    finally:
        await db.close()
    by_rpc: dict[str, dict] = collections.defaultdict(dict)
    for (rpc, code), n in sorted(seen.items()):
        by_rpc[rpc][code] = n
    fault_report(
        f"{sum(seen.values())} generated requests mixing real and hostile policy, window and "
        f"promotion fields -> {dict(by_rpc)}; {windows} windows made for the test's own "
        f"environment; never INTERNAL, UNKNOWN, UNAVAILABLE or a hang; all {checked} "
        "invariants hold"
    )


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
