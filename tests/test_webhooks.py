"""WebhookService through the real deploy_svc: making webhooks (the secret shown once,
stored sealed), what is refused and by whom, listing, updating, deleting, and the
deliveries' list and redelivery.

The deliveries here are inserted as the schema's owner, as the dispatcher would write
them, so that these tests need no receiver. Every webhook a test makes is scoped to a
service of the test's own (no other test's event reaches it), points at a port nothing
listens on, and is deleted at the end.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from deploy_svc.webhook_secrets import SecretBox
from relman.v1 import webhook_pb2, webhook_pb2_grpc
from shared.devtools.seed import seed_id
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Role
from tests.harness import bearer, error_details, fails, owner_url, poll, webhook_key_file

JSON = webhook_pb2.WEBHOOK_FORMAT_JSON
SLACK = webhook_pb2.WEBHOOK_FORMAT_SLACK
LENA = str(seed_id("user", "lena"))  # the `tokens` lead
RPCS = tuple(webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].methods_by_name)


class Hooks:
    """WebhookService as one user, through the real server."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.stub = webhook_pb2_grpc.WebhookServiceStub(channel)
        self.auth = bearer(token)

    def __getattr__(self, rpc: str):
        method = getattr(self.stub, rpc)
        request_type = getattr(webhook_pb2, f"{rpc}Request")

        async def invoke(**fields):
            return await method(request_type(**fields), metadata=self.auth, timeout=30)

        return invoke


def nowhere() -> str:
    """A receiver URL nothing answers at (the discard port), its path a credential."""
    return f"http://127.0.0.1:9/hooks/T0/B0/{uuid.uuid4().hex}"


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def violated_fields(error) -> list[str]:
    return [violation.field for violation in error_details(error)[1]]


@pytest.fixture(scope="module")
def hooks(deploy_channel, tokens, marco_token) -> dict[str, Hooks]:
    return {
        "viewer": Hooks(deploy_channel, tokens[Role.VIEWER]),
        "developer": Hooks(deploy_channel, tokens[Role.DEVELOPER]),
        "lead": Hooks(deploy_channel, tokens[Role.LEAD]),
        "reviewer": Hooks(deploy_channel, marco_token),
        "admin": Hooks(deploy_channel, tokens[Role.ADMIN]),
    }


@pytest.fixture
async def owner(db_url) -> AsyncIterator[asyncpg.Connection]:
    """The database as the schema's owner: what the services' role may not read or write."""
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def make(hooks, service_id) -> AsyncIterator:
    """Makes webhooks as the lead, or as `by` (scoped to the test's service unless told
    otherwise); deletes those still there at the end."""
    made: list[str] = []

    async def create(by: str = "lead", **fields) -> webhook_pb2.CreateWebhookResponse:
        request = {
            "url": nowhere(),
            "event_types": ["deployment.succeeded"],
            "service_id": service_id,
            "format": JSON,
            **fields,
        }
        response = await hooks[by].CreateWebhook(**request)
        made.append(response.webhook.id)
        return response

    yield create
    for webhook_id in made:
        try:
            await hooks["admin"].DeleteWebhook(webhook_id=webhook_id)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise


async def listed(client: Hooks, webhook_id: str) -> webhook_pb2.Webhook:
    """The webhook as ListWebhooks shows it now."""
    token = ""
    while True:
        page = await client.ListWebhooks(page_size=100, page_token=token)
        for webhook in page.webhooks:
            if webhook.id == webhook_id:
                return webhook
        if not page.next_page_token:
            raise AssertionError(f"webhook {webhook_id} not listed")
        token = page.next_page_token


async def audit_rows(owner: asyncpg.Connection, webhook_id: str) -> list[asyncpg.Record]:
    return await owner.fetch(
        "SELECT action, details::text AS details, sequence FROM audit_logs"
        " WHERE resource_type = 'webhook' AND resource_id = $1 ORDER BY sequence",
        webhook_id,
    )


async def counts(owner: asyncpg.Connection) -> tuple[int, int]:
    """Webhooks, and webhook.create audit rows."""
    return (
        await owner.fetchval("SELECT count(*) FROM webhooks"),
        await owner.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'webhook.create'"),
    )


# -- creating -------------------------------------------------------------------------------


async def test_the_secret_is_shown_once_and_stored_sealed(hooks, make, owner, service_id, db_url):
    request_id = str(uuid.uuid4())
    url = nowhere()
    created = await make(url=url, request_id=request_id)
    secret, webhook = created.secret, created.webhook
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret), secret
    assert webhook.resource_name == f"webhooks/{webhook.id}" and webhook.etag == "1"
    assert (webhook.url, list(webhook.event_types)) == (url, ["deployment.succeeded"])
    assert (webhook.service_id, webhook.team_id, webhook.format) == (service_id, "", JSON)
    assert webhook.active and webhook.consecutive_failures == 0
    assert webhook.owner_id == LENA

    # A retry with the same request id: the same webhook, no secret, nothing more made.
    again = await make(url=url, request_id=request_id)
    assert again.webhook == webhook and again.secret == ""
    assert await owner.fetchval("SELECT count(*) FROM webhooks WHERE url = $1", url) == 1
    await fails(
        make(url=url, request_id=request_id, event_types=["deployment.failed"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    assert await listed(hooks["admin"], webhook.id) == webhook

    sealed = await owner.fetchval(
        "SELECT secret_encrypted FROM webhooks WHERE id = $1", uuid.UUID(webhook.id)
    )
    assert secret.encode() not in sealed
    key = (await asyncio.to_thread(Path(webhook_key_file(db_url)).read_bytes)).strip()
    assert SecretBox(key).open(sealed) == secret  # the services' key file's key opens it

    # The audit row says what was made and where it sends, never the secret nor the path.
    (row,) = await audit_rows(owner, webhook.id)
    assert row["action"] == "webhook.create"
    assert '"url": "http://127.0.0.1:9"' in row["details"]
    assert secret not in row["details"] and url not in row["details"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"url": ""}, "url"),
        ({"url": "ftp://127.0.0.1/hook"}, "url"),
        ({"url": "http:///hook"}, "url"),
        ({"url": "http://user:pass@127.0.0.1:9/hook"}, "url"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "url"),
        ({"url": "http://[fe80::1]/hook"}, "url"),
        ({"url": "http://[::ffff:169.254.169.254]/hook"}, "url"),
        ({"url": "http://[fd00:ec2::254]/hook"}, "url"),
        ({"url": "http://[64:ff9b:1::a9fe:a9fe]/hook"}, "url"),  # NAT64, local use
        # Malformed: INVALID_ARGUMENT, never INTERNAL; and what the client could not send.
        ({"url": "http://[::1"}, "url"),
        ({"url": "http://[zz]/"}, "url"),
        ({"url": "http://a]b/"}, "url"),
        ({"url": "http://[::1]x/"}, "url"),
        ({"url": "http://127.0.0.1:0/hook"}, "url"),
        # Dots a URL parser reads as 127.0.0.1 (IDNA): the host must be ASCII.
        ({"url": "http://127\u30020\u30020\u30021/hook"}, "url"),
        ({"url": "http://127\uff0e0\uff0e0\uff0e1/hook"}, "url"),
        ({"event_types": ["deployment.exploded"]}, "event_types[0]"),
        ({"event_types": []}, "event_types"),
        ({"event_types": ["audit.logged"]}, "event_types"),  # the whole trail: unscoped only
        ({"event_types": ["release.created", "release.created"]}, "event_types[1]"),
        ({"format": webhook_pb2.WEBHOOK_FORMAT_UNSPECIFIED}, "format"),
        ({"format": 7}, "format"),
        ({"team_id": str(seed_id("team", "Platform"))}, "team_id"),  # beside service_id
        ({"service_id": "", "format": SLACK}, "format"),  # Slack needs a channel's owner
    ],
    ids=lambda value: str(value)[:40],
)
async def test_a_bad_webhook_is_refused_naming_the_field(make, owner, fields, field):
    before = await counts(owner)
    error = await fails(make(**fields), grpc.StatusCode.INVALID_ARGUMENT)
    assert violated_fields(error) == [field], error.details()
    assert await counts(owner) == before


async def test_a_scope_must_exist(make, owner):
    before = await counts(owner)
    await fails(make(service_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND, "SERVICE_NOT_FOUND")
    await fails(
        make(service_id="", team_id=str(uuid.uuid4())),
        grpc.StatusCode.NOT_FOUND,
        "TEAM_NOT_FOUND",
    )
    await fails(
        make(service_id="services/no-such-service"),
        grpc.StatusCode.NOT_FOUND,
        "SERVICE_NOT_FOUND",
    )
    assert await counts(owner) == before
    team_wide = await make(service_id="", team_id="teams/Platform")
    assert team_wide.webhook.team_id == str(seed_id("team", "Platform"))
    assert team_wide.webhook.service_id == ""


async def test_a_slack_webhook_needs_a_channel(clients, make, owner, service_id):
    """The service's channel, else its team's; a team's own for a team's webhook."""
    lead = clients["lead"]
    quiet_team = await lead.CreateTeam(name=f"quiet-{uuid.uuid4().hex[:8]}")
    quiet = await lead.CreateService(name=f"quiet-{uuid.uuid4().hex[:8]}", team_id=quiet_team.id)
    before = await counts(owner)
    for scope in ({"service_id": quiet.id}, {"service_id": "", "team_id": quiet_team.id}):
        error = await fails(
            make(format=SLACK, **scope), grpc.StatusCode.FAILED_PRECONDITION, "NO_SLACK_CHANNEL"
        )
        assert "slack_channel" in error.details()
    assert await counts(owner) == before

    # The test's service has no channel of its own; its team (Platform) has one.
    assert (await make(format=SLACK)).webhook.format == SLACK
    await lead.UpdateService(
        service={"id": quiet.id, "slack_channel": "#quiet"}, update_mask=mask("slack_channel")
    )
    assert (await make(format=SLACK, service_id=quiet.id)).webhook.format == SLACK


async def test_audit_logged_streams_from_the_moment_a_webhook_is_made(hooks, make, owner):
    """Its cursor is the trail's last sequence when it was made: its own creation's row is
    the first it is sent; a webhook without the type has no cursor."""
    committed = await owner.fetchval("SELECT max(sequence) FROM audit_logs")
    streaming = (
        await make(by="admin", event_types=["audit.logged", "release.created"], service_id="")
    ).webhook
    cursor = await owner.fetchval(
        "SELECT audit_cursor FROM webhooks WHERE id = $1", uuid.UUID(streaming.id)
    )
    (created,) = await audit_rows(owner, streaming.id)
    assert committed <= cursor < created["sequence"]
    await poll(
        lambda: owner.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND audit_sequence = $2",
            uuid.UUID(streaming.id),
            created["sequence"],
        ),
        10,
        "its own creation's row handed to it",
    )

    # A scoped webhook may not take the whole trail.
    scoped = (await make()).webhook
    error = await fails(
        hooks["admin"].UpdateWebhook(
            webhook={"id": scoped.id, "event_types": ["audit.logged"]},
            update_mask=mask("event_types"),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violated_fields(error) == ["webhook.event_types"]

    plain = (await make(service_id="")).webhook
    cursor_of = "SELECT audit_cursor FROM webhooks WHERE id = $1"
    assert await owner.fetchval(cursor_of, uuid.UUID(plain.id)) is None
    await hooks["admin"].UpdateWebhook(
        webhook={"id": plain.id, "event_types": ["deployment.succeeded", "audit.logged"]},
        update_mask=mask("event_types"),
    )
    assert await owner.fetchval(cursor_of, uuid.UUID(plain.id)) >= cursor
    await hooks["admin"].UpdateWebhook(
        webhook={"id": plain.id, "event_types": ["deployment.succeeded"]},
        update_mask=mask("event_types"),
    )
    assert await owner.fetchval(cursor_of, uuid.UUID(plain.id)) is None


async def test_only_an_admin_touches_a_webhook_streaming_the_trail(hooks, make, owner):
    """A lead may manage webhooks, but not the one the audit trail leaves by: making one,
    pointing it elsewhere, switching it off or deleting it is an admin's (the trail must
    not stop reaching its auditors on a lead's word). Each refusal changes nothing."""
    lead = hooks["lead"]
    await fails(
        make(event_types=["audit.logged"], service_id=""),
        grpc.StatusCode.PERMISSION_DENIED,
        "AUDIT_STREAM_ADMIN_ONLY",
    )
    siem = (await make(by="admin", event_types=["audit.logged"], service_id="")).webhook
    plain = (await make(service_id="")).webhook
    before = await counts(owner)
    for change, paths in (
        ({"url": nowhere()}, ["url"]),
        ({"active": False}, ["active"]),
        ({"event_types": ["release.created"]}, ["event_types"]),
    ):
        await fails(
            lead.UpdateWebhook(webhook={"id": siem.id, **change}, update_mask=mask(*paths)),
            grpc.StatusCode.PERMISSION_DENIED,
            "AUDIT_STREAM_ADMIN_ONLY",
        )
    await fails(
        lead.UpdateWebhook(
            webhook={"id": plain.id, "event_types": ["audit.logged"]},
            update_mask=mask("event_types"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "AUDIT_STREAM_ADMIN_ONLY",
    )
    await fails(
        lead.DeleteWebhook(webhook_id=siem.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "AUDIT_STREAM_ADMIN_ONLY",
    )
    assert await counts(owner) == before
    assert await listed(hooks["admin"], siem.id) == siem
    await hooks["admin"].DeleteWebhook(webhook_id=siem.id)


# -- who may ------------------------------------------------------------------------------------


async def test_only_leads_and_admins_manage_webhooks(hooks, make, owner):
    webhook = (await make()).webhook
    delivery_id = await insert_delivery(owner, webhook.id, "delivered", minutes_ago=1)
    requests = {
        "CreateWebhook": {"url": nowhere(), "event_types": ["release.created"], "format": JSON},
        "ListWebhooks": {},
        "UpdateWebhook": {
            "webhook": {"id": webhook.id, "active": False},
            "update_mask": mask("active"),
        },
        "DeleteWebhook": {"webhook_id": webhook.id},
        "ListWebhookDeliveries": {"webhook_id": webhook.id},
        "RedeliverWebhookDelivery": {"delivery_id": delivery_id},
    }
    assert set(requests) == set(RPCS)
    for role in ("viewer", "developer"):
        for rpc, request in requests.items():
            error = await fails(
                getattr(hooks[role], rpc)(**request), grpc.StatusCode.PERMISSION_DENIED
            )
            info, _ = error_details(error)
            assert (info.reason, info.metadata["permission"]) == (
                "MISSING_PERMISSION",
                "webhooks.admin",
            ), (role, rpc)
    assert await listed(hooks["lead"], webhook.id) == webhook  # nothing changed

    # Any lead or admin manages any webhook: lena made it, marco and the admin change it.
    admin, reviewer = hooks["admin"], hooks["reviewer"]
    assert (await listed(admin, webhook.id)).owner_id == LENA
    paused = await reviewer.UpdateWebhook(**requests["UpdateWebhook"])
    assert not paused.active and paused.owner_id == LENA
    resumed = await admin.UpdateWebhook(
        webhook={"id": webhook.id, "active": True}, update_mask=mask("active")
    )
    assert resumed.active
    redelivered = await reviewer.RedeliverWebhookDelivery(delivery_id=delivery_id)
    assert redelivered.id == delivery_id
    listing = await admin.ListWebhookDeliveries(webhook_id=webhook.id)
    assert [d.id for d in listing.deliveries] == [delivery_id]
    await admin.DeleteWebhook(webhook_id=webhook.id)


# -- listing ------------------------------------------------------------------------------------


async def test_webhooks_are_listed_newest_first_a_page_at_a_time(hooks, make):
    mine = [(await make()).webhook.id for _ in range(5)]
    seen, token, pages = [], "", 0
    while True:
        page = await hooks["admin"].ListWebhooks(page_size=2, page_token=token)
        assert len(page.webhooks) <= 2
        assert all(w.owner_id for w in page.webhooks)
        seen.extend(w.id for w in page.webhooks)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and pages >= 3
    assert [w for w in seen if w in mine] == mine[::-1]
    everything = await hooks["admin"].ListWebhooks()  # 0: the default page of 50
    assert [w.id for w in everything.webhooks] == seen[:50]

    error = await fails(hooks["admin"].ListWebhooks(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT)
    assert violated_fields(error) == ["page_size"]
    await fails(
        hooks["admin"].ListWebhooks(page_token="not-a-token"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


# -- updating -----------------------------------------------------------------------------------


async def test_an_update_changes_what_its_mask_names(hooks, make, owner):
    lead = hooks["lead"]
    webhook = (await make()).webhook
    # The dispatcher counts failures; here the owner sets them.
    await owner.execute(
        "UPDATE webhooks SET consecutive_failures = 7 WHERE id = $1", uuid.UUID(webhook.id)
    )
    read = await listed(lead, webhook.id)
    # The dispatcher's counters do not move the etag: an update sent with it still holds.
    assert read.consecutive_failures == 7 and read.etag == webhook.etag

    off = await lead.UpdateWebhook(
        webhook={"id": webhook.id, "active": False, "url": "ignored"}, update_mask=mask("active")
    )
    assert not off.active and off.url == webhook.url and off.consecutive_failures == 7
    assert off.etag != read.etag
    on = await lead.UpdateWebhook(
        webhook={"resource_name": f"webhooks/{webhook.id}", "active": True},
        update_mask=mask("active"),
    )
    assert on.active and on.consecutive_failures == 0  # re-activated: a fresh count

    url = nowhere()
    moved = await lead.UpdateWebhook(
        webhook={"id": webhook.id, "url": url, "event_types": ["rollback.started"]},
        update_mask=mask("url", "event_types"),
    )
    assert (moved.url, list(moved.event_types)) == (url, ["rollback.started"])
    assert await listed(lead, webhook.id) == moved

    refusals = [
        ({"url": "http://169.254.169.254/"}, mask("url"), "webhook.url"),
        ({"url": "gopher://127.0.0.1/"}, mask("url"), "webhook.url"),
        ({"event_types": ["nope"]}, mask("event_types"), "webhook.event_types[0]"),
        ({"event_types": []}, mask("event_types"), "webhook.event_types"),
        ({"consecutive_failures": 0}, mask("consecutive_failures"), "update_mask"),
        ({"owner_id": LENA}, mask("owner_id"), "update_mask"),
        ({"format": SLACK}, mask("format"), "update_mask"),
        ({"active": False}, mask(), "update_mask"),
    ]
    for fields, paths, field in refusals:
        error = await fails(
            lead.UpdateWebhook(webhook={"id": webhook.id, **fields}, update_mask=paths),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violated_fields(error) == [field], (fields, error.details())
    assert await listed(lead, webhook.id) == moved

    # A stale etag is ABORTED as on every other update, naming the current one.
    error = await fails(
        lead.UpdateWebhook(
            webhook={"id": webhook.id, "active": False, "etag": webhook.etag},
            update_mask=mask("active"),
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert error_details(error)[0].metadata["etag"] == moved.etag
    assert await listed(lead, webhook.id) == moved
    current = await lead.UpdateWebhook(
        webhook={"id": webhook.id, "active": False, "etag": moved.etag}, update_mask=mask("active")
    )
    assert not current.active

    actions = [row["action"] for row in await audit_rows(owner, webhook.id)]
    assert actions == ["webhook.create"] + ["webhook.update"] * 4
    await fails(
        lead.UpdateWebhook(
            webhook={"id": str(uuid.uuid4()), "active": True}, update_mask=mask("active")
        ),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_NOT_FOUND",
    )


# -- deleting -----------------------------------------------------------------------------------


async def test_a_deleted_webhook_is_gone_with_its_deliveries(hooks, make, owner):
    lead = hooks["lead"]
    webhook = (await make()).webhook
    for minutes in (3, 2):
        await insert_delivery(owner, webhook.id, "failed", minutes_ago=minutes)
    await lead.DeleteWebhook(webhook_id=f"webhooks/{webhook.id}")
    for call in (
        lead.DeleteWebhook(webhook_id=webhook.id),
        lead.DeleteWebhook(webhook_id=f"webhooks/{webhook.id}"),
        lead.ListWebhookDeliveries(webhook_id=webhook.id),
        lead.UpdateWebhook(webhook={"id": webhook.id, "active": True}, update_mask=mask("active")),
    ):
        await fails(call, grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")
    assert (
        await owner.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", uuid.UUID(webhook.id)
        )
        == 0
    )
    actions = [row["action"] for row in await audit_rows(owner, webhook.id)]
    assert actions == ["webhook.create", "webhook.delete"]
    error = await fails(
        lead.DeleteWebhook(webhook_id="webhooks/not-a-uuid"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert violated_fields(error) == ["webhook_id"]


# -- deliveries ---------------------------------------------------------------------------------


async def insert_delivery(
    owner: asyncpg.Connection,
    webhook_id: str,
    status: str,
    *,
    minutes_ago: float,
    attempts: int = 1,
    last_status_code: int | None = 200,
    last_error: str | None = None,
    delivered: bool = False,
    due_in: timedelta = timedelta(days=1),
) -> str:
    """A delivery as the dispatcher writes one (a pending one due later than any test)."""
    created = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    body = f'{{"id": "{uuid.uuid4()}", "type": "deployment.succeeded"}}'.encode()
    return str(
        await owner.fetchval(
            "INSERT INTO webhook_deliveries (webhook_id, event_type, body, status, attempts,"
            " last_status_code, last_error, next_attempt_at, delivered_at, created_at)"
            " VALUES ($1, 'deployment.succeeded', $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
            uuid.UUID(webhook_id),
            body,
            status,
            attempts,
            last_status_code,
            last_error,
            datetime.now(UTC) + due_in,
            created if delivered else None,
            created,
        )
    )


async def test_deliveries_are_listed_newest_first_and_sent_again_on_request(hooks, make, owner):
    lead = hooks["lead"]
    webhook = (await make()).webhook
    dead = await insert_delivery(
        owner,
        webhook.id,
        "dead",
        minutes_ago=50,
        attempts=23,
        last_status_code=503,
        last_error="503 Service Unavailable",
    )
    delivered = await insert_delivery(
        owner, webhook.id, "delivered", minutes_ago=40, delivered=True
    )
    failed = await insert_delivery(
        owner, webhook.id, "failed", minutes_ago=30, last_status_code=410, last_error="410 Gone"
    )
    unreachable = await insert_delivery(
        owner,
        webhook.id,
        "pending",
        minutes_ago=20,
        attempts=2,
        last_status_code=None,
        last_error="connection refused",
    )
    newest = await insert_delivery(owner, webhook.id, "delivered", minutes_ago=10, delivered=True)

    pages, token = [], ""
    while True:
        page = await lead.ListWebhookDeliveries(
            webhook_id=f"webhooks/{webhook.id}", page_size=2, page_token=token
        )
        pages.append([d.id for d in page.deliveries])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[newest, unreachable], [failed, delivered], [dead]]
    listing = await lead.ListWebhookDeliveries(webhook_id=webhook.id)
    by_id = {d.id: d for d in listing.deliveries}
    assert [d.id for d in listing.deliveries] == [newest, unreachable, failed, delivered, dead]
    S = webhook_pb2
    assert by_id[dead].status == S.WEBHOOK_DELIVERY_STATUS_DEAD
    assert (by_id[dead].attempts, by_id[dead].last_status_code) == (23, 503)
    assert by_id[dead].last_error == "503 Service Unavailable"
    assert by_id[unreachable].status == S.WEBHOOK_DELIVERY_STATUS_PENDING
    assert (by_id[unreachable].last_status_code, by_id[unreachable].last_error) == (
        0,
        "connection refused",
    )
    assert by_id[failed].status == S.WEBHOOK_DELIVERY_STATUS_FAILED
    assert by_id[delivered].status == S.WEBHOOK_DELIVERY_STATUS_DELIVERED
    assert by_id[delivered].HasField("delivered_at") and not by_id[dead].HasField("delivered_at")
    assert all(
        d.webhook_id == webhook.id and d.event_type == "deployment.succeeded"
        for d in listing.deliveries
    )
    await fails(
        lead.ListWebhookDeliveries(webhook_id=webhook.id, page_token=token or "x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    other = (await make()).webhook
    assert (await lead.ListWebhookDeliveries(webhook_id=other.id)).deliveries == []
    await fails(
        lead.ListWebhookDeliveries(
            webhook_id=other.id,
            page_token=(
                await lead.ListWebhookDeliveries(webhook_id=webhook.id, page_size=1)
            ).next_page_token,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_FILTER_MISMATCH",
    )

    # Redelivery: the same delivery, due now, with the same body; its attempts count on.
    bodies = "SELECT body FROM webhook_deliveries WHERE id = $1"
    for delivery_id, attempts in ((dead, 23), (delivered, 1)):
        body = await owner.fetchval(bodies, uuid.UUID(delivery_id))
        asked = datetime.now(UTC)
        again = await lead.RedeliverWebhookDelivery(delivery_id=delivery_id)
        assert again.id == delivery_id and again.webhook_id == webhook.id
        assert again.status == S.WEBHOOK_DELIVERY_STATUS_PENDING
        assert again.attempts == attempts
        due = again.next_attempt_at.ToDatetime(tzinfo=UTC)
        assert asked - timedelta(seconds=5) < due < asked + timedelta(seconds=5)
        assert await owner.fetchval(bodies, uuid.UUID(delivery_id)) == body
    redelivered = [
        row for row in await audit_rows(owner, webhook.id) if row["action"] == "webhook.redeliver"
    ]
    assert [f'"delivery_id": "{dead}"' in row["details"] for row in redelivered] == [True, False]

    await fails(
        lead.RedeliverWebhookDelivery(delivery_id=str(uuid.uuid4())),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_DELIVERY_NOT_FOUND",
    )
    # An inactive webhook is sent nothing: re-activate it first.
    await lead.UpdateWebhook(
        webhook={"id": webhook.id, "active": False}, update_mask=mask("active")
    )
    await fails(
        lead.RedeliverWebhookDelivery(delivery_id=failed),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WEBHOOK_INACTIVE",
    )
    assert (
        await owner.fetchval(
            "SELECT status FROM webhook_deliveries WHERE id = $1", uuid.UUID(failed)
        )
        == "failed"
    )
