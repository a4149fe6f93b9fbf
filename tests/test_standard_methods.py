"""The standard methods through the real API (AIP-122/131/132/134/154): each Get agrees with
its List, resource names and etags in every response, UpdateEnvironment, stale etags
refused, names that never change and are unique whatever their case, and the pages of
ListRollbacks, ListLiveDeployments and ListUsers."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial

import asyncpg
import grpc
import pytest
from sqlalchemy import select

from deploy_svc.catalog import NAME_FIXED  # also registers the database's refusals
from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2, deploy_pb2
from shared.devtools.seed import seed_id
from shared.framework.errors import from_exception
from shared.persistence.db import libpq_dsn
from shared.persistence.models import AuditLog, Role
from tests.conftest import USER_OF_ROLE
from tests.deploying import DEV, PROD, STAGING, S, deployed, run_all_stages
from tests.harness import bearer, error_details, fails, poll, runtime_url

PLATFORM = str(seed_id("team", "Platform"))
AUTH_SERVICE = str(seed_id("service", "auth-service"))
NOWHERE = str(uuid.uuid4())


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mask(*paths: str) -> dict:
    return {"paths": list(paths)}


def violated_fields(error) -> list[str]:
    return [violation.field for violation in error_details(error)[1]]


async def every_page(list_call, field: str, page_size: int, **filters) -> list:
    """Every item of a List RPC, walked `page_size` at a time; each page but the last full,
    and every page telling the same total_size."""
    items, token, totals = [], "", set()
    while True:
        page = await list_call(page_size=page_size, page_token=token, **filters)
        found = list(getattr(page, field))
        assert len(found) == page_size or not page.next_page_token
        items += found
        totals.add(page.total_size)
        token = page.next_page_token
        if not token:
            assert totals == {len(items)}
            return items


@pytest.fixture
def auth(deploy_channel, tokens):
    """AuthService as a role: `await auth(Role.VIEWER).GetUser(user_id=...)`."""

    class As:
        def __init__(self, role: Role) -> None:
            self.stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
            self.metadata = bearer(tokens[role])

        def __getattr__(self, rpc: str):
            method = getattr(self.stub, rpc)
            request_type = getattr(auth_pb2, f"{rpc}Request")
            return lambda **fields: method(
                request_type(**fields), metadata=self.metadata, timeout=30
            )

    return As


async def a_rollback(lead, service_id: str, environments: tuple[str, ...]):
    """Releases 1.0.0 then 2.0.0 deployed through `environments`; 2.0.0 rolled back in the
    last of them. Returns the rollback."""
    await deployed(lead, service_id, "1.0.0", *environments)
    second = await deployed(lead, service_id, "2.0.0", *environments)
    newest = (
        await lead.ListDeployments(release_id=second.id, environment_id=environments[-1])
    ).deployments[0]
    return await lead.RollbackDeployment(deployment_id=newest.id, reason="errors went up")


# -- Get agrees with List; names and etags in every response ------------------------------------


async def test_each_get_returns_what_its_list_returns(clients):
    viewer = clients["viewer"]
    service = await viewer.GetService(service_id=AUTH_SERVICE)
    assert service in (await viewer.ListServices(team_id=PLATFORM, page_size=1000)).services
    assert service.resource_name == "services/auth-service" and service.etag

    environment = await viewer.GetEnvironment(environment_id=PROD)
    assert environment in (await viewer.ListEnvironments(page_size=1000)).environments
    assert environment.resource_name == "environments/production" and environment.etag

    team = await viewer.GetTeam(team_id=PLATFORM)
    assert team in (await viewer.ListTeams(page_size=1000)).teams
    assert team.resource_name == "teams/Platform"

    for call, reason in (
        (viewer.GetService(service_id=NOWHERE), "SERVICE_NOT_FOUND"),
        (viewer.GetEnvironment(environment_id=NOWHERE), "ENVIRONMENT_NOT_FOUND"),
        (viewer.GetTeam(team_id=NOWHERE), "TEAM_NOT_FOUND"),
        (viewer.GetRollback(rollback_id=NOWHERE), "ROLLBACK_NOT_FOUND"),
    ):
        await fails(call, grpc.StatusCode.NOT_FOUND, reason)


async def test_every_resource_carries_its_resource_name(clients, deploy_channel, service_id):
    """Also those converted right after their INSERT, and those inside another message."""
    lead = clients["lead"]
    service = await lead.GetService(service_id=service_id)
    release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    assert release.resource_name == f"{service.resource_name}/releases/1.0.0"
    assert await lead.GetRelease(release_id=release.id) == release
    listed = await lead.ListReleases(service_id=service_id)
    assert [r.resource_name for r in listed.releases] == [release.resource_name]

    deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    assert deployment.resource_name == f"deployments/{deployment.id}"
    watch = lead.stub.WatchDeployment(
        deploy_pb2.WatchDeploymentRequest(deployment_id=deployment.id),
        metadata=lead.auth,
        timeout=30,
    )
    assert (await anext(aiter(watch))).resource_name == deployment.resource_name
    watch.cancel()
    await run_all_stages(lead, deployment)
    (live,) = (await lead.ListLiveDeployments(service_id=service_id)).live_deployments
    assert live.live_release.resource_name == release.resource_name
    assert live.live_deployment.resource_name == deployment.resource_name

    runbook = await lead.CreateRunbook(title="On call", content="Steps.", service_id=service_id)
    assert (runbook.resource_name, runbook.etag) == (f"runbooks/{runbook.id}", "1")
    assert await lead.GetRunbook(runbook_id=runbook.id) == runbook

    stub = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    login = await stub.Login(auth_pb2.LoginRequest(username="wendy", password="password123"))
    assert login.user.resource_name == "users/wendy"
    me = await stub.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(login.access_token))
    assert me.resource_name == "users/wendy"


# -- UpdateEnvironment ------------------------------------------------------------------------


async def test_update_environment_changes_only_the_masked_fields(clients, database):
    admin = clients["admin"]
    created = await admin.CreateEnvironment(
        name=unique("qa"),
        environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT,
        description="QA cluster",
        config_path="k8s/qa",
    )
    assert created.etag == "1"
    asked = common_pb2.Environment(
        id=created.id, name="renamed", description="QA, shared", config_path="elsewhere"
    )
    updated = await admin.UpdateEnvironment(environment=asked, update_mask=mask("description"))
    assert (updated.name, updated.description, updated.config_path) == (
        created.name,
        "QA, shared",
        "k8s/qa",
    )
    assert updated.etag == "2"
    assert await admin.GetEnvironment(environment_id=created.id) == updated
    async with database.read() as session:
        rows = (
            await session.scalars(
                select(AuditLog).where(
                    AuditLog.resource_type == "environment",
                    AuditLog.resource_id == created.id,
                    AuditLog.action == "update",
                )
            )
        ).all()
    assert [row.details for row in rows] == [
        {"changed": {"description": ["QA cluster", "QA, shared"]}}
    ]

    for fixed in ("name", "environment_type"):
        error = await fails(
            admin.UpdateEnvironment(
                environment=common_pb2.Environment(
                    id=created.id, name="renamed", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
                ),
                update_mask=mask(fixed),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_IMMUTABLE",
        )
        assert violated_fields(error) == ["update_mask"] and fixed in error.details()
    for role in ("developer", "lead"):
        error = await fails(
            clients[role].UpdateEnvironment(environment=asked, update_mask=mask("description")),
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_PERMISSION",
        )
        assert error_details(error)[0].metadata["permission"] == "environments.write"
    assert await admin.GetEnvironment(environment_id=created.id) == updated


async def test_an_inactive_environment_takes_no_deployments(clients, service_id):
    admin, lead = clients["admin"], clients["lead"]
    environment = await admin.CreateEnvironment(
        name=unique("scratch"), environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    off = await admin.UpdateEnvironment(
        environment=common_pb2.Environment(id=environment.id, is_active=False),
        update_mask=mask("is_active"),
    )
    assert not off.is_active
    await fails(
        lead.CreateDeployment(release_id=release.id, environment_id=environment.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ENVIRONMENT_INACTIVE",
    )
    await admin.UpdateEnvironment(
        environment=common_pb2.Environment(id=environment.id, is_active=True),
        update_mask=mask("is_active"),
    )
    deployment = await lead.CreateDeployment(release_id=release.id, environment_id=environment.id)
    assert deployment.environment_id == environment.id


async def _while_a_change_is_in_flight(db_url, table: str, row_id: str, change: str, call):
    """Runs `call` while a transaction holds the row FOR UPDATE (as UpdateEnvironment,
    UpdateService and UpdateUser hold it) and has made `change`; commits once `call`
    waits for a lock, and returns what `call` gave (or the error it raised)."""
    session = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        async with session.transaction():
            await session.execute(
                f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", uuid.UUID(row_id)
            )
            if change:
                await session.execute(
                    f"UPDATE {table} SET {change} WHERE id = $1", uuid.UUID(row_id)
                )
            pending = asyncio.ensure_future(call)
            await poll(
                partial(session.fetchval, "SELECT count(*) FROM pg_locks WHERE NOT granted"),
                15,
                "a call waiting for the row",
            )
        return await asyncio.gather(pending, return_exceptions=True)
    finally:
        await session.close()


async def _refused(outcome: list, reason: str) -> None:
    (error,) = outcome
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert error_details(error)[0].reason == reason


async def test_a_deploy_racing_a_deactivation_is_refused(clients, service_id, db_url):
    """A deactivation in flight (the row held FOR UPDATE, as UpdateEnvironment and
    UpdateService hold it) holds a deploy back until it commits, and the deploy sees it."""
    admin, lead = clients["admin"], clients["lead"]
    environment = await admin.CreateEnvironment(
        name=unique("race"), environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    deploy = partial(lead.CreateDeployment, release_id=release.id, environment_id=environment.id)
    outcome = await _while_a_change_is_in_flight(
        db_url, "environments", environment.id, "is_active = false", deploy()
    )
    await _refused(outcome, "ENVIRONMENT_INACTIVE")
    await admin.UpdateEnvironment(
        environment=common_pb2.Environment(id=environment.id, is_active=True),
        update_mask=mask("is_active"),
    )
    outcome = await _while_a_change_is_in_flight(
        db_url, "services", service_id, "is_active = false", deploy()
    )
    await _refused(outcome, "SERVICE_INACTIVE")


async def test_a_rollback_racing_a_deactivation_is_refused(clients, service_id, db_url):
    admin, lead = clients["admin"], clients["lead"]
    environment = await admin.CreateEnvironment(
        name=unique("race"), environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    await deployed(lead, service_id, "1.0.0", environment.id)
    await deployed(lead, service_id, "1.1.0", environment.id)
    (newest, *_) = (
        await lead.ListDeployments(service_id=service_id, environment_id=environment.id)
    ).deployments
    rollback = lead.RollbackDeployment(deployment_id=newest.id, reason="bad release")
    outcome = await _while_a_change_is_in_flight(
        db_url, "environments", environment.id, "is_active = false", rollback
    )
    await _refused(outcome, "ENVIRONMENT_INACTIVE")


async def test_a_caller_minting_two_tokens_for_itself_at_once_gets_both(clients, db_url, auth):
    """The token's user is locked before the request id's claim, whose foreign key holds
    the caller's row too: two at once (held back together) do not deadlock."""
    admin = auth(Role.ADMIN)
    me = await admin.WhoAmI()
    session = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        async with session.transaction():
            await session.execute(
                "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE", uuid.UUID(me.id)
            )
            pending = asyncio.gather(  # started only now, while the row is held
                *(
                    admin.CreateApiToken(
                        user_id=me.id, name=f"twin-{n}", request_id=str(uuid.uuid4())
                    )
                    for n in range(2)
                ),
                return_exceptions=True,
            )
            await poll(
                partial(session.fetchval, "SELECT count(*) >= 2 FROM pg_locks WHERE NOT granted"),
                15,
                "both calls waiting",
            )
        outcomes = await pending
    finally:
        await session.close()
    assert all(isinstance(o, auth_pb2.CreateApiTokenResponse) for o in outcomes), outcomes


# -- etags (AIP-154) -------------------------------------------------------------------------


async def _catalogue_resource(kind: str, clients, service_id: str):
    """Its Get, its Update, the field of the request that carries it and a text field."""
    lead, admin = clients["lead"], clients["admin"]
    if kind == "service":
        get = partial(lead.GetService, service_id=service_id)
        return get, lead.UpdateService, "service", "description"
    if kind == "environment":
        made = await admin.CreateEnvironment(
            name=unique("etag"), environment_type=S.ENVIRONMENT_TYPE_STAGING
        )
        get = partial(admin.GetEnvironment, environment_id=made.id)
        return get, admin.UpdateEnvironment, "environment", "description"
    made = await lead.CreateRunbook(title="Etags", content="Read, then write.")
    return partial(lead.GetRunbook, runbook_id=made.id), lead.UpdateRunbook, "runbook", "content"


@pytest.mark.parametrize("kind", ["service", "environment", "runbook"])
async def test_a_stale_etag_is_aborted_and_changes_nothing(clients, service_id, kind):
    """Two updates from the same read: the first succeeds with a new etag, the second is
    ABORTED with the current etag and writes nothing; no etag is unconditional."""
    get, update, field, text = await _catalogue_resource(kind, clients, service_id)

    def update_of(read, value: str, **more):
        message = type(read)()
        message.CopyFrom(read)
        setattr(message, text, value)
        for name, other in more.items():
            setattr(message, name, other)
        return update(**{field: message}, update_mask=mask(text))

    read = await get()
    first = await update_of(read, "first")
    assert getattr(first, text) == "first" and first.etag != read.etag
    assert await get() == first

    error = await fails(update_of(read, "second"), grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    assert error_details(error)[0].metadata["etag"] == first.etag
    assert await get() == first

    third = await update_of(first, "third")
    assert third.etag not in (read.etag, first.etag)
    unconditional = await update_of(read, "fourth", etag="")
    assert getattr(unconditional, text) == "fourth"
    assert unconditional.etag not in (read.etag, first.etag, third.etag)


# -- names (AIP-122) ---------------------------------------------------------------------------


async def test_names_are_unique_whatever_their_case_and_hold_no_slash(clients):
    lead, admin = clients["lead"], clients["admin"]
    await fails(lead.CreateTeam(name="PLATFORM"), grpc.StatusCode.ALREADY_EXISTS, "TEAM_EXISTS")
    await fails(
        admin.CreateEnvironment(name="Production", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION),
        grpc.StatusCode.ALREADY_EXISTS,
        "ENVIRONMENT_EXISTS",
    )
    slashed = unique("a/b")
    for bad in (slashed, "Platform ", " Platform", unique("tab\t")):
        for call in (
            lead.CreateTeam(name=bad),
            admin.CreateEnvironment(name=bad, environment_type=S.ENVIRONMENT_TYPE_STAGING),
        ):
            error = await fails(call, grpc.StatusCode.INVALID_ARGUMENT)
            assert violated_fields(error) == ["name"]
    teams = (await lead.ListTeams(page_size=1000)).teams
    environments = (await lead.ListEnvironments(page_size=1000)).environments
    assert slashed not in {t.name for t in teams} | {e.name for e in environments}
    assert sum(t.name.lower() == "platform" for t in teams) == 1

    # Two creates at once, past each other's check: the database's index refuses one alike.
    racing = unique("Race")
    outcomes = await asyncio.gather(
        lead.CreateTeam(name=racing), lead.CreateTeam(name=racing.upper()), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(refused) == 1, outcomes
    assert refused[0].code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(refused[0])[0].reason == "TEAM_EXISTS"


async def test_a_service_keeps_its_name(clients, service_id):
    lead = clients["lead"]
    before = await lead.GetService(service_id=service_id)
    error = await fails(
        lead.UpdateService(
            service=common_pb2.Service(id=service_id, name="another-name", description="x"),
            update_mask=mask("description", "name"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_IMMUTABLE",
    )
    assert violated_fields(error) == ["update_mask"]
    assert NAME_FIXED["name"] in error.details()
    assert await lead.GetService(service_id=service_id) == before


async def test_the_database_keeps_names_even_from_the_services_own_role(
    clients, db_url, service_id
):
    """SQL that bypasses the use cases, as the services' runtime role: a rename or a change
    of type is refused by the trigger, a '/' by the CHECK; each maps to the status the use
    case gives (CONSTRAINT_ERRORS), not INTERNAL."""
    team = await clients["lead"].CreateTeam(name=unique("Fixed"))
    environment = await clients["admin"].CreateEnvironment(
        name=unique("fixed"), environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    attempts = [
        ("UPDATE services SET name = 'renamed' WHERE id = $1", service_id),
        ("UPDATE teams SET name = 'Renamed' WHERE id = $1", team.id),
        ("UPDATE environments SET environment_type = 'production' WHERE id = $1", environment.id),
        ("UPDATE users SET username = 'renamed' WHERE id = $1", str(seed_id("user", "wendy"))),
    ]
    connection = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        refusals = []
        for statement, row_id in attempts:
            with pytest.raises(asyncpg.CheckViolationError) as refused:
                await connection.execute(statement, uuid.UUID(row_id))
            refusals.append(refused.value)
        with pytest.raises(asyncpg.CheckViolationError) as slashed:
            await connection.execute("INSERT INTO teams (name) VALUES ('a/b')")
        with pytest.raises(asyncpg.UniqueViolationError) as taken:
            await connection.execute("INSERT INTO teams (name) VALUES ($1)", team.name.upper())
    finally:
        await connection.close()
    assert {error.constraint_name for error in refusals} == {"relman_names_fixed"}
    assert slashed.value.constraint_name == "ck_teams_name_has_no_slash"
    statuses = [from_exception(error) for error in [*refusals, slashed.value]]
    assert [(s.code, s.reason, list(s.field_violations)) for s in statuses] == [
        (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_IMMUTABLE", ["update_mask"])
    ] * 4 + [(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ["name"])]
    assert taken.value.constraint_name == "uq_teams_name_any_case"
    assert (from_exception(taken.value).code, from_exception(taken.value).reason) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "TEAM_EXISTS",
    )
    assert (await clients["lead"].GetService(service_id=service_id)).name.startswith("svc-")
    assert (await clients["lead"].GetTeam(team_id=team.id)).name == team.name


# -- ListRollbacks ------------------------------------------------------------------------------


async def test_list_rollbacks_filters_and_pages(clients, service_id):
    lead = clients["lead"]
    in_staging = await a_rollback(lead, service_id, (DEV, STAGING))
    second_in_dev = (
        await lead.ListDeployments(service_id=service_id, environment_id=DEV, page_size=1)
    ).deployments[0]
    in_dev = await lead.RollbackDeployment(deployment_id=second_in_dev.id, reason="dev too")
    other = await lead.CreateService(name=unique("svc"), team_id=PLATFORM)
    elsewhere = await a_rollback(lead, other.id, (DEV,))
    redeployment = await lead.GetDeployment(
        deployment_id=elsewhere.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    await run_all_stages(lead, redeployment)

    newest_first = [await lead.GetRollback(rollback_id=r.id) for r in (in_dev, in_staging)]
    assert [r.resource_name for r in newest_first] == [
        f"rollbacks/{in_dev.id}",
        f"rollbacks/{in_staging.id}",
    ]
    listed = await lead.ListRollbacks(service_id=service_id)
    assert (list(listed.rollbacks), listed.total_size) == (newest_first, 2)
    assert await every_page(lead.ListRollbacks, "rollbacks", 1, service_id=service_id) == (
        newest_first
    )
    for filters, expected in (
        ({"service_id": service_id, "environment_id": DEV}, [in_dev.id]),
        ({"service_id": service_id, "environment_id": STAGING}, [in_staging.id]),
        (
            {
                "service_id": service_id,
                "environment_id": STAGING,
                "status": S.ROLLBACK_STATUS_IN_PROGRESS,
            },
            [in_staging.id],
        ),
        ({"deployment_id": in_staging.deployment_id}, [in_staging.id]),
        ({"service_id": other.id, "status": S.ROLLBACK_STATUS_COMPLETED}, [elsewhere.id]),
        ({"service_id": other.id, "status": S.ROLLBACK_STATUS_IN_PROGRESS}, []),
    ):
        page = await lead.ListRollbacks(**filters, page_size=1000)
        assert [r.id for r in page.rollbacks] == expected, filters
    everything = await lead.ListRollbacks(page_size=1000)
    assert {in_dev.id, in_staging.id, elsewhere.id} <= {r.id for r in everything.rollbacks}

    token = (await lead.ListRollbacks(service_id=service_id, page_size=1)).next_page_token
    for call, reason in (
        (lead.ListRollbacks(page_token="not-a-token"), "INVALID_PAGE_TOKEN"),
        (lead.ListRollbacks(service_id=other.id, page_token=token), "PAGE_TOKEN_FILTER_MISMATCH"),
    ):
        error = await fails(call, grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert violated_fields(error) == ["page_token"]
    error = await fails(lead.ListRollbacks(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT)
    assert violated_fields(error) == ["page_size"]


# -- ListLiveDeployments ------------------------------------------------------------------------


async def test_list_live_deployments_pages(clients):
    """Three services live in development (the third also starting in staging): walked two
    at a time, the pages hold what one page holds, each slot once, in key order."""
    lead = clients["lead"]
    services = [await lead.CreateService(name=unique("live"), team_id=PLATFORM) for _ in range(3)]
    releases = [await deployed(lead, s.id, "1.0.0", DEV) for s in services]
    starting = await lead.PromoteRelease(release_id=releases[2].id, target_environment_id=STAGING)

    whole = await lead.ListLiveDeployments(page_size=1000)
    assert not whole.next_page_token and whole.total_size == len(whole.live_deployments)
    walked = await every_page(lead.ListLiveDeployments, "live_deployments", 2)
    assert walked == list(whole.live_deployments)
    keys = [(uuid.UUID(i.service_id), uuid.UUID(i.environment_id)) for i in walked]
    assert keys == sorted(set(keys))
    ids = {s.id for s in services}
    mine = {(i.service_id, i.environment_id): i for i in walked if i.service_id in ids}
    assert set(mine) == {(s.id, DEV) for s in services} | {(services[2].id, STAGING)}
    for service, release in zip(services, releases, strict=True):
        now = await lead.GetRelease(release_id=release.id)
        assert mine[(service.id, DEV)].live_release == now
    in_staging = mine[(services[2].id, STAGING)]
    assert not in_staging.HasField("live_release")
    assert in_staging.active_deployment.id == starting.id

    one_service = await every_page(
        lead.ListLiveDeployments, "live_deployments", 1, service_id=services[2].id
    )
    assert [i.environment_id for i in one_service] == sorted([DEV, STAGING])

    token = (await lead.ListLiveDeployments(page_size=1)).next_page_token
    for call, reason in (
        (lead.ListLiveDeployments(page_token="bm90IGEgdG9rZW4"), "INVALID_PAGE_TOKEN"),
        (
            lead.ListLiveDeployments(service_id=services[0].id, page_token=token),
            "PAGE_TOKEN_FILTER_MISMATCH",
        ),
    ):
        await fails(call, grpc.StatusCode.INVALID_ARGUMENT, reason)
    error = await fails(lead.ListLiveDeployments(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT)
    assert violated_fields(error) == ["page_size"]


# -- GetUser and ListUsers ----------------------------------------------------------------------


async def test_users_read_themselves_and_admins_read_everyone(auth):
    admin = auth(Role.ADMIN)
    everyone = await every_page(admin.ListUsers, "users", 2)
    by_name = {user.username: user for user in everyone}
    assert len(by_name) == len(everyone) and set(USER_OF_ROLE.values()) <= set(by_name)
    priya = by_name["priya"]
    assert priya.resource_name == "users/priya"
    assert await admin.GetUser(user_id=priya.id) == priya
    await fails(admin.GetUser(user_id=NOWHERE), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    admins_token = (await admin.ListUsers(page_size=1)).next_page_token

    for role in (Role.VIEWER, Role.DEVELOPER, Role.LEAD, Role.SERVICE):
        me = by_name[USER_OF_ROLE[role]]
        caller = auth(role)
        assert await caller.GetUser(user_id=me.id) == me
        listed = await caller.ListUsers()
        assert (list(listed.users), listed.total_size, listed.next_page_token) == ([me], 1, "")
        for someone in (by_name["admin"].id, NOWHERE):  # whether or not they exist
            await fails(
                caller.GetUser(user_id=someone),
                grpc.StatusCode.PERMISSION_DENIED,
                "MISSING_PERMISSION",
            )
        await fails(
            caller.ListUsers(page_token=admins_token),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_TOKEN_FILTER_MISMATCH",
        )
