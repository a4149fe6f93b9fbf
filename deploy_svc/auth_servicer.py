"""AuthService over gRPC (transport layer): each method parses the request's fields,
calls one use case of deploy_svc.accounts and converts what it returns; the rules are
shared.identity's (users, tokens, and the permission each RPC needs, in auth).

The caller is `current_actor`, set by the authentication interceptor from the
bearer token and the connection, never from a request field.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from deploy_svc import accounts, convert
from deploy_svc.login_throttle import LoginLimits, PeerQueue
from relman.v1 import auth_pb2, auth_pb2_grpc, common_pb2
from shared.framework.protos import timestamp
from shared.framework.server import Resources
from shared.framework.validation import (
    enum_word,
    masked_changes,
    optional_uuid,
    parse_timestamp,
    parse_uuid,
    request_key,
    text,
)
from shared.identity.actor import current_actor
from shared.persistence.models import Role

AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


def _role(field: str, number: int) -> Role:
    return Role(enum_word(field, common_pb2.Role, number, required=True))


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, resources: Resources) -> None:
        self.database = resources.database
        self.settings = resources.settings
        self.verifier = resources.authenticator.verifier
        self.login_limits = LoginLimits(
            per_user=self.settings.login_failures_per_user,
            per_peer=self.settings.login_failures_per_peer,
            window_s=self.settings.login_throttle_window_s,
            queue_max=self.settings.login_queue_max,
        )
        self.login_peers = PeerQueue()

    async def Login(self, request, context):
        secret, token, user = await accounts.login(
            self.database,
            current_actor.get(),
            request.username,
            request.password,
            self.settings.token_ttl_s,
            self.login_limits,
            self.login_peers,
        )
        return auth_pb2.LoginResponse(
            access_token=secret,
            expires_at=timestamp(token.expires_at),
            user=convert.user(user),
        )

    async def Logout(self, request, context):
        actor = current_actor.get()
        await accounts.logout(self.database, actor)
        self.verifier.forget(token_id=actor.token_id)
        return empty_pb2.Empty()

    async def WhoAmI(self, request, context):
        return convert.user(await accounts.get_user(self.database, current_actor.get().user_id))

    async def GetUser(self, request, context):
        user_id = parse_uuid("user_id", request.user_id)
        return convert.user(await accounts.read_user(self.database, current_actor.get(), user_id))

    async def ListUsers(self, request, context):
        page = await accounts.list_users(
            self.database, current_actor.get(), request.page_size, request.page_token
        )
        return auth_pb2.ListUsersResponse(
            users=[convert.user(user) for user in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def CreateUser(self, request, context):
        actor = current_actor.get()
        user = await accounts.create_user(
            self.database,
            actor,
            username=request.username,
            email=request.email,
            full_name=request.full_name,
            password=request.password,
            role=_role("role", request.role),
            key=request_key(actor, "CreateUser", request),
        )
        return convert.user(user)

    async def UpdateUser(self, request, context):
        user_id = parse_uuid("user.id", request.user.id)
        fields = request.user
        readers = {  # the fields UpdateUser may change
            "role": lambda: _role("user.role", fields.role).value,
            "is_active": lambda: fields.is_active,
            "full_name": lambda: text("user.full_name", fields.full_name, 200, required=False),
        }
        changes = masked_changes(request.update_mask, readers)
        user, revoked = await accounts.update_user(
            self.database, current_actor.get(), user_id, changes
        )
        if revoked or "role" in changes or "is_active" in changes:
            self.verifier.forget(user_id=user.id)
        return convert.user(user)

    async def CreateApiToken(self, request, context):
        user_id = parse_uuid("user_id", request.user_id)
        expires_at = (
            parse_timestamp("expires_at", request.expires_at)
            if request.HasField("expires_at")
            else None
        )
        actor = current_actor.get()
        secret, token = await accounts.create_api_token(
            self.database,
            actor,
            user_id,
            request.name,
            expires_at,
            never_expires=request.never_expires,
            key=request_key(actor, "CreateApiToken", request),
        )
        # A retried request (same request_id) gets the record with an empty secret.
        return auth_pb2.CreateApiTokenResponse(api_token=convert.api_token(token), token=secret)

    async def ListApiTokens(self, request, context):
        user_id = optional_uuid("user_id", request.user_id)
        page = await accounts.list_api_tokens(
            self.database, user_id, request.page_size, request.page_token
        )
        return auth_pb2.ListApiTokensResponse(
            api_tokens=[convert.api_token(token) for token in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def RevokeApiToken(self, request, context):
        token_id = parse_uuid("token_id", request.token_id)
        token = await accounts.revoke_api_token(self.database, current_actor.get(), token_id)
        self.verifier.forget(token_id=token.id)
        return convert.api_token(token)
