"""Database rows as DeployService messages (transport layer)."""

from __future__ import annotations

from relman.v1 import common_pb2
from shared import models
from shared.protos import id_text, timestamp


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
