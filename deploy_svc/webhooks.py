"""Webhooks (domain layer): WebhookService's use cases, the subscriptions the dispatcher
(deploy_svc.dispatcher) delivers to.

Who: the permission is `webhooks.admin` (leads and admins, shared.identity.auth), and
any of them manages any webhook, whoever made it: a webhook is the organisation's
integration, not its maker's, and it keeps running when its maker loses the role (its
owner, `created_by`, is shown by ListWebhooks).

What is checked when a webhook is made or its URL changed: where it may send
(deploy_svc.webhook_addresses, after resolving its host; the dispatcher checks again at
every connection), its event types (EVENT_TYPES, each once, at most MAX_EVENT_TYPES), at
most one scope (a service or a team, not both: a service's events are its team's too),
which must exist. A SLACK webhook needs a channel: its service's `slack_channel`, else
that service's team's, or its team's: without a scope it is INVALID_ARGUMENT (on
`format`), with a scope that gives no channel FAILED_PRECONDITION NO_SLACK_CHANNEL (set
one on the service or team, then retry). Format and scope never change: make another.

The secret (webhook_secrets.new_secret) is answered once, by the first CreateWebhook; it
is stored sealed with the key file's SecretBox and never written to the audit trail. Nor
is a URL's path or query, which often is a credential itself (a Slack incoming webhook's
URL): audit rows record where a webhook sends as scheme://host[:port].

`audit.logged` is read from the trail by sequence, with a cursor per webhook: a webhook
that takes it starts at the trail's last sequence when it is made (or when an update adds
the type), so it streams what comes after; without the type its cursor is NULL.

RedeliverWebhookDelivery sends a delivery again under the same id with the same body:
it becomes pending, due now, whatever its status (a delivered one too), its attempts
counting on and its delivered_at kept. A delivery of an inactive webhook is refused
(FAILED_PRECONDITION WEBHOOK_INACTIVE): the dispatcher sends nothing for it, so
re-activate it first (UpdateWebhook `active`, which also zeroes its failures in a row).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from deploy_svc import webhook_addresses
from deploy_svc.events import EventType
from deploy_svc.webhook_secrets import SecretBox, new_secret
from shared.framework.config import Network
from shared.framework.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, check_etag, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import (
    Role,
    Service,
    Team,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookFormat,
)
from shared.persistence.pagination import decode_token, encode_token, page_size

# The event types a webhook may take, DESIGN §12's vocabulary (deploy_svc.events names
# them for the outbox): the one list creates, updates and the dispatcher check against.
EVENT_TYPES: tuple[str, ...] = tuple(event.value for event in EventType)
AUDIT_LOGGED = EventType.AUDIT_LOGGED.value
MAX_EVENT_TYPES = 50  # the database's ck_webhooks_event_types

# The audit trail's last sequence handed out (0 before the first), as the sealer reads it
# (audit_svc.seal_store): the services' role may read the sequence, not set it.
_LAST_AUDIT_SEQUENCE = text(
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM audit_logs_sequence"
)


# -- field checks ---------------------------------------------------------------------------


# audit.logged is the whole trail, not one service's or team's: a scoped webhook (a
# team's Slack channel) must not receive the organisation's audit rows.
_AUDIT_UNSCOPED = (
    "audit.logged is the whole audit trail: only for a webhook without service_id or team_id"
)


def check_event_types(values: Sequence[str], field: str = "event_types") -> list[str]:
    """The event types as sent: at least one, at most MAX_EVENT_TYPES, each of
    EVENT_TYPES and listed once; else INVALID_ARGUMENT naming the entry."""
    if not values:
        raise InvalidArgument.field(field, "must name at least one event type")
    if len(values) > MAX_EVENT_TYPES:
        raise InvalidArgument.field(field, f"at most {MAX_EVENT_TYPES} event types")
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value not in EVENT_TYPES:
            raise InvalidArgument.field(
                f"{field}[{i}]",
                f"{value[:64]!r} is not an event type (one of {', '.join(EVENT_TYPES)})",
            )
        if value in seen:
            raise InvalidArgument.field(f"{field}[{i}]", f"{value!r} is listed twice")
        seen.add(value)
    return list(values)


async def check_url(url: str, allowed: tuple[Network, ...], field: str = "url") -> str:
    """webhook_addresses.check_url, its violation naming `field` (an update's
    `webhook.url`)."""
    try:
        await webhook_addresses.check_url(url, allowed)
    except InvalidArgument as refusal:
        if field == "url":
            raise
        raise InvalidArgument.field(field, refusal.field_violations["url"]) from None
    return url


def _described(row: Webhook) -> dict:
    """A webhook as its audit rows record it: no secret, no URL path."""
    return {
        "url": webhook_addresses.origin(row.url),
        "event_types": list(row.event_types),
        "service_id": str(row.service_id) if row.service_id else None,
        "team_id": str(row.team_id) if row.team_id else None,
        "format": row.format,
        "active": row.active,
    }


async def _last_audit_sequence(session: AsyncSession) -> int:
    return await session.scalar(_LAST_AUDIT_SEQUENCE)


# -- creating -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookRequest:
    """A CreateWebhook request as the transport read it (`format` None when unset)."""

    url: str
    event_types: Sequence[str]
    service_id: uuid.UUID | None
    team_id: uuid.UUID | None
    format: str | None
    key: RequestKey | None


@dataclass(frozen=True)
class Created:
    """The webhook, and its secret: "" when a retried request_id answers with it."""

    webhook: Webhook
    secret: str


def _check_form(request: WebhookRequest) -> tuple[list[str], WebhookFormat]:
    webhook_addresses.check_shape(request.url)  # before the slower resolving, and cheaply
    event_types = check_event_types(request.event_types)
    if request.format is None:
        raise InvalidArgument.field("format", "is required: WEBHOOK_FORMAT_JSON or _SLACK")
    webhook_format = WebhookFormat(request.format)
    if request.service_id is not None and request.team_id is not None:
        raise InvalidArgument.field(
            "team_id",
            "give service_id or team_id, not both (a service's events are its team's too)",
        )
    if AUDIT_LOGGED in event_types and (
        request.service_id is not None or request.team_id is not None
    ):
        raise InvalidArgument.field("event_types", _AUDIT_UNSCOPED)
    if (
        webhook_format == WebhookFormat.SLACK
        and request.service_id is None
        and request.team_id is None
    ):
        raise InvalidArgument.field(
            "format",
            "WEBHOOK_FORMAT_SLACK needs a service_id or team_id: its messages go to their"
            " slack_channel",
        )
    return event_types, webhook_format


async def _check_slack_channel(
    session: AsyncSession, service: Service | None, team: Team | None
) -> None:
    """A Slack webhook's channel: the service's, else its team's; or the team's."""
    if service is not None:
        if service.slack_channel:
            return
        team = await load(session, Team, service.team_id)
    if team is not None and team.slack_channel:
        return
    scope = {"service_id": str(service.id)} if service is not None else {"team_id": str(team.id)}
    raise FailedPrecondition(
        "a Slack webhook posts to its service's slack_channel, else its team's: neither is"
        " set; set one, then retry",
        reason="NO_SLACK_CHANNEL",
        metadata=scope,
    )


def _check_may_stream_the_trail(actor: Actor) -> None:
    """A webhook taking audit.logged is where the audit trail leaves for a SIEM: only an
    admin makes, changes or deletes one, so that a lead cannot point it elsewhere or
    switch it off (and the trail stop reaching its auditors) on their own."""
    if actor.role != Role.ADMIN:
        raise PermissionDenied(
            "only an admin may make, change or delete a webhook taking audit.logged",
            reason="AUDIT_STREAM_ADMIN_ONLY",
        )


async def create_webhook(
    database: Database,
    actor: Actor,
    box: SecretBox,
    allowed_networks: tuple[Network, ...],
    request: WebhookRequest,
) -> Created:
    """Makes a webhook and its secret (a retried request_id answers with the webhook it
    made, and no secret). The URL is resolved before the transaction opens."""
    event_types, webhook_format = _check_form(request)
    if AUDIT_LOGGED in event_types:
        _check_may_stream_the_trail(actor)
    await check_url(request.url, allowed_networks)
    async with database.transaction() as session:
        if earlier := await replay(session, request.key, Webhook):
            return Created(earlier, "")
        service = team = None
        if request.service_id is not None:
            service = await load(session, Service, request.service_id)
        if request.team_id is not None:
            team = await load(session, Team, request.team_id)
        if webhook_format == WebhookFormat.SLACK:
            await _check_slack_channel(session, service, team)
        cursor = await _last_audit_sequence(session) if AUDIT_LOGGED in event_types else None
        secret = new_secret()
        webhook = Webhook(
            url=request.url,
            event_types=event_types,
            service_id=request.service_id,
            team_id=request.team_id,
            format=webhook_format.value,
            secret_encrypted=box.seal(secret),
            audit_cursor=cursor,
            created_by=actor.user_id,
        )
        session.add(webhook)
        await session.flush()
        await session.refresh(webhook)
        await audit_log.append(
            session, actor, "webhook.create", "webhook", webhook.id, _described(webhook)
        )
        await remember(session, request.key, "webhook", webhook.id)
        return Created(webhook, secret)


# -- changing -------------------------------------------------------------------------------

# What an update never changes, and why (UpdateWebhook's update_mask).
FIXED = {
    "format": "is fixed when a webhook is made: make another webhook",
    "service_id": "is fixed when a webhook is made: make another webhook",
    "team_id": "is fixed when a webhook is made: make another webhook",
}


def _shown(field: str, value) -> object:
    """A value as an update's audit row records it."""
    if field == "url":
        return webhook_addresses.origin(value)
    if field == "event_types":
        return list(value)
    return value


async def update_webhook(
    database: Database,
    actor: Actor,
    webhook_id: uuid.UUID,
    changes: dict,
    etag: str,
    allowed_networks: tuple[Network, ...],
) -> Webhook:
    """Applies checked `changes` (url, event_types, active) under the row's lock, after
    the etag (AIP-154: ABORTED ETAG_MISMATCH, nothing written). Re-activating zeroes the
    failures in a row; adding `audit.logged` starts its cursor at the trail's end,
    removing it clears the cursor. An update that changes nothing keeps the etag."""
    if "url" in changes:
        await check_url(changes["url"], allowed_networks, "webhook.url")
    async with database.transaction() as session:
        webhook = await load(session, Webhook, webhook_id, for_update=True)
        check_etag(etag, webhook.version, "webhook", {"webhook_id": str(webhook_id)})
        was_active, had_audit = webhook.active, AUDIT_LOGGED in webhook.event_types
        if had_audit or AUDIT_LOGGED in changes.get("event_types", ()):
            _check_may_stream_the_trail(actor)
        changed = {}
        for field, value in changes.items():
            before = getattr(webhook, field)
            if before != value:
                changed[field] = [_shown(field, before), _shown(field, value)]
                setattr(webhook, field, value)
        if webhook.active and not was_active and webhook.consecutive_failures:
            changed["consecutive_failures"] = [webhook.consecutive_failures, 0]
            webhook.consecutive_failures = 0
        has_audit = AUDIT_LOGGED in webhook.event_types
        if has_audit and (webhook.service_id is not None or webhook.team_id is not None):
            raise InvalidArgument.field("webhook.event_types", _AUDIT_UNSCOPED)
        if has_audit and not had_audit:
            webhook.audit_cursor = await _last_audit_sequence(session)
        elif not has_audit and webhook.audit_cursor is not None:
            webhook.audit_cursor = None
        if not changed:
            return webhook
        await session.flush()
        await audit_log.append(
            session, actor, "webhook.update", "webhook", webhook_id, {"changed": changed}
        )
        await session.refresh(webhook)
        return webhook


async def delete_webhook(database: Database, actor: Actor, webhook_id: uuid.UUID) -> None:
    """Deletes a webhook and its deliveries (the foreign key cascades); its audit row keeps
    what it was."""
    async with database.transaction() as session:
        webhook = await load(session, Webhook, webhook_id, for_update=True)
        if AUDIT_LOGGED in webhook.event_types:
            _check_may_stream_the_trail(actor)
        details = _described(webhook)
        await session.delete(webhook)
        await session.flush()
        await audit_log.append(session, actor, "webhook.delete", "webhook", webhook_id, details)


async def redeliver(database: Database, actor: Actor, delivery_id: uuid.UUID) -> WebhookDelivery:
    """Makes a delivery pending and due now, whatever its status: the dispatcher sends it
    again under the same id with the same body, as one more attempt."""
    async with database.transaction() as session:
        delivery = await load(session, WebhookDelivery, delivery_id, for_update=True)
        webhook = await load(session, Webhook, delivery.webhook_id)
        if not webhook.active:
            raise FailedPrecondition(
                "the webhook is inactive: re-activate it (UpdateWebhook, active) first",
                reason="WEBHOOK_INACTIVE",
                metadata={"webhook_id": str(webhook.id), "delivery_id": str(delivery_id)},
            )
        previous = delivery.status
        delivery.status = WebhookDeliveryStatus.PENDING.value
        delivery.next_attempt_at = func.now()
        await session.flush()
        await audit_log.append(
            session,
            actor,
            "webhook.redeliver",
            "webhook",
            webhook.id,
            {
                "delivery_id": str(delivery_id),
                "event_type": delivery.event_type,
                "status": previous,
                "attempts": delivery.attempts,
            },
        )
        await session.refresh(delivery)
        return delivery


# -- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list
    next_page_token: str


async def _newest_first(
    session: AsyncSession, query: Select, model, filters: dict, requested_size: int, token: str
) -> Page:
    """One page of `query` newest first on the (created_at, id) keyset. No total: neither
    response carries one, and a webhook streaming the trail has many deliveries."""
    size = page_size(requested_size)
    if token:
        after: tuple[datetime, uuid.UUID] = decode_token(token, filters)
        query = query.where(tuple_(model.created_at, model.id) < after)
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(size + 1)
    rows = list((await session.scalars(query)).all())
    if len(rows) <= size:
        return Page(rows, "")
    rows = rows[:size]
    return Page(rows, encode_token(rows[-1].created_at, rows[-1].id, filters))


async def list_webhooks(database: Database, *, page_size: int, page_token: str) -> Page:
    """Every webhook, newest first, whoever owns it."""
    async with database.replica_read() as session:
        return await _newest_first(session, select(Webhook), Webhook, {}, page_size, page_token)


async def list_deliveries(
    database: Database, webhook_id: uuid.UUID, *, page_size: int, page_token: str
) -> Page:
    """A webhook's deliveries, newest first, without their bodies; NOT_FOUND for a webhook
    that does not exist."""
    async with database.replica_read() as session:
        await load(session, Webhook, webhook_id)
        query = (
            select(WebhookDelivery)
            .options(defer(WebhookDelivery.body))
            .where(WebhookDelivery.webhook_id == webhook_id)
        )
        filters = {"webhook_id": str(webhook_id)}
        return await _newest_first(session, query, WebhookDelivery, filters, page_size, page_token)
