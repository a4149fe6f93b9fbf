"""Names for people (AIP-122): every id field of every request takes the resource's name.

Table-driven from the proto descriptors, as a user would find them: every request field
named like an id of a named resource (SECTION_13_FIELDS), at any depth, and the `id` and
`resource_name` of a resource message an update carries. For each such field of each RPC:
a name gives the same answer as the id it stands for; a well-formed name of nothing is
NOT_FOUND naming the field; a value that is neither a UUID nor a name of that kind is
INVALID_ARGUMENT naming the field. A new RPC or field is covered without a line here.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor

from relman.v1 import audit_pb2, audit_pb2_grpc, auth_pb2, common_pb2, deploy_pb2
from shared.devtools.seed import seed_id
from shared.framework.protos import rpc_methods
from shared.persistence.models import Role
from tests.harness import (
    bearer,
    client_address,
    error_details,
    fails,
    start_service,
    until_streams_hold,
)

# The id fields DESIGN §13 lists, and the kind of resource each names.
SECTION_13_FIELDS = {
    "service_id": "service",
    "release_id": "release",
    "environment_id": "environment",
    "target_environment_id": "environment",
    "team_id": "team",
    "owner_id": "user",
    "user_id": "user",
    "reviewer_ids": "user",
    "deployment_id": "deployment",
    "rollback_id": "rollback",
    "runbook_id": "runbook",
}
RESOURCE_MESSAGES = {
    "relman.v1.Service": "service",
    "relman.v1.Environment": "environment",
    "relman.v1.Team": "team",
    "relman.v1.User": "user",
    "relman.v1.Release": "release",
    "relman.v1.Deployment": "deployment",
    "relman.v1.Rollback": "rollback",
    "relman.v1.Runbook": "runbook",
}

# One seeded resource of each kind: its id, its name, and a well-formed name of nothing.
# The deployment is D6, rolled back: every write to it is refused, so no call below
# changes anything whichever form of its id it gets.
D6 = seed_id("deployment", "D6")
EXISTING = {
    "service": (seed_id("service", "auth-service"), "services/auth-service"),
    "release": (seed_id("release", "A2"), "services/auth-service/releases/1.5.0"),
    "environment": (seed_id("environment", "production"), "environments/production"),
    "team": (seed_id("team", "Platform"), "teams/Platform"),
    "user": (seed_id("user", "victor"), "users/victor"),
    "deployment": (D6, f"deployments/{D6}"),
    "rollback": (seed_id("rollback", "R1"), f"rollbacks/{seed_id('rollback', 'R1')}"),
    "runbook": (
        seed_id("runbook", "Deployment guide"),
        f"runbooks/{seed_id('runbook', 'Deployment guide')}",
    ),
}
NOTHING = {
    "service": "services/no-such-service",
    "release": "services/auth-service/releases/9.9.9-nothing",
    "environment": "environments/no-such-environment",
    "team": "teams/no-such-team",
    "user": "users/no-such-user",
    "deployment": f"deployments/{uuid.UUID(int=1)}",
    "rollback": f"rollbacks/{uuid.UUID(int=2)}",
    "runbook": f"runbooks/{uuid.UUID(int=3)}",
}
# Another kind's name, for each kind: well-formed, but not a name this field takes.
WRONG_KIND = {
    kind: ("teams/Platform" if kind != "team" else "services/auth-service") for kind in EXISTING
}


def _repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def _id_paths(descriptor, prefix=(), seen=frozenset()):
    """(path, kind) of every field of a request that takes an id of a named resource;
    a path is a tuple of (field name, repeated)."""
    seen = seen | {descriptor.full_name}
    if prefix and descriptor.full_name in RESOURCE_MESSAGES:
        kind = RESOURCE_MESSAGES[descriptor.full_name]
        yield (*prefix, ("id", False)), kind
        yield (*prefix, ("resource_name", False)), kind
    for field in descriptor.fields:
        step = (field.name, _repeated(field))
        if field.type == FieldDescriptor.TYPE_STRING and field.name in SECTION_13_FIELDS:
            yield (*prefix, step), SECTION_13_FIELDS[field.name]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = field.message_type
            if inner.full_name.startswith("google.") or inner.full_name in seen:
                continue
            yield from _id_paths(inner, (*prefix, step), seen)


def _text(path) -> str:
    return ".".join(f"{name}[0]" if repeated else name for name, repeated in path)


CASES = [
    pytest.param(method, path, kind, id=f"{method.name}:{_text(path)}")
    for method in rpc_methods()
    for path, kind in _id_paths(method.input_type)
]


def test_the_table_covers_every_rpc_that_takes_an_id():
    covered = {case.values[0].name for case in CASES}
    assert {
        "PromoteRelease",
        "UpdateService",
        "LogActions",
        "ListAuditLogs",
        "GetUser",
        "CreateApiToken",
        "UpdateUser",
        "GetRollback",
    } <= covered
    assert len(CASES) > 60


def _request(method, path, value: str):
    """A request of `method` with `value` at `path`, and nothing else set."""
    request = method.input_type._concrete_class()
    message = request
    for name, repeated in path[:-1]:
        message = getattr(message, name).add() if repeated else getattr(message, name)
    name, repeated = path[-1]
    if repeated:
        getattr(message, name).append(value)
    else:
        setattr(message, name, value)
    if method.client_streaming:  # a stream's rows are checked whole, before their names
        message.action, message.resource_type = "names.probe", "test"
    return request


async def _outcome(channel, method, request, token):
    """What the call answers: its messages, or its status with the error's details."""
    service = method.containing_service.full_name
    path = f"/{service}/{method.name}"
    response_class = method.output_type._concrete_class
    codec = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    options = {"metadata": bearer(token), "timeout": 30}
    try:
        if method.client_streaming:
            answer = await channel.stream_unary(path, **codec)(iter([request]), **options)
            return ("ok", [answer])
        if method.server_streaming:
            call = channel.unary_stream(path, **codec)(request, **options)
            return ("ok", [message async for message in call])
        return ("ok", [await channel.unary_unary(path, **codec)(request, **options)])
    except grpc.aio.AioRpcError as error:
        return ("error", error)


def _comparable(outcome):
    kind, value = outcome
    if kind == "ok":
        return kind, value
    info, violations = error_details(value)
    return kind, value.code(), info.reason, sorted((v.field, v.description) for v in violations)


def _channel_for(method, deploy_channel, audit_channel):
    audit = method.containing_service.full_name == "relman.v1.AuditService"
    return audit_channel if audit else deploy_channel


@pytest.mark.parametrize("method,path,kind", CASES)
async def test_a_name_is_answered_as_the_id_it_stands_for(
    method, path, kind, deploy_channel, audit_channel, tokens
):
    channel = _channel_for(method, deploy_channel, audit_channel)
    existing_id, name = EXISTING[kind]
    if path[-1][0] == "resource_name":
        by_id = _request(method, (*path[:-1], ("id", False)), str(existing_id))
    else:
        by_id = _request(method, path, str(existing_id))
    by_name = _request(method, path, name)
    first = _comparable(await _outcome(channel, method, by_id, tokens[Role.ADMIN]))
    second = _comparable(await _outcome(channel, method, by_name, tokens[Role.ADMIN]))
    assert second == first


@pytest.mark.parametrize("method,path,kind", CASES)
async def test_a_name_of_nothing_is_not_found_naming_the_field(
    method, path, kind, deploy_channel, audit_channel, tokens
):
    channel = _channel_for(method, deploy_channel, audit_channel)
    request = _request(method, path, NOTHING[kind])
    outcome = await _outcome(channel, method, request, tokens[Role.ADMIN])
    assert outcome[0] == "error", outcome
    error = outcome[1]
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    info, _ = error_details(error)
    assert info.reason == f"{kind.upper()}_NOT_FOUND"
    assert info.metadata["field"] == _text(path)
    assert info.metadata["resource_name"] == NOTHING[kind]


@pytest.mark.parametrize("method,path,kind", CASES)
@pytest.mark.parametrize("value", ["not-a-name", "WRONG_KIND"])
async def test_neither_uuid_nor_name_of_its_kind_is_invalid_naming_the_field(
    method, path, kind, value, deploy_channel, audit_channel, tokens
):
    channel = _channel_for(method, deploy_channel, audit_channel)
    request = _request(method, path, WRONG_KIND[kind] if value == "WRONG_KIND" else value)
    outcome = await _outcome(channel, method, request, tokens[Role.ADMIN])
    assert outcome[0] == "error", outcome
    error = outcome[1]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    _, violations = error_details(error)
    assert [v.field for v in violations] == [_text(path)]


async def test_names_are_found_whatever_their_case(clients):
    lowered = await clients["viewer"].GetRelease(release_id="services/AUTH-SERVICE/releases/1.5.0")
    assert lowered.id == str(EXISTING["release"][0])
    assert lowered.resource_name == "services/auth-service/releases/1.5.0"


async def test_a_name_needs_the_callers_right_first(deploy_channel):
    """A caller without a token learns nothing of which names exist."""
    stub_call = deploy_channel.unary_unary(
        "/relman.v1.DeployService/GetRelease",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=common_pb2.Release.FromString,
    )
    for name in ("services/auth-service/releases/1.5.0", NOTHING["release"]):
        await fails(
            stub_call(deploy_pb2.GetReleaseRequest(release_id=name), timeout=30),
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def test_an_update_names_its_resource_by_resource_name(clients, service_id):
    created = common_pb2.Service(resource_name="services/api-gateway", description="edge")
    updated = await clients["lead"].UpdateService(
        service=created, update_mask={"paths": ["description"]}
    )
    assert updated.id == str(seed_id("service", "api-gateway"))
    assert updated.description == "edge"
    mismatch = common_pb2.Service(
        id=str(seed_id("service", "payment-api")), resource_name="services/api-gateway"
    )
    error = await fails(
        clients["lead"].UpdateService(service=mismatch, update_mask={"paths": ["description"]}),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["service.resource_name"]


async def test_log_actions_takes_a_username_per_row(audit_channel, tokens):
    """The stream's rows name their users; the one that names nobody fails the stream."""
    call = audit_channel.stream_unary(
        "/relman.v1.AuditService/LogActions",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=audit_pb2.LogActionsResponse.FromString,
    )
    rows = [
        audit_pb2.LogActionRequest(
            action="deploy", resource_type="service", resource_id="x", user_id=user
        )
        for user in ("users/victor", "users/priya")
    ]
    answer = await call(
        iter([audit_pb2.LogActionsRequest(actions=rows)]),
        metadata=bearer(tokens[Role.SERVICE]),
        timeout=30,
    )
    assert answer.count == 2
    rows[1].user_id = "users/nobody-here"
    error = await fails(
        call(
            iter([audit_pb2.LogActionsRequest(actions=rows)]),
            metadata=bearer(tokens[Role.SERVICE]),
            timeout=30,
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    assert error_details(error)[0].metadata["field"] == "actions[1].user_id"


@pytest.mark.parametrize("role", [Role.VIEWER, Role.DEVELOPER])
async def test_usernames_cannot_be_probed_by_who_may_not_list_users(role, deploy_channel, tokens):
    """GetUser of `users/nobody` and of `users/admin` look alike to a viewer or developer
    (PERMISSION_DENIED), as Login keeps a wrong username and a wrong password alike."""
    outcomes = []
    method = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods_by_name["GetUser"]
    for name in ("users/admin", "users/nobody-by-that-name"):
        request = auth_pb2.GetUserRequest(user_id=name)
        outcome = await _outcome(deploy_channel, method, request, tokens[role])
        outcomes.append(_comparable(outcome)[:3])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == grpc.StatusCode.PERMISSION_DENIED


async def test_usernames_cannot_be_probed_through_log_action(audit_channel, tokens):
    method = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].methods_by_name["LogAction"]
    outcomes = []
    for name in ("users/admin", "users/nobody-by-that-name"):
        request = audit_pb2.LogActionRequest(
            action="probe", resource_type="user", resource_id="x", user_id=name
        )
        outcome = await _outcome(audit_channel, method, request, tokens[Role.DEVELOPER])
        outcomes.append(_comparable(outcome)[:3])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == grpc.StatusCode.PERMISSION_DENIED


async def test_a_request_names_at_most_fifty_resources(clients):
    reviewers = [f"users/ghost-{i}" for i in range(51)]
    error = await fails(
        clients["lead"].PromoteRelease(
            release_id=str(seed_id("release", "A3")),
            target_environment_id=str(EXISTING["environment"][0]),
            reviewer_ids=reviewers,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["reviewer_ids[50]"], error.details()


async def test_a_name_shaped_like_a_uuid_is_still_looked_up(clients):
    """`teams/qa-` and 27 more characters is 36 long with a `-` where a UUID has one."""
    name = f"qa-{uuid.uuid4().hex[:27]}"
    team = await clients["admin"].CreateTeam(name=name)
    assert len(team.resource_name) == 36 and team.resource_name[8] == "-"
    found = await clients["viewer"].GetTeam(team_id=team.resource_name)
    assert found.id == team.id
    upper = await clients["viewer"].GetDeployment(deployment_id=f"deployments/{str(D6).upper()}")
    assert upper.id == str(D6)


async def test_reviewers_cannot_be_probed_by_a_developer(clients, service_id):
    """Where a developer may deploy and the policy wants a vote, a reviewer who does not
    exist and one who may not vote get the same answer."""
    environment = await clients["admin"].CreateEnvironment(
        name=f"dev-voted-{uuid.uuid4().hex[:8]}",
        environment_type=common_pb2.ENVIRONMENT_TYPE_DEVELOPMENT,
    )
    await clients["admin"].UpdateEnvironmentPolicy(
        policy=common_pb2.EnvironmentPolicy(environment_id=environment.id, required_approvals=1),
        update_mask={"paths": ["required_approvals"]},
    )
    release = await clients["developer"].CreateRelease(service_id=service_id, version="1.0.0")
    answers = []
    for reviewers in (["users/victor"], ["users/nobody-by-that-name"]):
        error = await fails(
            clients["developer"].PromoteRelease(
                release_id=release.id,
                target_environment_id=environment.resource_name,
                reviewer_ids=reviewers,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        answers.append([(v.field, v.description) for v in error_details(error)[1]])
    assert answers[0] == answers[1]
    two_unknown = await fails(
        clients["developer"].PromoteRelease(
            release_id=release.id,
            target_environment_id=environment.resource_name,
            reviewer_ids=["users/victor", "users/nobody-by-that-name"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "repeat" not in two_unknown.details()


async def test_streams_that_name_users_never_wait_for_a_second_connection(db_url, tokens):
    """LogActions streams hold their transaction's connection while they read: with the
    pool taken by such streams, rows naming their users still go in (no lookup needs
    another connection from the pool)."""
    audit = await start_service(db_url, "audit_svc", DB_POOL_SIZE="2")
    try:
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)
            calls = [
                stub.LogActions(metadata=bearer(tokens[Role.SERVICE]), timeout=20) for _ in range(2)
            ]

            def batch(user_id: str = "") -> audit_pb2.LogActionsRequest:
                row = audit_pb2.LogActionRequest(
                    action="names.stream", resource_type="test", user_id=user_id
                )
                return audit_pb2.LogActionsRequest(actions=[row])

            for call in calls:
                await call.write(batch())
            await until_streams_hold(db_url, 2)  # the pool is theirs now
            for call in calls:
                await call.write(batch("users/victor"))
                await call.done_writing()
            answers = [await call for call in calls]
        assert [answer.count for answer in answers] == [2, 2]
    finally:
        await audit.stop()
