"""Freeze windows through the real DeployService: creating, listing and deleting them, what
they refuse (and what CheckPromotion says about it), overrides, rollbacks and deployments
caught in flight.

Every window here is scoped to the test's own service or to an environment the test made,
so that the deployments of other tests in the seeded environments never meet it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from relman.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from shared.devtools.seed import seed_id
from shared.persistence.models import Role
from tests.deploying import DEV, GATES, PROD, STAGING, Client, S, deployed, run_all_stages
from tests.harness import bearer, error_details, fails

FROZEN = grpc.StatusCode.FAILED_PRECONDITION


def stamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


def one_off(hours: float = 1, *, starts: datetime | None = None, **scope) -> dict:
    """A one-off window from `starts` (a minute ago) for `hours`."""
    start = starts or now() - timedelta(minutes=1)
    return {
        "start_time": stamp(start),
        "end_time": stamp(now() + timedelta(hours=hours)),
        **scope,
    }


@asynccontextmanager
async def freeze(clients, reason: str, **fields) -> AsyncIterator[common_pb2.FreezeWindow]:
    """A window the lead creates; the admin deletes it at the end (unless the test did)."""
    window = await clients["lead"].CreateFreezeWindow(
        freeze_window=common_pb2.FreezeWindow(reason=reason, **fields)
    )
    try:
        yield window
    finally:
        try:
            await clients["admin"].DeleteFreezeWindow(freeze_window_id=window.id)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise


async def check_agrees(
    client: Client,
    release_id: str,
    target: str,
    *,
    frozen_by: str | None = None,
    blocked_by: str | None = None,
) -> None:
    """CheckPromotion for this caller agrees with what the test saw: frozen (the freeze gate
    is the first to fail and names `frozen_by`), blocked by another gate, or allowed."""
    check = await client.CheckPromotion(release_id=release_id, target_environment_id=target)
    assert [gate.name for gate in check.gates] == GATES
    gates = {gate.name: gate for gate in check.gates}
    assert gates["approvals"].passed  # informational
    failed = [gate for gate in check.gates if not gate.passed]
    explained = [(gate.name, gate.detail) for gate in failed]
    if frozen_by is not None:
        assert not check.allowed
        assert failed and failed[0].name == "freeze", explained
        assert frozen_by in failed[0].detail
    elif blocked_by is not None:
        assert not check.allowed
        assert gates["freeze"].passed, explained
        assert failed[0].name == blocked_by, explained
    else:
        assert check.allowed, explained
        assert failed == []


async def listed(client: Client, mine, **filters) -> list[str]:
    """Ids of `mine` among ListFreezeWindows(**filters), in the order listed (other tests'
    windows may match the filters too)."""
    response = await client.ListFreezeWindows(**filters)
    ids = {window.id for window in mine}
    return [window.id for window in response.freeze_windows if window.id in ids]


async def fresh_environment(admin: Client) -> str:
    environment = await admin.CreateEnvironment(
        name=f"freeze-{uuid.uuid4().hex[:8]}", environment_type=S.ENVIRONMENT_TYPE_DEVELOPMENT
    )
    return environment.id


async def another_service(lead: Client) -> str:
    service = await lead.CreateService(
        name=f"other-{uuid.uuid4().hex[:8]}", team_id=str(seed_id("team", "Platform"))
    )
    return service.id


async def deployment_of(client: Client, release_id: str, environment_id: str):
    listing = await client.ListDeployments(release_id=release_id, environment_id=environment_id)
    (only,) = listing.deployments
    return await client.GetDeployment(deployment_id=only.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES)


@pytest.fixture
def audit_rows(audit_channel, tokens):
    """The audit trail as an admin reads it, newest first, filtered."""
    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)

    async def read(**filters) -> list[tuple[str, dict]]:
        response = await stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(filter=audit_pb2.AuditLogFilter(**filters)),
            metadata=bearer(tokens[Role.ADMIN]),
        )
        return [(row.action, json_format.MessageToDict(row.details)) for row in response.audit_logs]

    return read


# -- creating, listing, deleting ----------------------------------------------------------------


async def test_windows_are_validated_in_both_forms(clients, service_id):
    """Each mistake is refused naming the field; good windows of both forms are kept as sent."""
    lead = clients["lead"]
    hour = timedelta(hours=1)
    good_one_off = {"start_time": stamp(now()), "end_time": stamp(now() + hour)}
    good_cron = {"cron": "0 22 * * *", "time_zone": "Europe/Berlin", "duration_minutes": 120}
    cases = [
        ({}, None),  # neither form
        ({**good_one_off, **good_cron}, None),  # both forms
        ({"start_time": stamp(now())}, None),  # half a one-off
        ({"end_time": stamp(now() + hour)}, None),
        (
            {"start_time": stamp(now() + 2 * hour), "end_time": stamp(now() + hour)},
            "end_time",
        ),
        ({"start_time": stamp(now() - 3 * hour), "end_time": stamp(now() - hour)}, "end_time"),
        ({**good_cron, "cron": "61 * * * *"}, "cron"),
        ({**good_cron, "cron": "* * * *"}, "cron"),
        ({**good_cron, "cron": "every night"}, "cron"),
        ({**good_cron, "time_zone": "Mars/Olympus_Mons"}, "time_zone"),
        ({**good_cron, "duration_minutes": 0}, "duration_minutes"),
        ({**good_cron, "duration_minutes": 44641}, "duration_minutes"),
        ({**good_cron, "duration_minutes": -5}, "duration_minutes"),
    ]
    for fields, field in cases:
        error = await fails(
            lead.CreateFreezeWindow(
                freeze_window=common_pb2.FreezeWindow(
                    service_id=service_id, reason="release train", **fields
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        named = [violation.field for violation in error_details(error)[1]]
        assert named, (fields, error.details())
        if field is None:
            assert all(name.startswith("freeze_window.") for name in named), named
        else:
            assert f"freeze_window.{field}" in named, (fields, named)
    for reason in ("", "x" * 1001):
        error = await fails(
            lead.CreateFreezeWindow(
                freeze_window=common_pb2.FreezeWindow(
                    service_id=service_id, reason=reason, **good_one_off
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "freeze_window.reason" in [v.field for v in error_details(error)[1]]

    windows = []
    try:
        for fields in (
            good_one_off,
            good_cron,
            {"cron": "*/15 9-17 * * MON-FRI", "time_zone": "America/New_York",
             "duration_minutes": 44640},
            {"cron": "30 1 1 JAN *", "time_zone": "UTC", "duration_minutes": 1},
        ):  # fmt: skip
            window = await lead.CreateFreezeWindow(
                freeze_window=common_pb2.FreezeWindow(
                    service_id=service_id, reason="r" * 1000, **fields
                )
            )
            windows.append(window)
            assert window.id and window.service_id == service_id and not window.environment_id
            assert window.created_by == str(seed_id("user", "lena"))
            assert window.HasField("created_at") and window.reason == "r" * 1000
            for name, value in fields.items():
                assert getattr(window, name) == value, name
    finally:
        for window in windows:
            await clients["admin"].DeleteFreezeWindow(freeze_window_id=window.id)


async def test_who_may_create_and_delete_and_what_is_not_there(clients, service_id, audit_rows):
    """Leads create, only admins delete, developers do neither; unknown scopes and windows
    are NOT_FOUND; a retried request_id gets the first window; both ends are audited."""
    lead, admin, developer = clients["lead"], clients["admin"], clients["developer"]
    window = common_pb2.FreezeWindow(service_id=service_id, reason="quarter close", **one_off())
    await fails(
        developer.CreateFreezeWindow(freeze_window=window), grpc.StatusCode.PERMISSION_DENIED
    )
    await fails(
        clients["viewer"].CreateFreezeWindow(freeze_window=window),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    for scope in (
        {"environment_id": str(uuid.uuid4()), "service_id": service_id},
        {"service_id": str(uuid.uuid4())},
    ):
        unknown = common_pb2.FreezeWindow(reason="quarter close", **one_off(), **scope)
        await fails(lead.CreateFreezeWindow(freeze_window=unknown), grpc.StatusCode.NOT_FOUND)

    request_id = str(uuid.uuid4())
    first = await lead.CreateFreezeWindow(freeze_window=window, request_id=request_id)
    try:
        again = await lead.CreateFreezeWindow(freeze_window=window, request_id=request_id)
        assert again.id == first.id
        assert await listed(clients["viewer"], [first], service_id=service_id) == [first.id]

        await fails(
            lead.DeleteFreezeWindow(freeze_window_id=first.id), grpc.StatusCode.PERMISSION_DENIED
        )
        await fails(
            developer.DeleteFreezeWindow(freeze_window_id=first.id),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert await listed(lead, [first], service_id=service_id) == [first.id]  # still there
    finally:
        await admin.DeleteFreezeWindow(freeze_window_id=first.id)
    assert await listed(lead, [first], service_id=service_id) == []
    await fails(admin.DeleteFreezeWindow(freeze_window_id=first.id), grpc.StatusCode.NOT_FOUND)
    await fails(
        admin.DeleteFreezeWindow(freeze_window_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND
    )
    rows = await audit_rows(resource_type="freeze_window", resource_id=first.id)
    assert [action for action, _ in rows] == ["freeze.delete", "freeze.create"]


async def test_lists_filter_by_scope_and_instant(clients, service_id):
    """A window shows under every filter its scope takes in; active_at keeps those in force
    then; oldest first, a page at a time."""
    admin, viewer = clients["admin"], clients["viewer"]
    environment = await fresh_environment(admin)
    other_service = await another_service(clients["lead"])
    later = now() + timedelta(days=2)
    async with (
        # every service, in the fresh environment only; in force now
        freeze(clients, "env-wide", environment_id=environment, **one_off()) as env_wide,
        # this service, in every environment; from the day after tomorrow
        freeze(
            clients,
            "service-wide",
            service_id=service_id,
            start_time=stamp(later),
            end_time=stamp(later + timedelta(days=1)),
        ) as service_wide,
        # this service in the fresh environment; nightly at 02:00 UTC for an hour
        freeze(
            clients,
            "nightly",
            environment_id=environment,
            service_id=service_id,
            cron="0 2 * * *",
            time_zone="UTC",
            duration_minutes=60,
        ) as nightly,
    ):
        mine = [env_wide, service_wide, nightly]
        ids = [window.id for window in mine]
        assert await listed(viewer, mine, service_id=service_id) == ids
        assert await listed(viewer, mine, service_id=other_service) == [env_wide.id]
        assert await listed(viewer, mine, environment_id=environment) == ids
        assert await listed(viewer, mine, environment_id=DEV) == [service_wide.id]
        assert await listed(viewer, mine, environment_id=environment, service_id=other_service) == [
            env_wide.id
        ]
        assert await listed(viewer, mine, environment_id=DEV, service_id=other_service) == []

        instant = now()  # one instant for the call and the expectation
        assert await listed(viewer, mine, environment_id=environment, active_at=stamp(instant)) == [
            env_wide.id
        ] + ([nightly.id] if instant.hour == 2 else [])
        day_after = later + timedelta(hours=12)
        at_two = day_after.replace(hour=2, minute=30, second=0, microsecond=0)
        at_four = at_two.replace(hour=4)
        # Oldest first: service_wide was made before nightly.
        assert await listed(viewer, mine, service_id=service_id, active_at=stamp(at_two)) == (
            [service_wide.id] if later <= at_two else []
        ) + [nightly.id]
        assert await listed(viewer, mine, service_id=service_id, active_at=stamp(day_after)) == [
            service_wide.id
        ] + ([nightly.id] if day_after.hour == 2 else [])
        assert await listed(viewer, mine, service_id=service_id, active_at=stamp(at_four)) == (
            [service_wide.id] if later <= at_four else []
        )

        walked, token = [], ""
        while True:
            page = await viewer.ListFreezeWindows(
                environment_id=environment, service_id=service_id, page_size=1, page_token=token
            )
            assert len(page.freeze_windows) <= 1
            walked += [w.id for w in page.freeze_windows if w.id in ids]
            token = page.next_page_token
            if not token:
                break
        assert walked == ids
        await fails(
            viewer.ListFreezeWindows(service_id=service_id, page_token="%%%"),
            grpc.StatusCode.INVALID_ARGUMENT,
        )


async def test_a_nightly_freeze_follows_berlin_across_the_dst_change(clients, service_id):
    """22:00 in Berlin is 21:00 UTC in winter and 20:00 UTC from 2027-03-28 on."""
    async with freeze(
        clients,
        "nightly batch",
        service_id=service_id,
        cron="0 22 * * *",
        time_zone="Europe/Berlin",
        duration_minutes=120,
    ) as window:
        expected = {
            # winter: 21:00-23:00 UTC
            "2027-03-27T20:30:00Z": False,
            "2027-03-27T20:59:59Z": False,
            "2027-03-27T21:00:00Z": True,
            "2027-03-27T21:30:00Z": True,
            "2027-03-27T22:30:00Z": True,
            "2027-03-27T23:00:00Z": False,
            # summer (the evening of the change included): 20:00-22:00 UTC
            "2027-03-28T20:30:00Z": True,
            "2027-03-28T22:30:00Z": False,
            "2027-03-29T19:30:00Z": False,
            "2027-03-29T20:00:00Z": True,
            "2027-03-29T20:30:00Z": True,
            "2027-03-29T21:30:00Z": True,
            "2027-03-29T22:00:00Z": False,
            "2027-03-29T22:30:00Z": False,
        }
        seen = {
            instant: bool(
                await listed(
                    clients["viewer"],
                    [window],
                    service_id=service_id,
                    active_at=stamp(datetime.fromisoformat(instant)),
                )
            )
            for instant in expected
        }
        assert seen == expected


# -- what a window refuses ------------------------------------------------------------------------


async def test_a_one_off_freeze_refuses_new_deployments(clients, service_id):
    """Refused DEPLOYMENT_FROZEN naming the window that ends last and its reason; CheckPromotion
    says the same; once the windows are gone the deployment goes ahead."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    scope = {"environment_id": DEV, "service_id": service_id}
    async with (
        freeze(clients, "payments audit", **one_off(1), **scope) as sooner,
        freeze(clients, "Black Friday", **one_off(3), **scope) as later,
    ):
        for call in (
            developer.PromoteRelease(release_id=release.id, target_environment_id=DEV),
            developer.CreateDeployment(release_id=release.id, environment_id=DEV),
        ):
            error = await fails(call, FROZEN, "DEPLOYMENT_FROZEN")
            metadata = error_details(error)[0].metadata
            assert metadata["freeze_window_id"] == later.id
            ends_at = rfc3339(metadata["ends_at"])
            assert abs(ends_at - later.end_time.ToDatetime(tzinfo=UTC)) < timedelta(seconds=1)
            assert "Black Friday" in error.details()
        await check_agrees(developer, release.id, DEV, frozen_by="Black Friday")
        assert (await developer.ListDeployments(release_id=release.id)).deployments == []

        await clients["admin"].DeleteFreezeWindow(freeze_window_id=later.id)
        error = await fails(
            developer.PromoteRelease(release_id=release.id, target_environment_id=DEV),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        assert error_details(error)[0].metadata["freeze_window_id"] == sooner.id
        assert "payments audit" in error.details()
        await check_agrees(developer, release.id, DEV, frozen_by="payments audit")

        await clients["admin"].DeleteFreezeWindow(freeze_window_id=sooner.id)
        await check_agrees(developer, release.id, DEV)
        deployment = await developer.PromoteRelease(
            release_id=release.id, target_environment_id=DEV
        )
        assert deployment.status == S.DEPLOYMENT_STATUS_PENDING


async def test_a_recurring_window_in_force_now_refuses(clients, service_id):
    """Every minute, for an hour: always in force; ends_at is an hour after this minute began."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    async with freeze(
        clients,
        "change freeze, ask #ops",
        service_id=service_id,
        environment_id=DEV,
        cron="* * * * *",
        time_zone="UTC",
        duration_minutes=60,
    ) as window:
        assert await listed(developer, [window], service_id=service_id, active_at=stamp(now())) == [
            window.id
        ]
        before = now().replace(second=0, microsecond=0)
        error = await fails(
            developer.PromoteRelease(release_id=release.id, target_environment_id=DEV),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        after = now().replace(second=0, microsecond=0)
        metadata = error_details(error)[0].metadata
        assert metadata["freeze_window_id"] == window.id
        ends_at = rfc3339(metadata["ends_at"])
        assert before + timedelta(minutes=60) <= ends_at <= after + timedelta(minutes=60)
        assert "change freeze, ask #ops" in error.details()
        await check_agrees(developer, release.id, DEV, frozen_by="change freeze, ask #ops")

        await clients["admin"].DeleteFreezeWindow(freeze_window_id=window.id)
        await check_agrees(developer, release.id, DEV)
        await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)


async def test_a_service_freeze_leaves_other_services_alone(clients, service_id):
    """Frozen: this service in development. Not frozen: another service there."""
    developer = clients["developer"]
    other = await another_service(clients["lead"])
    frozen_release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    free_release = await developer.CreateRelease(service_id=other, version="1.0.0")
    async with freeze(
        clients, "migrating the ledger", environment_id=DEV, service_id=service_id, **one_off()
    ):
        await fails(
            developer.PromoteRelease(release_id=frozen_release.id, target_environment_id=DEV),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        await check_agrees(developer, frozen_release.id, DEV, frozen_by="migrating the ledger")
        await check_agrees(developer, free_release.id, DEV)
        deployment = await developer.PromoteRelease(
            release_id=free_release.id, target_environment_id=DEV
        )
        await run_all_stages(developer, deployment)
        done = await developer.GetDeployment(deployment_id=deployment.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED


async def test_only_an_admin_with_a_reason_passes_a_freeze(clients, service_id, audit_rows):
    """Leads and developers may not override; an admin must give a reason, which is audited;
    a reason outside any window is ignored."""
    developer, lead, admin = clients["developer"], clients["lead"], clients["admin"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    async with freeze(
        clients, "datacenter move", environment_id=DEV, service_id=service_id, **one_off()
    ) as window:
        for client in (lead, developer):
            for call in (
                client.PromoteRelease(
                    release_id=release.id,
                    target_environment_id=DEV,
                    freeze_override_reason="hotfix for login",
                ),
                client.CreateDeployment(
                    release_id=release.id,
                    environment_id=DEV,
                    freeze_override_reason="hotfix for login",
                ),
            ):
                await fails(call, grpc.StatusCode.PERMISSION_DENIED, "FREEZE_OVERRIDE_NOT_ALLOWED")
            await check_agrees(client, release.id, DEV, frozen_by="datacenter move")
        error = await fails(
            admin.PromoteRelease(release_id=release.id, target_environment_id=DEV),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        assert "datacenter move" in error.details()
        await check_agrees(admin, release.id, DEV, frozen_by="datacenter move")
        assert (await admin.ListDeployments(release_id=release.id)).deployments == []

        deployment = await admin.PromoteRelease(
            release_id=release.id,
            target_environment_id=DEV,
            freeze_override_reason="hotfix for login",
        )
        assert deployment.status == S.DEPLOYMENT_STATUS_PENDING
        ((_, details),) = await audit_rows(resource_id=deployment.id, action="freeze.override")
        assert details["reason"] == "hotfix for login"
        assert details["freeze_window_id"] == window.id
        # Created with an override: it may run inside the window.
        await run_all_stages(admin, deployment)
        done = await admin.GetDeployment(deployment_id=deployment.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED

    quiet = await developer.CreateRelease(service_id=service_id, version="1.1.0")
    await check_agrees(admin, quiet.id, DEV)
    unfrozen = await admin.CreateDeployment(
        release_id=quiet.id, environment_id=DEV, freeze_override_reason="just in case"
    )
    assert await audit_rows(resource_id=unfrozen.id, action="freeze.override") == []


# -- rollbacks and deployments in flight --------------------------------------------------------


async def test_a_rollback_passes_a_freeze_and_its_redeployment_runs(
    clients, service_id, audit_rows
):
    """The freeze stops new releases, not the way back."""
    developer = clients["developer"]
    good = await deployed(developer, service_id, "1.0.0", DEV)
    bad = await deployed(developer, service_id, "1.1.0", DEV)
    newest = await deployment_of(developer, bad.id, DEV)
    async with freeze(clients, "incident 4711", service_id=service_id, **one_off()) as window:
        rollback = await developer.RollbackDeployment(
            deployment_id=newest.id, reason="1.1.0 leaks memory"
        )
        assert rollback.target_release_id == good.id
        redeployment = await developer.GetDeployment(
            deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        assert redeployment.release_id == good.id
        await run_all_stages(developer, redeployment)
        done = await developer.GetDeployment(deployment_id=redeployment.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED
        assert (await developer.GetDeployment(deployment_id=newest.id)).status == (
            S.DEPLOYMENT_STATUS_ROLLED_BACK
        )
        ((_, details),) = await audit_rows(resource_id=newest.id, action="rollback")
        assert details["passed_freeze_window_id"] == window.id


async def test_a_rollback_cancels_a_deployment_held_by_the_freeze(clients, service_id, audit_rows):
    """1.2.0 waits, unstarted, when the window begins; rolling 1.1.0 back cancels it."""
    developer = clients["developer"]
    good = await deployed(developer, service_id, "1.0.0", DEV)
    bad = await deployed(developer, service_id, "1.1.0", DEV)
    newest = await deployment_of(developer, bad.id, DEV)
    held_release = await developer.CreateRelease(service_id=service_id, version="1.2.0")
    held = await developer.PromoteRelease(release_id=held_release.id, target_environment_id=DEV)
    assert held.status == S.DEPLOYMENT_STATUS_PENDING
    async with freeze(
        clients, "incident 4712", service_id=service_id, **one_off(starts=now())
    ) as window:
        await fails(
            developer.UpdatePipelineStage(
                stage_id=held.stages[0].id, status=S.STAGE_STATUS_RUNNING
            ),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        await check_agrees(developer, held_release.id, DEV, frozen_by="incident 4712")

        rollback = await developer.RollbackDeployment(
            deployment_id=newest.id, reason="1.1.0 corrupts carts"
        )
        assert rollback.target_release_id == good.id
        assert (await developer.GetDeployment(deployment_id=held.id)).status == (
            S.DEPLOYMENT_STATUS_CANCELLED
        )
        ((_, cancelled),) = await audit_rows(resource_id=held.id, action="cancel")
        assert "roll" in cancelled["reason"].lower()  # says why: the rollback of 1.1.0
        assert newest.id in cancelled["reason"] or rollback.id in cancelled["reason"]
        ((_, rolled),) = await audit_rows(resource_id=newest.id, action="rollback")
        assert rolled["passed_freeze_window_id"] == window.id
        redeployment = await developer.GetDeployment(
            deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        await run_all_stages(developer, redeployment)
        done = await developer.GetDeployment(deployment_id=redeployment.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED


async def test_an_approved_production_deployment_waits_out_the_freeze(clients, service_id):
    """Approved during the window, it may not start; once the window is deleted it runs."""
    lead = clients["lead"]
    release = await deployed(lead, service_id, "1.0.0", DEV, STAGING)
    deployment = await lead.PromoteRelease(release_id=release.id, target_environment_id=PROD)
    assert deployment.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    async with freeze(
        clients,
        "year-end freeze",
        environment_id=PROD,
        service_id=service_id,
        **one_off(starts=now()),
    ) as window:
        await clients["reviewer"].ApproveDeployment(deployment_id=deployment.id)
        assert (await lead.GetDeployment(deployment_id=deployment.id)).status == (
            S.DEPLOYMENT_STATUS_PENDING
        )
        first = deployment.stages[0]
        error = await fails(
            lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        assert "year-end freeze" in error.details()
        assert (await lead.GetDeployment(deployment_id=deployment.id)).status == (
            S.DEPLOYMENT_STATUS_PENDING
        )
        await check_agrees(lead, release.id, PROD, frozen_by="year-end freeze")

        await clients["admin"].DeleteFreezeWindow(freeze_window_id=window.id)
        await check_agrees(lead, release.id, PROD, blocked_by="active_deployment")
        await run_all_stages(lead, deployment)
        done = await lead.GetDeployment(deployment_id=deployment.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED


async def test_a_pending_deployment_waits_and_a_running_one_finishes(clients, service_id):
    """In a frozen environment: the deployment that had not started stays put until the window
    is deleted; the one already running finishes."""
    developer, lead = clients["developer"], clients["lead"]
    environment = await fresh_environment(clients["admin"])
    waiting_release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    waiting = await developer.PromoteRelease(
        release_id=waiting_release.id, target_environment_id=environment
    )
    running_release = await developer.CreateRelease(
        service_id=await another_service(lead), version="1.0.0"
    )
    running = await developer.PromoteRelease(
        release_id=running_release.id, target_environment_id=environment
    )
    build = running.stages[0]
    await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_RUNNING)
    async with freeze(
        clients, "load test window", environment_id=environment, **one_off(starts=now())
    ) as window:
        error = await fails(
            developer.UpdatePipelineStage(
                stage_id=waiting.stages[0].id, status=S.STAGE_STATUS_RUNNING
            ),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        assert "load test window" in error.details()
        stages = await developer.GetDeployment(
            deployment_id=waiting.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        assert stages.status == S.DEPLOYMENT_STATUS_PENDING
        assert {s.status for s in stages.stages} == {S.STAGE_STATUS_PENDING}
        await check_agrees(developer, waiting_release.id, environment, frozen_by="load test window")

        await developer.UpdatePipelineStage(stage_id=build.id, status=S.STAGE_STATUS_SUCCEEDED)
        await run_all_stages(developer, type(running)(stages=running.stages[1:]))
        finished = await developer.GetDeployment(deployment_id=running.id)
        assert finished.status == S.DEPLOYMENT_STATUS_SUCCEEDED

        await clients["admin"].DeleteFreezeWindow(freeze_window_id=window.id)
        await check_agrees(
            developer, waiting_release.id, environment, blocked_by="active_deployment"
        )
        await run_all_stages(developer, waiting)
        done = await developer.GetDeployment(deployment_id=waiting.id)
        assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED


async def test_windows_keep_to_the_calendar_and_real_zones(clients, service_id):
    """Review findings, each once an INTERNAL or a retried UNAVAILABLE: a window at the ends
    of the calendar (stored as +-infinity, it broke every deploy and rollback in its
    scope), a directory of zones or the host's own zone, a cron longer than its column,
    and active_at at the ends of the calendar are each INVALID_ARGUMENT naming the field."""
    lead = clients["lead"]
    earliest = Timestamp(seconds=-62_135_596_800)
    latest = Timestamp(seconds=253_402_300_799, nanos=999_999_000)
    cases = [
        ({"start_time": earliest, "end_time": stamp(now() + timedelta(hours=1))}, "start_time"),
        ({"start_time": stamp(now()), "end_time": latest}, "end_time"),
        ({"cron": "0 22 * * *", "time_zone": "Europe", "duration_minutes": 5}, "time_zone"),
        ({"cron": "0 22 * * *", "time_zone": "localtime", "duration_minutes": 5}, "time_zone"),
        (
            {
                "cron": ",".join(map(str, range(60)))
                + " "
                + ",".join(map(str, range(24)))
                + " * * *",
                "time_zone": "UTC",
                "duration_minutes": 5,
            },
            "cron",
        ),
    ]
    for fields, field in cases:
        error = await fails(
            lead.CreateFreezeWindow(
                freeze_window=common_pb2.FreezeWindow(reason="x", service_id=service_id, **fields)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == [f"freeze_window.{field}"], fields
    async with freeze(
        clients,
        "nightly",
        service_id=service_id,
        cron="0 22 * * *",
        time_zone="Europe/Berlin",
        duration_minutes=60,
    ):
        for instant in (earliest, latest):
            error = await fails(
                lead.ListFreezeWindows(service_id=service_id, active_at=instant),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert [v.field for v in error_details(error)[1]] == ["active_at"]


async def test_a_request_id_names_one_window(clients, service_id):
    """A request_id retried with another reason or other times is REQUEST_ID_REUSED, not
    the first window passed off as the second."""
    lead, request_id = clients["lead"], str(uuid.uuid4())
    fields = one_off(1, service_id=service_id)
    first = await lead.CreateFreezeWindow(
        freeze_window=common_pb2.FreezeWindow(reason="first", **fields), request_id=request_id
    )
    try:
        for changed in ({"reason": "second", **fields}, {"reason": "first", **one_off(5)}):
            changed.setdefault("service_id", service_id)
            await fails(
                lead.CreateFreezeWindow(
                    freeze_window=common_pb2.FreezeWindow(**changed), request_id=request_id
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "REQUEST_ID_REUSED",
            )
        again = await lead.CreateFreezeWindow(
            freeze_window=common_pb2.FreezeWindow(reason="first", **fields), request_id=request_id
        )
        assert again.id == first.id
    finally:
        await clients["admin"].DeleteFreezeWindow(freeze_window_id=first.id)


async def test_skipping_every_stage_does_not_run_a_deployment_through_a_freeze(clients, service_id):
    """A deployment that has not started cannot succeed inside a window by skipping its
    stages: skipping the first is DEPLOYMENT_FROZEN, and nothing changed."""
    developer = clients["developer"]
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    held = await developer.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    async with freeze(clients, "audit week", **one_off(1, service_id=service_id)):
        await fails(  # the later stages wait for the first (PREVIOUS_STAGE_NOT_DONE)
            developer.UpdatePipelineStage(
                stage_id=held.stages[0].id, status=S.STAGE_STATUS_SKIPPED
            ),
            FROZEN,
            "DEPLOYMENT_FROZEN",
        )
        state = await developer.GetDeployment(
            deployment_id=held.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        assert state.status == S.DEPLOYMENT_STATUS_PENDING
        assert {stage.status for stage in state.stages} == {S.STAGE_STATUS_PENDING}
