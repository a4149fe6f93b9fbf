"""The webhook dispatcher (domain layer): a background task of every deploy_svc process that
turns outbox events into deliveries and POSTs them (DESIGN §12, "Webhooks").

Two steps, both safe with any number of replicas at once:

- **Fan-out** (`fan_out`, one transaction): claims undispatched `webhook_events`, oldest
  first, FANOUT_BATCH at a time, FOR UPDATE SKIP LOCKED; inserts one `webhook_deliveries`
  row per webhook (active or not: an inactive one's wait, unclaimed, so that once
  re-activated it gets what happened meanwhile) whose event types hold the event's and
  whose service or team
  (when set) is the event's (ON CONFLICT DO NOTHING on (webhook_id, event_id)); marks the
  events dispatched. The body is rendered there, once, and every attempt and redelivery
  sends those bytes: JSON `{"id", "type", "occurred_at" (RFC 3339, as the API writes
  timestamps), "data"}`, compact; SLACK `{"text": one line built from the data and the
  names it points at, "channel": the service's slack_channel, else its team's (left out
  when neither has one)}`, the text escaped as Slack asks (&, <, >).
- **Delivery** (`Dispatcher._round`, _CLAIM_DELIVERIES: one statement, committed before
  sending): takes due deliveries (pending, next_attempt_at passed, webhook active) FOR
  UPDATE SKIP LOCKED and moves their next_attempt_at LEASE_S ahead, so no other replica
  sends one at the same time, and one whose sender died is due again when its lease ends
  (another replica, or the process restarted, sends it within LEASE_S and a poll). A
  process stopped by a signal lets its sends finish for STOP_GRACE_S, then gives the
  leases of the rest back (due at once). No more are claimed than there are free slots
  (IN_FLIGHT sends at once), so a claimed delivery never waits for a slot while its
  lease runs. The lease doubles as a fence: an outcome is written only while the row
  still holds the lease this process took (`WHERE next_attempt_at = lease`); a redelivery
  or a replica that took over after the lease ended wins, and the late outcome is dropped.

Sending (`_attempt`): aiohttp, REQUEST_TIMEOUT_S in all, redirects not followed, no
proxies from the environment, no cookies kept; headers Content-Type application/json
(Slack's format too), User-Agent relman-webhooks, X-Relman-Event, X-Relman-Delivery (the
delivery id, the same on every attempt), X-Relman-Timestamp (unix seconds) and
X-Relman-Signature-256 `sha256=` + hex HMAC-SHA256(secret, timestamp + "." + body), the
secret opened with WEBHOOK_SECRET_KEY_FILE's key (deploy_svc.webhook_secrets). Where it
may connect (deploy_svc.webhook_addresses.refusal) is checked at every connection:
`CheckedResolver` drops the refused addresses a name resolves to (use_dns_cache off, so
every new connection resolves again) and refuses the name when none is left; aiohttp does
not ask the resolver about an IP literal (aiohttp.connector.TCPConnector._resolve_host
returns it as it is, checked in 3.14), so `literal_refusal` checks those before the
request. Nothing is connected to a refused address.

Outcomes (`Dispatcher._record`; counted in `relman_webhook_attempts_total{outcome}`):
- 2xx: DELIVERED (attempts + 1, delivered_at, last_status_code); the webhook's
  consecutive_failures back to 0. Successes are written together, up to DELIVERED_BATCH
  in one statement, DELIVERED_WAIT_S after the first at the latest (one commit per row
  of a busy audit stream cost the deploy path a fifth of its throughput).
- A network error, a timeout, 408, 429, 5xx: still PENDING, attempts + 1, the status or
  the error kept, next attempt after `backoff(attempts)`: RETRY_BASE_S doubling per
  attempt up to RETRY_MAX_S (1 h), drawn between half and the whole of it (jitter, so
  replicas and receivers coming back do not meet in step), never later than 24 h after
  the delivery was made; a failure once those 24 h have passed makes it DEAD.
- 3xx (redirects are not followed: a receiver that moved is updated through the API),
  the other 4xx, a refused address (`last_error` "refused: ..." with the reason), a URL
  aiohttp cannot use: FAILED at once, no retry (none of these mends itself in 24 h; a
  name that resolves to a refused address is an attack or a mistake to fix).
- Every failure adds one to the webhook's consecutive_failures; the one that reaches
  DEACTIVATE_AFTER (100) deactivates an active webhook in the same transaction, with its
  audit row (`webhook.deactivate`, by the dispatcher: no user) and a
  `webhook.deactivated` event (the webhook as the API shows it, never its secret).
  Pending deliveries of an inactive webhook wait, unclaimed, until UpdateWebhook
  re-activates it (those past their 24 h then get one attempt and die if it fails).

RedeliverWebhookDelivery needs nothing from here: a delivery the API sets PENDING and due
(next_attempt_at = now()) is sent as any other, one more attempt under the same id; an
attempt in flight then loses its fence and its outcome is dropped.

Order between deliveries is not kept (several are in flight at once, retries interleave):
receivers order by `occurred_at` and drop repeats by X-Relman-Delivery, since delivery is
at least once (an outcome lost with the database, or a sender stopped mid-request, sends
again once the lease ends).

Wake-ups: a poll every POLL_INTERVAL_S (an event's first attempt comes within a poll or
two of its commit), at once again while there is a backlog, and at the moment a retry
this process scheduled falls due (a local timer, so short backoffs are kept to). An idle
poll costs two statements that find nothing in the partial indexes of undispatched events
and pending deliveries, no transaction; outcomes are written WRITERS at a time, so a burst
of sends never takes the pool from the RPCs. The loop
never ends on an error (the database may be away): it logs the first failure of a streak
with its traceback, then one line a minute, and once more when it works again.

Settings.webhook_retry_base_s (WEBHOOK_RETRY_BASE_S): the first retry's delay, 1 s by
default and never more; tests set it lower (at least 0.01 s) so that a retry series takes
a second, not minutes.

`audit.logged` (deploy_svc.audit_stream.enqueue, a transaction of its own in each round
the probe finds sealed rows a subscribed webhook has not been handed): the audit trail
by sequence, a cursor per webhook, one delivery per row, sent as any other delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import audit_stream, convert, events
from deploy_svc.events import EventType, as_data
from deploy_svc.webhook_addresses import origin, refusal
from deploy_svc.webhook_secrets import SecretBox, SecretKeyError, load_box
from shared.framework.config import Network, Settings
from shared.framework.observability import counter
from shared.framework.protos import timestamp
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database
from shared.persistence.models import WebhookDeliveryStatus, WebhookFormat

log = logging.getLogger("relman.webhooks")

POLL_INTERVAL_S = 0.5
FANOUT_BATCH = 100
IN_FLIGHT = 64
DELIVERED_BATCH = 64  # successes written in one statement
DELIVERED_WAIT_S = 0.02  # at most this long after the first of them
# Outcomes written at once: the sends share the process's pool with the RPCs.
WRITERS = 4
# Longer than a request may take (REQUEST_TIMEOUT_S) plus writing its outcome.
LEASE_S = 20.0
REQUEST_TIMEOUT_S = 10.0
RETRY_BASE_S = 1.0
RETRY_MAX_S = 3600.0
GIVE_UP_AFTER_S = 24 * 3600.0
DEACTIVATE_AFTER = 100
# On stop: how long deliveries in flight may finish before they are cancelled (their
# leases are then given back, so another replica sends them at once).
STOP_GRACE_S = 3.0
LAST_ERROR_MAX = 500
ERROR_LOG_EVERY_S = 60.0
USER_AGENT = "relman-webhooks"

ATTEMPTS = counter(
    "relman_webhook_attempts_total",
    "Webhook delivery attempts, by outcome (delivered, retry, failed, dead).",
    ("outcome",),
)

# Who deactivates a webhook in the audit trail: relman itself, no user.
DISPATCHER = Actor(None, "webhook-dispatcher", None, None, "relman-deploy-svc")


def backoff(attempts: int, base_s: float = RETRY_BASE_S) -> float:
    """Seconds before the next attempt of a delivery tried `attempts` times: base doubling
    per attempt up to RETRY_MAX_S, drawn between half and the whole of it."""
    ceiling = min(base_s * 2 ** min(max(attempts - 1, 0), 32), RETRY_MAX_S)
    return random.uniform(ceiling / 2, ceiling)


def retryable(status_code: int) -> bool:
    """Whether an HTTP answer other than 2xx is worth another attempt."""
    return status_code in (408, 429) or status_code >= 500


# -- where it may connect -------------------------------------------------------------------


class AddressRefused(OSError):
    """Every address of the receiver is one relman must not send to."""


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address ([brackets] and a %zone dropped), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def literal_refusal(url: str, allowed: tuple[Network, ...]) -> str | None:
    """Why the IP literal `url` names may not be sent to (None: allowed, or a name, which
    CheckedResolver checks). aiohttp never asks the resolver about a host it takes for a
    literal (one with a colon, or only digits and dots): such a host that is not a
    canonical address (2852039166, 0251.0376.0251.0376, a trailing dot), which the
    system's resolver would still map to one, is refused here whatever aiohttp makes of it.
    """
    try:  # the host as aiohttp's URL parser reads it (IDNA dots and all), not urlsplit's
        host = yarl.URL(url).host
    except ValueError:
        return None  # aiohttp refuses the URL itself
    if host is None:
        return None
    address = _address(host)
    if address is not None:
        return refusal(address, allowed)
    if ":" in host or host.replace(".", "").isdigit():
        return f"{host} is not a canonical IP address"
    return None


class CheckedResolver(AbstractResolver):
    """aiohttp's default resolver, with the addresses relman must not send to left out;
    a name left with none is refused (AddressRefused) and nothing is connected."""

    def __init__(self, allowed: tuple[Network, ...]) -> None:
        self.allowed = allowed
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        kept, reasons = [], []
        for result in results:
            address = _address(result["host"])
            reason = "not an IP address" if address is None else refusal(address, self.allowed)
            if reason is None:
                kept.append(result)
            else:
                reasons.append(reason)
        if not kept:
            raise AddressRefused(
                f"refused: {host} resolves only to refused addresses ({'; '.join(reasons)})"
            )
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def http_session(allowed: tuple[Network, ...]) -> aiohttp.ClientSession:
    """The dispatcher's HTTP client: every new connection resolved and checked again."""
    connector = aiohttp.TCPConnector(
        resolver=CheckedResolver(allowed), use_dns_cache=False, limit=IN_FLIGHT
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
    )


# -- fan-out --------------------------------------------------------------------------------

# The idle poll's one probe: events to fan out; sealed audit rows a webhook taking
# `audit.logged` has not been handed (deploy_svc.audit_stream).
_PROBE = """
    SELECT EXISTS (SELECT FROM webhook_events WHERE NOT dispatched) AS undispatched,
           EXISTS (
               SELECT FROM webhooks w
               WHERE w.active AND 'audit.logged' = ANY (w.event_types)
                 AND coalesce(w.audit_cursor, 0) < coalesce(
                     (SELECT last_sequence FROM audit_seals ORDER BY seal_number DESC LIMIT 1),
                     0)
           ) AS audit_due
"""

_CLAIM_EVENTS = text("""
    WITH claimed AS (
        SELECT id, event_type, occurred_at, service_id, team_id, data
        FROM webhook_events WHERE NOT dispatched
        ORDER BY occurred_at LIMIT :limit
        FOR UPDATE SKIP LOCKED)
    SELECT c.id, c.event_type, c.occurred_at, c.service_id, c.team_id, c.data::text AS data,
           s.webhook_ids, s.formats
    FROM claimed c, LATERAL (
        SELECT array_agg(w.id) AS webhook_ids, array_agg(w.format) AS formats
        FROM webhooks w
        WHERE c.event_type = ANY (w.event_types)
          AND (w.service_id IS NULL OR w.service_id = c.service_id)
          AND (w.team_id IS NULL OR w.team_id = c.team_id)) s
    ORDER BY c.occurred_at
""")

_INSERT_DELIVERIES = text("""
    INSERT INTO webhook_deliveries (webhook_id, event_id, event_type, body)
    SELECT * FROM unnest(CAST(:webhook_ids AS uuid[]), CAST(:event_ids AS uuid[]),
                         CAST(:event_types AS text[]), CAST(:bodies AS bytea[]))
    ON CONFLICT (webhook_id, event_id) DO NOTHING
""")

_MARK_DISPATCHED = text(
    "UPDATE webhook_events SET dispatched = true WHERE id = ANY (CAST(:ids AS uuid[]))"
)

# The names a Slack line points at, in one round trip.
_SLACK_NAMES = text("""
    SELECT 'service' AS kind, s.id, s.name,
           coalesce(nullif(s.slack_channel, ''), nullif(t.slack_channel, '')) AS channel
    FROM services s JOIN teams t ON t.id = s.team_id WHERE s.id = ANY (CAST(:services AS uuid[]))
    UNION ALL
    SELECT 'team', id, name, nullif(slack_channel, '') FROM teams
    WHERE id = ANY (CAST(:teams AS uuid[]))
    UNION ALL
    SELECT 'release', id, version, NULL FROM releases WHERE id = ANY (CAST(:releases AS uuid[]))
    UNION ALL
    SELECT 'environment', id, name, NULL FROM environments
    WHERE id = ANY (CAST(:environments AS uuid[]))
""")


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_body(event_id: uuid.UUID, event_type: str, occurred_at: datetime, data: Any) -> bytes:
    return compact(
        {
            "id": str(event_id),
            "type": event_type,
            "occurred_at": timestamp(occurred_at).ToJsonString(),
            "data": data,
        }
    )


_SLACK_OUTCOME = {
    "release.created": "was created",
    "deployment.created": "was created",
    "deployment.awaiting_approval": "is awaiting approval",
    "deployment.succeeded": "succeeded",
    "deployment.failed": "failed",
    "deployment.cancelled": "was cancelled",
    "deployment.rejected": "was rejected",
    "approval.approved": "was approved",
    "approval.rejected": "was rejected by a reviewer",
    "rollback.started": "started",
    "rollback.completed": "completed",
    "rollback.failed": "failed",
    "freeze.override": "went ahead inside a freeze window (admin override)",
    "policy.updated": "was updated",
    "freeze_window.created": "was created",
    "freeze_window.deleted": "was deleted",
    "webhook.deactivated": f"was deactivated after {DEACTIVATE_AFTER} failed attempts in a row",
}


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _resource(data: Any, key: str) -> dict:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


@dataclass
class SlackNames:
    """Names and channels by id, for the Slack lines of a fan-out batch."""

    services: dict[uuid.UUID, tuple[str, str | None]]
    teams: dict[uuid.UUID, tuple[str, str | None]]
    releases: dict[uuid.UUID, str]
    environments: dict[uuid.UUID, str]

    @classmethod
    async def load(cls, session: AsyncSession, events: Iterable[Any]) -> SlackNames:
        ids: dict[str, set[uuid.UUID]] = {
            "services": set(), "teams": set(), "releases": set(), "environments": set()
        }  # fmt: skip
        for event in events:
            data = event.data
            if event.service_id:
                ids["services"].add(event.service_id)
            if event.team_id:
                ids["teams"].add(event.team_id)
            for key in ("deployment", "policy", "environment_policy", "freeze_window"):
                ids["environments"].add(_uuid(_resource(data, key).get("environment_id")))
            ids["releases"].add(_uuid(_resource(data, "deployment").get("release_id")))
        rows = await session.execute(
            _SLACK_NAMES, {k: [i for i in v if i is not None] for k, v in ids.items()}
        )
        names = cls({}, {}, {}, {})
        for kind, row_id, name, channel in rows:
            if kind == "service":
                names.services[row_id] = (name, channel)
            elif kind == "team":
                names.teams[row_id] = (name, channel)
            elif kind == "release":
                names.releases[row_id] = name
            else:
                names.environments[row_id] = name
        return names


def slack_line(event_type: str, data: Any, service: str | None, names: SlackNames) -> str:
    """One line a person reads in a channel: what happened, to what."""
    deployment, release = _resource(data, "deployment"), _resource(data, "release")
    rollback, window = _resource(data, "rollback"), _resource(data, "freeze_window")
    policy = _resource(data, "policy") or _resource(data, "environment_policy")
    webhook = _resource(data, "webhook")
    of_service = f" of {service}" if service else ""
    if deployment:
        version = names.releases.get(_uuid(deployment.get("release_id")))
        environment = names.environments.get(_uuid(deployment.get("environment_id")))
        subject = "Deployment" + (f" of {service} {version}" if service and version else of_service)
        subject += f" to {environment}" if environment else ""
        if not version and deployment.get("resource_name"):
            subject += f" ({deployment['resource_name']})"
    elif release:
        subject = " ".join(filter(None, ("Release", service, str(release.get("version", "")))))
    elif rollback:
        reason = rollback.get("reason")
        subject = f"Rollback{of_service}" + (f" ({reason})" if reason else "")
    elif window:
        reason = window.get("reason")
        subject = f"Freeze window{' for ' + service if service else ''}"
        subject += f" ({reason})" if reason else ""
    elif policy:
        environment = names.environments.get(_uuid(policy.get("environment_id")))
        subject = f"The policy of {environment}" if environment else "An environment policy"
    elif webhook:
        subject = f"Webhook {webhook.get('url', '')}".rstrip()
    else:
        subject = f"relman event {event_type}{' for ' + service if service else ''}"
    outcome = _SLACK_OUTCOME.get(event_type, f"({event_type})")
    return audit_stream.slack_escape(f"{subject} {outcome}")


def slack_body(event: Any, names: SlackNames) -> bytes:
    service = names.services.get(event.service_id) if event.service_id else None
    team = names.teams.get(event.team_id) if event.team_id else None
    channel = service[1] if service else None
    channel = channel or (team[1] if team else None)
    try:
        line = slack_line(event.event_type, event.data, service and service[0], names)
    except Exception:  # data of a shape not foreseen: a plain line, never a stuck outbox
        log.warning("event %s: no Slack line from its data", event.id, exc_info=True)
        line = audit_stream.slack_escape(f"relman event {event.event_type}")
    body = {"text": line}
    if channel:
        body["channel"] = channel
    return compact(body)


@dataclass
class _Event:
    id: uuid.UUID
    event_type: str
    occurred_at: datetime
    service_id: uuid.UUID | None
    team_id: uuid.UUID | None
    data: Any
    webhook_ids: list[uuid.UUID]
    formats: list[str]


async def fan_out(session: AsyncSession, limit: int = FANOUT_BATCH) -> tuple[int, int]:
    """Turns up to `limit` undispatched events into deliveries and marks them dispatched,
    in the session's transaction; returns (events, deliveries inserted)."""
    events = [
        _Event(
            row.id, row.event_type, row.occurred_at, row.service_id, row.team_id,
            json.loads(row.data), list(row.webhook_ids or ()), list(row.formats or ()),
        )
        for row in await session.execute(_CLAIM_EVENTS, {"limit": limit})
    ]  # fmt: skip
    if not events:
        return 0, 0
    slack = [e for e in events if WebhookFormat.SLACK.value in e.formats]
    names = await SlackNames.load(session, slack) if slack else None
    webhook_ids, event_ids, event_types, bodies = [], [], [], []
    for event in events:
        rendered: dict[str, bytes] = {}
        for webhook_id, form in zip(event.webhook_ids, event.formats, strict=True):
            if form not in rendered:
                rendered[form] = (
                    slack_body(event, names)
                    if form == WebhookFormat.SLACK.value
                    else json_body(event.id, event.event_type, event.occurred_at, event.data)
                )
            webhook_ids.append(webhook_id)
            event_ids.append(event.id)
            event_types.append(event.event_type)
            bodies.append(rendered[form])
    inserted = 0
    if webhook_ids:
        result = await session.execute(
            _INSERT_DELIVERIES,
            {
                "webhook_ids": webhook_ids,
                "event_ids": event_ids,
                "event_types": event_types,
                "bodies": bodies,
            },
        )
        inserted = result.rowcount
    await session.execute(_MARK_DISPATCHED, {"ids": [e.id for e in events]})
    return len(events), inserted


# -- delivery -------------------------------------------------------------------------------

_CLAIM_DELIVERIES = """
    WITH due AS (
        SELECT d.id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
        WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND w.active
        ORDER BY d.next_attempt_at LIMIT $1
        FOR UPDATE OF d SKIP LOCKED)
    UPDATE webhook_deliveries d
    SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
    FROM due, webhooks w
    WHERE d.id = due.id AND w.id = d.webhook_id
    RETURNING d.id, d.webhook_id, d.event_type, d.body, d.attempts, d.next_attempt_at AS lease,
              w.url, w.secret_encrypted
"""

# The deliveries that succeeded since the last write, in one statement (one commit for up
# to DELIVERED_BATCH of them, not one each: a busy stream of audit rows paid a commit per
# row), each still under the lease it was sent under.
_DELIVERED = """
    WITH sent AS (
        SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::int[]) AS o (id, lease, code)
    ), delivered AS (
        UPDATE webhook_deliveries d
        SET status = 'delivered', attempts = d.attempts + 1, last_status_code = sent.code,
            last_error = NULL, delivered_at = now(), next_attempt_at = now(), updated_at = now()
        FROM sent
        WHERE d.id = sent.id AND d.status = 'pending' AND d.next_attempt_at = sent.lease
        RETURNING d.webhook_id)
    UPDATE webhooks w SET consecutive_failures = 0
    WHERE w.id IN (SELECT webhook_id FROM delivered) AND w.consecutive_failures <> 0
"""

_LOCK_WEBHOOK = text("SELECT 1 FROM webhooks WHERE id = :id FOR NO KEY UPDATE")

_FAILED = text(f"""
    UPDATE webhook_deliveries SET
        attempts = attempts + 1,
        last_status_code = CAST(:status_code AS integer),
        last_error = CAST(:error AS text),
        status = CASE
            WHEN NOT CAST(:retry AS boolean) THEN '{WebhookDeliveryStatus.FAILED.value}'
            WHEN created_at + make_interval(secs => :give_up_s) <= now()
                THEN '{WebhookDeliveryStatus.DEAD.value}'
            ELSE '{WebhookDeliveryStatus.PENDING.value}' END,
        next_attempt_at = CASE
            WHEN CAST(:retry AS boolean) AND created_at + make_interval(secs => :give_up_s) > now()
                THEN least(now() + make_interval(secs => CAST(:delay_s AS double precision)),
                           created_at + make_interval(secs => :give_up_s))
            ELSE now() END,
        updated_at = now()
    WHERE id = :id AND status = 'pending' AND next_attempt_at = :lease
    RETURNING webhook_id, status, next_attempt_at
""")

_COUNT_FAILURE = text(
    "UPDATE webhooks SET consecutive_failures = consecutive_failures + 1 WHERE id = :id"
    " RETURNING active, consecutive_failures"
)

_DEACTIVATE = text("""
    UPDATE webhooks SET active = false, updated_at = now() WHERE id = :id
    RETURNING id, url, event_types, service_id, team_id, format, active, created_by,
              consecutive_failures, created_at, updated_at, version
""")

_RELEASE_LEASES = """
    UPDATE webhook_deliveries SET next_attempt_at = now(), updated_at = now()
    FROM unnest($1::uuid[], $2::timestamptz[]) AS l(id, lease)
    WHERE webhook_deliveries.id = l.id AND status = 'pending' AND next_attempt_at = l.lease
"""


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: delivered, or a failure to retry or not."""

    delivered: bool
    retry: bool = False
    status_code: int | None = None
    error: str | None = None


def _error_text(error: BaseException) -> str:
    words = str(error) or type(error).__name__
    return words[:LAST_ERROR_MAX]


def _refusal_of(error: BaseException) -> AddressRefused | None:
    """The AddressRefused behind an aiohttp connection error, if that is what it was."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return seen
        if isinstance(seen, aiohttp.ClientConnectorError) and isinstance(
            seen.os_error, AddressRefused
        ):
            return seen.os_error
        seen = seen.__cause__
    return None


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """X-Relman-Signature-256: sha256= + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Dispatcher:
    """One process's dispatcher: the poll loop, the sends in flight, the retry timers."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.base_s = settings.webhook_retry_base_s
        self.allowed = settings.webhook_allowed_networks
        self.http: aiohttp.ClientSession | None = None
        self._box: SecretBox | None = None
        # Sends in flight: task -> (delivery id, the lease it holds).
        self.in_flight: dict[asyncio.Task, tuple[uuid.UUID, datetime]] = {}
        self._timers: list[float] = []  # loop times at which a retry falls due (a heap)
        self._stirred = asyncio.Event()
        self._writers = asyncio.Semaphore(WRITERS)
        self._waiting_for_slot = False
        self._failing_since: float | None = None
        self._last_logged = 0.0
        # Successes waiting to be written together (_record_delivered).
        self._delivered: list[tuple[uuid.UUID, datetime, int, asyncio.Future]] = []
        self._delivered_timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task] = set()
        self._secrets: dict[bytes, str] = {}  # sealed -> opened

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.http = http_session(self.allowed)
        try:
            while True:
                busy = False
                try:
                    busy = await self._round()
                    self._recovered()
                except Exception:  # the database may be away: the next round tries again
                    self._failed("webhook dispatch failed")
                await self._nap(busy)
        finally:
            await self._stop_sends()
            await self.http.close()

    async def _round(self) -> bool:
        """Fans out a batch of events if there are any, then claims and starts what is due;
        True when there may be more to do at once (a full batch either way)."""
        async with self.database.autocommit_connection(deadline_s=10) as connection:
            probe = await connection.fetchrow(_PROBE)
        fanned = streamed = 0
        if probe["undispatched"]:
            async with self.database.transaction(deadline_s=30) as session:
                fanned, _ = await fan_out(session)
        if probe["audit_due"]:
            async with self.database.transaction(deadline_s=30) as session:
                streamed = await audit_stream.enqueue(session)
        free = IN_FLIGHT - len(self.in_flight)
        claimed = []
        if free > 0:
            async with self.database.autocommit_connection(deadline_s=10) as connection:
                claimed = await connection.fetch(_CLAIM_DELIVERIES, free, LEASE_S)
        for row in claimed:
            task = asyncio.create_task(self._deliver(row))
            self.in_flight[task] = (row["id"], row["lease"])
            task.add_done_callback(self._sent)
        return (
            fanned == FANOUT_BATCH
            or streamed > 0
            or (free > 0 and len(claimed) == free)
            or free <= 0
        )

    def _sent(self, task: asyncio.Task) -> None:
        self.in_flight.pop(task, None)
        if self._waiting_for_slot:
            self._stirred.set()

    async def _nap(self, busy: bool) -> None:
        """Waits for the next round: a free slot when busy; else the poll interval, cut
        short by a retry of this process falling due."""
        loop = asyncio.get_running_loop()
        if busy:
            if len(self.in_flight) < IN_FLIGHT:
                await asyncio.sleep(0)
                return
            self._waiting_for_slot = True
            self._stirred.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._stirred.wait()
            self._waiting_for_slot = False
            return
        deadline = loop.time() + POLL_INTERVAL_S
        while True:
            until = min(deadline, self._timers[0]) if self._timers else deadline
            if until <= loop.time():
                break
            self._stirred.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - loop.time()):
                    await self._stirred.wait()
        while self._timers and self._timers[0] <= loop.time():
            heapq.heappop(self._timers)

    def _wake_at(self, delay_s: float) -> None:
        moment = asyncio.get_running_loop().time() + delay_s
        if not self._timers or moment < self._timers[0]:
            self._stirred.set()
        heapq.heappush(self._timers, moment)

    def _failed(self, what: str) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._last_logged = now
            log.warning(what, exc_info=True)
        elif now - self._last_logged >= ERROR_LOG_EVERY_S:
            self._last_logged = now
            log.warning("%s (failing for %.0f s)", what, now - self._failing_since)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info(
                "webhook dispatch works again after %.0f s", time.monotonic() - self._failing_since
            )
            self._failing_since = None

    async def _stop_sends(self) -> None:
        """On stop: lets the sends in flight finish for STOP_GRACE_S, cancels the rest and
        gives their leases back (best effort), so another replica sends them at once."""
        if not self.in_flight:
            return
        await asyncio.wait(list(self.in_flight), timeout=STOP_GRACE_S)
        self._write_delivered()  # the successes still waiting for a batch
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=STOP_GRACE_S)
        left = dict(self.in_flight)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if not left:
            return
        ids, leases = zip(*left.values(), strict=True)
        try:
            async with self.database.autocommit_connection(deadline_s=2) as connection:
                await connection.execute(_RELEASE_LEASES, list(ids), list(leases))
        except Exception:
            log.warning("could not give back %d webhook delivery lease(s)", len(ids))

    # One delivery -----------------------------------------------------------------------

    async def _deliver(self, row) -> None:
        try:
            try:
                outcome = await self._attempt(row)
            except SecretKeyError as error:
                log.error("webhook delivery %s not sent: %s", row["id"], error)
                return
            if outcome.delivered:
                await self._record_delivered(row, outcome.status_code)
                return
            async with self._writers:
                await self._record(row, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:  # its lease ends and it is tried again
            log.warning("webhook delivery %s: recording its outcome failed", row["id"])

    def _secret(self, sealed: bytes) -> str:
        """A webhook's secret, opened once per process (not on every attempt)."""
        if (secret := self._secrets.get(sealed)) is None:
            secret = self._secrets[sealed] = self._secret_box().open(sealed)
        return secret

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            self._box = load_box(self.settings.webhook_secret_key_file)
        return self._box

    async def _attempt(self, row) -> Outcome:
        url, body = row["url"], bytes(row["body"])
        reason = literal_refusal(url, self.allowed)
        if reason is not None:
            return Outcome(False, error=f"refused: {reason}")
        # A secret this process cannot open (its key file is not the one it was sealed
        # with) is this replica's fault, not the receiver's: SecretKeyError goes up to
        # _deliver, nothing is recorded, and the lease ends for a replica that can.
        secret = self._secret(bytes(row["secret_encrypted"]))
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Relman-Event": row["event_type"],
            "X-Relman-Delivery": str(row["id"]),
            "X-Relman-Timestamp": timestamp,
            "X-Relman-Signature-256": signature(secret, timestamp, body),
        }
        assert self.http is not None
        try:
            async with self.http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                code = response.status
        except TimeoutError:
            return Outcome(False, retry=True, error=f"no answer within {REQUEST_TIMEOUT_S:g} s")
        except (aiohttp.InvalidURL, ValueError) as error:
            return Outcome(False, error=f"unusable URL: {_error_text(error)}")
        except aiohttp.ClientError as error:
            refused = _refusal_of(error)
            if refused is not None:
                return Outcome(False, error=_error_text(refused))
            return Outcome(False, retry=True, error=_error_text(error))
        except OSError as error:  # what aiohttp lets through (an SSL setup error...)
            return Outcome(False, retry=True, error=_error_text(error))
        except Exception as error:  # unforeseen: retried, and logged for whoever reads why
            log.warning("webhook delivery %s: unexpected failure", row["id"], exc_info=True)
            return Outcome(False, retry=True, error=_error_text(error))
        if 200 <= code < 300:
            return Outcome(True, status_code=code)
        words = f"HTTP {code}" + (" (redirects are not followed)" if 300 <= code < 400 else "")
        return Outcome(False, retry=retryable(code), status_code=code, error=words)

    async def _record_delivered(self, row, code: int) -> None:
        """Waits until the success is written with others (DELIVERED_BATCH at once, or
        after DELIVERED_WAIT_S): the send stays in flight until then."""
        written = asyncio.get_running_loop().create_future()
        self._delivered.append((row["id"], row["lease"], code, written))
        if len(self._delivered) >= DELIVERED_BATCH:
            self._write_delivered()
        elif self._delivered_timer is None:
            self._delivered_timer = asyncio.get_running_loop().call_later(
                DELIVERED_WAIT_S, self._write_delivered
            )
        await written

    def _write_delivered(self) -> None:
        if self._delivered_timer is not None:
            self._delivered_timer.cancel()
            self._delivered_timer = None
        batch, self._delivered = self._delivered, []
        if batch:
            task = asyncio.create_task(self._write_batch(batch))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_batch(self, batch) -> None:
        try:
            async with self._writers:
                async with self.database.autocommit_connection(deadline_s=10) as connection:
                    ids, leases, codes, _ = zip(*batch, strict=True)
                    await connection.execute(_DELIVERED, list(ids), list(leases), list(codes))
        except Exception as error:  # their leases end and they are sent again
            for *_, written in batch:
                if not written.done():
                    written.set_exception(error)
            return
        ATTEMPTS.labels("delivered").inc(len(batch))
        for *_, written in batch:
            if not written.done():
                written.set_result(None)

    async def _record(self, row, outcome: Outcome) -> None:
        delay_s = backoff(row["attempts"] + 1, self.base_s)
        async with self.database.transaction(deadline_s=10) as session:
            # The webhook first, then its delivery: DeleteWebhook's order (its row, then
            # the deliveries its key cascades to), so the two never wait on each other.
            await session.execute(_LOCK_WEBHOOK, {"id": row["webhook_id"]})
            recorded = (
                await session.execute(
                    _FAILED,
                    {
                        "id": row["id"],
                        "lease": row["lease"],
                        "status_code": outcome.status_code,
                        "error": outcome.error,
                        "retry": outcome.retry,
                        "delay_s": delay_s,
                        "give_up_s": GIVE_UP_AFTER_S,
                    },
                )
            ).one_or_none()
            if recorded is None:  # redelivered, or another replica took over: theirs counts
                return
            await count_failure(session, recorded.webhook_id, outcome)
        status = recorded.status
        ATTEMPTS.labels("retry" if status == WebhookDeliveryStatus.PENDING.value else status).inc()
        if status == WebhookDeliveryStatus.PENDING.value:
            self._wake_at(delay_s)


async def count_failure(session: AsyncSession, webhook_id: uuid.UUID, outcome: Outcome) -> None:
    """One more failure in a row for the webhook; the DEACTIVATE_AFTERth deactivates it, with
    its audit row and its webhook.deactivated event, in the session's transaction."""
    counted = (await session.execute(_COUNT_FAILURE, {"id": webhook_id})).one_or_none()
    if counted is None or not counted.active or counted.consecutive_failures < DEACTIVATE_AFTER:
        return
    webhook = (await session.execute(_DEACTIVATE, {"id": webhook_id})).one()
    await audit_log.append(
        session,
        DISPATCHER,
        "webhook.deactivate",
        "webhook",
        webhook.id,
        {
            "url": origin(webhook.url),
            "consecutive_failures": webhook.consecutive_failures,
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
        },
    )
    await events.publish(
        session,
        EventType.WEBHOOK_DEACTIVATED,
        webhook.service_id,
        webhook_data(webhook),
        team_id=webhook.team_id,
    )
    log.warning(
        "webhook %s (%s) deactivated after %d failed attempts in a row",
        webhook.id,
        origin(webhook.url),
        webhook.consecutive_failures,
    )


def webhook_data(webhook) -> dict[str, Any]:
    """{"webhook": ...} as WebhookService shows it, but its URL cut to its origin (the
    event may go to a Slack channel or a SIEM; a URL's path is often a credential), and
    never its secret."""
    data = as_data(webhook=convert.webhook(webhook))
    data["webhook"]["url"] = origin(webhook.url)
    return data


def start(database: Database, settings: Settings):
    """Starts the dispatcher; returns the coroutine function that stops it."""
    task = asyncio.create_task(Dispatcher(database, settings).run())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
