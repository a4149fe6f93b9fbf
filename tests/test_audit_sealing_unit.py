"""The sealing domain without a database or a service: the encodings and the Merkle tree
an auditor may reimplement in another language, and the verifier's verdicts on seals and
rows tampered in each way (audit_svc.sealing, audit_svc.verify's argument parsing).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit_svc import verify
from audit_svc.sealing import (
    BACKDATED_BY,
    BAD_SIGNATURE,
    CHECKPOINT_MISMATCH,
    ROW_ADDED,
    ROW_MISSING,
    ROW_MODIFIED,
    SEAL_CHAIN_BROKEN,
    SEAL_TAG,
    UNKNOWN_KEY,
    Problem,
    SealableRow,
    Verification,
    check_checkpoint,
    check_rows,
    check_seal,
    choose_rows,
    group_rows,
    key_id,
    leaf_hash,
    make_seal,
    merkle_root,
    parse_digests,
    row_digests,
    row_encoding,
)

SIGNING_KEY = Ed25519PrivateKey.generate()
KEY_ID = key_id(SIGNING_KEY.public_key())
KEYS = {KEY_ID: SIGNING_KEY.public_key()}
SEALED_AT = datetime(2026, 11, 30, 15, 0, 0, 123456, tzinfo=UTC)


def rfc6962_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1's MTH, written from its recursive definition: the left subtree
    holds the largest power of two smaller than n leaves."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    split = 1
    while split * 2 < len(leaves):
        split *= 2
    return hashlib.sha256(
        b"\x01" + rfc6962_root(leaves[:split]) + rfc6962_root(leaves[split:])
    ).digest()


def test_merkle_root_is_rfc_6962s_tree_hash_for_every_size_up_to_70():
    """Odd sizes are where level-by-level trees go wrong (duplicating the last node)."""
    leaves = [leaf_hash(f"row {i}".encode()) for i in range(70)]
    for count in range(71):
        assert merkle_root(leaves[:count]) == rfc6962_root(leaves[:count]), count


def test_leaf_and_roots_match_the_published_rfc_6962_vectors():
    """The Certificate Transparency reference vectors: an auditor's own RFC 6962 code,
    in any language, gets the same roots."""
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert merkle_root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    inputs = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43",
              bytes(range(0x50, 0x58)), bytes(range(0x60, 0x70))]  # fmt: skip
    roots = {
        2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    }
    for count, root in roots.items():
        assert merkle_root([leaf_hash(data) for data in inputs[:count]]).hex() == root


def test_a_row_encodes_each_cells_utf8_bytes_after_their_length():
    """Lengths count bytes, not characters, so no cell can run into the next."""
    assert row_encoding(["é", "", "ab"]) == (
        b"\x00\x00\x00\x02\xc3\xa9" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02ab"
    )
    assert row_encoding(["ab", "c"]) != row_encoding(["a", "bc"])


def test_row_digests_round_trip_sequences_and_leaf_heads():
    rows = [(1, leaf_hash(b"a")), (2**40 + 7, leaf_hash(b"b"))]
    assert len(row_digests(rows)) == 32
    assert parse_digests(row_digests(rows)) == [(s, leaf[:8]) for s, leaf in rows]


def _leaves(first: int, last: int) -> list[tuple[int, bytes]]:
    return [(s, leaf_hash(f"row {s}".encode())) for s in range(first, last + 1)]


def _sealable(first: int, last: int) -> list[SealableRow]:
    """The rows of _leaves as the sealer reads them, a second apart, the last at SEALED_AT."""
    return [
        SealableRow(s, SEALED_AT - timedelta(seconds=last - s), leaf)
        for s, leaf in _leaves(first, last)
    ]


def _chain(*ranges: tuple[int, int]):
    """Signed, chained seals over rows of `ranges` (every sequence has a row)."""
    seals, previous = [], None
    for number, (first, last) in enumerate(ranges, start=1):
        previous = make_seal(
            number, first, last, _sealable(first, last), previous.seal_hash if previous else b"",
            KEY_ID, SIGNING_KEY, SEALED_AT,
        )  # fmt: skip
        seals.append(previous)
    return seals


def test_a_seal_encodes_its_fields_after_the_tag_and_signs_their_hash():
    (seal,) = _chain((1, 3))
    encoding = seal.encoding()
    assert encoding.startswith(len(SEAL_TAG).to_bytes(4, "big") + SEAL_TAG)
    assert b"2026-11-30T15:00:00.123456Z" in encoding
    assert seal.seal_hash == hashlib.sha256(encoding).digest()
    SIGNING_KEY.public_key().verify(seal.signature, seal.seal_hash)
    assert check_seal(seal, None, KEYS) == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("root_hash", b"\x01" * 32),
        ("row_count", 4),
        ("last_sequence", 9),
        ("row_digests", b""),
        ("sealed_at", SEALED_AT + timedelta(microseconds=1)),
    ],
)
def test_any_field_changed_is_bad_signature_even_with_a_recomputed_hash(field, value):
    (seal,) = _chain((1, 3))
    changed = dataclasses.replace(seal, **{field: value})
    rehashed = dataclasses.replace(changed, seal_hash=changed.computed_hash())
    for forged in (changed, rehashed):
        assert [p.kind for p in check_seal(forged, None, KEYS)] == [BAD_SIGNATURE]


def test_a_seal_by_a_key_not_given_is_unknown_key():
    (seal,) = _chain((1, 3))
    other = Ed25519PrivateKey.generate().public_key()
    problems = check_seal(seal, None, {key_id(other): other})
    assert [(p.kind, p.seal_number) for p in problems] == [(UNKNOWN_KEY, 1)]


def test_a_seal_must_follow_the_one_before_it():
    first, second, third = _chain((1, 3), (4, 6), (7, 9))
    assert check_seal(second, first, KEYS) == []
    assert [p.kind for p in check_seal(third, first, KEYS)] == [SEAL_CHAIN_BROKEN]
    # The first seal of all starts the chain at sequence 1.
    late_start = make_seal(1, 2, 3, _sealable(2, 3), b"", KEY_ID, SIGNING_KEY, SEALED_AT)
    assert [p.kind for p in check_seal(late_start, None, KEYS)] == [SEAL_CHAIN_BROKEN]


def test_rows_against_their_seal_name_the_sequence_and_the_kind():
    (seal,) = _chain((1, 6))
    rows = _leaves(1, 6)
    assert check_rows(seal, rows) == []
    modified = [*rows[:2], (3, leaf_hash(b"forged")), *rows[3:]]
    missing = rows[:2] + rows[3:]
    added = sorted([*rows, (4, leaf_hash(b"a twin"))], key=lambda row: row[0])
    found = {
        name: [(p.kind, p.sequence, p.seal_number) for p in check_rows(seal, case)]
        for name, case in (("modified", modified), ("missing", missing), ("added", added))
    }
    assert found == {
        "modified": [(ROW_MODIFIED, 3, 1)],
        "missing": [(ROW_MISSING, 3, 1)],
        "added": [(ROW_ADDED, 4, 1)],
    }


def test_the_sealer_leaves_out_backdated_rows_and_second_rows_of_a_sequence():
    newest = SEALED_AT

    def row(sequence: int, age: timedelta) -> SealableRow:
        return SealableRow(sequence, newest - age, leaf_hash(str(sequence).encode()))

    rows = [
        row(1, timedelta(0)),
        row(2, BACKDATED_BY),  # just within
        row(3, BACKDATED_BY + timedelta(microseconds=1)),
        row(1, timedelta(0)),
        row(4, timedelta(days=400)),
    ]
    kept, left_out = choose_rows(rows, newest)
    assert [r.sequence for r in kept] == [1, 2]
    assert [(r.sequence, why.split(":")[0]) for r, why in left_out] == [
        (1, "a second row with a sequence already sealed"),
        (3, "backdated"),
        (4, "backdated"),
    ]
    # Before the first seal nothing is backdated: a trail loaded out of order is sealed.
    assert [r.sequence for r in choose_rows(rows[1:], None)[0]] == [1, 2, 3, 4]


def test_a_verification_reports_problems_in_seal_order_and_counts_what_it_read():
    seals = _chain((1, 3), (4, 6), (7, 9))
    rows = [r for r in _leaves(1, 12) if r[0] != 5]  # 10..12 are not sealed yet
    outcome = Verification(KEYS)
    for seal, mine in group_rows(seals, rows):
        outcome.check(seal, mine)
    assert (outcome.rows_checked, outcome.seals_checked) == (8, 3)
    assert [(p.kind, p.sequence, p.seal_number) for p in outcome.problems] == [(ROW_MISSING, 5, 2)]
    assert str(outcome.problems[0]) == "ROW_MISSING (seal 2, sequence 5): a sealed row is gone"
    assert (
        str(Problem(SEAL_CHAIN_BROKEN, seal_number=3, detail="x"))
        == "SEAL_CHAIN_BROKEN (seal 3): x"
    )


def test_a_checkpoint_is_the_seal_with_that_hash():
    (seal,) = _chain((1, 3))
    assert check_checkpoint(seal, 1, seal.seal_hash) is None
    assert check_checkpoint(seal, 1, b"\x00" * 32).kind == CHECKPOINT_MISMATCH
    assert check_checkpoint(None, 1, seal.seal_hash).kind == CHECKPOINT_MISMATCH


def test_the_offline_checkpoint_takes_base64_or_hex_and_refuses_the_rest():
    digest = hashlib.sha256(b"seal").digest()
    assert verify.parse_checkpoint(f"42:{base64.b64encode(digest).decode()}") == (42, digest)
    assert verify.parse_checkpoint(f"42:{digest.hex()}") == (42, digest)
    for text in ("42", "0:" + digest.hex(), "x:" + digest.hex(), "42:" + digest.hex()[:62],
                 "42:not base64!"):  # fmt: skip
        with pytest.raises(verify.UnreadableInput):
            verify.parse_checkpoint(text)
