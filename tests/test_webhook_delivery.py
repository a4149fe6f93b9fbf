"""The webhook dispatcher (deploy_svc/dispatcher.py, DESIGN §12) on real processes and real
receivers: events written to the outbox reach the receivers that subscribed to them, once,
signed; failures are retried with backoff under one delivery id or end the delivery; a
receiver at a link-local or metadata address is never connected to; a webhook failing 100
times in a row is deactivated and audited; two replicas deliver each event once.

The module has a database of its own and two deploy_svc processes on it, started with a
key file the tests seal secrets with, WEBHOOK_ALLOWED_NETWORKS=127.0.0.1/32 (the
receivers' address) and WEBHOOK_RETRY_BASE_S=BASE_S, so that a series of retries takes a
second. Webhooks and events are written as the schema's owner, as the API and the domain
will write them (the API's own checks of a URL are bypassed on purpose here).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import asyncpg
import pytest
from sqlalchemy import URL

from deploy_svc.dispatcher import AddressRefused, CheckedResolver
from deploy_svc.webhook_secrets import SecretBox, load_box, new_secret
from shared import PROJECT_ROOT
from shared.persistence.db import libpq_dsn
from tests.harness import (
    RelmanProcess,
    free_port,
    owner_url,
    poll,
    scrape_metrics,
    scratch_database,
    start_service,
)
from tests.receiver import Receiver, Tripwire

BASE_S = 0.3
ALLOWED = "127.0.0.1/32"


@dataclass
class World:
    url: URL
    owner: asyncpg.Connection
    box: SecretBox
    user_id: uuid.UUID
    settings: dict[str, str]
    processes: list[RelmanProcess]

    async def start_processes(self, count: int = 2) -> None:
        for _ in range(count):
            self.processes.append(await start_service(self.url, "deploy_svc", **self.settings))


@pytest.fixture(scope="module")
async def world(server_url, tmp_path_factory) -> AsyncIterator[World]:
    key_file = tmp_path_factory.mktemp("webhooks") / "webhook-secret-key"
    box = load_box(key_file)  # made here; the processes read the same file
    settings = {
        "WEBHOOK_SECRET_KEY_FILE": str(key_file),
        "WEBHOOK_RETRY_BASE_S": str(BASE_S),
        "WEBHOOK_ALLOWED_NETWORKS": ALLOWED,
        "DEPLOY_METRICS_PORT": "0",  # each counts its attempts
    }
    async with scratch_database(server_url) as url:
        owner = await asyncpg.connect(libpq_dsn(owner_url(url)))
        creator = await owner.fetchval(  # the webhooks' owner, a lead
            "INSERT INTO users (email, username, hashed_password, role)"
            " VALUES ('hooks@relman.example', 'hooks', 'x', 'lead') RETURNING id"
        )
        world = World(url, owner, box, creator, settings, [])
        try:
            await world.start_processes()
            yield world
        finally:
            for process in world.processes:
                assert await process.stop() == 0, process.output
            await owner.close()
        for process in world.processes:
            # The loop logs its failures; none is expected while the database is up.
            assert "webhook dispatch failed" not in process.output, process.output


@pytest.fixture(autouse=True)
async def quiet_webhooks(world: World) -> AsyncIterator[None]:
    """Each test's webhooks stop taking events after it (its receivers are gone)."""
    yield
    await world.owner.execute("UPDATE webhooks SET active = false")


@dataclass
class Scope:
    team_id: uuid.UUID
    service_id: uuid.UUID
    service_name: str


async def new_service(
    world: World, *, slack: str | None = None, team_slack: str | None = None
) -> Scope:
    """A team and a service of the test's own (events never cross tests)."""
    tag = uuid.uuid4().hex[:10]
    team_id = await world.owner.fetchval(
        "INSERT INTO teams (name, slack_channel) VALUES ($1, $2) RETURNING id",
        f"team-{tag}",
        team_slack,
    )
    service_id = await world.owner.fetchval(
        "INSERT INTO services (name, team_id, slack_channel) VALUES ($1, $2, $3) RETURNING id",
        f"svc-{tag}",
        team_id,
        slack,
    )
    return Scope(team_id, service_id, f"svc-{tag}")


async def create_webhook(
    world: World,
    url: str,
    event_types: list[str],
    *,
    service_id: uuid.UUID | None = None,
    team_id: uuid.UUID | None = None,
    form: str = "json",
    consecutive_failures: int = 0,
) -> tuple[uuid.UUID, str]:
    """A webhook row as CreateWebhook writes one; its id and its secret."""
    secret = new_secret()
    webhook_id = await world.owner.fetchval(
        "INSERT INTO webhooks (url, event_types, service_id, team_id, format,"
        " secret_encrypted, consecutive_failures, created_by)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        url,
        event_types,
        service_id,
        team_id,
        form,
        world.box.seal(secret),
        consecutive_failures,
        world.user_id,
    )
    return webhook_id, secret


async def publish(
    world: World, event_type: str, service_id: uuid.UUID | None, data: dict
) -> uuid.UUID:
    """An outbox event as the domain writes one (with its service's team)."""
    return await world.owner.fetchval(
        "INSERT INTO webhook_events (event_type, service_id, team_id, data)"
        " VALUES ($1, $2, (SELECT team_id FROM services WHERE id = $2), $3::jsonb)"
        " RETURNING id",
        event_type,
        service_id,
        json.dumps(data),
    )


async def deliveries(world: World, webhook_id: uuid.UUID) -> list[asyncpg.Record]:
    return await world.owner.fetch(
        "SELECT * FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at",
        webhook_id,
    )


async def settled(world: World, webhook_id: uuid.UUID, count: int = 1, within_s: float = 10):
    """The webhook's deliveries once `count` of them have left PENDING."""

    async def done():
        rows = await deliveries(world, webhook_id)
        finished = [r for r in rows if r["status"] != "pending"]
        return rows if len(finished) >= count else None

    return await poll(done, within_s, f"{count} settled deliveries of {webhook_id}")


async def webhook_row(world: World, webhook_id: uuid.UUID) -> asyncpg.Record:
    return await world.owner.fetchrow("SELECT * FROM webhooks WHERE id = $1", webhook_id)


def deployment_data(service_id: uuid.UUID) -> dict:
    deployment_id = str(uuid.uuid4())
    return {
        "deployment": {
            "id": deployment_id,
            "release_id": str(uuid.uuid4()),
            "environment_id": str(uuid.uuid4()),
            "status": "DEPLOYMENT_STATUS_SUCCEEDED",
            "resource_name": f"deployments/{deployment_id}",
            "service_id": str(service_id),
        }
    }


async def test_an_event_reaches_its_subscribers_once_and_no_one_else(world: World):
    mine, other = await new_service(world), await new_service(world)
    async with (
        Receiver() as subscribed,
        Receiver() as team_wide,
        Receiver() as other_type,
        Receiver() as other_service,
        Receiver() as other_team,
    ):
        hook, _ = await create_webhook(
            world, subscribed.url(), ["deployment.succeeded"], service_id=mine.service_id
        )
        team_hook, _ = await create_webhook(
            world, team_wide.url(), ["deployment.succeeded"], team_id=mine.team_id
        )
        quiet = [
            await create_webhook(
                world, other_type.url(), ["release.created"], service_id=mine.service_id
            ),
            await create_webhook(
                world, other_service.url(), ["deployment.succeeded"], service_id=other.service_id
            ),
            await create_webhook(
                world, other_team.url(), ["deployment.succeeded"], team_id=other.team_id
            ),
        ]
        committed = time.monotonic()
        event_id = await publish(
            world, "deployment.succeeded", mine.service_id, deployment_data(mine.service_id)
        )
        (first,) = await subscribed.wait_for(1)
        assert first.at - committed < 5  # the first attempt within 5 s of the commit
        await team_wide.wait_for(1)
        for webhook_id in (hook, team_hook):
            (row,) = await settled(world, webhook_id)
            assert (row["status"], row["attempts"], row["event_id"]) == ("delivered", 1, event_id)
        assert await world.owner.fetchval(
            "SELECT dispatched FROM webhook_events WHERE id = $1", event_id
        )
        made_for = await world.owner.fetch(
            "SELECT webhook_id FROM webhook_deliveries WHERE event_id = $1", event_id
        )
        assert {r["webhook_id"] for r in made_for} == {hook, team_hook}
        for webhook_id, _ in quiet:
            assert await deliveries(world, webhook_id) == []
        assert len(subscribed.requests) == len(team_wide.requests) == 1
        assert other_type.requests == other_service.requests == other_team.requests == []


def readme_verify():
    """The `verify` function of the README's Webhooks section."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    [block] = [b for b in blocks if "def verify" in b]
    namespace: dict = {}
    exec(block, namespace)
    return namespace["verify"]


async def test_the_receiver_verifies_the_signature_and_reads_the_event(world: World):
    mine = await new_service(world)
    data = {"release": {"id": str(uuid.uuid4()), "version": "1.2.3", "release_notes": "ünïcode"}}
    async with Receiver() as receiver:
        hook, secret = await create_webhook(
            world, receiver.url("/relman"), ["release.created"], service_id=mine.service_id
        )
        event_id = await publish(world, "release.created", mine.service_id, data)
        (received,) = await receiver.wait_for(1)
        (row,) = await settled(world, hook)
    assert received.signed_with(secret)
    assert not received.signed_with(new_secret())
    # The README's receiver code, as written, agrees.
    verify = readme_verify()
    assert verify(secret, received.headers, received.body)
    assert not verify(new_secret(), received.headers, received.body)
    assert not verify(secret, received.headers, received.body + b" ")
    assert abs(int(received.headers["X-Relman-Timestamp"]) - time.time()) < 60
    assert received.method == "POST" and received.path == "/relman"
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["User-Agent"] == "relman-webhooks"
    assert received.headers["X-Relman-Event"] == "release.created"
    assert received.delivery == str(row["id"])
    body = received.json()
    assert body == {
        "id": str(event_id),
        "type": "release.created",
        "occurred_at": body["occurred_at"],
        "data": data,
    }
    occurred = await world.owner.fetchval(
        "SELECT occurred_at FROM webhook_events WHERE id = $1", event_id
    )
    assert datetime.fromisoformat(body["occurred_at"]) == occurred  # RFC 3339, UTC
    assert body["occurred_at"].endswith("Z")
    assert received.body == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert bytes(row["body"]) == received.body  # what every attempt sends


async def test_500_500_200_retries_one_delivery_with_growing_gaps(world: World):
    mine = await new_service(world)
    async with Receiver([500, 500]) as receiver:
        hook, secret = await create_webhook(
            world, receiver.url(), ["deployment.failed"], service_id=mine.service_id
        )
        await publish(world, "deployment.failed", mine.service_id, deployment_data(mine.service_id))
        attempts = await receiver.wait_for(3)
        (row,) = await settled(world, hook)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("delivered", 3, 200)
    assert row["last_error"] is None and row["delivered_at"] is not None
    assert {a.delivery for a in attempts} == {str(row["id"])}
    assert {a.body for a in attempts} == {bytes(row["body"])}
    assert all(a.signed_with(secret) for a in attempts)
    first_gap, second_gap = attempts[1].at - attempts[0].at, attempts[2].at - attempts[1].at
    # Backoff from BASE_S doubling, each drawn between half and the whole of it.
    assert BASE_S / 2 <= first_gap < BASE_S + 1, (first_gap, second_gap)
    assert BASE_S <= second_gap < 2 * BASE_S + 1, (first_gap, second_gap)
    assert (await webhook_row(world, hook))["consecutive_failures"] == 0
    assert len(receiver.requests) == 3


@pytest.mark.parametrize(("status", "error"), [(404, "HTTP 404"), (302, "HTTP 302")])
async def test_a_4xx_or_a_redirect_fails_after_one_attempt(world: World, status, error):
    mine = await new_service(world)
    async with Receiver([status, status]) as receiver:
        hook, _ = await create_webhook(
            world, receiver.url(), ["release.created"], service_id=mine.service_id
        )
        await publish(world, "release.created", mine.service_id, {"release": {}})
        (row,) = await settled(world, hook)
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("failed", 1, status)
        assert row["last_error"].startswith(error)
        assert len(receiver.requests) == 1
    assert (await webhook_row(world, hook))["consecutive_failures"] == 1


async def test_a_receiver_down_then_up_gets_the_delivery(world: World):
    mine = await new_service(world)
    port = free_port(ipv6=False)
    receiver = Receiver(port=port)
    hook, _ = await create_webhook(
        world, receiver.url(), ["release.created"], service_id=mine.service_id
    )
    await publish(world, "release.created", mine.service_id, {"release": {"version": "9.9.9"}})

    async def retried():
        rows = await deliveries(world, hook)
        return rows and rows[0]["attempts"] >= 2 and rows[0]

    pending = await poll(retried, 10, "two failed attempts")
    assert pending["status"] == "pending" and pending["last_status_code"] is None
    assert "Cannot connect" in pending["last_error"]
    async with receiver:
        (received,) = await receiver.wait_for(1)
        (row,) = await settled(world, hook)
    assert row["status"] == "delivered" and row["attempts"] >= 3
    assert received.delivery == str(row["id"])
    assert len(receiver.requests) == 1


async def test_refused_addresses_are_never_connected_to(world: World):
    mine = await new_service(world)
    async with Tripwire("127.0.0.2") as outside, Receiver() as by_name:
        refused = {
            "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a cloud metadata",
            "http://169.254.10.20:8080/hook": "169.254.10.20 is link-local",
            "http://[fe80::1]:8080/hook": "fe80::1 is link-local",
            "http://[::ffff:169.254.169.254]/": "is a cloud metadata address",
            f"http://127.0.0.2:{outside.port}/hook": "outside WEBHOOK_ALLOWED_NETWORKS",
            # Forms the system's resolver maps to the metadata address.
            "http://2852039166/": "2852039166 is not a canonical IP address",
            "http://0251.0376.0251.0376/": "is not a canonical IP address",
            "http://169.254.169.254./": "169.254.169.254. is not a canonical IP address",
            "http://0xa9fea9fe/": "resolves only to refused addresses (169.254.169.254 is a cloud",
        }
        hooks = {
            url: (
                await create_webhook(world, url, ["freeze.override"], service_id=mine.service_id)
            )[0]
            for url in refused
        }
        # A name is resolved and checked at the connection: only 127.0.0.1 of localhost's.
        named, _ = await create_webhook(
            world,
            f"http://localhost:{by_name.port}/hook",
            ["freeze.override"],
            service_id=mine.service_id,
        )
        await publish(world, "freeze.override", mine.service_id, deployment_data(mine.service_id))
        for url, reason in refused.items():
            (row,) = await settled(world, hooks[url])
            assert (row["status"], row["attempts"]) == ("failed", 1), url
            assert row["last_error"].startswith("refused:") and reason in row["last_error"], row
            assert row["last_status_code"] is None
        (row,) = await settled(world, named)
        assert row["status"] == "delivered"
        assert len(by_name.requests) == 1
    assert outside.connections == 0


async def test_the_resolver_leaves_out_refused_addresses():
    loopback = await CheckedResolver((ipaddress.ip_network(ALLOWED),)).resolve(
        "localhost", 80, socket.AF_UNSPEC
    )
    assert {result["host"] for result in loopback} == {"127.0.0.1"}
    with pytest.raises(AddressRefused, match="outside WEBHOOK_ALLOWED_NETWORKS"):
        await CheckedResolver((ipaddress.ip_network("10.0.0.0/8"),)).resolve(
            "localhost", 80, socket.AF_UNSPEC
        )


async def test_aiohttp_does_not_ask_the_resolver_about_an_ip_literal():
    """Why the dispatcher checks IP literals itself: a resolver refusing everything is
    never asked about http://127.0.0.1:port, and aiohttp connects."""
    nothing = CheckedResolver((ipaddress.ip_network("10.0.0.0/8"),))
    connector = aiohttp.TCPConnector(resolver=nothing, use_dns_cache=False)
    async with Receiver() as receiver, aiohttp.ClientSession(connector=connector) as session:
        async with session.post(receiver.url(), data=b"{}") as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.post(f"http://localhost:{receiver.port}/hook", data=b"{}")
    assert len(receiver.requests) == 1


async def test_100_failures_in_a_row_deactivate_the_webhook_audited(world: World):
    mine = await new_service(world)
    async with Receiver([404]) as failing, Receiver() as watcher:
        # A path that is a credential (as Slack's are) is never shown past the API.
        hook, secret = await create_webhook(
            world,
            failing.url("/services/T0/B0/token-in-the-path"),
            ["deployment.cancelled"],
            service_id=mine.service_id,
            consecutive_failures=99,
        )
        await create_webhook(
            world, watcher.url(), ["webhook.deactivated"], service_id=mine.service_id
        )
        data = deployment_data(mine.service_id)
        await publish(world, "deployment.cancelled", mine.service_id, data)
        (row,) = await settled(world, hook)
        assert row["status"] == "failed"
        webhook = await webhook_row(world, hook)
        assert (webhook["active"], webhook["consecutive_failures"]) == (False, 100)
        audit = await world.owner.fetch(
            "SELECT * FROM audit_logs WHERE action = 'webhook.deactivate' AND resource_id = $1",
            str(hook),
        )
        assert len(audit) == 1
        assert audit[0]["resource_type"] == "webhook" and audit[0]["user_id"] is None
        details = json.loads(audit[0]["details"])
        where = f"http://127.0.0.1:{failing.port}"
        assert details["url"] == where and details["consecutive_failures"] == 100
        assert details["last_status_code"] == 404
        # Subscribers hear of it, without the secret.
        (told,) = await watcher.wait_for(1)
        assert told.headers["X-Relman-Event"] == "webhook.deactivated"
        shown = told.json()["data"]["webhook"]
        assert shown["id"] == str(hook) and shown["url"] == where
        assert b"token-in-the-path" not in told.body
        assert shown["event_types"] == ["deployment.cancelled"]
        assert "active" not in shown or shown["active"] is False
        assert secret.encode() not in told.body and b"secret" not in told.body
        # An inactive webhook's deliveries are made and wait, unsent ...
        later = await publish(world, "deployment.cancelled", mine.service_id, data)
        await poll(
            lambda: world.owner.fetchval(
                "SELECT dispatched FROM webhook_events WHERE id = $1", later
            ),
            10,
            "the later event dispatched",
        )
        waiting = [r for r in await deliveries(world, hook) if r["status"] == "pending"]
        assert len(waiting) == 1 and len(failing.requests) == 1
        # ... until it is re-activated: then the receiver gets what happened meanwhile.
        await world.owner.execute(
            "UPDATE webhooks SET active = true, consecutive_failures = 0 WHERE id = $1", hook
        )
        _, sent = await failing.wait_for(2)
        assert sent.delivery == str(waiting[0]["id"])


async def test_a_delivery_older_than_24_hours_dies_on_its_next_failure(world: World):
    mine = await new_service(world)
    async with Receiver([503, 503]) as receiver:
        hook, _ = await create_webhook(
            world, receiver.url(), ["rollback.failed"], service_id=mine.service_id
        )
        await world.owner.execute(
            "INSERT INTO webhook_deliveries (webhook_id, event_type, body, created_at)"
            " VALUES ($1, 'rollback.failed', '{}', now() - interval '25 hours')",
            hook,
        )
        (row,) = await settled(world, hook)
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("dead", 1, 503)
        assert len(receiver.requests) == 1


async def test_a_slow_receiver_does_not_hold_up_the_others(world: World):
    mine = await new_service(world)
    gate = asyncio.Event()
    async with Receiver(gate=gate) as slow, Receiver() as fast:
        slow_hook, _ = await create_webhook(
            world, slow.url(), ["rollback.started"], service_id=mine.service_id
        )
        await publish(world, "rollback.started", mine.service_id, {"rollback": {}})
        await slow.wait_for(1)  # held, unanswered
        fast_hook, _ = await create_webhook(
            world, fast.url(), ["rollback.completed"], service_id=mine.service_id
        )
        await publish(world, "rollback.completed", mine.service_id, {"rollback": {}})
        (row,) = await settled(world, fast_hook)
        assert row["status"] == "delivered"
        assert (await deliveries(world, slow_hook))[0]["status"] == "pending"
        gate.set()
        (row,) = await settled(world, slow_hook)
        assert row["status"] == "delivered" and len(slow.requests) == 1


async def test_slack_bodies_name_what_happened_and_the_channel(world: World):
    own = await new_service(world, slack="#svc-own", team_slack="#team")
    team_only = await new_service(world, team_slack="#team-only")
    environment_id = await world.owner.fetchval(
        "INSERT INTO environments (name, environment_type) VALUES ($1, 'staging') RETURNING id",
        f"staging-{uuid.uuid4().hex[:8]}",
    )
    release_id = await world.owner.fetchval(
        "INSERT INTO releases (service_id, version, created_by) VALUES ($1, '2.0.0', $2)"
        " RETURNING id",
        own.service_id,
        world.user_id,
    )
    environment = await world.owner.fetchval(
        "SELECT name FROM environments WHERE id = $1", environment_id
    )
    async with Receiver() as receiver:
        for scope in (own, team_only):
            await create_webhook(
                world,
                receiver.url(),
                ["release.created", "deployment.succeeded"],
                service_id=scope.service_id,
                form="slack",
            )
        await publish(world, "release.created", own.service_id, {"release": {"version": "2.0.0"}})
        await publish(
            world,
            "deployment.succeeded",
            own.service_id,
            {"deployment": {"release_id": str(release_id), "environment_id": str(environment_id)}},
        )
        await publish(
            world, "release.created", team_only.service_id, {"release": {"version": "<b>&1"}}
        )
        received = await receiver.wait_for(3)
    bodies = sorted((r.json() for r in received), key=lambda b: b["text"])
    assert bodies == sorted(
        [
            {"text": f"Release {own.service_name} 2.0.0 was created", "channel": "#svc-own"},
            {
                "text": f"Deployment of {own.service_name} 2.0.0 to {environment} succeeded",
                "channel": "#svc-own",
            },
            {
                "text": f"Release {team_only.service_name} &lt;b&gt;&amp;1 was created",
                "channel": "#team-only",
            },
        ],
        key=lambda b: b["text"],
    )
    assert {r.headers["Content-Type"] for r in received} == {"application/json"}


async def delivered_by(process: RelmanProcess) -> float:
    """How many deliveries this process has sent with a 2xx answer."""
    metrics = await scrape_metrics(process)
    return metrics.get(("relman_webhook_attempts_total", frozenset({("outcome", "delivered")})), 0)


async def test_two_processes_deliver_200_events_exactly_once(world: World):
    assert len(world.processes) == 2
    before = [await delivered_by(p) for p in world.processes]
    mine = await new_service(world)
    # Slow enough that the 200 outlast a poll: both replicas claim from the same backlog.
    async with Receiver(delay_s=0.3) as receiver:
        hook, _ = await create_webhook(
            world, receiver.url(), ["deployment.created"], service_id=mine.service_id
        )
        async with world.owner.transaction():  # all committed at once: both replicas see them
            await world.owner.executemany(
                "INSERT INTO webhook_events (event_type, service_id, team_id, data)"
                " VALUES ('deployment.created', $1, $2, $3::jsonb)",
                [(mine.service_id, mine.team_id, json.dumps({"n": n})) for n in range(200)],
            )
        rows = await settled(world, hook, count=200, within_s=60)
        assert len(rows) == 200 and {r["status"] for r in rows} == {"delivered"}
        assert {r["attempts"] for r in rows} == {1}
        await receiver.wait_for(200)
    assert len(receiver.requests) == 200
    assert len({r.delivery for r in receiver.requests}) == 200
    assert sorted(r.json()["data"]["n"] for r in receiver.requests) == list(range(200))
    sent = [await delivered_by(p) - b for p, b in zip(world.processes, before, strict=True)]
    # Both took part (the counts may hold a success of an earlier test written after
    # `before` was read: successes are written in batches); the receiver above saw each
    # delivery once.
    assert min(sent) > 0, sent


async def test_a_delivery_cut_short_by_a_crash_is_resumed_after_a_restart(world: World):
    """Both replicas killed while one waits on the receiver: the delivery's lease runs out
    and a restarted process sends it again, under the same id, within 30 s."""
    mine = await new_service(world)
    gate = asyncio.Event()
    async with Receiver(gate=gate) as receiver:
        hook, _ = await create_webhook(
            world, receiver.url(), ["approval.approved"], service_id=mine.service_id
        )
        await publish(world, "approval.approved", mine.service_id, {"approval": {}})
        (cut,) = await receiver.wait_for(1)
        killed, world.processes[:] = list(world.processes), []
        for process in killed:
            process.process.kill()
            await process.wait(30)
        gate.set()
        restarted = time.monotonic()
        await world.start_processes()
        _, again = await receiver.wait_for(2, within_s=30)
        assert again.at - restarted < 30
        (row,) = await settled(world, hook)
    assert again.delivery == cut.delivery == str(row["id"])
    assert again.body == cut.body
    assert (row["status"], row["attempts"]) == ("delivered", 1)  # the cut one left no outcome
    assert len(receiver.requests) == 2


async def test_a_stopping_process_gives_back_the_deliveries_it_could_not_finish(world: World):
    """SIGTERM while a receiver holds a request: the process waits a little, then gives the
    delivery back, due at once, and the next process sends it without waiting for a lease."""
    mine = await new_service(world)
    gate = asyncio.Event()
    async with Receiver(gate=gate) as receiver:
        hook, _ = await create_webhook(
            world, receiver.url(), ["approval.rejected"], service_id=mine.service_id
        )
        await publish(world, "approval.rejected", mine.service_id, {"approval": {}})
        (held,) = await receiver.wait_for(1)
        stopping, world.processes[:] = list(world.processes), []
        for process in stopping:
            assert await process.stop() == 0, process.output
        (row,) = await deliveries(world, hook)
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert await world.owner.fetchval("SELECT $1 <= now()", row["next_attempt_at"])
        gate.set()
        restarted = time.monotonic()
        await world.start_processes(1)
        _, again = await receiver.wait_for(2, within_s=10)
        assert again.at - restarted < 10  # not the 20 s of a lease
        (row,) = await settled(world, hook)
        await world.start_processes(1)
    assert again.delivery == held.delivery == str(row["id"])
    assert (row["status"], row["attempts"]) == ("delivered", 1)
