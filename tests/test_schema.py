"""Schema 001 read back from PostgreSQL's catalog, compared with the intended schema.

The expectations below are written by hand from the intended tables, columns,
sizes and constraints, not from the models, so a mistake in the migration and
the models alike is still caught.
"""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import URL

from shared.persistence.db import libpq_dsn
from tests.harness import scratch_database

UUID = "uuid"
TS = "timestamp with time zone"
TEXT = "text"
BOOL = "boolean"
INT = "integer"
JSONB = "jsonb"


def vc(size: int) -> str:
    return f"character varying({size})"


# table -> column -> (type, nullable); column order is the intended one.
TIMESTAMPS = {"created_at": (TS, False), "updated_at": (TS, False)}
EXPECTED_COLUMNS: dict[str, dict[str, tuple[str, bool]]] = {
    "teams": {
        "id": (UUID, False),
        "name": (vc(100), False),
        "description": (TEXT, True),
        "slack_channel": (vc(100), True),
        "member_count": (INT, False),
        **TIMESTAMPS,
    },
    "users": {
        "id": (UUID, False),
        "email": (vc(255), False),
        "username": (vc(100), False),
        "full_name": (vc(200), True),
        "hashed_password": (vc(255), False),
        "is_active": (BOOL, False),
        "is_admin": (BOOL, False),
        **TIMESTAMPS,
    },
    "environments": {
        "id": (UUID, False),
        "name": (vc(100), False),
        "description": (TEXT, True),
        "environment_type": (vc(20), False),
        "config_path": (vc(500), True),
        "is_active": (BOOL, False),
        **TIMESTAMPS,
    },
    "services": {
        "id": (UUID, False),
        "name": (vc(100), False),
        "description": (TEXT, True),
        "repository_url": (vc(500), True),
        "team_id": (UUID, False),
        "slack_channel": (vc(100), True),
        "owner_id": (UUID, True),
        "is_active": (BOOL, False),
        **TIMESTAMPS,
    },
    "releases": {
        "id": (UUID, False),
        "service_id": (UUID, False),
        "version": (vc(50), False),
        "status": (vc(20), False),
        "release_notes": (TEXT, True),
        "git_commit": (vc(40), True),
        "created_by": (UUID, False),
        **TIMESTAMPS,
    },
    "deployments": {
        "id": (UUID, False),
        "release_id": (UUID, False),
        "environment_id": (UUID, False),
        "status": (vc(20), False),
        "deployed_by": (UUID, False),
        "deployed_at": (TS, True),
        "completed_at": (TS, True),
        **TIMESTAMPS,
    },
    "approvals": {
        "id": (UUID, False),
        "deployment_id": (UUID, False),
        "approver_id": (UUID, False),
        "status": (vc(20), False),
        "notes": (TEXT, True),
        "approved_at": (TS, True),
        **TIMESTAMPS,
    },
    "audit_logs": {
        "id": (UUID, False),
        "user_id": (UUID, True),
        "action": (vc(50), False),
        "resource_type": (vc(50), False),
        "resource_id": (vc(100), True),
        "details": (JSONB, False),
        "ip_address": (vc(45), True),
        "user_agent": (vc(255), True),
        "created_at": (TS, False),
    },
    "rollbacks": {
        "id": (UUID, False),
        "deployment_id": (UUID, False),
        "target_release_id": (UUID, False),
        "reason": (TEXT, False),
        "status": (vc(20), False),
        "initiated_by": (UUID, False),
        "completed_at": (TS, True),
        **TIMESTAMPS,
    },
    "runbooks": {
        "id": (UUID, False),
        "title": (vc(200), False),
        "content": (TEXT, False),
        "service_id": (UUID, True),
        "environment_id": (UUID, True),
        "tags": (JSONB, False),
        "created_by": (UUID, False),
        "is_active": (BOOL, False),
        **TIMESTAMPS,
    },
    "deployment_metrics": {
        "id": (UUID, False),
        "deployment_id": (UUID, False),
        "metric_name": (vc(100), False),
        "metric_value": ("double precision", False),
        "unit": (vc(20), True),
        **TIMESTAMPS,
    },
    "pipeline_stages": {
        "id": (UUID, False),
        "deployment_id": (UUID, False),
        "name": (vc(100), False),
        "order": (INT, False),
        "status": (vc(20), False),
        "timeout_seconds": (INT, False),
        "started_at": (TS, True),
        "completed_at": (TS, True),
        "output": (TEXT, True),
        **TIMESTAMPS,
    },
}

# (table, column) -> (referenced table, ON DELETE): users restrict, deployment children cascade.
EXPECTED_FOREIGN_KEYS = {
    ("services", "team_id"): ("teams", "RESTRICT"),
    ("services", "owner_id"): ("users", "RESTRICT"),
    ("releases", "service_id"): ("services", "RESTRICT"),
    ("releases", "created_by"): ("users", "RESTRICT"),
    ("deployments", "release_id"): ("releases", "RESTRICT"),
    ("deployments", "environment_id"): ("environments", "RESTRICT"),
    ("deployments", "deployed_by"): ("users", "RESTRICT"),
    ("approvals", "deployment_id"): ("deployments", "CASCADE"),
    ("approvals", "approver_id"): ("users", "RESTRICT"),
    ("audit_logs", "user_id"): ("users", "RESTRICT"),
    ("rollbacks", "deployment_id"): ("deployments", "CASCADE"),
    ("rollbacks", "target_release_id"): ("releases", "RESTRICT"),
    ("rollbacks", "initiated_by"): ("users", "RESTRICT"),
    ("runbooks", "service_id"): ("services", "RESTRICT"),
    ("runbooks", "environment_id"): ("environments", "RESTRICT"),
    ("runbooks", "created_by"): ("users", "RESTRICT"),
    ("deployment_metrics", "deployment_id"): ("deployments", "CASCADE"),
    ("pipeline_stages", "deployment_id"): ("deployments", "CASCADE"),
}

EXPECTED_UNIQUE = {
    ("teams", ("name",)),
    ("users", ("email",)),
    ("users", ("username",)),
    ("environments", ("name",)),
    ("services", ("name",)),
    ("releases", ("service_id", "version")),
    # The one deliberate change from the document: unique per metric name.
    ("deployment_metrics", ("deployment_id", "metric_name")),
}

# The document's "Indexes" lines. An index on a column that a unique constraint
# covers exactly is that constraint's own index (see EXPECTED_UNIQUE).
EXPECTED_INDEXES = {
    ("teams", ("name",)),
    ("teams", ("created_at",)),
    ("users", ("email",)),
    ("users", ("username",)),
    ("users", ("created_at",)),
    ("environments", ("name",)),
    ("environments", ("environment_type",)),
    ("services", ("name",)),
    ("services", ("team_id",)),
    ("services", ("owner_id",)),
    ("services", ("created_at",)),
    ("releases", ("service_id",)),
    ("releases", ("version",)),
    ("releases", ("status",)),
    ("releases", ("created_by",)),
    ("deployments", ("release_id",)),
    ("deployments", ("environment_id",)),
    ("deployments", ("status",)),
    ("deployments", ("deployed_by",)),
    ("deployments", ("release_id", "environment_id")),
    ("approvals", ("deployment_id",)),
    ("approvals", ("approver_id",)),
    ("approvals", ("status",)),
    ("audit_logs", ("action",)),
    ("audit_logs", ("user_id",)),
    ("audit_logs", ("resource_type", "resource_id")),
    ("audit_logs", ("created_at",)),
    ("rollbacks", ("deployment_id",)),
    ("rollbacks", ("target_release_id",)),
    ("rollbacks", ("initiated_by",)),
    ("rollbacks", ("status",)),
    ("runbooks", ("title",)),
    ("runbooks", ("service_id",)),
    ("runbooks", ("environment_id",)),
    ("runbooks", ("created_by",)),
    ("deployment_metrics", ("deployment_id",)),
    ("deployment_metrics", ("metric_name",)),
    ("pipeline_stages", ("deployment_id",)),
    ("pipeline_stages", ("status",)),
}

STATUS_VOCABULARIES = {
    "releases": {"draft", "promoted", "in_progress", "testing", "completed", "rolled_back"},
    "deployments": {
        "pending",
        "awaiting_approval",
        "in_progress",
        "succeeded",
        "failed",
        "rejected",
        "cancelled",
        "rolled_back",
    },
    "pipeline_stages": {"pending", "running", "succeeded", "failed", "skipped"},
    "approvals": {"pending", "approved", "rejected"},
    "rollbacks": {"pending", "in_progress", "completed", "failed"},
}

# Server defaults of status and boolean columns (and the other defaulted ones).
EXPECTED_DEFAULTS = {
    ("releases", "status"): "'draft'::character varying",
    ("deployments", "status"): "'pending'::character varying",
    ("approvals", "status"): "'pending'::character varying",
    ("rollbacks", "status"): "'pending'::character varying",
    ("pipeline_stages", "status"): "'pending'::character varying",
    ("users", "is_active"): "true",
    ("users", "is_admin"): "false",
    ("environments", "is_active"): "true",
    ("services", "is_active"): "true",
    ("runbooks", "is_active"): "true",
    ("audit_logs", "details"): "'{}'::jsonb",
    ("runbooks", "tags"): "'[]'::jsonb",
}

ON_DELETE = {"r": "RESTRICT", "c": "CASCADE", "a": "NO ACTION", "n": "SET NULL", "d": "SET DEFAULT"}


@pytest.fixture(scope="module")
async def catalog(server_url: URL):
    """A connection to a database migrated to 001 only (later migrations may change it)."""
    async with scratch_database(server_url, revision="001_initial_schema") as url:
        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            yield connection
        finally:
            await connection.close()


async def test_tables_and_columns_match_the_design(catalog):
    rows = await catalog.fetch(
        """
        SELECT c.relname AS table_name, a.attname AS column_name,
               format_type(a.atttypid, a.atttypmod) AS type, NOT a.attnotnull AS nullable
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'alembic_version'
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY c.relname, a.attnum
        """
    )
    actual: dict[str, dict[str, tuple[str, bool]]] = {}
    for row in rows:
        actual.setdefault(row["table_name"], {})[row["column_name"]] = (
            row["type"],
            row["nullable"],
        )
    assert set(actual) == set(EXPECTED_COLUMNS)
    for table, columns in EXPECTED_COLUMNS.items():
        assert actual[table] == columns, table
        assert list(actual[table]) == list(columns), f"{table}: column order"


async def test_every_table_has_a_uuid_primary_key(catalog):
    rows = await catalog.fetch(
        """
        SELECT c.conrelid::regclass::text AS table_name,
               array_agg(a.attname ORDER BY a.attnum) AS columns
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.contype = 'p' AND c.connamespace = 'public'::regnamespace
          AND c.conrelid::regclass::text <> 'alembic_version'
        GROUP BY 1
        """
    )
    assert {row["table_name"]: row["columns"] for row in rows} == {
        table: ["id"] for table in EXPECTED_COLUMNS
    }


async def test_foreign_keys_and_deletion_policy(catalog):
    rows = await catalog.fetch(
        """
        SELECT c.conrelid::regclass::text AS table_name, a.attname AS column_name,
               c.confrelid::regclass::text AS target, c.confdeltype::text AS on_delete,
               array_length(c.conkey, 1) AS width
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
        """
    )
    assert all(row["width"] == 1 for row in rows)
    actual = {
        (row["table_name"], row["column_name"]): (row["target"], ON_DELETE[row["on_delete"]])
        for row in rows
    }
    assert actual == EXPECTED_FOREIGN_KEYS


async def test_unique_constraints(catalog):
    rows = await catalog.fetch(
        """
        SELECT c.conrelid::regclass::text AS table_name,
               array_agg(a.attname ORDER BY array_position(c.conkey, a.attnum)) AS columns
        FROM pg_constraint c
        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.contype = 'u' AND c.connamespace = 'public'::regnamespace
        GROUP BY c.oid, 1
        """
    )
    assert {(row["table_name"], tuple(row["columns"])) for row in rows} == EXPECTED_UNIQUE


async def test_indexes(catalog):
    rows = await catalog.fetch(
        """
        SELECT t.relname AS table_name,
               array_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum))
                   AS columns
        FROM pg_index i
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (i.indkey::int2[])
        WHERE n.nspname = 'public' AND NOT i.indisprimary AND t.relname <> 'alembic_version'
        GROUP BY i.indexrelid, t.relname
        """
    )
    actual = [(row["table_name"], tuple(row["columns"])) for row in rows]
    assert len(actual) == len(set(actual)), "no index is duplicated"
    # Plain indexes plus the indexes behind unique constraints; nothing missing, nothing extra.
    assert set(actual) == EXPECTED_INDEXES | EXPECTED_UNIQUE


async def test_status_check_constraints_hold_the_vocabularies(catalog):
    rows = await catalog.fetch(
        """
        SELECT conrelid::regclass::text AS table_name, pg_get_constraintdef(oid) AS definition
        FROM pg_constraint WHERE contype = 'c' AND connamespace = 'public'::regnamespace
          AND conname LIKE '%\\_status'
        """
    )
    assert {row["table_name"] for row in rows} == set(STATUS_VOCABULARIES)
    for row in rows:
        for word in STATUS_VOCABULARIES[row["table_name"]]:
            assert f"'{word}'" in row["definition"], (row["table_name"], word)
    env_type = await catalog.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conname = 'ck_environments_environment_type'"
    )
    for word in ("development", "staging", "production"):
        assert f"'{word}'" in env_type


async def test_a_status_outside_the_vocabulary_is_refused(catalog):
    with pytest.raises(asyncpg.CheckViolationError):
        await catalog.execute(
            "INSERT INTO environments (name, environment_type) VALUES ('qa', 'qa')"
        )
    await catalog.execute(
        "INSERT INTO environments (name, environment_type) VALUES ('qa', 'staging')"
    )
    # Defaults fill status and booleans; an unknown status is refused on update too.
    assert await catalog.fetchval("SELECT is_active FROM environments WHERE name = 'qa'") is True
    await catalog.execute("INSERT INTO teams (name) VALUES ('check-team')")
    await catalog.execute(
        "INSERT INTO users (email, username, hashed_password)"
        " VALUES ('c@example.com', 'check-user', 'x')"
    )
    await catalog.execute(
        "INSERT INTO services (name, team_id)"
        " SELECT 'check-svc', id FROM teams WHERE name = 'check-team'"
    )
    release_status = await catalog.fetchval(
        "INSERT INTO releases (service_id, version, created_by)"
        " SELECT s.id, '1.0.0', u.id FROM services s, users u"
        " WHERE s.name = 'check-svc' AND u.username = 'check-user' RETURNING status"
    )
    assert release_status == "draft"
    with pytest.raises(asyncpg.CheckViolationError):
        await catalog.execute("UPDATE releases SET status = 'shipped' WHERE version = '1.0.0'")


async def test_server_defaults(catalog):
    rows = await catalog.fetch(
        """
        SELECT table_name, column_name, column_default
        FROM information_schema.columns
        WHERE table_schema = 'public' AND column_default IS NOT NULL
        """
    )
    defaults = {(row["table_name"], row["column_name"]): row["column_default"] for row in rows}
    for key, expected in EXPECTED_DEFAULTS.items():
        assert defaults.get(key) == expected, key
    for table in EXPECTED_COLUMNS:
        assert defaults[(table, "id")] == "gen_random_uuid()"
        assert defaults[(table, "created_at")] == "now()"
