"""Webhook scenarios: how fast the dispatcher delivers, and what subscribing costs the
deploy path. The receiver is a real HTTP server in the bench's process (tests.receiver),
answering 200 at once."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import aiohttp
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
    dispatcher keeping dispatcher.IN_FLIGHT requests in flight; against the same receiver
    taking as many plain POSTs from the bench, as many at once (the same run's baseline:
    what the receiver and the machine allow without relman)."""
    events = 20 * size.lifecycles_per_caller * 16  # 4,800 full, fewer quick
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
        plain = await _plain_posts(receiver, events, dispatcher.IN_FLIGHT)
    name = f"Webhook deliveries of {events:,} events to a local receiver"
    return [
        at_least_figure(
            f"{name}, {dispatcher.IN_FLIGHT} in flight: deliveries/s (baseline: plain POSTs)",
            events / elapsed,
            DELIVERIES_TARGET,
            "/s",
            plain,
        )
    ]


async def _plain_posts(receiver: Receiver, count: int, in_flight: int) -> float:
    """POSTs per second from this process to `receiver`, `in_flight` at once."""
    body = b'{"id": "plain"}'
    slots = asyncio.Semaphore(in_flight)
    before = len(receiver.requests)

    async def post(session: aiohttp.ClientSession) -> None:
        async with slots, session.post(receiver.url(), data=body) as response:
            assert response.status == 200

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(post(session) for _ in range(count)))
        elapsed = time.perf_counter() - started
    assert len(receiver.requests) - before == count
    return count / elapsed


class _ReceiverProcess:
    """tests.receiver as a process of its own (it answers 200 and counts)."""

    async def __aenter__(self) -> _ReceiverProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.receiver",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int((await self.process.stdout.readline()).decode())
        return self

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def count(self) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{self.port}/count") as response:
                return int(await response.text())

    async def __aexit__(self, *exc_info) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


async def _hooked_lifecycles(stack: Stack, size: Size, event_types: list[str]):
    """Lifecycles per second with one webhook taking `event_types` (its receiver a process
    of its own), and how many requests the receiver got."""
    async with _ReceiverProcess() as receiver:
        webhook_id, stub = await _webhook(stack, receiver.url(), event_types)
        rate, _ = await _lifecycles(stack, size, request_ids=False)
        await _delete(stack, stub, webhook_id)
        return rate, await receiver.count()


async def lifecycles_with_webhook(stack: Stack, size: Size) -> list[Result]:
    """The lifecycle scenario without a webhook, with one taking every event type but
    audit.logged (what the deploy path itself publishes), with one taking audit.logged
    too (every audit row of every lifecycle, about 16 deliveries a lifecycle), and without
    again; each with a webhook against the mean of the two without."""
    every = [e.value for e in EventType]
    before, _ = await _lifecycles(stack, size, request_ids=False)
    events, events_sent = await _hooked_lifecycles(
        stack, size, [e for e in every if e != EventType.AUDIT_LOGGED]
    )
    trail, trail_sent = await _hooked_lifecycles(stack, size, every)
    after, _ = await _lifecycles(stack, size, request_ids=False)
    baseline = (before + after) / 2
    name = "Promote + 5 x 2 UpdatePipelineStage + GetDeployment(FULL), 16 in flight"
    events_name = f"{name}, a webhook taking every event type but audit.logged"
    trail_name = f"{name}, a webhook taking every event type, audit.logged too"
    return [
        info(f"{name}, no webhook (before and after): lifecycles/s", baseline),
        at_least(f"{events_name}: lifecycles/s", events, baseline, LIFECYCLE_TARGET),
        info(f"{events_name}: requests it received", events_sent),
        at_least(f"{trail_name}: lifecycles/s", trail, baseline, LIFECYCLE_TARGET),
        info(f"{trail_name}: requests it received", trail_sent),
    ]
