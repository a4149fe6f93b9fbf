"""The sealer (domain layer): a background task of every audit_svc process that seals
committed audit rows in sequence order, every AUDIT_SEAL_INTERVAL_S (at most a second),
at most sealing.ROWS_PER_SEAL rows per seal.

A row that commits late is never passed over. Sequence values are taken while a row is
written, and rows commit in any order, so the sealer seals only up to a sequence every
transaction that took one has finished with: each run it notes the last value handed
out and then takes a new transaction id (a transaction that took a value holds an id
below it: migration 009's assign_xid), and seals up to that value once no transaction
of this database below that id is running (transaction ids are the server's; one left
open in another database holds nothing here). With no transaction running that is the same run;
a transaction held open holds sealing at its first sequence until it ends.

Several replicas run it; one at a time seals (a transaction-level advisory lock), and
the seal's key (seal_number) would refuse a second seal of the same number anyway.
Rows the sealer leaves out (a second row with a sequence already sealed, a backdated
row: sealing.choose_rows) are logged as WARNINGs and counted; VerifyAuditLog reports
them as ROW_ADDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from audit_svc import seal_store
from audit_svc.sealing import (
    ROWS_PER_SEAL,
    Seal,
    check_seal,
    choose_rows,
    first_month,
    make_seal,
)
from audit_svc.signing_keys import KeyFile, Keyring
from shared.framework.observability import counter, gauge
from shared.persistence.db import Database

log = logging.getLogger("relman.audit_svc.sealer")

SEALS = counter("relman_audit_seals_total", "Audit seals made by this process.")
ROWS_SEALED = counter("relman_audit_rows_sealed_total", "Audit rows sealed by this process.")
ROWS_LEFT_OUT = counter(
    "relman_audit_rows_left_out_total",
    "Audit rows the sealer left out of seals (backdated, or a sequence already sealed).",
)
SEALS_DOUBTED = counter(
    "relman_audit_seals_doubted_total",
    "Last seals this process was to follow that did not verify with its keys (an ERROR each).",
)
SEAL_LAG = gauge(
    "relman_audit_seal_lag_seconds",
    "How long the oldest committed audit row not sealed yet has waited (0: all sealed),"
    " as of this process's last run.",
)
# Past this, each run that finds a row still unsealed may log a WARNING (once a minute).
LAG_WARNING_S = 60.0
# At most this many seals in one run (a backlog is sealed over several runs).
SEALS_PER_RUN = 20
RUN_DEADLINE_S = 30.0
PENDING_MAX = 256


class Sealer:
    def __init__(self, database: Database, key_file: KeyFile, name: str = "audit_svc") -> None:
        self.database = database
        self.key_file = key_file
        self.name = name
        # (last sequence handed out, a transaction id taken just after), oldest first:
        # bounds that become sealable once no transaction of this database below it runs.
        self.pending: list[tuple[int, int]] = []
        self.noted = 0  # the last sequence value noted in `pending`
        self.sealable = 0  # every row up to this sequence has committed or never will
        self.last_made = 0  # the last seal this process made (it need not check it)
        self.last_doubted = 0  # the last seal found not to verify (reported once)
        self.warned_at = -LAG_WARNING_S  # when the last lag WARNING was logged (monotonic)
        self.locked = False  # whether the last run took the sealer's lock

    async def seal_once(self) -> int:
        """One run: notes a new bound, seals up to the newest bound that is ready; returns
        how many seals it made (0 too when another replica holds the sealer's lock)."""
        keyring = self.key_file.keyring()
        async with self.database.autocommit_connection(RUN_DEADLINE_S) as connection:
            last = await seal_store.last_sequence(connection)
            if last < self.noted:  # the database was restored to an earlier state
                self.pending, self.noted, self.sealable = [], 0, 0
            if last > self.noted:  # an idle trail costs no transaction id per run
                self.pending.append((last, await seal_store.new_xid(connection)))
                self.noted = last
                # Another replica may seal every run: dropping the oldest bounds only
                # waits for a later one, which covers them.
                del self.pending[:-PENDING_MAX]
            # READ COMMITTED whatever the database's default: the rows must be read in a
            # snapshot taken after the horizon was checked, not at the lock.
            made = 0
            async with connection.transaction(isolation="read_committed"):
                self.locked = await seal_store.try_sealer_lock(connection)
                if self.locked:
                    oldest = await seal_store.oldest_running_here(connection)
                    ready = [last for last, xid in self.pending if xid <= oldest]
                    self.pending = [bound for bound in self.pending if bound[1] > oldest]
                    # Kept across runs: a backlog past one run's seals is sealed by the
                    # next runs even when nothing new is written meanwhile.
                    self.sealable = max([self.sealable, *ready])
                    if self.sealable:
                        made = await self._seal_up_to(connection, self.sealable, keyring)
            await self._report_lag(connection)
            return made

    async def _report_lag(self, connection) -> None:
        """The lag gauge, every run; a WARNING (once a minute) naming what holds sealing
        back when a row has waited past LAG_WARNING_S: a transaction left open, or a
        session holding the sealer's lock."""
        lag = await seal_store.unsealed_age(connection)
        SEAL_LAG.set(lag)
        now = time.monotonic()
        if lag > LAG_WARNING_S and now - self.warned_at > LAG_WARNING_S:
            self.warned_at = now
            log.warning(
                "%s: an audit row has waited %.0f s to be sealed; the oldest transaction"
                " of the database: %s%s",
                self.name,
                lag,
                await seal_store.oldest_writer(connection),
                "" if self.locked else "; another session held the sealer's lock",
            )

    async def _seal_up_to(self, connection, bound: int, keyring: Keyring) -> int:
        """Seals up to `bound`. Backdating is measured against the rows of earlier runs
        only: rows that were all there before one run (a trail that predates sealing,
        written out of time order) are sealed, whatever their order."""
        previous, newest = await seal_store.last_seal(connection)
        if previous is not None:
            self._check_last(previous, keyring)
        made = 0
        while made < SEALS_PER_RUN:
            after = previous.last_sequence if previous else 0
            if after >= bound:
                break
            rows = await seal_store.sealable_rows(connection, after, bound, ROWS_PER_SEAL)
            if not rows:
                break  # only gaps so far: the next seal's range takes them
            kept, left_out = choose_rows(rows, newest)
            kept, left_out, cut = first_month(kept, left_out)
            if cut is not None:
                last = cut - 1
            else:
                last = rows[-1].sequence if len(rows) == ROWS_PER_SEAL else bound
            sealed_at = await connection.fetchval("SELECT clock_timestamp()")
            seal = make_seal(
                seal_number=previous.seal_number + 1 if previous else 1,
                first_sequence=after + 1,
                last_sequence=last,
                rows=kept,
                previous_seal_hash=previous.seal_hash if previous else b"",
                key_id=keyring.current_key_id,
                private_key=keyring.private_key,
                sealed_at=sealed_at,
            )
            await seal_store.insert_seal(connection, seal)
            self.last_made = seal.seal_number
            for row, why in left_out:
                log.warning(
                    "%s left audit row %d out of seal %d: %s",
                    self.name,
                    row.sequence,
                    seal.seal_number,
                    why,
                )
            ROWS_LEFT_OUT.inc(len(left_out))
            ROWS_SEALED.inc(len(kept))
            SEALS.inc()

            previous = seal
            made += 1
        return made

    def _check_last(self, previous: Seal, keyring: Keyring) -> None:
        """An ERROR, once, when the seal the next one will follow does not verify with the
        service's keys (another replica's key missing here, or a seal forged in the
        database): sealing goes on after it, and VerifyAuditLog reports it."""
        if previous.seal_number in (self.last_made, self.last_doubted):
            return
        problems = check_seal(previous, None, keyring.public_keys())
        if problems:
            self.last_doubted = previous.seal_number
            SEALS_DOUBTED.inc()
            log.error(
                "%s: the last audit seal does not verify with this service's keys: %s",
                self.name,
                problems[0],
            )

    async def run(self, interval_s: float) -> None:
        """Seals every `interval_s` for as long as the process serves; a failed run (the
        database away, a replica that sealed the same number first) is logged and the
        next one tries again."""
        while True:
            try:
                await self.seal_once()
            except Exception as exc:
                log.warning("%s: sealing the audit trail failed: %s", self.name, exc)
            await asyncio.sleep(interval_s)


def start(sealer: Sealer, interval_s: float):
    """Starts the sealer; returns the coroutine function that stops it."""
    task = asyncio.create_task(sealer.run(interval_s))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop
