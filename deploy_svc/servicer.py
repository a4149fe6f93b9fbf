"""DeployService and AuthService over gRPC (transport layer): proto in, proto out, no SQL.

The caller is `current_actor`, set by the authentication interceptor from the
bearer token and the connection, never from a request field. RPCs not built
yet answer UNIMPLEMENTED naming themselves (shared.server.with_unimplemented).
"""

from __future__ import annotations

from datetime import UTC

import grpc
from google.protobuf import empty_pb2

from deploy_svc import catalog, convert, identity
from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc
from shared import tokens
from shared.actor import current_actor
from shared.db import Database
from shared.errors import InvalidArgument
from shared.models import Role
from shared.protos import enum_from_proto, timestamp
from shared.server import Resources, with_unimplemented
from shared.validation import optional_uuid, parse_uuid, text

DEPLOY_SERVICE = deploy_pb2.DESCRIPTOR.services_by_name["DeployService"]
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


class DeployServicer(deploy_pb2_grpc.DeployServiceServicer):
    def __init__(self, database: Database) -> None:
        self.database = database

    async def GetRunbook(self, request, context: grpc.aio.ServicerContext):
        runbook_id = parse_uuid("runbook_id", request.runbook_id)
        async with self.database.transaction(context.time_remaining()) as session:
            return convert.runbook(await catalog.get_runbook(session, runbook_id))


def _role(field: str, number: int, *, required: bool) -> Role | None:
    word = enum_from_proto(common_pb2.Role, number)
    if word is None and (required or number != 0):
        raise InvalidArgument.field(
            field, "must be one of ROLE_ADMIN, ROLE_LEAD, ROLE_DEVELOPER, ROLE_VIEWER, ROLE_SERVICE"
        )
    return Role(word) if word else None


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, resources: Resources) -> None:
        self.database = resources.database
        self.settings = resources.settings
        self.verifier = resources.authenticator.verifier

    async def Login(self, request, context):
        secret, token, user = await identity.login(
            self.database,
            current_actor.get(),
            request.username,
            request.password,
            self.settings.token_ttl_s,
        )
        return auth_pb2.LoginResponse(
            access_token=secret,
            expires_at=timestamp(token.expires_at),
            user=convert.user(user),
        )

    async def Logout(self, request, context):
        actor = current_actor.get()
        await identity.logout(self.database, actor)
        self.verifier.forget(token_id=actor.token_id)
        return empty_pb2.Empty()

    async def WhoAmI(self, request, context):
        return convert.user(await identity.get_user(self.database, current_actor.get().user_id))

    async def CreateUser(self, request, context):
        user = await identity.create_user(
            self.database,
            current_actor.get(),
            username=request.username,
            email=request.email,
            full_name=request.full_name,
            password=request.password,
            role=_role("role", request.role, required=True),
            request_id=optional_uuid("request_id", request.request_id),
        )
        return convert.user(user)

    async def UpdateUser(self, request, context):
        user_id = parse_uuid("user.id", request.user.id)
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument.field("update_mask", "must name the fields to change")
        changes: dict[str, object] = {}
        for path in paths:
            if path == "role":
                changes["role"] = _role("user.role", request.user.role, required=True).value
            elif path == "is_active":
                changes["is_active"] = request.user.is_active
            elif path == "full_name":
                changes["full_name"] = text(
                    "user.full_name", request.user.full_name, 200, required=False
                )
            else:
                raise InvalidArgument.field(
                    "update_mask", f"{path!r} cannot be changed (role, is_active, full_name can)"
                )
        user, revoked = await identity.update_user(
            self.database, current_actor.get(), user_id, changes
        )
        if revoked or "role" in changes or "is_active" in changes:
            self.verifier.forget(user_id=user.id)
        return convert.user(user)

    async def CreateApiToken(self, request, context):
        user_id = parse_uuid("user_id", request.user_id)
        expires_at = (
            request.expires_at.ToDatetime(tzinfo=UTC) if request.HasField("expires_at") else None
        )
        user = await identity.get_user(self.database, user_id)
        async with self.database.transaction() as session:
            secret, token = await tokens.create_token(
                session, current_actor.get(), user, request.name, expires_at
            )
        return auth_pb2.CreateApiTokenResponse(api_token=convert.api_token(token), token=secret)

    async def ListApiTokens(self, request, context):
        user_id = optional_uuid("user_id", request.user_id)
        async with self.database.transaction(context.time_remaining()) as session:
            page = await tokens.list_tokens(session, user_id, request.page_size, request.page_token)
        return auth_pb2.ListApiTokensResponse(
            api_tokens=[convert.api_token(token) for token in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def RevokeApiToken(self, request, context):
        token_id = parse_uuid("token_id", request.token_id)
        async with self.database.transaction() as session:
            token = await tokens.revoke_token(session, current_actor.get(), token_id)
        self.verifier.forget(token_id=token.id)
        return convert.api_token(token)


def register(server: grpc.aio.Server, resources: Resources) -> list[str]:
    deploy_pb2_grpc.add_DeployServiceServicer_to_server(
        with_unimplemented(DeployServicer(resources.database), DEPLOY_SERVICE), server
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(
        with_unimplemented(AuthServicer(resources), AUTH_SERVICE), server
    )
    return [DEPLOY_SERVICE.full_name, AUTH_SERVICE.full_name]
