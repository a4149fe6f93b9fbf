"""The deployment rules (README, "Deployment rules") as queries over the whole database,
written apart from the domain code: each returns the rows that break its rule, so an
empty result is a pass.

The environment policy rules (issue 18: approvals, required stages, freeze windows) are
here too, still plain SQL (and cronsim for recurring freeze windows), never deploy_svc.
A rule was applied with the policy in force at the time; the database keeps only the
policy as it is now and relman's audit rows of its changes, so each policy rule takes
the loosest value the environment held from the deployment's creation on (a sound lower
bound: a policy tightened afterwards never makes an earlier deployment look wrong).
Which of two racing transactions came first is read from commit timestamps when the
cluster tracks them (tests/faults/test_races.py turns that on), else from the
transactions' start times (created_at), exact whenever the two did not overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
from cronsim import CronSim

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


# -- the environment policy rules ------------------------------------------------------------

Committed = Callable[[str], str]  # table alias -> SQL of when that row's transaction committed


def _committed_at(tracked: bool) -> Committed:
    """When the transaction that wrote a row (never updated after) committed: its commit
    timestamp when the cluster tracks them, else its start (the row's created_at)."""
    if tracked:
        return lambda row: f"coalesce(pg_xact_commit_timestamp({row}.xmin), {row}.created_at)"
    return lambda row: f"{row}.created_at"


# PostgreSQL stamps a transaction's commit time before it flushes the commit to the WAL and
# only then makes it visible, so a transaction that began a little after a policy change's
# commit timestamp may still have read the policy before it: under a loaded machine that
# gap is the time of an fsync. A change committed up to this long after a moment counts as
# one the moment may not have seen yet.
_VISIBILITY_MARGIN = "interval '1 second'"


def _held_since(committed: Committed, moment: str) -> str:
    """A LATERAL subquery of the policy values (jsonb, as audit rows hold them) the
    deployment `d`'s environment held from `moment` on: the policy now (its pending change
    once due) and the before and after of every change relman recorded since (or that
    became visible since: `_VISIBILITY_MARGIN`)."""
    return f"""LATERAL (
        SELECT CASE WHEN p.pending_effective_at <= now() THEN p.pending
               ELSE jsonb_build_object('required_approvals', p.required_approvals,
                                       'required_stages', to_jsonb(p.required_stages)) END
        FROM environment_policies p WHERE p.environment_id = d.environment_id
        UNION ALL
        SELECT a.details -> side FROM audit_logs a CROSS JOIN unnest(ARRAY['before', 'after']) side
        WHERE a.origin = 'relman' AND a.resource_type = 'environment_policy'
          AND a.resource_id = d.environment_id::text
          AND a.action IN ('policy.update', 'policy.update_effective')
          AND {committed("a")} >= {moment} - {_VISIBILITY_MARGIN}
    ) held(rules)"""


# Relman's own freeze.override row for a deployment (a client cannot write one for it:
# LogAction rows are origin 'client').
_OVERRIDE_ROW = """EXISTS (
    SELECT FROM audit_logs o
    WHERE o.origin = 'relman' AND o.action = 'freeze.override'
      AND o.resource_type = 'deployment' AND o.resource_id = d.id::text)"""


# A deployment made once its environment had a policy: the seed's sample history is
# dated back before migration 007 made the policies (one of its production deployments
# has no stage rows at all), and a rule binds only what was made while it existed.
_UNDER_POLICY = """d.created_at >= (
    SELECT p.created_at FROM environment_policies p WHERE p.environment_id = d.environment_id)"""


def policy_invariants(committed: Committed) -> dict[str, str]:
    return {
        "every environment has exactly one policy": """
            SELECT e.id, count(p.id) FROM environments e
            LEFT JOIN environment_policies p ON p.environment_id = e.id
            GROUP BY e.id HAVING count(p.id) <> 1""",
        "a policy's roles and stages are ones the rules allow (its pending change's too)": """
            SELECT p.environment_id FROM environment_policies p
            CROSS JOIN LATERAL (
                SELECT p.approver_roles, p.deployer_roles, p.required_stages
                UNION ALL
                SELECT ARRAY(SELECT jsonb_array_elements_text(p.pending -> 'approver_roles')),
                       ARRAY(SELECT jsonb_array_elements_text(p.pending -> 'deployer_roles')),
                       ARRAY(SELECT jsonb_array_elements_text(p.pending -> 'required_stages'))
                WHERE p.pending IS NOT NULL
            ) rules(approvers, deployers, stages)
            WHERE cardinality(rules.approvers) = 0 OR cardinality(rules.deployers) = 0
               OR NOT rules.approvers <@ ARRAY['admin', 'lead']
               OR NOT rules.deployers <@ ARRAY['admin', 'lead', 'developer']
               OR cardinality(rules.stages) > 20
               OR (SELECT count(DISTINCT name) FROM unnest(rules.stages) name)
                  <> cardinality(rules.stages)
               OR EXISTS (SELECT FROM unnest(rules.stages) name
                          WHERE length(name) NOT BETWEEN 1 AND 100)""",
        "is_rollback marks exactly the rollbacks' redeployments": """
            SELECT d.id FROM deployments d
            WHERE d.is_rollback <> EXISTS (
                SELECT FROM rollbacks r WHERE r.redeployment_id = d.id)""",
        # Approvals: counted regardless of the approver's role now. The rule counts only
        # votes by someone eligible when they voted, which this cannot know afterwards
        # (an approver may have been demoted since), so this is a lower bound that holds.
        # The policy that applied: from the start on (the votes are counted again when a
        # deployment leaves pending), for one not started yet from its creation on.
        "a deployment ran (or may run) only with the approvals its policy required": f"""
            SELECT d.id, d.status, needed.n AS required, approved.n AS approved
            FROM deployments d
            CROSS JOIN LATERAL (
                SELECT min((held.rules ->> 'required_approvals')::integer) AS n
                FROM {_held_since(committed, "coalesce(d.deployed_at, d.created_at)")}
                WHERE jsonb_typeof(held.rules -> 'required_approvals') = 'number'
            ) needed
            CROSS JOIN LATERAL (
                SELECT count(DISTINCT a.approver_id) AS n FROM approvals a
                WHERE a.deployment_id = d.id AND a.status = 'approved'
                  AND a.approver_id <> d.deployed_by
            ) approved
            WHERE NOT d.is_rollback AND {_UNDER_POLICY}
              AND (d.status IN ('pending', 'in_progress', 'succeeded', 'failed', 'rolled_back')
                   OR d.deployed_at IS NOT NULL)
              AND needed.n > approved.n""",
        # Checked in every environment, not only production: the rule is the same there.
        "a deployment starts with its environment's required stages, in order": f"""
            SELECT d.id, ARRAY(SELECT s.name::text FROM pipeline_stages s
                               WHERE s.deployment_id = d.id ORDER BY s."order") AS stages
            FROM deployments d
            WHERE NOT d.is_rollback AND {_UNDER_POLICY} AND NOT EXISTS (
                SELECT FROM {_held_since(committed, "d.created_at")}
                WHERE jsonb_typeof(held.rules -> 'required_stages') = 'array'
                  AND (ARRAY(SELECT s.name::text FROM pipeline_stages s
                             WHERE s.deployment_id = d.id ORDER BY s."order"))
                      [1:jsonb_array_length(held.rules -> 'required_stages')]
                      = ARRAY(SELECT jsonb_array_elements_text(
                            held.rules -> 'required_stages')))""",
        "a deployment has a freeze override reason exactly when relman audited the override": f"""
            SELECT d.id FROM deployments d
            WHERE (d.freeze_override_reason IS NOT NULL) <> {_OVERRIDE_ROW}""",
    }


# The moments a freeze window in force forbids, of the deployments in its scope after it
# committed and became visible ($1 environment, $2 service: NULL for all; $3 its commit
# timestamp, to which `_VISIBILITY_MARGIN` is added; $4, $5 a
# one-off window's start and end, NULL for a recurring one):
# - "created": a deployment created without an admin's override (its reason and relman's
#   freeze.override row), a rollback's redeployment aside;
# - "started": a deployment left pending (deployed_at: its first stage ran, or every stage
#   was skipped), unless it was created with an override or is a rollback's redeployment;
#   one that had started before the window may go on inside it.
_FORBIDDEN_MOMENTS = f"""
    SELECT * FROM (
        SELECT d.id, 'created' AS what, d.created_at AS moment FROM deployments d
        WHERE NOT d.is_rollback
          AND NOT (d.freeze_override_reason IS NOT NULL AND {_OVERRIDE_ROW})
          AND ($1::uuid IS NULL OR d.environment_id = $1)
          AND ($2::uuid IS NULL OR d.service_id = $2)
        UNION ALL
        SELECT d.id, 'started', d.deployed_at FROM deployments d
        WHERE NOT d.is_rollback AND d.freeze_override_reason IS NULL
          AND d.deployed_at IS NOT NULL
          AND ($1::uuid IS NULL OR d.environment_id = $1)
          AND ($2::uuid IS NULL OR d.service_id = $2)
    ) moments
    WHERE moment > $3::timestamptz + {_VISIBILITY_MARGIN}
      AND ($4::timestamptz IS NULL OR (moment >= $4 AND moment < $5))"""


def _occurrence_covers(window, moment: datetime) -> bool:
    """Whether an occurrence of the recurring `window` is in force at `moment`: the latest
    start at or before it (cron on the wall clock of its time zone) plus duration_minutes
    of real time is after it. Every earlier start ended no later, all lasting the same."""
    zone = ZoneInfo(window["time_zone"])
    # The reverse walk starts strictly before its datetime: one second on, so that an
    # occurrence starting exactly at `moment` counts.
    local = moment.astimezone(zone).replace(microsecond=0) + timedelta(seconds=1)
    start = next(CronSim(window["cron"], local, reverse=True)).astimezone(UTC)
    return start <= moment < start + timedelta(minutes=window["duration_minutes"])


async def frozen_deployments(db: asyncpg.Connection, committed: Committed) -> list[dict]:
    """Deployments created, or started, inside a freeze window that was in force then,
    without an admin's override (or being a rollback's redeployment).

    Only the windows that still exist are checked: a deleted window is gone from
    freeze_windows (its audit rows remain, but this does not rebuild windows from them)."""
    windows = await db.fetch(
        f"""SELECT w.id, w.environment_id, w.service_id, w.start_time, w.end_time, w.cron,
                   w.time_zone, w.duration_minutes, {committed("w")} AS in_force_from
            FROM freeze_windows w"""
    )
    broken = []
    for window in windows:
        moments = await db.fetch(
            _FORBIDDEN_MOMENTS,
            window["environment_id"],
            window["service_id"],
            window["in_force_from"],
            window["start_time"],
            window["end_time"],
        )
        for row in moments:
            if window["cron"] is None or _occurrence_covers(window, row["moment"]):
                broken.append({"window": window["id"], **dict(row)})
    return broken


FREEZE_RULE = "nothing is created or started inside a freeze window without an override"


async def check_invariants(db: asyncpg.Connection) -> int:
    """Asserts every invariant; returns how many were checked."""
    tracked = await db.fetchval("SELECT current_setting('track_commit_timestamp') = 'on'")
    committed = _committed_at(tracked)
    queries = {**INVARIANTS, **policy_invariants(committed)}
    broken = {}
    for rule, query in queries.items():
        rows = await db.fetch(query)
        if rows:
            broken[rule] = [dict(row) for row in rows[:5]]
    if frozen := await frozen_deployments(db, committed):
        broken[FREEZE_RULE] = frozen[:5]
    assert not broken, broken
    return len(queries) + 1
