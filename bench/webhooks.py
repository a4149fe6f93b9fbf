"""Webhook scenarios: how fast the dispatcher delivers, and what subscribing costs the
deploy path. The receiver is a real HTTP server in the bench's process (tests.receiver),
answering 200 at once."""

from __future__ import annotations

import json
import time
import uuid

import asyncpg

from bench.report import Result, at_least, at_least_figure, info
from bench.scenarios import Size, _lifecycles
from bench.stack import Stack
from deploy_svc import dispatcher
from deploy_svc.events import EventType
from relman.v1 import webhook_pb2, webhook_pb2_grpc
from shared.persistence.db import libpq_dsn
from tests.harness import bearer, owner_url
from tests.receiver import Receiver

DELIVERIES_TARGET = 500  # per second
LIFECYCLE_TARGET = 0.9  # of the same run's figure without a webhook


async def _webhook(stack: Stack, url: str, event_types: list[str]) -> tuple[str, object]:
    """A JSON webhook made through the API as the admin; its id and a stub to delete it."""
    stub = webhook_pb2_grpc.WebhookServiceStub(stack.deploy_channel)
    made = await stub.CreateWebhook(
        webhook_pb2.CreateWebhookRequest(
            url=url, event_types=event_types, format=webhook_pb2.WEBHOOK_FORMAT_JSON
        ),
        metadata=bearer(stack.admin_token),
        timeout=30,
    )
    return made.webhook.id, stub


async def _delete(stack: Stack, stub, webhook_id: str) -> None:
    await stub.DeleteWebhook(
        webhook_pb2.DeleteWebhookRequest(webhook_id=webhook_id),
        metadata=bearer(stack.admin_token),
        timeout=30,
    )


async def webhook_deliveries(stack: Stack, size: Size) -> list[Result]:
    """Events written to the outbox at once (as a burst of changes would), one webhook
    taking them: deliveries per second from the commit to the last one received, the
    dispatcher keeping dispatcher.IN_FLIGHT requests in flight."""
    events = 20 * size.lifecycles_per_caller * 16  # 4,000 full, fewer quick
    async with Receiver() as receiver:
        webhook_id, stub = await _webhook(stack, receiver.url(), ["release.created"])
        data = json.dumps({"release": {"id": str(uuid.uuid4()), "version": "1.0.0"}})
        connection = await asyncpg.connect(libpq_dsn(owner_url(stack.url)))
        try:
            started = time.perf_counter()
            await connection.execute(
                "INSERT INTO webhook_events (event_type, data)"
                " SELECT 'release.created', CAST($2 AS jsonb) FROM generate_series(1, $1)",
                events,
                data,
            )
            await receiver.wait_for(events, within_s=300)
            elapsed = time.perf_counter() - started
        finally:
            await connection.close()
        await _delete(stack, stub, webhook_id)
    assert len({r.delivery for r in receiver.requests}) == events, "a delivery sent twice"
    name = f"Webhook deliveries of {events:,} events to a local receiver"
    return [
        at_least_figure(
            f"{name}, {dispatcher.IN_FLIGHT} in flight: deliveries/s",
            events / elapsed,
            DELIVERIES_TARGET,
            "/s",
        )
    ]


async def lifecycles_with_webhook(stack: Stack, size: Size) -> list[Result]:
    """The lifecycle scenario without a webhook, with one taking every event type
    (audit.logged too: every audit row of every lifecycle), and without again; the one
    with the webhook against the mean of the two without."""
    before, _ = await _lifecycles(stack, size, request_ids=False)
    async with Receiver() as receiver:
        webhook_id, stub = await _webhook(stack, receiver.url(), [e.value for e in EventType])
        hooked, _ = await _lifecycles(stack, size, request_ids=False)
        await _delete(stack, stub, webhook_id)
        delivered = len(receiver.requests)
    after, _ = await _lifecycles(stack, size, request_ids=False)
    baseline = (before + after) / 2
    name = "Promote + 5 x 2 UpdatePipelineStage + GetDeployment(FULL), 16 in flight"
    return [
        info(f"{name}, no webhook (before and after): lifecycles/s", baseline),
        at_least(
            f"{name}, a webhook taking every event: lifecycles/s",
            hooked,
            baseline,
            LIFECYCLE_TARGET,
        ),
        info(f"{name}, a webhook taking every event: requests it received", delivered),
    ]
