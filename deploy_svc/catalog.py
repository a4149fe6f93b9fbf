"""The service catalogue: teams, environments, services, runbooks (domain layer)."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import AlreadyExists, InvalidArgument
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import load, replay
from shared.persistence.models import Environment, Runbook, Service, Team, User
from shared.persistence.pagination import Page, list_page


async def get_runbook(session: AsyncSession, runbook_id: uuid.UUID) -> Runbook:
    return await load(session, Runbook, runbook_id)


async def list_runbooks(
    session: AsyncSession,
    *,
    service_id: uuid.UUID | None,
    environment_id: uuid.UUID | None,
    tag: str,
    page_size: int,
    page_token: str,
) -> Page:
    tag = text("tag", tag, 100, required=False)
    return await list_page(
        session,
        Runbook,
        page_size=page_size,
        page_token=page_token,
        equal={"service_id": service_id, "environment_id": environment_id},
        where={"tag": (tag, Runbook.tags.contains([tag]))},
    )


async def list_services(
    session: AsyncSession, *, team_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    return await list_page(
        session, Service, page_size=page_size, page_token=page_token, equal={"team_id": team_id}
    )


async def list_environments(session: AsyncSession, *, page_size: int, page_token: str) -> Page:
    return await list_page(session, Environment, page_size=page_size, page_token=page_token)


async def list_teams(session: AsyncSession, *, page_size: int, page_token: str) -> Page:
    return await list_page(session, Team, page_size=page_size, page_token=page_token)


# -- administration (leads and admins; environments admins only) ---------------------------------

SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
MAX_TAGS = 20


async def _unique(session: AsyncSession, model, column: str, value, kind: str) -> None:
    clash = await session.scalar(select(model.id).where(getattr(model, column) == value))
    if clash is not None:
        raise AlreadyExists(
            f"a {kind} named {value!r} exists",
            reason=f"{kind.upper()}_EXISTS",
            metadata={f"{kind}_id": str(clash)},
        )


def check_service_name(value: str) -> str:
    return text(
        "name", value, 100, pattern=SERVICE_NAME, hint="must be lowercase letters, digits and -"
    )


def check_tags(values) -> list[str]:
    tags = [text(f"tags[{i}]", tag, 50) for i, tag in enumerate(values)]
    if len(tags) > MAX_TAGS:
        raise InvalidArgument.field("tags", f"at most {MAX_TAGS} tags")
    return list(dict.fromkeys(tags))


async def _created(session: AsyncSession, actor: Actor, row, kind: str, details: dict):
    session.add(row)
    await session.flush()
    await session.refresh(row)
    await audit_log.append(session, actor, "create", kind, row.id, details)
    return row


async def create_team(session, actor, *, name, description, slack_channel, request_id) -> Team:
    name = text("name", name, 100)
    if earlier := await replay(session, Team, request_id, {"name": name}):
        return earlier
    await _unique(session, Team, "name", name, "team")
    team = Team(
        id=request_id or uuid.uuid4(),
        name=name,
        description=text("description", description, 10_000, required=False),
        slack_channel=text("slack_channel", slack_channel, 100, required=False),
    )
    return await _created(session, actor, team, "team", {"name": name})


async def create_environment(
    session, actor, *, name, description, environment_type, config_path, request_id
) -> Environment:
    """Admins only (`environments.write`): an environment's type decides whether deploying
    there needs approvals and tested stages, so whoever sets it holds those rules."""
    name = text("name", name, 100)
    if environment_type is None:
        raise InvalidArgument.field("environment_type", "is required")
    if earlier := await replay(session, Environment, request_id, {"name": name}):
        return earlier
    await _unique(session, Environment, "name", name, "environment")
    environment = Environment(
        id=request_id or uuid.uuid4(),
        name=name,
        environment_type=environment_type,
        description=text("description", description, 10_000, required=False),
        config_path=text("config_path", config_path, 500, required=False),
    )
    return await _created(
        session,
        actor,
        environment,
        "environment",
        {"name": name, "environment_type": environment_type},
    )


async def _check_references(session, fields: dict) -> None:
    for field, (model, value) in fields.items():
        if value is not None and await session.get(model, value) is None:
            raise InvalidArgument.field(field, f"no such {model.__tablename__[:-1]}")


async def create_service(
    session,
    actor,
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
    if earlier := await replay(session, Service, request_id, {"name": name}):
        return earlier
    await _check_references(session, {"team_id": (Team, team_id), "owner_id": (User, owner_id)})
    await _unique(session, Service, "name", name, "service")
    service = Service(
        id=request_id or uuid.uuid4(),
        name=name,
        team_id=team_id,
        owner_id=owner_id,
        description=text("description", description, 10_000, required=False),
        repository_url=text("repository_url", repository_url, 500, required=False),
        slack_channel=text("slack_channel", slack_channel, 100, required=False),
    )
    return await _created(session, actor, service, "service", {"name": name})


async def create_runbook(
    session, actor, *, title, content, service_id, environment_id, tags, request_id
) -> Runbook:
    title = text("title", title, 200)
    if earlier := await replay(session, Runbook, request_id, {"title": title}):
        return earlier
    await _check_references(
        session,
        {"service_id": (Service, service_id), "environment_id": (Environment, environment_id)},
    )
    runbook = Runbook(
        id=request_id or uuid.uuid4(),
        title=title,
        content=text("content", content, 1_000_000),
        service_id=service_id,
        environment_id=environment_id,
        tags=check_tags(tags),
        created_by=actor.user_id,
    )
    return await _created(session, actor, runbook, "runbook", {"title": title})


async def update(session, actor, model, row_id: uuid.UUID, changes: dict):
    """Applies already validated `changes` to a catalogue row; audits what changed."""
    row = await load(session, model, row_id, for_update=True)
    if "name" in changes and changes["name"] != row.name:
        await _unique(session, model, "name", changes["name"], model.__tablename__[:-1])
    await _check_references(
        session,
        {
            key: (target, changes[key])
            for key, target in (
                ("team_id", Team),
                ("owner_id", User),
                ("service_id", Service),
                ("environment_id", Environment),
            )
            if key in changes
        },
    )
    changed = {}
    for field, value in changes.items():
        if getattr(row, field) != value:
            changed[field] = [str(getattr(row, field)), str(value)]
            setattr(row, field, value)
    await session.flush()
    if changed:
        await audit_log.append(
            session, actor, "update", model.__tablename__[:-1], row.id, {"changed": changed}
        )
    await session.refresh(row)
    return row
