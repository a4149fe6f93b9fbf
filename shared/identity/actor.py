"""Who is calling: built by the transport from the bearer token and the connection.

The caller is never taken from a request field: user id and role come from the
token, the address from the connection (the peer, without its port), and the
user agent from the `user-agent` metadata.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from dataclasses import dataclass, replace
from urllib.parse import unquote

from shared.framework.validation import canonical_ip
from shared.persistence.models import Role

USER_AGENT_MAX = 255


@dataclass(frozen=True)
class Actor:
    user_id: uuid.UUID | None  # None: not authenticated (Login, refused calls, the CLI)
    username: str | None
    role: Role | None
    peer: str | None  # IPv4 or IPv6 address, no port; None for Unix sockets and the CLI
    user_agent: str | None
    token_id: uuid.UUID | None = None

    @classmethod
    def anonymous(cls, peer: str | None, user_agent: str | None) -> Actor:
        return cls(None, None, None, peer, user_agent)

    def signed_in(
        self, user_id: uuid.UUID, username: str, role: Role, token_id: uuid.UUID | None
    ) -> Actor:
        return replace(self, user_id=user_id, username=username, role=role, token_id=token_id)


def peer_address(peer: str | None) -> str | None:
    """`ipv4:10.0.0.7:5123` -> `10.0.0.7`; `ipv6:%5B::1%5D:5123` -> `::1`; others -> None.

    gRPC gives the peer as a URI, percent-encoded (grpc 1.85: `ipv6:%5B::1%5D:41302`,
    a zone as `%25eth0`): decoded first, else every IPv6 caller would have no address,
    share one login throttle key and leave `ip_address` empty in the audit trail."""
    if not peer:
        return None
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
        host = host.split("%", 1)[0]  # drop a zone index (fe80::1%eth0)
    else:
        return None
    return canonical_ip(host)


def user_agent(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "user-agent":
            return str(value)[:USER_AGENT_MAX]
    return None


# The caller of the RPC being served, set by the AuthInterceptor (shared.framework.interceptors).
current_actor: ContextVar[Actor] = ContextVar("current_actor")
