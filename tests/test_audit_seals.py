"""Sealed audit trail: every row sealed, every seal signed and chained, and tampering by
someone holding the database's superuser found through VerifyAuditLog and offline
(python -m audit_svc.verify), each with its kind and where.

A test that tampers has a database and an audit_svc of its own (`trail`): tampering is
for ever. Tests that only read the trail, or add rows through the API, share one
(`untouched`). Tampering runs as the server's superuser with triggers off for the act
(session_replication_role = replica), as an administrator would do it.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format, struct_pb2
from sqlalchemy import URL

from audit_svc import seal_store
from audit_svc import verify as offline
from audit_svc.export import export_query
from audit_svc.sealer import SEALS_PER_RUN
from audit_svc.sealing import (
    ROW_FIELDS,
    ROWS_PER_SEAL,
    Seal,
    Verification,
    leaf_hash,
    make_seal,
    row_encoding,
)
from audit_svc.trail import Filter
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.framework.protos import timestamp
from shared.identity.tokens import issue_token
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import User
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    error_details,
    fails,
    owner_url,
    poll,
    run_cli,
    runtime_url,
    scratch_database,
    start_service,
)

Kind = audit_pb2.AuditIntegrityProblem.Kind
ROWS = 60
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Trail:
    url: URL
    db: asyncpg.Connection  # the server's superuser, on this database
    database: Database
    stub: audit_pb2_grpc.AuditServiceStub
    metadata: tuple
    process: RelmanProcess
    tmp: Path
    key_file: Path

    async def log(self, count: int, tag: str = "seal.test") -> None:
        async def batches():
            yield audit_pb2.LogActionsRequest(
                actions=[
                    audit_pb2.LogActionRequest(
                        action=tag, resource_type="release", resource_id=f"r{i}"
                    )
                    for i in range(count)
                ]
            )

        await self.stub.LogActions(batches(), metadata=self.metadata)

    async def all_sealed(self, within_s: float = 30) -> int:
        """Waits until every row written so far is sealed; returns the last sequence."""
        last = await self.db.fetchval("SELECT max(sequence) FROM audit_logs")

        async def sealed():
            return await self.db.fetchval(
                "SELECT coalesce(max(last_sequence), 0) >= $1 FROM audit_seals", last
            )

        await poll(sealed, within_s, "every row sealed")
        return last

    async def tamper(self, *statements: str, args=()) -> None:
        """As the superuser, triggers off: what a database administrator can do."""
        async with self.db.transaction():
            await self.db.execute("SET LOCAL session_replication_role = replica")
            for statement in statements:
                await self.db.execute(statement, *args)

    async def verify(self, **fields) -> audit_pb2.VerifyAuditLogResponse:
        return await self.stub.VerifyAuditLog(
            audit_pb2.VerifyAuditLogRequest(**fields), metadata=self.metadata
        )

    async def metadata_of(self, role: str) -> tuple:
        """Call metadata for a new user of `role`, made the way the fixture makes its admin."""
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        user_id = await self.db.fetchval(
            "INSERT INTO users (email, username, hashed_password, role, is_admin)"
            " VALUES ($1, $2, 'not a hash', $3, $4) RETURNING id",
            f"{name}@relman.example",
            name,
            role,
            role == "admin",
        )
        async with self.database.transaction() as session:
            token, _ = await issue_token(session, await session.get(User, user_id), "t", None)
        return bearer(token)

    async def export(self, form: int = audit_pb2.EXPORT_FORMAT_CSV, **bounds: int) -> str:
        """A raw export of the rows with sequences in `bounds` (start_sequence, end_sequence)."""
        request = audit_pb2.ExportAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(**bounds), raw=True, format=form
        )
        chunks = self.stub.ExportAuditLogs(request, metadata=self.metadata)
        return "".join([chunk.data async for chunk in chunks])

    async def files(self) -> tuple[Path, Path, Path]:
        """What an auditor takes away, through the API: the seals (JSON Lines, as grpcurl
        and jq print them), the public keys, and a raw export of the seals' range."""
        seals = (
            await self.stub.ListAuditSeals(
                audit_pb2.ListAuditSealsRequest(page_size=1000), metadata=self.metadata
            )
        ).seals
        seals_file = self.tmp / "seals.jsonl"
        seals_file.write_text(
            "".join(json_format.MessageToJson(seal, indent=None) + "\n" for seal in seals)
        )
        keys = await self.stub.ListAuditSigningKeys(
            audit_pb2.ListAuditSigningKeysRequest(), metadata=self.metadata
        )
        keys_file = self.tmp / "keys.pem"
        keys_file.write_text("".join(key.public_key_pem for key in keys.keys))
        export_file = self.tmp / "export.csv"
        export_file.write_text(
            await self.export(
                start_sequence=seals[0].first_sequence, end_sequence=seals[-1].last_sequence
            )
        )
        return export_file, seals_file, keys_file

    async def offline(
        self, checkpoint: str | None = None, keys: list[Path] | None = None
    ) -> tuple[int, list[str]]:
        """Runs the offline verifier on what `files` fetched (with `keys` instead of the
        service's public keys if given): (exit status, what it printed)."""
        outcome = await self.offline_outcome(checkpoint, keys)
        return (0 if outcome.ok else 1), list(offline.report(outcome))

    async def offline_outcome(
        self, checkpoint: str | None = None, keys: list[Path] | None = None
    ) -> Verification:
        export_file, seals_file, keys_file = await self.files()
        return offline.verify_files(export_file, seals_file, keys or [keys_file], checkpoint)


@asynccontextmanager
async def open_trail(
    server_url: URL, tmp: Path, rows: int = ROWS, **settings: str
) -> AsyncIterator[Trail]:
    """A scratch database and an audit_svc sealing every 50 ms, its key under `tmp`, with
    `rows` rows written through the API and sealed (and `settings`)."""
    async with scratch_database(server_url) as url:
        db = await asyncpg.connect(libpq_dsn(url))
        database = Database(url, pool_size=1)
        process = None
        try:
            key_file = tmp / "keys" / "signing.pem"
            process = await start_service(
                url,
                "audit_svc",
                AUDIT_SEAL_INTERVAL_S="0.05",
                AUDIT_SIGNING_KEY_FILE=str(key_file),
                **settings,
            )
            address = client_address(process.addresses["audit_svc"])
            async with grpc.aio.insecure_channel(address) as channel:
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                found = Trail(url, db, database, stub, (), process, tmp, key_file)
                found.metadata = await found.metadata_of("admin")
                if rows:
                    await found.log(rows)
                    await found.all_sealed()
                yield found
        finally:
            if process is not None:
                assert await process.stop() == 0, process.output
            await database.dispose()
            await db.close()


@pytest.fixture
async def trail(server_url, tmp_path):
    """A trail of the test's own, to tamper with."""
    async with open_trail(server_url, tmp_path) as found:
        yield found


@pytest.fixture(scope="module")
async def untouched(server_url, tmp_path_factory):
    """One trail for the tests that never tamper (rows they add go through the API)."""
    async with open_trail(server_url, tmp_path_factory.mktemp("untouched")) as found:
        yield found


async def _row_count(trail: Trail) -> int:
    return await trail.db.fetchval("SELECT count(*) FROM audit_logs")


async def _sealed_counts(trail: Trail) -> tuple[int, int]:
    """(rows in the seals' ranges, seals), with every row sealed and nothing being written."""
    await trail.all_sealed()
    return await trail.db.fetchrow(
        "SELECT (SELECT count(*) FROM audit_logs WHERE sequence <="
        " (SELECT max(last_sequence) FROM audit_seals)), (SELECT count(*) FROM audit_seals)"
    )


def _forged_seal(previous: Seal, last_sequence: int) -> Seal:
    """A seal after `previous`, over no row, signed by a key nobody was given."""
    return make_seal(
        seal_number=previous.seal_number + 1,
        first_sequence=previous.last_sequence + 1,
        last_sequence=last_sequence,
        rows=[],
        previous_seal_hash=previous.seal_hash,
        key_id="0123456789abcdef",
        private_key=Ed25519PrivateKey.generate(),
        sealed_at=previous.sealed_at,  # never ahead of the database's clock
    )


def _problems(outcome: audit_pb2.VerifyAuditLogResponse) -> list[tuple[int, int]]:
    return [(p.kind, p.sequence) for p in outcome.problems]


# -- an untouched trail ----------------------------------------------------------------------


async def test_an_untouched_trail_verifies_with_every_row_and_seal(untouched):
    """Nothing is written meanwhile, so the counts are exact: the call's own audit.verify
    row is written after its snapshot."""
    rows, seals = await _sealed_counts(untouched)
    outcome = await untouched.verify()
    assert outcome.ok, outcome.problems
    assert (outcome.rows_checked, outcome.seals_checked) == (rows, seals)
    rows, seals = await _sealed_counts(untouched)  # the audit.verify row, sealed
    status, printed = await untouched.offline()
    assert (status, printed) == (0, [f"ok: {rows} rows in {seals} seals verified"])


async def test_a_time_window_checks_exactly_the_seals_holding_its_rows(untouched):
    """An auditor checks one day without reading the years before it: the rows of the
    window's seals, and the seals on either side of them (signature and link only)."""
    await untouched.log(5, "seal.before")
    await untouched.all_sealed()
    start = await untouched.db.fetchval("SELECT clock_timestamp()")
    await untouched.log(8, "seal.window")
    await untouched.all_sealed()
    end = await untouched.db.fetchval("SELECT clock_timestamp()")
    await untouched.log(5, "seal.after")
    await untouched.all_sealed()
    first, last = await untouched.db.fetchrow(
        "SELECT min(sequence), max(sequence) FROM audit_logs WHERE action = 'seal.window'"
    )
    seals = await untouched.db.fetchval(
        "SELECT count(*) FROM audit_seals WHERE last_sequence >= $1 AND first_sequence <= $2",
        first,
        last,
    )
    outcome = await untouched.verify(start_time=timestamp(start), end_time=timestamp(end))
    assert outcome.ok, outcome.problems
    assert (outcome.rows_checked, outcome.seals_checked) == (8, seals + 2)


async def test_log_action_returns_the_rows_sequence_and_exports_take_a_sequence_range(untouched):
    """The sequence is the auditor's key: each write tells it, and an export of a range of
    seals holds exactly the rows of that range."""
    written = [
        await untouched.stub.LogAction(
            audit_pb2.LogActionRequest(action="seal.one", resource_type="release"),
            metadata=untouched.metadata,
        )
        for _ in range(3)
    ]
    sequences = [row.sequence for row in written]
    assert 0 < sequences[0] < sequences[1] < sequences[2]
    stored = await untouched.db.fetch(
        "SELECT id::text, sequence FROM audit_logs WHERE action = 'seal.one'"
    )
    assert sorted(map(tuple, stored)) == sorted((row.id, row.sequence) for row in written)
    low, high = 5, sequences[1]
    lines = list(
        csv.reader(io.StringIO(await untouched.export(start_sequence=low, end_sequence=high)))
    )
    assert lines[0][-1] == "sequence"
    expected = await untouched.db.fetch(
        "SELECT sequence FROM audit_logs WHERE sequence BETWEEN $1 AND $2", low, high
    )
    assert sorted(int(cells[-1]) for cells in lines[1:]) == sorted(r[0] for r in expected)
    assert len(lines) - 1 == len(expected) > 0


async def test_the_sql_leaf_hash_equals_the_verifiers_for_awkward_rows(untouched):
    """The sealer hashes rows in SQL, the offline verifier from the CSV's cells: one
    character read differently and every honest export would fail to verify."""
    owner = await asyncpg.connect(libpq_dsn(owner_url(untouched.url)))
    try:
        inserted = await owner.fetch(
            "INSERT INTO audit_logs (action, resource_type, resource_id, details, ip_address,"
            " user_agent, origin) SELECT * FROM unnest($1::text[], $2::text[], $3::text[],"
            " $4::jsonb[], $5::text[], $6::text[], $7::text[]) RETURNING sequence",
            ["seal.ünïcödé", "seal.newline", "seal.null", "seal.empty", "seal.formula"],
            ["release", "rélease 名前", "release", "release", "release"],
            ["r 🚀 名前", "line1\nline2\r\n", None, "", '=HYPERLINK("x")'],
            [
                json.dumps({"nested": {"list": [1, "two", None, {"x": "y\n"}]}, "q": '"'}),
                json.dumps({"tab": "a\tb", "backslash": "C:\\path\\", "ü": "→"}),
                "{}",
                json.dumps({"": ""}),
                json.dumps({"n": 1.50, "big": 12345678901234567890, "f": False}),
            ],
            ["::1", '"quoted", comma', None, "", "10.0.0.1"],
            ['a "quoted", agent', "agent,\n", None, "", "+cmd"],
            ["client", "relman", None, "client", "client"],
        )
        first, last = min(r[0] for r in inserted), max(r[0] for r in inserted)
        query, args = export_query(Filter(start_sequence=first, end_sequence=last), raw=True)
        copied = io.BytesIO()
        await owner.copy_from_query(query, *args, output=copied, format="csv", header=True)
        reader = csv.reader(io.StringIO(copied.getvalue().decode(), newline=""))
        header = next(reader)
        from_cells = {
            int(cells[header.index("sequence")]): leaf_hash(
                row_encoding([cells[header.index(name)] for name in ROW_FIELDS])
            )
            for cells in reader
        }
        in_sql = await owner.fetch(
            f"SELECT sequence, {seal_store.LEAF} FROM audit_logs WHERE sequence BETWEEN $1 AND $2",
            first,
            last,
        )
    finally:
        await owner.close()
    assert len(from_cells) == 5
    assert from_cells == {sequence: bytes(leaf) for sequence, leaf in in_sql}
    # And end to end: sealed by the SQL leaves, verified from the export's cells.
    status, printed = await untouched.offline()
    assert status == 0, printed


# -- input and permissions -------------------------------------------------------------------


async def test_bad_verify_and_list_requests_are_invalid_argument_and_change_nothing(untouched):
    hash_32 = hashlib.sha256(b"x").digest()
    await untouched.all_sealed()
    before = await _row_count(untouched)
    for fields, field in (
        ({"trusted_seal_number": 1}, "trusted_seal_hash"),
        ({"trusted_seal_hash": hash_32}, "trusted_seal_number"),
        ({"trusted_seal_number": 1, "trusted_seal_hash": hash_32[:31]}, "trusted_seal_hash"),
        ({"trusted_seal_number": -1, "trusted_seal_hash": hash_32}, "trusted_seal_number"),
    ):
        error = await fails(untouched.verify(**fields), INVALID, "INVALID_ARGUMENT")
        assert [v.field for v in error_details(error)[1]] == [field], fields
    now = await untouched.db.fetchval("SELECT now()")
    error = await fails(
        untouched.verify(start_time=timestamp(now), end_time=timestamp(now - timedelta(hours=1))),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert [v.field for v in error_details(error)[1]] == ["start_time"]

    def list_seals(**fields):
        return untouched.stub.ListAuditSeals(
            audit_pb2.ListAuditSealsRequest(**fields), metadata=untouched.metadata
        )

    await fails(list_seals(start_seal_number=-1), INVALID, "INVALID_ARGUMENT")
    await fails(list_seals(page_size=-1), INVALID, "INVALID_ARGUMENT")
    await fails(list_seals(page_token="not-a-token"), INVALID, "INVALID_PAGE_TOKEN")
    token = (await list_seals(page_size=1)).next_page_token
    assert token
    # A token is bound to the request it continues.
    await fails(
        list_seals(page_token=token, start_seal_number=2), INVALID, "PAGE_TOKEN_FILTER_MISMATCH"
    )
    # Refused calls record nothing (a VerifyAuditLog that runs records audit.verify).
    assert await _row_count(untouched) == before


async def test_list_audit_seals_pages_walk_every_seal_in_order(untouched):
    await untouched.all_sealed()
    stored = await untouched.db.fetch(
        "SELECT seal_number, seal_hash FROM audit_seals ORDER BY seal_number"
    )
    assert len(stored) >= 3
    walked, token = [], ""
    while True:
        page = await untouched.stub.ListAuditSeals(
            audit_pb2.ListAuditSealsRequest(page_size=2, page_token=token),
            metadata=untouched.metadata,
        )
        assert 1 <= len(page.seals) <= 2
        walked.extend(page.seals)
        token = page.next_page_token
        if not token:
            break
    assert [(s.seal_number, s.seal_hash) for s in walked] == [tuple(r) for r in stored]
    for previous, seal in itertools.pairwise(walked):
        assert seal.first_sequence == previous.last_sequence + 1
        assert seal.previous_seal_hash == previous.seal_hash
    from_second = await untouched.stub.ListAuditSeals(
        audit_pb2.ListAuditSealsRequest(start_seal_number=2, page_size=1000),
        metadata=untouched.metadata,
    )
    assert [s.seal_number for s in from_second.seals] == [r[0] for r in stored[1:]]
    checkpoint = await untouched.stub.GetAuditCheckpoint(
        audit_pb2.GetAuditCheckpointRequest(), metadata=untouched.metadata
    )
    assert checkpoint.seal_number >= stored[-1][0]


async def test_only_leads_and_admins_may_read_seals_and_verify(untouched):
    calls = {
        "GetAuditCheckpoint": audit_pb2.GetAuditCheckpointRequest(),
        "ListAuditSeals": audit_pb2.ListAuditSealsRequest(),
        "ListAuditSigningKeys": audit_pb2.ListAuditSigningKeysRequest(),
        "VerifyAuditLog": audit_pb2.VerifyAuditLogRequest(),
    }
    for role in ("developer", "viewer"):
        metadata = await untouched.metadata_of(role)
        for method, request in calls.items():
            call = getattr(untouched.stub, method)(request, metadata=metadata)
            await fails(call, grpc.StatusCode.PERMISSION_DENIED, "MISSING_PERMISSION")
    lead = await untouched.metadata_of("lead")
    for method, request in calls.items():
        await getattr(untouched.stub, method)(request, metadata=lead)


async def test_the_services_database_role_cannot_rewrite_seals_or_choose_sequences(untouched):
    """What the services' own credentials allow is what a stolen service password allows."""
    await untouched.all_sealed()
    state = (
        "SELECT (SELECT string_agg(encode(seal_hash, 'hex'), ',' ORDER BY seal_number)"
        " FROM audit_seals), (SELECT last_value FROM audit_logs_sequence)"
    )
    before = await untouched.db.fetchrow(state)
    runtime = await asyncpg.connect(libpq_dsn(runtime_url(untouched.url)))
    try:
        for statement in (
            "UPDATE audit_seals SET root_hash = '\\x00'::bytea WHERE seal_number = 1",
            "DELETE FROM audit_seals WHERE seal_number = 1",
            "TRUNCATE audit_seals",
            "INSERT INTO audit_logs (sequence, action, resource_type) VALUES (1, 'x', 'y')",
            "INSERT INTO audit_logs (created_at, action, resource_type)"
            " VALUES (now() - interval '1 day', 'x', 'y')",
            "SELECT setval('audit_logs_sequence', 1)",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
        # It may insert seals (the sealer does), but only one that follows the last and
        # covers sequences handed out: not one claiming every row to come as sealed.
        previous, _ = await seal_store.last_seal(runtime)
        claims_the_future = _forged_seal(previous, previous.last_sequence + 10**9)
        out_of_chain = dataclasses.replace(claims_the_future, previous_seal_hash=b"\x00" * 32)
        for forged in (claims_the_future, out_of_chain):
            with pytest.raises(asyncpg.IntegrityConstraintViolationError):
                await seal_store.insert_seal(runtime, forged)
        assert await untouched.db.fetchrow(state) == before
        # Nor one whose rows' times lie ahead, which would make every row written after
        # it look backdated, so that none were ever sealed again (its range is valid: a
        # sequence value of its own).
        taken = await runtime.fetchval("SELECT nextval('audit_logs_sequence')")
        dated_ahead = dataclasses.replace(
            _forged_seal(previous, taken),
            oldest_created_at=datetime(9999, 12, 31, tzinfo=UTC),
            newest_created_at=datetime(9999, 12, 31, tzinfo=UTC),
        )
        with pytest.raises(asyncpg.IntegrityConstraintViolationError):
            await seal_store.insert_seal(runtime, dated_ahead)
    finally:
        await runtime.close()


async def test_the_offline_verifier_cli_exits_0_1_or_2(untouched):
    """An auditor's script reads the exit status: valid, tampered, or unusable input."""
    export_file, seals_file, keys_file = await untouched.files()
    seals = offline.read_seals(seals_file)
    tampered = untouched.tmp / "tampered.csv"
    lines = list(csv.reader(io.StringIO(export_file.read_text(), newline="")))
    at, column = lines[0].index("sequence"), lines[0].index("resource_id")
    forged = lines[len(lines) // 2]
    forged[column] = "r-forged"
    holder = next(s for s in seals if s.first_sequence <= int(forged[at]) <= s.last_sequence)
    with tampered.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(lines)
    jsonl = untouched.tmp / "export.jsonl"
    jsonl.write_text(
        await untouched.export(
            audit_pb2.EXPORT_FORMAT_JSONL,
            start_sequence=seals[0].first_sequence,
            end_sequence=seals[-1].last_sequence,
        )
    )
    checkpoint = f"{seals[-1].seal_number}:{seals[-1].seal_hash.hex()}"

    def cli(export: Path, *more: str):
        arguments = ["--export", str(export), "--seals", str(seals_file), "--keys", str(keys_file)]
        return asyncio.to_thread(run_cli, untouched.url, "audit_svc.verify", *arguments, *more)

    good, bad, missing, wrong_form, bad_checkpoint = await asyncio.gather(
        cli(export_file, "--checkpoint", checkpoint),
        cli(tampered),
        cli(untouched.tmp / "no-such-export.csv"),
        cli(jsonl),
        cli(export_file, "--checkpoint", "7:not-a-hash"),
    )
    rows = len(lines) - 1
    assert (good.returncode, good.stdout) == (
        0,
        f"ok: {rows} rows in {len(seals)} seals verified\n",
    )
    assert bad.returncode == 1, bad.stderr
    assert bad.stdout.splitlines()[0].startswith(
        f"ROW_MODIFIED (seal {holder.seal_number}, sequence {forged[at]}): "
    )
    for result, named in ((missing, "no-such-export.csv"), (wrong_form, "export.jsonl"),
                          (bad_checkpoint, "--checkpoint")):  # fmt: skip
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert named in result.stderr


async def test_no_checkpoint_before_the_first_row_is_sealed(server_url, tmp_path):
    """A fresh install has nothing to keep: NOT_FOUND (NO_SEAL_YET), until its first row."""
    async with open_trail(server_url, tmp_path, rows=0) as fresh:
        assert await _row_count(fresh) == 0  # nothing for the sealer to seal
        checkpoint = fresh.stub.GetAuditCheckpoint(
            audit_pb2.GetAuditCheckpointRequest(), metadata=fresh.metadata
        )
        await fails(checkpoint, grpc.StatusCode.NOT_FOUND, "NO_SEAL_YET")
        assert (await fresh.verify()).ok
        await fresh.log(1)
        await fresh.all_sealed()
        newest = await fresh.stub.GetAuditCheckpoint(
            audit_pb2.GetAuditCheckpointRequest(), metadata=fresh.metadata
        )
        first = (
            await fresh.stub.ListAuditSeals(
                audit_pb2.ListAuditSealsRequest(), metadata=fresh.metadata
            )
        ).seals[0]
        # The verification's own audit.verify row came first: it may have a seal of its own.
        assert (first.seal_number, first.first_sequence, first.previous_seal_hash) == (1, 1, b"")
        assert newest.seal_number in (1, 2)


async def test_a_transaction_open_in_another_database_does_not_hold_sealing(untouched, server_url):
    """Another application's long transaction on the same server cannot take this
    database's sequence values, so it must not stop this trail's sealing."""
    elsewhere = await asyncpg.connect(libpq_dsn(server_url))
    try:
        async with elsewhere.transaction():
            await elsewhere.execute("SELECT pg_current_xact_id()")
            await untouched.log(1, "seal.elsewhere")
            await untouched.all_sealed(within_s=5)
    finally:
        await elsewhere.close()


# -- tampering -------------------------------------------------------------------------------


async def _first_sequence_of(trail: Trail, tag: str = "seal.test") -> int:
    return await trail.db.fetchval(
        "SELECT min(sequence) + 7 FROM audit_logs WHERE action = $1", tag
    )


async def test_a_changed_field_is_row_modified_at_its_sequence(trail):
    sequence = await _first_sequence_of(trail)
    await trail.tamper(
        "UPDATE audit_logs SET resource_id = 'r-forged' WHERE sequence = $1", args=(sequence,)
    )
    outcome = await trail.verify()
    assert not outcome.ok
    assert [(p.kind, p.sequence) for p in outcome.problems] == [(Kind.ROW_MODIFIED, sequence)]
    status, printed = await trail.offline()
    assert status == 1
    assert printed[0].startswith("ROW_MODIFIED (seal ") and f"sequence {sequence})" in printed[0]


async def test_a_deleted_row_is_row_missing_at_its_sequence(trail):
    sequence = await _first_sequence_of(trail)
    await trail.tamper("DELETE FROM audit_logs WHERE sequence = $1", args=(sequence,))
    outcome = await trail.verify()
    assert [(p.kind, p.sequence) for p in outcome.problems] == [(Kind.ROW_MISSING, sequence)]
    status, printed = await trail.offline()
    assert (
        status == 1
        and printed[0].startswith("ROW_MISSING")
        and f"sequence {sequence})" in printed[0]
    )


async def test_two_rows_swapped_are_row_modified_at_both(trail):
    """Each row still looks like a row; only the seal knows which was where."""
    low = await _first_sequence_of(trail)
    high = low + 3
    await trail.tamper(
        "UPDATE audit_logs a SET action = b.action || '.swapped', resource_id = b.resource_id,"
        " details = b.details || '{\"swapped\": true}'"
        " FROM audit_logs b WHERE (a.sequence, b.sequence) IN (($1, $2), ($2, $1))",
        args=(low, high),
    )
    swapped = await trail.db.fetch(
        "SELECT resource_id FROM audit_logs WHERE sequence IN ($1, $2) ORDER BY sequence", low, high
    )
    assert [r[0] for r in swapped] == ["r10", "r7"]  # the fixture's r7 and r10, swapped
    outcome = await trail.verify()
    assert _problems(outcome) == [(Kind.ROW_MODIFIED, low), (Kind.ROW_MODIFIED, high)]
    status, printed = await trail.offline()
    assert status == 1
    assert printed[0].startswith("ROW_MODIFIED (seal ") and f"sequence {low})" in printed[0]
    assert printed[1:] == ["(1 more problem)"]


async def test_a_backdated_row_is_left_out_logged_and_row_added(trail):
    """A row slipped in with yesterday's time is not sealed as if it had been there: the
    sealer leaves it out with a WARNING, and every verification names it."""
    since = len(trail.process.lines)
    await trail.tamper(
        # Triggers are off, assign_xid too: take the transaction id first, as it would, so
        # that the sealer waits for this commit and sees the row (not merely seals past it).
        "SELECT pg_current_xact_id()",
        "SELECT relman_audit_make_partition((now() - interval '1 day')::date)",
        "INSERT INTO audit_logs (action, resource_type, resource_id, created_at, origin)"
        " VALUES ('seal.test', 'release', 'r-backdated', now() - interval '1 day', 'client')",
    )
    sequence = await trail.db.fetchval(
        "SELECT sequence FROM audit_logs WHERE resource_id = 'r-backdated'"
    )
    await trail.all_sealed()
    line = await trail.process.wait_for_line(
        rf"left audit row {sequence} out of seal \d+: backdated", 30, since=since
    )
    assert json.loads(line)["level"] == "WARNING"
    outcome = await trail.verify()
    assert _problems(outcome) == [(Kind.ROW_ADDED, sequence)]
    status, printed = await trail.offline()
    assert (
        status == 1 and printed[0].startswith("ROW_ADDED") and f"sequence {sequence})" in printed[0]
    )


async def test_a_row_inserted_into_a_sealed_range_is_row_added_at_its_sequence(trail):
    """A superuser may write any sequence: into a gap of a sealed range, or one already
    taken; neither is in the seal."""
    gap = await trail.db.fetchval("SELECT nextval('audit_logs_sequence')")  # no row takes it
    await trail.log(5)
    await trail.all_sealed()
    taken = await _first_sequence_of(trail)
    await trail.tamper(
        "INSERT INTO audit_logs (sequence, action, resource_type, resource_id, origin) VALUES"
        " ($1, 'seal.test', 'release', 'r-slipped', 'client'),"
        " ($2, 'seal.test', 'release', 'r-twin', 'client')",
        args=(gap, taken),
    )
    outcome = await trail.verify()
    assert _problems(outcome) == [(Kind.ROW_ADDED, taken), (Kind.ROW_ADDED, gap)]
    status, printed = await trail.offline()
    assert status == 1 and printed[1:] == ["(1 more problem)"]
    assert printed[0].startswith("ROW_ADDED (seal ") and f"sequence {taken})" in printed[0]


async def _seals(trail: Trail, count: int) -> None:
    """At least `count` seals (a batch of rows each)."""
    while await trail.db.fetchval("SELECT count(*) FROM audit_seals") < count:
        await trail.log(5)
        await trail.all_sealed()


async def test_a_seal_rewritten_without_the_key_is_bad_signature(trail):
    """Whoever rewrites a seal can recompute its hash, not its signature."""
    await _seals(trail, 3)
    number = 2
    seal = await seal_store.seal(trail.db, number)
    forged = dataclasses.replace(seal, root_hash=hashlib.sha256(b"other rows").digest())
    await trail.tamper(
        "UPDATE audit_seals SET root_hash = $1, seal_hash = $2 WHERE seal_number = $3",
        args=(forged.root_hash, forged.computed_hash(), number),
    )
    outcome = await trail.verify()
    found = [(p.kind, p.seal_number) for p in outcome.problems]
    assert found[0] == (Kind.BAD_SIGNATURE, number)
    # The seal after it was chained to the seal as it was.
    assert (Kind.SEAL_CHAIN_BROKEN, number + 1) in found
    status, printed = await trail.offline()
    assert status == 1 and printed[0].startswith(f"BAD_SIGNATURE (seal {number}): ")


async def test_a_seal_deleted_in_the_middle_breaks_the_chain_at_the_next(trail):
    await _seals(trail, 4)
    await trail.tamper("DELETE FROM audit_seals WHERE seal_number = 2")
    outcome = await trail.verify()
    first = outcome.problems[0]
    assert (first.kind, first.seal_number) == (Kind.SEAL_CHAIN_BROKEN, 3)
    status, printed = await trail.offline()
    assert status == 1 and printed[0].startswith("SEAL_CHAIN_BROKEN (seal 3): ")


async def test_a_deleted_seal_is_reported_alike_online_and_offline(trail):
    """An auditor who checks the service's verdict with her own must get the same list."""
    await _seals(trail, 4)
    await trail.tamper("DELETE FROM audit_seals WHERE seal_number = 2")
    online = await trail.verify()
    found = await trail.offline_outcome()
    assert [(p.kind, p.sequence, p.seal_number) for p in online.problems] == [
        (Kind.Value(p.kind), p.sequence, p.seal_number) for p in found.problems
    ]


async def test_a_seal_forged_with_the_services_own_credentials_is_unknown_key(trail):
    """The services' role may insert seals (the sealer does): one signed with a key of its
    own is found, the sealer says so (an ERROR) and goes on chaining after it."""
    previous, _ = await seal_store.last_seal(trail.db)
    since = len(trail.process.lines)
    runtime = await asyncpg.connect(libpq_dsn(runtime_url(trail.url)))
    try:
        # A sequence value of its own, so that the forged seal's range holds no row.
        taken = await runtime.fetchval("SELECT nextval('audit_logs_sequence')")
        assert taken == previous.last_sequence + 1
        forged = _forged_seal(previous, taken)
        await seal_store.insert_seal(runtime, forged)
    finally:
        await runtime.close()
    await trail.log(5)
    await trail.all_sealed()
    line = await trail.process.wait_for_line(
        rf"does not verify with this service's keys: UNKNOWN_KEY \(seal {forged.seal_number}\)",
        30,
        since=since,
    )
    assert json.loads(line)["level"] == "ERROR"
    follower = await trail.db.fetchval(
        "SELECT previous_seal_hash FROM audit_seals WHERE seal_number = $1",
        forged.seal_number + 1,
    )
    assert follower == forged.seal_hash
    outcome = await trail.verify()
    assert [(p.kind, p.seal_number) for p in outcome.problems] == [
        (Kind.UNKNOWN_KEY, forged.seal_number)
    ]
    status, printed = await trail.offline()
    assert (status, printed[1:]) == (1, [])
    assert printed[0].startswith(f"UNKNOWN_KEY (seal {forged.seal_number}): ")


# -- keys ------------------------------------------------------------------------------------


async def test_after_a_key_rotation_new_seals_use_the_new_key_and_old_ones_still_verify(trail):
    """A rotation must not make yesterday's seals unverifiable, and an auditor given only
    the new key is told which seals it cannot check."""
    env = env_for(trail.url, AUDIT_SIGNING_KEY_FILE=str(trail.key_file))
    old_key = (
        await trail.stub.GetAuditCheckpoint(
            audit_pb2.GetAuditCheckpointRequest(), metadata=trail.metadata
        )
    ).key_id
    rotated = await asyncio.to_thread(
        run_cli, trail.url, "audit_svc.signing_keys", "rotate", env=env
    )
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.split()[-1]
    assert rotated.stdout == f"retired {old_key}; signing with {new_key}\n"
    await trail.log(5)

    async def sealed_with_new_key():
        return await trail.db.fetchval(
            "SELECT min(seal_number) FROM audit_seals WHERE key_id = $1", new_key
        )

    first_new = await poll(sealed_with_new_key, 30, "a seal signed with the new key")
    assert await trail.db.fetchval(
        "SELECT bool_and(key_id = $1) FROM audit_seals WHERE seal_number < $2", old_key, first_new
    )
    keys = (
        await trail.stub.ListAuditSigningKeys(
            audit_pb2.ListAuditSigningKeysRequest(), metadata=trail.metadata
        )
    ).keys
    assert [(k.key_id, k.HasField("retired_at")) for k in keys] == [
        (new_key, False),
        (old_key, True),
    ]
    assert all(k.algorithm == "Ed25519" for k in keys)
    await trail.all_sealed()
    outcome = await trail.verify()
    assert outcome.ok, outcome.problems
    # The auditor's keys from the key file's owner: both public keys.
    public = await asyncio.to_thread(
        run_cli, trail.url, "audit_svc.signing_keys", "public", env=env
    )
    assert public.returncode == 0 and public.stdout.count("BEGIN PUBLIC KEY") == 2
    both = trail.tmp / "both.pem"
    both.write_text(public.stdout)
    status, printed = await trail.offline(keys=[both])
    assert status == 0, printed
    only_new = trail.tmp / "new.pem"
    only_new.write_text(keys[0].public_key_pem)
    status, printed = await trail.offline(keys=[only_new])
    assert status == 1 and printed[0].startswith("UNKNOWN_KEY (seal 1): ")
    assert f"{old_key!r}" in printed[0]


# -- checkpoints -----------------------------------------------------------------------------


async def test_the_newest_seals_deleted_with_their_rows_break_the_checkpoint(trail):
    for _ in range(3):  # a seal each
        await trail.log(5)
        await trail.all_sealed()
    checkpoint = await trail.stub.GetAuditCheckpoint(
        audit_pb2.GetAuditCheckpointRequest(), metadata=trail.metadata
    )
    assert checkpoint.seal_number >= 4
    await trail.tamper(
        "DELETE FROM audit_logs WHERE sequence >= (SELECT first_sequence FROM audit_seals"
        " WHERE seal_number = $1)",
        "DELETE FROM audit_seals WHERE seal_number >= $1",
        args=(checkpoint.seal_number - 1,),
    )
    outcome = await trail.verify(
        trusted_seal_number=checkpoint.seal_number, trusted_seal_hash=checkpoint.seal_hash
    )
    assert (outcome.problems[0].kind, outcome.problems[0].seal_number) == (
        Kind.CHECKPOINT_MISMATCH,
        checkpoint.seal_number,
    )
    # Without the checkpoint nothing shows: that is what a kept checkpoint is for.
    assert (await trail.verify()).ok
    text = f"{checkpoint.seal_number}:{base64.b64encode(checkpoint.seal_hash).decode()}"
    status, printed = await trail.offline(text)
    assert status == 1 and printed[0].startswith("CHECKPOINT_MISMATCH")


async def test_a_window_cannot_lose_a_seal_whose_bounds_were_moved(trail):
    """The seals of a window are found by their stored time bounds: a superuser who moves
    a seal's bounds out of the window, to hide a row changed in it, breaks that seal's
    signature, and the seal beside the window is checked too."""
    start = await trail.db.fetchval("SELECT clock_timestamp()")
    await trail.log(4, "seal.edge")
    await trail.all_sealed()
    await trail.log(4, "seal.inside")
    await trail.all_sealed()
    end = await trail.db.fetchval("SELECT clock_timestamp()")
    edge, changed = await trail.db.fetchrow(
        "SELECT s.seal_number, a.sequence FROM audit_logs a JOIN audit_seals s"
        " ON a.sequence BETWEEN s.first_sequence AND s.last_sequence"
        " WHERE a.action = 'seal.edge' ORDER BY a.sequence LIMIT 1"
    )
    before = await trail.verify(start_time=timestamp(start), end_time=timestamp(end))
    assert before.ok, before.problems
    await trail.tamper(
        "UPDATE audit_logs SET resource_id = 'r-forged' WHERE sequence = $1", args=(changed,)
    )
    await trail.tamper(
        "UPDATE audit_seals SET oldest_created_at = '2001-01-01', newest_created_at ="
        " '2001-01-01' WHERE seal_number <= $1 AND newest_created_at >= $2",
        args=(edge, start),
    )
    after = await trail.verify(start_time=timestamp(start), end_time=timestamp(end))
    assert (after.problems[0].kind, after.problems[0].seal_number) == (Kind.BAD_SIGNATURE, edge)


async def test_a_logactions_stream_past_its_time_is_aborted_and_stores_nothing(
    server_url, tmp_path
):
    """A stream is one transaction, which holds back the sealing of every row written
    after it began: it ends ABORTED (STREAM_TOO_LONG) after AUDIT_STREAM_MAX_S."""
    async with open_trail(server_url, tmp_path, rows=0, AUDIT_STREAM_MAX_S="1") as short:
        batch = audit_pb2.LogActionsRequest(
            actions=[
                audit_pb2.LogActionRequest(action="stream.long", resource_type="x")
                for _ in range(50)
            ]
        )
        stream = short.stub.LogActions(metadata=short.metadata)
        await stream.write(batch)
        # The stream's age is what is tested: the next batch comes after its 1 s are up
        # (never idle that long: AUDIT_STREAM_IDLE_S is 30 s), and the client is done
        # writing when the server ends it.
        await asyncio.sleep(1.2)
        await stream.write(batch)
        await stream.done_writing()
        await fails(stream, grpc.StatusCode.ABORTED, "STREAM_TOO_LONG")
        stored = await short.db.fetchval(
            "SELECT count(*) FROM audit_logs WHERE action = 'stream.long'"
        )
        assert stored == 0


async def test_details_numbers_postgresql_would_print_as_megabytes_are_refused(untouched):
    """1e308 is 6 bytes in a request and 309 digits in the trail, its exports and its seals."""
    rows = await _row_count(untouched)
    for number in (1e308, -1e40, 1e-300):
        details = struct_pb2.Struct()
        details.update({"n": number})
        call = untouched.stub.LogAction(
            audit_pb2.LogActionRequest(action="big.number", resource_type="x", details=details),
            metadata=untouched.metadata,
        )
        error = await fails(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [v.field for v in error_details(error)[1]] == ["details"]
    assert await _row_count(untouched) == rows
    details = struct_pb2.Struct()
    details.update({"n": 9.99e39, "m": 1e-39, "z": 0})
    stored = await untouched.stub.LogAction(
        audit_pb2.LogActionRequest(action="big.number", resource_type="x", details=details),
        metadata=untouched.metadata,
    )
    assert stored.details["n"] == 9.99e39


async def test_a_backlog_past_one_run_is_sealed_with_nothing_written_after(server_url, tmp_path):
    """More rows at once than one run seals (SEALS_PER_RUN seals of ROWS_PER_SEAL): the
    following runs seal the rest though the sequence no longer moves."""
    async with open_trail(server_url, tmp_path, rows=0) as bulk:
        owner = await asyncpg.connect(libpq_dsn(owner_url(bulk.url)))
        try:
            await owner.execute(
                "INSERT INTO audit_logs (action, resource_type, origin)"
                " SELECT 'bulk.row', 'release', 'client' FROM generate_series(1, $1)",
                SEALS_PER_RUN * ROWS_PER_SEAL + 1000,
            )
        finally:
            await owner.close()
        await bulk.all_sealed(within_s=120)
        assert (await bulk.verify()).ok
