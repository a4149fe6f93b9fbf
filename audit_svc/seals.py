"""The seals' use cases (domain layer): the checkpoint, the list of seals, and the
verification of the trail against them (VerifyAuditLog), each opening its own
connection. What a valid seal is lives in audit_svc.sealing; the SQL in seal_store.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit_svc import seal_store
from audit_svc.sealing import Seal, Verification, check_checkpoint, group_rows, meets
from shared.framework.errors import InvalidArgument, NotFound
from shared.persistence.db import Database
from shared.persistence.pagination import decode_number_token, encode_number_token, page_size

DEFAULT_SEALS_PAGE = 100
# A page holds fewer seals than asked once their row_digests pass this (AIP-158 allows it).
PAGE_DIGEST_BYTES = 1024 * 1024
READ_DEADLINE_S = 30.0
# VerifyAuditLog reads every row of its window: bounded by the call's deadline too.
VERIFY_DEADLINE_S = 3600.0
HASH_BYTES = 32
# VerifyAuditLog reads the seals of its window a slice at a time, and each slice's rows in
# one statement: at most 1000 seals and about 100,000 rows (16 bytes of digest each), so
# memory stays bounded whatever the window.
VERIFY_SEALS_AT_ONCE = 1000
VERIFY_DIGEST_BYTES = 16 * 100_000


async def checkpoint(database: Database) -> Seal:
    async with database.autocommit_connection(READ_DEADLINE_S) as connection:
        seal, _ = await seal_store.last_seal(connection)
    if seal is None:
        raise NotFound("no audit row is sealed yet", reason="NO_SEAL_YET")
    return seal


async def list_seals(
    database: Database, start_seal_number: int, size: int, token: str
) -> tuple[list[Seal], str]:
    """A page of seals in seal_number order from `start_seal_number` (0 or 1: the first);
    fewer than asked when their row_digests pass PAGE_DIGEST_BYTES."""
    if start_seal_number < 0:
        raise InvalidArgument.field("start_seal_number", "must not be negative")
    size = page_size(size or DEFAULT_SEALS_PAGE)
    filters = {"start_seal_number": start_seal_number}
    first = decode_number_token(token, filters) if token else max(start_seal_number, 1)
    async with database.autocommit_connection(READ_DEADLINE_S) as connection:
        seals = await seal_store.seals_from(connection, first, size + 1, PAGE_DIGEST_BYTES)
        following = seals[-1].seal_number + 1 if seals else None
        if len(seals) > size:
            following, seals = seals[size].seal_number, seals[:size]
        elif seals and not await seal_store.seal_exists(connection, following):
            following = None
    next_token = encode_number_token(following, filters) if following else ""
    return seals, next_token


def check_trusted(seal_number: int, seal_hash: bytes) -> None:
    """A checkpoint is both fields or neither."""
    if seal_number < 0:
        raise InvalidArgument.field("trusted_seal_number", "must not be negative")
    if bool(seal_number) != bool(seal_hash):
        raise InvalidArgument.field(
            "trusted_seal_hash" if seal_number else "trusted_seal_number",
            "a checkpoint is trusted_seal_number and trusted_seal_hash together",
        )
    if seal_hash and len(seal_hash) != HASH_BYTES:
        raise InvalidArgument.field("trusted_seal_hash", f"must be {HASH_BYTES} bytes (SHA-256)")


async def verify_trail(
    database: Database,
    public_keys: Mapping[str, Ed25519PublicKey],
    start: datetime | None,
    end: datetime | None,
    trusted_seal_number: int = 0,
    trusted_seal_hash: bytes = b"",
) -> Verification:
    """Checks the seals holding a row created in [start, end) and the rows of their ranges,
    the seals on either side of them, in one snapshot, and the trusted checkpoint if one
    is given."""
    check_trusted(trusted_seal_number, trusted_seal_hash)
    async with database.autocommit_connection(VERIFY_DEADLINE_S) as connection:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            # Rows flow from the sequence index as they are checked: a planner that
            # prefers to sort a wide range first holds the first row past the statement
            # timeout (make bench, 500,000 rows: a sort of 4.6 s, spilled to disk).
            await connection.execute("SET LOCAL enable_sort = off")
            outcome = Verification(public_keys)
            if trusted_seal_number:
                trusted = await seal_store.seal(connection, trusted_seal_number)
                problem = check_checkpoint(trusted, trusted_seal_number, trusted_seal_hash)
                outcome.add([problem] if problem else [])
            first, last = await seal_store.seals_in_window(connection, start, end)
            if first is None:
                return outcome
            # The seals on either side of the window are checked too (signature, link):
            # its seals are found by their stored bounds, and bounds changed in the
            # database to move a seal out of the window break that seal's signature.
            if first > 1:
                before = await seal_store.seal(connection, first - 1)
                if before is not None:
                    outcome.check(before, None)
            number = first
            while number <= last:
                seals = await seal_store.seals_from(
                    connection, number, VERIFY_SEALS_AT_ONCE, VERIFY_DIGEST_BYTES
                )
                seals = [seal for seal in seals if seal.seal_number <= last]
                await _check_range(connection, seals, outcome, start, end)
                number = seals[-1].seal_number + 1
            after = await seal_store.seal(connection, last + 1)
            if after is not None:
                outcome.check(after, None)
    return outcome


async def _check_range(
    connection,
    seals: list[Seal],
    outcome: Verification,
    start: datetime | None,
    end: datetime | None,
) -> None:
    """Checks consecutive seals against the rows of their ranges, read in one statement
    and grouped as the offline verifier groups them; a seal whose rows all lie outside
    [start, end) (a month retention dropped, next to the window) is checked alone."""
    rows = await seal_store.leaves(connection, seals[0].first_sequence, seals[-1].last_sequence)
    for seal, mine in group_rows(seals, rows):
        outcome.check(seal, mine if meets(seal, start, end) else None)
