"""Resource names (AIP-122): what each resource is called, and the id a name stands for.

A person names a service `services/notification-service` and a release
`services/notification-service/releases/1.3.0`; requests take such a name wherever they
take the resource's id (the request fields of ID_FIELDS), and responses carry it in
`resource_name` beside the id, which stays a UUID. Service, environment and team names are
unique whatever their case, hold no `/` and never change (migration 010), so a name
keeps pointing at the same resource; usernames never change either. Resources without a
name of their own (deployments, rollbacks, runbooks) are named by their id.

The one place for the names' shapes: the formatting functions below make them for
responses, `Kind.parse` reads them in requests, and `resolve` finds the id a name stands
for (on the primary: a resource made a moment ago has its name at once).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument, NotFound

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_SEGMENT = r"[^/\x00]{1,100}"  # a name, a username (their own checks decide the rest)
_VERSION = r"[^/\x00]{1,50}"


@dataclass(frozen=True)
class Kind:
    """A kind of named resource: `resource` as in error reasons (SERVICE_NOT_FOUND),
    `pattern` the shape of its names (each group one segment), `example` for messages,
    and `lookup` the SQL that finds its id from the segments (for the kinds named by
    their id, whether it exists)."""

    resource: str
    pattern: re.Pattern
    example: str
    lookup: str

    def parse(self, value: str) -> tuple[str, ...] | None:
        """The segments of a name of this kind, or None if `value` is not one."""
        match = self.pattern.fullmatch(value)
        return match.groups() if match else None


def _kind(resource: str, collection: str, segment: str, example: str, lookup: str) -> Kind:
    return Kind(resource, re.compile(f"{collection}/({segment})"), example, lookup)


KINDS: dict[str, Kind] = {
    kind.resource: kind
    for kind in (
        _kind(
            "service",
            "services",
            _SEGMENT,
            "services/{name}",
            "SELECT id FROM services WHERE lower(name) = lower(:p0)",
        ),
        Kind(
            "release",
            re.compile(f"services/({_SEGMENT})/releases/({_VERSION})"),
            "services/{name}/releases/{version}",
            "SELECT r.id FROM releases r JOIN services s ON s.id = r.service_id"
            " WHERE lower(s.name) = lower(:p0) AND r.version = :p1",
        ),
        _kind(
            "environment",
            "environments",
            _SEGMENT,
            "environments/{name}",
            "SELECT id FROM environments WHERE lower(name) = lower(:p0)",
        ),
        _kind(
            "team",
            "teams",
            _SEGMENT,
            "teams/{name}",
            "SELECT id FROM teams WHERE lower(name) = lower(:p0)",
        ),
        _kind(
            "user",
            "users",
            _SEGMENT,
            "users/{username}",
            "SELECT id FROM users WHERE username = :p0",
        ),
        _kind(
            "deployment",
            "deployments",
            _UUID,
            "deployments/{id}",
            "SELECT id FROM deployments WHERE id = :p0",
        ),
        _kind(
            "rollback",
            "rollbacks",
            _UUID,
            "rollbacks/{id}",
            "SELECT id FROM rollbacks WHERE id = :p0",
        ),
        _kind(
            "runbook",
            "runbooks",
            _UUID,
            "runbooks/{id}",
            "SELECT id FROM runbooks WHERE id = :p0",
        ),
        _kind(
            "webhook",
            "webhooks",
            _UUID,
            "webhooks/{id}",
            "SELECT id FROM webhooks WHERE id = :p0",
        ),
    )
}

# The request fields that take a resource's id, and so also its name (DESIGN §13). Other
# ids (stages, tokens, freeze windows) and free text (an audit row's resource_id) do not.
ID_FIELDS: dict[str, Kind] = {
    "service_id": KINDS["service"],
    "release_id": KINDS["release"],
    "environment_id": KINDS["environment"],
    "target_environment_id": KINDS["environment"],
    "team_id": KINDS["team"],
    "owner_id": KINDS["user"],
    "user_id": KINDS["user"],
    "reviewer_ids": KINDS["user"],
    "deployment_id": KINDS["deployment"],
    "rollback_id": KINDS["rollback"],
    "runbook_id": KINDS["runbook"],
    "webhook_id": KINDS["webhook"],
}

# The resource messages an update request carries (UpdateServiceRequest.service): their
# `id` takes a name too, and their `resource_name` may name the resource instead.
RESOURCE_MESSAGES: dict[str, Kind] = {
    "relman.v1.Service": KINDS["service"],
    "relman.v1.Environment": KINDS["environment"],
    "relman.v1.Team": KINDS["team"],
    "relman.v1.User": KINDS["user"],
    "relman.v1.Release": KINDS["release"],
    "relman.v1.Deployment": KINDS["deployment"],
    "relman.v1.Rollback": KINDS["rollback"],
    "relman.v1.Runbook": KINDS["runbook"],
    "relman.v1.Webhook": KINDS["webhook"],
}


def not_found(field: str, value: str, kind: Kind) -> NotFound:
    """A well-formed name of nothing: NOT_FOUND naming the field and the name."""
    return NotFound(
        f"{field}: {value[:120]!r} names no {kind.resource}",
        reason=f"{kind.resource.upper()}_NOT_FOUND",
        metadata={"field": field, "resource_name": value[:200]},
    )


def not_an_id(field: str, value: str, kind: Kind) -> InvalidArgument:
    """A value that is neither a UUID nor a name of the field's kind."""
    return InvalidArgument.field(
        field, f"{value[:120]!r} is not a UUID, nor a {kind.resource} name like {kind.example}"
    )


async def resolve(session: AsyncSession, kind: Kind, segments: tuple[str, ...]):
    """The id the name with these segments stands for, or None if it names nothing."""
    statement = text(kind.lookup)
    return await session.scalar(statement, {f"p{i}": value for i, value in enumerate(segments)})


# -- names for responses ---------------------------------------------------------------------


def service_name(name: str) -> str:
    return f"services/{name}"


def release_name(service: str, version: str) -> str:
    return f"services/{service}/releases/{version}"


def environment_name(name: str) -> str:
    return f"environments/{name}"


def team_name(name: str) -> str:
    return f"teams/{name}"


def user_name(username: str) -> str:
    return f"users/{username}"


def deployment_name(deployment_id: uuid.UUID) -> str:
    return f"deployments/{deployment_id}"


def rollback_name(rollback_id: uuid.UUID) -> str:
    return f"rollbacks/{rollback_id}"


def runbook_name(runbook_id: uuid.UUID) -> str:
    return f"runbooks/{runbook_id}"


def webhook_name(webhook_id: uuid.UUID) -> str:
    return f"webhooks/{webhook_id}"
