"""Checks of request fields, each failing with a field violation that names the field."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from shared.framework.errors import InvalidArgument
from shared.framework.protos import enum_from_proto
from shared.persistence.idempotency import RequestKey

if TYPE_CHECKING:  # the actor's module reads addresses with canonical_ip, from here
    from shared.identity.actor import Actor


def canonical_ip(value: str) -> str | None:
    """`value` as a canonical IPv4 or IPv6 address (IPv4-mapped IPv6 as IPv4), or None.

    Dotted-quad IPv4, by far the most common, is checked in C by inet_pton, which
    accepts only that canonical form; the rest goes through `ipaddress`.
    """
    try:
        socket.inet_pton(socket.AF_INET, value)
        return value
    except OSError:
        pass
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # A dual-stack listener ([::]) may see IPv4 clients as ::ffff:a.b.c.d.
    return str(getattr(address, "ipv4_mapped", None) or address)


def parse_uuid(field: str, value: str) -> uuid.UUID:
    """A required id: a UUID in its canonical text form."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidArgument.field(field, f"{value[:64]!r} is not a UUID") from None
    if str(parsed) != value.lower():
        raise InvalidArgument.field(
            field, "must be a UUID like 123e4567-e89b-12d3-a456-426614174000"
        )
    return parsed


# The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)


def parse_timestamp(field: str, stamp: Timestamp) -> datetime:
    """A Timestamp as an aware datetime. Out of the allowed range, or with nanos outside
    0..999,999,999, it is INVALID_ARGUMENT (protobuf's own conversion raises ValueError)."""
    if stamp.seconds not in _TIMESTAMP_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument.field(
            field, "is not a valid timestamp (0001-01-01 to 9999-12-31 UTC, nanos < 1e9)"
        )
    return stamp.ToDatetime(tzinfo=UTC)


def optional_uuid(field: str, value: str) -> uuid.UUID | None:
    """An optional id: "" means unset."""
    return parse_uuid(field, value) if value else None


def request_key(actor: Actor, method: str, request) -> RequestKey | None:
    """The request id (AIP-155) of a call to `method` (its short name, "CreateRelease"),
    as the caller's own (shared.persistence.idempotency); None without one. The hash is of
    the request without its request_id, and without its password: whoever reads the
    table must not get a fast hash of a password."""
    if not request.request_id:
        return None
    request_id = parse_uuid("request_id", request.request_id)
    unkeyed = type(request)()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("request_id")
    if "password" in unkeyed.DESCRIPTOR.fields_by_name:
        unkeyed.ClearField("password")
    digest = hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).digest()
    return RequestKey(actor.user_id, method, request_id, digest)


def text(
    field: str,
    value: str,
    max_length: int,
    *,
    required: bool = True,
    pattern: re.Pattern | None = None,
    hint: str = "",
) -> str | None:
    """A string for a column of `max_length` characters: no NUL, not too long, maybe required,
    and matching `pattern` when one is given (`hint` says what it wants).

    Returns None for an empty optional value, so that it is stored as NULL.
    """
    if "\x00" in value:
        raise InvalidArgument.field(field, "must not contain NUL characters")
    if len(value) > max_length:
        raise InvalidArgument.field(field, f"is longer than {max_length} characters")
    if not value.strip():
        if required:
            raise InvalidArgument.field(field, "is required")
        return None
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidArgument.field(field, hint or f"must match {pattern.pattern}")
    return value


def enum_word(field: str, enum_type, number: int, *, required: bool) -> str | None:
    """A proto enum as its vocabulary word (ROLE_LEAD -> "lead"). _UNSPECIFIED is None, or
    refused when `required`; a number the enum does not define is refused (proto3 enums
    are open: any number parses)."""
    word = enum_from_proto(enum_type, number)
    if word is None and (required or number != 0):
        names = ", ".join(n for n in enum_type.keys() if not n.endswith("_UNSPECIFIED"))
        raise InvalidArgument.field(field, f"must be one of {names}")
    return word


def masked_changes(mask, readers: dict, fixed: dict[str, str] | None = None) -> dict:
    """The fields an update_mask names (AIP-134), each read and checked by its reader;
    a mask that is empty or names a field no reader has is INVALID_ARGUMENT. `fixed` maps
    fields that never change to why (a name: AIP-122), which the refusal says."""
    if not mask.paths:
        raise InvalidArgument.field("update_mask", "must name the fields to change")
    for path in mask.paths:
        if path in (fixed or {}):
            raise InvalidArgument.field(
                "update_mask", f"{path!r} {fixed[path]}", reason="FIELD_IMMUTABLE"
            )
    unknown = [path for path in mask.paths if path not in readers]
    if unknown:
        named = unknown[0] if len(unknown[0]) <= 100 else f"{unknown[0][:100]}..."
        raise InvalidArgument.field(
            "update_mask", f"{named!r} cannot be changed ({', '.join(readers)} can)"
        )
    return {path: readers[path]() for path in mask.paths}
