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
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TypeVar

import asyncpg
from sqlalchemy import URL, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.framework.errors import DeadlineExceeded, InvalidArgument, NotFound
from shared.persistence.roles import OWNER_ROLE, RUNTIME_ROLE, SESSION_BOUNDS

ASYNC_DRIVER = "postgresql+asyncpg"
T = TypeVar("T")


class DatabaseUrlError(ValueError):
    """DATABASE_URL is not a PostgreSQL URL relman can use."""


def normalize_url(raw: str) -> URL:
    """Parse a `postgresql://` or `postgresql+asyncpg://` URL into an asyncpg URL."""
    try:
        url = make_url(raw)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with the raw text
        raise DatabaseUrlError(f"DATABASE_URL is not a valid URL: {exc}") from None
    if url.drivername not in ("postgresql", "postgres", ASYNC_DRIVER):
        raise DatabaseUrlError(
            f"DATABASE_URL must start with postgresql:// or {ASYNC_DRIVER}://, "
            f"not {url.drivername}://"
        )
    if not url.database:
        raise DatabaseUrlError("DATABASE_URL names no database")
    return url.set(drivername=ASYNC_DRIVER)


def listen_url() -> URL | None:
    """DATABASE_LISTEN_URL: where LISTEN connects when DATABASE_URL goes through PgBouncer."""
    raw = os.environ.get("DATABASE_LISTEN_URL", "").strip()
    return normalize_url(raw) if raw else None


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
    return normalize_url(migration or runtime)


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
    url: URL, *, statement_cache: bool = True, application_name: str = "relman"
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
    """
    settings = {"application_name": application_name}  # who is who in pg_stat_activity
    if statement_cache:
        settings = {**SESSION_BOUNDS, **settings}
    arguments = {
        "timeout": CONNECT_TIMEOUT_S,
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
    url: URL, *, pool_size: int = 10, application_name: str = "relman", statement_cache: bool = True
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
        url, statement_cache=statement_cache, application_name=application_name
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


class Database:
    """One process's connection pool and its units of work."""

    def __init__(
        self,
        url: URL,
        *,
        pool_size: int = 10,
        application_name: str = "relman",
        statement_cache: bool = True,
        listen_url: URL | None = None,
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
    async def autocommit_connection(self, deadline_s: float) -> AsyncIterator[asyncpg.Connection]:
        """A pooled asyncpg connection, bounded by `deadline_s`; each statement is its own
        transaction. For hot paths where SQLAlchemy's per-statement work shows in the
        profile (the audit group commit).

        SQLAlchemy never sees what fails here, so this decides what it would: a
        connection interrupted mid-statement or told by the server that the session
        is over (a restart) is closed, not reused; handed to the next caller it would
        fail with "another operation is in progress" (seen in tests/faults).
        """
        async with asyncio.timeout(time_left(deadline_s)), self.engine.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            try:
                yield raw
            except BaseException as exc:
                if raw.is_closed() or not statement_error(exc):
                    await connection.invalidate()
                raise

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
        await self.engine.dispose()


def statement_error(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing one statement, after which the session goes
    on (a constraint, bad data), as opposed to a lost or ending connection."""
    return isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "")[:2] not in {
        "08",  # connection exception
        "57",  # operator intervention: shutdown, cancel, cannot connect now
        "XX",  # internal error
    }


async def load(session: AsyncSession, model: type[T], row_id, *, for_update: bool = False) -> T:
    """The row of `model` with this id, or NOT_FOUND naming the resource and the id.

    `for_update` locks the row for the rest of the transaction (SELECT ... FOR UPDATE).
    """
    row = await session.get(model, row_id, with_for_update=for_update)
    if row is None:
        resource = re.sub(r"(?<!^)(?=[A-Z])", "_", model.__name__).lower()  # ApiToken -> api_token
        raise NotFound(
            f"{resource.replace('_', ' ')} {row_id} does not exist",
            reason=f"{resource.upper()}_NOT_FOUND",
            metadata={f"{resource}_id": str(row_id)},
        )
    return row


async def replay(session: AsyncSession, model: type[T], request_id, same: dict) -> T | None:
    """The row a retried create made before (AIP-155), or None for a first attempt.

    `same` holds the fields that identify the request, the caller among them where the
    row records one: reusing a request_id for a different request, or another caller's,
    is INVALID_ARGUMENT (a replay returns before the use case's own rights checks).
    """
    if request_id is None:
        return None
    earlier = await session.get(model, request_id)
    if earlier is not None:
        check_same_request(earlier, same)
    return earlier


def check_same_request(earlier, same: dict) -> None:
    """Refuses a request_id reused for a request that differs in any field of `same`."""
    if any(getattr(earlier, k) != v for k, v in same.items()):
        raise InvalidArgument.field(
            "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
        )


async def driver_connection(session: AsyncSession):
    """The asyncpg connection under `session`, inside the session's transaction.

    For what SQLAlchemy cannot do (COPY). Its asyncpg adapter begins the database
    transaction lazily, on the first statement it runs itself: without one, a COPY
    sent straight to the driver would run, and commit, on its own.
    """
    if not session.info.get("driver_transaction_begun"):
        await session.execute(text("SELECT 1"))
        session.info["driver_transaction_begun"] = True
    connection = await session.connection()
    return (await connection.get_raw_connection()).driver_connection
