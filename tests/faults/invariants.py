"""The deployment rules (README, "Deployment rules") as queries over the whole database,
written apart from the domain code: each returns the rows that break its rule, so an
empty result is a pass."""

from __future__ import annotations

import asyncpg

from tests.harness import RELEASE_STATUS_MISMATCHES

ACTIVE = "('pending', 'awaiting_approval', 'in_progress')"

INVARIANTS = {
    "at most one active deployment per service and environment": f"""
        SELECT service_id, environment_id, count(*) FROM deployments
        WHERE status IN {ACTIVE} GROUP BY 1, 2 HAVING count(*) > 1""",
    "a deployment's service is its release's": """
        SELECT d.id FROM deployments d JOIN releases r ON r.id = d.release_id
        WHERE r.service_id <> d.service_id""",
    "a started stage has started_at, a finished one completed_at": """
        SELECT id FROM pipeline_stages
        WHERE (status IN ('running', 'succeeded', 'failed') AND started_at IS NULL)
           OR (status IN ('succeeded', 'failed') AND completed_at IS NULL)""",
    "a stage starts only after the ones before it succeeded or were skipped": """
        SELECT s.id FROM pipeline_stages s JOIN pipeline_stages before
            ON before.deployment_id = s.deployment_id AND before."order" < s."order"
        WHERE s.status IN ('running', 'succeeded', 'failed')
          AND before.status NOT IN ('succeeded', 'skipped')""",
    "at most one running stage per deployment": """
        SELECT deployment_id FROM pipeline_stages WHERE status = 'running'
        GROUP BY 1 HAVING count(*) > 1""",
    "a pending or waiting deployment has not started": """
        SELECT d.id FROM deployments d JOIN pipeline_stages s ON s.deployment_id = d.id
        WHERE d.status IN ('pending', 'awaiting_approval') AND s.status <> 'pending'""",
    "a succeeded deployment's stages all succeeded or were skipped": """
        SELECT d.id FROM deployments d JOIN pipeline_stages s ON s.deployment_id = d.id
        WHERE d.status = 'succeeded' AND s.status NOT IN ('succeeded', 'skipped')""",
    "a failed deployment has a failed stage and nothing left to run": """
        SELECT d.id FROM deployments d WHERE d.status = 'failed' AND (
            NOT EXISTS (SELECT FROM pipeline_stages s
                        WHERE s.deployment_id = d.id AND s.status = 'failed')
            OR EXISTS (SELECT FROM pipeline_stages s
                       WHERE s.deployment_id = d.id AND s.status IN ('pending', 'running')))""",
    "a cancelled or rejected deployment has nothing left to run": """
        SELECT d.id FROM deployments d JOIN pipeline_stages s ON s.deployment_id = d.id
        WHERE d.status IN ('cancelled', 'rejected') AND s.status IN ('pending', 'running')""",
    "a running deployment has no failed stage and a deployed_at": """
        SELECT d.id FROM deployments d WHERE d.status = 'in_progress' AND (
            d.deployed_at IS NULL OR EXISTS (SELECT FROM pipeline_stages s
                WHERE s.deployment_id = d.id AND s.status = 'failed'))""",
    "every deployment has the audit row of its creation (a redeployment, its rollback's)": """
        SELECT d.id FROM deployments d WHERE NOT EXISTS (
            SELECT FROM audit_logs a
            WHERE a.resource_type = 'deployment' AND a.resource_id = d.id::text)
        AND NOT EXISTS (
            SELECT FROM rollbacks r JOIN audit_logs a
                ON a.resource_type = 'deployment' AND a.resource_id = r.deployment_id::text
               AND a.action = 'rollback' AND a.details->>'redeployment_id' = d.id::text
            WHERE r.redeployment_id = d.id)""",
    "nobody votes on their own deployment": """
        SELECT a.id FROM approvals a JOIN deployments d ON d.id = a.deployment_id
        WHERE a.approver_id = d.deployed_by AND a.status <> 'pending'""",
    "one rejection rejects, and only a rejection does": """
        SELECT d.id FROM deployments d
        WHERE (d.status = 'rejected') <> EXISTS (
            SELECT FROM approvals a WHERE a.deployment_id = d.id AND a.status = 'rejected')""",
    "production runs only with an approval (or as a rollback's redeployment)": """
        SELECT d.id FROM deployments d JOIN environments e ON e.id = d.environment_id
        WHERE e.environment_type = 'production'
          AND d.status NOT IN ('awaiting_approval', 'rejected', 'cancelled')
          AND NOT EXISTS (SELECT FROM rollbacks r WHERE r.redeployment_id = d.id)
          AND NOT EXISTS (SELECT FROM approvals a
                          WHERE a.deployment_id = d.id AND a.status = 'approved')""",
    "a rolled-back deployment has its rollback, and the other way round": """
        SELECT d.id FROM deployments d
        WHERE (d.status = 'rolled_back')
           <> EXISTS (SELECT FROM rollbacks r WHERE r.deployment_id = d.id)""",
    "a rollback follows its redeployment": f"""
        SELECT r.id FROM rollbacks r JOIN deployments d ON d.id = r.redeployment_id
        WHERE r.status <> CASE
            WHEN d.status IN {ACTIVE} THEN 'in_progress'
            WHEN d.status IN ('succeeded', 'rolled_back') THEN 'completed'
            ELSE 'failed' END""",
    "metrics are finite": """
        SELECT id FROM deployment_metrics
        WHERE metric_value IN ('NaN', 'Infinity', '-Infinity')""",
    "a release's status is derived from its deployments": RELEASE_STATUS_MISMATCHES,
}


async def check_invariants(db: asyncpg.Connection) -> int:
    """Asserts every invariant; returns how many were checked."""
    broken = {}
    for rule, query in INVARIANTS.items():
        rows = await db.fetch(query)
        if rows:
            broken[rule] = [dict(row) for row in rows[:5]]
    assert not broken, broken
    return len(INVARIANTS)
