"""Sealing under concurrency: 32 writers and two audit_svc processes sealing one database.

The writers mix LogAction and LogActions calls to either process with transactions of
the services' runtime role held open for different lengths: committed at once, written
to over time, held open while hundreds of later rows commit (low sequences committed
late, what a sealer that seals whatever is visible would pass over), and rolled back
(their sequences are gaps). Whatever the interleaving, an auditor must find every
committed row in exactly one seal, seals numbered and ranged without a gap from
sequence 1, the chain and signatures valid, and VerifyAuditLog satisfied.

The interleaving that load only hits now and then (a row of the newest transaction held
open while an older one commits, and a sealer run in between) is pinned by a test of its
own that runs the sealer at that instant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

import asyncpg
import grpc
import pytest

from audit_svc import seal_store
from audit_svc.sealer import Sealer
from audit_svc.sealing import Seal, parse_digests
from audit_svc.signing_keys import KeyFile, read_public_keys
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.identity.tokens import issue_token
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import User
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    poll,
    runtime_url,
    scrape_metrics,
    scratch_database,
    start_service,
)

# The writers, 32 in all.
CALLERS = 10  # LogAction, CALLS_EACH calls each, to the two processes in turn
CALLS_EACH = 12
STREAMS = 6  # LogActions, BATCHES batches in one transaction, held open between them
BATCHES = 3
ROWS_PER_BATCH = 10
INSTANT = 4  # runtime role: INSTANT_TRANSACTIONS transactions of 1-3 rows, committed at once
INSTANT_TRANSACTIONS = 5
SLOW = 4  # runtime role: SLOW_ROWS rows in one transaction, a row each time others commit
SLOW_ROWS = 4
HELD = 5  # runtime role: a row written early, committed once OVERTAKEN_BY later rows are
ROLLED_BACK = 3  # runtime role: rows written early, rolled back once overtaken
WRITERS = CALLERS + STREAMS + INSTANT + SLOW + HELD + ROLLED_BACK
# How many rows others commit while a slow writer or a stream holds its transaction.
OTHERS_BETWEEN_ROWS = 20
# How many rows others commit while a held or rolled-back transaction stays open; the
# held writers start that many rows apart, so sealing moves on while writing goes on.
OVERTAKEN_BY = 120
STAGGER = 50
WITHIN_S = 30
ACTION = "seal.concurrency"

INSERT_ROW = (
    "INSERT INTO audit_logs (action, resource_type, resource_id, origin)"
    " VALUES ($1, 'release', $2, 'client') RETURNING sequence"
)
INSERT_ROW_WITH_XID = INSERT_ROW + ", pg_current_xact_id()::text::bigint"
ALL_SEALS = f"SELECT {', '.join(Seal.__dataclass_fields__)} FROM audit_seals ORDER BY seal_number"
SEALER_TROUBLE = ("left audit row", "sealing the audit trail failed")


class Watch:
    """What the writers wait on, the count of committed rows, sampled for all of them by
    one connection at most every 20 ms."""

    SAMPLE_EVERY_S = 0.02

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db
        self.committed = 0
        # Set when the writers that never wait (CALLERS, INSTANT) are through: a writer
        # waiting for others to commit stops waiting then, whatever the count.
        self.quick_writers_done = asyncio.Event()
        self._lock = asyncio.Lock()
        self._sampled_at = float("-inf")

    async def _sample(self) -> None:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._sampled_at < self.SAMPLE_EVERY_S:
                return
            self.committed = await self.db.fetchval("SELECT count(*) FROM audit_logs")
            self._sampled_at = asyncio.get_running_loop().time()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        async def check() -> bool:
            await self._sample()
            return condition()

        await poll(check, WITHIN_S, what)

    async def others_committed(self, count: int) -> None:
        """Until `count` more rows are committed than now (or the quick writers are done)."""
        await self._sample()
        target = self.committed + count
        await self.until(
            lambda: self.committed >= target or self.quick_writers_done.is_set(),
            f"{count} more rows committed",
        )


class Writers:
    """The 32 writers, and what each left: the sequences it committed and rolled back
    (the runtime role's; LogAction(s) rows are counted from the database)."""

    def __init__(self, url, stubs, metadata, watch: Watch) -> None:
        self.url = url
        self.stubs = stubs
        self.metadata = metadata
        self.watch = watch
        self.committed: set[int] = set()
        self.rolled_back: set[int] = set()
        # Held writers write their rows in turn: the first before any other writer starts.
        self.held_written = [asyncio.Event() for _ in range(HELD)]

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(libpq_dsn(runtime_url(self.url)))

    async def caller(self, index: int) -> None:
        for call in range(CALLS_EACH):
            await self.stubs[(index + call) % 2].LogAction(
                audit_pb2.LogActionRequest(
                    action=ACTION, resource_type="release", resource_id=f"call-{index}-{call}"
                ),
                metadata=self.metadata,
            )

    async def stream(self, index: int) -> None:
        async def batches():
            for batch in range(BATCHES):
                if batch:  # the stream's transaction stays open meanwhile
                    await self.watch.others_committed(OTHERS_BETWEEN_ROWS)
                yield audit_pb2.LogActionsRequest(
                    actions=[
                        audit_pb2.LogActionRequest(
                            action=ACTION,
                            resource_type="release",
                            resource_id=f"stream-{index}-{batch}-{row}",
                        )
                        for row in range(ROWS_PER_BATCH)
                    ]
                )

        response = await self.stubs[index % 2].LogActions(batches(), metadata=self.metadata)
        assert response.count == BATCHES * ROWS_PER_BATCH

    async def instant(self, index: int) -> None:
        connection = await self._connect()
        try:
            for number in range(INSTANT_TRANSACTIONS):
                async with connection.transaction():
                    written = [
                        await connection.fetchval(INSERT_ROW, ACTION, f"instant-{index}-{row}")
                        for row in range(1 + (index + number) % 3)
                    ]
                self.committed.update(written)
        finally:
            await connection.close()

    async def slow(self, index: int) -> None:
        connection = await self._connect()
        try:
            async with connection.transaction():
                written = []
                for row in range(SLOW_ROWS):
                    if row:
                        await self.watch.others_committed(OTHERS_BETWEEN_ROWS)
                    written.append(
                        await connection.fetchval(INSERT_ROW, ACTION, f"slow-{index}-{row}")
                    )
            self.committed.update(written)
        finally:
            await connection.close()

    async def held(self, index: int) -> None:
        """A row written once STAGGER * index rows are committed, committed only after
        OVERTAKEN_BY more: sealing must wait for it, then take it."""
        connection = await self._connect()
        try:
            if index:
                await self.held_written[index - 1].wait()
                await self.watch.until(
                    lambda: (
                        self.watch.committed >= STAGGER * index
                        or self.watch.quick_writers_done.is_set()
                    ),
                    f"{STAGGER * index} rows before held writer {index}",
                )
            async with connection.transaction():
                sequence = await connection.fetchval(INSERT_ROW, ACTION, f"held-{index}")
                self.held_written[index].set()
                await self.watch.others_committed(OVERTAKEN_BY)
            self.committed.add(sequence)
        finally:
            await connection.close()

    async def rolled_back_writer(self, index: int) -> None:
        connection = await self._connect()
        transaction = connection.transaction()
        try:
            await transaction.start()
            written = [await connection.fetchval(INSERT_ROW, ACTION, f"gone-{index}-0")]
            await self.watch.others_committed(OVERTAKEN_BY // (index + 1))
            written.append(await connection.fetchval(INSERT_ROW, ACTION, f"gone-{index}-1"))
            await self.watch.others_committed(OTHERS_BETWEEN_ROWS)
            await transaction.rollback()
            self.rolled_back.update(written)
        finally:
            await connection.close()

    async def run_all(self) -> None:
        """Every writer at once, but the first held row is written before any other."""

        async def quick() -> None:
            try:
                await asyncio.gather(
                    *(self.caller(i) for i in range(CALLERS)),
                    *(self.instant(i) for i in range(INSTANT)),
                )
            finally:
                self.watch.quick_writers_done.set()

        first_held = asyncio.create_task(self.held(0))
        try:
            await self.held_written[0].wait()
        except BaseException:
            first_held.cancel()
            raise
        await asyncio.gather(
            first_held,
            quick(),
            *(self.held(i) for i in range(1, HELD)),
            *(self.stream(i) for i in range(STREAMS)),
            *(self.slow(i) for i in range(SLOW)),
            *(self.rolled_back_writer(i) for i in range(ROLLED_BACK)),
        )


async def _admin_token(url, db: asyncpg.Connection) -> str:
    user_id = await db.fetchval(
        "INSERT INTO users (email, username, hashed_password, role, is_admin)"
        " VALUES ('auditor@relman.example', 'auditor', 'not a hash', 'admin', true)"
        " RETURNING id"
    )
    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            token, _ = await issue_token(session, await session.get(User, user_id), "t", None)
    finally:
        await database.dispose()
    return token


async def _all_sealed(db: asyncpg.Connection) -> int:
    """Waits until every row committed so far is sealed; returns the last sequence."""
    last = await db.fetchval("SELECT max(sequence) FROM audit_logs")

    async def sealed() -> bool:
        return await db.fetchval(
            "SELECT coalesce(max(last_sequence), 0) >= $1 FROM audit_seals", last
        )

    await poll(sealed, WITHIN_S, "every committed row sealed")
    return last


def _sealer_counts(samples: dict) -> tuple[float, float, float]:
    return tuple(
        samples.get((name, frozenset()), 0.0)
        for name in (
            "relman_audit_seals_total",
            "relman_audit_rows_sealed_total",
            "relman_audit_rows_left_out_total",
        )
    )


async def test_two_sealers_and_32_writers_seal_every_committed_row_exactly_once(
    server_url, tmp_path
):
    """The sealed trail's promise under load: no committed row passed over or sealed
    twice, whatever commits late or rolls back, with two replicas sealing."""
    assert WRITERS == 32
    async with scratch_database(server_url) as url:
        db = await asyncpg.connect(libpq_dsn(url))
        processes: list[RelmanProcess] = []
        try:
            metadata = bearer(await _admin_token(url, db))
            settings = {
                "AUDIT_SEAL_INTERVAL_S": "0.05",
                "AUDIT_SIGNING_KEY_FILE": str(tmp_path / "keys" / "signing.pem"),
                "AUDIT_METRICS_PORT": "0",
                "DB_POOL_SIZE": "8",
            }
            # Both at once, as replicas start: the first to write the key file wins.
            started = await asyncio.gather(
                *(start_service(url, "audit_svc", **settings) for _ in range(2)),
                return_exceptions=True,
            )
            processes = [p for p in started if isinstance(p, RelmanProcess)]
            for outcome in started:
                if isinstance(outcome, BaseException):
                    raise outcome
            channels = [
                grpc.aio.insecure_channel(client_address(p.addresses["audit_svc"]))
                for p in processes
            ]
            try:
                stubs = [audit_pb2_grpc.AuditServiceStub(channel) for channel in channels]
                writers = Writers(url, stubs, metadata, Watch(db))
                await writers.run_all()
                last = await _all_sealed(db)
                await _check_trail(db, stubs, metadata, writers, last)
                await _check_sealers(db, processes)
            finally:
                for channel in channels:
                    await channel.close()
        finally:
            for process in processes:
                assert await process.stop() == 0, process.output
            await db.close()


async def _check_trail(db, stubs, metadata, writers: Writers, last: int) -> None:
    rows = await db.fetch(
        "SELECT sequence, action, resource_id FROM audit_logs WHERE sequence <= $1", last
    )
    committed = {sequence: resource_id for sequence, _, resource_id in rows}
    assert writers.committed <= committed.keys()
    assert not writers.rolled_back & committed.keys()
    written = sum(action == ACTION for _, action, _ in rows)
    assert written == CALLERS * CALLS_EACH + STREAMS * BATCHES * ROWS_PER_BATCH + len(
        writers.committed
    )

    seals = [seal_store.seal_of(record) for record in await db.fetch(ALL_SEALS)]
    keys = [
        await stub.ListAuditSigningKeys(audit_pb2.ListAuditSigningKeysRequest(), metadata=metadata)
        for stub in stubs
    ]
    public_keys = read_public_keys("".join(key.public_key_pem for key in keys[0].keys))
    # Both replicas sign with the one key of the shared key file.
    assert [[key.key_id for key in listed.keys] for listed in keys] == [list(public_keys)] * 2

    leaves = dict(await db.fetch(seal_store.LEAVES, 1, last))
    sealed_in: dict[int, list[int]] = {}
    previous: Seal | None = None
    for seal in seals:
        number = seal.seal_number
        if previous is None:
            assert (number, seal.first_sequence, seal.previous_seal_hash) == (1, 1, b"")
        else:
            assert number == previous.seal_number + 1
            assert seal.first_sequence == previous.last_sequence + 1, number
            assert seal.previous_seal_hash == previous.computed_hash(), number
        assert seal.seal_hash == seal.computed_hash(), number
        public_keys[seal.key_id].verify(seal.signature, seal.seal_hash)  # raises if forged
        digests = parse_digests(seal.row_digests)
        assert len(digests) == seal.row_count, number
        for sequence, leaf_head in digests:
            assert seal.first_sequence <= sequence <= seal.last_sequence, (number, sequence)
            assert leaves[sequence][:8] == leaf_head, (number, sequence)
            sealed_in.setdefault(sequence, []).append(number)
        previous = seal

    assert previous is not None and previous.last_sequence >= last
    twice = {sequence: numbers for sequence, numbers in sealed_in.items() if len(numbers) > 1}
    assert not twice, f"rows in more than one seal: {twice}"
    passed_over = {sequence: by for sequence, by in committed.items() if sequence not in sealed_in}
    assert not passed_over, f"committed rows in no seal (sequence: writer): {passed_over}"
    assert not writers.rolled_back & set(sealed_in)

    for stub in stubs:
        outcome = await stub.VerifyAuditLog(audit_pb2.VerifyAuditLogRequest(), metadata=metadata)
        assert outcome.ok, outcome.problems
        assert outcome.rows_checked >= len(committed) and outcome.seals_checked >= len(seals)


async def _check_sealers(db, processes: list[RelmanProcess]) -> None:
    """Neither replica left a row out or failed a run, and between them they counted each
    seal and sealed row once (seal_number's key would refuse a second seal of a number)."""
    await _all_sealed(db)  # VerifyAuditLog's own rows too: then nothing more comes

    async def counted_once() -> bool:
        seals, rows = await db.fetchrow(
            "SELECT count(*), coalesce(sum(row_count), 0) FROM audit_seals"
        )
        counts = [_sealer_counts(await scrape_metrics(p)) for p in processes]
        assert all(left_out == 0 for _, _, left_out in counts), counts
        return sum(c[0] for c in counts) == seals and sum(c[1] for c in counts) == rows

    await poll(counted_once, WITHIN_S, "each seal counted by one replica")
    for process in processes:
        trouble = [line for line in process.lines if any(t in line for t in SEALER_TROUBLE)]
        assert not trouble, trouble


# -- a late commit the sealer's horizon must see ---------------------------------------

# The interleaving is tried until it has run QUIET_ATTEMPTS times with the whole server
# quiet: no transaction newer than the held one ended before the sealer's run, and every
# older one ended within OLDER_END_WITHIN_S after (transactions of any database on the
# server count; an attempt without that instant proves nothing either way).
ATTEMPTS = 30
QUIET_ATTEMPTS = 3
ATTEMPTS_WITHIN_S = 20
OLDER_END_WITHIN_S = 5
NEWEST_ENDED_BEFORE = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint <= $1"
OLDER_ALL_ENDED = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint >= $1"


async def _older_transactions_end(db: asyncpg.Connection, xid: int) -> bool:
    """Whether every transaction older than `xid` ends within OLDER_END_WITHIN_S."""
    try:
        await poll(
            partial(db.fetchval, OLDER_ALL_ENDED, xid),
            OLDER_END_WITHIN_S,
            "end of every older transaction",
        )
    except AssertionError:
        return False
    return True


async def test_a_row_held_by_the_newest_transaction_is_sealed_after_an_older_commits(
    server_url, tmp_path
):
    """An older transaction commits a row while a newer one holds the next sequence open,
    and the sealer runs, again once every older transaction has ended. It must wait for
    the newer: sealing past it leaves its row in a sealed range and in no seal (ROW_ADDED
    for ever). Two replicas' sealers run at any instant; this one runs at the worst."""
    async with scratch_database(server_url) as url:
        db = await asyncpg.connect(libpq_dsn(url))
        older, newer = [await asyncpg.connect(libpq_dsn(runtime_url(url))) for _ in range(2)]
        database = Database(runtime_url(url), pool_size=1)
        try:
            key_file = KeyFile(tmp_path / "signing.pem")
            key_file.ensure("test")
            sealer = Sealer(database, key_file, "test")
            held: list[int] = []
            quiet = 0
            deadline = asyncio.get_running_loop().time() + ATTEMPTS_WITHIN_S
            for attempt in range(ATTEMPTS):
                first, second = older.transaction(), newer.transaction()
                await first.start()
                await second.start()
                _, older_xid = await older.fetchrow(INSERT_ROW_WITH_XID, ACTION, f"older-{attempt}")
                sequence, newer_xid = await newer.fetchrow(
                    INSERT_ROW_WITH_XID, ACTION, f"newer-{attempt}"
                )
                assert older_xid < newer_xid
                await first.commit()
                held_is_newest = await db.fetchval(NEWEST_ENDED_BEFORE, newer_xid)
                await sealer.seal_once()
                if await _older_transactions_end(db, newer_xid):
                    await sealer.seal_once()
                    quiet += held_is_newest
                await second.commit()
                held.append(sequence)
                if quiet == QUIET_ATTEMPTS or asyncio.get_running_loop().time() > deadline:
                    break
            if not quiet:
                pytest.skip(f"the server was never quiet in {attempt + 1} attempts")

            last = await db.fetchval("SELECT max(sequence) FROM audit_logs")

            async def sealed() -> bool:
                await sealer.seal_once()
                return await db.fetchval(
                    "SELECT coalesce(max(last_sequence), 0) >= $1 FROM audit_seals", last
                )

            await poll(sealed, WITHIN_S, "every row sealed")
            sealed_sequences = {
                sequence
                for (digests,) in await db.fetch("SELECT row_digests FROM audit_seals")
                for sequence, _ in parse_digests(digests)
            }
            passed_over = sorted(set(held) - sealed_sequences)
            assert not passed_over, f"held rows in no seal ({quiet} quiet attempts)"
        finally:
            await database.dispose()
            for connection in (older, newer, db):
                await connection.close()
