"""Database rows as DeployService messages (transport layer)."""

from __future__ import annotations

from relman.v1 import auth_pb2, common_pb2
from shared import models
from shared.protos import enum_to_proto, id_text, timestamp


def runbook(row: models.Runbook) -> common_pb2.Runbook:
    return common_pb2.Runbook(
        id=str(row.id),
        title=row.title,
        content=row.content,
        service_id=id_text(row.service_id),
        environment_id=id_text(row.environment_id),
        tags=row.tags,
        created_by=str(row.created_by),
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def user(row: models.User) -> common_pb2.User:
    """A user, without its password hash."""
    return common_pb2.User(
        id=str(row.id),
        email=row.email,
        username=row.username,
        full_name=row.full_name or "",
        role=enum_to_proto(common_pb2.Role, row.role),
        is_active=row.is_active,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
    )


def api_token(row: models.ApiToken) -> auth_pb2.ApiToken:
    """A token's record, without the token or its hash."""
    return auth_pb2.ApiToken(
        id=str(row.id),
        user_id=str(row.user_id),
        name=row.name,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        last_used_at=timestamp(row.last_used_at),
        revoked_at=timestamp(row.revoked_at),
    )
