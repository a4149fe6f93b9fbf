"""Where the database is, and the async engine every process uses.

`database_url()` is the one place that decides which server relman talks to:
DATABASE_URL when set, the embedded PostgreSQL otherwise. Alembic, the seed,
both services and the tests all ask it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

ASYNC_DRIVER = "postgresql+asyncpg"


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


def database_url() -> URL:
    """The database relman uses: DATABASE_URL, or the embedded server's `relman` database."""
    raw = os.environ.get("DATABASE_URL", "").strip()
    if not raw:
        from shared import embedded_pg

        raw = embedded_pg.start()
    return normalize_url(raw)


def describe(url: URL) -> str:
    """A short, password-free description for log lines: `database relman on /path (socket)`."""
    host = url.query.get("host") or url.host or "localhost"
    where = f"{host} (socket)" if str(host).startswith("/") else f"{host}:{url.port or 5432}"
    return f"database {url.database} on {where}"


def libpq_dsn(url: URL) -> str:
    """The same URL as a plain `postgresql://` DSN, for asyncpg.connect and psql."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: URL, *, pool_size: int = 10) -> AsyncEngine:
    """An engine with a fixed-size pool (no overflow), so pool x processes stays predictable."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions keep loaded objects usable after commit (no lazy reload outside the loop)."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any exception."""
    async with sessions() as session, session.begin():
        yield session
