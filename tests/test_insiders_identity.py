"""Insiders and outsiders against identity (issue 15, attacks 3 and 8).

Attack 3: an admin makes a token for a lead and approves, as her, a production
deployment the admin started; or turns her into a service user, mints, and turns her
back. Attack 8: an unauthenticated flood of logins guesses passwords, queues bcrypt
without bound and writes one audit row per attempt; and, found in review, callers over
IPv6 sharing one throttle key, one address's logins holding the whole check queue, a
100-character username breaking the throttled attempt's audit row. Each test performs
the attack through the API and asserts the refusal.

The login tests run on a database of their own (throttling is shared by every replica
through the database, and this run's main database serves other tests' logins from the
same address) with small limits: 3 failures per (username, peer), 10 per peer.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import URL, func, select

from deploy_svc import login_throttle
from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared.devtools.seed import seed
from shared.identity.actor import Actor
from shared.identity.auth import token_hash
from shared.persistence.db import libpq_dsn
from shared.persistence.models import ApiToken, AuditLog, Role, User
from tests.deploying import DEV, PROD, STAGING, Client, S, deployed
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    error_details,
    fails,
    ipv6_loopback,
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


async def test_a_service_user_detour_fails_at_its_first_step(
    deploy_channel, clients, tokens, service_id, database
):
    """The admin tries to make the lead a service user (to mint her a token, act as her,
    and make her a lead again): FAILED_PRECONDITION ACCOUNT_KIND_FIXED, and her role,
    her tokens and her login are as they were. A service user does not become a person
    either (its tokens, made by others, would then act as one)."""
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    lead = await new_lead(admin, auth)
    own = await admin.Login(auth_pb2.LoginRequest(username=lead.username, password="password123"))
    deployment = await awaiting_approval(clients["admin"], service_id)
    before = await admin.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=lead.id), metadata=auth
    )

    error = await fails(
        set_role(admin, auth, lead.id, common_pb2.ROLE_SERVICE),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_KIND_FIXED",
    )
    info = error_details(error)[0]
    assert (info.metadata["user_id"], info.metadata["role"]) == (lead.id, "lead")
    await fails(  # so the detour's second step finds her a person still
        admin.CreateApiToken(
            auth_pb2.CreateApiTokenRequest(user_id=lead.id, name="detour"), metadata=auth
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "TOKEN_FOR_ANOTHER_USER",
    )
    me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(own.access_token))
    assert me.role == common_pb2.ROLE_LEAD
    after = await admin.ListApiTokens(auth_pb2.ListApiTokensRequest(user_id=lead.id), metadata=auth)
    assert [t.id for t in after.api_tokens] == [t.id for t in before.api_tokens]
    [login_token] = after.api_tokens
    assert login_token.created_by == lead.id and not login_token.HasField("revoked_at")
    again = await admin.Login(auth_pb2.LoginRequest(username=lead.username, password="password123"))
    assert again.user.role == common_pb2.ROLE_LEAD
    # Herself, she still approves: the two-person rule with two persons.
    approval = await Client(deploy_channel, own.access_token).ApproveDeployment(
        deployment_id=deployment.id
    )
    assert approval.status == S.APPROVAL_STATUS_APPROVED

    bot = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.SERVICE]))
    for role in (common_pb2.ROLE_LEAD, common_pb2.ROLE_ADMIN, common_pb2.ROLE_VIEWER):
        await fails(
            set_role(admin, auth, bot.id, role),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ACCOUNT_KIND_FIXED",
        )
    still = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.SERVICE]))
    assert still.role == common_pb2.ROLE_SERVICE
    async with database.transaction() as session:
        updates = await session.scalar(
            select(func.count())
            .select_from(AuditLog)
            .where(AuditLog.resource_id == lead.id, AuditLog.action == "update")
        )
    assert updates == 0


async def test_a_change_of_role_revokes_the_tokens_others_made(deploy_channel, tokens, database):
    """Defence in depth: should a token someone else made for a person exist (a row from
    before the rules, written here straight into the database), a change of her role
    revokes it; her own login token survives."""
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=auth)
    lead = await new_lead(admin, auth)
    own = await admin.Login(auth_pb2.LoginRequest(username=lead.username, password="password123"))
    escaped_id = uuid.uuid4()
    async with database.transaction() as session:
        session.add(
            ApiToken(
                id=escaped_id,
                user_id=uuid.UUID(lead.id),
                token_hash=token_hash(f"rm_{uuid.uuid4().hex}"),
                name="escaped",
                created_by=uuid.UUID(me.id),
            )
        )
    await set_role(admin, auth, lead.id, common_pb2.ROLE_DEVELOPER)
    listed = await admin.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=lead.id), metadata=auth
    )
    by_id = {token.id: token for token in listed.api_tokens}
    assert by_id.pop(str(escaped_id)).HasField("revoked_at")
    [login_token] = by_id.values()
    assert login_token.created_by == lead.id and not login_token.HasField("revoked_at")
    demoted = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(own.access_token))
    assert demoted.role == common_pb2.ROLE_DEVELOPER
    async with database.transaction() as session:
        update = await session.scalar(
            select(AuditLog).where(AuditLog.resource_id == lead.id, AuditLog.action == "update")
        )
    assert update.details == {"changed": {"role": ["lead", "developer"]}, "tokens_revoked": 1}


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
    assert first.api_token.id != request.request_id  # a request id is not the token's id
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


async def audit_rows(sql, action: str, key: str | None = None, username: str | None = None):
    """Rows of `action`; `key` is a `login_throttled` row's throttle key (in its details:
    its resource_id is the address)."""
    return await sql.fetch(
        "SELECT resource_id, details, ip_address FROM audit_logs"
        " WHERE action = $1"
        " AND ($2::text IS NULL OR details->>'key' = $2)"
        " AND ($3::text IS NULL OR details->>'username' = $3)",
        action,
        key,
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
    assert (throttled["resource_id"], throttled["ip_address"]) == ("127.0.0.1", "127.0.0.1")
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
    logins, however many, several at once included, count against nothing (the README
    and the bench log in again and again)."""
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


async def test_a_throttled_login_with_a_100_character_username_is_recorded(auth_stub, sql):
    """The longest username Login takes makes a throttle key longer than an audit row's
    resource_id (100): the throttled attempt still answers LOGIN_THROTTLED (not INTERNAL)
    and leaves its one row, the address as resource_id, key and username in its details."""
    username = "g" * 100
    for _ in range(PER_USER):
        assert (await attempt(auth_stub, username)).code() == grpc.StatusCode.UNAUTHENTICATED
    for _ in range(2):
        error = await attempt(auth_stub, username)
        assert error.code() == RESOURCE_EXHAUSTED, error.details()
        assert error_details(error)[0].reason == "LOGIN_THROTTLED"
    key = f"user:{username}|127.0.0.1"
    [row] = await audit_rows(sql, "login_throttled", username=username)
    assert (row["resource_id"], row["ip_address"]) == ("127.0.0.1", "127.0.0.1")
    assert json.loads(row["details"])["key"] == key
    assert await sql.fetchval("SELECT throttled FROM login_throttle WHERE key = $1", key) == 2


async def test_an_ipv6_caller_is_throttled_and_audited_by_its_own_address(login_db, auth_stub, sql):
    """grpc names an IPv6 peer `ipv6:%5B::1%5D:port`: read undecoded, every IPv6 caller had
    no address, shared one throttle key and left ip_address empty. A failed login from ::1
    records "::1" and counts against keys of its own, apart from 127.0.0.1's."""
    if not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    process = await RelmanProcess.start(
        ["-m", "deploy_svc"], env_for(login_db, DEPLOY_SVC_ADDR="[::1]:0")
    )
    try:
        address = (await process.wait_listening("deploy_svc"))["deploy_svc"]
        assert address.startswith("[::1]:")
        username = new_username()
        async with grpc.aio.insecure_channel(address) as channel:
            error = await attempt(auth_pb2_grpc.AuthServiceStub(channel), username)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await process.stop()
    assert (await attempt(auth_stub, username)).code() == grpc.StatusCode.UNAUTHENTICATED
    failed = await audit_rows(sql, "login_failed", username=username)
    assert sorted(row["ip_address"] for row in failed) == ["127.0.0.1", "::1"]
    counts = dict(await sql.fetch("SELECT key, failures FROM login_throttle"))
    assert counts == {
        "peer:::1": 1,
        f"user:{username}|::1": 1,
        "peer:127.0.0.1": 1,
        f"user:{username}|127.0.0.1": 1,
    }


@asynccontextmanager
async def on_both_loopbacks(login_db: URL, **settings: str) -> AsyncIterator[tuple]:
    """A deploy_svc on `localhost:0` (127.0.0.1 and ::1, one port) and an AuthService stub
    through each: two callers with two addresses (a channel to 127.0.0.2 still comes from
    127.0.0.1, so IPv6 is the second address)."""
    if not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    process = await RelmanProcess.start(
        ["-m", "deploy_svc"], env_for(login_db, DEPLOY_SVC_ADDR="localhost:0", **settings)
    )
    try:
        port = (await process.wait_listening("deploy_svc"))["deploy_svc"].rpartition(":")[2]
        for host in ("127.0.0.1", "::1"):  # gRPC binds both for localhost (RFC 6761)
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                pytest.skip(f"localhost:0 did not bind {host} on this machine")
            writer.close()
            await writer.wait_closed()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as v4,
            grpc.aio.insecure_channel(f"[::1]:{port}") as v6,
        ):
            yield auth_pb2_grpc.AuthServiceStub(v4), auth_pb2_grpc.AuthServiceStub(v6)
    finally:
        await process.stop()


async def first_busy(logins: list[asyncio.Task]) -> None:
    """Returns once one of `logins` has been refused LOGIN_BUSY: the others are then in
    the process, holding what they hold."""
    for finished in asyncio.as_completed(logins):
        error = await finished
        if error is not None and error_details(error)[0].reason == "LOGIN_BUSY":
            return
    raise AssertionError("no login of the flood was refused LOGIN_BUSY")


async def test_one_address_cannot_hold_every_place_in_the_login_queue(login_db, sql):
    """An insider loops logins of their own account (never throttled) from 127.0.0.1, 40
    at once, more than LOGIN_QUEUE_MAX (32): one is checked, 8 wait behind it, the rest are
    LOGIN_BUSY at once; a login from another address (::1) meanwhile is not LOGIN_BUSY."""
    async with on_both_loopbacks(login_db) as (insider, other):
        flood = [asyncio.create_task(attempt(insider, "priya", "password123")) for _ in range(40)]
        try:
            await first_busy(flood)
            assert await attempt(other, "marco", "password123") is None
        finally:
            outcomes = await asyncio.gather(*flood)
    refused = [error for error in outcomes if error is not None]
    assert {error_details(error)[0].reason for error in refused} == {"LOGIN_BUSY"}
    assert len(refused) >= len(flood) - 1 - login_throttle.WAITING_PER_PEER_MAX


async def test_the_login_queue_bounds_checks_across_addresses(login_db, sql):
    """LOGIN_QUEUE_MAX=1: while a login from ::1 is being checked (ten from there: one
    checked, eight waiting, the tenth LOGIN_BUSY), one from 127.0.0.1 finds no place."""
    async with on_both_loopbacks(login_db, LOGIN_QUEUE_MAX="1") as (v4, v6):
        burst = [
            asyncio.create_task(attempt(v6, new_username()))
            for _ in range(login_throttle.WAITING_PER_PEER_MAX + 2)
        ]
        try:
            await first_busy(burst)
            error = await attempt(v4, new_username())
        finally:
            await asyncio.gather(*burst)
    assert error.code() == RESOURCE_EXHAUSTED
    assert error_details(error)[0].reason == "LOGIN_BUSY"


async def test_the_password_check_queue_is_bounded(login_db, sql):
    """With room for one login at a time, a burst is refused at once (LOGIN_BUSY) instead
    of queueing behind bcrypt (from one address, at most 8 wait behind the one being
    checked); refused attempts leave no audit row."""
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


def test_an_ipv6_client_cannot_escape_the_throttle_by_changing_its_address():
    """A client holds a whole /64: each of its addresses counts against the same keys,
    while another /64, and IPv4 and loopback addresses, keep their own."""
    limits = login_throttle.LoginLimits(per_user=5, per_peer=30, window_s=900, queue_max=64)

    def keys(peer: str) -> dict[str, int]:
        return login_throttle._keys("lena", Actor.anonymous(peer, None), limits)

    assert keys("2a00:1450:4001:81c::1") == keys("2a00:1450:4001:81c:dead:beef:0:7")
    assert keys("2a00:1450:4001:81c::1") != keys("2a00:1450:4001:81d::1")
    assert "peer:2a00:1450:4001:81c::/64" in keys("2a00:1450:4001:81c::1")
    assert "peer:::1" in keys("::1") and "peer:198.51.100.4" in keys("198.51.100.4")
