"""The service catalogue: teams, environments, services, runbooks (domain layer)."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from shared.errors import NotFound
from shared.models import Runbook


async def get_runbook(session: AsyncSession, runbook_id: uuid.UUID) -> Runbook:
    runbook = await session.get(Runbook, runbook_id)
    if runbook is None:
        raise NotFound(
            f"runbook {runbook_id} does not exist",
            reason="RUNBOOK_NOT_FOUND",
            metadata={"runbook_id": str(runbook_id)},
        )
    return runbook
