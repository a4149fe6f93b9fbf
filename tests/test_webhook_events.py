"""The webhook outbox: every change through the API writes its event in its own
transaction, with the resource as the API returns it, and a refused change writes none.

One service's history in a production environment of the test's own: a release, a
deployment awaiting approval, a vote for it, its stages, a rollback and its redeployment,
a failed one, a rejected one, a cancelled one, and an admin's deploy past a freeze.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import grpc
from google.protobuf import field_mask_pb2, json_format, timestamp_pb2

from deploy_svc.events import EventType, api_time
from relman.v1 import common_pb2, webhook_pb2, webhook_pb2_grpc
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Role
from tests.deploying import DEV, S, run_all_stages
from tests.harness import bearer, fails, owner_url, poll
from tests.receiver import Receiver
from tests.test_freezes import freeze, one_off


async def outbox(db_url, service_id: str) -> list[tuple[str, dict, uuid.UUID]]:
    """The service's events, oldest first: (type, data, team_id)."""
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        rows = await connection.fetch(
            "SELECT event_type, data::text AS data, team_id FROM webhook_events"
            " WHERE service_id = $1 ORDER BY occurred_at, id",
            uuid.UUID(service_id),
        )
    finally:
        await connection.close()
    return [(row["event_type"], json.loads(row["data"]), row["team_id"]) for row in rows]


def api_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def test_each_change_writes_its_event(clients, db_url, deploy_channel, tokens):
    """... and each reaches a webhook of the service taking every event type, once, signed;
    a webhook of another service, taking them all too, gets none."""
    admin, lead = clients["admin"], clients["lead"]
    suffix = uuid.uuid4().hex[:8]
    team = await admin.CreateTeam(name=f"events-{suffix}")
    service = await lead.CreateService(name=f"events-{suffix}", team_id=team.id)
    other = await lead.CreateService(name=f"events-other-{suffix}", team_id=team.id)
    async with Receiver() as receiver, Receiver() as bystander:
        webhooks = webhook_pb2_grpc.WebhookServiceStub(deploy_channel)
        every = [e.value for e in EventType if e != EventType.AUDIT_LOGGED]
        made = []
        for scope, url in ((service.id, receiver.url()), (other.id, bystander.url())):
            made.append(
                await webhooks.CreateWebhook(
                    webhook_pb2.CreateWebhookRequest(
                        url=url,
                        event_types=every,
                        service_id=scope,
                        format=webhook_pb2.WEBHOOK_FORMAT_JSON,
                    ),
                    metadata=bearer(tokens[Role.LEAD]),
                )
            )
        try:
            await _history(clients, db_url, team, service, made[0].secret, receiver)
        finally:
            for response in made:
                await webhooks.DeleteWebhook(
                    webhook_pb2.DeleteWebhookRequest(webhook_id=response.webhook.id),
                    metadata=bearer(tokens[Role.LEAD]),
                )
    assert bystander.requests == []


async def _history(clients, db_url, team, service, secret, receiver):
    admin, lead, reviewer = clients["admin"], clients["lead"], clients["reviewer"]
    suffix = uuid.uuid4().hex[:8]
    staging = await admin.CreateEnvironment(
        name=f"events-staging-{suffix}", environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    production = await admin.CreateEnvironment(
        name=f"events-prod-{suffix}", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    expected: list[tuple[str, str, str]] = []  # (type, kind, id)

    async def through_staging(version: str):
        release = await lead.CreateRelease(service_id=service.id, version=version)
        expected.append(("release.created", "release", release.id))
        for environment, stages in ((DEV, ["deploy"]), (staging.id, [])):
            earlier = await lead.CreateDeployment(
                release_id=release.id, environment_id=environment, stage_names=stages
            )
            expected.append(("deployment.created", "deployment", earlier.id))
            await run_all_stages(lead, earlier)
            expected.append(("deployment.succeeded", "deployment", earlier.id))
        return release

    async def to_production(release):
        deployment = await lead.CreateDeployment(
            release_id=release.id, environment_id=production.id
        )
        expected.append(("deployment.created", "deployment", deployment.id))
        expected.append(("deployment.awaiting_approval", "deployment", deployment.id))
        return deployment

    first = await through_staging("1.0.0")
    deployment = await to_production(first)
    approval = await reviewer.ApproveDeployment(deployment_id=deployment.id)
    expected.append(("approval.approved", "approval", approval.id))
    await run_all_stages(lead, deployment)
    expected.append(("deployment.succeeded", "deployment", deployment.id))

    second = await through_staging("1.1.0")
    shipped = await to_production(second)
    await reviewer.ApproveDeployment(deployment_id=shipped.id)
    expected.append(("approval.approved", "approval", None))
    await run_all_stages(lead, shipped)
    expected.append(("deployment.succeeded", "deployment", shipped.id))
    rollback = await lead.RollbackDeployment(deployment_id=shipped.id, reason="errors")
    expected.append(("rollback.started", "rollback", rollback.id))
    expected.append(("deployment.created", "deployment", rollback.redeployment_id))
    redeployment = await lead.GetDeployment(
        deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    await run_all_stages(lead, redeployment)
    expected.append(("deployment.succeeded", "deployment", redeployment.id))
    expected.append(("rollback.completed", "rollback", rollback.id))

    third = await through_staging("1.2.0")
    failing = await to_production(third)
    refusal = await reviewer.RejectDeployment(deployment_id=failing.id, notes="not now")
    expected.append(("approval.rejected", "approval", refusal.id))
    expected.append(("deployment.rejected", "deployment", failing.id))
    again = await to_production(third)
    await reviewer.ApproveDeployment(deployment_id=again.id)
    expected.append(("approval.approved", "approval", None))
    stage = again.stages[0]
    await lead.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_RUNNING)
    await lead.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_FAILED)
    expected.append(("deployment.failed", "deployment", again.id))
    # The failed one rolled back, and the redeployment failing too.
    retreat = await lead.RollbackDeployment(deployment_id=again.id, reason="still failing")
    expected.append(("rollback.started", "rollback", retreat.id))
    expected.append(("deployment.created", "deployment", retreat.redeployment_id))
    redeployed = await lead.GetDeployment(
        deployment_id=retreat.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
    )
    first_stage = redeployed.stages[0]
    await lead.UpdatePipelineStage(stage_id=first_stage.id, status=S.STAGE_STATUS_RUNNING)
    await lead.UpdatePipelineStage(stage_id=first_stage.id, status=S.STAGE_STATUS_FAILED)
    expected.append(("deployment.failed", "deployment", retreat.redeployment_id))
    expected.append(("rollback.failed", "rollback", retreat.id))

    # Refused changes write nothing: a stage moved backwards, a vote by the deployer.
    await fails(
        lead.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    fourth = await lead.CreateRelease(service_id=service.id, version="1.3.0")
    expected.append(("release.created", "release", fourth.id))
    cancelled = await lead.CreateDeployment(
        release_id=fourth.id, environment_id=DEV, stage_names=["deploy"]
    )
    expected.append(("deployment.created", "deployment", cancelled.id))
    made = await lead.GetDeployment(deployment_id=cancelled.id)
    await lead.CancelDeployment(deployment_id=cancelled.id, reason="wrong build")
    expected.append(("deployment.cancelled", "deployment", cancelled.id))

    window = one_off(environment_id=DEV, service_id=service.id)
    async with freeze(clients, "quiet week", **window) as frozen:
        expected.append(("freeze_window.created", "freeze_window", frozen.id))
        overridden = await admin.CreateDeployment(
            release_id=fourth.id,
            environment_id=DEV,
            stage_names=["deploy"],
            freeze_override_reason="security fix",
        )
        expected.append(("deployment.created", "deployment", overridden.id))
        expected.append(("freeze.override", "deployment", overridden.id))
    expected.append(("freeze_window.deleted", "freeze_window", frozen.id))

    found = await outbox(db_url, service.id)
    assert [event_type for event_type, _, _ in found] == [t for t, _, _ in expected]
    for (event_type, data, team_id), (_, kind, resource_id) in zip(found, expected, strict=True):
        assert list(data) == [kind], event_type
        assert team_id == uuid.UUID(team.id), event_type
        if resource_id is not None:
            assert data[kind]["id"] == resource_id, event_type
    # The data is the resource as the API returned it at that moment.
    created = next(d for t, d, _ in found if t == "release.created")
    assert created["release"] == api_json(first)
    succeeded = [d["deployment"] for t, d, _ in found if t == "deployment.succeeded"]
    final = await lead.GetDeployment(deployment_id=deployment.id)
    assert api_json(final) in succeeded
    assert {d["status"] for d in succeeded} == {"DEPLOYMENT_STATUS_SUCCEEDED"}
    created = [d["deployment"] for t, d, _ in found if t == "deployment.created"]
    assert api_json(made) in created
    cancelled_data = [d["deployment"] for t, d, _ in found if t == "deployment.cancelled"]
    assert api_json(await lead.GetDeployment(deployment_id=cancelled.id)) in cancelled_data
    assert common_pb2.DeploymentStatus.Name(final.status) == "DEPLOYMENT_STATUS_SUCCEEDED"

    # Delivered: each event once (its own delivery id), signed, with the outbox's data.
    await receiver.wait_for(len(expected), within_s=30)
    got = receiver.requests
    assert len(got) == len(expected) and len({r.delivery for r in got}) == len(expected)
    assert all(r.signed_with(secret) for r in got)
    assert sorted(r.headers["X-Relman-Event"] for r in got) == sorted(t for t, _, _ in expected)
    assert sorted(json.dumps(r.json()["data"], sort_keys=True) for r in got) == sorted(
        json.dumps(data, sort_keys=True) for _, data, _ in found
    )


async def test_times_written_by_the_database_print_as_the_api_prints_them(db_url):
    """A stage move and a deploy write their event in their own statement, its times set
    there (api_time): each prints as protobuf's JSON prints it, in any session time zone."""
    moments = [
        datetime(2026, 12, 1, 2, 40, 44, tzinfo=UTC),
        datetime(2026, 12, 1, 2, 40, 44, 500_000, tzinfo=UTC),
        datetime(2026, 12, 1, 2, 40, 44, 1_000, tzinfo=UTC),
        datetime(2026, 12, 1, 2, 40, 44, 123_456, tzinfo=UTC),
        datetime(2026, 12, 1, 2, 40, 44, 999_999, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 10, tzinfo=UTC),
        datetime(2027, 1, 1, 5, 29, 0, 120_000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ]
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        await connection.execute("SET TIME ZONE 'Asia/Kolkata'")
        printed = [
            await connection.fetchval(f"SELECT {api_time('$1::timestamptz')}", m) for m in moments
        ]
    finally:
        await connection.close()
    expected = []
    for moment in moments:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(moment)
        expected.append(stamp.ToJsonString())
    assert printed == expected
    assert expected[:3] == [
        "2026-12-01T02:40:44Z",
        "2026-12-01T02:40:44.500Z",
        "2026-12-01T02:40:44.001Z",
    ]


async def test_policies_and_freeze_windows_write_their_events(
    clients, db_url, deploy_channel, tokens
):
    """policy.updated (of no service: a webhook filtered by service or team never gets
    it), freeze_window.created and freeze_window.deleted with the window's service; an
    unscoped webhook receives all three."""
    async with Receiver() as receiver:
        webhooks = webhook_pb2_grpc.WebhookServiceStub(deploy_channel)
        made = await webhooks.CreateWebhook(
            webhook_pb2.CreateWebhookRequest(
                url=receiver.url(),
                event_types=["policy.updated", "freeze_window.created", "freeze_window.deleted"],
                format=webhook_pb2.WEBHOOK_FORMAT_JSON,
            ),
            metadata=bearer(tokens[Role.ADMIN]),
        )
        try:
            rows = await _policy_and_window(clients, db_url)
            got = await receiver.wait_for(3)
        finally:
            await webhooks.DeleteWebhook(
                webhook_pb2.DeleteWebhookRequest(webhook_id=made.webhook.id),
                metadata=bearer(tokens[Role.ADMIN]),
            )
    assert sorted(r.headers["X-Relman-Event"] for r in got) == sorted(
        row["event_type"] for row in rows
    )
    assert all(r.signed_with(made.secret) for r in got)


async def _policy_and_window(clients, db_url):
    admin, lead = clients["admin"], clients["lead"]
    suffix = uuid.uuid4().hex[:8]
    team = await admin.CreateTeam(name=f"events-policy-{suffix}")
    service = await lead.CreateService(name=f"events-policy-{suffix}", team_id=team.id)
    environment = await admin.CreateEnvironment(
        name=f"events-policy-{suffix}", environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    policy = await admin.UpdateEnvironmentPolicy(
        policy=common_pb2.EnvironmentPolicy(environment_id=environment.id, bake_minutes=5),
        update_mask=field_mask_pb2.FieldMask(paths=["bake_minutes"]),
    )
    window_fields = one_off(environment_id=environment.id, service_id=service.id)
    async with freeze(clients, "audit week", **window_fields) as window:
        pass
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        rows = await connection.fetch(
            "SELECT event_type, service_id, team_id, data::text AS data FROM webhook_events"
            " WHERE data->'policy'->>'environment_id' = $1"
            " OR data->'freeze_window'->>'id' = $2 ORDER BY occurred_at",
            environment.id,
            window.id,
        )
    finally:
        await connection.close()
    assert [row["event_type"] for row in rows] == [
        "policy.updated",
        "freeze_window.created",
        "freeze_window.deleted",
    ]
    assert json.loads(rows[0]["data"])["policy"] == api_json(policy)
    assert (rows[0]["service_id"], rows[0]["team_id"]) == (None, None)
    for row in rows[1:]:
        assert json.loads(row["data"])["freeze_window"] == api_json(window)
        assert (row["service_id"], row["team_id"]) == (uuid.UUID(service.id), uuid.UUID(team.id))
    return rows


async def test_a_redelivery_sends_the_same_delivery_again(clients, deploy_channel, tokens):
    """RedeliverWebhookDelivery: one more attempt of a delivered event, the same id and
    body, received again."""
    lead, auth = clients["lead"], bearer(tokens[Role.LEAD])
    service = await lead.CreateService(
        name=f"events-again-{uuid.uuid4().hex[:8]}", team_id="teams/Platform"
    )
    webhooks = webhook_pb2_grpc.WebhookServiceStub(deploy_channel)
    async with Receiver() as receiver:
        made = await webhooks.CreateWebhook(
            webhook_pb2.CreateWebhookRequest(
                url=receiver.url(),
                event_types=["release.created"],
                service_id=service.id,
                format=webhook_pb2.WEBHOOK_FORMAT_JSON,
            ),
            metadata=auth,
        )
        webhook_id = made.webhook.id
        try:
            await lead.CreateRelease(service_id=service.id, version="1.0.0")
            (first,) = await receiver.wait_for(1)

            async def delivery():
                listed = await webhooks.ListWebhookDeliveries(
                    webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id),
                    metadata=auth,
                )
                (found,) = listed.deliveries
                return found

            await poll(
                lambda: _status_is(delivery(), webhook_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED),
                10,
                "the delivery recorded",
            )
            again = await webhooks.RedeliverWebhookDelivery(
                webhook_pb2.RedeliverWebhookDeliveryRequest(delivery_id=first.delivery),
                metadata=auth,
            )
            assert again.status == webhook_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
            _, second = await receiver.wait_for(2)
            await poll(
                lambda: _status_is(delivery(), webhook_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED),
                10,
                "the redelivery recorded",
            )
            done = await delivery()
        finally:
            await webhooks.DeleteWebhook(
                webhook_pb2.DeleteWebhookRequest(webhook_id=webhook_id), metadata=auth
            )
    assert second.delivery == first.delivery == done.id
    assert second.body == first.body and second.signed_with(made.secret)
    assert done.attempts == 2


async def _status_is(found, status) -> bool:
    return (await found).status == status


async def test_dispatched_events_are_kept_a_day(db_url):
    """The sweeper deletes events dispatched more than a day ago, and no others."""
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        old, recent = await connection.fetch(
            "INSERT INTO webhook_events (event_type, data, dispatched, occurred_at)"
            " VALUES ('release.created', '{}', true, now() - interval '25 hours'),"
            " ('release.created', '{}', true, now() - interval '23 hours') RETURNING id"
        )
        await poll(lambda: _gone(connection, old["id"]), 30, "the day-old event purged", 0.2)
        assert not await _gone(connection, recent["id"])
    finally:
        await connection.close()


async def _gone(connection, event_id) -> bool:
    found = "SELECT count(*) FROM webhook_events WHERE id = $1"
    return await connection.fetchval(found, event_id) == 0
