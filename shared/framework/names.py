"""Names in requests (AIP-122): each becomes the id it stands for before the servicer runs.

A request may name a resource wherever it takes its id (`release_id:
"services/notification-service/releases/1.3.0"`); the servicers and the domain see only
ids. Which fields those are comes from the request's descriptor (resource_names.ID_FIELDS,
nested messages and repeated fields included), worked out once per method, so no RPC can
forget a field and a new RPC needs nothing here. In an update's resource message
(UpdateServiceRequest.service) the resource's `id` takes its name too, and its
`resource_name` may name it instead (AIP-134).

A value that parses as a UUID passes untouched (the servicer checks its form), so the
calls of internal services, which send ids, pay for no lookup. A name of the field's
kind is looked up on the primary: one of nothing is NOT_FOUND naming the field; a value
that is neither a UUID nor a name of that kind is INVALID_ARGUMENT naming the field. A
request names at most MAX_NAMES resources (each costs a lookup before the call's own
work starts).

Requests that stream (LogActions) are left to their use case, which resolves names
with the checks of each batch (audit_svc.trail): their handler holds its transaction's
connection while it reads the stream, and a lookup here would need a second one, so that
as many streams as the pool has connections could each wait for one for ever.

Usernames are the exception: a caller who may not learn which exist (auth.USER_NAMES:
viewers and developers) gets no NOT_FOUND for `users/x`. The name stands for a random
UUID that names nobody, so the call answers as it would for a user the caller may not
name (GetUser of another user, LogAction on another's behalf: PERMISSION_DENIED either
way; a reviewer: "not an active user whose role the policy lets vote").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from shared.framework.errors import InvalidArgument
from shared.identity.actor import current_actor
from shared.identity.auth import USER_NAMES, may
from shared.persistence import resource_names
from shared.persistence.db import Database
from shared.persistence.resource_names import ID_FIELDS, RESOURCE_MESSAGES, Kind


@dataclass(frozen=True)
class _Plan:
    """Where a message type holds ids: its id fields, the resource it is (if it is one an
    update carries), and the message fields that hold ids further down."""

    ids: tuple[tuple[str, Kind, bool], ...] = ()  # (field, kind, repeated)
    resource: Kind | None = None
    nested: tuple[tuple[str, _Plan, bool], ...] = field(default=())  # (field, plan, repeated)

    def __bool__(self) -> bool:
        return bool(self.ids or self.resource or self.nested)


def _repeated(child: FieldDescriptor) -> bool:
    """protobuf 7 says `is_repeated`; 6 has only `label`."""
    if hasattr(child, "is_repeated"):
        return child.is_repeated
    return child.label == FieldDescriptor.LABEL_REPEATED


def plan(descriptor: Descriptor, _path: frozenset[str] = frozenset()) -> _Plan:
    """Where requests of this type may hold names. A type already on the way down
    (EnvironmentPolicy.pending_change) is not entered again; protobuf's own types hold
    none."""
    ids, nested = [], []
    for child in descriptor.fields:
        repeated = _repeated(child)
        if child.type == FieldDescriptor.TYPE_STRING and child.name in ID_FIELDS:
            ids.append((child.name, ID_FIELDS[child.name], repeated))
        elif child.type == FieldDescriptor.TYPE_MESSAGE:
            inner, below = child.message_type, _path | {descriptor.full_name}
            if inner.full_name.startswith("google.") or inner.full_name in below:
                continue
            if inner.GetOptions().map_entry:
                continue
            if child_plan := plan(inner, below):
                nested.append((child.name, child_plan, repeated))
    resource = RESOURCE_MESSAGES.get(descriptor.full_name) if _path else None
    return _Plan(tuple(ids), resource, tuple(nested))


def plan_of(method: str) -> _Plan:
    """The plan of a method's request ("/relman.v1.DeployService/GetRelease"); an empty
    one for methods whose requests hold no ids, or that are not relman's."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return _Plan()
    return plan(found.input_type) if found is not None else _Plan()


@dataclass
class _Name:
    """A name found in a request: where it is, and how to put the id in its place."""

    path: str
    value: str
    kind: Kind
    segments: tuple[str, ...]
    message: object
    attribute: str
    index: int | None  # the position in a repeated field


# The most names one request may hold: far more than any call needs (reviewers), few
# enough that the lookups stay short.
MAX_NAMES = 50


def _as_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _classify(path: str, value: str, kind: Kind, message, attribute: str, index, found: list):
    if not value or _as_id(value) is not None:
        return
    segments = kind.parse(value)
    if segments is None:
        raise resource_names.not_an_id(path, value, kind)
    found.append(_Name(path, value, kind, segments, message, attribute, index))


def _collect(message, shape: _Plan, prefix: str, found: list, resources: list) -> None:
    for name, kind, repeated in shape.ids:
        if repeated:
            values = getattr(message, name)
            for i, value in enumerate(values):
                _classify(f"{prefix}{name}[{i}]", value, kind, message, name, i, found)
        else:
            _classify(f"{prefix}{name}", getattr(message, name), kind, message, name, None, found)
    if shape.resource is not None:
        resources.append((message, shape.resource, prefix))
        _classify(f"{prefix}id", message.id, shape.resource, message, "id", None, found)
    for name, inner, repeated in shape.nested:
        if repeated:
            for i, item in enumerate(getattr(message, name)):
                _collect(item, inner, f"{prefix}{name}[{i}].", found, resources)
        elif message.HasField(name):
            _collect(getattr(message, name), inner, f"{prefix}{name}.", found, resources)


def _named_by(message, kind: Kind, prefix: str, found: list) -> _Name | None:
    """The resource_name of an update's resource message, as a name to look up."""
    value = message.resource_name
    if not value:
        return None
    segments = kind.parse(value)
    if segments is None:
        raise InvalidArgument.field(
            f"{prefix}resource_name",
            f"{value[:120]!r} is not a {kind.resource} name like {kind.example}",
        )
    name = _Name(f"{prefix}resource_name", value, kind, segments, message, "", None)
    found.append(name)
    return name


class NameResolver:
    """Puts ids in place of the names of one request (see the module's docstring)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def resolve(self, request, shape: _Plan) -> None:
        found: list[_Name] = []
        resources: list = []
        _collect(request, shape, "", found, resources)
        by_name = [(m, k, p, _named_by(m, k, p, found)) for m, k, p in resources]
        if not found:
            return
        if len(found) > MAX_NAMES:
            raise InvalidArgument.field(
                found[MAX_NAMES].path,
                f"a request names at most {MAX_NAMES} resources; send ids for the others",
            )
        ids: dict[tuple[str, tuple], uuid.UUID] = {}
        async with self.database.read() as session:
            for name in found:
                key = (name.kind.resource, name.segments)
                if key not in ids:
                    found_id = await resource_names.resolve(session, name.kind, name.segments)
                    if found_id is None:
                        if _may_learn_it(name.kind):
                            raise resource_names.not_found(name.path, name.value, name.kind)
                        found_id = uuid.uuid4()  # names nobody, as no user it could name
                    ids[key] = found_id
        for name in found:
            if name.attribute:
                _put(name, str(ids[name.kind.resource, name.segments]))
        for message, kind, prefix, named in by_name:
            if named is None:
                continue
            named_id = ids[kind.resource, named.segments]
            if message.id and _as_id(message.id) != named_id:
                raise InvalidArgument.field(
                    f"{prefix}resource_name",
                    f"names another {kind.resource} than {prefix}id",
                )
            message.id = str(named_id)


def _may_learn_it(kind: Kind) -> bool:
    """Whether the caller may be told that a name of this kind names nothing."""
    if kind is not resource_names.KINDS["user"]:
        return True
    actor = current_actor.get(None)
    return actor is not None and may(actor, USER_NAMES)


def _put(name: _Name, value: str) -> None:
    if name.index is None:
        setattr(name.message, name.attribute, value)
    else:
        getattr(name.message, name.attribute)[name.index] = value
