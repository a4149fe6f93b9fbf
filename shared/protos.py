"""Small conversions between database values and protobuf fields, used by both services."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(value: datetime | None) -> Timestamp | None:
    """A timestamptz as a Timestamp; None stays unset."""
    if value is None:
        return None
    result = Timestamp()
    result.FromDatetime(value)
    return result


def id_text(value: uuid.UUID | None) -> str:
    """An optional id as proto3 text: "" when unset."""
    return "" if value is None else str(value)
