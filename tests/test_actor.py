"""The caller's address and user agent as the audit trail records them."""

from __future__ import annotations

import pytest

from shared.framework.config import ConfigError, Settings
from shared.identity.actor import TrustedProxies, peer_address, user_agent


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:51234", "127.0.0.1"),
        # What grpc 1.85 reports: the URI form, brackets and a zone's % percent-encoded.
        ("ipv6:%5B::1%5D:41302", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
        ("ipv6:%5Bfe80::1%25eth0%5D:50051", "fe80::1"),
        ("ipv6:%5B::ffff:10.1.2.3%5D:8080", "10.1.2.3"),
        ("ipv6:%5b::1%5d:41302", "::1"),  # lower-case hex is the same encoding
        # The decoded form reads the same.
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("ipv6:[fe80::1%25eth0]:50051", "fe80::1"),
        ("ipv6:[::ffff:10.1.2.3]:8080", "10.1.2.3"),
        ("unix:/run/relman.sock", None),
        ("ipv4:not-an-ip:1", None),
        ("", None),
    ],
)
def test_peer_address_drops_the_port(peer, address):
    assert peer_address(peer) == address


def test_user_agent_is_read_from_metadata_and_capped():
    assert user_agent((("x", "y"), ("user-agent", "grpcurl/1.8.6 grpc-go/1.44"))) == (
        "grpcurl/1.8.6 grpc-go/1.44"
    )
    assert len(user_agent((("user-agent", "a" * 1000),))) == 255
    assert user_agent(()) is None


# -- the caller behind a trusted proxy (TRUSTED_PROXIES) ---------------------------------

PROXIES = TrustedProxies(
    Settings.from_env({"TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16, fd00::/8"}).trusted_proxies
)


def forwarded(*values: str) -> tuple[tuple[str, str], ...]:
    return tuple(("x-forwarded-for", value) for value in values)


@pytest.mark.parametrize(
    ("peer", "metadata", "caller"),
    [
        # From a trusted proxy: the address it appended.
        ("10.0.0.5", forwarded("198.51.100.4"), "198.51.100.4"),
        # A client's forged entries sit left of the real one and are never reached.
        ("10.0.0.5", forwarded("203.0.113.9, 198.51.100.4"), "198.51.100.4"),
        ("10.0.0.5", forwarded("127.0.0.1,10.0.0.5, 198.51.100.4"), "198.51.100.4"),
        # Trusted hops are walked past, right to left, to the first untrusted one.
        ("10.0.0.5", forwarded("203.0.113.9, 198.51.100.4, 10.1.2.3"), "198.51.100.4"),
        # Repeated header fields read as one list, in order.
        ("10.0.0.5", forwarded("203.0.113.9", "198.51.100.4"), "198.51.100.4"),
        # IPv6: a trusted IPv6 proxy, bracketed and mapped entries, a zone dropped.
        ("fd00::1", forwarded("2001:db8::7"), "2001:db8::7"),
        ("fd00::1", forwarded("[2001:DB8::7]"), "2001:db8::7"),
        ("fd00::1", forwarded("::ffff:198.51.100.4"), "198.51.100.4"),
        ("10.0.0.5", forwarded("fe80::1%eth0"), "fe80::1"),
        # Malformed on the walk: the nearest hop that can be named, never the garbage.
        ("10.0.0.5", forwarded("unknown"), "10.0.0.5"),
        ("10.0.0.5", forwarded("198.51.100.4:5123:9"), "10.0.0.5"),
        ("10.0.0.5", forwarded("198.51.100.4:http"), "10.0.0.5"),
        ("fd00::1", forwarded("[2001:db8::7]:x"), "fd00::1"),
        # A port some balancers append is dropped: the client keeps its own address.
        ("10.0.0.5", forwarded("198.51.100.4:5123"), "198.51.100.4"),
        ("fd00::1", forwarded("[2001:db8::7]:443"), "2001:db8::7"),
        ("10.0.0.5", forwarded(""), "10.0.0.5"),
        ("10.0.0.5", forwarded("198.51.100.4, bogus, 10.1.2.3"), "10.1.2.3"),
        ("10.0.0.5", forwarded("bogus, 198.51.100.4"), "198.51.100.4"),
        # Only proxies in the chain: the farthest, however long the chain (bounded).
        ("10.0.0.5", forwarded("10.1.0.9, 10.1.0.8"), "10.1.0.9"),
        ("10.0.0.5", forwarded("198.51.100.4, " + ", ".join(["10.1.0.1"] * 40)), "10.1.0.1"),
        # No header: the proxy itself.
        ("10.0.0.5", (), "10.0.0.5"),
    ],
)
def test_a_trusted_proxy_names_the_caller(peer, metadata, caller):
    assert PROXIES.caller(peer, metadata) == caller


@pytest.mark.parametrize(
    ("peer", "proxies"),
    [
        ("198.51.100.4", PROXIES),  # an untrusted peer forging the header
        ("10.0.0.6", PROXIES),  # next to a trusted proxy is not trusted
        ("2001:db8::1", PROXIES),
        ("10.0.0.5", TrustedProxies()),  # nobody trusted: the default
    ],
)
def test_x_forwarded_for_from_anyone_else_is_ignored(peer, proxies):
    assert proxies.caller(peer, (*forwarded("203.0.113.9"), ("user-agent", "x"))) == peer


def test_a_caller_without_an_address_stays_without_one():
    assert PROXIES.caller(None, forwarded("203.0.113.9")) is None


def test_trusted_proxies_are_addresses_or_networks_checked_at_start_up():
    read = Settings.from_env
    assert read({}).trusted_proxies == ()
    assert [
        str(n) for n in read({"TRUSTED_PROXIES": "127.0.0.2,::1, 10.0.0.0/8,"}).trusted_proxies
    ] == [
        "127.0.0.2/32",
        "::1/128",
        "10.0.0.0/8",
    ]
    # IPv4-mapped, as callers' addresses are compared: in their IPv4 form.
    mapped = read({"TRUSTED_PROXIES": "::ffff:10.2.0.0/112"}).trusted_proxies
    assert TrustedProxies(mapped).trusts("10.2.3.4")
    for bad in ("nginx", "10.0.0.1/8", "0.0.0.0/0", "::/0", "::ffff:0:0/96", "fe80::1%eth0"):
        with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
            read({"TRUSTED_PROXIES": bad})
