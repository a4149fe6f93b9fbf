"""Where a webhook may send (domain layer): the one address policy, checked when a webhook
is made or its URL changed (`check_url`) and again at every connection the dispatcher
opens, after resolving the name (`allowed_address`, through its resolver): a name that
resolved to a receiver at creation and to the metadata service later is refused then.

Refused always: link-local addresses (169.254.0.0/16, fe80::/10, and their IPv4-mapped
and NAT64 forms) and the cloud metadata addresses (169.254.169.254, fd00:ec2::254,
100.100.100.200). With WEBHOOK_ALLOWED_NETWORKS set, only addresses in those networks.
Loopback and private ranges are allowed otherwise: receivers are often internal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import yarl

from shared.framework.config import Network
from shared.framework.errors import InvalidArgument

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
RESOLVE_TIMEOUT_S = 5.0


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped ::ffff:a.b.c.d, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: Address, allowed: tuple[Network, ...]) -> str | None:
    """Why a receiver at `address` is refused, or None if it may be sent to."""
    for candidate in filter(None, (address, _embedded_ipv4(address))):
        if candidate in _METADATA:
            return f"{address} is a cloud metadata address"
        if any(candidate in network for network in _LINK_LOCAL):
            return f"{address} is link-local"
    if allowed and not any(address in network for network in allowed):
        return f"{address} is outside WEBHOOK_ALLOWED_NETWORKS"
    return None


def check_shape(url: str) -> tuple[str, int]:
    """The URL's host and port, or INVALID_ARGUMENT on `url`: http or https, an ASCII host
    (an internationalized name in its xn-- form: the dispatcher's client and this check
    must read the same host), a port from 1, no user or password, no fragment, at most
    MAX_URL_LENGTH characters, and a URL the dispatcher's client can send to."""
    if not url:
        raise InvalidArgument.field("url", "is required")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgument.field("url", f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidArgument.field("url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        parsed = yarl.URL(url)
    except ValueError:
        raise InvalidArgument.field("url", "is not a well-formed URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument.field("url", "must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument.field("url", "must not carry a user or password")
    if parts.fragment:
        raise InvalidArgument.field("url", "must not have a fragment")
    if not host:
        raise InvalidArgument.field("url", "must name a host")
    if not parts.netloc.isascii():
        raise InvalidArgument.field("url", "must name its host in ASCII (xn-- for a name)")
    if port == 0:
        raise InvalidArgument.field("url", "must not name port 0")
    if (parsed.host or "").lower() != host.lower():
        raise InvalidArgument.field("url", "is not a well-formed URL")
    return host, port or (443 if parts.scheme == "https" else 80)


def origin(url: str) -> str:
    """Where a URL sends, without its path, query or credentials (a path is often a
    credential itself: Slack's incoming webhooks): what audit rows, logs and events keep."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a malformed URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}"


async def check_url(url: str, allowed: tuple[Network, ...]) -> None:
    """INVALID_ARGUMENT on `url` unless its shape is right and every address its host
    resolves to now may be sent to (a name that does not resolve is refused too)."""
    host, port = check_shape(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidArgument.field("url", f"host {host!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        reason = refusal(address, allowed)
        if reason:
            raise InvalidArgument.field("url", f"may not be sent to: {reason}")
