"""The service catalogue: teams, environments, services, runbooks (domain layer)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import load
from shared.models import Environment, Runbook, Service, Team
from shared.pagination import Page, paginate
from shared.validation import text


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
    query = select(Runbook)
    if service_id is not None:
        query = query.where(Runbook.service_id == service_id)
    if environment_id is not None:
        query = query.where(Runbook.environment_id == environment_id)
    if tag is not None:
        query = query.where(Runbook.tags.contains([tag]))
    filters = {
        "service_id": str(service_id or ""),
        "environment_id": str(environment_id or ""),
        "tag": tag or "",
    }
    return await paginate(
        session,
        query,
        created_at=Runbook.created_at,
        row_id=Runbook.id,
        filters=filters,
        requested_size=page_size,
        page_token=page_token,
    )


async def list_services(
    session: AsyncSession, *, team_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    query = select(Service)
    if team_id is not None:
        query = query.where(Service.team_id == team_id)
    return await paginate(
        session,
        query,
        created_at=Service.created_at,
        row_id=Service.id,
        filters={"team_id": str(team_id or "")},
        requested_size=page_size,
        page_token=page_token,
    )


async def list_environments(session: AsyncSession, *, page_size: int, page_token: str) -> Page:
    return await paginate(
        session,
        select(Environment),
        created_at=Environment.created_at,
        row_id=Environment.id,
        filters={},
        requested_size=page_size,
        page_token=page_token,
    )


async def list_teams(session: AsyncSession, *, page_size: int, page_token: str) -> Page:
    return await paginate(
        session,
        select(Team),
        created_at=Team.created_at,
        row_id=Team.id,
        filters={},
        requested_size=page_size,
        page_token=page_token,
    )
