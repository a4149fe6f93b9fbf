"""The sample data set, seeded through its real command line into a database of its own.

Each deployment rule (README, "Deployment rules") that the seed must obey is a query that lists
the rows breaking it; every such query must come back empty.
"""

from __future__ import annotations

import subprocess

import asyncpg
import bcrypt
import pytest
from sqlalchemy import URL

from shared.devtools.seed import SEED_PASSWORD
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Base
from tests.harness import RELEASE_STATUS_MISMATCHES, run_cli, scratch_database

EXPECTED_COUNTS = {
    "teams": 3,
    "users": 8,
    "services": 5,
    "environments": 3,
    "releases": 10,
    "deployments": 8,
    "approvals": 5,
    "audit_logs": 20,
    "rollbacks": 2,
    "runbooks": 3,
    "deployment_metrics": 8,
    "pipeline_stages": 25,
}


def run_seed(url: URL, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(url, "shared.devtools.seed", *args)


@pytest.fixture(scope="module")
async def seeded(server_url: URL):
    """A database migrated to head and seeded once by `python -m shared.devtools.seed`."""
    async with scratch_database(server_url) as url:
        result = run_seed(url)
        assert result.returncode == 0, result.stderr
        assert "seeded" in result.stdout
        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            yield url, connection
        finally:
            await connection.close()


async def counts(connection: asyncpg.Connection) -> dict[str, int]:
    return {
        table: await connection.fetchval(f"SELECT count(*) FROM {table}")
        for table in EXPECTED_COUNTS
    }


async def test_exact_volumes(seeded):
    _, connection = seeded
    assert await counts(connection) == EXPECTED_COUNTS


async def test_names_of_the_design_document(seeded):
    _, connection = seeded
    teams = {r["name"] for r in await connection.fetch("SELECT name FROM teams")}
    assert teams == {"Platform", "Backend", "Frontend"}
    services = {r["name"] for r in await connection.fetch("SELECT name FROM services")}
    assert services == {
        "auth-service",
        "payment-api",
        "user-dashboard",
        "api-gateway",
        "notification-service",
    }
    environments = dict(await connection.fetch("SELECT name, environment_type FROM environments"))
    assert environments == {
        "development": "development",
        "staging": "staging",
        "production": "production",
    }
    roles = dict(await connection.fetch("SELECT role, count(*) FROM users GROUP BY role"))
    assert roles == {"admin": 1, "lead": 2, "developer": 3, "viewer": 2}
    assert await connection.fetchval("SELECT count(*) FROM users WHERE is_admin") == 1
    stages = await connection.fetch(
        'SELECT deployment_id, array_agg(name ORDER BY "order") AS names'
        " FROM pipeline_stages GROUP BY deployment_id"
    )
    assert len(stages) == 5
    assert all(
        r["names"] == ["build", "test", "security_scan", "deploy", "smoke_test"] for r in stages
    )
    metrics = {
        r["metric_name"]
        for r in await connection.fetch("SELECT metric_name FROM deployment_metrics")
    }
    assert metrics == {"duration_seconds", "cpu_usage_percent", "memory_usage_mb"}
    actions = {r["action"] for r in await connection.fetch("SELECT action FROM audit_logs")}
    assert actions == {"create", "update", "delete", "deploy", "approve", "rollback"}
    approval_states = {r["status"] for r in await connection.fetch("SELECT status FROM approvals")}
    assert {"approved", "pending"} <= approval_states
    runbooks = await connection.fetch("SELECT title, content, tags FROM runbooks")
    titles = " ".join(r["title"].lower() for r in runbooks)
    for topic in ("deployment", "rollback", "incident"):
        assert topic in titles
    for runbook in runbooks:
        assert runbook["content"].startswith("# ")  # real markdown, with headings
        assert runbook["content"].count("\n") > 10


async def test_every_foreign_key_resolves(seeded):
    _, connection = seeded
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_key_constraints:
            column = fk.column_keys[0]
            target = fk.referred_table.name
            dangling = await connection.fetchval(
                f'SELECT count(*) FROM {table.name} t LEFT JOIN {target} r ON r.id = t."{column}"'
                f' WHERE t."{column}" IS NOT NULL AND r.id IS NULL'
            )
            assert dangling == 0, f"{table.name}.{column} -> {target}"


async def test_every_user_has_password123_at_cost_12(seeded):
    _, connection = seeded
    hashes = [
        r["hashed_password"] for r in await connection.fetch("SELECT hashed_password FROM users")
    ]
    assert len(set(hashes)) == 8  # each its own salt
    for hashed in hashes:
        assert hashed.startswith("$2b$12$")
        assert bcrypt.checkpw(SEED_PASSWORD.encode(), hashed.encode())
        assert not bcrypt.checkpw(b"password124", hashed.encode())


# Each rule: a query listing the rows that break it.
RULE_VIOLATIONS = {
    "promotion order: a deployment outside development has a succeeded deployment of "
    "its release in the previous environment, finished before it was created": """
        SELECT d.id FROM deployments d
        JOIN environments e ON e.id = d.environment_id
        WHERE e.environment_type <> 'development' AND NOT EXISTS (
            SELECT 1 FROM deployments p JOIN environments pe ON pe.id = p.environment_id
            WHERE p.release_id = d.release_id AND p.status = 'succeeded'
              AND p.completed_at <= d.created_at
              AND pe.environment_type = CASE e.environment_type
                  WHEN 'staging' THEN 'development' WHEN 'production' THEN 'staging' END)
    """,
    "a release that reached production has a staging deployment, finished before, whose "
    "five standard stages all succeeded": """
        SELECT d.id FROM deployments d JOIN environments e ON e.id = d.environment_id
        WHERE e.environment_type = 'production' AND NOT EXISTS (
            SELECT 1 FROM deployments p JOIN environments pe ON pe.id = p.environment_id
            JOIN pipeline_stages s ON s.deployment_id = p.id
            WHERE p.release_id = d.release_id AND pe.environment_type = 'staging'
              AND p.status = 'succeeded' AND p.completed_at <= d.created_at
              AND s.status = 'succeeded' AND (s."order", s.name) IN (
                  (0, 'build'), (1, 'test'), (2, 'security_scan'), (3, 'deploy'),
                  (4, 'smoke_test'))
            GROUP BY p.id HAVING count(*) = 5)
    """,
    "at most one active deployment per service and environment": """
        SELECT r.service_id, d.environment_id FROM deployments d
        JOIN releases r ON r.id = d.release_id
        WHERE d.status IN ('pending', 'awaiting_approval', 'in_progress')
        GROUP BY 1, 2 HAVING count(*) > 1
    """,
    "approvals only on production deployments": """
        SELECT a.id FROM approvals a JOIN deployments d ON d.id = a.deployment_id
        JOIN environments e ON e.id = d.environment_id
        WHERE e.environment_type <> 'production'
    """,
    "no approval by the deployer": """
        SELECT a.id FROM approvals a JOIN deployments d ON d.id = a.deployment_id
        WHERE a.approver_id = d.deployed_by
    """,
    "only leads and admins vote, and only they deploy to production": """
        SELECT a.id FROM approvals a JOIN users u ON u.id = a.approver_id
        WHERE u.role NOT IN ('lead', 'admin')
        UNION ALL
        SELECT d.id FROM deployments d JOIN environments e ON e.id = d.environment_id
        JOIN users u ON u.id = d.deployed_by
        WHERE e.environment_type = 'production' AND u.role NOT IN ('lead', 'admin')
    """,
    "one vote per approver and deployment": """
        SELECT deployment_id, approver_id FROM approvals GROUP BY 1, 2 HAVING count(*) > 1
    """,
    "a vote has its time, a pending request has none": """
        SELECT id FROM approvals
        WHERE (status = 'pending') <> (approved_at IS NULL)
    """,
    "each rollback rolled back its deployment and targets an earlier release of the same "
    "service that succeeded in that environment": """
        SELECT rb.id FROM rollbacks rb
        JOIN deployments d ON d.id = rb.deployment_id
        JOIN releases r ON r.id = d.release_id
        JOIN releases t ON t.id = rb.target_release_id
        WHERE d.status <> 'rolled_back' OR t.service_id <> r.service_id OR t.id = r.id
           OR t.created_at >= r.created_at OR NOT EXISTS (
              SELECT 1 FROM deployments s
              WHERE s.release_id = t.id AND s.environment_id = d.environment_id
                AND s.status = 'succeeded' AND s.completed_at <= rb.created_at)
    """,
    "a rolled-back deployment was the newest of its service in that environment "
    "when it was rolled back": """
        SELECT rb.id FROM rollbacks rb
        JOIN deployments d ON d.id = rb.deployment_id
        JOIN releases r ON r.id = d.release_id
        WHERE EXISTS (
            SELECT 1 FROM deployments n JOIN releases nr ON nr.id = n.release_id
            WHERE nr.service_id = r.service_id AND n.environment_id = d.environment_id
              AND n.created_at > d.created_at AND n.created_at < rb.created_at)
    """,
    "release status equals the derivation rule": RELEASE_STATUS_MISMATCHES,
    "deployment timestamps: deployed after creation, completed after deployment, "
    "terminal states completed, active ones not": """
        SELECT id FROM deployments
        WHERE deployed_at < created_at OR completed_at < coalesce(deployed_at, created_at)
           OR (status IN ('succeeded', 'failed', 'rolled_back') AND
               (deployed_at IS NULL OR completed_at IS NULL))
           OR (status IN ('pending', 'awaiting_approval', 'in_progress')
               AND completed_at IS NOT NULL)
           OR (status = 'in_progress' AND deployed_at IS NULL)
    """,
    "stage timestamps: started after its deployment was created, completed after start, "
    "and only as its status says": """
        SELECT s.id FROM pipeline_stages s JOIN deployments d ON d.id = s.deployment_id
        WHERE s.started_at < d.created_at OR s.completed_at < s.started_at
           OR (s.status = 'pending' AND (s.started_at IS NOT NULL OR s.completed_at IS NOT NULL))
           OR (s.status = 'running' AND (s.started_at IS NULL OR s.completed_at IS NOT NULL))
           OR (s.status IN ('succeeded', 'failed') AND s.completed_at IS NULL)
    """,
    "the in-progress story lasts: a running stage has a day left before it times out": """
        SELECT id FROM pipeline_stages WHERE status = 'running'
          AND started_at + make_interval(secs => timeout_seconds) < now() + interval '1 day'
    """,
    "stages run in order: nothing starts before the previous stage succeeded": """
        SELECT s.id FROM pipeline_stages s
        JOIN pipeline_stages p ON p.deployment_id = s.deployment_id AND p."order" < s."order"
        WHERE s.started_at IS NOT NULL
          AND (p.status <> 'succeeded' OR p.completed_at > s.started_at)
    """,
    "a deployment's status follows its stages": """
        SELECT d.id FROM deployments d JOIN pipeline_stages s ON s.deployment_id = d.id
        GROUP BY d.id, d.status
        HAVING (bool_and(s.status = 'succeeded') AND d.status <> 'succeeded')
            OR (bool_or(s.status = 'failed') AND d.status NOT IN ('failed', 'rolled_back'))
            OR (bool_or(s.status = 'running') AND d.status <> 'in_progress')
    """,
    "everything happened within the last 30 days, and not in the future": """
        SELECT 'deployments', id FROM deployments
          WHERE created_at < now() - interval '30 days'
             OR coalesce(completed_at, created_at) > now()
        UNION ALL SELECT 'releases', id FROM releases
          WHERE created_at < now() - interval '30 days' OR created_at > now()
        UNION ALL SELECT 'audit_logs', id FROM audit_logs
          WHERE created_at < now() - interval '30 days' OR created_at > now()
        UNION ALL SELECT 'rollbacks', id FROM rollbacks
          WHERE created_at < now() - interval '30 days' OR completed_at > now()
        UNION ALL SELECT 'approvals', id FROM approvals WHERE approved_at > now()
    """,
    "statuses within their vocabularies": """
        SELECT 'release', status FROM releases WHERE status NOT IN
            ('draft', 'promoted', 'in_progress', 'testing', 'completed', 'rolled_back')
        UNION ALL SELECT 'deployment', status FROM deployments WHERE status NOT IN
            ('pending', 'awaiting_approval', 'in_progress', 'succeeded', 'failed', 'rejected',
             'cancelled', 'rolled_back')
        UNION ALL SELECT 'stage', status FROM pipeline_stages WHERE status NOT IN
            ('pending', 'running', 'succeeded', 'failed', 'skipped')
        UNION ALL SELECT 'approval', status FROM approvals WHERE status NOT IN
            ('pending', 'approved', 'rejected')
        UNION ALL SELECT 'rollback', status FROM rollbacks WHERE status NOT IN
            ('pending', 'in_progress', 'completed', 'failed')
    """,
}


@pytest.mark.parametrize("rule", list(RULE_VIOLATIONS), ids=lambda rule: rule.split(":")[0])
async def test_seed_obeys_the_rules(seeded, rule):
    _, connection = seeded
    assert await connection.fetch(RULE_VIOLATIONS[rule]) == []


async def test_release_statuses_cover_the_story(seeded):
    _, connection = seeded
    statuses = dict(await connection.fetch("SELECT version, status FROM releases"))
    assert statuses["1.4.0"] == "completed"
    assert statuses["1.5.0"] == "rolled_back"
    assert statuses["2.3.0"] == "in_progress"
    assert sorted(statuses.values()).count("draft") == 7


async def test_second_run_adds_nothing(seeded):
    url, connection = seeded
    before = await counts(connection)
    result = run_seed(url)
    assert result.returncode == 0, result.stderr
    assert "already seeded" in result.stdout
    assert await counts(connection) == before


async def test_seed_refuses_an_unmigrated_database(server_url: URL):
    async with scratch_database(server_url, revision=None) as url:
        result = run_seed(url)
        assert result.returncode == 2
        assert "make migrate" in result.stderr
        assert "Traceback" not in result.stderr


async def test_reset_drops_migrates_and_reseeds(server_url: URL):
    async with scratch_database(server_url) as url:
        assert run_seed(url).returncode == 0
        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            # Something that is not seed data, to prove --reset really starts over.
            await connection.execute("INSERT INTO teams (name) VALUES ('Temporary')")
            old_password = await connection.fetchval(
                "SELECT hashed_password FROM users WHERE username = 'admin'"
            )
        finally:
            await connection.close()

        result = run_seed(url, "--reset")
        assert result.returncode == 0, result.stderr
        assert "seeded" in result.stdout

        connection = await asyncpg.connect(libpq_dsn(url))
        try:
            assert await counts(connection) == EXPECTED_COUNTS
            assert (
                await connection.fetchval("SELECT count(*) FROM teams WHERE name = 'Temporary'")
                == 0
            )
            assert (
                await connection.fetchval(
                    "SELECT hashed_password FROM users WHERE username = 'admin'"
                )
                != old_password
            )
        finally:
            await connection.close()
