"""`python -m audit_svc.verify`: checks an audit export against signed seals, offline.

    python -m audit_svc.verify --export trail.csv --seals seals.jsonl --keys keys.pem \\
        [--checkpoint 42:BASE64_SEAL_HASH]

No database and no service: an auditor runs it on a laptop with what the service gave
(README "Sealed audit trail"):

- `--export` (repeatable: the rows of all the files): a raw CSV export (ExportAuditLogs
  with `raw: true`; a `.gz` file is read as gzip, so retention's archives can be checked
  too) holding whole seals: exported
  by `start_sequence`/`end_sequence` from the first seal's first_sequence to the last
  seal's last_sequence (or by a time window the seals cover);
- `--seals`: JSON Lines, one AuditSeal per line in protobuf's JSON mapping, as
  `grpcurl ... ListAuditSeals | jq -c '.seals[]'` prints them;
- `--keys`: one or more PEM public keys (ListAuditSigningKeys' public_key_pem); a seal
  signed by any other key is UNKNOWN_KEY;
- `--checkpoint N:HASH`: a seal kept earlier (GetAuditCheckpoint: seal_number and
  seal_hash, base64 or hex), which must be among the seals, or be the one just before
  the first of them, with that hash.

Every seal is checked (signature, link to the seal before it, its rows); rows outside
every seal's range are not sealed yet and are passed over. Exit status: 0 when all is
valid; 1 with the first problem found (and how many there are); 2 when the files
cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import gzip
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import json_format

from audit_svc.sealing import (
    CHECKPOINT_MISMATCH,
    ROW_FIELDS,
    Problem,
    Seal,
    Verification,
    check_checkpoint,
    group_rows,
    leaf_hash,
    row_encoding,
)
from audit_svc.signing_keys import KeyFileError, read_public_keys
from relman.v1 import audit_pb2

# A details cell may pass csv's default limit (128 KiB): PostgreSQL prints numbers in full.
csv.field_size_limit(2**31 - 1)


class UnreadableInput(Exception):
    """A file the verifier cannot use: the message says which and why."""


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return path.open(newline="", encoding="utf-8")


def read_leaves(path: Path) -> list[tuple[int, bytes]]:
    """(sequence, leaf hash) of every row of a raw CSV export, in sequence order."""
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or header[:1] == ["{"] or not set(ROW_FIELDS) <= set(header):
                raise UnreadableInput(
                    f"{path}: not a CSV export with the columns {', '.join(ROW_FIELDS)}"
                )
            at = [header.index(name) for name in ROW_FIELDS]
            sequence = header.index("sequence")
            leaves = []
            for line, cells in enumerate(reader, start=2):
                if len(cells) != len(header):
                    raise UnreadableInput(
                        f"{path}, line {line}: {len(cells)} cells, not {len(header)}"
                    )
                leaves.append(
                    (int(cells[sequence]), leaf_hash(row_encoding([cells[i] for i in at])))
                )
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, EOFError) as error:
        if isinstance(error, UnreadableInput):
            raise
        raise UnreadableInput(f"{path}: {error}") from None
    leaves.sort(key=lambda leaf: leaf[0])
    return leaves


def _seal(message: audit_pb2.AuditSeal) -> Seal:
    return Seal(
        seal_number=message.seal_number,
        first_sequence=message.first_sequence,
        last_sequence=message.last_sequence,
        row_count=message.row_count,
        root_hash=message.root_hash,
        row_digests=message.row_digests,
        previous_seal_hash=message.previous_seal_hash,
        seal_hash=message.seal_hash,
        key_id=message.key_id,
        signature=message.signature,
        sealed_at=message.sealed_at.ToDatetime(tzinfo=UTC),
        oldest_created_at=_time(message, "oldest_created_at"),
        newest_created_at=_time(message, "newest_created_at"),
    )


def _time(message: audit_pb2.AuditSeal, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


def read_seals(path: Path) -> list[Seal]:
    """The seals of a JSON Lines file (protobuf JSON), in seal_number order."""
    seals = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    seals.append(_seal(json_format.Parse(line, audit_pb2.AuditSeal())))
                except json_format.ParseError as error:
                    raise UnreadableInput(f"{path}, line {line_number}: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableInput(f"{path}: {error}") from None
    if not seals:
        raise UnreadableInput(f"{path}: no seal in it")
    return sorted(seals, key=lambda seal: seal.seal_number)


def read_keys(paths: list[Path]):
    keys = {}
    for path in paths:
        try:
            keys.update(read_public_keys(path.read_text()))
        except (OSError, ValueError, KeyFileError) as error:
            raise UnreadableInput(f"{path}: {error}") from None
    if not keys:
        raise UnreadableInput(f"{', '.join(map(str, paths))}: no PEM public key in it")
    return keys


def parse_checkpoint(text: str) -> tuple[int, bytes]:
    """`N:HASH`, the hash in base64 (as grpcurl prints bytes) or hex."""
    number, _, digest = text.partition(":")
    try:
        seal_number = int(number)
        seal_hash = (
            bytes.fromhex(digest) if len(digest) == 64 else base64.b64decode(digest, validate=True)
        )
    except (ValueError, binascii.Error):
        seal_hash, seal_number = b"", 0
    if seal_number < 1 or len(seal_hash) != 32:
        raise UnreadableInput(
            f"--checkpoint {text!r}: not SEAL_NUMBER:SEAL_HASH (a SHA-256 in base64 or hex)"
        )
    return seal_number, seal_hash


def checkpoint_problem(seals: list[Seal], seal_number: int, seal_hash: bytes) -> Problem | None:
    """The trusted checkpoint against the seals given: one of them, or the one before."""
    by_number = {seal.seal_number: seal for seal in seals}
    if seal_number in by_number:
        return check_checkpoint(by_number[seal_number], seal_number, seal_hash)
    if seal_number == seals[0].seal_number - 1:
        if seals[0].previous_seal_hash == seal_hash:
            return None
        return Problem(
            CHECKPOINT_MISMATCH,
            seal_number=seal_number,
            detail=f"seal {seals[0].seal_number} does not follow the trusted seal {seal_number}",
        )
    return Problem(
        CHECKPOINT_MISMATCH,
        seal_number=seal_number,
        detail=f"the trusted seal {seal_number} is not among the seals given"
        f" ({seals[0].seal_number}..{seals[-1].seal_number})",
    )


def verify_files(
    export: Path | list[Path], seals_file: Path, keys_files: list[Path], checkpoint: str | None
) -> Verification:
    seals = read_seals(seals_file)
    outcome = Verification(read_keys(keys_files))
    if checkpoint:
        problem = checkpoint_problem(seals, *parse_checkpoint(checkpoint))
        outcome.add([problem] if problem else [])
    exports = export if isinstance(export, list) else [export]
    leaves = sorted((leaf for path in exports for leaf in read_leaves(path)), key=lambda x: x[0])
    for seal, rows in group_rows(seals, leaves):
        outcome.check(seal, rows)
    return outcome


def report(outcome: Verification) -> Iterator[str]:
    if outcome.ok:
        yield f"ok: {outcome.rows_checked} rows in {outcome.seals_checked} seals verified"
        return
    yield str(outcome.problems[0])
    more = len(outcome.problems) - 1
    if more:
        yield f"({more} more problem{'s' if more > 1 else ''})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audit_svc.verify",
        description="Checks a raw CSV export of the audit trail against signed seals, offline.",
    )
    parser.add_argument(
        "--export",
        type=Path,
        required=True,
        action="append",
        help="a raw CSV export (or .csv.gz); repeatable: the rows of all of them",
    )
    parser.add_argument("--seals", type=Path, required=True, help="AuditSeal JSON Lines")
    parser.add_argument(
        "--keys", type=Path, required=True, action="append", help="PEM public keys (repeatable)"
    )
    parser.add_argument("--checkpoint", help="SEAL_NUMBER:SEAL_HASH kept earlier")
    args = parser.parse_args(argv)
    try:
        outcome = verify_files(args.export, args.seals, args.keys, args.checkpoint)
    except UnreadableInput as error:
        print(error, file=sys.stderr)
        return 2
    for line in report(outcome):
        print(line)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
