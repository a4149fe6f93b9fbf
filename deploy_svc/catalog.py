"""The service catalogue (domain layer): teams, environments, services and runbooks.

Its use cases (reads, creates, updates) each open their own unit of work. Each field
has one check here, which creates and the servicer's update readers both call, so a
limit is stated once.

Names (AIP-122): a team's, an environment's or a service's name is part of its resource
name (`teams/{name}`), so it is unique whatever its case, holds no `/` and never changes
(NAME_FIXED); the database holds the same rules (migration 010). Updates take an etag
(AIP-154): the row's version, raised by the database on every change.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import CONSTRAINT_ERRORS, AlreadyExists, InvalidArgument
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, check_etag, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import Base, Environment, Runbook, Service, Team, User
from shared.persistence.pagination import Page, list_page

Row = TypeVar("Row", bound=Base)

# -- reads -----------------------------------------------------------------------------------


async def get(database: Database, model: type[Row], row_id: uuid.UUID) -> Row:
    """GetService, GetEnvironment, GetTeam, GetRunbook: the row, or NOT_FOUND naming it."""
    async with database.replica_read() as session:
        return await load(session, model, row_id)


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


# What no update changes (AIP-122), each with why: a name is part of the resource name,
# which must keep pointing at the same resource; an environment's policy and the promotion
# order were made for its type. The database holds both (trigger relman_names_fixed).
NAME_FIXED = {"name": "is part of the resource name and never changes"}
_NO_SLASH = "must not contain '/': it is part of the resource name"
ENVIRONMENT_FIXED = {
    **NAME_FIXED,
    "environment_type": "never changes: its policy and the promotion order were made for it",
}


def check_name(value: str) -> str:
    """A team's or an environment's name: it is also part of its resource name
    (`teams/{name}`), fixed for good, so it holds no `/` (nor does the database let it,
    migration 010), no control character, and no space at either end (`teams/Platform `
    beside `teams/Platform`)."""
    name = check_field("name", value)
    if "/" in name:
        raise InvalidArgument.field("name", _NO_SLASH)
    if not name.isprintable() or name != name.strip():
        raise InvalidArgument.field(
            "name", "must be printable characters, without a space at either end"
        )
    return name


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


def _name_taken(kind: str, clash=None) -> AlreadyExists:
    """ALREADY_EXISTS <KIND>_EXISTS, naming the row that holds the name when it is known."""
    return AlreadyExists(
        f"a {kind} named {clash.name!r} exists (names are unique whatever their case)"
        if clash is not None
        else f"a {kind} of that name exists (names are unique whatever their case)",
        reason=f"{kind.upper()}_EXISTS",
        metadata={f"{kind}_id": str(clash.id)} if clash is not None else None,
    )


def _database_refusals() -> dict:
    """The database's own refusals of names (migration 010) as the statuses the checks
    here give, for a write that came past them (two creates of one name racing, or SQL of
    another path)."""
    refusals = {
        "relman_names_fixed": lambda: InvalidArgument.field(
            "update_mask",
            "a name never changes (nor a username, nor an environment's type): "
            "it is part of the resource name",
            reason="FIELD_IMMUTABLE",
        )
    }
    for model in (Team, Environment, Service):
        table, kind = model.__tablename__, _kind(model)
        refusals[f"ck_{table}_name_has_no_slash"] = lambda: InvalidArgument.field("name", _NO_SLASH)
        for unique in (f"uq_{table}_name", f"uq_{table}_name_any_case"):
            refusals[unique] = lambda kind=kind: _name_taken(kind)
    return refusals


CONSTRAINT_ERRORS.update(_database_refusals())


async def _check_name_free(session: AsyncSession, model: type[Base], name: str) -> None:
    """Names are unique whatever their case (`teams/Platform` and `teams/platform` would
    name one team), as the database's unique index on lower(name) holds them."""
    clash = (
        await session.execute(
            select(model.id, model.name).where(func.lower(model.name) == func.lower(name))
        )
    ).first()
    if clash is not None:
        raise _name_taken(_kind(model), clash)


async def _check_references(session: AsyncSession, fields: dict) -> None:
    for field, (model, value) in fields.items():
        if value is not None and await session.get(model, value) is None:
            raise InvalidArgument.field(field, f"no such {_kind(model)}")


async def _create(
    database: Database,
    actor: Actor,
    model: type[Row],
    key: RequestKey | None,
    named: dict,
    build: Callable[[], Row],
    *,
    references: dict | None = None,
    details: dict | None = None,
) -> Row:
    """The steps every create shares: a retried request returns the row it made, references
    must exist, a name (in `named`) must be free; only then does `build` make the row,
    checking its other fields, and the row is audited (`details`, else `named`)."""
    async with database.transaction() as session:
        if earlier := await replay(session, key, model):
            return earlier
        await _check_references(session, references or {})
        if "name" in named:
            await _check_name_free(session, model, named["name"])
        row = build()
        session.add(row)
        await session.flush()
        await session.refresh(row)
        await audit_log.append(session, actor, "create", _kind(model), row.id, details or named)
        await remember(session, key, _kind(model), row.id)
        return row


async def create_team(
    database: Database, actor: Actor, *, name, description, slack_channel, key: RequestKey | None
) -> Team:
    name = check_name(name)
    return await _create(
        database,
        actor,
        Team,
        key,
        {"name": name},
        lambda: Team(
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
    key: RequestKey | None,
) -> Environment:
    """Admins only (`environments.write`): an environment's type decides whether deploying
    there needs approvals and tested stages, so whoever sets it holds those rules."""
    name = check_name(name)
    if environment_type is None:
        raise InvalidArgument.field("environment_type", "is required")
    return await _create(
        database,
        actor,
        Environment,
        key,
        {"name": name},
        lambda: Environment(
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
    key: RequestKey | None,
) -> Service:
    name = check_service_name(name)
    return await _create(
        database,
        actor,
        Service,
        key,
        {"name": name},
        lambda: Service(
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
    key: RequestKey | None,
) -> Runbook:
    title = check_field("title", title)
    return await _create(
        database,
        actor,
        Runbook,
        key,
        {"title": title},
        lambda: Runbook(
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
    )


async def update_service(
    database: Database, actor: Actor, service_id: uuid.UUID, changes: dict, etag: str
) -> Service:
    """Applies checked `changes` (update_mask fields) to a service; its name never
    changes (NAME_FIXED)."""
    return await _update(database, actor, Service, service_id, changes, etag)


async def update_environment(
    database: Database, actor: Actor, environment_id: uuid.UUID, changes: dict, etag: str
) -> Environment:
    """Admins only (`environments.write`), as creating one: description, config_path and
    is_active, which decides whether it takes deployments (deploy_svc.gates); its name and
    type never change (ENVIRONMENT_FIXED)."""
    return await _update(database, actor, Environment, environment_id, changes, etag)


async def update_runbook(
    database: Database, actor: Actor, runbook_id: uuid.UUID, changes: dict, etag: str
) -> Runbook:
    """Applies checked `changes` (update_mask fields) to a runbook."""
    return await _update(database, actor, Runbook, runbook_id, changes, etag)


# The columns an update may point elsewhere, and what they reference.
_REFERENCES = {
    "team_id": Team,
    "owner_id": User,
    "service_id": Service,
    "environment_id": Environment,
}


async def _update(
    database: Database,
    actor: Actor,
    model: type[Row],
    row_id: uuid.UUID,
    changes: dict,
    etag: str,
) -> Row:
    """Applies checked `changes` to a catalogue row, locked; audits what changed.

    `etag` (AIP-154), when set, must be the row's version as it is under the lock: else
    ABORTED ETAG_MISMATCH with the current etag, and nothing is written. The row returned
    carries the version the database raised (trigger relman_bump_version), its new etag;
    an update that changes nothing keeps it."""
    async with database.transaction() as session:
        row = await load(session, model, row_id, for_update=True)
        kind = _kind(model)
        check_etag(etag, row.version, kind, {f"{kind}_id": str(row_id)})
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
