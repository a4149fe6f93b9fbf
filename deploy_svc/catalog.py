"""The service catalogue: teams, environments, services, runbooks (domain layer)."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import load
from shared.models import Environment, Runbook, Service, Team
from shared.pagination import Page, list_page
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
