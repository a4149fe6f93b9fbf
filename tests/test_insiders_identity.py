"""Insiders and outsiders against identity (issue 15, attacks 3 and 8; DESIGN.md section 8).

Attack 3: an admin makes a token for a lead and approves, as her, a production
deployment the admin started; or turns her into a service user, mints, and turns her
back. Attack 8: an unauthenticated flood of logins guesses passwords, queues bcrypt
without bound and writes one audit row per attempt. Each test performs the attack
through the API and asserts the refusal.

The login tests run on a database of their own (throttling is shared by every replica
through the database, and this run's main database serves other tests' logins from the
same address) with small limits: 3 failures per (username, peer), 10 per peer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import URL, select

from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared.auth import token_hash
from shared.db import libpq_dsn
from shared.models import ApiToken, AuditLog, Role, User
from shared.seed import seed
from tests.deploying import DEV, PROD, STAGING, Client, S, deployed
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    error_details,
    fails,
    scratch_database,
    start_service,
)

PER_USER, PER_PEER = 3, 10
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


async def new_lead(admin: auth_pb2_grpc.AuthServiceStub, auth) -> common_pb2.User:
    """A lead of the test's own (the seeded lena's tokens serve other tests)."""
    name = f"lena-{uuid.uuid4().hex[:8]}"
    return await admin.CreateUser(
        auth_pb2.CreateUserRequest(
            username=name,
            email=f"{name}@relman.example",
            password="password123",
            role=common_pb2.ROLE_LEAD,
        ),
        metadata=auth,
    )


async def set_role(admin: auth_pb2_grpc.AuthServiceStub, auth, user_id: str, role: int):
    return await admin.UpdateUser(
        auth_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user_id, role=role),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=auth,
    )


async def awaiting_approval(admin: Client, service_id: str):
    """A production deployment the admin started, waiting for another lead's vote."""
    release = await deployed(admin, service_id, "1.0.0", DEV, STAGING)
    deployment = await admin.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    assert deployment.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    return deployment


# -- attack 3: a token for another human ---------------------------------------------------


async def test_an_admin_cannot_mint_a_token_for_another_human(
    deploy_channel, clients, tokens, service_id, database
):
    """The admin asks for a token of a lead to approve, as her, their own deployment."""
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    lead = await new_lead(admin, auth)
    deployment = await awaiting_approval(clients["admin"], service_id)
    for never_expires in (False, True):
        error = await fails(
            admin.CreateApiToken(
                auth_pb2.CreateApiTokenRequest(
                    user_id=lead.id, name="approver", never_expires=never_expires
                ),
                metadata=auth,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "TOKEN_FOR_ANOTHER_USER",
        )
        assert error_details(error)[0].metadata["user_id"] == lead.id
    async with database.transaction() as session:
        minted = await session.scalar(
            select(ApiToken).where(ApiToken.user_id == uuid.UUID(lead.id))
        )
    assert minted is None
    # The two-person rule still holds with two persons: the lead, logged in herself.
    login = await admin.Login(auth_pb2.LoginRequest(username=lead.username, password="password123"))
    approval = await Client(deploy_channel, login.access_token).ApproveDeployment(
        deployment_id=deployment.id
    )
    assert approval.status == S.APPROVAL_STATUS_APPROVED


async def test_a_service_user_detour_leaves_no_working_token(
    deploy_channel, clients, tokens, service_id, database
):
    """The admin makes the lead a service user, mints her a token and makes her a lead
    again: the token is revoked, refused, and cannot approve the admin's deployment."""
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    lead = await new_lead(admin, auth)
    own = await admin.Login(auth_pb2.LoginRequest(username=lead.username, password="password123"))
    deployment = await awaiting_approval(clients["admin"], service_id)

    await set_role(admin, auth, lead.id, common_pb2.ROLE_SERVICE)
    minted = await admin.CreateApiToken(
        auth_pb2.CreateApiTokenRequest(user_id=lead.id, name="detour"), metadata=auth
    )
    assert minted.token  # a service user may get one
    await set_role(admin, auth, lead.id, common_pb2.ROLE_LEAD)

    as_lead = Client(deploy_channel, minted.token)
    await fails(
        as_lead.ApproveDeployment(deployment_id=deployment.id), grpc.StatusCode.UNAUTHENTICATED
    )
    await fails(
        admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(minted.token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_TOKEN",
    )
    listed = await admin.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=lead.id), metadata=auth
    )
    by_id = {token.id: token for token in listed.api_tokens}
    assert by_id[minted.api_token.id].HasField("revoked_at")
    assert (
        by_id[minted.api_token.id].created_by
        == (await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=auth)).id
    )
    # Her own login token was hers: it survives the change of role.
    own_token = next(t for t in listed.api_tokens if t.id != minted.api_token.id)
    assert own_token.created_by == lead.id and not own_token.HasField("revoked_at")
    me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(own.access_token))
    assert me.role == common_pb2.ROLE_LEAD
    async with database.transaction() as session:
        updates = await session.scalars(
            select(AuditLog)
            .where(AuditLog.resource_id == lead.id, AuditLog.action == "update")
            .order_by(AuditLog.created_at)
        )
        back_to_lead = updates.all()[-1]
    assert back_to_lead.details == {
        "changed": {"role": ["service", "lead"]},
        "tokens_revoked": 1,
    }
    # The deployment still waits for a second person.
    waiting = await clients["admin"].GetDeployment(deployment_id=deployment.id)
    assert waiting.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL


async def test_a_token_someone_else_made_acts_only_for_a_service_user(
    deploy_channel, tokens, database
):
    """Belt and braces: should such a token escape revocation (a row from before the rule,
    a race), the token look-up itself refuses it for anyone but a service user."""
    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    admin = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.ADMIN]))
    secrets = {}
    async with database.transaction() as session:
        for username in ("marco", "ci-bot"):
            user = await session.scalar(select(User).where(User.username == username))
            secrets[username] = f"rm_{uuid.uuid4().hex}"
            session.add(
                ApiToken(
                    user_id=user.id,
                    token_hash=token_hash(secrets[username]),
                    name="escaped",
                    created_by=uuid.UUID(admin.id),
                )
            )
    await fails(
        stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(secrets["marco"])),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_TOKEN",
    )
    bot = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(secrets["ci-bot"]))
    assert bot.username == "ci-bot"


async def test_api_tokens_expire_and_retries_return_the_record_without_the_secret(
    deploy_channel, tokens
):
    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=auth)
    bot = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.SERVICE]))

    def stamp(delta: timedelta) -> timestamp_pb2.Timestamp:
        result = timestamp_pb2.Timestamp()
        result.FromDatetime(datetime.now(UTC) + delta)
        return result

    for request, field in (
        (dict(user_id=me.id, expires_at=stamp(timedelta(days=366))), "expires_at"),
        (dict(user_id=me.id, expires_at=stamp(timedelta(minutes=-1))), "expires_at"),
        (dict(user_id=me.id, never_expires=True), "never_expires"),  # a human's
        (
            dict(user_id=bot.id, never_expires=True, expires_at=stamp(timedelta(days=1))),
            "never_expires",
        ),
    ):
        error = await fails(
            stub.CreateApiToken(auth_pb2.CreateApiTokenRequest(name="x", **request), metadata=auth),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == [field], request

    own = await stub.CreateApiToken(
        auth_pb2.CreateApiTokenRequest(
            user_id=me.id, name="mine", expires_at=stamp(timedelta(days=365))
        ),
        metadata=auth,
    )
    assert own.token and own.api_token.created_by == me.id

    request = auth_pb2.CreateApiTokenRequest(
        user_id=bot.id, name="forever", never_expires=True, request_id=str(uuid.uuid4())
    )
    first = await stub.CreateApiToken(request, metadata=auth)
    assert first.token and not first.api_token.HasField("expires_at")
    assert first.api_token.id == request.request_id
    retried = await stub.CreateApiToken(request, metadata=auth)
    assert retried.token == "" and retried.api_token == first.api_token
    for changed in (
        dict(name="other"),
        dict(never_expires=False),  # a default expiry
        dict(never_expires=False, expires_at=stamp(timedelta(days=10))),
    ):
        different = auth_pb2.CreateApiTokenRequest()
        different.CopyFrom(request)
        for key, value in changed.items():
            if key == "expires_at":
                different.expires_at.CopyFrom(value)
            else:
                setattr(different, key, value)
        await fails(
            stub.CreateApiToken(different, metadata=auth),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_ID_REUSED",
        )
    login = await stub.Login(auth_pb2.LoginRequest(username="wendy", password="password123"))
    listed = await stub.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=login.user.id), metadata=auth
    )
    assert {token.created_by for token in listed.api_tokens} == {login.user.id}


# -- attack 8: a flood of logins ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def login_db(server_url: URL) -> AsyncIterator[URL]:
    async with scratch_database(server_url) as url:
        await seed(url)
        yield url


@pytest.fixture(scope="module")
async def throttling(login_db: URL) -> AsyncIterator[RelmanProcess]:
    process = await start_service(
        login_db,
        "deploy_svc",
        LOGIN_FAILURES_PER_USER=str(PER_USER),
        LOGIN_FAILURES_PER_PEER=str(PER_PEER),
    )
    try:
        yield process
    finally:
        await process.stop()


@pytest.fixture
async def auth_stub(throttling) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    address = client_address(throttling.addresses["deploy_svc"])
    async with grpc.aio.insecure_channel(address) as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


@pytest.fixture
async def sql(login_db: URL) -> AsyncIterator[asyncpg.Connection]:
    """The login database; each test starts with no failed login counted (the windows of
    earlier tests would otherwise still hold this address's failures)."""
    connection = await asyncpg.connect(libpq_dsn(login_db))
    try:
        await connection.execute("DELETE FROM login_throttle")
        yield connection
    finally:
        await connection.close()


async def attempt(
    stub, username: str, password: str = "wrong-password"
) -> grpc.aio.AioRpcError | None:
    try:
        await stub.Login(auth_pb2.LoginRequest(username=username, password=password))
    except grpc.aio.AioRpcError as error:
        return error
    return None


def retry_delay(error: grpc.aio.AioRpcError) -> timedelta | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.ToTimedelta()
    return None


async def audit_rows(sql, action: str, resource_id: str | None = None, username: str | None = None):
    return await sql.fetch(
        "SELECT resource_id, details, ip_address FROM audit_logs WHERE action = $1"
        " AND ($2::text IS NULL OR resource_id = $2)"
        " AND ($3::text IS NULL OR details->>'username' = $3)",
        action,
        resource_id,
        username,
    )


def new_username() -> str:
    return f"guess-{uuid.uuid4().hex[:8]}"


async def test_a_flood_on_one_account_is_throttled_without_bcrypt(auth_stub, sql):
    """Guessing lena's password: after 3 failures every attempt, the right password
    included, is RESOURCE_EXHAUSTED with RetryInfo, is never checked (no `login_failed`
    row, the right password refused) and the flood leaves one `login_throttled` row."""
    for _ in range(PER_USER):
        assert (await attempt(auth_stub, "lena")).code() == grpc.StatusCode.UNAUTHENTICATED
    flood = [await attempt(auth_stub, "lena") for _ in range(20)]
    flood.append(await attempt(auth_stub, "lena", "password123"))
    for error in flood:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(error)[0].reason == "LOGIN_THROTTLED"
        assert timedelta(minutes=14) < retry_delay(error) <= timedelta(minutes=15)
    key = "user:lena|127.0.0.1"
    assert len(await audit_rows(sql, "login_failed", username="lena")) == PER_USER
    [throttled] = await audit_rows(sql, "login_throttled", key)
    assert throttled["ip_address"] == "127.0.0.1"
    row = await sql.fetchrow("SELECT failures, throttled FROM login_throttle WHERE key = $1", key)
    assert (row["failures"], row["throttled"]) == (PER_USER, len(flood))


async def test_concurrent_guesses_cannot_overshoot_the_limit(auth_stub, sql):
    """Twelve guesses at once from one address: they are checked one after another (bcrypt
    takes one at a time anyway), each against the failures before it, so exactly 3 reach
    bcrypt, not all twelve."""
    username = new_username()
    errors = await asyncio.gather(*(attempt(auth_stub, username) for _ in range(12)))
    codes = sorted(error.code().name for error in errors)
    assert codes == ["RESOURCE_EXHAUSTED"] * 9 + ["UNAUTHENTICATED"] * PER_USER
    assert len(await audit_rows(sql, "login_failed", username=username)) == PER_USER
    assert len(await audit_rows(sql, "login_throttled", f"user:{username}|127.0.0.1")) == 1


async def test_a_flood_over_many_usernames_is_throttled_per_peer(auth_stub, sql):
    """Spraying one password over many accounts: 10 failures from one address, then even
    a right password from it is refused until the window ends."""
    for _ in range(PER_PEER):
        error = await attempt(auth_stub, new_username())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    for username, password in [(new_username(), "x"), ("marco", "password123"), ("tom", "y")]:
        error = await attempt(auth_stub, username, password)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_details(error)[0].reason == "LOGIN_THROTTLED"
        assert retry_delay(error) > timedelta(0)
    assert len(await audit_rows(sql, "login_throttled", "peer:127.0.0.1")) == 1


async def test_a_success_resets_the_pair_and_is_never_counted(auth_stub, sql):
    """A user who mistypes twice and then logs in starts again from zero; successful
    logins, however many and however concurrent, count against nothing (the README and
    the bench log in again and again)."""
    for _ in range(PER_USER - 1):
        assert (await attempt(auth_stub, "priya")).code() == grpc.StatusCode.UNAUTHENTICATED
    at_once = [attempt(auth_stub, "priya", "password123") for _ in range(PER_USER + 3)]
    assert await asyncio.gather(*at_once) == [None] * len(at_once)
    assert (
        await sql.fetchval("SELECT count(*) FROM login_throttle WHERE key LIKE 'user:priya|%'") == 0
    )
    assert (
        await sql.fetchval("SELECT failures FROM login_throttle WHERE key = 'peer:127.0.0.1'")
        == PER_USER - 1
    )
    for _ in range(PER_USER):
        assert (await attempt(auth_stub, "priya")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await attempt(auth_stub, "priya")).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_password_less_service_account_fails_like_a_wrong_password(auth_stub, sql):
    """ci-bot-like accounts have no password: a login for one is an ordinary failure,
    counted like any other."""
    username = new_username()
    await sql.execute(
        "INSERT INTO users (id, username, email, full_name, hashed_password, role, is_admin)"
        " VALUES ($1, $2, $3, $2, '!', 'service', false)",
        uuid.uuid4(),
        username,
        f"{username}@services.relman.invalid",
    )
    for password in ("!", "password123"):
        error = await attempt(auth_stub, username, password)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_details(error)[0].reason == "INVALID_CREDENTIALS"
    key = f"user:{username}|127.0.0.1"
    assert await sql.fetchval("SELECT failures FROM login_throttle WHERE key = $1", key) == 2


async def test_the_password_check_queue_is_bounded(login_db, sql):
    """With room for one login at a time, a burst is refused at once (LOGIN_BUSY) instead
    of queueing behind bcrypt; refused attempts leave no audit row."""
    process = await start_service(
        login_db, "deploy_svc", LOGIN_QUEUE_MAX="1", LOGIN_FAILURES_PER_PEER="1000"
    )
    try:
        address = client_address(process.addresses["deploy_svc"])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            usernames = [new_username() for _ in range(16)]
            errors = await asyncio.gather(*(attempt(stub, name) for name in usernames))
    finally:
        await process.stop()
    busy = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    checked = [e for e in errors if e.code() == grpc.StatusCode.UNAUTHENTICATED]
    assert len(busy) + len(checked) == len(errors) and busy and checked
    assert {error_details(e)[0].reason for e in busy} == {"LOGIN_BUSY"}
    failed = [
        row for name in usernames for row in await audit_rows(sql, "login_failed", username=name)
    ]
    assert len(failed) == len(checked)


async def test_the_throttle_lifts_when_its_window_ends(login_db, sql):
    """A 3-second window and one failure allowed: once the window has passed, the right
    password works again."""
    process = await start_service(
        login_db, "deploy_svc", LOGIN_FAILURES_PER_USER="1", LOGIN_THROTTLE_WINDOW_S="3"
    )
    try:
        address = client_address(process.addresses["deploy_svc"])
        async with grpc.aio.insecure_channel(address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            loop = asyncio.get_running_loop()
            started = loop.time()
            # Fail until throttled (on a busy machine a window may pass between failures).
            while (error := await attempt(stub, "sofia")).code() != RESOURCE_EXHAUSTED:
                assert loop.time() - started < 30, "never throttled"
            assert timedelta(0) < retry_delay(error) <= timedelta(seconds=3)
            while (error := await attempt(stub, "sofia", "password123")) is not None:
                assert error.code() == RESOURCE_EXHAUSTED
                assert loop.time() - started < 30, "still throttled"
                await asyncio.sleep(0.1)
    finally:
        await process.stop()
