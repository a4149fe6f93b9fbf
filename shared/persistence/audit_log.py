"""The one function that appends audit rows, used by both services.

It runs inside the caller's transaction, so a change and its audit record
commit or roll back together: no state change without its audit record.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.identity.actor import Actor
from shared.persistence.models import AuditLog, AuditOrigin

# Built once: a Core INSERT on the table, not an ORM one built per call (both showed in
# the profile of every write RPC).
_APPEND = insert(AuditLog.__table__).returning(AuditLog.__table__.c.id)


async def append(
    session: AsyncSession,
    actor: Actor,
    action: str,
    resource_type: str,
    resource_id: uuid.UUID | str | None = None,
    details: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Appends one row recording that `actor` did `action` to a resource; returns its id.

    Rows written here are relman's own (origin `relman`), recorded by the caller's
    authenticated user (None for anonymous calls: a failed login, a refused call
    without a valid token, the command lines, the stage sweeper)."""
    return await session.scalar(
        _APPEND,
        {
            "user_id": actor.user_id,
            "action": action,
            "resource_type": resource_type,
            "resource_id": None if resource_id is None else str(resource_id),
            "details": details or {},
            "ip_address": actor.peer,
            "user_agent": actor.user_agent,
            "origin": AuditOrigin.RELMAN.value,
            "recorded_by": actor.user_id,
        },
    )
