"""Server framework: small conversions between database values and protobuf fields, used
by both services' servicers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp


def rpc_methods():
    """The MethodDescriptor of every relman RPC, from the generated code."""
    from relman.v1 import audit_pb2, auth_pb2, deploy_pb2, webhook_pb2

    for module in (deploy_pb2, auth_pb2, webhook_pb2, audit_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    """A timestamptz as a Timestamp; None stays unset (a naive value is taken as UTC).
    Computed here: Timestamp.FromDatetime took 1.6 us a call against 0.44, and a full
    deployment has about 25 of them."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def id_text(value: uuid.UUID | None) -> str:
    """An optional id as proto3 text: "" when unset."""
    return "" if value is None else str(value)


def enum_to_proto(enum_type, value: str | None) -> int:
    """A vocabulary word as its proto enum number: "lead" -> ROLE_LEAD (None -> 0)."""
    if value is None:
        return 0
    prefix = _enum_prefix(enum_type)
    return enum_type.Value(f"{prefix}{value.upper()}")


def enum_from_proto(enum_type, number: int) -> str | None:
    """A proto enum number as its vocabulary word; None for _UNSPECIFIED or unknown numbers."""
    if number == 0 or number not in enum_type.values():
        return None
    return enum_type.Name(number).removeprefix(_enum_prefix(enum_type)).lower()


def _enum_prefix(enum_type) -> str:
    return enum_type.Name(0).removesuffix("UNSPECIFIED")


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A Struct as plain Python values, as json_format.MessageToDict gives them, but several
    times faster: the bulk audit path converts one per row."""
    return {key: _plain(value) for key, value in struct.fields.items()}


def _plain(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind is None or kind == "null_value":
        return None
    return getattr(value, kind)  # number_value (a float), string_value, bool_value


def audit_log_message(row, username: str | None, recorded_by_username: str | None, into=None):
    """An audit row (anything with audit_logs' columns) as the AuditLog message both
    services send: ListAuditLogs' rows and the webhooks' `audit.logged` events. `into`:
    a repeated AuditLog field the message is made in (ListAuditLogs' page: a message made
    apart is copied in, its details and time with it; a page of 50 rows 0.76 -> 0.48 ms)."""
    from relman.v1 import audit_pb2

    fields = {
        "id": str(row.id),
        "created_at": timestamp(row.created_at),
        "user_id": id_text(row.user_id),
        "username": username or "",
        "action": row.action,
        "resource_type": row.resource_type,
        "resource_id": row.resource_id or "",
        "ip_address": row.ip_address or "",
        "user_agent": row.user_agent or "",
        "recorded_by": id_text(row.recorded_by),
        "recorded_by_username": recorded_by_username or "",
        "origin": enum_to_proto(audit_pb2.AuditOrigin, row.origin),
        "sequence": row.sequence,
    }
    message = audit_pb2.AuditLog(**fields) if into is None else into.add(**fields)
    details = message.details
    details.SetInParent()  # set even when empty
    if row.details:
        details.update(row.details)
    return message
