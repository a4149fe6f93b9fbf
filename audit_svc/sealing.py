"""Seals over the audit trail (domain layer, no database, no gRPC): the canonical
encodings, the Merkle tree, a seal's hash and signature, and the checks of a verifier.

The same code checks the trail for VerifyAuditLog (rows' leaf hashes computed by the
database, audit_svc.seal_store) and for the offline verifier (leaf hashes computed here
from a raw CSV export, audit_svc.verify), so the two cannot disagree on what is valid.
The encodings are the README's ("Sealed audit trail"), precise enough to write a
verifier in another language:

- a row: its fields in ROW_FIELDS order, each as the export prints it (UTF-8, a NULL as
  the empty string), each preceded by its length in bytes as 4 bytes big-endian;
- a leaf hash: SHA-256(0x00 || row encoding); the root: RFC 6962's Merkle tree hash
  over the leaves in sequence order (node = SHA-256(0x01 || left || right));
- a seal: SEAL_TAG then its fields in SEAL_FIELDS order, encoded the same way (numbers
  in decimal, hashes and digests as raw bytes, times as RFC 3339 UTC with 6
  fractional digits, an absent time as empty); seal_hash = SHA-256 of it; signature =
  Ed25519 over seal_hash.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# A row's fields in the order they are encoded: the export's columns but username (not
# the row's: users are renamed), sequence first. Spelled out, not derived from the export
# or the table: it is the seal format (v1), which must not change when they do.
ROW_FIELDS = (
    "sequence",
    "id",
    "created_at",
    "user_id",
    "action",
    "resource_type",
    "resource_id",
    "details",
    "ip_address",
    "user_agent",
    "origin",
    "recorded_by",
)
SEAL_TAG = b"relman.audit.seal.v1"
SEAL_FIELDS = (
    "seal_number",
    "first_sequence",
    "last_sequence",
    "row_count",
    "root_hash",
    "row_digests",
    "previous_seal_hash",
    "key_id",
    "sealed_at",
    "oldest_created_at",
    "newest_created_at",
)
# Each row in a seal's row_digests: its sequence, then the head of its leaf hash.
DIGEST_BYTES = 16
# A row whose created_at is older than the newest sealed one by more than this is
# backdated: the sealer leaves it out of seals (ROW_ADDED).
BACKDATED_BY = timedelta(minutes=1)
# At most this many rows in one seal.
ROWS_PER_SEAL = 10_000

ROW_MODIFIED = "ROW_MODIFIED"
ROW_MISSING = "ROW_MISSING"
ROW_ADDED = "ROW_ADDED"
SEAL_CHAIN_BROKEN = "SEAL_CHAIN_BROKEN"
BAD_SIGNATURE = "BAD_SIGNATURE"
UNKNOWN_KEY = "UNKNOWN_KEY"
CHECKPOINT_MISMATCH = "CHECKPOINT_MISMATCH"


def _encode(values: Iterable[bytes]) -> bytes:
    return b"".join(len(value).to_bytes(4, "big") + value for value in values)


def row_encoding(cells: Sequence[str]) -> bytes:
    """A row's canonical encoding from its export cells, in ROW_FIELDS order."""
    return _encode(cell.encode() for cell in cells)


def leaf_hash(encoding: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + encoding).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962's Merkle tree hash over leaf hashes (level by level; a level's odd last
    node goes up as it is, which is the RFC's left-balanced tree)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = list(leaves)
    sha256 = hashlib.sha256
    while len(level) > 1:
        pairs = [
            sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            pairs.append(level[-1])
        level = pairs
    return level[0]


def time_text(moment: datetime) -> str:
    """A time as the export and the seal encoding write it: RFC 3339, UTC, microseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_digests(rows: Sequence[tuple[int, bytes]]) -> bytes:
    """The seal's row_digests for (sequence, leaf hash) pairs in sequence order."""
    return b"".join(sequence.to_bytes(8, "big") + leaf[:8] for sequence, leaf in rows)


def parse_digests(digests: bytes) -> list[tuple[int, bytes]]:
    return [
        (int.from_bytes(digests[i : i + 8], "big"), digests[i + 8 : i + DIGEST_BYTES])
        for i in range(0, len(digests) - DIGEST_BYTES + 1, DIGEST_BYTES)
    ]


@dataclass(frozen=True)
class Seal:
    seal_number: int
    first_sequence: int
    last_sequence: int
    row_count: int
    root_hash: bytes
    row_digests: bytes
    previous_seal_hash: bytes
    seal_hash: bytes
    key_id: str
    signature: bytes
    sealed_at: datetime
    # The oldest and newest created_at of its rows (None: it holds none): signed, so that
    # the seals of a time window are found by what the sealer said.
    oldest_created_at: datetime | None = None
    newest_created_at: datetime | None = None

    def encoding(self) -> bytes:
        values = {name: getattr(self, name) for name in SEAL_FIELDS}
        for name in ("sealed_at", "oldest_created_at", "newest_created_at"):
            values[name] = "" if values[name] is None else time_text(values[name])
        return _encode(
            [SEAL_TAG] + [v if isinstance(v, bytes) else str(v).encode() for v in values.values()]
        )

    def computed_hash(self) -> bytes:
        return hashlib.sha256(self.encoding()).digest()


def make_seal(
    seal_number: int,
    first_sequence: int,
    last_sequence: int,
    rows: Sequence[SealableRow],
    previous_seal_hash: bytes,
    key_id: str,
    private_key: Ed25519PrivateKey,
    sealed_at: datetime,
) -> Seal:
    """The signed seal of `rows` (in sequence order)."""
    times = [row.created_at for row in rows]
    unsigned = Seal(
        seal_number=seal_number,
        first_sequence=first_sequence,
        last_sequence=last_sequence,
        row_count=len(rows),
        root_hash=merkle_root([row.leaf for row in rows]),
        row_digests=row_digests([(row.sequence, row.leaf) for row in rows]),
        previous_seal_hash=previous_seal_hash,
        seal_hash=b"",
        key_id=key_id,
        signature=b"",
        sealed_at=sealed_at,
        oldest_created_at=min(times, default=None),
        newest_created_at=max(times, default=None),
    )
    seal_hash = unsigned.computed_hash()
    return Seal(
        **{
            **unsigned.__dict__,
            "seal_hash": seal_hash,
            "signature": private_key.sign(seal_hash),
        }
    )


class SealableRow(NamedTuple):
    """A row as a seal takes it. A named tuple: the sealer makes one per row sealed."""

    sequence: int
    created_at: datetime
    leaf: bytes


_SEQUENCE = operator.attrgetter("sequence")


def choose_rows(
    rows: Iterable[SealableRow], newest_sealed: datetime | None
) -> tuple[list[SealableRow], list[tuple[SealableRow, str]]]:
    """The rows a seal takes (in sequence order) and those it leaves out, each with why
    (ROW_ADDED in a later verification): a second row with a sequence already taken, and
    a backdated row (older than `newest_sealed`, the newest row sealed before, by more
    than BACKDATED_BY; rows are not measured against each other)."""
    kept: list[SealableRow] = []
    left_out: list[tuple[SealableRow, str]] = []
    taken: set[int] = set()
    backdated_before = None if newest_sealed is None else newest_sealed - BACKDATED_BY
    for row in sorted(rows, key=_SEQUENCE):
        if row.sequence in taken:
            left_out.append((row, "a second row with a sequence already sealed"))
        elif backdated_before is not None and row.created_at < backdated_before:
            left_out.append((row, f"backdated: created before {time_text(newest_sealed)}"))
        else:
            kept.append(row)
            taken.add(row.sequence)
    return kept, left_out


def _month(moment: datetime) -> tuple[int, int]:
    moment = moment.astimezone(UTC)
    return moment.year, moment.month


def _month_span(moment: datetime) -> tuple[datetime, datetime]:
    """The UTC month of `moment` as [its first instant, the next month's first instant)."""
    year, month = _month(moment)
    start = datetime(year, month, 1, tzinfo=UTC)
    return start, datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)


def first_month(
    kept: list[SealableRow], left_out: list[tuple[SealableRow, str]]
) -> tuple[list[SealableRow], list[tuple[SealableRow, str]], int | None]:
    """The kept rows of the first UTC month among them, the left-out rows before the cut,
    and the sequence the next seal starts at (None: no cut). A seal never spans two months:
    retention removes a month's rows with their partition, and its seals go with them
    whole (the rest of the chain still verifies, and a month's archive verifies against
    its own seals offline)."""
    if not kept:
        return kept, left_out, None
    start, end = _month_span(kept[0].created_at)
    for index, row in enumerate(kept):
        if not start <= row.created_at < end:
            cut = row.sequence
            return kept[:index], [(r, why) for r, why in left_out if r.sequence < cut], cut
    return kept, left_out, None


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str
    sequence: int = 0
    seal_number: int = 0
    detail: str = ""

    def __str__(self) -> str:
        where = f"seal {self.seal_number}" + (
            f", sequence {self.sequence}" if self.sequence else ""
        )
        return f"{self.kind} ({where}): {self.detail}"


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_seal(
    seal: Seal, previous: Seal | None, public_keys: Mapping[str, Ed25519PublicKey]
) -> list[Problem]:
    """A seal's signature (over its recomputed hash) and its link to `previous` (None: the
    seal before it is not being checked, unless this is the first seal of all)."""
    problems = []
    number = seal.seal_number
    computed = seal.computed_hash()
    key = public_keys.get(seal.key_id)
    if key is None:
        problems.append(
            Problem(
                UNKNOWN_KEY, seal_number=number, detail=f"signed by key {seal.key_id!r}, not given"
            )
        )
    else:
        try:
            key.verify(seal.signature, computed)
        except InvalidSignature:
            problems.append(
                Problem(
                    BAD_SIGNATURE,
                    seal_number=number,
                    detail=f"the signature by key {seal.key_id} does not match the seal's fields",
                )
            )
    if computed != seal.seal_hash and not problems:
        problems.append(
            Problem(
                BAD_SIGNATURE, seal_number=number, detail="seal_hash is not the hash of its fields"
            )
        )
    if previous is not None:
        expected = (previous.seal_number + 1, previous.last_sequence + 1, previous.computed_hash())
        found = (number, seal.first_sequence, seal.previous_seal_hash)
        if found != expected:
            problems.append(
                Problem(
                    SEAL_CHAIN_BROKEN,
                    seal_number=number,
                    detail=f"does not follow seal {previous.seal_number}"
                    f" (number, first_sequence or previous_seal_hash)",
                )
            )
    elif number == 1 and (seal.first_sequence != 1 or seal.previous_seal_hash):
        problems.append(
            Problem(
                SEAL_CHAIN_BROKEN, seal_number=1, detail="the first seal must start at sequence 1"
            )
        )
    return problems


def check_checkpoint(seal: Seal | None, seal_number: int, seal_hash: bytes) -> Problem | None:
    """CHECKPOINT_MISMATCH unless seal `seal_number` is there and hashes to `seal_hash`."""
    if seal is None:
        return Problem(
            CHECKPOINT_MISMATCH,
            seal_number=seal_number,
            detail=f"the trusted seal {seal_number} is not there",
        )
    if seal.computed_hash() != seal_hash:
        return Problem(
            CHECKPOINT_MISMATCH,
            seal_number=seal_number,
            detail=f"seal {seal_number} does not hash to the trusted checkpoint's hash",
        )
    return None


def check_rows(seal: Seal, rows: Sequence[tuple[int, bytes]]) -> list[Problem]:
    """The rows stored in a seal's range ((sequence, leaf hash), in sequence order) against
    the seal: none when they hash to its root; else the rows that differ, by row_digests."""
    if len(rows) == seal.row_count and merkle_root([leaf for _, leaf in rows]) == seal.root_hash:
        return []
    number = seal.seal_number
    sealed = dict(parse_digests(seal.row_digests))
    stored: dict[int, list[bytes]] = {}
    for sequence, leaf in rows:
        stored.setdefault(sequence, []).append(leaf)
    problems = []
    for sequence in sorted(sealed.keys() | stored.keys()):
        leaves = stored.get(sequence, [])
        if sequence not in sealed:
            problems += [Problem(ROW_ADDED, sequence, number, "a row the seal does not hold")]
            problems += [Problem(ROW_ADDED, sequence, number, "another row")] * (len(leaves) - 1)
        elif not leaves:
            problems.append(Problem(ROW_MISSING, sequence, number, "a sealed row is gone"))
        else:
            # Of rows sharing a sequence (only the owner can write one), the one that
            # matches the sealed row is it; the others are added.
            matching = [leaf for leaf in leaves if leaf[:8] == sealed[sequence]]
            if not matching:
                problems.append(
                    Problem(ROW_MODIFIED, sequence, number, "differs from the sealed row")
                )
            extra = len(leaves) - 1
            problems += [
                Problem(ROW_ADDED, sequence, number, "a second row with this sequence")
            ] * extra
    if not problems:
        problems.append(
            Problem(ROW_MODIFIED, 0, number, "the seal's rows do not hash to its root_hash")
        )
    return problems


@dataclass
class Verification:
    """A check in progress and its outcome: seals are given in seal_number order, each
    with the rows stored in its range; problems are kept in the order found."""

    public_keys: Mapping[str, Ed25519PublicKey]
    # The seal before the first one checked, whose link is checked too (None: none, or
    # the first checked is seal 1).
    previous: Seal | None = None
    rows_checked: int = 0
    seals_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    max_problems: int = 1000

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            if len(self.problems) < self.max_problems:
                self.problems.append(problem)

    def check(self, seal: Seal, rows: Sequence[tuple[int, bytes]] | None) -> None:
        """One seal and the rows stored in its range ((sequence, leaf hash), in order);
        None: the seal alone (its signature and its link), not its rows."""
        seal_problems = check_seal(seal, self.previous, self.public_keys)
        self.previous = seal
        self.seals_checked += 1
        if rows is None:
            self.add(seal_problems)
            return
        row_problems = check_rows(seal, rows)
        if seal_problems and [p.sequence for p in row_problems] == [0]:
            # Every row matches its digest: the seal's own root is what changed, which
            # its signature (or its key) already says.
            row_problems = []
        self.add(seal_problems)
        self.add(row_problems)
        self.rows_checked += len(rows)


def meets(seal: Seal, start: datetime | None, end: datetime | None) -> bool:
    """Whether the seal holds a row created in [start, end), by its signed bounds (a seal
    without rows meets every window)."""
    if seal.oldest_created_at is None or seal.newest_created_at is None:
        return True
    return (start is None or seal.newest_created_at >= start) and (
        end is None or seal.oldest_created_at < end
    )


def group_rows(
    seals: Sequence[Seal], rows: Iterable[tuple[int, bytes]]
) -> Iterator[tuple[Seal, list[tuple[int, bytes]]]]:
    """Each seal (in order) with the rows whose sequence lies in its range; `rows` come in
    sequence order; rows outside every seal's range are passed over."""
    iterator = iter(rows)
    row = next(iterator, None)
    for seal in seals:
        mine = []
        while row is not None and row[0] <= seal.last_sequence:
            if row[0] >= seal.first_sequence:
                mine.append(row)
            row = next(iterator, None)
        yield seal, mine
