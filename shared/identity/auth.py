"""Authenticating a call and the one permission table, for both services.

Every RPC maps to one permission (data, below); every role to the permissions it
holds. The authentication interceptor (shared.framework) asks
`Authenticator.authenticate_and_authorize` before each call: health and reflection
stay open, Login needs no token, everything else needs a valid `authorization: Bearer
<token>` whose user's role holds the RPC's permission. The parts that depend on the
target (the roles an environment's policy lets deploy or vote there) are decided in
the domain (deploy_svc.gates, deploy_svc.deployments). Making, listing and revoking
tokens is shared.identity.tokens'.

Tokens are random strings; only their SHA-256 is stored. A verified token is
cached in-process for at most CACHE_TTL_S, so a revoked or expired token, or one
of a deactivated user, stops working within that time, and no call pays for
bcrypt or more than one small query.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select, text, update

from shared.framework.errors import PermissionDenied, Unauthenticated
from shared.identity.actor import Actor, TrustedProxies, peer_address, user_agent
from shared.persistence import audit_log
from shared.persistence.db import Database
from shared.persistence.models import ApiToken, Role, User

log = logging.getLogger("relman.auth")

PUBLIC = "auth.public"  # no token needed (Login)
SELF = "auth.self"  # any signed-in user, about themselves (Logout, WhoAmI, GetUser, ListUsers)

# Services anyone may call: orchestrators probe health, grpcurl needs reflection.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

RPC_PERMISSIONS: dict[str, str] = {
    # DeployService: releases
    "relman.v1.DeployService/CreateRelease": "releases.write",
    "relman.v1.DeployService/GetRelease": "releases.read",
    "relman.v1.DeployService/ListReleases": "releases.read",
    # DeployService: deployments (the environment's policy also names its deployer roles)
    "relman.v1.DeployService/CreateDeployment": "deployments.write",
    "relman.v1.DeployService/PromoteRelease": "deployments.write",
    "relman.v1.DeployService/UpdatePipelineStage": "deployments.write",
    "relman.v1.DeployService/CancelDeployment": "deployments.write",
    "relman.v1.DeployService/RecordDeploymentMetric": "deployments.write",
    "relman.v1.DeployService/RollbackDeployment": "deployments.write",
    "relman.v1.DeployService/GetRollback": "deployments.read",
    "relman.v1.DeployService/ListRollbacks": "deployments.read",
    "relman.v1.DeployService/GetDeployment": "deployments.read",
    "relman.v1.DeployService/ListDeployments": "deployments.read",
    "relman.v1.DeployService/ListLiveDeployments": "deployments.read",
    "relman.v1.DeployService/WatchDeployment": "deployments.read",
    "relman.v1.DeployService/ApproveDeployment": "deployments.approve",
    "relman.v1.DeployService/RejectDeployment": "deployments.approve",
    # DeployService: catalogue
    "relman.v1.DeployService/GetEnvironment": "catalog.read",
    "relman.v1.DeployService/ListEnvironments": "catalog.read",
    "relman.v1.DeployService/GetService": "catalog.read",
    "relman.v1.DeployService/ListServices": "catalog.read",
    "relman.v1.DeployService/GetTeam": "catalog.read",
    "relman.v1.DeployService/ListTeams": "catalog.read",
    "relman.v1.DeployService/ListRunbooks": "catalog.read",
    "relman.v1.DeployService/GetRunbook": "catalog.read",
    "relman.v1.DeployService/CreateService": "catalog.write",
    "relman.v1.DeployService/UpdateService": "catalog.write",
    "relman.v1.DeployService/CreateEnvironment": "environments.write",  # its type sets the rules
    "relman.v1.DeployService/UpdateEnvironment": "environments.write",  # is_active: deploys
    "relman.v1.DeployService/CreateTeam": "catalog.write",
    "relman.v1.DeployService/CreateRunbook": "catalog.write",
    "relman.v1.DeployService/UpdateRunbook": "catalog.write",
    # DeployService: environment policies and freeze windows
    "relman.v1.DeployService/GetEnvironmentPolicy": "catalog.read",
    "relman.v1.DeployService/UpdateEnvironmentPolicy": "environments.write",
    "relman.v1.DeployService/CreateFreezeWindow": "freezes.write",
    "relman.v1.DeployService/ListFreezeWindows": "deployments.read",
    "relman.v1.DeployService/DeleteFreezeWindow": "freezes.delete",
    "relman.v1.DeployService/CheckPromotion": "deployments.read",
    "relman.v1.DeployService/GetDoraMetrics": "deployments.read",
    # WebhookService: leads and admins (a webhook sees every event it subscribes to)
    "relman.v1.WebhookService/CreateWebhook": "webhooks.admin",
    "relman.v1.WebhookService/ListWebhooks": "webhooks.admin",
    "relman.v1.WebhookService/UpdateWebhook": "webhooks.admin",
    "relman.v1.WebhookService/DeleteWebhook": "webhooks.admin",
    "relman.v1.WebhookService/ListWebhookDeliveries": "webhooks.admin",
    "relman.v1.WebhookService/RedeliverWebhookDelivery": "webhooks.admin",
    # AuthService
    "relman.v1.AuthService/Login": PUBLIC,
    "relman.v1.AuthService/Logout": SELF,
    "relman.v1.AuthService/WhoAmI": SELF,
    # Any signed-in user; the use case lets only an admin read or list others.
    "relman.v1.AuthService/GetUser": SELF,
    "relman.v1.AuthService/ListUsers": SELF,
    "relman.v1.AuthService/CreateUser": "users.admin",
    "relman.v1.AuthService/UpdateUser": "users.admin",
    "relman.v1.AuthService/CreateApiToken": "users.admin",
    "relman.v1.AuthService/ListApiTokens": "users.admin",
    "relman.v1.AuthService/RevokeApiToken": "users.admin",
    # AuditService (setting user_id / ip_address / user_agent also needs audit.write.on_behalf)
    "relman.v1.AuditService/LogAction": "audit.write",
    "relman.v1.AuditService/LogActions": "audit.write",
    "relman.v1.AuditService/ListAuditLogs": "audit.read",
    "relman.v1.AuditService/ExportAuditLogs": "audit.read",
    # The seals and their keys: lead and admin, as the trail they seal.
    "relman.v1.AuditService/GetAuditCheckpoint": "audit.read",
    "relman.v1.AuditService/ListAuditSeals": "audit.read",
    "relman.v1.AuditService/ListAuditSigningKeys": "audit.read",
    "relman.v1.AuditService/VerifyAuditLog": "audit.read",
}

_VIEWER = frozenset({SELF, "catalog.read", "releases.read", "deployments.read"})
_DEVELOPER = _VIEWER | {"releases.write", "deployments.write", "audit.write"}
# Who may learn which usernames exist (a name `users/x` that names nobody is NOT_FOUND
# only to them, shared.framework.names): leads and admins read usernames in the audit
# trail anyway, service users write rows on users' behalf. Viewers and developers cannot
# list users, and Login keeps a wrong username and a wrong password alike.
USER_NAMES = "users.names"
_LEAD = _DEVELOPER | {
    "deployments.approve",
    "freezes.write",
    "catalog.write",
    "audit.read",
    "webhooks.admin",
    USER_NAMES,
}
ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: _VIEWER,
    Role.DEVELOPER: _DEVELOPER,
    Role.LEAD: _LEAD,
    Role.ADMIN: _LEAD
    | {
        "users.admin",
        "audit.write.on_behalf",
        "environments.write",
        "freezes.delete",
        "freezes.override",  # a deploy past a freeze window, with a reason (gates.py)
    },
    Role.SERVICE: frozenset(
        {SELF, "catalog.read", "audit.write", "audit.write.on_behalf", USER_NAMES}
    ),
}


def may(actor: Actor, permission: str) -> bool:
    return actor.role is not None and permission in ROLE_PERMISSIONS[actor.role]


def require(actor: Actor, permission: str, method: str | None = None) -> None:
    """PERMISSION_DENIED, naming the permission, unless the actor's role holds it."""
    if not may(actor, permission):
        metadata = {"permission": permission, "role": str(actor.role or "")}
        if method:
            metadata["method"] = method
        raise PermissionDenied(
            f"role {actor.role or 'none'} lacks permission {permission}",
            reason="MISSING_PERMISSION",
            metadata=metadata,
        )


# -- verifying tokens --------------------------------------------------------------------


def token_hash(token: str) -> str:
    """What is stored of a token, and looked up: its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata) -> str:
    """The token of an `authorization: Bearer <token>` header, or UNAUTHENTICATED."""
    values = [str(value) for key, value in metadata or () if key == "authorization"]
    if not values:
        raise Unauthenticated(
            "this call needs an `authorization: Bearer <token>` header",
            reason="MISSING_CREDENTIALS",
        )
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if len(values) > 1 or scheme.lower() != "bearer" or not token or len(token) > 256:
        raise Unauthenticated(
            "the authorization header must be `Bearer <token>`", reason="MALFORMED_CREDENTIALS"
        )
    return token


@dataclass(frozen=True)
class _Verified:
    token_id: uuid.UUID
    user_id: uuid.UUID
    username: str
    role: Role
    expires_at: datetime | None
    checked_at: float  # time.monotonic() of the database look-up


class TokenVerifier:
    """Token -> user, with a short in-process cache (no bcrypt on this path)."""

    CACHE_TTL_S = 5.0
    CACHE_SIZE = 10_000
    LAST_USED_EVERY_S = 60

    def __init__(self, database: Database) -> None:
        self.database = database
        self._cache: OrderedDict[str, _Verified | float] = OrderedDict()  # float: refusal time

    async def verify(self, token: str) -> _Verified:
        digest = token_hash(token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is None or now - _checked_at(cached) > self.CACHE_TTL_S:
            cached = await self._look_up(digest)
            self._cache[digest] = cached
            self._cache.move_to_end(digest)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(cached, float) or (
            cached.expires_at is not None and cached.expires_at <= datetime.now(UTC)
        ):
            raise Unauthenticated(
                "the token is unknown, expired or revoked, or its user is deactivated",
                reason="INVALID_TOKEN",
            )
        return cached

    async def _look_up(self, digest: str) -> _Verified | float:
        async with self.database.transaction(deadline_s=5) as session:
            row = (
                await session.execute(
                    select(ApiToken.id, ApiToken.expires_at, User.id, User.username, User.role)
                    .join(User, User.id == ApiToken.user_id)
                    .where(
                        ApiToken.token_hash == digest,
                        ApiToken.revoked_at.is_(None),
                        or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > text("now()")),
                        User.is_active,
                        # A token someone else made acts only for a service user, whatever
                        # happened to the user since (UpdateUser revokes them too).
                        or_(ApiToken.created_by == User.id, User.role == Role.SERVICE.value),
                    )
                )
            ).one_or_none()
            if row is None:
                return time.monotonic()
            token_id, expires_at, user_id, username, role = row
            # At most once a minute per token, whichever process sees it.
            await session.execute(
                update(ApiToken)
                .where(
                    ApiToken.id == token_id,
                    or_(
                        ApiToken.last_used_at.is_(None),
                        ApiToken.last_used_at
                        < text(f"now() - interval '{self.LAST_USED_EVERY_S} seconds'"),
                    ),
                )
                .values(last_used_at=text("now()"))
            )
        return _Verified(token_id, user_id, username, Role(role), expires_at, time.monotonic())

    def forget(self, *, token_id: uuid.UUID | None = None, user_id: uuid.UUID | None = None):
        """Drops cached entries at once (this process) after a revocation or deactivation."""
        for digest, entry in list(self._cache.items()):
            if isinstance(entry, _Verified) and (
                entry.token_id == token_id or entry.user_id == user_id
            ):
                del self._cache[digest]


def _checked_at(entry: _Verified | float) -> float:
    return entry if isinstance(entry, float) else entry.checked_at


# -- authenticating and authorizing a call ----------------------------------------------


class DenialLimiter:
    """At most one `auth.denied` row per peer per WINDOW_S; the rest are counted in the next."""

    WINDOW_S = 10.0
    MAX_PEERS = 10_000

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def claim_row(self, peer: str) -> int | None:
        """Claims the peer's one row of the window: None when it is taken (this denial is
        counted for the next row instead), else how many denials were held back before."""
        now = time.monotonic()
        if now - self._last.get(peer, float("-inf")) < self.WINDOW_S:
            self._suppressed[peer] = self._suppressed.get(peer, 0) + 1
            return None
        if len(self._last) >= self.MAX_PEERS:
            self._forget_older_than(now - self.WINDOW_S)
        self._last[peer] = now
        return self._suppressed.pop(peer, 0)

    def _forget_older_than(self, cutoff: float) -> None:
        for peer in [p for p, at in self._last.items() if at < cutoff]:
            del self._last[peer]
            self._suppressed.pop(peer, None)


class Authenticator:
    """Decides whether a call may run, and who is making it: the caller's address is the
    connection's, or what a proxy of `trusted_proxies` forwarded (TRUSTED_PROXIES), so
    that the audit trail, `auth.denied` rows and the login throttle see the real client
    behind a balancer."""

    def __init__(self, database: Database, trusted_proxies: TrustedProxies) -> None:
        self.database = database
        self.verifier = TokenVerifier(database)
        self.denials = DenialLimiter()
        self.trusted_proxies = trusted_proxies

    @staticmethod
    def is_open(method_path: str) -> bool:
        return method_path.split("/")[1] in OPEN_SERVICES

    async def authenticate_and_authorize(self, method_path: str, context) -> Actor:
        """The caller of `method_path` (/pkg.Service/Method), from its bearer token, once its
        role holds the RPC's permission; else a refusal (which is audited)."""
        method = method_path.lstrip("/")
        metadata = context.invocation_metadata()
        peer = self.trusted_proxies.caller(peer_address(context.peer()), metadata)
        actor = Actor.anonymous(peer, user_agent(metadata))
        permission = RPC_PERMISSIONS.get(method)
        if permission == PUBLIC:
            return actor
        try:
            verified = await self.verifier.verify(bearer_token(metadata))
            actor = actor.signed_in(
                verified.user_id, verified.username, verified.role, verified.token_id
            )
            if permission is None:  # an RPC missing from the table: closed, not open
                raise PermissionDenied(
                    f"{method} has no permission defined",
                    reason="MISSING_PERMISSION",
                    metadata={"method": method},
                )
            if permission != SELF:
                require(actor, permission, method)
            return actor
        except (Unauthenticated, PermissionDenied) as denial:
            await self._record_denial(actor, method, denial)
            raise

    async def _record_denial(self, actor: Actor, method: str, denial) -> None:
        suppressed = self.denials.claim_row(actor.peer or "unknown")
        if suppressed is None:
            return
        details = {"code": denial.code.name, "reason": denial.reason, **denial.metadata}
        if suppressed:
            details["suppressed_since_last"] = suppressed
        try:
            async with self.database.transaction(deadline_s=5) as session:
                await audit_log.append(session, actor, "auth.denied", "rpc", method, details)
        except Exception:  # the refusal stands even when it cannot be recorded
            log.warning("could not record a refused call to %s", method, exc_info=True)
