"""Identity and access through real servers: logins, tokens, the permission matrix, audit rows."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import select

from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared.identity.auth import OPEN_SERVICES, PUBLIC, ROLE_PERMISSIONS, RPC_PERMISSIONS, SELF
from shared.identity.tokens import issue_token
from shared.persistence.db import libpq_dsn
from shared.persistence.models import ApiToken, AuditLog, Role, User
from tests.conftest import USER_OF_ROLE
from tests.harness import (
    RelmanProcess,
    bearer,
    call_empty,
    client_address,
    env_for,
    error_details,
    grpcurl,
    method_shape,
    run_cli,
)

SEEDED = {
    "admin": Role.ADMIN,
    "lena": Role.LEAD,
    "marco": Role.LEAD,
    "priya": Role.DEVELOPER,
    "tom": Role.DEVELOPER,
    "sofia": Role.DEVELOPER,
    "victor": Role.VIEWER,
    "wendy": Role.VIEWER,
}


async def grpcurl_lines(*args: str, env: dict[str, str]) -> list[str]:
    code, out, err = await grpcurl(*args, env=env)
    assert code == 0, err
    return out.split()


@pytest.fixture(scope="module")
async def reflected_methods(relman, db_url) -> list[tuple[str, str]]:
    """(process, "pkg.Service/Method") of every RPC the servers list through reflection."""
    env = env_for(db_url)
    methods = []
    for process, address in relman.addresses.items():
        target = client_address(address)
        for service in await grpcurl_lines("-plaintext", target, "list", env=env):
            for method in await grpcurl_lines("-plaintext", target, "list", service, env=env):
                methods.append((process, method.replace(f"{service}.", f"{service}/")))
    return methods


async def call(channel: grpc.aio.Channel, method: str, metadata=()) -> grpc.StatusCode:
    """Calls any RPC with an empty request; returns the status code it ends with."""
    error = await call_empty(channel, method, metadata, **method_shape(method))
    return grpc.StatusCode.OK if error is None else error.code()


def channel_to(relman, process: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(client_address(relman.addresses[process]))


async def login(channel, username: str, password: str = "password123"):
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    return await stub.Login(auth_pb2.LoginRequest(username=username, password=password))


# -- Login ---------------------------------------------------------------------------------


@pytest.mark.parametrize("username", list(SEEDED))
async def test_every_seeded_user_logs_in(deploy_channel, username):
    response = await login(deploy_channel, username)
    assert len(response.access_token) >= 43  # 32 random bytes, URL-safe
    assert response.user.username == username
    assert response.user.role == common_pb2.Role.Value(f"ROLE_{SEEDED[username].upper()}")
    ttl = response.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(hours=11, minutes=59) < ttl <= timedelta(hours=12)
    me = await auth_pb2_grpc.AuthServiceStub(deploy_channel).WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=bearer(response.access_token)
    )
    assert (me.username, me.role) == (username, response.user.role)


@pytest.fixture(scope="module")
async def inactive_user(deploy_channel, tokens) -> str:
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    user = await admin.CreateUser(
        auth_pb2.CreateUserRequest(
            username="gone",
            email="gone@relman.example",
            password="password123",
            role=common_pb2.ROLE_DEVELOPER,
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    await admin.UpdateUser(
        auth_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    return "gone"


async def test_wrong_password_unknown_user_and_inactive_user_look_the_same(
    deploy_channel, inactive_user
):
    answers = []
    for username, password in [
        ("lena", "password124"),
        ("nobody", "password123"),
        (inactive_user, "password123"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await login(deploy_channel, username, password)
        info, violations = error_details(failure.value)
        answers.append(
            (
                failure.value.code(),
                failure.value.details(),
                info.reason,
                dict(info.metadata),
                len(violations),
            )
        )
    assert answers[0][0] == grpc.StatusCode.UNAUTHENTICATED
    assert answers[0] == answers[1] == answers[2]


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [
        ("", "password123", "username"),
        ("lena", "", "password"),
        ("lena", "p" * 73, "password"),
        ("lena", "é" * 37, "password"),
        ("lena", "pass\x00word", "password"),
        ("le\x00na", "password123", "username"),
        ("l" * 101, "password123", "username"),
    ],
    ids=[
        "empty-user",
        "empty-password",
        "73-bytes",
        "74-bytes-utf8",
        "nul-password",
        "nul-user",
        "long-user",
    ],
)
async def test_malformed_credentials_are_invalid_argument(
    deploy_channel, username, password, field
):
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await login(deploy_channel, username, password)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = error_details(failure.value)
    assert [v.field for v in violations] == [field]
    if password:
        assert password not in failure.value.details()


async def test_logins_are_audited_without_the_password(deploy_channel, database):
    started = datetime.now(UTC)
    await login(deploy_channel, "wendy")
    with pytest.raises(grpc.aio.AioRpcError):
        await login(deploy_channel, "wendy", "secret-guess-42")
    async with database.transaction() as session:
        wendy = await session.scalar(select(User.id).where(User.username == "wendy"))
        audit = await session.scalars(
            select(AuditLog).where(
                AuditLog.resource_id == str(wendy), AuditLog.created_at >= started
            )
        )
        found = {row.action: row for row in audit}
    assert set(found) == {"login", "login_failed"}
    assert found["login"].user_id == wendy
    assert found["login_failed"].details == {"username": "wendy"}
    assert all("secret-guess-42" not in str(row.details) for row in found.values())


# -- tokens --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def bad_tokens(database, deploy_channel, tokens) -> dict[str, tuple]:
    """Call metadata for each way a token can be wrong."""
    async with database.transaction() as session:
        lena = await session.scalar(select(User).where(User.username == "lena"))
        expired, _ = await issue_token(
            session, lena, "expired", datetime.now(UTC) - timedelta(minutes=1)
        )
        revoked, revoked_row = await issue_token(session, lena, "revoked", None)
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    await admin.RevokeApiToken(
        auth_pb2.RevokeApiTokenRequest(token_id=str(revoked_row.id)),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    user = await admin.CreateUser(
        auth_pb2.CreateUserRequest(
            username="leaver",
            email="leaver@relman.example",
            password="password123",
            role=common_pb2.ROLE_LEAD,
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    leaver = (await login(deploy_channel, "leaver")).access_token
    await admin.UpdateUser(
        auth_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    return {
        "missing": (),
        "not-bearer": (("authorization", f"Basic {tokens[Role.ADMIN]}"),),
        "empty-bearer": (("authorization", "Bearer "),),
        "unknown": bearer("rm_" + "x" * 43),
        "expired": bearer(expired),
        "revoked": bearer(revoked),
        "deactivated-user": bearer(leaver),
    }


BAD_TOKEN_KINDS = [
    "missing",
    "not-bearer",
    "empty-bearer",
    "unknown",
    "expired",
    "revoked",
    "deactivated-user",
]


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_bad_tokens_are_unauthenticated_on_every_rpc(
    relman, reflected_methods, bad_tokens, kind
):
    """Table-driven from the reflection list: no RPC of either server escapes."""
    outcomes = {}
    for process, method in reflected_methods:
        if method.split("/")[0] in OPEN_SERVICES:
            continue
        async with channel_to(relman, process) as channel:
            outcomes[method] = await call(channel, method, bad_tokens[kind])
    assert len(outcomes) == len(RPC_PERMISSIONS)
    login_code = outcomes.pop("relman.v1.AuthService/Login")
    assert login_code == grpc.StatusCode.INVALID_ARGUMENT  # public: no token needed
    assert set(outcomes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, outcomes


def test_permission_table_covers_every_rpc_and_only_them(reflected_methods):
    served = {m for _, m in reflected_methods if m.split("/")[0] not in OPEN_SERVICES}
    assert served == set(RPC_PERMISSIONS)


def _expectation(role: Role, method: str) -> str | None:
    """None if the role may call the method, else the permission it lacks."""
    permission = RPC_PERMISSIONS[method]
    if permission in (PUBLIC, SELF) or permission in ROLE_PERMISSIONS[role]:
        return None
    return permission


@pytest.mark.parametrize("role", list(Role), ids=str)
async def test_rpc_by_role_matrix(relman, reflected_methods, database, role):
    """Each role against every RPC: PERMISSION_DENIED naming the permission, or let through
    (then the call fails only on its empty request or as UNIMPLEMENTED)."""
    async with database.transaction() as session:
        user = await session.scalar(select(User).where(User.username == USER_OF_ROLE[role]))
        token, _ = await issue_token(session, user, "matrix", None)
    outcomes = {}
    for process, method in reflected_methods:
        if method.split("/")[0] in OPEN_SERVICES or method.endswith("/Logout"):
            continue
        async with channel_to(relman, process) as channel:
            error = await call_empty(channel, method, bearer(token), **method_shape(method))
        code = grpc.StatusCode.OK if error is None else error.code()
        permission = None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            info, _ = error_details(error)
            assert info.reason == "MISSING_PERMISSION"
            permission = info.metadata["permission"]
        outcomes[method] = (code, permission)
    if role != Role.ADMIN:  # an environment's type decides its rules: admins only create one
        assert outcomes["relman.v1.DeployService/CreateEnvironment"] == (
            grpc.StatusCode.PERMISSION_DENIED,
            "environments.write",
        )
    for method, (code, permission) in outcomes.items():
        lacking = _expectation(role, method)
        if lacking is None:
            assert code not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ), (method, code)
        else:
            assert (code, permission) == (grpc.StatusCode.PERMISSION_DENIED, lacking), method
    # GetUser and ListUsers let every role in; what each sees is the use case's to decide.
    async with channel_to(relman, "deploy_svc") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        listed = await stub.ListUsers(auth_pb2.ListUsersRequest(), metadata=bearer(token))
        other = "priya" if role == Role.ADMIN else "admin"
        async with database.read() as session:
            other_id = await session.scalar(select(User.id).where(User.username == other))
        read_other = stub.GetUser(
            auth_pb2.GetUserRequest(user_id=str(other_id)), metadata=bearer(token)
        )
        if role == Role.ADMIN:
            assert len(listed.users) > 1 and (await read_other).username == other
        else:
            assert [u.id for u in listed.users] == [str(user.id)]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await read_other
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_details(refused.value)[0].metadata["permission"] == "users.admin"


async def test_roles_hold_what_the_design_says():
    viewer, developer, lead, admin, service = (
        ROLE_PERMISSIONS[r]
        for r in (Role.VIEWER, Role.DEVELOPER, Role.LEAD, Role.ADMIN, Role.SERVICE)
    )
    assert viewer < developer < lead < admin
    assert "deployments.write" in developer and "deployments.write.production" not in developer
    assert {"deployments.approve", "catalog.write", "audit.read"} <= lead
    assert "users.admin" in admin and "users.admin" not in lead
    assert {"audit.write", "audit.write.on_behalf", "catalog.read"} <= service
    assert "releases.read" not in service and "audit.read" not in service


async def test_logout_revokes_the_calling_token(deploy_channel, audit_channel):
    token = (await login(deploy_channel, "tom")).access_token
    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(token))
    await stub.Logout(auth_pb2.LogoutRequest(), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(token))
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_token_stops_working_on_the_other_server_within_5_s(
    relman, deploy_channel, tokens, database
):
    async with database.transaction() as session:
        sofia = await session.scalar(select(User).where(User.username == "sofia"))
        token, row = await issue_token(session, sofia, "cached", None)
    async with channel_to(relman, "audit_svc") as audit:
        method = "relman.v1.AuditService/LogAction"  # permitted, so admission passes
        # Admitted (the empty request itself is then refused as invalid).
        assert await call(audit, method, bearer(token)) == grpc.StatusCode.INVALID_ARGUMENT
        await auth_pb2_grpc.AuthServiceStub(deploy_channel).RevokeApiToken(
            auth_pb2.RevokeApiTokenRequest(token_id=str(row.id)),
            metadata=bearer(tokens[Role.ADMIN]),
        )
        revoked_at = asyncio.get_running_loop().time()
        while await call(audit, method, bearer(token)) != grpc.StatusCode.UNAUTHENTICATED:
            assert asyncio.get_running_loop().time() - revoked_at < 6, "still accepted"
            await asyncio.sleep(0.1)


async def test_deactivating_a_user_revokes_their_tokens(deploy_channel, tokens, database):
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    user = await admin.CreateUser(
        auth_pb2.CreateUserRequest(
            username="temp.worker",
            email="temp@relman.example",
            password="password123",
            role=common_pb2.ROLE_VIEWER,
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    await login(deploy_channel, "temp.worker")
    await admin.UpdateUser(
        auth_pb2.UpdateUserRequest(
            user=common_pb2.User(id=user.id, is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["is_active"]),
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    listed = await admin.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=user.id), metadata=bearer(tokens[Role.ADMIN])
    )
    assert listed.total_size == 1
    assert all(token.HasField("revoked_at") for token in listed.api_tokens)


async def test_the_last_active_admin_cannot_be_removed(deploy_channel, tokens):
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.ADMIN]))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await admin.UpdateUser(
            auth_pb2.UpdateUserRequest(
                user=common_pb2.User(id=me.id, role=common_pb2.ROLE_LEAD),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=bearer(tokens[Role.ADMIN]),
        )
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(failure.value)[0].reason == "LAST_ADMIN"
    again = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.ADMIN]))
    assert again.role == common_pb2.ROLE_ADMIN


async def test_create_user_validates_and_refuses_duplicates(deploy_channel, tokens):
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    request_id = str(uuid.uuid4())
    request = auth_pb2.CreateUserRequest(
        username="nina",
        email="nina@relman.example",
        password="password123",
        role=common_pb2.ROLE_LEAD,
        request_id=request_id,
    )
    first = await admin.CreateUser(request, metadata=auth)
    retried = await admin.CreateUser(request, metadata=auth)
    assert first == retried and first.id != request_id  # a request id is not the user's id
    with pytest.raises(grpc.aio.AioRpcError) as clash:
        await admin.CreateUser(
            auth_pb2.CreateUserRequest(
                username="nina",
                email="other@relman.example",
                password="password123",
                role=common_pb2.ROLE_LEAD,
            ),
            metadata=auth,
        )
    assert clash.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for bad, field in [
        (dict(username="x y", email="x@relman.example", password="p", role=2), "username"),
        (dict(username="xy", email="not-mail", password="p", role=2), "email"),
        (dict(username="xy", email="x@relman.example", password="p", role=0), "role"),
        (dict(username="xy", email="x@relman.example", password="p", role=42), "role"),
        (dict(username="xy", email="x@relman.example", password="", role=2), "password"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await admin.CreateUser(auth_pb2.CreateUserRequest(**bad), metadata=auth)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert [v.field for v in error_details(failure.value)[1]] == [field]


async def test_api_token_is_shown_once_and_works(deploy_channel, tokens, database):
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    bot = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.SERVICE]))
    maker = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.ADMIN]))
    created = await admin.CreateApiToken(
        auth_pb2.CreateApiTokenRequest(user_id=bot.id, name="dashboard"),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    assert created.api_token.created_by == maker.id
    ttl = created.api_token.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(days=89, hours=23) < ttl <= timedelta(days=90)  # the default lifetime
    me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(created.token))
    assert me.username == bot.username
    listed = await admin.ListApiTokens(
        auth_pb2.ListApiTokensRequest(user_id=bot.id), metadata=bearer(tokens[Role.ADMIN])
    )
    assert created.api_token.id in {token.id for token in listed.api_tokens}
    assert created.token not in str(listed)
    async with database.transaction() as session:
        row = await session.get(ApiToken, uuid.UUID(created.api_token.id))
        assert row.token_hash != created.token and len(row.token_hash) == 64
        assert row.last_used_at is not None  # recorded on use


async def test_list_api_tokens_pages_with_keyset_tokens(deploy_channel, tokens):
    admin = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    auth = bearer(tokens[Role.ADMIN])
    wendy = await login(deploy_channel, "wendy")
    for _ in range(4):
        await login(deploy_channel, "wendy")
    seen, page_token = [], ""
    while True:
        page = await admin.ListApiTokens(
            auth_pb2.ListApiTokensRequest(
                user_id=wendy.user.id, page_size=2, page_token=page_token
            ),
            metadata=auth,
        )
        seen += [token.id for token in page.api_tokens]
        assert page.total_size == len(seen) or page.next_page_token
        page_token = page.next_page_token
        if not page_token:
            break
    assert len(seen) == len(set(seen)) == page.total_size >= 5
    with pytest.raises(grpc.aio.AioRpcError) as mismatch:
        await admin.ListApiTokens(
            auth_pb2.ListApiTokensRequest(
                page_size=2,
                page_token=(
                    await admin.ListApiTokens(
                        auth_pb2.ListApiTokensRequest(user_id=wendy.user.id, page_size=2),
                        metadata=auth,
                    )
                ).next_page_token,
            ),
            metadata=auth,
        )
    assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for bad in ("garbage!", "eyJrIjpbXX0"):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await admin.ListApiTokens(auth_pb2.ListApiTokensRequest(page_token=bad), metadata=auth)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as negative:
        await admin.ListApiTokens(auth_pb2.ListApiTokensRequest(page_size=-1), metadata=auth)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- the caller in the audit trail -----------------------------------------------------------


async def test_audit_row_carries_caller_peer_and_user_agent(relman, tokens, database):
    address = client_address(relman.addresses["deploy_svc"])
    options = [("grpc.primary_user_agent", "audit-probe/2.0")]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        admin = auth_pb2_grpc.AuthServiceStub(channel)
        me = await admin.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(tokens[Role.ADMIN]))
        created = await admin.CreateApiToken(
            auth_pb2.CreateApiTokenRequest(user_id=me.id, name="audit-probe"),
            metadata=bearer(tokens[Role.ADMIN]),
        )
    async with database.transaction() as session:
        rows = (
            (
                await session.execute(
                    select(AuditLog).where(AuditLog.resource_id == created.api_token.id)
                )
            )
            .scalars()
            .all()
        )
    assert [(row.action, str(row.user_id), row.ip_address) for row in rows] == [
        ("create", me.id, "127.0.0.1")
    ]
    assert rows[0].user_agent.startswith("audit-probe/2.0")


async def test_refused_calls_are_audited_with_a_rate_limit_per_peer(db_url, relman):
    """A flood of refused calls from one peer leaves one row, counting what it held back."""
    process = await RelmanProcess.start(  # its own process: a limiter that saw no refusal yet
        ["-m", "deploy_svc"], env_for(db_url, DEPLOY_SVC_ADDR="127.0.0.1:0")
    )
    try:
        address = (await process.wait_listening("deploy_svc"))["deploy_svc"]
        agent = f"flood-{uuid.uuid4()}"
        options = [("grpc.primary_user_agent", agent)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            for _ in range(30):
                code = await call(channel, "relman.v1.DeployService/GetRunbook")
                assert code == grpc.StatusCode.UNAUTHENTICATED
        connection = await asyncpg.connect(libpq_dsn(db_url))
        try:
            rows = await connection.fetch(
                "SELECT ip_address, details FROM audit_logs"
                " WHERE action = 'auth.denied' AND user_agent LIKE $1",
                f"{agent}%",
            )
        finally:
            await connection.close()
        assert 1 <= len(rows) <= 2  # one per 10 s window
        assert rows[0]["ip_address"] == "127.0.0.1"
        assert '"MISSING_CREDENTIALS"' in rows[0]["details"]
    finally:
        await process.stop()


# -- the tokens command line ----------------------------------------------------------------


async def test_tokens_cli_creates_lists_and_revokes(relman, db_url, deploy_channel):
    created = run_cli(
        db_url,
        "shared.identity.tokens",
        "create",
        "--user",
        "deployer-bot",
        "--name",
        "ci",
        "--expires-days",
        "30",
        "--service-user",
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(token))
    assert (me.username, me.role) == ("deployer-bot", common_pb2.ROLE_SERVICE)

    listed = run_cli(db_url, "shared.identity.tokens", "list", "--user", "deployer-bot")
    assert listed.returncode == 0 and token not in listed.stdout
    token_id = listed.stdout.splitlines()[1].split("\t")[0]
    revoked = run_cli(db_url, "shared.identity.tokens", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert (
        run_cli(
            db_url, "shared.identity.tokens", "create", "--user", "nobody-here", "--name", "x"
        ).returncode
        == 2
    )
    # Tokens for people come from Login: the command line makes them for service users only.
    human = run_cli(db_url, "shared.identity.tokens", "create", "--user", "lena", "--name", "x")
    assert human.returncode == 2 and "service users only" in human.stderr
    too_long = ("--expires-days", "400")
    assert (
        run_cli(
            db_url,
            "shared.identity.tokens",
            "create",
            "--user",
            "deployer-bot",
            "--name",
            "x",
            *too_long,
        ).returncode
        == 2
    )
    forever = run_cli(
        db_url,
        "shared.identity.tokens",
        "create",
        "--user",
        "deployer-bot",
        "--name",
        "x",
        "--never-expires",
    )
    assert forever.returncode == 0, forever.stderr
