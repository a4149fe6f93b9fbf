"""AuditService over gRPC (transport layer): proto in, proto out, no SQL.

RPCs not built yet answer UNIMPLEMENTED naming themselves (shared.server.with_unimplemented).
"""

from __future__ import annotations

import grpc

from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.db import Database
from shared.server import Resources, with_unimplemented

AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"]


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, database: Database) -> None:
        self.database = database


def register(server: grpc.aio.Server, resources: Resources) -> list[str]:
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        with_unimplemented(AuditServicer(resources.database), AUDIT_SERVICE), server
    )
    return [AUDIT_SERVICE.full_name]
