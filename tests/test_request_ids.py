"""Request ids (AIP-155) through the real API: a retry by the same caller returns the first
answer and changes nothing; another caller's request id is a request of its own; the same
id with another request is refused; a failed call leaves nothing to replay; concurrent
duplicates act once; keys older than 24 hours are purged by the sweeper.

The table CASES is checked against the proto descriptors: every DeployService and
AuthService request with a request_id field must be in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import URL, func, select, text

from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc
from shared.devtools.seed import seed_id
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import Base, IdempotencyKey, Release, Role, User
from tests.deploying import (
    DEV,
    STAGING,
    Client,
    S,
    deployed,
    production_requiring,
    run_all_stages,
)
from tests.harness import bearer, error_details, fails, poll, runtime_url

DEPLOY = deploy_pb2.DESCRIPTOR.services_by_name["DeployService"]
AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
WITH_REQUEST_ID = {
    method.name: method
    for service in (DEPLOY, AUTH)
    for method in service.methods
    if "request_id" in method.input_type.fields_by_name
}
# What a retry must leave as it was: how many rows each table holds and, where it has
# one, its latest updated_at.
WATCHED = (
    "releases",
    "deployments",
    "pipeline_stages",
    "approvals",
    "rollbacks",
    "services",
    "environments",
    "environment_policies",
    "teams",
    "runbooks",
    "freeze_windows",
    "users",
    "api_tokens",
    "audit_logs",
    "idempotency_keys",
)


@dataclass
class Api:
    """Both services as each test user, by name; their user ids; the test's own service."""

    channel: grpc.aio.Channel
    tokens: dict[str, str]
    user_ids: dict[str, uuid.UUID]
    service_id: str
    ci_bot_id: str
    clients: dict[str, Client] = field(init=False)

    def __post_init__(self) -> None:
        self.clients = {who: Client(self.channel, token) for who, token in self.tokens.items()}

    async def call(self, who: str, method: str, fields: dict):
        descriptor = WITH_REQUEST_ID[method]
        if descriptor.containing_service is DEPLOY:
            stub, module = deploy_pb2_grpc.DeployServiceStub(self.channel), deploy_pb2
        else:
            stub, module = auth_pb2_grpc.AuthServiceStub(self.channel), auth_pb2
        request = getattr(module, descriptor.input_type.name)(**fields)
        return await getattr(stub, method)(request, metadata=bearer(self.tokens[who]), timeout=30)


# -- what each request needs --------------------------------------------------------------------


async def _release(api: Api, version: str = "1.0.0"):
    return await api.clients["developer"].CreateRelease(service_id=api.service_id, version=version)


async def _pending_in_dev(api: Api):
    release = await _release(api)
    return await api.clients["developer"].PromoteRelease(
        release_id=release.id, target_environment_id=DEV
    )


async def _awaiting_two_votes(api: Api):
    production = await production_requiring(api.clients["admin"], 2)
    lead = api.clients["lead"]
    release = await deployed(lead, api.service_id, "1.0.0", DEV, STAGING)
    return await lead.PromoteRelease(release_id=release.id, target_environment_id=production)


async def create_release(api: Api) -> dict:
    return {"service_id": api.service_id, "version": "1.0.0"}


async def create_deployment(api: Api) -> dict:
    return {"release_id": (await _release(api)).id, "environment_id": DEV}


async def promote_release(api: Api) -> dict:
    return {"release_id": (await _release(api)).id, "target_environment_id": DEV}


async def update_pipeline_stage(api: Api) -> dict:
    deployment = await _pending_in_dev(api)
    return {"stage_id": deployment.stages[0].id, "status": S.STAGE_STATUS_RUNNING}


async def cancel_deployment(api: Api) -> dict:
    return {"deployment_id": (await _pending_in_dev(api)).id, "reason": "wrong build"}


async def vote(api: Api) -> dict:
    return {"deployment_id": (await _awaiting_two_votes(api)).id, "notes": "looks fine"}


async def rollback_deployment(api: Api) -> dict:
    developer = api.clients["developer"]
    await deployed(developer, api.service_id, "1.0.0", DEV)
    release = await developer.CreateRelease(service_id=api.service_id, version="1.1.0")
    newest = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    await run_all_stages(developer, newest)
    return {"deployment_id": newest.id, "reason": "1.1.0 is broken"}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_service(api: Api) -> dict:
    return {"name": _name("svc"), "team_id": str(seed_id("team", "Platform"))}


async def create_environment(api: Api) -> dict:
    return {"name": _name("qa"), "environment_type": S.ENVIRONMENT_TYPE_STAGING}


async def create_team(api: Api) -> dict:
    return {"name": _name("team")}


async def create_runbook(api: Api) -> dict:
    return {"title": "Restart", "content": "kubectl rollout restart", "service_id": api.service_id}


async def create_freeze_window(api: Api) -> dict:
    start = Timestamp()
    start.FromDatetime(datetime.now(UTC) + timedelta(days=300))
    end = Timestamp()
    end.FromDatetime(datetime.now(UTC) + timedelta(days=301))
    window = common_pb2.FreezeWindow(
        service_id=api.service_id, reason="audit week", start_time=start, end_time=end
    )
    return {"freeze_window": window}


async def create_user(api: Api) -> dict:
    username = _name("dev")
    return {
        "username": username,
        "email": f"{username}@relman.example",
        "password": "password123",
        "role": common_pb2.ROLE_DEVELOPER,
    }


async def create_api_token(api: Api) -> dict:
    return {"user_id": api.ci_bot_id, "name": "deploys"}


@dataclass(frozen=True)
class Case:
    caller: str  # who calls first
    other: str  # another user whose role may make the call too
    prepare: Callable[[Api], Awaitable[dict]]  # the request's fields
    changed: dict | Callable[[dict], dict]  # what makes it a different request


def _other_window(fields: dict) -> dict:
    window = common_pb2.FreezeWindow()
    window.CopyFrom(fields["freeze_window"])
    window.reason = "another week"
    return {"freeze_window": window}


CASES: dict[str, Case] = {
    "CreateRelease": Case("developer", "lead", create_release, {"version": "1.0.1"}),
    "CreateDeployment": Case(
        "developer", "lead", create_deployment, {"freeze_override_reason": "hotfix"}
    ),
    "PromoteRelease": Case(
        "developer", "lead", promote_release, {"freeze_override_reason": "hotfix"}
    ),
    "UpdatePipelineStage": Case("developer", "lead", update_pipeline_stage, {"output": "log"}),
    "CancelDeployment": Case("developer", "lead", cancel_deployment, {"reason": "other"}),
    "ApproveDeployment": Case("reviewer", "admin", vote, {"notes": "other"}),
    "RejectDeployment": Case("reviewer", "admin", vote, {"notes": "other"}),
    "RollbackDeployment": Case("developer", "lead", rollback_deployment, {"reason": "other"}),
    "CreateService": Case("lead", "admin", create_service, {"description": "other"}),
    "CreateEnvironment": Case("admin", "admin2", create_environment, {"description": "other"}),
    "CreateTeam": Case("lead", "admin", create_team, {"description": "other"}),
    "CreateRunbook": Case("lead", "admin", create_runbook, {"content": "other"}),
    "CreateFreezeWindow": Case("lead", "admin", create_freeze_window, _other_window),
    "CreateUser": Case("admin", "admin2", create_user, {"full_name": "Someone Else"}),
    "CreateApiToken": Case("admin", "admin2", create_api_token, {"name": "other"}),
}


def _resource_id(answer) -> str:
    return answer.api_token.id if isinstance(answer, auth_pb2.CreateApiTokenResponse) else answer.id


async def _snapshot(database: Database) -> dict:
    tables = Base.metadata.tables
    async with database.read() as session:
        found = {}
        for name in WATCHED:
            table = tables[name]
            latest = func.max(table.c.updated_at) if "updated_at" in table.c else None
            row = (await session.execute(select(func.count(), latest).select_from(table))).one()
            found[name] = tuple(row)
    return found


async def _key(database: Database, caller_id: uuid.UUID, method: str, request_id: str):
    async with database.read() as session:
        return await session.get(IdempotencyKey, (caller_id, method, uuid.UUID(request_id)))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def second_admin(deploy_channel, tokens):
    """An admin of this module's own (id, token), deactivated after it: other tests count on
    the seeded admin being the only active one."""
    auth = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    username = _name("admin")
    user = await auth.CreateUser(
        auth_pb2.CreateUserRequest(
            username=username,
            email=f"{username}@relman.example",
            password="password123",
            role=common_pb2.ROLE_ADMIN,
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    login = await auth.Login(auth_pb2.LoginRequest(username=username, password="password123"))
    yield uuid.UUID(user.id), login.access_token
    await auth.UpdateUser(
        auth_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )


@pytest.fixture
async def api(deploy_channel, tokens, marco_token, second_admin, service_id, database) -> Api:
    admin2_id, admin2_token = second_admin
    async with database.read() as session:
        ci_bot = await session.scalar(select(User.id).where(User.username == "ci-bot"))
    return Api(
        deploy_channel,
        {
            "developer": tokens[Role.DEVELOPER],
            "lead": tokens[Role.LEAD],
            "reviewer": marco_token,
            "admin": tokens[Role.ADMIN],
            "admin2": admin2_token,
        },
        {
            "developer": seed_id("user", "priya"),
            "lead": seed_id("user", "lena"),
            "reviewer": seed_id("user", "marco"),
            "admin": seed_id("user", "admin"),
            "admin2": admin2_id,
        },
        service_id,
        str(ci_bot),
    )


# -- every request with a request_id -----------------------------------------------------------


def test_every_request_with_a_request_id_is_in_the_table():
    assert sorted(CASES) == sorted(WITH_REQUEST_ID)


@pytest.mark.parametrize("method", sorted(WITH_REQUEST_ID))
async def test_a_request_id_is_the_callers_own_and_answers_a_retry(api, database, method):
    case = CASES[method]
    fields = await case.prepare(api)

    for malformed in ("not-a-uuid", uuid.uuid4().hex):
        error = await fails(
            api.call(case.caller, method, {**fields, "request_id": malformed}),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["request_id"]

    request_id = str(uuid.uuid4())
    first = await api.call(case.caller, method, {**fields, "request_id": request_id})
    assert _resource_id(first) != request_id  # a request id is not the resource's id
    key = await _key(database, api.user_ids[case.caller], method, request_id)
    assert str(key.resource_id) == _resource_id(first)

    before = await _snapshot(database)
    retried = await api.call(case.caller, method, {**fields, "request_id": request_id})
    if method == "CreateApiToken":  # the record, never the secret twice
        assert first.token and retried.token == ""
        assert retried.api_token == first.api_token
    else:
        assert retried == first
    changed = case.changed(fields) if callable(case.changed) else case.changed
    error = await fails(
        api.call(case.caller, method, {**fields, **changed, "request_id": request_id}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert [v.field for v in error_details(error)[1]] == ["request_id"]
    assert await _snapshot(database) == before  # no row, no change, no audit row

    # Another caller's request with the same id is judged on its own merits.
    try:
        theirs = await api.call(case.other, method, {**fields, "request_id": request_id})
    except grpc.aio.AioRpcError as refused:
        assert error_details(refused)[0].reason != "REQUEST_ID_REUSED"
    else:
        assert _resource_id(theirs) != _resource_id(first)
        key = await _key(database, api.user_ids[case.other], method, request_id)
        assert str(key.resource_id) == _resource_id(theirs)


# -- a failed call, concurrent duplicates, the password, the purge -----------------------------


async def test_a_call_that_failed_leaves_nothing_to_replay(api, database):
    """Refused (not yet tested in development), the promotion stores no key: the same
    request, retried once the release has succeeded there, runs and succeeds."""
    developer = api.clients["developer"]
    release = await _release(api)
    request = {"release_id": release.id, "target_environment_id": STAGING}
    request_id = str(uuid.uuid4())
    await fails(
        api.call("developer", "PromoteRelease", {**request, "request_id": request_id}),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROMOTION_ORDER",
    )
    assert await _key(database, api.user_ids["developer"], "PromoteRelease", request_id) is None
    in_dev = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    await run_all_stages(developer, in_dev)
    promoted = await api.call("developer", "PromoteRelease", {**request, "request_id": request_id})
    assert promoted.environment_id == STAGING and promoted.status == S.DEPLOYMENT_STATUS_PENDING


async def test_concurrent_duplicates_make_one_release(api, database):
    request = {"service_id": api.service_id, "version": "2.0.0", "request_id": str(uuid.uuid4())}
    answers = await asyncio.gather(
        *(api.call("developer", "CreateRelease", request) for _ in range(8))
    )
    assert all(answer == answers[0] for answer in answers)
    async with database.read() as session:
        releases = await session.scalar(
            select(func.count())
            .select_from(Release)
            .where(Release.service_id == uuid.UUID(api.service_id))
        )
        audited = await session.scalar(
            text("SELECT count(*) FROM audit_logs WHERE resource_id = :id"),
            {"id": answers[0].id},
        )
    assert (releases, audited) == (1, 1)


async def test_the_key_holds_no_fast_hash_of_a_password(api, database):
    """The stored hash is of the request without its request_id and without its password."""
    fields = await create_user(api)
    request = auth_pb2.CreateUserRequest(**fields, request_id=str(uuid.uuid4()))
    await api.call("admin", "CreateUser", {**fields, "request_id": request.request_id})
    key = await _key(database, api.user_ids["admin"], "CreateUser", request.request_id)
    request.ClearField("request_id")
    with_password = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    request.ClearField("password")
    assert (
        key.request_hash == hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    )
    assert key.request_hash != with_password


async def test_keys_older_than_a_day_are_purged_by_the_sweeper(api, database, db_url: URL):
    """The servers' sweepers (the runtime role) delete a key 25 hours old and keep one 23
    hours old; the runtime role may not change a key in place."""
    caller = api.user_ids["lead"]
    old, recent = uuid.uuid4(), uuid.uuid4()
    async with database.transaction() as session:
        for request_id, age in ((old, 25), (recent, 23)):
            session.add(
                IdempotencyKey(
                    caller_id=caller,
                    method="CreateTeam",
                    request_id=request_id,
                    request_hash=b"\0" * 32,
                    resource_type="team",
                    resource_id=uuid.uuid4(),
                    created_at=datetime.now(UTC) - timedelta(hours=age),
                )
            )
    await poll(lambda: _gone(database, old), 15, "purge of the 25-hour-old key")
    assert not await _gone(database, recent)

    runtime = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute(
                "UPDATE idempotency_keys SET request_hash = '' WHERE request_id = $1",
                recent,
            )
    finally:
        await runtime.close()


async def _gone(database: Database, request_id: uuid.UUID) -> bool:
    async with database.read() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.request_id == request_id)
        )
    return found == 0
