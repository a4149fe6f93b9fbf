"""The service catalogue: teams, environments, services, runbooks (domain layer)."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import load
from shared.models import Runbook


async def get_runbook(session: AsyncSession, runbook_id: uuid.UUID) -> Runbook:
    return await load(session, Runbook, runbook_id)
