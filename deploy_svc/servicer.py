"""DeployService and AuthService over gRPC (transport layer): proto in, proto out, no SQL.

RPCs not built yet answer UNIMPLEMENTED naming themselves (shared.server.with_unimplemented).
"""

from __future__ import annotations

import grpc

from deploy_svc import catalog, convert
from relman.v1 import auth_pb2, auth_pb2_grpc, deploy_pb2, deploy_pb2_grpc
from shared.config import Settings
from shared.db import Database
from shared.server import with_unimplemented
from shared.validation import parse_uuid

DEPLOY_SERVICE = deploy_pb2.DESCRIPTOR.services_by_name["DeployService"]
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


class DeployServicer(deploy_pb2_grpc.DeployServiceServicer):
    def __init__(self, database: Database) -> None:
        self.database = database

    async def GetRunbook(self, request, context: grpc.aio.ServicerContext):
        runbook_id = parse_uuid("runbook_id", request.runbook_id)
        async with self.database.transaction(context.time_remaining()) as session:
            return convert.runbook(await catalog.get_runbook(session, runbook_id))


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    pass


def register(server: grpc.aio.Server, database: Database, settings: Settings) -> list[str]:
    deploy_pb2_grpc.add_DeployServiceServicer_to_server(
        with_unimplemented(DeployServicer(database), DEPLOY_SERVICE), server
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(
        with_unimplemented(AuthServicer(), AUTH_SERVICE), server
    )
    return [DEPLOY_SERVICE.full_name, AUTH_SERVICE.full_name]
