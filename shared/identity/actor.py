"""Who is calling: built by the transport from the bearer token and the connection.

The caller is never taken from a request field: user id and role come from the
token, the address from the connection (the peer, without its port) or, when the
connection is a proxy named in TRUSTED_PROXIES, from the `x-forwarded-for` it set
(TrustedProxies), and the user agent from the `user-agent` metadata.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable
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
    # IPv4 or IPv6 address, no port (behind a trusted proxy, the one it forwarded); None
    # for Unix sockets and the CLI. The audit trail and the login throttle key on it.
    peer: str | None
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
    if kind not in ("ipv4", "ipv6"):
        return None
    return forwarded_address(rest)  # the same forms: a port, brackets, a zone


FORWARDED_FOR = "x-forwarded-for"
# Hops of x-forwarded-for looked at, from the right: past this many proxies in a row the
# farthest one looked at is the caller (a chain that long is a loop or an attack).
FORWARDED_HOPS_MAX = 16


class TrustedProxies:
    """The proxies whose `x-forwarded-for` names the caller (the TRUSTED_PROXIES setting).

    Behind a balancer every connection comes from the balancer: without this the audit
    trail would record its address for everyone and the login throttle would count every
    caller's failures as one address's. The header is believed only from a connection
    whose address is trusted; from anyone else it is ignored, since any client can send
    one. From a trusted proxy the caller is the right-most address of the header that is
    not itself a trusted proxy: each proxy appends the address it saw, so entries to the
    left of the first untrusted one (walking from the right) were written by a client and
    are never reached, and a client cannot forge its way past the proxy (nginx's
    `$proxy_add_x_forwarded_for` keeps a client's forged header and appends the real
    address to it: the right-most untrusted entry is still the real one).

    A malformed entry on that walk (not an address; a port; "unknown") stops it: the
    caller is then the nearest hop that could be named, the trusted proxy that passed the
    entry on, rather than a refusal, which would fail every call behind a proxy that
    forwards something odd. When every hop is a trusted proxy the caller is the farthest
    (a health checker on the proxy's own network). Several `x-forwarded-for` entries of
    the metadata read as one list, in order, as HTTP combines repeated fields.
    """

    def __init__(
        self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
    ) -> None:
        self.networks = tuple(networks)

    def trusts(self, address: str) -> bool:
        """Whether `address` (canonical, shared.framework.validation) is a trusted proxy."""
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self.networks)

    def caller(self, peer: str | None, metadata) -> str | None:
        """The caller's address: `peer` (the connection's, from peer_address), or the one a
        trusted proxy forwarded."""
        if not self.networks or peer is None or not self.trusts(peer):
            return peer
        values = [str(value) for key, value in metadata or () if key == FORWARDED_FOR]
        if not values:
            return peer
        caller = peer
        for entry in reversed(",".join(values).split(",")[-FORWARDED_HOPS_MAX:]):
            address = forwarded_address(entry)
            if address is None:
                return caller
            caller = address
            if not self.trusts(address):
                break
        return caller


def forwarded_address(entry: str) -> str | None:
    """One `x-forwarded-for` entry as a canonical address: `10.0.0.7`, `2001:db8::7`,
    `[2001:db8::7]` (a zone dropped, as for peers), and with a port (`10.0.0.7:5123`,
    `[2001:db8::7]:443`), as some balancers write them (refused, they would give every
    caller behind such a balancer its address and one login throttle). None for
    anything else."""
    host = entry.strip()
    if host.startswith("["):
        host, closed, port = host[1:].partition("]")
        if not closed or (port and not _is_port(port)):
            return None
    elif host.count(":") == 1:  # IPv4 with a port; IPv6 has two colons at least
        host, _, port = host.partition(":")
        if not _is_port(":" + port):
            return None
    host = host.split("%", 1)[0]
    return canonical_ip(host) if host else None


def _is_port(suffix: str) -> bool:
    return suffix[:1] == ":" and suffix[1:].isdigit() and 0 < int(suffix[1:]) < 65536


def user_agent(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "user-agent":
            return str(value)[:USER_AGENT_MAX]
    return None


# The caller of the RPC being served, set by the AuthInterceptor (shared.framework.interceptors).
current_actor: ContextVar[Actor] = ContextVar("current_actor")
