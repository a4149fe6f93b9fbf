"""The caller's address and user agent as the audit trail records them."""

from __future__ import annotations

import pytest

from shared.identity.actor import peer_address, user_agent


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
