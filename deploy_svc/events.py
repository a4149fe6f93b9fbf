"""Webhook events (domain layer): the outbox a change writes in its own transaction.

An event row exists exactly when its change committed, so a receiver is never told of a
deployment that rolled back, nor left without one that happened; deploy_svc.dispatcher
turns each into a delivery per matching webhook. `data` is the resource as the API
returns it (deploy_svc.convert's message as JSON, with the proto's field names), taken
at the moment of the change. An event carries its service and that service's team, which
a webhook's service_id or team_id filter matches. One INSERT per event, whether or not a
webhook takes it: the change pays the same with or without subscribers.

`audit.logged` has no event row: the dispatcher reads the audit trail itself, so that
writing an audit row costs nothing more.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from enum import StrEnum
from types import SimpleNamespace
from typing import Any

import asyncpg
from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.persistence.db import driver_connection


class EventType(StrEnum):
    """DESIGN §12's event types, the names receivers match (X-Relman-Event)."""

    RELEASE_CREATED = "release.created"
    DEPLOYMENT_CREATED = "deployment.created"
    DEPLOYMENT_AWAITING_APPROVAL = "deployment.awaiting_approval"
    DEPLOYMENT_SUCCEEDED = "deployment.succeeded"
    DEPLOYMENT_FAILED = "deployment.failed"
    DEPLOYMENT_CANCELLED = "deployment.cancelled"
    DEPLOYMENT_REJECTED = "deployment.rejected"
    APPROVAL_APPROVED = "approval.approved"
    APPROVAL_REJECTED = "approval.rejected"
    ROLLBACK_STARTED = "rollback.started"
    ROLLBACK_COMPLETED = "rollback.completed"
    ROLLBACK_FAILED = "rollback.failed"
    FREEZE_OVERRIDE = "freeze.override"
    AUDIT_LOGGED = "audit.logged"
    POLICY_UPDATED = "policy.updated"
    FREEZE_WINDOW_CREATED = "freeze_window.created"
    FREEZE_WINDOW_DELETED = "freeze_window.deleted"
    WEBHOOK_DEACTIVATED = "webhook.deactivated"


# A deployment's end, as the event that tells of it.
ENDED = {
    "succeeded": EventType.DEPLOYMENT_SUCCEEDED,
    "failed": EventType.DEPLOYMENT_FAILED,
    "cancelled": EventType.DEPLOYMENT_CANCELLED,
    "rejected": EventType.DEPLOYMENT_REJECTED,
}

_INSERT = (
    "INSERT INTO webhook_events (event_type, service_id, team_id, data)"
    " VALUES ($1, $2::text::uuid,"
    " coalesce($3::text::uuid, (SELECT team_id FROM services WHERE id = $2::text::uuid)),"
    " $4::text::jsonb)"
)


def api_time(column: str) -> str:
    """SQL for a timestamptz as the API's JSON prints it (protobuf's Timestamp: UTC, then
    0, 3 or 6 fractional digits as needed, then Z), for an event written in the statement
    of its change, whose times Python does not know yet (`written_with`)."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    micros = f"(extract(microseconds FROM {utc})::bigint % 1000000)"
    return (
        f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN {micros} = 0 THEN ''"
        f" WHEN {micros} % 1000 = 0 THEN to_char({utc}, '.MS') ELSE to_char({utc}, '.US') END"
        " || 'Z'"
    )


def written_with(
    event_type: str, row: str, data: str, resource: str, times: tuple[str, ...]
) -> str:
    """The INSERT (a CTE's body) of an event written in the statement of its change, so
    that the change needs no transaction and no round trip of its own: of type
    `event_type` (a text parameter; NULL: none), for each row of `row` (a CTE returning
    service_id and `times`), its data the JSON text `data` (as_data's) with `resource`'s
    fields `times` set from that row as the API prints them. As `publish`, its team is
    the service's. One event: a change's further events follow in statements of their
    own, so that each has a later clock time (occurred_at) than the one before."""
    stamped = f"{data}::text::jsonb"
    for name in times:
        value = api_time(f"r.{name}")
        stamped = f"jsonb_set({stamped}, '{{{resource},{name}}}', to_jsonb({value}))"
    return f"""
    INSERT INTO webhook_events (event_type, service_id, team_id, data)
    SELECT {event_type}::text, r.service_id,
        (SELECT team_id FROM services WHERE id = r.service_id), {stamped}
    FROM {row} AS r WHERE {event_type}::text IS NOT NULL"""


# A rollback by its redeployment (deployment_ended), its columns by name.
_ROLLBACK_OF = "SELECT * FROM rollbacks WHERE redeployment_id = $1"


# How long a dispatched event is kept (its deliveries keep their own body): the sweeper
# deletes older ones, a batch at a time, so the outbox holds about a day of changes.
KEPT_FOR = timedelta(days=1)
_PURGE = text(
    "DELETE FROM webhook_events WHERE id IN ("
    " SELECT id FROM webhook_events"
    " WHERE dispatched AND occurred_at < now() - make_interval(secs => :kept_s)"
    " ORDER BY occurred_at LIMIT :batch FOR UPDATE SKIP LOCKED)"
)


async def purge(session: AsyncSession, batch: int) -> int:
    """Deletes up to `batch` events dispatched more than KEPT_FOR ago; returns how many
    (replicas sweeping at once each take other rows: SKIP LOCKED)."""
    result = await session.execute(_PURGE, {"kept_s": KEPT_FOR.total_seconds(), "batch": batch})
    return result.rowcount


def as_data(**resources: Message) -> dict[str, Any]:
    """{"deployment": {...}}: each message as the API's JSON, with the proto's names."""
    return {
        name: json_format.MessageToDict(message, preserving_proto_field_name=True)
        for name, message in resources.items()
    }


async def publish(
    session: AsyncSession,
    event_type: EventType,
    service_id: uuid.UUID | None,
    data: dict[str, Any],
    team_id: uuid.UUID | None = None,
) -> None:
    """Writes the event in the session's transaction (after the change it tells of); its
    team is `team_id`, else its service's."""
    await publish_on(await driver_connection(session), event_type, service_id, data, team_id)


async def publish_on(
    connection: asyncpg.Connection,
    event_type: EventType,
    service_id: uuid.UUID | None,
    data: dict[str, Any],
    team_id: uuid.UUID | None = None,
) -> None:
    """`publish` on the asyncpg connection of a unit of work (UpdatePipelineStage's, or a
    session's through driver_connection)."""
    await connection.execute(
        _INSERT,
        event_type.value,
        None if service_id is None else str(service_id),
        None if team_id is None else str(team_id),
        _json(data),
    )


async def resource_event(
    session: AsyncSession, event_type: EventType, service_id: uuid.UUID | None, kind: str, row
) -> None:
    await resource_event_on(await driver_connection(session), event_type, service_id, kind, row)


async def resource_event_on(
    connection: asyncpg.Connection,
    event_type: EventType,
    service_id: uuid.UUID | None,
    kind: str,
    row,
) -> None:
    """`row` as the API returns it (resource_data) under `kind`, as `event_type`."""
    await publish_on(connection, event_type, service_id, resource_data(kind, row))


def resource_data(kind: str, row) -> dict[str, Any]:
    """An event's data: `row` as the API returns it (deploy_svc.convert.<kind>; a
    deployment in its BASIC view) under `kind`. convert is imported here, not at the top:
    it imports the domain modules that publish."""
    from deploy_svc import convert

    return as_data(**{kind: getattr(convert, kind)(row)})


def deployment_data(deployment) -> str:
    """A deployment event's data as JSON text, for `written_with`."""
    return _json(resource_data("deployment", deployment))


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


async def deployment_event(session: AsyncSession, event_type: EventType, deployment) -> None:
    await resource_event(session, event_type, deployment.service_id, "deployment", deployment)


async def deployment_ended(session: AsyncSession, deployment) -> None:
    await deployment_ended_on(await driver_connection(session), deployment)


async def deployment_ended_on(connection: asyncpg.Connection, deployment) -> None:
    """deployment.<status> for a deployment that just ended (written), and for a rollback's
    redeployment, rollback.completed or rollback.failed with it."""
    event = ENDED.get(deployment.status)
    if event is None:
        return
    await resource_event_on(connection, event, deployment.service_id, "deployment", deployment)
    await rollback_ended_on(connection, deployment)


async def rollback_ended_on(connection: asyncpg.Connection, deployment) -> None:
    """rollback.completed or rollback.failed for a rollback's redeployment that just ended
    (written, its rollback settled); nothing for any other deployment."""
    if not deployment.is_rollback or deployment.status not in ENDED:
        return
    found = await connection.fetchrow(_ROLLBACK_OF, deployment.id)
    if found is None or found["status"] not in ("completed", "failed"):
        return
    await resource_event_on(
        connection,
        EventType.ROLLBACK_COMPLETED
        if found["status"] == "completed"
        else EventType.ROLLBACK_FAILED,
        deployment.service_id,
        "rollback",
        SimpleNamespace(**found),
    )
