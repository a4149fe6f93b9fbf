"""`python -m audit_svc.retention`: archives the months of the audit trail past retention,
then drops their partitions; `--restore` brings one month back from its archive.

    AUDIT_RETENTION_MONTHS=12 AUDIT_ARCHIVE_DIR=/backups/audit python -m audit_svc.retention
    python -m audit_svc.retention --dry-run
    python -m audit_svc.retention --restore /backups/audit/audit_logs_y2025m01.csv.gz

It runs as the owner of the schema (MIGRATION_DATABASE_URL, on a direct connection:
it holds a session advisory lock and detaches CONCURRENTLY), since the services' role
may remove no row. A month is past retention when its whole range ends before now
minus AUDIT_RETENTION_MONTHS months; unset, the trail is kept forever. Oldest first,
each month goes through steps the catalog and the files tell apart, so a run killed
at any point is finished by the next:

1. archive: `<partition>.csv.gz`, the month as ExportAuditLogs with `raw` gives it
   (the same COPY query), in one snapshot while the partition is locked against
   inserts; then `<partition>.manifest.json` (rows, first and last created_at, the
   sha256 of the .gz), renamed into place last. A verified archive is never redone.
2. verify: the file's sha256, and its rows read back (csv) against the manifest and
   against the table; any mismatch stops the run (exit 1) and nothing is dropped.
3. detach CONCURRENTLY (inserts and reads of other months go on), or FINALIZE a
   detach a killed run left pending.
4. drop, in one transaction with the `audit.retention` audit row and the removal of
   the month's request ids (audit_requests), after checking the table once more.

Exit status: 0 done (or nothing to do), 2 bad settings, 1 a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from audit_svc import export, trail
from audit_svc.trail import Filter
from shared.identity.actor import Actor
from shared.persistence.audit_log import relman_row
from shared.persistence.db import (
    DatabaseUrlError,
    connect_arguments,
    describe,
    migration_database_url,
)
from shared.persistence.models import AUDIT_PARTITION

PROG = "python -m audit_svc.retention"
# Past a century the interval arithmetic overflows, and nobody means it.
MONTHS_MAX = 1200
# Only the tests set it: `manifest` or `detach` ends the process (os._exit) right after
# that step, as a crash would, so that they can check the next run finishes the job.
EXIT_AFTER = "AUDIT_RETENTION_EXIT_AFTER"
EXIT_AFTER_CODE = 3
# The export's CSV header: what a readable archive starts with.
# A details cell may pass csv's default limit (128 KiB): PostgreSQL prints numbers in full.
csv.field_size_limit(2**31 - 1)
HEADER = list(export.HEADER)
CREATED_AT = HEADER.index("created_at")
# The command's audit rows: no user, like every command line's.
ACTOR = Actor.anonymous(None, "relman-retention-cli")
LOCK = "SELECT pg_try_advisory_lock(hashtext('relman_audit_retention'))"
# A table's count and first and last created_at, the times as the export writes them.
_STATS = (
    f"SELECT count(*) AS rows, {export.utc_text('min(created_at)')} AS first_created_at,"
    f" {export.utc_text('max(created_at)')} AS last_created_at FROM public.{{}}"
)
# Every table named like a month's partition: attached, pending detach, or detached by
# a run that was killed before it dropped the table.
_PARTITIONS = """
SELECT c.relname AS name,
       CASE WHEN i.inhrelid IS NULL THEN 'detached'
            WHEN i.inhdetachpending THEN 'pending' ELSE 'attached' END AS state
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND i.inhparent = 'public.audit_logs'::regclass
WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname ~ $1
ORDER BY c.relname
"""


class SettingsError(Exception):
    """Bad settings or input: exit status 2."""


class RetentionError(Exception):
    """A step that failed or a check that did not hold: exit status 1."""


@dataclass(frozen=True)
class Month:
    """One month's partition: its table, its UTC range, and where it stands."""

    name: str
    low: datetime
    high: datetime
    state: str  # attached, pending (a detach began), detached (not yet dropped)

    @classmethod
    def named(cls, name: str, state: str = "") -> Month:
        match = AUDIT_PARTITION.fullmatch(name)
        if match is None or int(match[1]) < 1 or not 1 <= int(match[2]) <= 12:
            raise SettingsError(f"{name} is not the name of a month's partition")
        year, month = int(match[1]), int(match[2])
        low = datetime(year, month, 1, tzinfo=UTC)
        high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return cls(name, low, high, state)

    @property
    def table(self) -> str:
        return f'"{self.name}"'

    @property
    def label(self) -> str:
        return self.low.strftime("%Y-%m")

    def archive(self, directory: Path) -> Path:
        return directory / f"{self.name}.csv.gz"

    def manifest(self, directory: Path) -> Path:
        return directory / f"{self.name}.manifest.json"


def parse_months(value: str | None) -> int | None:
    """AUDIT_RETENTION_MONTHS: None (unset or empty: keep forever) or 1..MONTHS_MAX."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= MONTHS_MAX:
        raise SettingsError(
            f"AUDIT_RETENTION_MONTHS must be a whole number of months from 1 to {MONTHS_MAX},"
            f" not {value!r} (unset: keep the audit trail forever)"
        )
    return int(text)


def archive_directory(value: str | None) -> Path:
    """AUDIT_ARCHIVE_DIR, which must name an existing directory (a typo must not scatter
    archives in a new one)."""
    if value is None or not value.strip():
        raise SettingsError("AUDIT_ARCHIVE_DIR is not set: where should the archives go?")
    path = Path(value).absolute()
    if not path.is_dir():
        raise SettingsError(f"AUDIT_ARCHIVE_DIR {path} is not a directory")
    return path


# -- files -----------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """A rename survives a crash only once its directory is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class _Packed:
    """An archive being written: gzip into `<name>.tmp`, synced and renamed into place
    only when complete (left behind by a crash, the next run writes it again)."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.partial = archive.with_name(archive.name + ".tmp")

    def __enter__(self) -> _Packed:
        self.file = open(self.partial, "wb")  # closed by __exit__
        # No name and no time in the gzip header: the same rows make the same file.
        # zlib's default level: at 9, 1M rows took 4.8 s instead of 3.0 s for 2% less.
        self.packed = gzip.GzipFile(
            filename="", mode="wb", fileobj=self.file, mtime=0, compresslevel=6
        )
        return self

    def write(self, data: bytes) -> None:
        self.packed.write(data)

    def __exit__(self, kind, error, trace) -> None:
        try:
            self.packed.close()
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if kind is None:
            os.replace(self.partial, self.archive)
            _fsync_directory(self.archive.parent)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's four keys, or RetentionError if it is not one."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RetentionError(f"{path} cannot be read as a manifest: {exc}") from None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("rows"), int)
        or not isinstance(manifest.get("sha256"), str)
        or not all(
            isinstance(manifest.get(k), str | None) for k in ("first_created_at", "last_created_at")
        )
    ):
        raise RetentionError(f"{path} is not a manifest (rows, first/last_created_at, sha256)")
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Written aside and renamed into place: a manifest present is a manifest complete."""
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w") as file:
        json.dump(manifest, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    _fsync_directory(path.parent)


def verify_file(month: Month, archive: Path, manifest: dict[str, Any]) -> None:
    """The archive is the file the manifest describes (sha256), and reads back as the
    export's CSV with the manifest's rows and first and last times, every time inside
    the month and in order."""
    if not archive.is_file():
        raise RetentionError(f"{archive} is missing (its manifest is there)")
    if _sha256(archive) != manifest["sha256"]:
        raise RetentionError(f"{archive}: its sha256 is not the manifest's")
    rows, first, last = 0, None, ""
    cells = len(HEADER)
    try:
        with gzip.open(archive, "rt", encoding="utf-8", newline="") as text:
            reader = csv.reader(text)  # a cell may hold newlines: records, not lines
            if next(reader, None) != HEADER:
                raise RetentionError(f"{archive}: not the export's CSV header")
            for record in reader:
                # One time format (RFC 3339, UTC, microseconds): text order is time order.
                if len(record) != cells or record[CREATED_AT] < last:
                    raise RetentionError(
                        f"{archive}: record {rows + 1} is malformed or out of order"
                    )
                last = record[CREATED_AT]
                if first is None:
                    first = last
                rows += 1
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise RetentionError(f"{archive} cannot be read back: {exc}") from None
    # In order, so all inside the month when the first and the last are.
    if rows and not (first.startswith(month.label) and last.startswith(month.label)):
        raise RetentionError(f"{archive}: rows from outside {month.label}")
    found = {"rows": rows, "first_created_at": first, "last_created_at": last or None}
    expected = {k: manifest[k] for k in found}
    if found != expected:
        raise RetentionError(f"{archive} holds {found}, its manifest says {expected}")


# -- database --------------------------------------------------------------------------


async def _stats(connection: asyncpg.Connection, month: Month) -> dict[str, Any]:
    return dict(await connection.fetchrow(_STATS.format(month.table)))


async def verify_table(connection: asyncpg.Connection, month: Month, manifest: dict) -> None:
    """The table still holds what was archived: count, first and last created_at."""
    found = await _stats(connection, month)
    expected = {k: manifest[k] for k in found}
    if found != expected:
        raise RetentionError(
            f"{month.name} holds {found}, its archive {expected}: not dropped"
            " (move the archive and its manifest aside to archive the month again)"
        )


async def months_past(connection: asyncpg.Connection, months: int) -> tuple[datetime, list[Month]]:
    """The cut-off (now minus `months`) and the partitions whose range ends before it:
    a detach left pending first (only one may be pending at a time), then oldest first.
    A month whose removal a run began (pending or detached) is finished whatever the
    cut-off says now: it is out of the trail already, and a pending detach left alone
    would block every later one."""
    cutoff = await connection.fetchval("SELECT now() - make_interval(months => $1)", months)
    found = []
    for row in await connection.fetch(_PARTITIONS, f"^{AUDIT_PARTITION.pattern}$"):
        try:
            found.append(Month.named(row["name"], row["state"]))
        except SettingsError:  # audit_logs_y2025m13: no month's, none of retention's
            continue
    past = [m for m in found if m.high < cutoff or m.state in ("pending", "detached")]
    return cutoff, sorted(past, key=lambda m: (m.state != "pending", m.name))


async def archive_month(connection: asyncpg.Connection, month: Month, directory: Path) -> dict:
    """Writes the month's archive and then its manifest; returns the manifest.

    One REPEATABLE READ snapshot gives the COPY and the table's count and times, after
    a SHARE lock on the partition, which stops inserts into it (only the owner can still
    write a past month) while reads and every other month's inserts go on. The COPY is
    the export's own query with `raw`, so the archive is what ExportAuditLogs gives for
    the month; a partition no longer attached is read directly, under the same name."""
    query, args = export.export_query(Filter(start_time=month.low, end_time=month.high), raw=True)
    if month.state != "attached":  # audit_logs no longer routes reads to it
        direct = query.replace(
            " FROM audit_logs LEFT JOIN", f" FROM public.{month.table} AS audit_logs LEFT JOIN", 1
        )
        if direct == query:
            raise RetentionError("the export's query changed shape: cannot read a detached month")
        query = direct
    archive = month.archive(directory)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        await connection.execute(f"LOCK TABLE public.{month.table} IN SHARE MODE")
        await connection.execute("SET LOCAL enable_sort = off")  # index order, as the export
        with _Packed(archive) as packed:

            async def sink(data: bytes) -> None:
                packed.write(data)

            await connection.copy_from_query(query, *args, output=sink, format="csv", header=True)
        stats = await _stats(connection, month)
    manifest = {**stats, "sha256": _sha256(archive)}
    _write_manifest(month.manifest(directory), manifest)
    return manifest


async def detach(connection: asyncpg.Connection, month: Month) -> None:
    """Off audit_logs without blocking it: CONCURRENTLY (outside any transaction), or
    FINALIZE when a killed run left the detach pending."""
    if month.state == "attached":
        await connection.execute(
            f"ALTER TABLE public.audit_logs DETACH PARTITION public.{month.table} CONCURRENTLY"
        )
    elif month.state == "pending":
        await connection.execute(
            f"ALTER TABLE public.audit_logs DETACH PARTITION public.{month.table} FINALIZE"
        )


async def drop(connection: asyncpg.Connection, month: Month, manifest: dict, archive: Path) -> int:
    """Drops the detached table, in one transaction with its `audit.retention` row and the
    removal of the month's request ids; returns how many of those went."""
    details = {
        "month": month.label,
        "rows": manifest["rows"],
        "sha256": manifest["sha256"],
        "file": str(archive),
        "first_created_at": manifest["first_created_at"],
        "last_created_at": manifest["last_created_at"],
    }
    row = relman_row(ACTOR, "audit.retention", "audit_log", month.name, json.dumps(details))
    async with connection.transaction():
        await connection.execute(f"LOCK TABLE public.{month.table} IN ACCESS EXCLUSIVE MODE")
        if await connection.fetchval(
            "SELECT EXISTS (SELECT FROM pg_inherits WHERE inhrelid = $1::regclass)",
            f"public.{month.table}",
        ):
            raise RetentionError(f"{month.name} is attached again: not dropped")
        await verify_table(connection, month, manifest)
        status = await connection.execute(
            "DELETE FROM audit_requests WHERE audit_created_at >= $1 AND audit_created_at < $2",
            month.low,
            month.high,
        )
        await _record(connection, row)
        await connection.execute(f"DROP TABLE public.{month.table}")
    return int(status.split()[-1])


async def _record(connection: asyncpg.Connection, row: dict[str, Any]) -> None:
    """relman's audit row of a step, in the step's transaction, written as LogAction's
    writer writes relman's own rows (trail.write_rows)."""
    [outcome] = await trail.write_rows(connection, [row])
    if isinstance(outcome, BaseException):
        raise outcome


def _crash_point(step: str, exit_after: str | None) -> None:
    if exit_after == step:
        sys.stdout.flush()
        os._exit(EXIT_AFTER_CODE)


async def retain(
    connection: asyncpg.Connection,
    months: int,
    directory: str | None,
    *,
    dry_run: bool,
    exit_after: str | None = None,
) -> None:
    """Archives, verifies, detaches and drops each month past retention, oldest first,
    stopping at the first failure; with `dry_run`, says what it would do and writes
    nothing."""
    cutoff, past = await months_past(connection, months)
    edge = cutoff.astimezone(UTC).isoformat(timespec="seconds")
    print(f"retention {months} months: months that end before {edge} go")
    if not past:
        print("nothing is past retention")
        return
    folder = archive_directory(directory)
    if not dry_run:
        # This run's audit rows land in the current month: make sure its partition exists
        # (when it cannot now, the services' own calls may have made it already).
        try:
            await connection.fetchval("SELECT relman_audit_partitions_ahead(0)")
        except asyncpg.PostgresError as exc:
            print(f"retention: warning: this month's partition not checked: {exc}", file=sys.stderr)
    for month in past:
        archive, manifest_path = month.archive(folder), month.manifest(folder)
        if dry_run:
            rows = (await _stats(connection, month))["rows"]
            print(f"{month.name}: {month.state}, {rows} rows -> {archive}{_earlier(month, folder)}")
            continue
        started = time.monotonic()
        if manifest_path.exists():
            manifest = read_manifest(manifest_path)
            done = "archive of an earlier run kept"
        else:
            manifest = await archive_month(connection, month, folder)
            _crash_point("manifest", exit_after)
            done = f"archived in {time.monotonic() - started:.2f} s"
        started = time.monotonic()
        verify_file(month, archive, manifest)
        await verify_table(connection, month, manifest)
        print(
            f"{month.name}: {done}, verified in {time.monotonic() - started:.2f} s:"
            f" {manifest['rows']} rows in {archive} (sha256 {manifest['sha256']})"
        )
        started = time.monotonic()
        await detach(connection, month)
        detached_s = time.monotonic() - started
        _crash_point("detach", exit_after)
        started = time.monotonic()
        requests = await drop(connection, month, manifest, archive)
        dropped_s = time.monotonic() - started
        print(
            f"{month.name}: detached in {detached_s * 1000:.0f} ms, dropped with"
            f" {requests} request ids in {dropped_s * 1000:.0f} ms"
        )
    if dry_run:
        print("dry run: nothing archived, detached or dropped")


def _earlier(month: Month, folder: Path) -> str:
    """What a dry run says of an archive an earlier run left (read, never written)."""
    if not month.manifest(folder).exists():
        return ""
    try:
        verify_file(month, month.archive(folder), read_manifest(month.manifest(folder)))
    except RetentionError as exc:
        return f" (an earlier archive does not verify, a run would stop: {exc})"
    return " (archived and verified by an earlier run: kept)"


# The sha256 relman recorded when retention dropped a month (its newest drop).
_RECORDED_SHA256 = """
SELECT details ->> 'sha256' FROM audit_logs
WHERE origin = 'relman' AND action = 'audit.retention' AND resource_type = 'audit_log'
  AND resource_id = $1
ORDER BY created_at DESC LIMIT 1
"""


async def restore(connection: asyncpg.Connection, archive: Path) -> str:
    """Brings one month back from its archive as an attached partition, in one
    transaction with an `audit.restore` row; refused if the month's table exists.

    The archive is verified against its manifest first; the rows are loaded into the
    new table before it is attached (the indexes are built once, and ATTACH checks every
    row lies inside the month), then checked against the manifest again. The month's
    request ids are not restored: a retry a year late is a new request."""
    month, manifest = _archive_to_restore(archive)
    if await connection.fetchval("SELECT to_regclass($1)", f"public.{month.table}"):
        raise RetentionError(f"{month.name} exists: restore only brings back a dropped month")
    # The archive must be the one retention recorded when it dropped the month: a file
    # and manifest written beside it by anyone else are not history.
    recorded = await connection.fetchval(_RECORDED_SHA256, month.name)
    if recorded != manifest["sha256"]:
        raise RetentionError(
            f"{archive}: its sha256 is not the one the trail's audit.retention row of"
            f" {month.name} records ({recorded or 'no such row'}): not restored"
        )
    staging = f'"relman_restore_{month.name}"'
    async with connection.transaction():
        await connection.execute(
            f"CREATE TABLE public.{month.table}"
            " (LIKE public.audit_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        # The CSV's columns, typed: COPY tells NULL from an empty string as it wrote them.
        await connection.execute(
            f"CREATE TABLE public.{staging} (id uuid, created_at timestamptz, user_id uuid,"
            " username text, action text, resource_type text, resource_id text, details jsonb,"
            " ip_address text, user_agent text, origin text, recorded_by uuid, sequence bigint)"
        )
        with gzip.open(archive, "rb") as source:
            await connection.copy_to_table(
                staging.strip('"'), schema_name="public", source=source, format="csv", header=True
            )
        columns = ", ".join(c for c in HEADER if c != "username")
        await connection.execute(
            f"INSERT INTO public.{month.table} ({columns}) SELECT {columns} FROM public.{staging}"
        )
        await connection.execute(f"DROP TABLE public.{staging}")
        await verify_table(connection, month, manifest)
        # Append-only like every partition: the row trigger comes with ATTACH, the
        # TRUNCATE trigger does not (as migration 008 makes partitions).
        await connection.execute(
            f"CREATE TRIGGER append_only_truncate BEFORE TRUNCATE ON public.{month.table}"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.relman_audit_logs_append_only()"
        )
        await connection.execute(
            f"ALTER TABLE public.audit_logs ATTACH PARTITION public.{month.table}"
            f" FOR VALUES FROM ({_literal(month.low)}) TO ({_literal(month.high)})"
        )
        details = {
            "month": month.label,
            "rows": manifest["rows"],
            "sha256": manifest["sha256"],
            "file": str(archive),
        }
        row = relman_row(ACTOR, "audit.restore", "audit_log", month.name, json.dumps(details))
        await _record(connection, row)
    return f"{month.name}: restored {manifest['rows']} rows from {archive}"


def _archive_to_restore(archive: Path) -> tuple[Month, dict[str, Any]]:
    """The month an archive holds and its manifest, the file verified against it."""
    match = re.fullmatch(rf"({AUDIT_PARTITION.pattern})\.csv\.gz", archive.name)
    if match is None:
        raise SettingsError(f"{archive.name} is not an archive's name (audit_logs_yYYYYmMM.csv.gz)")
    month = Month.named(match[1])
    manifest_path = month.manifest(archive.parent)
    if not archive.is_file() or not manifest_path.is_file():
        raise SettingsError(f"{archive} and {manifest_path.name} beside it must both exist")
    manifest = read_manifest(manifest_path)
    verify_file(month, archive, manifest)
    return month, manifest


def _literal(moment: datetime) -> str:
    """A bound as an SQL literal (ATTACH takes no parameters): an ISO time, no quotes in it."""
    return f"'{moment.isoformat()}'"


# -- command line ----------------------------------------------------------------------


async def _connect() -> asyncpg.Connection:
    """The owner's own session (not pooled), in UTC: month arithmetic and bounds in UTC."""
    try:
        url = migration_database_url()
    except DatabaseUrlError as exc:
        raise SettingsError(str(exc)) from None
    connection = await asyncpg.connect(
        **connect_arguments(url, statement_cache=False, application_name="relman retention")
    )
    try:
        await connection.execute("SET TimeZone = 'UTC'")
        row = await connection.fetchrow(
            "SELECT c.relkind::text AS relkind,"
            " pg_has_role(current_user, c.relowner, 'USAGE') AS owner"
            " FROM pg_class c WHERE c.oid = to_regclass('public.audit_logs')"
        )
        if row is None or row["relkind"] != "p":
            raise SettingsError(f"audit_logs in the {describe(url)} is not partitioned: migrate")
        if not row["owner"]:
            user = await connection.fetchval("SELECT current_user")
            raise SettingsError(
                f"{user} does not own audit_logs: run as the owner (MIGRATION_DATABASE_URL)"
            )
        if not await connection.fetchval(LOCK):
            raise RetentionError("another retention run or restore is in progress")
    except BaseException:
        await connection.close()
        raise
    return connection


async def _command(args) -> None:
    if args.restore:
        connection = await _connect()
        try:
            print(await restore(connection, args.restore))
        finally:
            await connection.close()
        return
    months = parse_months(args.months)
    if months is None:
        print("AUDIT_RETENTION_MONTHS is not set: the audit trail is kept forever; nothing to do")
        return
    connection = await _connect()
    try:
        await retain(
            connection,
            months,
            args.archive_dir,
            dry_run=args.dry_run,
            exit_after=os.environ.get(EXIT_AFTER),
        )
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Archive and drop the months of the audit trail past retention, as the"
        " schema's owner (MIGRATION_DATABASE_URL); or restore one month from its archive.",
    )
    parser.add_argument(
        "--months",
        default=os.environ.get("AUDIT_RETENTION_MONTHS"),
        help="months to keep (default AUDIT_RETENTION_MONTHS; unset: keep forever)",
    )
    parser.add_argument(
        "--archive-dir",
        default=os.environ.get("AUDIT_ARCHIVE_DIR"),
        help="where the archives go (default AUDIT_ARCHIVE_DIR)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="say which months would go; write nothing"
    )
    parser.add_argument(
        "--restore",
        metavar="ARCHIVE",
        help="bring back one dropped month from its .csv.gz (its manifest beside it)",
    )
    args = parser.parse_args(argv)
    if args.restore:
        args.restore = Path(args.restore).absolute()
    try:
        asyncio.run(_command(args))
    except SettingsError as exc:
        print(f"retention: {exc}", file=sys.stderr)
        return 2
    except (RetentionError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"retention: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
