"""audit_logs in monthly partitions (issue: the audit trail at scale).

- Rows land in their UTC month's partition, on either side of a month's edge.
- The services keep partitions two months ahead from start-up, through the one function
  their role may call; that role can create, drop, detach or write no partition itself.
- Append-only holds on every partition addressed directly, for the owner too.
- A month without its partition: the LogAction writer makes it and goes on; a write
  inside a transaction answers UNAVAILABLE (retry), never INTERNAL.
- The migration moves an existing trail, every row intact, into its months.
- Keyset pages and exports across months keep their order and see each row once while
  rows arrive.
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import URL

from audit_svc import export, trail
from shared.devtools import seed
from shared.framework.errors import Unavailable, from_exception, missing_partition
from shared.identity.actor import Actor
from shared.persistence import audit_log, roles, schema
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE
from tests.harness import owner_url, runtime_url, scrape_metrics, scratch_database, start_service


def month_start(moment: datetime, months_on: int = 0) -> datetime:
    """The first instant (UTC) of the month `months_on` after `moment`'s."""
    index = moment.year * 12 + moment.month - 1 + months_on
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition(moment: datetime) -> str:
    return f"audit_logs_y{moment.year:04d}m{moment.month:02d}"


async def connect(url: URL) -> asyncpg.Connection:
    return await asyncpg.connect(libpq_dsn(url))


OWNER_INSERT = (
    "INSERT INTO audit_logs (id, action, resource_type, resource_id, origin, created_at)"
    " VALUES ($1, 'test.row', $2, $3, $4, $5)"
)


async def partitions_of(connection: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await connection.fetch(
        """SELECT c.relname, pg_get_userbyid(c.relowner) AS owner, c.relacl::text AS acl
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'audit_logs'::regclass"""
    )
    return {row["relname"]: row for row in rows}


# -- making partitions ----------------------------------------------------------------------


async def test_the_services_keep_two_months_ahead_and_their_role_makes_no_table(relman, db_url):
    """After start-up this month's partition and the next two exist, the owner's, with no
    grant to the services' role, whose every way to make, drop, detach or write one
    itself is refused; it may only ask the one function to make the next months."""
    now = datetime.now(UTC)
    wanted = [partition(month_start(now, n)) for n in range(audit_log.PARTITIONS_AHEAD + 1)]
    runtime = await connect(runtime_url(db_url))
    try:
        found = await partitions_of(runtime)
        for name in wanted:
            assert found[name]["owner"] == OWNER_ROLE, found[name]
            assert RUNTIME_ROLE not in (found[name]["acl"] or ""), found[name]
        assert await audit_log.months_ahead(runtime) >= audit_log.PARTITIONS_AHEAD
        this_month = wanted[0]
        refused = [
            f"UPDATE {this_month} SET action = 'nothing'",
            f"DELETE FROM {this_month}",
            f"TRUNCATE {this_month}",
            f"INSERT INTO {this_month} (action, resource_type) VALUES ('forged', 'row')",
            f"ALTER TABLE {this_month} DISABLE TRIGGER ALL",
            f"DROP TABLE {this_month}",
            f"ALTER TABLE audit_logs DETACH PARTITION {this_month}",
            "CREATE TABLE audit_logs_y2099m01 (LIKE audit_logs)",
            "CREATE TABLE audit_logs_y2099m01 PARTITION OF audit_logs"
            " FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')",
            "SELECT relman_audit_make_partition('2099-01-01')",
            "CREATE OR REPLACE FUNCTION relman_audit_make_partition(month date)"
            " RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        ]
        for statement in refused:
            with pytest.raises(asyncpg.PostgresError) as error:
                await runtime.execute(statement)
            assert error.value.sqlstate == "42501", (statement, error.value)
        with pytest.raises(asyncpg.InvalidParameterValueError):  # no further than a year
            await runtime.fetchval("SELECT relman_audit_partitions_ahead(13)")
        assert await audit_log.make_partitions(runtime) == 0  # all there: nothing to make
        assert set(await partitions_of(runtime)) == set(found)
    finally:
        await runtime.close()


# -- where rows land, and append-only on each partition ----------------------------------------


@pytest.fixture
async def scratch(server_url) -> URL:
    async with scratch_database(server_url) as url:
        yield url


async def test_rows_land_in_their_month_on_either_side_of_its_edge(scratch):
    """The partition bounds are UTC month edges: the last microsecond of a month is in
    it, the edge itself in the next; a month with no partition is refused whole."""
    owner = await connect(owner_url(scratch))
    try:
        edge = month_start(datetime.now(UTC), 1)
        before, at = uuid.uuid4(), uuid.uuid4()
        await owner.execute(
            OWNER_INSERT, before, "edge", "before", "relman", edge - timedelta(microseconds=1)
        )
        await owner.execute(OWNER_INSERT, at, "edge", "at", "relman", edge)
        landed = dict(
            await owner.fetch(
                "SELECT id, tableoid::regclass::text FROM audit_logs WHERE resource_type = 'edge'"
            )
        )
        assert landed == {
            before: partition(edge - timedelta(microseconds=1)),
            at: partition(edge),
        }
        with pytest.raises(asyncpg.CheckViolationError) as error:  # no default partition
            await owner.execute(
                OWNER_INSERT,
                uuid.uuid4(),
                "edge",
                "far",
                "relman",
                datetime(2099, 1, 1, tzinfo=UTC),
            )
        assert missing_partition(error.value)
        refused = from_exception(error.value)
        assert isinstance(refused, Unavailable) and refused.reason == "AUDIT_PARTITION_MISSING"
    finally:
        await owner.close()


async def test_append_only_holds_on_a_partition_addressed_directly_even_for_the_owner(scratch):
    owner = await connect(owner_url(scratch))
    try:
        this_month = partition(datetime.now(UTC))
        await owner.execute(OWNER_INSERT, uuid.uuid4(), "kept", None, "relman", datetime.now(UTC))
        for statement in (
            f"UPDATE {this_month} SET action = 'changed'",
            f"DELETE FROM {this_month}",
            f"TRUNCATE {this_month}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await owner.execute(statement)
        assert await owner.fetchval(f"SELECT count(*) FROM {this_month}") == 1
    finally:
        await owner.close()


async def test_a_missing_month_is_made_by_the_log_action_writer(scratch):
    """The hourly maker late (here: this month's partition gone), LogAction's writer, as
    the services' role, makes the partitions and stores its rows; a write in a
    transaction meanwhile answers UNAVAILABLE, which a caller retries."""
    owner = await connect(owner_url(scratch))
    runtime = await connect(runtime_url(scratch))
    try:
        this_month = partition(datetime.now(UTC))
        await owner.execute(f"ALTER TABLE audit_logs DETACH PARTITION {this_month}")
        await owner.execute(f"DROP TABLE {this_month}")
        with pytest.raises(asyncpg.CheckViolationError) as error:
            async with runtime.transaction():
                await runtime.execute(
                    "INSERT INTO audit_logs (action, resource_type) VALUES ('x.y', 'in_txn')"
                )
        assert from_exception(error.value).reason == "AUDIT_PARTITION_MISSING"
        row = audit_log.relman_row(Actor.anonymous(None, None), "test.write", "late", None, "{}")
        [outcome] = await trail.write_rows(runtime, [row])
        stored, _, _ = outcome
        assert stored.resource_type == "late"
        assert (
            await owner.fetchval(
                "SELECT tableoid::regclass::text FROM audit_logs WHERE id = $1", stored.id
            )
            == this_month
        )
    finally:
        await owner.close()
        await runtime.close()


# -- the migration of an existing trail -------------------------------------------------------


async def test_the_migration_moves_an_existing_trail_into_its_months(server_url):
    """A database at the previous head holding rows over five months (a gap among them):
    after the upgrade every row is intact, each in its month's partition, every month from
    the oldest to two ahead has one, and client rows' ids stay claimed as request ids (a
    retry of a call made before the upgrade is still a retry)."""
    async with scratch_database(server_url, revision="007_environment_policies") as url:
        owner = await connect(owner_url(url))
        try:
            now = datetime.now(UTC)
            months = [month_start(now, -n) + timedelta(days=3, hours=n) for n in (0, 1, 2, 4)]
            for n, moment in enumerate(months):
                for origin in ("client", "relman", None):
                    await owner.execute(OWNER_INSERT, uuid.uuid4(), "old", str(n), origin, moment)
            columns = (
                "id, user_id, action, resource_type, resource_id, details, ip_address,"
                " user_agent, created_at, origin, recorded_by"
            )
            before = sorted(map(tuple, await owner.fetch(f"SELECT {columns} FROM audit_logs")))
            await asyncio.to_thread(schema.upgrade, owner_url(url), "head", RUNTIME_ROLE)
            after = sorted(map(tuple, await owner.fetch(f"SELECT {columns} FROM audit_logs")))
            assert after == before
            landed = await owner.fetch(
                "SELECT created_at, tableoid::regclass::text AS part FROM audit_logs"
            )
            assert all(row["part"] == partition(row["created_at"]) for row in landed)
            expected = {partition(month_start(now, n)) for n in range(-4, 3)}
            assert set(await partitions_of(owner)) == expected
            claimed = {row[0] for row in await owner.fetch("SELECT request_id FROM audit_requests")}
            assert claimed == {row[0] for row in before if row[9] != "relman"}
        finally:
            await owner.close()


# -- keyset pages and exports across months ---------------------------------------------------


async def test_pages_and_exports_across_months_see_each_row_once_in_order(scratch):
    """Rows in three months, read newest first a page at a time and exported oldest
    first while new rows keep arriving: each earlier row exactly once, in keyset order."""
    owner = await connect(owner_url(scratch))
    database = Database(runtime_url(scratch), pool_size=3)
    try:
        now = datetime.now(UTC)
        for n in (1, 2):
            await owner.fetchval(
                "SELECT relman_audit_make_partition($1::date)", month_start(now, -n).date()
            )
        moments = [
            month_start(now, -n) + timedelta(hours=h, microseconds=m)
            for n in (0, 1, 2)
            for h in (1, 2)
            for m in range(10)
        ]
        for moment in moments:
            await owner.execute(OWNER_INSERT, uuid.uuid4(), "span", None, "client", moment)
        stored = sorted(
            (row["created_at"], row["id"])
            for row in await owner.fetch(
                "SELECT created_at, id FROM audit_logs WHERE resource_type = 'span'"
            )
        )
        arriving = asyncio.Event()

        async def keep_arriving() -> None:
            runtime = await connect(runtime_url(scratch))
            try:
                while True:
                    await runtime.execute(
                        "INSERT INTO audit_logs (action, resource_type) VALUES ('new.row', 'span')"
                    )
                    arriving.set()
            finally:
                await runtime.close()

        writer = asyncio.create_task(keep_arriving())
        try:
            await arriving.wait()
            f = trail.Filter(resource_type="span")
            seen, token = [], ""
            while True:
                page, _ = await trail.get_audit_logs(database, f, 7, token)
                seen += [(row.created_at, row.id) for row in page.items]
                if not (token := page.next_page_token):
                    break
            assert seen == sorted(set(seen), reverse=True)  # newest first, each once
            assert set(stored) <= set(seen)
            text = "".join(
                [chunk async for chunk in export.export_audit_logs(database, f, raw=True)]
            )
            exported = [
                (datetime.fromisoformat(row[1]), uuid.UUID(row[0]))
                for row in list(csv.reader(io.StringIO(text, newline="")))[1:]
            ]
            assert exported == sorted(set(exported))  # oldest first, each once
            assert set(stored) <= set(exported)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    finally:
        await database.dispose()
        await owner.close()


async def test_a_grant_on_a_partition_shows_as_exposure_at_start_up(scratch):
    """A partition reached by a stray grant (an operator's GRANT ... ON ALL TABLES) is a
    way around audit_logs' own grants: the services' start-up check names it, and the
    next migration's grants take it back."""
    this_month = partition(datetime.now(UTC))
    owner = await connect(owner_url(scratch))
    runtime = await connect(runtime_url(scratch))
    try:
        assert await roles.trail_exposure(runtime) == []
        await owner.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {RUNTIME_ROLE}")
        exposure = await roles.trail_exposure(runtime)
        assert any("partitions" in words for words in exposure), exposure
        await roles.grant_runtime(owner, RUNTIME_ROLE)
        assert await roles.trail_exposure(runtime) == []
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute(f"DELETE FROM {this_month}")
    finally:
        await owner.close()
        await runtime.close()


async def test_the_seed_makes_the_past_months_its_trail_needs(scratch):
    """The sample trail reaches a month back: seeded early in a month, on a database
    migrated that month (which has no partition before it), its rows land all the same."""
    early = month_start(datetime.now(UTC)) + timedelta(days=3)
    assert await seed.seed(owner_url(scratch), now=early)
    owner = await connect(owner_url(scratch))
    try:
        months = {
            row[0]
            for row in await owner.fetch("SELECT DISTINCT tableoid::regclass::text FROM audit_logs")
        }
    finally:
        await owner.close()
    assert partition(month_start(early, -1)) in months


async def test_a_service_makes_the_months_ahead_as_it_starts_and_reports_them(scratch):
    """Only this month's partition left: a starting service, as the runtime role, makes
    the next two and says so, in its log and on relman_audit_partitions_ahead."""
    now = datetime.now(UTC)
    owner = await connect(owner_url(scratch))
    try:
        for n in (1, 2):
            ahead = partition(month_start(now, n))
            await owner.execute(f"ALTER TABLE audit_logs DETACH PARTITION {ahead}")
            await owner.execute(f"DROP TABLE {ahead}")
        assert await audit_log.months_ahead(owner) == 0
        audit = await start_service(scratch, "audit_svc", AUDIT_METRICS_PORT="0")
        try:
            assert "made 2 monthly partitions of audit_logs" in audit.output
            gauge = ("relman_audit_partitions_ahead", frozenset())
            assert (await scrape_metrics(audit))[gauge] == audit_log.PARTITIONS_AHEAD
        finally:
            assert await audit.stop() == 0, audit.output
        assert await audit_log.months_ahead(owner) == audit_log.PARTITIONS_AHEAD
    finally:
        await owner.close()


async def test_a_maker_that_fails_leaves_callers_a_retry_and_the_gauge_an_alarm(scratch):
    """The partition maker refused (here: its EXECUTE taken from the services' role): a
    service still starts, says so and reports -1 months ahead; LogAction's writer, unable
    to make a missing month, answers the missing partition (UNAVAILABLE), not the maker's
    refusal (INTERNAL)."""
    owner = await connect(owner_url(scratch))
    runtime = await connect(runtime_url(scratch))
    try:
        await owner.execute(
            f"REVOKE EXECUTE ON FUNCTION relman_audit_partitions_ahead(integer) FROM {RUNTIME_ROLE}"
        )
        audit = await start_service(scratch, "audit_svc", AUDIT_METRICS_PORT="0")
        try:
            assert "could not make the audit trail's partitions ahead" in audit.output
            gauge = ("relman_audit_partitions_ahead", frozenset())
            assert (await scrape_metrics(audit))[gauge] == -1
        finally:
            assert await audit.stop() == 0, audit.output
        this_month = partition(datetime.now(UTC))
        await owner.execute(f"ALTER TABLE audit_logs DETACH PARTITION {this_month}")
        await owner.execute(f"DROP TABLE {this_month}")
        row = audit_log.relman_row(Actor.anonymous(None, None), "test.write", "late", None, "{}")
        with pytest.raises(asyncpg.CheckViolationError) as error:
            await trail.write_rows(runtime, [row])
        assert from_exception(error.value).reason == "AUDIT_PARTITION_MISSING"
    finally:
        await owner.close()
        await runtime.close()


async def test_a_claimed_request_id_stays_claimed_and_its_claim_cannot_be_dated(scratch):
    """A request id whose row cannot be read (its month detached by a retention run that
    has not dropped it yet, with the claims) is still another request's: REQUEST_ID_REUSED,
    not a new row. The services' role claims ids only as
    the writer does: it may not choose the month a claim points to."""
    owner = await connect(owner_url(scratch))
    runtime = await connect(runtime_url(scratch))
    try:
        claimed = uuid.uuid4()
        await owner.execute(
            "INSERT INTO audit_requests (request_id, audit_id, audit_created_at)"
            " VALUES ($1, $2, '2001-01-01')",
            claimed,
            uuid.uuid4(),
        )
        row = audit_log.client_row(
            Actor.anonymous(None, None), claimed, None, "x.y", "reused", None, "{}", None, None
        )
        [outcome] = await trail.write_rows(runtime, [row])
        assert outcome.reason == "REQUEST_ID_REUSED", outcome
        assert not await owner.fetchval(
            "SELECT count(*) FROM audit_logs WHERE resource_type = 'reused'"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute(
                "INSERT INTO audit_requests (request_id, audit_id, audit_created_at)"
                " VALUES ($1, $1, '2001-01-01')",
                uuid.uuid4(),
            )
    finally:
        await owner.close()
        await runtime.close()


async def test_a_partition_belongs_to_the_trails_owner_whoever_makes_it(db_url: URL):
    """A month made by a superuser (the seed, in the tests and the bench) belongs to the
    owner of audit_logs like the others: the owner reads and loads it. It did not, and
    on the first day of a month the owner's load of the trail at scale was refused."""
    superuser = await asyncpg.connect(libpq_dsn(db_url))
    try:
        assert await superuser.fetchval("SELECT relman_audit_make_partition('2001-01-01')")
        owners = await superuser.fetch(
            "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'public.audit_logs'::regclass"
        )
    finally:
        await superuser.close()
    assert {row["owner"] for row in owners} == {OWNER_ROLE}
    assert "audit_logs_y2001m01" in {row["relname"] for row in owners}
    owner = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        assert await owner.fetchval("SELECT count(*) FROM public.audit_logs_y2001m01") == 0
    finally:
        await owner.close()
