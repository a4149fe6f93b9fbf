"""Releases (domain layer): their use cases (create, get, list), each in its own unit of
work. A release's status is derived from its deployments by the database, after every
change to them (migration 015's triggers): the one place of that rule, which holds for
every writer and for deployments of one release changing at once.
"""

from __future__ import annotations

import re
import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from deploy_svc import events
from deploy_svc.events import EventType
from shared.framework.errors import AlreadyExists, FailedPrecondition
from shared.framework.validation import text as text_field
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import Release, ReleaseStatus, Service
from shared.persistence.pagination import Page, list_page

# semver.org's own expression (2.0.0).
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
GIT_COMMIT = re.compile(r"[0-9a-f]{7,40}")


async def create_release(
    database: Database,
    actor: Actor,
    *,
    service_id: uuid.UUID,
    version: str,
    release_notes: str,
    git_commit: str,
    key: RequestKey | None,
    hotfix: bool = False,
) -> Release:
    version = text_field(
        "version",
        version,
        50,
        pattern=SEMVER,
        hint="must be a semantic version such as 1.4.0 or 2.0.0-rc.1",
    )
    notes = text_field("release_notes", release_notes, 100_000, required=False)
    commit = text_field(
        "git_commit",
        git_commit,
        40,
        required=False,
        pattern=GIT_COMMIT,
        hint="must be 7 to 40 lowercase hex digits",
    )
    async with database.transaction() as session:
        if earlier := await replay(session, key, Release):
            return earlier
        release = await _create(session, actor, service_id, version, notes, commit, hotfix)
        await remember(session, key, "release", release.id)
        return release


async def _create(
    session: AsyncSession,
    actor: Actor,
    service_id: uuid.UUID,
    version: str,
    notes: str | None,
    commit: str | None,
    hotfix: bool,
) -> Release:
    service = await load(session, Service, service_id)
    if not service.is_active:
        raise FailedPrecondition(
            f"service {service.name} is deactivated",
            reason="SERVICE_INACTIVE",
            metadata={"service_id": str(service_id)},
        )
    clash = await session.scalar(
        select(Release.id).where(Release.service_id == service_id, Release.version == version)
    )
    if clash is not None:
        raise AlreadyExists(
            f"{service.name} already has a release {version}",
            reason="RELEASE_EXISTS",
            metadata={"release_id": str(clash), "service_id": str(service_id)},
        )
    release = Release(
        service_id=service_id,
        version=version,
        status=ReleaseStatus.DRAFT.value,
        release_notes=notes,
        git_commit=commit,
        hotfix=hotfix,
        created_by=actor.user_id,
    )
    session.add(release)
    await session.flush()
    await session.refresh(release)
    await audit_log.append(
        session,
        actor,
        "create",
        "release",
        release.id,
        {"service_id": str(service_id), "version": version},
    )
    await events.resource_event(session, EventType.RELEASE_CREATED, service_id, "release", release)
    return release


async def get_release(database: Database, release_id: uuid.UUID) -> Release:
    async with database.replica_read() as session:
        return await load(session, Release, release_id)


async def list_releases(
    database: Database,
    *,
    service_id: uuid.UUID | None,
    status: str | None,
    page_size: int,
    page_token: str,
) -> Page:
    equal = {"service_id": service_id, "status": status}
    async with database.replica_read() as session:
        return await list_page(
            session, Release, page_size=page_size, page_token=page_token, equal=equal
        )
