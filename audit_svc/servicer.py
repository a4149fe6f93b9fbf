"""AuditService over gRPC (transport layer): proto in, proto out, no SQL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Any

import grpc
from google.protobuf.struct_pb2 import Struct, Value

from audit_svc import export, sealer, seals, trail
from audit_svc.group_commit import GroupCommit
from audit_svc.sealing import Seal
from audit_svc.signing_keys import ALGORITHM, KeyFile, KeyFileError
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.framework.config import Settings
from shared.framework.errors import Aborted, InvalidArgument, ResourceExhausted
from shared.framework.observability import counter
from shared.framework.protos import audit_log_message, timestamp
from shared.framework.server import Resources, StartupError
from shared.framework.validation import enum_word, optional_uuid, parse_timestamp
from shared.identity.actor import current_actor
from shared.persistence.db import Database
from shared.persistence.models import AuditLog, AuditOrigin

log = logging.getLogger("relman.audit_svc")
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]
INGESTED = counter(
    "relman_audit_rows_ingested_total", "Audit rows stored for callers, by RPC.", ("rpc",)
)
EXPORTED = counter(
    "relman_audit_export_rows_total", "CSV lines (rows and headers) streamed by exports."
)
# Made once: labels() looks its child up on every call.
INGESTED_ONE, INGESTED_STREAMED = INGESTED.labels("LogAction"), INGESTED.labels("LogActions")
MAX_ROWS_PER_BATCH = 10_000


def _entry(request: audit_pb2.LogActionRequest) -> trail.Entry:
    return trail.Entry(
        request.action,
        request.resource_type,
        request.resource_id,
        _details(request.details),
        request.user_id,
        request.ip_address,
        request.user_agent,
        request.request_id,
    )


def _details(details: Struct) -> dict[str, Any]:
    """A row's details as plain values, as struct_to_dict gives them, the common kinds
    (text, number) tested first: a LogActions stream converts one per row."""
    fields = details.fields
    return {key: _value(fields[key]) for key in fields}


def _value(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value  # a float
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _details(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None  # null_value, or no kind set


def _filter(request_filter: audit_pb2.AuditLogFilter) -> trail.Filter:
    def when(field: str):
        if not request_filter.HasField(field):
            return None
        return parse_timestamp(f"filter.{field}", getattr(request_filter, field))

    origin = enum_word(
        "filter.origin", audit_pb2.AuditOrigin, request_filter.origin, required=False
    )
    return trail.check_filter(
        trail.Filter(
            user_id=optional_uuid("filter.user_id", request_filter.user_id),
            action=request_filter.action or None,
            resource_type=request_filter.resource_type or None,
            resource_id=request_filter.resource_id or None,
            start_time=when("start_time"),
            end_time=when("end_time"),
            origin=None if origin is None else AuditOrigin(origin),
            start_sequence=_sequence("filter.start_sequence", request_filter.start_sequence),
            end_sequence=_sequence("filter.end_sequence", request_filter.end_sequence),
        )
    )


def _sequence(field: str, value: int) -> int | None:
    if value < 0:
        raise InvalidArgument.field(field, "must not be negative")
    return value or None


def _seal(seal: Seal) -> audit_pb2.AuditSeal:
    return audit_pb2.AuditSeal(
        seal_number=seal.seal_number,
        first_sequence=seal.first_sequence,
        last_sequence=seal.last_sequence,
        row_count=seal.row_count,
        root_hash=seal.root_hash,
        previous_seal_hash=seal.previous_seal_hash,
        seal_hash=seal.seal_hash,
        key_id=seal.key_id,
        signature=seal.signature,
        sealed_at=timestamp(seal.sealed_at),
        row_digests=seal.row_digests,
        oldest_created_at=timestamp(seal.oldest_created_at),
        newest_created_at=timestamp(seal.newest_created_at),
    )


def _audit_log(
    row: AuditLog | trail.Stored, username: str | None, recorded_by_username: str | None
) -> audit_pb2.AuditLog:
    return audit_log_message(row, username, recorded_by_username)


def _add_audit_logs(listed, rows: list[trail.Stored], usernames: dict[uuid.UUID, str]) -> None:
    """Each row as audit_log_message makes it, made in the response's repeated field."""
    for row in rows:
        audit_log_message(
            row, usernames.get(row.user_id), usernames.get(row.recorded_by), into=listed
        )


class StreamSlots:
    """At most `limit` LogActions streams open per caller: each holds a pooled connection
    for as long as it stays open, so one caller must not be able to take the pool."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: collections.Counter[uuid.UUID | None] = collections.Counter()

    @contextlib.contextmanager
    def held(self, caller: uuid.UUID | None) -> Iterator[None]:
        if self._open[caller] >= self.limit:
            raise ResourceExhausted(
                f"at most {self.limit} LogActions streams per caller at once: "
                "finish one before opening another",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": self.limit},
            )
        self._open[caller] += 1
        try:
            yield
        finally:
            self._open[caller] -= 1
            if not self._open[caller]:
                del self._open[caller]


@contextlib.asynccontextmanager
async def _idle_limit(idle_s: float, reason: str, what: str) -> AsyncIterator[None]:
    """ABORTED (`reason`) when the awaited step takes longer than `idle_s`: a peer that
    stops sending or reading cannot hold a stream, its transaction or its connection."""
    try:
        async with asyncio.timeout(idle_s):
            yield
    except TimeoutError:
        raise Aborted(
            f"{what} for {idle_s:g} s: the stream was ended",
            reason=reason,
            metadata={"idle_s": f"{idle_s:g}"},
        ) from None


async def _until_idle(messages: AsyncIterable, idle_s: float, max_s: float) -> AsyncIterator:
    """The stream's messages; ABORTED (STREAM_IDLE) once none came for `idle_s`, or
    (STREAM_TOO_LONG) once it has lasted `max_s`; nothing of the stream is stored then."""
    iterator = aiter(messages)
    ends_at = time.monotonic() + max_s
    while True:
        try:
            async with _idle_limit(idle_s, "STREAM_IDLE", "no message"):
                message = await anext(iterator)
        except StopAsyncIteration:
            return
        if time.monotonic() > ends_at:
            raise Aborted(
                f"a LogActions stream lasts at most {max_s:g} s (AUDIT_STREAM_MAX_S): its"
                " transaction holds back the sealing of the trail; send several streams",
                reason="STREAM_TOO_LONG",
                metadata={"max_s": f"{max_s:g}"},
            )
        yield message


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self.appender = GroupCommit(database, trail.write_rows)
        self.streams = StreamSlots(settings.audit_streams_per_caller)
        self.key_file = KeyFile(settings.audit_signing_key_file)

    async def LogAction(self, request, context):
        row = trail.checked_row(current_actor.get(), _entry(request))
        stored, username, recorded_by_username = await self.appender.append(row)
        INGESTED_ONE.inc()
        return _audit_log(stored, username, recorded_by_username)

    async def LogActions(self, request_iterator, context):
        """All rows of the stream or none (trail.log_actions). A stream idle for
        AUDIT_STREAM_IDLE_S ends rolled back."""
        actor = current_actor.get()

        async def before_commit() -> None:
            # gRPC ends the request stream alike for a client's half-close and for its
            # cancel, and cancels this task only once its core's cancel notice is
            # handled. A send passes through the core after that notice, so a cancel
            # reaches this task before the commit: the stream is rolled back, not
            # stored. (Waiting one turn of the event loop instead let about 1 in 20
            # streams commit when several were cancelled at once.)
            await context.send_initial_metadata(())

        with self.streams.held(actor.user_id):
            count = await trail.log_actions(
                self.database, actor, self._entries(request_iterator), before_commit
            )
        INGESTED_STREAMED.inc(count)
        return audit_pb2.LogActionsResponse(count=count)

    async def _entries(self, request_iterator) -> AsyncIterator[Iterator[trail.Entry]]:
        """The stream's batches, each as its entries, until the client ends it or falls
        idle; a batch over MAX_ROWS_PER_BATCH is refused as it arrives."""
        settings = self.settings
        batches = _until_idle(
            request_iterator, settings.audit_stream_idle_s, settings.audit_stream_max_s
        )
        async for batch in batches:
            if len(batch.actions) > MAX_ROWS_PER_BATCH:
                raise InvalidArgument.field(
                    "actions", f"a batch holds at most {MAX_ROWS_PER_BATCH} rows"
                )
            yield map(_entry, batch.actions)

    async def ListAuditLogs(self, request, context):
        actor = current_actor.get()
        audit_filter = _filter(request.filter)

        # The read is recorded even if it fails, and its page is returned only once the
        # record is stored; the two run side by side.
        _, (page, usernames) = await asyncio.gather(
            self.appender.append(trail.read_row(actor, "audit.read", audit_filter)),
            trail.get_audit_logs(
                self.database, audit_filter, request.page_size, request.page_token
            ),
        )
        response = audit_pb2.ListAuditLogsResponse(
            next_page_token=page.next_page_token, total_size=page.total_size
        )
        _add_audit_logs(response.audit_logs, page.items, usernames)
        return response

    async def ExportAuditLogs(self, request, context):
        """Writes the chunks itself (context.write) rather than yielding them, so that a
        write the reader does not take within EXPORT_READER_IDLE_S can end the export
        and give its connection back to the pool.

        The messages are gzip-compressed only when the caller asks with the metadata
        `x-relman-compression: gzip`: the call's framework (shared.framework.interceptors)
        sets it, since compression must be chosen before the stream's initial metadata,
        which goes out before this method runs. An export not asked stays uncompressed:
        gzip costs both ends CPU, and the default path stays as fast as it was."""
        actor = current_actor.get()
        audit_filter = _filter(request.filter)
        form = (
            enum_word("format", audit_pb2.ExportFormat, request.format, required=False)
            or export.CSV
        )
        extra = {"raw": request.raw, "format": form, "export_id": str(uuid.uuid4())}
        # Stored before the first byte goes out, so even a cancelled export is recorded.
        await self.appender.append(trail.read_row(actor, "audit.export", audit_filter, extra))
        idle_s = self.settings.export_reader_idle_s
        chunks = export.export_audit_logs(self.database, audit_filter, request.raw, form)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                EXPORTED.inc(chunk.count("\n"))
                async with _idle_limit(idle_s, "EXPORT_READER_IDLE", "the reader took nothing"):
                    await context.write(audit_pb2.ExportAuditLogsResponse(data=chunk))

    async def GetAuditCheckpoint(self, request, context):
        return _seal(await seals.checkpoint(self.database))

    async def ListAuditSeals(self, request, context):
        page, next_page_token = await seals.list_seals(
            self.database, request.start_seal_number, request.page_size, request.page_token
        )
        return audit_pb2.ListAuditSealsResponse(
            seals=[_seal(seal) for seal in page], next_page_token=next_page_token
        )

    async def ListAuditSigningKeys(self, request, context):
        return audit_pb2.ListAuditSigningKeysResponse(
            keys=[
                audit_pb2.AuditSigningKey(
                    key_id=key.key_id,
                    algorithm=ALGORITHM,
                    public_key_pem=key.public_key_pem,
                    created_at=timestamp(key.created_at),
                    retired_at=timestamp(key.retired_at),
                )
                for key in self.key_file.keyring().keys
            ]
        )

    async def VerifyAuditLog(self, request, context):
        """Reads the rows of its window: recorded like a read of the trail (audit.verify),
        with what it found."""
        actor = current_actor.get()
        start, end = (
            parse_timestamp(name, getattr(request, name)) if request.HasField(name) else None
            for name in ("start_time", "end_time")
        )
        if start and end and start > end:
            raise InvalidArgument.field("start_time", "is after end_time")
        window = trail.Filter(start_time=start, end_time=end)
        outcome = await seals.verify_trail(
            self.database,
            self.key_file.keyring().public_keys(),
            window.start_time,
            window.end_time,
            request.trusted_seal_number,
            request.trusted_seal_hash,
        )
        found = {"ok": outcome.ok, "rows_checked": outcome.rows_checked,
                 "seals_checked": outcome.seals_checked,
                 "problems": len(outcome.problems)}  # fmt: skip
        if not outcome.ok:  # for the operators' alerts, not only for the caller
            log.warning(
                "VerifyAuditLog found %d problem(s) in the audit trail; the first: %s",
                len(outcome.problems),
                outcome.problems[0],
            )
        await self.appender.append(trail.read_row(actor, "audit.verify", window, found))
        return audit_pb2.VerifyAuditLogResponse(
            ok=outcome.ok,
            rows_checked=outcome.rows_checked,
            seals_checked=outcome.seals_checked,
            problems=[
                audit_pb2.AuditIntegrityProblem(
                    kind=audit_pb2.AuditIntegrityProblem.Kind.Value(problem.kind),
                    sequence=problem.sequence,
                    seal_number=problem.seal_number,
                    detail=problem.detail,
                )
                for problem in outcome.problems
            ],
        )


def register(server: grpc.aio.Server, resources: Resources) -> list[str]:
    servicer = AuditServicer(resources.database, resources.settings)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
    # The sealer signs with the service's key: made now, at start, if there is none.
    try:
        servicer.key_file.ensure("audit_svc")
    except KeyFileError as error:
        raise StartupError(str(error)) from None
    resources.on_stop.append(
        sealer.start(
            sealer.Sealer(resources.database, servicer.key_file),
            resources.settings.audit_seal_interval_s,
        )
    )
    return [AUDIT_SERVICE.full_name]
