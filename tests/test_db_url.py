"""Which database relman uses, and how a bad DATABASE_URL is refused."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from shared.framework.config import ConfigError, Settings
from shared.persistence.db import (
    Database,
    DatabaseUrlError,
    connect_arguments,
    database_url,
    describe,
    normalize_url,
)


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u:p@db:5432/relman",
        "postgresql+asyncpg://u:p@db:5432/relman",
        "postgres://u:p@db/relman",
    ],
)
def test_postgresql_urls_become_asyncpg_urls(raw):
    url = normalize_url(raw)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.database, url.password) == ("db", "relman", "p")


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("mysql://u@db/relman", "must start with postgresql://"),
        ("not a url", "not a valid URL"),
        ("postgresql://u@db", "names no database"),
    ],
)
def test_other_urls_are_refused_with_a_reason(raw, complaint):
    with pytest.raises(DatabaseUrlError, match=complaint):
        normalize_url(raw)


def test_ssl_in_the_url_is_a_connection_argument_not_a_startup_parameter():
    """`?ssl=require` (SQLAlchemy's asyncpg spelling) must not reach the server, which
    would refuse the unknown startup parameter; libpq's sslmode stays in the DSN."""
    url = normalize_url("postgresql+asyncpg://app@db.internal/relman?ssl=require")
    for statement_cache in (True, False):
        arguments = connect_arguments(url, statement_cache=statement_cache)
        assert arguments["ssl"] == "require"
        assert "ssl=" not in arguments["dsn"]
    assert "ssl" not in connect_arguments(normalize_url("postgresql://app@db/relman"))


def test_description_names_database_and_place_but_no_password():
    assert describe(normalize_url("postgresql://u:secret@10.1.2.3:6432/rm")) == (
        "database rm on 10.1.2.3:6432"
    )
    socket = describe(normalize_url("postgresql://postgres:@/relman?host=/srv/pg"))
    assert socket == "database relman on /srv/pg (socket)"


def test_database_url_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone@elsewhere:5433/other")
    url = database_url()
    assert (url.host, url.port, url.database) == ("elsewhere", 5433, "other")


async def test_without_statement_cache_no_connection_prepares_named_statements(db_url):
    """DB_STATEMENT_CACHE=0, for PgBouncer in transaction mode: every connection the
    process makes (pool, raw path, readiness probe) has asyncpg's cache off."""
    database = Database(db_url, pool_size=1, statement_cache=False)
    try:
        async with database.autocommit_connection(5) as raw:
            assert raw._stmt_cache.get_max_size() == 0
            assert await raw.fetchval("SELECT 1") == 1
        async with database.read() as session:
            assert await session.scalar(text("SELECT 2")) == 2
        await database.ping(5)
        assert database._probe._stmt_cache.get_max_size() == 0
    finally:
        await database.dispose()
    assert Settings.from_env({"DB_STATEMENT_CACHE": "off"}).db_statement_cache is False
    with pytest.raises(ConfigError, match="DB_STATEMENT_CACHE"):
        Settings.from_env({"DB_STATEMENT_CACHE": "sometimes"})


async def test_the_driver_transaction_begins_through_sqlalchemys_own_adapter(db_url):
    """driver_connection begins a session's transaction with the asyncpg adapter's own
    (private) `_start_transaction`, as SQLAlchemy does before its first statement; a
    release of SQLAlchemy that renames it fails here, not in production. A raw statement
    then commits or rolls back with the session."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    from shared.persistence.db import Database, driver_connection

    assert callable(AsyncAdapt_asyncpg_connection._start_transaction)
    database = Database(db_url, pool_size=1)
    try:
        with pytest.raises(RuntimeError):
            async with database.transaction() as session:
                connection = await driver_connection(session)
                await connection.execute("CREATE TEMP TABLE undone (n int)")
                raise RuntimeError("roll back")
        async with database.transaction() as session:
            connection = await driver_connection(session)
            assert connection.is_in_transaction()
            assert await connection.fetchval("SELECT to_regclass('undone')") is None
    finally:
        await database.dispose()
