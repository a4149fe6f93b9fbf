"""Where the database is, the async engine every process uses, and its units of work.

`database_url()` is the one place that decides which server and role the
services use: DATABASE_URL when set, the embedded PostgreSQL's runtime role
otherwise. `migration_database_url()` decides the same for migrations and the
seed, which run as the owner of the schema (shared.persistence.roles).

The transaction rule: a use case owns its unit of work. The domain function an
RPC calls takes the `Database` and opens its units of work itself:
`transaction()` for anything that writes or locks, `read()` for what only reads.
A servicer (transport) never opens one and never holds a session; functions that
take a session are steps inside a use case (the audit service's group commit and
export stream own their connections the same way). Why the use case: only it knows
what must commit together, what must commit even when the call fails (a failed
login's count), and what must not hold locks across slow work (bcrypt). A use
case that opens more than one unit of work says why in its docstring.

`replica_read()` is `read()` on the streaming replica of DATABASE_READ_URL, for the reads
that opt in because they can bear its lag (ReadReplica); everything else stays on the
primary without having to think about it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from operator import itemgetter
from typing import TypeVar

import asyncpg
from sqlalchemy import URL, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util.concurrency import greenlet_spawn

from shared.framework.errors import (
    Aborted,
    DeadlineExceeded,
    DomainError,
    InvalidArgument,
    NotFound,
)
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE, SESSION_BOUNDS

ASYNC_DRIVER = "postgresql+asyncpg"
T = TypeVar("T")
log = logging.getLogger("relman.db")


class DatabaseUrlError(ValueError):
    """DATABASE_URL is not a PostgreSQL URL relman can use."""


def normalize_url(raw: str, setting: str = "DATABASE_URL") -> URL:
    """Parse a `postgresql://` or `postgresql+asyncpg://` URL into an asyncpg URL; a
    refusal names `setting`, the variable it came from."""
    try:
        url = make_url(raw)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with the raw text
        raise DatabaseUrlError(f"{setting} is not a valid URL: {exc}") from None
    if url.drivername not in ("postgresql", "postgres", ASYNC_DRIVER):
        raise DatabaseUrlError(
            f"{setting} must start with postgresql:// or {ASYNC_DRIVER}://, not {url.drivername}://"
        )
    if not url.database:
        raise DatabaseUrlError(f"{setting} names no database")
    return url.set(drivername=ASYNC_DRIVER)


def listen_url() -> URL | None:
    """DATABASE_LISTEN_URL: where LISTEN connects when DATABASE_URL goes through PgBouncer."""
    raw = os.environ.get("DATABASE_LISTEN_URL", "").strip()
    return normalize_url(raw, "DATABASE_LISTEN_URL") if raw else None


def read_url() -> URL | None:
    """DATABASE_READ_URL: a streaming replica of DATABASE_URL's database, for the reads that
    opt in (Database.replica_read); None: every read goes to the primary."""
    raw = os.environ.get("DATABASE_READ_URL", "").strip()
    return normalize_url(raw, "DATABASE_READ_URL") if raw else None


def database_url() -> URL:
    """The database the services use: DATABASE_URL, or the embedded server's `relman`
    database as the runtime role (shared.persistence.roles)."""
    raw = os.environ.get("DATABASE_URL", "").strip()
    if not raw:
        return _embedded_url(RUNTIME_ROLE)
    return normalize_url(raw)


def migration_database_url() -> URL:
    """The database as its owner, for migrations and the seed: MIGRATION_DATABASE_URL,
    else DATABASE_URL (one role does everything), else the embedded owner role."""
    migration = os.environ.get("MIGRATION_DATABASE_URL", "").strip()
    runtime = os.environ.get("DATABASE_URL", "").strip()
    if migration and not runtime:  # else the embedded services, another database's schema
        raise DatabaseUrlError("MIGRATION_DATABASE_URL is set but DATABASE_URL is not")
    if not (migration or runtime):
        return _embedded_url(OWNER_ROLE)
    if migration:
        return normalize_url(migration, "MIGRATION_DATABASE_URL")
    return normalize_url(runtime)


def _embedded_url(role: str) -> URL:
    return _embedded_server_url().set(username=role)


@functools.cache
def _embedded_server_url() -> URL:
    """Started (or joined) once per process: `make run` asks for two roles' URLs."""
    from shared.devtools import embedded_pg

    return normalize_url(embedded_pg.start())


def describe(url: URL) -> str:
    """A short, password-free description for log lines: `database relman on /path (socket)`."""
    host = url.query.get("host") or url.host or "localhost"
    where = f"{host} (socket)" if str(host).startswith("/") else f"{host}:{url.port or 5432}"
    return f"database {url.database} on {where}"


def libpq_dsn(url: URL) -> str:
    """The same URL as a plain `postgresql://` DSN, for asyncpg.connect and psql."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


CONNECT_TIMEOUT_S = 5.0

# The time.monotonic() deadline of the RPC being served (shared.framework.interceptors sets
# it), so that every unit of work of a call is bounded by the caller's deadline without
# passing it on.
call_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)


def time_left(bound_s: float | None = None) -> float | None:
    """Seconds a unit of work may take: its own bound, capped by the call's deadline."""
    deadline = call_deadline.get()
    limits = [
        t
        for t in (bound_s, None if deadline is None else deadline - time.monotonic())
        if t is not None
    ]
    if not limits:
        return None
    left = min(limits)
    if left <= 0:
        raise DeadlineExceeded("the call's deadline passed before its work could start")
    return left


def connect_arguments(
    url: URL,
    *,
    statement_cache: bool = True,
    application_name: str = "relman",
    timeout_s: float = CONNECT_TIMEOUT_S,
    read_only: bool = False,
) -> dict:
    """The keyword arguments of asyncpg.connect for every connection a Database makes, its
    pool's and its readiness probe's alike: a probe connected differently from the pool
    could answer while every call fails (it did: PgBouncer refused the pool's startup
    parameters and accepted the probe's).

    Connected to PostgreSQL itself (`statement_cache`), each session gets its bounds
    (roles.SESSION_BOUNDS) as startup parameters, and asyncpg caches prepared
    statements. Behind PgBouncer in transaction mode (DB_STATEMENT_CACHE=0), which
    refuses any startup parameter but a few (application_name among them), the bounds
    come from the runtime role's defaults (`ALTER ROLE ... SET`, README), which
    PostgreSQL applies to every server session at no cost per transaction; `SET LOCAL`
    in each transaction would cost a statement each time, and reads have no
    transaction. A starting service warns when its sessions lack them
    (roles.unbounded_settings). And no statement cache: see create_engine.

    `read_only` (the read replica's connections) makes every transaction of the session
    read-only: a hot standby refuses writes anyway, but a DATABASE_READ_URL that names a
    writable server by mistake must not take a write either.
    """
    settings = {"application_name": application_name}  # who is who in pg_stat_activity
    if statement_cache:
        settings = {**SESSION_BOUNDS, **settings}
        if read_only:
            settings["default_transaction_read_only"] = "on"
    arguments = {
        "timeout": timeout_s,
        "statement_cache_size": 100 if statement_cache else 0,
        "server_settings": settings,
    }
    # `?ssl=require`, as SQLAlchemy's asyncpg URLs spell it, is asyncpg's `ssl` argument;
    # left in the DSN it would reach the server as a startup parameter and be refused.
    if "ssl" in url.query:
        arguments["ssl"] = url.query["ssl"]
        url = url.difference_update_query(["ssl"])
    return {"dsn": libpq_dsn(url), **arguments}


def _unnamed() -> str:
    """The name of every statement SQLAlchemy prepares behind PgBouncer: none."""
    return ""


def create_engine(
    url: URL,
    *,
    pool_size: int = 10,
    application_name: str = "relman",
    statement_cache: bool = True,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    read_only: bool = False,
) -> AsyncEngine:
    """An engine with a fixed-size pool (no overflow), so pool x processes stays predictable.

    No ping before each checkout (a round trip on every call): a connection the
    server dropped fails its first statement, which makes SQLAlchemy throw away
    every pooled connection opened before then, and the readiness probe's ping
    every 2 s usually meets it first. Statements run at most 60 s (statement_timeout,
    roles.SESSION_BOUNDS) unless a unit of work sets its own bound. Connections are made by
    `connect_arguments`, the same as the readiness probe's.

    Behind PgBouncer in transaction mode (no `statement_cache`) every statement is
    unnamed: asyncpg parses it again in the same message as its Bind and Execute, so
    it never depends on which server connection PgBouncer hands the next message to,
    and nothing is left prepared on a server connection another client gets next.
    Named statements (SQLAlchemy's uuid names, before) failed there: asyncpg closes the
    last statement, with a Sync, between preparing the next and executing it, and
    PgBouncer hands the execution to another server connection ("prepared statement ...
    does not exist": 2 in 3 autocommit reads at 32 in flight through PgBouncer 1.18,
    the load tests/test_pgbouncer.py runs); and each transaction left one statement
    prepared on its server connection for good. So reads keep their autocommit (no
    BEGIN/COMMIT) there too.
    """
    arguments = connect_arguments(
        url,
        statement_cache=statement_cache,
        application_name=application_name,
        timeout_s=connect_timeout_s,
        read_only=read_only,
    )
    # SQLAlchemy's own cache of prepared statements, on top of asyncpg's.
    adapter = (
        {"prepared_statement_cache_size": 100}
        if statement_cache
        else {"prepared_statement_cache_size": 0, "prepared_statement_name_func": _unnamed}
    )

    def connect():  # called by the pool, inside SQLAlchemy's greenlet
        return engine.sync_engine.dialect.loaded_dbapi.connect(
            async_creator_fn=functools.partial(asyncpg.connect, **arguments), **adapter
        )

    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, creator=connect)
    return engine


# -- the read replica (DATABASE_READ_URL) ---------------------------------------------------

# Short, unlike the primary's: while a connection to a dead replica is being tried, the read
# waits, and the primary could have answered it.
REPLICA_CONNECT_TIMEOUT_S = 2.0
# How long reads stay on the primary after the replica could not be reached. Every failed
# check extends it, so a replica that comes back is used again only once it has answered for
# this long: reads do not flap between the two on a replica that answers one check in two.
REPLICA_HOLD_S = 10.0
REPLICA_CHECK_INTERVAL_S = 2.0
# The primary's WAL positions a check keeps until the replica has replayed them. When there
# are more, every other one goes but the oldest: the lag of a replica behind for long is then
# known to within the gaps left.
REPLICA_SAMPLES_MAX = 1024
# On the primary (any role may call it): how far its WAL is flushed, which is as far as a
# standby can receive, in bytes (pg_lsn as a number).
_PRIMARY_POSITION_QUERY = "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::int8"
# On the replica (any role): whether it is a standby, how far it has replayed, whether it has
# replayed all it received (NULL: it has received nothing since it started), and how old its
# last replayed commit is (0: none replayed since it started; never below 0, clocks apart).
_REPLICA_QUERY = """
SELECT pg_is_in_recovery() AS standby,
    pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8 AS replayed,
    pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() AS replayed_all_received,
    greatest(coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0), 0)::float8
        AS replay_age_s
"""


class ReadReplica:
    """The streaming replica of DATABASE_READ_URL, its pool, and whether reads go to it now.

    Reads go to the replica only once a check has measured its lag within `max_lag_s`
    (None: no bound). They go to the primary instead while the replica is held down, for
    REPLICA_HOLD_S after it could not be reached (a connection refused, not made within
    REPLICA_CONNECT_TIMEOUT_S, or lost), and while it lags more than `max_lag_s` at two
    checks in a row (one estimate can overstate: see `check`). The checks (`watch`, every
    REPLICA_CHECK_INTERVAL_S) measure the lag and find a dead replica even when no read
    tried it, so reads leave it within a connect timeout and a check interval. One log
    line per change of state, never one per call: a WARNING when reads leave the
    replica, INFO when they return.
    """

    def __init__(
        self,
        url: URL,
        *,
        primary: AsyncEngine,
        pool_size: int,
        application_name: str,
        statement_cache: bool,
        max_lag_s: float | None,
    ) -> None:
        self.url = url
        self.max_lag_s = max_lag_s
        # The same application_name as the primary's pool: pg_stat_activity on the replica
        # says which service reads there.
        self.engine = create_engine(
            url,
            pool_size=pool_size,
            application_name=application_name,
            statement_cache=statement_cache,
            connect_timeout_s=REPLICA_CONNECT_TIMEOUT_S,
            read_only=True,
        )
        event.listen(self.engine.sync_engine, "checkout", _refuse_closed)
        self.sessions = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        self._check_arguments = connect_arguments(
            url,
            statement_cache=statement_cache,
            application_name=f"{application_name} replica check",
            timeout_s=REPLICA_CONNECT_TIMEOUT_S,
            read_only=True,
        )
        self._check: asyncpg.Connection | None = None
        self._checks: asyncio.Task | None = None
        # The primary's pool, for its WAL position at each check (no connection of its own).
        self._primary = primary.execution_options(isolation_level="AUTOCOMMIT")
        # (time.monotonic(), the primary's flushed WAL position) at checks, the positions
        # rising, none the replica has replayed yet.
        self._samples: list[tuple[float, int]] = []
        self._sampled = False  # whether a check has read the primary's position yet
        # The lag last measured; None while unknown (never measured yet, or unreachable).
        self.lag_s: float | None = None
        self._held_until = 0.0  # time.monotonic()
        self._passed = False  # whether a check has measured the lag within max_lag_s
        # The states last logged.
        self._reachable = True
        self._primary_answers = True
        self._lagging = False
        self._over_bound = 0  # checks in a row that measured more than max_lag_s
        self._standby = True

    def serving(self) -> bool:
        """Whether reads that opt in go to the replica now."""
        return self._passed and not self._lagging and time.monotonic() >= self._held_until

    async def unreachable(self, exc: BaseException) -> None:
        """Holds reads on the primary for REPLICA_HOLD_S (from now: each failure extends it).
        Going down, the pool's connections are dropped: they are dead, and a replica that
        returns should meet new ones rather than fail a read with each of them."""
        self._held_until = time.monotonic() + REPLICA_HOLD_S
        self.lag_s = None
        if not self._reachable:
            return
        self._reachable = False
        log.warning(
            "read replica (%s) unreachable: %s; reads go to the primary, the replica is"
            " tried again %.0f s after it last failed",
            describe(self.url),
            _reason(exc),
            REPLICA_HOLD_S,
        )
        await self.engine.dispose()

    def answered(self) -> None:
        """The replica answered (a read connected, or a check passed) after its hold."""
        if not self._reachable:
            self._reachable = True
            log.info("read replica (%s) reachable again: reads go to it", describe(self.url))

    def measured(self, lag_s: float, standby: bool) -> None:
        """Records a check's lag; reads go to the replica once a check has measured it within
        `max_lag_s`, leave it past that and return once it has caught up."""
        self.lag_s = lag_s
        over = self.max_lag_s is not None and lag_s > self.max_lag_s
        self._passed = self._passed or not over
        self._over_bound = self._over_bound + 1 if over else 0
        lagging = self._over_bound >= 2 or (self._lagging and over)
        if lagging != self._lagging:
            self._lagging = lagging
            if lagging:
                log.warning(
                    "read replica (%s) lags %.1f s behind the primary, more than"
                    " DATABASE_READ_MAX_LAG_S=%g: reads go to the primary until it catches up",
                    describe(self.url),
                    lag_s,
                    self.max_lag_s,
                )
            else:
                log.info(
                    "read replica (%s) caught up (lag %.1f s): reads go to it again",
                    describe(self.url),
                    lag_s,
                )
        if standby != self._standby:
            self._standby = standby
            if not standby:  # promoted, or the primary named twice: reads go on, but say so
                log.warning(
                    "DATABASE_READ_URL (%s) is not a standby (not in recovery): if it is not"
                    " the primary itself, reads may see data the primary does not have",
                    describe(self.url),
                )

    async def check(self) -> tuple[float, bool]:
        """The replica's lag and whether it is a standby; raises when the replica does not
        answer.

        Each check samples the primary's flushed WAL position, the replica's replay position
        drops the samples it has reached, and the lag is the age of the oldest left, 0 when
        none (a caught-up replica of an idle primary is not behind). It rises on a replica
        that stopped receiving as on one slow to replay, and understates by at most a check
        interval. Two estimates can overstate: the first sample, dated back to the replica's
        last replayed commit (nothing older to go by), and, while the primary cannot be
        asked, the replica's own measure (0 when it has replayed all it received, else the
        age of its last replayed commit), which cannot see a replica that receives nothing.
        """
        position = await self._primary_position()
        if position is not None and (not self._samples or position > self._samples[-1][1]):
            if len(self._samples) >= REPLICA_SAMPLES_MAX:
                del self._samples[1::2]
            self._samples.append((time.monotonic(), position))
        # On a connection of its own (as Database.ping: a busy pool says nothing about
        # whether the replica answers).
        async with asyncio.timeout(2 * REPLICA_CONNECT_TIMEOUT_S):
            try:
                if self._check is None or self._check.is_closed():
                    self._check = await asyncpg.connect(**self._check_arguments)
                row = await self._check.fetchrow(_REPLICA_QUERY)
            except BaseException:
                if self._check is not None:
                    self._check.terminate()
                    self._check = None
                raise
        if not row["standby"]:
            self._samples.clear()
            return 0.0, False
        replayed = row["replayed"] or 0
        del self._samples[: bisect.bisect_right(self._samples, replayed, key=itemgetter(1))]
        now = time.monotonic()
        if position is not None and not self._sampled:
            self._sampled = True
            if self._samples:
                sampled_at, oldest = self._samples[0]
                self._samples[0] = (min(sampled_at, now - row["replay_age_s"]), oldest)
        lag_s = now - self._samples[0][0] if self._samples else 0.0
        if position is None and not row["replayed_all_received"]:
            lag_s = max(lag_s, row["replay_age_s"])
        return lag_s, True

    async def _primary_position(self) -> int | None:
        """The primary's flushed WAL position, through its pool; None when it cannot be
        asked (down, or no connection within REPLICA_CONNECT_TIMEOUT_S)."""
        try:
            async with (
                asyncio.timeout(REPLICA_CONNECT_TIMEOUT_S),
                self._primary.connect() as connection,
            ):
                position = await connection.scalar(text(_PRIMARY_POSITION_QUERY))
        except Exception as exc:
            if self._primary_answers:
                self._primary_answers = False
                log.warning(
                    "read replica (%s): the primary's WAL position cannot be read (%s); until"
                    " it can, the lag is measured on the replica alone, which cannot see that"
                    " it stopped receiving",
                    describe(self.url),
                    _reason(exc),
                )
            return None
        if not self._primary_answers:
            self._primary_answers = True
            log.info(
                "read replica (%s): its lag is measured against the primary again",
                describe(self.url),
            )
        return position

    async def refresh(self) -> None:
        """One check, and where reads go after it."""
        try:
            lag_s, standby = await self.check()
        except Exception as exc:
            await self.unreachable(exc)
        else:
            self.measured(lag_s, standby)
            if time.monotonic() >= self._held_until:
                self.answered()

    async def watch(self) -> None:
        """Checks the replica every REPLICA_CHECK_INTERVAL_S until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(REPLICA_CHECK_INTERVAL_S)

    def start_checks(self) -> None:
        if self._checks is None:
            self._checks = asyncio.create_task(self.watch())

    async def close(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
            await asyncio.gather(self._checks, return_exceptions=True)
            self._checks = None
        if self._check is not None:
            self._check.terminate()
            self._check = None
        await self.engine.dispose()


def _refuse_closed(dbapi_connection, record, proxy) -> None:
    """A pooled replica connection whose server already closed it (a replica stopped or
    restarted) is replaced at checkout, not handed to a read that would fail on it. No
    round trip: asyncpg knows of the closed socket. The replacement's connect then fails or
    succeeds as any other (a failure sends the read to the primary)."""
    if dbapi_connection.driver_connection.is_closed():
        raise sa_exc.DisconnectionError("the read replica closed this connection")


def _reason(exc: BaseException) -> str:
    """The first line of an error, for a log line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def lost_connection(exc: BaseException) -> bool:
    """Whether `exc` says the server went away (its connection is gone or refused, it is
    shutting down), as opposed to one statement failing."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = getattr(exc.orig, "__cause__", None) or exc.orig
    if isinstance(
        exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.ConnectionDoesNotExistError)
    ):
        return True
    return getattr(exc, "sqlstate", None) in {"57P01", "57P02", "57P03"}


class Database:
    """One process's connection pool and its units of work; with DATABASE_READ_URL, a
    second pool on the read replica for the reads that opt in (`replica_read`)."""

    def __init__(
        self,
        url: URL,
        *,
        pool_size: int = 10,
        application_name: str = "relman",
        statement_cache: bool = True,
        listen_url: URL | None = None,
        read_url: URL | None = None,
        read_max_lag_s: float | None = None,
    ) -> None:
        self.url = url
        # LISTEN needs a session of its own on PostgreSQL itself, never through PgBouncer.
        self.listen_url = listen_url or url
        self.application_name = application_name
        self.statement_cache = statement_cache
        self.engine = create_engine(
            url,
            pool_size=pool_size,
            application_name=application_name,
            statement_cache=statement_cache,
        )
        self._probe: asyncpg.Connection | None = None
        self.probe_arguments = connect_arguments(
            url, statement_cache=statement_cache, application_name=f"{application_name} probe"
        )
        # Loaded objects stay usable after commit: no lazy reload outside the transaction.
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        # Only reads: no transaction() is ever opened on it.
        self.replica = (
            None
            if read_url is None
            else ReadReplica(
                read_url,
                primary=self.engine,
                pool_size=pool_size,
                application_name=application_name,
                statement_cache=statement_cache,
                max_lag_s=read_max_lag_s,
            )
        )

    async def connect_listener(self) -> asyncpg.Connection:
        """A connection of its own to DATABASE_LISTEN_URL (LISTEN holds its session, so it
        is never pooled), made by connect_arguments like every other; with no URL of its
        own it is made as the pool's are (through PgBouncer too)."""
        direct = self.listen_url is not self.url or self.statement_cache
        return await asyncpg.connect(
            **connect_arguments(
                self.listen_url,
                statement_cache=direct,
                application_name=f"{self.application_name} listen",
            )
        )

    @asynccontextmanager
    async def transaction(self, deadline_s: float | None = None) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on success, roll back on any exception.

        The wait for a pooled connection and every statement are bounded by
        `deadline_s` and by the deadline of the call being served (time_left): when
        it passes, the statement running ends in the database too (asyncpg sends a
        cancel request, and the server drops a statement whose connection closed), so
        a call never outlives its deadline there.
        """
        async with asyncio.timeout(time_left(deadline_s)):
            async with self.sessions() as session, session.begin():
                yield session

    @asynccontextmanager
    async def read(self, deadline_s: float | None = None) -> AsyncIterator[AsyncSession]:
        """A unit of work that only reads: no BEGIN and COMMIT round trips. Each statement
        sees what was committed when it started, as it would inside a READ COMMITTED
        transaction; bounded like `transaction`."""
        async with asyncio.timeout(time_left(deadline_s)), self.read_sessions() as session:
            yield session

    @asynccontextmanager
    async def replica_read(self, deadline_s: float | None = None) -> AsyncIterator[AsyncSession]:
        """`read`, served by the read replica (DATABASE_READ_URL) when it serves reads now.

        Opt-in, for the reads that can bear the replica's lag (a Get or List RPC, the
        trail's list): never a read that decides a write, authenticates a caller (a token
        revoked on the primary must not pass on a lagging replica) or watches for changes,
        which all need the primary's latest commit, and which `read` keeps there without
        their authors having to think of it. The primary serves it when there is no
        replica, while the replica is held down or lags too far (ReadReplica), and when a
        connection to it cannot be made now: the connection is taken before the work
        starts, so that such a read costs at most REPLICA_CONNECT_TIMEOUT_S, not a failure.
        A connection lost in the middle fails the read (it cannot be run again from here)
        and holds the replica down. Bounded like `read`.
        """
        replica = self.replica
        if replica is None or not replica.serving():  # `read`, without a second generator
            async with asyncio.timeout(time_left(deadline_s)), self.read_sessions() as session:
                yield session
            return
        async with asyncio.timeout(time_left(deadline_s)):
            session = replica.sessions()
            try:
                await session.connection()
            except BaseException as exc:
                await session.close()
                # A full pool (SQLAlchemy's pool timeout) is not a replica out of reach, and
                # a cancelled call (its deadline) is not either: those fail as on the primary.
                if not isinstance(exc, Exception) or isinstance(exc, sa_exc.TimeoutError):
                    raise
                await replica.unreachable(exc)
                async with self.read_sessions() as session:
                    yield session
                return
            replica.answered()
            async with session:
                try:
                    yield session
                except Exception as exc:
                    if lost_connection(exc):
                        await replica.unreachable(exc)
                    raise

    async def replica_connection(self) -> AsyncConnection:
        """A pooled connection for a long read that opts in to the replica as `replica_read`
        does (ExportAuditLogs' COPY, which holds it for the stream's life): the replica's
        when it serves reads and answers now, else the primary's. The caller closes it."""
        connection, _ = await self._replica_or_primary(AsyncEngine.connect)
        return connection

    async def _replica_or_primary(self, checkout):
        """`checkout(engine)` on the replica's engine when it serves reads and answers
        now, else on the primary's; and whether it was the replica's."""
        replica = self.replica
        if replica is not None and replica.serving():
            try:
                taken = await checkout(replica.engine)
            except sa_exc.TimeoutError:  # a full pool, not a replica out of reach
                raise
            except Exception as exc:
                await replica.unreachable(exc)
            else:
                replica.answered()
                return taken, True
        return await checkout(self.engine), False

    @asynccontextmanager
    async def replica_read_connection(
        self, deadline_s: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """`replica_read` on the pooled asyncpg connection itself, without a session: for
        the hottest read (GetDeployment's full view), where the session's own work showed
        in the profile. Each statement is its own transaction. A connection left unusable
        is closed, not reused (`autocommit_connection`); a replica lost in the middle of
        the read is held down, as `replica_read` holds it."""
        async with _bounded(deadline_s):
            pooled, on_replica = await self._replica_or_primary(AsyncEngine.raw_connection)
            try:
                yield pooled.driver_connection
            except BaseException as exc:
                # As on the primary: a refusal (NOT_FOUND) keeps the replica's connection.
                await _after_failure(
                    self.replica.engine if on_replica else self.engine, pooled, exc
                )
                if on_replica and isinstance(exc, Exception) and lost_connection(exc):
                    await self.replica.unreachable(exc)  # held down until it answers again
                raise
            finally:
                await greenlet_spawn(pooled.close)

    def start_replica_checks(self) -> None:
        """Starts the read replica's periodic checks (ReadReplica.watch), if there is one;
        `dispose` ends them. A server's, not a command line's: it needs a running loop."""
        if self.replica is not None:
            self.replica.start_checks()

    @asynccontextmanager
    async def autocommit_connection(
        self, deadline_s: float | None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection, bounded by `deadline_s`; each statement is its own
        transaction unless the caller opens one (and ends it). For hot paths where
        SQLAlchemy's per-statement work shows in the profile (the audit group commit,
        UpdatePipelineStage).

        SQLAlchemy never sees what fails here, so `_after_failure` decides what it
        would: handed to the next caller, a connection interrupted mid-statement would
        fail with "another operation is in progress" (seen in tests/faults).
        """
        async with _bounded(deadline_s):
            pooled = await self.engine.raw_connection()
            try:
                yield pooled.driver_connection
            except BaseException as exc:
                await _after_failure(self.engine, pooled, exc)
                raise
            finally:
                await greenlet_spawn(pooled.close)

    async def ping(self, timeout_s: float) -> None:
        """Raises unless the database answers `SELECT 1` within `timeout_s`.

        On a connection of its own, outside the pool: a pool busy with slow calls
        says nothing about whether the database is reachable, and readiness must not
        turn NOT_SERVING (and drain traffic from every replica at once) under load.
        But made exactly as the pool's are (connect_arguments; only its
        application_name says `probe`), so that it fails when theirs would. One simple
        query: one round trip, which any pooler passes on as it is.
        """
        async with asyncio.timeout(timeout_s):
            try:
                if self._probe is None or self._probe.is_closed():
                    self._probe = await asyncpg.connect(**self.probe_arguments)
                await self._probe.execute("SELECT 1")
            except BaseException:
                if self._probe is not None:
                    self._probe.terminate()
                    self._probe = None
                raise

    async def dispose(self) -> None:
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None
        if self.replica is not None:
            await self.replica.close()
        await self.engine.dispose()


def _bounded(deadline_s: float | None):
    """asyncio.timeout(time_left(deadline_s)), or nothing when neither the unit nor the
    call has a deadline."""
    left = time_left(deadline_s)
    return _UNBOUNDED if left is None else asyncio.timeout(left)


_UNBOUNDED = contextlib.nullcontext()


async def _after_failure(engine: AsyncEngine, pooled: PoolProxiedConnection, exc) -> None:
    """What SQLAlchemy decides when a statement of its own fails, for the work done on
    the asyncpg connection itself (checked out with AsyncEngine.raw_connection, without
    a Connection around it: making and closing one cost about 50 us a call, on every
    deploy RPC): a connection interrupted mid-statement, lost, or left
    inside a transaction is closed, not reused (a refusal of the domain's own, raised
    between statements, leaves it as good as a statement's error does); and when the
    server went away (a restart), every pooled connection made before is dropped too,
    dead alike, so that the calls after the return do not meet them one by one."""
    raw = pooled.driver_connection
    reusable = statement_error(exc) or isinstance(exc, DomainError)
    if raw.is_closed() or raw.is_in_transaction() or not reusable:
        await greenlet_spawn(pooled.invalidate, exc)
    if isinstance(exc, Exception) and lost_connection(exc):
        await engine.dispose()


def statement_error(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing one statement, after which the session goes
    on (a constraint, bad data), as opposed to a lost or ending connection."""
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] not in {
        "08",  # connection exception
        "57",  # operator intervention: shutdown, cancel, cannot connect now
        "XX",  # internal error
    }


def missing(model: type, row_id) -> NotFound:
    """NOT_FOUND naming the resource of `model` and the id."""
    resource = re.sub(r"(?<!^)(?=[A-Z])", "_", model.__name__).lower()  # ApiToken -> api_token
    return NotFound(
        f"{resource.replace('_', ' ')} {row_id} does not exist",
        reason=f"{resource.upper()}_NOT_FOUND",
        metadata={f"{resource}_id": str(row_id)},
    )


async def load(session: AsyncSession, model: type[T], row_id, *, for_update: bool = False) -> T:
    """The row of `model` with this id, or NOT_FOUND naming the resource and the id.

    `for_update` locks the row for the rest of the transaction (SELECT ... FOR UPDATE).
    """
    row = await session.get(model, row_id, with_for_update=for_update)
    if row is None:
        raise missing(model, row_id)
    return row


def check_same_request(earlier, same: dict) -> None:
    """Refuses a request_id reused for a request that differs in any field of `same` (the
    audit service's LogAction; the deploy service's request ids are
    shared.persistence.idempotency's)."""
    if any(getattr(earlier, k) != v for k, v in same.items()):
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )


def check_etag(etag: str, version: int, what: str, metadata: dict) -> None:
    """AIP-154: an update that names an etag other than the row's version, read under the
    row's lock, is ABORTED ETAG_MISMATCH with the current etag; an empty etag passes."""
    if etag and etag != str(version):
        raise Aborted(
            f"the {what} changed since it was read; read it again and retry",
            reason="ETAG_MISMATCH",
            metadata={**metadata, "etag": str(version)},
        )


async def driver_connection(session: AsyncSession):
    """The asyncpg connection under `session`, inside the session's transaction.

    For what SQLAlchemy cannot do (COPY), and for the hottest writes, where its work per
    statement showed in the profile (UpdatePipelineStage). Its asyncpg adapter begins
    the database transaction lazily, on the first statement it runs itself: without one,
    a statement sent straight to the driver would run, and commit, on its own. So the
    adapter's transaction is begun here (BEGIN, and nothing else) unless it was already;
    `_start_transaction` is the adapter's own, what it runs before its first statement
    (the dependency range holds SQLAlchemy to the 2.1 series it was read in).
    """
    connection = await session.connection()
    adapter = (await connection.get_raw_connection()).dbapi_connection
    if adapter._transaction is None:
        await adapter._start_transaction()
    return adapter.driver_connection
