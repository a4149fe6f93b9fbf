"""Which database relman uses, and how a bad DATABASE_URL is refused."""

from __future__ import annotations

import pytest

from shared.db import DatabaseUrlError, database_url, describe, normalize_url


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
