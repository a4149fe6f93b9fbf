"""Retention of the audit trail (issue 19): `python -m audit_svc.retention` and `--restore`.

One database of this module's own holds 14 past months of rows (awkward text, NULLs
and empty strings, a row on each edge of each month) and request ids for each month,
with audit_svc serving it; the command runs as a real process, as the owner. With 12
months kept, the two oldest months are archived (each archive byte for byte what
ExportAuditLogs with `raw` gave for the month before), verified and dropped, with an
`audit.retention` row each, and every other row stays as it was. A run killed after
its manifest, or after its detach, is finished by the next without archiving again; a
detach left pending is finalized; an archive that does not match its manifest stops
the run and drops nothing. A dry run, bad settings and a run beside another change
nothing; the services' role can remove nothing. A month restored from its archive
exports as the archive.

The tests run in file order over the same database: the later ones start from the
months the earlier ones dropped.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from audit_svc import verify as offline
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.framework.protos import timestamp
from shared.identity.tokens import issue_token
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import AuditLog, User
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    env_for,
    owner_url,
    poll,
    run_cli,
    runtime_url,
    scratch_database,
    start_service,
)

MONTHS_OF_ROWS = 14  # the 14 months before this one
ROWS_PER_MONTH = 150  # spread over the month, plus one on each edge
ONE_US = timedelta(microseconds=1)
FAR = datetime(9999, 1, 1, tzinfo=UTC)
HOOK = "AUDIT_RETENTION_EXIT_AFTER"  # audit_svc.retention's test hook
HOOK_EXIT = 3
SETTINGS = ("AUDIT_RETENTION_MONTHS", "AUDIT_ARCHIVE_DIR", HOOK)
PARTITION_STATES = """
SELECT c.relname, i.inhrelid IS NOT NULL AS attached, coalesce(i.inhdetachpending, false) AS pending
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND i.inhparent = 'audit_logs'::regclass
WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname ~ '^audit_logs_y[0-9]{4}m[0-9]{2}$'
ORDER BY 1
"""
# Every row of audit_logs in a time range, in one digest.
DIGEST = """
SELECT count(*) AS rows,
       md5(coalesce(string_agg(a::text, '|' ORDER BY a.created_at, a.id), '')) AS digest
FROM audit_logs a WHERE a.created_at >= $1 AND a.created_at < $2
"""
AWKWARD = [
    'a "quoted" word, a comma',
    "two\nlines\r\nand a CR",
    '=HYPERLINK("http://x")',
    "+1-2",
    "@sum",
    "ünïcødé ✓",
    "",
    None,
]


def add_months(moment: datetime, months: int) -> datetime:
    """The first instant (UTC) of the month `months` after `moment`'s."""
    index = moment.year * 12 + moment.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition(low: datetime) -> str:
    return f"audit_logs_y{low.year:04d}m{low.month:02d}"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Trail:
    url: object  # the database's URL as the server's superuser
    archive_dir: Path
    this_month: datetime
    db: asyncpg.Connection  # as the superuser: the tests' view of everything
    stub: audit_pb2_grpc.AuditServiceStub
    token: str
    ids: dict[str, set[uuid.UUID]] = field(default_factory=dict)  # partition -> its row ids
    exports: dict[str, bytes] = field(default_factory=dict)  # partition -> raw CSV before

    def month(self, back: int) -> tuple[str, datetime, datetime]:
        """The partition, start and end of the month `back` months before this one."""
        low = add_months(self.this_month, -back)
        return partition(low), low, add_months(low, 1)

    async def export(self, back: int) -> bytes:
        """The month as ExportAuditLogs gives it with `raw`, from the running audit_svc."""
        _, low, high = self.month(back)
        request = audit_pb2.ExportAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(start_time=timestamp(low), end_time=timestamp(high)),
            raw=True,
        )
        chunks = [
            chunk.data
            async for chunk in self.stub.ExportAuditLogs(request, metadata=bearer(self.token))
        ]
        return "".join(chunks).encode()

    async def run(self, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
        """`python -m audit_svc.retention args` as the owner (MIGRATION_DATABASE_URL)."""
        env = {k: v for k, v in env_for(self.url).items() if k not in SETTINGS}
        env.update(settings)
        return await asyncio.to_thread(run_cli, self.url, "audit_svc.retention", *args, env=env)

    async def state(self) -> tuple:
        """Everything a run could change: the partitions, every row, the request ids, the
        archive directory."""
        partitions = [tuple(row) for row in await self.db.fetch(PARTITION_STATES)]
        rows = tuple(await self.db.fetchrow(DIGEST, datetime(1970, 1, 1, tzinfo=UTC), FAR))
        requests = await self.db.fetchval(
            "SELECT md5(coalesce(string_agg(r::text, '|' ORDER BY request_id), ''))"
            " FROM audit_requests r"
        )
        return partitions, rows, requests, sorted(os.listdir(self.archive_dir))

    async def requests_in(self, back: int) -> int:
        _, low, high = self.month(back)
        return await self.db.fetchval(
            "SELECT count(*) FROM audit_requests WHERE audit_created_at >= $1"
            " AND audit_created_at < $2",
            low,
            high,
        )

    async def audit_rows(self, action: str, name: str) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT * FROM audit_logs WHERE action = $1 AND resource_id = $2 ORDER BY created_at",
            action,
            name,
        )

    async def exists(self, name: str) -> bool:
        return await self.db.fetchval("SELECT to_regclass($1) IS NOT NULL", name)

    async def attached(self, name: str) -> bool:
        return await self.db.fetchval(
            "SELECT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = to_regclass($1)"
            " AND inhparent = 'audit_logs'::regclass AND NOT inhdetachpending)",
            name,
        )


async def _fill(owner: asyncpg.Connection, this_month: datetime, user_id: uuid.UUID) -> dict:
    """The partitions of the 14 past months (made as the migration makes them) and their
    rows, written as the owner with their times, oldest month first (as a trail grows: its
    seals follow the months); request ids for 3 rows of each month."""
    ids: dict[str, set[uuid.UUID]] = {}
    records, requests = [], []
    for back in range(MONTHS_OF_ROWS, 0, -1):
        low = add_months(this_month, -back)
        high = add_months(low, 1)
        await owner.fetchval("SELECT relman_audit_make_partition($1::date)", low.date())
        step = (high - low) / (ROWS_PER_MONTH + 1)
        times = [low, high - ONE_US] + [low + step * (i + 1) for i in range(ROWS_PER_MONTH)]
        month_ids = set()
        for i, created in enumerate(times):
            row_id = uuid.uuid4()
            month_ids.add(row_id)
            text = AWKWARD[i % len(AWKWARD)]
            records.append(
                (
                    row_id,
                    user_id if i % 3 == 0 else None,
                    f"retention.test{i % 5}",
                    "deployment" if i % 2 else "release",
                    text if text is None else text[:100],
                    json.dumps({"n": i, "note": text, "nested": {"a": [1, "x,y"]}}),
                    "2001:db8::7" if i % 4 == 0 else ("10.0.0.9" if i % 4 == 1 else None),
                    text,
                    created,
                    (None, "relman", "client")[i % 3],
                    user_id if i % 3 == 1 else None,
                )
            )
            if i < 3:
                requests.append((uuid.uuid4(), row_id, created))
        ids[partition(low)] = month_ids
    await owner.copy_records_to_table(  # every column, in the table's order
        "audit_logs",
        records=records,
        columns=[c.name for c in AuditLog.__table__.columns if c.name != "sequence"],
    )
    await owner.copy_records_to_table(
        "audit_requests", records=requests, columns=["request_id", "audit_id", "audit_created_at"]
    )
    return ids


@pytest.fixture(scope="module")
async def trail(server_url, tmp_path_factory):
    archive_dir = tmp_path_factory.mktemp("audit-archive")
    async with scratch_database(server_url) as url:
        db = await asyncpg.connect(libpq_dsn(url))
        owner = await asyncpg.connect(libpq_dsn(owner_url(url)))
        process: RelmanProcess | None = None
        database = Database(url, pool_size=1)
        try:
            now = await db.fetchval("SELECT now()")
            this_month = add_months(now.astimezone(UTC), 0)
            user_id = await db.fetchval(
                "INSERT INTO users (email, username, hashed_password, role, is_admin)"
                " VALUES ('auditor@relman.example', 'auditor', 'not a hash', 'admin', true)"
                " RETURNING id"
            )
            ids = await _fill(owner, this_month, user_id)
            async with database.transaction() as session:
                token, _ = await issue_token(session, await session.get(User, user_id), "t", None)
            process = await start_service(url, "audit_svc")
            address = client_address(process.addresses["audit_svc"])
            async with grpc.aio.insecure_channel(address) as channel:
                found = Trail(
                    url,
                    archive_dir,
                    this_month,
                    db,
                    audit_pb2_grpc.AuditServiceStub(channel),
                    token,
                )
                found.ids = ids
                for back in (14, 13, 12):  # the months the tests drop, as they were
                    found.exports[found.month(back)[0]] = await found.export(back)
                yield found
        finally:
            if process is not None:
                assert await process.stop() == 0, process.output
            await database.dispose()
            await owner.close()
            await db.close()


def _archive(trail: Trail, name: str) -> tuple[Path, Path]:
    return trail.archive_dir / f"{name}.csv.gz", trail.archive_dir / f"{name}.manifest.json"


def _check_archive(trail: Trail, back: int) -> dict:
    """The month's archive is what the export gave before, its manifest describes it, and
    its rows are the month's rows; returns the manifest."""
    name, low, high = trail.month(back)
    archive, manifest_path = _archive(trail, name)
    manifest = json.loads(manifest_path.read_text())
    packed = archive.read_bytes()
    assert manifest == {
        "rows": ROWS_PER_MONTH + 2,
        "first_created_at": rfc3339(low),
        "last_created_at": rfc3339(high - ONE_US),
        "sha256": hashlib.sha256(packed).hexdigest(),
    }
    text = gzip.decompress(packed)
    assert text == trail.exports[name]  # byte for byte the raw export of the month
    records = list(csv.reader(io.StringIO(text.decode(), newline="")))
    assert {uuid.UUID(r[0]) for r in records[1:]} == trail.ids[name]
    return manifest


async def test_unset_months_keep_everything_and_bad_settings_exit_2(trail):
    """Unset: the trail is kept forever and the command says so. A retention that is not a
    whole number of months from 1 up, or a missing archive directory when something is
    past retention, exits 2 and changes nothing."""
    before = await trail.state()
    bad = ("0", "-1", "twelve", "1.5", "12 months", "99999999999")
    # Refused before any connection: all at once.
    kept, *refusals = await asyncio.gather(
        trail.run(),
        *(
            trail.run(AUDIT_RETENTION_MONTHS=months, AUDIT_ARCHIVE_DIR=str(trail.archive_dir))
            for months in bad
        ),
    )
    assert kept.returncode == 0, kept.stderr
    assert "kept forever" in kept.stdout
    for months, refused in zip(bad, refusals, strict=True):
        assert refused.returncode == 2, (months, refused.stdout, refused.stderr)
        assert "AUDIT_RETENTION_MONTHS must be a whole number" in refused.stderr
    unset_dir = await trail.run(AUDIT_RETENTION_MONTHS="12")
    assert unset_dir.returncode == 2 and "AUDIT_ARCHIVE_DIR is not set" in unset_dir.stderr
    missing = await trail.run(
        AUDIT_RETENTION_MONTHS="12", AUDIT_ARCHIVE_DIR=str(trail.archive_dir / "nowhere")
    )
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    assert await trail.state() == before


async def test_the_services_role_can_remove_nothing(trail):
    """As the role the services connect with, detaching, dropping, truncating or deleting
    a month fails, and the command refuses to run as it; nothing changes."""
    before = await trail.state()
    name = trail.month(1)[0]
    connection = await asyncpg.connect(libpq_dsn(runtime_url(trail.url)))
    try:
        for statement in (
            f"ALTER TABLE audit_logs DETACH PARTITION {name}",
            f"ALTER TABLE audit_logs DETACH PARTITION {name} CONCURRENTLY",
            f"DROP TABLE {name}",
            f"TRUNCATE {name}",
            f"DELETE FROM {name}",
            f"ALTER TABLE {name} RENAME TO {name}_gone",
            "DELETE FROM audit_logs WHERE created_at < date_trunc('month', now())",
            "DELETE FROM audit_requests",
            "SELECT relman_audit_make_partition('2001-01-01')",
        ):
            with pytest.raises(asyncpg.PostgresError) as refused:
                await connection.execute(statement)
            assert refused.value.sqlstate == "42501", (statement, refused.value)
        async with connection.transaction():
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE")
    finally:
        await connection.close()
    as_runtime = await trail.run(
        AUDIT_RETENTION_MONTHS="12",
        AUDIT_ARCHIVE_DIR=str(trail.archive_dir),
        MIGRATION_DATABASE_URL=libpq_dsn(runtime_url(trail.url)),
    )
    assert as_runtime.returncode == 2, as_runtime.stdout + as_runtime.stderr
    assert "does not own audit_logs" in as_runtime.stderr
    assert await trail.state() == before


async def test_a_dry_run_says_what_would_go_and_writes_nothing(trail):
    before = await trail.state()
    dry = await trail.run(
        "--dry-run", AUDIT_RETENTION_MONTHS="12", AUDIT_ARCHIVE_DIR=str(trail.archive_dir)
    )
    assert dry.returncode == 0, dry.stderr
    listed = [line for line in dry.stdout.splitlines() if line.startswith("audit_logs_y")]
    assert listed == [
        f"{trail.month(back)[0]}: attached, {ROWS_PER_MONTH + 2} rows -> "
        f"{_archive(trail, trail.month(back)[0])[0]}"
        for back in (14, 13)
    ]
    assert "nothing archived, detached or dropped" in dry.stdout
    assert await trail.state() == before


async def test_two_runs_never_overlap(trail):
    """While another session holds retention's lock (a run in progress), a run exits 1
    and changes nothing."""
    before = await trail.state()
    await trail.db.execute("SELECT pg_advisory_lock(hashtext('relman_audit_retention'))")
    try:
        second = await trail.run(
            AUDIT_RETENTION_MONTHS="12", AUDIT_ARCHIVE_DIR=str(trail.archive_dir)
        )
    finally:
        await trail.db.execute("SELECT pg_advisory_unlock(hashtext('relman_audit_retention'))")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another retention run or restore is in progress" in second.stderr
    assert await trail.state() == before


async def test_a_killed_run_is_finished_by_the_next(trail):
    """Killed after the oldest month's manifest, then after its detach: the month stays
    until a run finishes it, from the archive already verified (not written again). In
    the end both months past retention are archived and dropped, each with its
    `audit.retention` row and without its request ids; the other months are untouched."""
    settings = {"AUDIT_RETENTION_MONTHS": "12", "AUDIT_ARCHIVE_DIR": str(trail.archive_dir)}
    oldest, older = trail.month(14)[0], trail.month(13)[0]
    kept_low, kept_high = trail.month(12)[1], trail.this_month
    kept_before = tuple(await trail.db.fetchrow(DIGEST, kept_low, kept_high))
    assert kept_before[0] == 12 * (ROWS_PER_MONTH + 2)
    requests_kept = await trail.db.fetchval(
        "SELECT count(*) FROM audit_requests WHERE audit_created_at >= $1", kept_low
    )

    first = await trail.run(**settings, **{HOOK: "manifest"})
    assert first.returncode == HOOK_EXIT, first.stdout + first.stderr
    assert sorted(os.listdir(trail.archive_dir)) == [
        f"{oldest}.csv.gz",
        f"{oldest}.manifest.json",
    ]
    assert await trail.attached(oldest) and await trail.attached(older)
    assert await trail.audit_rows("audit.retention", oldest) == []
    archive, manifest = _archive(trail, oldest)
    written = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (archive, manifest)]

    second = await trail.run(**settings, **{HOOK: "detach"})
    assert second.returncode == HOOK_EXIT, second.stdout + second.stderr
    assert f"{oldest}: archive of an earlier run kept, verified" in second.stdout
    assert await trail.exists(oldest) and not await trail.attached(oldest)
    assert await trail.audit_rows("audit.retention", oldest) == []
    assert await trail.requests_in(14) == 3

    last = await trail.run(**settings)
    assert last.returncode == 0, last.stdout + last.stderr
    assert f"{oldest}: archive of an earlier run kept, verified" in last.stdout
    assert f"{older}: archived in " in last.stdout
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (archive, manifest)] == written
    assert not [name for name in os.listdir(trail.archive_dir) if name.endswith(".tmp")]

    for back in (14, 13):
        name = trail.month(back)[0]
        manifest = _check_archive(trail, back)
        assert not await trail.exists(name)
        assert await trail.requests_in(back) == 0
        [row] = await trail.audit_rows("audit.retention", name)
        assert (row["origin"], row["resource_type"], row["user_id"]) == (
            "relman",
            "audit_log",
            None,
        )
        assert json.loads(row["details"]) == {
            "month": trail.month(back)[1].strftime("%Y-%m"),
            "rows": manifest["rows"],
            "sha256": manifest["sha256"],
            "file": str(_archive(trail, name)[0]),
            "first_created_at": manifest["first_created_at"],
            "last_created_at": manifest["last_created_at"],
        }
    assert tuple(await trail.db.fetchrow(DIGEST, kept_low, kept_high)) == kept_before
    assert (
        await trail.db.fetchval(
            "SELECT count(*) FROM audit_requests WHERE audit_created_at >= $1", kept_low
        )
        == requests_kept
    )
    again = await trail.run(**settings)  # nothing left past retention
    assert again.returncode == 0 and "nothing is past retention" in again.stdout, again.stderr


async def test_seals_outlive_the_months_retention_dropped(trail):
    """The trail was sealed before retention ran (one seal never spans two months): from
    the first month kept VerifyAuditLog is ok; with no window it finds exactly the dropped
    rows missing; and a dropped month's archive verifies offline against its own seals."""
    metadata = bearer(trail.token)
    last = await trail.db.fetchval("SELECT max(sequence) FROM audit_logs")

    async def all_sealed():
        return await trail.db.fetchval(
            "SELECT coalesce(max(last_sequence), 0) >= $1 FROM audit_seals", last
        )

    await poll(all_sealed, 30, "the trail sealed")
    kept = await trail.stub.VerifyAuditLog(
        audit_pb2.VerifyAuditLogRequest(start_time=timestamp(trail.month(12)[1])),
        metadata=metadata,
    )
    assert kept.ok, kept.problems[:3]
    assert kept.rows_checked >= 12 * (ROWS_PER_MONTH + 2)
    everything = await trail.stub.VerifyAuditLog(
        audit_pb2.VerifyAuditLogRequest(), metadata=metadata
    )
    kinds = {audit_pb2.AuditIntegrityProblem.Kind.Name(p.kind) for p in everything.problems}
    assert (kinds, len(everything.problems)) == ({"ROW_MISSING"}, 2 * (ROWS_PER_MONTH + 2))

    archive = _archive(trail, trail.month(14)[0])[0]
    text = gzip.decompress(archive.read_bytes()).decode()
    sequences = [int(row["sequence"]) for row in csv.DictReader(io.StringIO(text, newline=""))]
    seals = (
        await trail.stub.ListAuditSeals(
            audit_pb2.ListAuditSealsRequest(page_size=1000), metadata=metadata
        )
    ).seals
    month_seals = [
        seal
        for seal in seals
        if seal.first_sequence <= max(sequences) and seal.last_sequence >= min(sequences)
    ]
    seals_file = trail.archive_dir / "month.seals.jsonl"
    seals_file.write_text(
        "".join(json_format.MessageToJson(seal, indent=None) + "\n" for seal in month_seals)
    )
    keys = await trail.stub.ListAuditSigningKeys(
        audit_pb2.ListAuditSigningKeysRequest(), metadata=metadata
    )
    keys_file = trail.archive_dir / "keys.pem"
    keys_file.write_text("".join(key.public_key_pem for key in keys.keys))
    try:
        outcome = offline.verify_files(archive, seals_file, [keys_file], None)
    finally:
        seals_file.unlink()
        keys_file.unlink()
    assert outcome.ok, outcome.problems[:3]
    assert outcome.rows_checked == len(sequences) == ROWS_PER_MONTH + 2


async def test_a_bad_archive_stops_the_run_and_a_pending_detach_is_finalized(trail):
    """With 11 months kept, the month 12 back goes. An archive already there that does
    not match its manifest stops the run (exit 1) with the month in place. A detach that
    was cancelled half-way leaves the month pending (out of audit_logs' reads): the next
    run archives it from the table itself, byte for byte the export from before, and
    finalizes the detach before dropping it."""
    settings = {"AUDIT_RETENTION_MONTHS": "11", "AUDIT_ARCHIVE_DIR": str(trail.archive_dir)}
    name = trail.month(12)[0]
    archive, manifest = _archive(trail, name)
    header_only = gzip.compress(trail.exports[name].split(b"\n", 1)[0] + b"\n")
    archive.write_bytes(header_only)
    manifest.write_text(
        json.dumps(
            {
                "rows": ROWS_PER_MONTH + 2,
                "first_created_at": None,
                "last_created_at": None,
                "sha256": hashlib.sha256(header_only).hexdigest(),
            }
        )
    )
    refused = await trail.run(**settings)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "its manifest says" in refused.stderr
    assert await trail.attached(name) and await trail.audit_rows("audit.retention", name) == []
    archive.unlink()
    manifest.unlink()

    # A reader holds audit_logs, so the detach waits in its second step; cancelled there,
    # it leaves the partition pending.
    reader = await asyncpg.connect(libpq_dsn(runtime_url(trail.url)))
    detacher = await asyncpg.connect(libpq_dsn(owner_url(trail.url)))
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM audit_logs")
            detach = asyncio.create_task(
                detacher.execute(f"ALTER TABLE audit_logs DETACH PARTITION {name} CONCURRENTLY")
            )
            await poll(
                lambda: trail.db.fetchval(
                    "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1)",
                    name,
                ),
                30,
                "a detach waiting for the reader",
            )
            await trail.db.fetchval("SELECT pg_cancel_backend($1)", detacher.get_server_pid())
            with pytest.raises(asyncpg.QueryCanceledError):
                await detach
    finally:
        await reader.close()
        await detacher.close()
    assert (await trail.db.fetchrow(DIGEST, *trail.month(12)[1:]))[0] == 0  # out of reads

    finished = await trail.run(**settings)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"{name}: archived in " in finished.stdout
    assert f"{ROWS_PER_MONTH + 2} rows in {archive}" in finished.stdout
    _check_archive(trail, 12)
    assert not await trail.exists(name)
    assert len(await trail.audit_rows("audit.retention", name)) == 1


async def test_a_month_comes_back_from_its_archive(trail):
    """`--restore` refuses an archive that does not match its manifest, or that is not the
    one the trail recorded dropping (a forged pair), brings the month
    back attached and append-only, exporting exactly as its archive, with an
    `audit.restore` row; refuses a month that exists; and the next retention run drops
    it again from the same archive."""
    name = trail.month(14)[0]
    archive, manifest = _archive(trail, name)
    assert archive.exists(), "runs after test_a_killed_run_is_finished_by_the_next"
    written = (archive.stat().st_ino, archive.stat().st_mtime_ns)

    tampered_dir = trail.archive_dir / "tampered"
    tampered_dir.mkdir()
    try:
        tampered = tampered_dir / archive.name
        shutil.copy(manifest, tampered_dir / manifest.name)
        text = bytearray(gzip.decompress(archive.read_bytes()))
        text[text.index(b"retention.test")] = ord("R")
        tampered.write_bytes(gzip.compress(bytes(text)))
        refused = await trail.run("--restore", str(tampered))
        assert refused.returncode == 1 and "sha256" in refused.stderr, refused.stderr
        assert not await trail.exists(name)
        # A forger who rewrites the manifest to match: the trail's own audit.retention
        # row of the month names the archive it dropped, and this is not it.
        forged = json.loads(manifest.read_text())
        forged["sha256"] = hashlib.sha256(tampered.read_bytes()).hexdigest()
        (tampered_dir / manifest.name).write_text(json.dumps(forged))
        refused = await trail.run("--restore", str(tampered))
        assert refused.returncode == 1 and "audit.retention" in refused.stderr, refused.stderr
        assert not await trail.exists(name)
    finally:
        shutil.rmtree(tampered_dir)

    restored = await trail.run("--restore", str(archive))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert await trail.attached(name)
    assert await trail.export(14) == gzip.decompress(archive.read_bytes())
    [row] = await trail.audit_rows("audit.restore", name)
    assert row["origin"] == "relman" and json.loads(row["details"])["rows"] == ROWS_PER_MONTH + 2
    for statement in (f"TRUNCATE {name}", f"DELETE FROM {name}"):  # append-only, even for the owner
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await trail.db.execute(statement)

    twice = await trail.run("--restore", str(archive))
    assert twice.returncode == 1 and f"{name} exists" in twice.stderr

    dropped = await trail.run(AUDIT_RETENTION_MONTHS="12", AUDIT_ARCHIVE_DIR=str(trail.archive_dir))
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert f"{name}: archive of an earlier run kept, verified" in dropped.stdout
    assert not await trail.exists(name)
    assert (archive.stat().st_ino, archive.stat().st_mtime_ns) == written
    assert len(await trail.audit_rows("audit.retention", name)) == 2
