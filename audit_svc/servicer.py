"""AuditService over gRPC (transport layer): proto in, proto out, no SQL."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from google.protobuf import struct_pb2

from audit_svc import export, service
from audit_svc.group_commit import GroupCommit
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.actor import current_actor
from shared.db import Database
from shared.errors import InvalidArgument
from shared.models import AuditLog
from shared.observability import counter
from shared.protos import id_text, struct_to_dict, timestamp
from shared.server import Resources
from shared.validation import optional_uuid, parse_timestamp

AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]
INGESTED = counter(
    "relman_audit_rows_ingested_total", "Audit rows stored for callers, by RPC.", ("rpc",)
)
EXPORTED = counter(
    "relman_audit_export_rows_total", "CSV lines (rows and headers) streamed by exports."
)
MAX_ROWS_PER_BATCH = 10_000


def _entry(request: audit_pb2.LogActionRequest) -> service.Entry:
    return service.Entry(
        action=request.action,
        resource_type=request.resource_type,
        resource_id=request.resource_id,
        details=struct_to_dict(request.details),
        user_id=request.user_id,
        ip_address=request.ip_address,
        user_agent=request.user_agent,
        request_id=request.request_id,
    )


def _filter(request_filter: audit_pb2.AuditLogFilter) -> service.Filter:
    def when(field: str):
        if not request_filter.HasField(field):
            return None
        return parse_timestamp(f"filter.{field}", getattr(request_filter, field))

    return service.check_filter(
        service.Filter(
            user_id=optional_uuid("filter.user_id", request_filter.user_id),
            action=request_filter.action or None,
            resource_type=request_filter.resource_type or None,
            resource_id=request_filter.resource_id or None,
            start_time=when("start_time"),
            end_time=when("end_time"),
        )
    )


def _audit_log(row: AuditLog, username: str | None) -> audit_pb2.AuditLog:
    details = struct_pb2.Struct()
    details.update(row.details or {})
    return audit_pb2.AuditLog(
        id=str(row.id),
        created_at=timestamp(row.created_at),
        user_id=id_text(row.user_id),
        username=username or "",
        action=row.action,
        resource_type=row.resource_type,
        resource_id=row.resource_id or "",
        details=details,
        ip_address=row.ip_address or "",
        user_agent=row.user_agent or "",
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, database: Database) -> None:
        self.database = database
        self.appender = GroupCommit(database, service.write_rows)

    async def LogAction(self, request, context):
        row = service.validate(current_actor.get(), _entry(request))
        stored, username = await self.appender.append(row)
        INGESTED.labels("LogAction").inc()
        return _audit_log(stored, username)

    async def LogActions(self, request_iterator, context):
        """All rows of the stream or none: validated batch by batch, COPYed inside one
        transaction that commits only after the last batch arrived."""
        actor = current_actor.get()
        count = 0
        async with self.database.transaction() as session:
            async for batch in request_iterator:
                if len(batch.actions) > MAX_ROWS_PER_BATCH:
                    raise InvalidArgument.field(
                        "actions", f"a batch holds at most {MAX_ROWS_PER_BATCH} rows"
                    )
                rows = []
                for action in batch.actions:
                    field = f"actions[{count + len(rows)}]."
                    rows.append((field, service.validate(actor, _entry(action), field)))
                await service.check_users(session, rows)
                if rows:
                    await service.append_batch(session, [row for _, row in rows])
                count += len(rows)
            # gRPC hands a client's cancel to this handler as the end of the request
            # stream first, and as the cancellation of its task on the next turn of the
            # event loop. Let that turn pass before committing, so that a cancelled
            # stream is rolled back, not stored.
            await asyncio.sleep(0)
        INGESTED.labels("LogActions").inc(count)
        return audit_pb2.LogActionsResponse(count=count)

    async def ListAuditLogs(self, request, context):
        actor = current_actor.get()
        audit_filter = _filter(request.filter)

        async def read():
            async with self.database.read() as session:
                return await service.get_audit_logs(
                    session, audit_filter, request.page_size, request.page_token
                )

        # The read is recorded even if it fails, and its page is returned only once the
        # record is stored; the two run side by side.
        _, (page, usernames) = await asyncio.gather(
            self.appender.append(service.read_row(actor, "audit.read", audit_filter)), read()
        )
        return audit_pb2.ListAuditLogsResponse(
            audit_logs=[_audit_log(row, usernames.get(row.user_id)) for row in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def ExportAuditLogs(self, request, context):
        actor = current_actor.get()
        audit_filter = _filter(request.filter)
        extra = {"raw": request.raw, "export_id": str(uuid.uuid4())}
        # Stored before the first byte goes out, so even a cancelled export is recorded.
        await self.appender.append(service.read_row(actor, "audit.export", audit_filter, extra))
        async for chunk in export.export_audit_logs_csv(self.database, audit_filter, request.raw):
            EXPORTED.inc(chunk.count("\n"))
            yield audit_pb2.ExportAuditLogsResponse(data=chunk)


def register(server: grpc.aio.Server, resources: Resources) -> list[str]:
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(resources.database), server)
    return [AUDIT_SERVICE.full_name]
