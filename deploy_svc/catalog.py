"""The service catalogue (domain layer): teams, environments, services and runbooks.

Its use cases (reads, creates, updates) each open their own unit of work. Each field
has one check here, which creates and the servicer's update readers both call, so a
limit is stated once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import AlreadyExists, InvalidArgument
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, load, replay
from shared.persistence.models import Base, Environment, Runbook, Service, Team, User
from shared.persistence.pagination import Page, list_page

Row = TypeVar("Row", bound=Base)

# -- reads -----------------------------------------------------------------------------------


async def get_runbook(database: Database, runbook_id: uuid.UUID) -> Runbook:
    async with database.replica_read() as session:
        return await load(session, Runbook, runbook_id)


async def list_runbooks(
    database: Database,
    *,
    service_id: uuid.UUID | None,
    environment_id: uuid.UUID | None,
    tag: str,
    page_size: int,
    page_token: str,
) -> Page:
    tag = text("tag", tag, 100, required=False)
    async with database.replica_read() as session:
        return await list_page(
            session,
            Runbook,
            page_size=page_size,
            page_token=page_token,
            equal={"service_id": service_id, "environment_id": environment_id},
            where={"tag": (tag, Runbook.tags.contains([tag]))},
        )


async def list_services(
    database: Database, *, team_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    async with database.replica_read() as session:
        return await list_page(
            session, Service, page_size=page_size, page_token=page_token, equal={"team_id": team_id}
        )


async def list_environments(database: Database, *, page_size: int, page_token: str) -> Page:
    async with database.replica_read() as session:
        return await list_page(session, Environment, page_size=page_size, page_token=page_token)


async def list_teams(database: Database, *, page_size: int, page_token: str) -> Page:
    async with database.replica_read() as session:
        return await list_page(session, Team, page_size=page_size, page_token=page_token)


# -- field checks (creates and updates alike) ---------------------------------------------------

SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
MAX_TAGS = 20
# The text fields of the catalogue: (most characters, required), as their columns hold them.
_TEXT_FIELDS = {
    "name": (100, True),
    "description": (10_000, False),
    "slack_channel": (100, False),
    "repository_url": (500, False),
    "config_path": (500, False),
    "title": (200, True),
    "content": (1_000_000, True),
}


def check_field(name: str, value: str, within: str = "") -> str | None:
    """The catalogue text field `name`, checked against its limit. `within` is the message
    an update carries it in ("service"): the field violation names "service.<name>"."""
    max_length, required = _TEXT_FIELDS[name]
    return text(f"{within}.{name}" if within else name, value, max_length, required=required)


def check_service_name(value: str) -> str:
    """A service's name also names it in URLs and metrics: lowercase letters, digits, -."""
    return text(
        "name",
        value,
        _TEXT_FIELDS["name"][0],
        pattern=SERVICE_NAME,
        hint="must be lowercase letters, digits and -",
    )


def check_tags(values: Iterable[str]) -> list[str]:
    tags = [text(f"tags[{i}]", tag, 50) for i, tag in enumerate(values)]
    if len(tags) > MAX_TAGS:
        raise InvalidArgument.field("tags", f"at most {MAX_TAGS} tags")
    return list(dict.fromkeys(tags))


# -- administration (leads and admins; environments admins only) ---------------------------------


def _kind(model: type[Base]) -> str:
    return model.__tablename__[:-1]  # "teams" -> "team": audit rows and error reasons


async def _check_name_free(session: AsyncSession, model: type[Base], name: str) -> None:
    clash = await session.scalar(select(model.id).where(model.name == name))
    if clash is not None:
        kind = _kind(model)
        raise AlreadyExists(
            f"a {kind} named {name!r} exists",
            reason=f"{kind.upper()}_EXISTS",
            metadata={f"{kind}_id": str(clash)},
        )


async def _check_references(session: AsyncSession, fields: dict) -> None:
    for field, (model, value) in fields.items():
        if value is not None and await session.get(model, value) is None:
            raise InvalidArgument.field(field, f"no such {_kind(model)}")


async def _create(
    database: Database,
    actor: Actor,
    model: type[Row],
    request_id: uuid.UUID | None,
    same: dict,
    build: Callable[[uuid.UUID], Row],
    *,
    references: dict | None = None,
    details: dict | None = None,
) -> Row:
    """The steps every create shares: a retried request returns the row it made (`same`
    identifies it), references must exist, a name must be free; only then does `build`
    make the row, checking its other fields, and the row is audited."""
    async with database.transaction() as session:
        if earlier := await replay(session, model, request_id, same):
            return earlier
        await _check_references(session, references or {})
        if "name" in same:
            await _check_name_free(session, model, same["name"])
        row = build(request_id or uuid.uuid4())
        session.add(row)
        await session.flush()
        await session.refresh(row)
        await audit_log.append(session, actor, "create", _kind(model), row.id, details or same)
        return row


async def create_team(
    database: Database, actor: Actor, *, name, description, slack_channel, request_id
) -> Team:
    name = check_field("name", name)
    return await _create(
        database,
        actor,
        Team,
        request_id,
        {"name": name},
        lambda row_id: Team(
            id=row_id,
            name=name,
            description=check_field("description", description),
            slack_channel=check_field("slack_channel", slack_channel),
        ),
    )


async def create_environment(
    database: Database,
    actor: Actor,
    *,
    name,
    description,
    environment_type,
    config_path,
    request_id,
) -> Environment:
    """Admins only (`environments.write`): an environment's type decides whether deploying
    there needs approvals and tested stages, so whoever sets it holds those rules."""
    name = check_field("name", name)
    if environment_type is None:
        raise InvalidArgument.field("environment_type", "is required")
    return await _create(
        database,
        actor,
        Environment,
        request_id,
        {"name": name},
        lambda row_id: Environment(
            id=row_id,
            name=name,
            environment_type=environment_type,
            description=check_field("description", description),
            config_path=check_field("config_path", config_path),
        ),
        details={"name": name, "environment_type": environment_type},
    )


async def create_service(
    database: Database,
    actor: Actor,
    *,
    name,
    description,
    repository_url,
    team_id,
    slack_channel,
    owner_id,
    request_id,
) -> Service:
    name = check_service_name(name)
    return await _create(
        database,
        actor,
        Service,
        request_id,
        {"name": name},
        lambda row_id: Service(
            id=row_id,
            name=name,
            team_id=team_id,
            owner_id=owner_id,
            description=check_field("description", description),
            repository_url=check_field("repository_url", repository_url),
            slack_channel=check_field("slack_channel", slack_channel),
        ),
        references={"team_id": (Team, team_id), "owner_id": (User, owner_id)},
    )


async def create_runbook(
    database: Database,
    actor: Actor,
    *,
    title,
    content,
    service_id,
    environment_id,
    tags,
    request_id,
) -> Runbook:
    title = check_field("title", title)
    return await _create(
        database,
        actor,
        Runbook,
        request_id,
        {"title": title, "created_by": actor.user_id},
        lambda row_id: Runbook(
            id=row_id,
            title=title,
            content=check_field("content", content),
            service_id=service_id,
            environment_id=environment_id,
            tags=check_tags(tags),
            created_by=actor.user_id,
        ),
        references={
            "service_id": (Service, service_id),
            "environment_id": (Environment, environment_id),
        },
        details={"title": title},
    )


async def update_service(
    database: Database, actor: Actor, service_id: uuid.UUID, changes: dict
) -> Service:
    """Applies checked `changes` (update_mask fields) to a service."""
    return await _update(database, actor, Service, service_id, changes)


async def update_runbook(
    database: Database, actor: Actor, runbook_id: uuid.UUID, changes: dict
) -> Runbook:
    """Applies checked `changes` (update_mask fields) to a runbook."""
    return await _update(database, actor, Runbook, runbook_id, changes)


# The columns an update may point elsewhere, and what they reference.
_REFERENCES = {
    "team_id": Team,
    "owner_id": User,
    "service_id": Service,
    "environment_id": Environment,
}


async def _update(
    database: Database, actor: Actor, model: type[Row], row_id: uuid.UUID, changes: dict
) -> Row:
    """Applies checked `changes` to a catalogue row, locked; audits what changed."""
    async with database.transaction() as session:
        row = await load(session, model, row_id, for_update=True)
        if "name" in changes and changes["name"] != row.name:
            await _check_name_free(session, model, changes["name"])
        await _check_references(
            session,
            {key: (target, changes[key]) for key, target in _REFERENCES.items() if key in changes},
        )
        changed = {}
        for field, value in changes.items():
            if getattr(row, field) != value:
                changed[field] = [str(getattr(row, field)), str(value)]
                setattr(row, field, value)
        await session.flush()
        if changed:
            await audit_log.append(
                session, actor, "update", _kind(model), row.id, {"changed": changed}
            )
        await session.refresh(row)
        return row
