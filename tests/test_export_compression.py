"""ExportAuditLogs compressed on request: `x-relman-compression: gzip` in the call's metadata.

Each export goes through a TCP relay (bench.relay) between a real channel and the real
audit_svc, which counts the bytes the server sends: compression is seen on the wire,
not taken on trust from the client library (which decompresses silently).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import func, select

from bench.relay import relay_to
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.models import AuditLog, Role
from tests.harness import bearer, client_address, error_details

ROWS = 5_000
HEADER = "x-relman-compression"


@dataclass(frozen=True)
class Exported:
    text: str
    wire_bytes: int


async def export_through_relay(
    relman, metadata, form=audit_pb2.EXPORT_FORMAT_CSV, compression=None, **filters
) -> Exported:
    """One export on a channel of its own through a fresh relay: its text (the chunks
    joined) and the bytes the server sent for it."""
    request = audit_pb2.ExportAuditLogsRequest(
        filter=audit_pb2.AuditLogFilter(**filters), format=form
    )
    host, _, port = client_address(relman.addresses["audit_svc"]).rpartition(":")
    async with relay_to(host, int(port)) as relay:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            call = stub.ExportAuditLogs(
                request, metadata=metadata, compression=compression, timeout=60
            )
            text = "".join([chunk.data async for chunk in call])
        return Exported(text, relay.downstream_bytes)


@pytest.fixture(scope="module")
async def marker(audit_channel, tokens) -> str:
    """A resource type holding ROWS rows of this module's own, logged through LogActions."""
    resource_type = f"z{uuid.uuid4().hex[:12]}"
    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)

    def batches():
        for start in range(0, ROWS, 1_000):
            actions = []
            for n in range(start, start + 1_000):
                details = struct_pb2.Struct()
                details.update({"n": n, "pipeline": f"build-{n % 97}", "ok": n % 3 == 0})
                actions.append(
                    audit_pb2.LogActionRequest(
                        action="deploy.step",
                        resource_type=resource_type,
                        resource_id=f"svc-{n % 50}",
                        details=details,
                    )
                )
            yield audit_pb2.LogActionsRequest(actions=actions)

    response = await stub.LogActions(batches(), metadata=bearer(tokens[Role.SERVICE]))
    assert response.count == ROWS
    return resource_type


@pytest.fixture(scope="module")
def lead(tokens):
    return bearer(tokens[Role.LEAD])


@pytest.mark.parametrize(
    "form", [audit_pb2.EXPORT_FORMAT_CSV, audit_pb2.EXPORT_FORMAT_JSONL], ids=["csv", "jsonl"]
)
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
async def test_a_compressed_export_is_the_same_text_in_far_fewer_bytes(
    relman, lead, marker, form, algorithm
):
    plain = await export_through_relay(relman, lead, form, resource_type=marker)
    packed = await export_through_relay(
        relman, (*lead, (HEADER, algorithm)), form, resource_type=marker
    )
    assert plain.text.count("\n") >= ROWS  # every row (JSON Lines: no header line)
    assert packed.text == plain.text
    assert plain.wire_bytes > len(plain.text.encode())  # not compressed: the text and framing
    assert packed.wire_bytes * 4 < plain.wire_bytes, (packed.wire_bytes, plain.wire_bytes)


@pytest.mark.parametrize("value", ["identity", " GZIP ", None])
async def test_the_header_decides_and_nothing_else(relman, lead, marker, value):
    """identity or no header: uncompressed; the word is read without case or spaces. A
    call's own compression setting compresses only its request (the servicer cannot see
    it), so without the header the export is not compressed."""
    plain = await export_through_relay(relman, lead, resource_type=marker)
    metadata = lead if value is None else (*lead, (HEADER, value))
    answer = await export_through_relay(
        relman, metadata, compression=grpc.Compression.Gzip, resource_type=marker
    )
    assert answer.text == plain.text
    compressed = answer.wire_bytes * 4 < plain.wire_bytes
    assert compressed == (value == " GZIP "), (answer.wire_bytes, plain.wire_bytes)


@pytest.mark.parametrize("value", ["br", "gzip, identity", "", "snappy" * 100])
async def test_an_unknown_compression_is_refused_before_anything_is_recorded(
    audit_channel, database, lead, marker, value
):
    async def exports_recorded() -> int:
        async with database.transaction() as session:
            return await session.scalar(
                select(func.count()).select_from(AuditLog).where(AuditLog.action == "audit.export")
            )

    before = await exports_recorded()
    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)
    call = stub.ExportAuditLogs(
        audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_type=marker)),
        metadata=(*lead, (HEADER, value)),
        timeout=30,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    info, _ = error_details(refused.value)
    assert info.reason == "UNSUPPORTED_COMPRESSION"
    assert info.metadata["supported"] == "identity,gzip,deflate"
    assert HEADER in refused.value.details()
    assert await exports_recorded() == before
