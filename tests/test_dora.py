"""GetDoraMetrics over a history built through the real API, then moved onto a known
calendar (March 2025, UTC) by the test's own SQL: no mocked clock. Every figure of every
bucket is checked against numbers worked out by hand below.

The history, in the test's own production environment P (a deployment runs in a
development environment and the test's own staging environment G first, as promotion
requires). Times are 2025-03-DD HH:MM UTC; "lead" is completed_at - release.created_at.

team T, service A:
  a0  0.9.0   succeeded  03-04 10:00  lead 2 h = 7200 (before the WEEK range's start)
  a1  1.0.0   succeeded  03-05 10:00  lead 2 h = 7200
  a2  1.1.0   succeeded  03-06 10:00, rolled back at 03-06 12:00
  r1  1.0.0   the rollback's redeployment, succeeded 03-06 12:30  (recovery of a2: 1800)
  a3  1.2.0   failed     03-07 09:00
  a4  1.2.1   hotfix, succeeded 03-07 13:00  lead 3 h = 10800  (recovery of a3: 4 h = 14400)
  --  1.4.0   rejected   03-12 10:00, then cancelled 03-19 15:00 (never counted)
  a5  1.3.0   failed     03-20 10:00, never recovered
team T, service B:
  b0  0.9.0   failed     03-05 12:00
  b1  1.0.0   succeeded  03-06 15:00  lead 24 h = 86400  (recovery of b0: 27 h = 97200)
  b2  1.1.0   succeeded  03-17 10:00  lead 1 h = 3600
  b3  1.2.0   succeeded  03-19 10:00, rolled back at 03-19 11:00
  r2  1.1.0   the rollback's redeployment, succeeded 03-19 11:20  (recovery of b3: 1200)
  b4  1.3.1   hotfix, succeeded 03-21 10:00  lead 2 h = 7200
  b5  1.4.0   failed     03-23 20:00 (a Sunday)
  b6  1.4.1   succeeded  03-24 02:00  lead 5 h = 18000  (recovery of b5: 6 h = 21600, in
              b5's week)
  b7  1.5.0   succeeded  03-28 10:00  lead 4 h = 14400 (after the WEEK range's end)
team U, service C:
  c1  1.0.0   succeeded  03-18 10:00  lead 10 h = 36000
  c2  1.1.0   failed     03-19 10:00, never recovered
Every release's staging deployment completes 30 minutes after the release was created.

Weeks start on Monday: 03-03, 03-10, 03-17, 03-24.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from relman.v1 import deploy_pb2
from shared.persistence.db import libpq_dsn
from shared.persistence.models import Role
from tests.deploying import DEV, Client, S, run_all_stages
from tests.harness import error_details, fails, owner_url, runtime_url

DAY = deploy_pb2.DORA_INTERVAL_DAY
WEEK = deploy_pb2.DORA_INTERVAL_WEEK
MONTH = deploy_pb2.DORA_INTERVAL_MONTH
ALL = deploy_pb2.DORA_INTERVAL_ALL


def at(when: str, year: int = 2025) -> datetime:
    """'03-05 10:00' -> 2025-03-05T10:00Z."""
    return datetime.strptime(f"{year}-{when}", "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(moment)
    return result


# label: (version, hotfix, outcome, release created_at, completed_at); in the order they
# run through the API, per service.
A = {
    "a0": ("0.9.0", False, "succeeded", "03-04 08:00", "03-04 10:00"),
    "a1": ("1.0.0", False, "succeeded", "03-05 08:00", "03-05 10:00"),
    "a2": ("1.1.0", False, "rolled_back", "03-06 06:00", "03-06 10:00"),
    "a3": ("1.2.0", False, "failed", "03-07 06:00", "03-07 09:00"),
    "a4": ("1.2.1", True, "succeeded", "03-07 10:00", "03-07 13:00"),
    "a5": ("1.3.0", False, "failed", "03-20 06:00", "03-20 10:00"),
    "rejected": ("1.4.0", False, "rejected", "03-12 09:00", "03-12 10:00"),
}
B = {
    "b0": ("0.9.0", False, "failed", "03-05 06:00", "03-05 12:00"),
    "b1": ("1.0.0", False, "succeeded", "03-05 15:00", "03-06 15:00"),
    "b2": ("1.1.0", False, "succeeded", "03-17 09:00", "03-17 10:00"),
    "b3": ("1.2.0", False, "rolled_back", "03-18 09:00", "03-19 10:00"),
    "b4": ("1.3.1", True, "succeeded", "03-21 08:00", "03-21 10:00"),
    "b5": ("1.4.0", False, "failed", "03-23 12:00", "03-23 20:00"),
    "b6": ("1.4.1", False, "succeeded", "03-23 21:00", "03-24 02:00"),
    "b7": ("1.5.0", False, "succeeded", "03-28 06:00", "03-28 10:00"),
}
C = {
    "c1": ("1.0.0", False, "succeeded", "03-18 00:00", "03-18 10:00"),
    "c2": ("1.1.0", False, "failed", "03-19 00:00", "03-19 10:00"),
}
# The rolled-back deployment: (when it was rolled back, when its redeployment succeeded).
ROLLBACKS = {"a2": ("03-06 12:00", "03-06 12:30"), "b3": ("03-19 11:00", "03-19 11:20")}
CANCELLED_AT = "03-19 15:00"  # A's 1.4.0 again, in production, cancelled


@dataclass
class History:
    team: str  # T's name
    other_team: str  # U's name
    team_id: str = ""
    service_a: str = ""  # A's id
    service_a_name: str = ""
    production: str = ""  # P's name
    production_id: str = ""
    staging: str = ""  # G's name
    staging_id: str = ""
    deployments: dict[str, str] = field(default_factory=dict)  # label -> id in P
    releases: dict[str, str] = field(default_factory=dict)  # label -> release id
    rollbacks: dict[str, str] = field(default_factory=dict)  # rolled-back label -> id


async def ship(clients, history: History, service_id: str, label: str, plan) -> None:
    """A release through development, staging and production, ending as `plan` says."""
    lead, reviewer = clients["lead"], clients["reviewer"]
    version, hotfix, outcome, _, _ = plan
    release = await lead.CreateRelease(service_id=service_id, version=version, hotfix=hotfix)
    history.releases[label] = release.id
    for environment, stages in ((DEV, ["deploy"]), (history.staging_id, [])):
        earlier = await lead.CreateDeployment(
            release_id=release.id, environment_id=environment, stage_names=stages
        )
        await run_all_stages(lead, earlier)
    deployment = await lead.CreateDeployment(
        release_id=release.id, environment_id=history.production_id
    )
    history.deployments[label] = deployment.id
    if outcome == "rejected":
        await reviewer.RejectDeployment(deployment_id=deployment.id, notes="not this one")
        again = await lead.CreateDeployment(
            release_id=release.id, environment_id=history.production_id
        )
        history.deployments["cancelled"] = again.id
        await lead.CancelDeployment(deployment_id=again.id, reason="not now")
        return
    await reviewer.ApproveDeployment(deployment_id=deployment.id)
    if outcome == "failed":
        first = deployment.stages[0]
        await lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
        await lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_FAILED)
        return
    await run_all_stages(lead, deployment)
    if outcome == "rolled_back":
        rollback = await lead.RollbackDeployment(deployment_id=deployment.id, reason="errors")
        history.rollbacks[label] = rollback.id
        history.deployments[f"{label} redeployment"] = rollback.redeployment_id
        redeployment = await lead.GetDeployment(
            deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        await run_all_stages(lead, redeployment)


@pytest.fixture(scope="module")
async def history(clients, db_url) -> History:
    """The module docstring's history: made through the API, then its times moved."""
    admin, lead = clients["admin"], clients["lead"]
    suffix = uuid.uuid4().hex[:8]
    history = History(team=f"dora-t-{suffix}", other_team=f"dora-u-{suffix}")
    team = await admin.CreateTeam(name=history.team)
    other_team = await admin.CreateTeam(name=history.other_team)
    history.team_id = team.id
    services = {}
    for name, team_id in (("a", team.id), ("b", team.id), ("c", other_team.id)):
        service = await lead.CreateService(name=f"dora-{name}-{suffix}", team_id=team_id)
        services[name] = service.id
    history.service_a, history.service_a_name = services["a"], f"dora-a-{suffix}"
    history.production = f"dora-prod-{suffix}"
    history.staging = f"dora-staging-{suffix}"
    production = await admin.CreateEnvironment(
        name=history.production, environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    staging = await admin.CreateEnvironment(
        name=history.staging, environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    history.production_id, history.staging_id = production.id, staging.id

    async def service_history(service_id: str, plans: dict) -> None:
        for label, plan in plans.items():
            await ship(clients, history, service_id, label, plan)

    await asyncio.gather(
        service_history(services["a"], A),
        service_history(services["b"], B),
        service_history(services["c"], C),
    )

    plans = A | B | C
    redeployments = {f"{label} redeployment": "succeeded" for label in ROLLBACKS}
    ended = {label: plan[2] for label, plan in plans.items()} | redeployments
    ended["cancelled"] = "cancelled"
    for label, status in ended.items():
        deployment = await lead.GetDeployment(deployment_id=history.deployments[label])
        assert S.DeploymentStatus.Name(deployment.status) == f"DEPLOYMENT_STATUS_{status.upper()}"

    completed = {label: at(plan[4]) for label, plan in plans.items()}
    completed["cancelled"] = at(CANCELLED_AT)
    for label, (_, recovered_at) in ROLLBACKS.items():
        completed[f"{label} redeployment"] = at(recovered_at)
    connection = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    try:
        async with connection.transaction():
            await connection.executemany(
                "UPDATE releases SET created_at = $2 WHERE id = $1",
                [
                    (uuid.UUID(history.releases[label]), at(plan[3]))
                    for label, plan in plans.items()
                ],
            )
            await connection.executemany(
                "UPDATE deployments SET completed_at = $2 WHERE id = $1",
                [(uuid.UUID(history.deployments[label]), t) for label, t in completed.items()],
            )
            await connection.executemany(
                "UPDATE rollbacks SET created_at = $2 WHERE id = $1",
                [
                    (uuid.UUID(history.rollbacks[label]), at(rolled_back_at))
                    for label, (rolled_back_at, _) in ROLLBACKS.items()
                ],
            )
            await connection.execute(
                "UPDATE deployments d SET completed_at = r.created_at + interval '30 minutes'"
                " FROM releases r WHERE r.id = d.release_id AND d.environment_id = $1",
                uuid.UUID(staging.id),
            )
    finally:
        await connection.close()
    return history


def bucket(
    start: str,
    end: str,
    deployments: int = 0,
    frequency: float = 0.0,
    lead_time: float = 0.0,
    failed: int = 0,
    failure_rate: float = 0.0,
    recovery_time: float = 0.0,
    rework: int = 0,
    rework_rate: float = 0.0,
) -> dict:
    """An expected bucket; every figure left out is 0."""
    return {
        "start_time": at(start),
        "end_time": at(end),
        "deployments": deployments,
        "deployment_frequency_per_day": pytest.approx(frequency),
        "lead_time_for_changes_seconds": pytest.approx(lead_time),
        "failed_deployments": failed,
        "change_failure_rate": pytest.approx(failure_rate),
        "failed_deployment_recovery_time_seconds": pytest.approx(recovery_time),
        "rework_deployments": rework,
        "deployment_rework_rate": pytest.approx(rework_rate),
    }


def figures(found: deploy_pb2.DoraBucket) -> dict:
    return {
        "start_time": found.start_time.ToDatetime(tzinfo=UTC),
        "end_time": found.end_time.ToDatetime(tzinfo=UTC),
        "deployments": found.deployments,
        "deployment_frequency_per_day": found.deployment_frequency_per_day,
        "lead_time_for_changes_seconds": found.lead_time_for_changes_seconds,
        "failed_deployments": found.failed_deployments,
        "change_failure_rate": found.change_failure_rate,
        "failed_deployment_recovery_time_seconds": found.failed_deployment_recovery_time_seconds,
        "rework_deployments": found.rework_deployments,
        "deployment_rework_rate": found.deployment_rework_rate,
    }


async def dora(client: Client, interval, start: str, end: str, **filters) -> list[dict]:
    response = await client.GetDoraMetrics(
        interval=interval, start_time=stamp(at(start)), end_time=stamp(at(end)), **filters
    )
    return [figures(found) for found in response.buckets]


# Team T in production by week, from Wednesday 03-05 to Thursday 03-27: the first and last
# weeks cut to the range (a0 before it and b7 after it left out).
TEAM_T_WEEKS = [
    bucket(
        "03-05 00:00",
        "03-10 00:00",  # 5 days
        deployments=4,  # a1, r1, a4, b1
        frequency=0.8,  # 4 / 5
        lead_time=10800,  # median of a1 7200, a4 10800, b1 86400 (r1 is a rollback's)
        failed=3,  # a2 (rolled back), a3, b0
        failure_rate=3 / 7,  # 3 / (4 + 3)
        recovery_time=14400,  # median of a2 1800, a3 14400, b0 97200
        rework=2,  # r1 (a rollback's redeployment), a4 (a hotfix)
        rework_rate=0.5,  # 2 / 4
    ),
    # Nothing but the rejected 1.4.0 ended in this week: every figure 0.
    bucket("03-10 00:00", "03-17 00:00"),
    bucket(
        "03-17 00:00",
        "03-24 00:00",  # a whole week
        deployments=3,  # b2, r2, b4 (the cancelled 1.4.0 left out)
        frequency=3 / 7,
        lead_time=5400,  # (b2 3600 + b4 7200) / 2, an even count (r2 is a rollback's)
        failed=3,  # b3 (rolled back), a5, b5
        failure_rate=0.5,  # 3 / (3 + 3)
        recovery_time=11400,  # (b3 1200 + b5 21600) / 2; a5 never recovered: left out
        rework=2,  # r2, b4 (a hotfix)
        rework_rate=2 / 3,
    ),
    bucket(
        "03-24 00:00",
        "03-27 00:00",  # 3 days
        deployments=1,  # b6
        frequency=1 / 3,
        lead_time=18000,
        # b5's recovery (ended by b6) counts in b5's week, not here.
    ),
]


async def test_weeks_of_a_team_in_production(clients, history):
    """Without environment_id only production counts: G's deployments of the same team,
    in the same weeks, are not among these."""
    viewer = clients["viewer"]
    by_name = await dora(
        viewer, WEEK, "03-05 00:00", "03-27 00:00", team_id=f"teams/{history.team}"
    )
    assert by_name == TEAM_T_WEEKS
    by_id = await dora(viewer, WEEK, "03-05 00:00", "03-27 00:00", team_id=history.team_id)
    assert by_id == by_name


async def test_one_environment_holds_every_team(clients, history):
    """P by name, without a team: team U's C counts too (in the third week)."""
    found = await dora(
        clients["viewer"],
        WEEK,
        "03-05 00:00",
        "03-27 00:00",
        environment_id=f"environments/{history.production}",
    )
    assert found == [
        TEAM_T_WEEKS[0],
        TEAM_T_WEEKS[1],
        bucket(
            "03-17 00:00",
            "03-24 00:00",
            deployments=4,  # b2, r2, b4, c1
            frequency=4 / 7,
            lead_time=7200,  # median of b2 3600, b4 7200, c1 36000
            failed=4,  # b3, a5, b5, c2
            failure_rate=0.5,  # 4 / (4 + 4)
            recovery_time=11400,  # (b3 1200 + b5 21600) / 2; a5 and c2 never recovered
            rework=2,  # r2, b4
            rework_rate=0.5,  # 2 / 4
        ),
        TEAM_T_WEEKS[3],
    ]
    by_id = await dora(
        clients["viewer"], WEEK, "03-05 00:00", "03-27 00:00", environment_id=history.production_id
    )
    assert by_id == found


async def test_one_service(clients, history):
    found = await dora(
        clients["viewer"],
        WEEK,
        "03-05 00:00",
        "03-27 00:00",
        service_id=history.service_a,
        environment_id=history.production_id,
    )
    assert found == [
        bucket(
            "03-05 00:00",
            "03-10 00:00",
            deployments=3,  # a1, r1, a4
            frequency=0.6,  # 3 / 5
            lead_time=9000,  # (a1 7200 + a4 10800) / 2
            failed=2,  # a2, a3
            failure_rate=0.4,  # 2 / (3 + 2)
            recovery_time=8100,  # (a2 1800 + a3 14400) / 2
            rework=2,  # r1, a4
            rework_rate=2 / 3,
        ),
        bucket("03-10 00:00", "03-17 00:00"),  # the rejected one left out
        # Only a5, which failed and never recovered (the cancelled one left out): a rate of
        # 1 / (0 + 1), no recovery time, no rework rate without deployments.
        bucket("03-17 00:00", "03-24 00:00", failed=1, failure_rate=1.0),
        bucket("03-24 00:00", "03-27 00:00"),
    ]
    by_name = await dora(
        clients["viewer"],
        WEEK,
        "03-05 00:00",
        "03-27 00:00",
        service_id=f"services/{history.service_a_name}",
        environment_id=history.production_id,
    )
    assert by_name == found


async def test_months_of_a_team_in_production(clients, history):
    """February and April cut to the range, March whole (a0 and b7 are in it)."""
    found = await dora(
        clients["viewer"], MONTH, "02-15 00:00", "04-10 00:00", team_id=f"teams/{history.team}"
    )
    assert found == [
        bucket("02-15 00:00", "03-01 00:00"),
        bucket(
            "03-01 00:00",
            "04-01 00:00",
            deployments=10,  # a0, a1, r1, a4, b1, b2, r2, b4, b6, b7
            frequency=10 / 31,
            # 3600 7200 7200 7200 | 10800 14400 18000 86400 (b2, a0, a1, b4 | a4, b7, b6,
            # b1): (7200 + 10800) / 2
            lead_time=9000,
            failed=6,  # a2, a3, a5, b0, b3, b5
            failure_rate=0.375,  # 6 / (10 + 6)
            recovery_time=14400,  # 1200 1800 [14400] 21600 97200 (b3, a2, a3, b5, b0)
            rework=4,  # r1, a4, r2, b4
            rework_rate=0.4,  # 4 / 10
        ),
        bucket("04-01 00:00", "04-10 00:00"),
    ]


async def test_the_whole_range_in_one_bucket(clients, history):
    found = await dora(
        clients["viewer"],
        ALL,
        "03-05 00:00",
        "03-27 00:00",
        team_id=history.team_id,
        environment_id=history.production_id,
    )
    assert found == [
        bucket(
            "03-05 00:00",
            "03-27 00:00",  # 22 days
            deployments=8,  # a1, r1, a4, b1, b2, r2, b4, b6
            frequency=8 / 22,
            # 3600 7200 7200 | 10800 18000 86400 (b2, a1, b4 | a4, b6, b1)
            lead_time=9000,  # (7200 + 10800) / 2
            failed=6,  # a2, a3, a5, b0, b3, b5
            failure_rate=6 / 14,  # 6 / (8 + 6)
            recovery_time=14400,  # 1200 1800 [14400] 21600 97200
            rework=4,  # r1, a4, r2, b4
            rework_rate=0.5,  # 4 / 8
        )
    ]
    other_team = await dora(
        clients["viewer"], ALL, "03-01 00:00", "04-01 00:00", team_id=f"teams/{history.other_team}"
    )
    assert other_team == [
        bucket(
            "03-01 00:00",
            "04-01 00:00",
            deployments=1,  # c1
            frequency=1 / 31,
            lead_time=36000,
            failed=1,  # c2, never recovered
            failure_rate=0.5,  # 1 / (1 + 1)
        )
    ]


async def test_days(clients, history):
    """The first day cut at 06:00 (18 hours: 0.75 of a day)."""
    found = await dora(
        clients["viewer"], DAY, "03-06 06:00", "03-08 00:00", team_id=history.team_id
    )
    assert found == [
        bucket(
            "03-06 06:00",
            "03-07 00:00",
            deployments=2,  # r1, b1
            frequency=2 / 0.75,
            lead_time=86400,  # b1 alone (r1 is a rollback's)
            failed=1,  # a2, rolled back at 12:00
            failure_rate=1 / 3,  # 1 / (2 + 1)
            recovery_time=1800,  # 12:00 (the rollback, not a2's 10:00) to r1's 12:30
            rework=1,  # r1
            rework_rate=0.5,  # 1 / 2
        ),
        bucket(
            "03-07 00:00",
            "03-08 00:00",
            deployments=1,  # a4
            frequency=1.0,
            lead_time=10800,
            failed=1,  # a3
            failure_rate=0.5,  # 1 / (1 + 1)
            recovery_time=14400,  # a3 09:00 to a4 13:00
            rework=1,  # a4, a hotfix
            rework_rate=1.0,
        ),
    ]


async def test_staging_counts_only_when_asked_for(clients, history):
    """G holds 15 deployments of team T in March, none in the production figures above."""
    found = await dora(
        clients["viewer"],
        ALL,
        "03-01 00:00",
        "04-01 00:00",
        team_id=history.team_id,
        environment_id=f"environments/{history.staging}",
    )
    assert found == [
        bucket(
            "03-01 00:00",
            "04-01 00:00",
            deployments=15,  # A's 7 releases and B's 8, once each
            frequency=15 / 31,
            lead_time=1800,  # each 30 minutes after its release
            rework=2,  # A's 1.2.1 and B's 1.3.1, hotfixes
            rework_rate=2 / 15,
        )
    ]


async def test_the_range_defaults_to_the_last_30_days(clients, history):
    response = await clients["viewer"].GetDoraMetrics(interval=ALL, team_id=history.team_id)
    [only] = response.buckets
    start, end = only.start_time.ToDatetime(tzinfo=UTC), only.end_time.ToDatetime(tzinfo=UTC)
    assert end - start == timedelta(days=30)
    assert abs(end - datetime.now(UTC)) < timedelta(minutes=5)
    assert only.deployments == only.failed_deployments == 0  # the history is in 2025


async def test_a_range_of_at_most_1000_buckets(clients):
    """Counted as the buckets returned, a cut first or last one included."""
    viewer = clients["viewer"]
    start = datetime(2025, 1, 6, tzinfo=UTC)  # a Monday
    cases = [
        (DAY, start, start + timedelta(days=1000)),
        (DAY, start + timedelta(hours=12), start + timedelta(days=999, hours=12)),
        (WEEK, start, start + timedelta(weeks=1000)),
        (WEEK, start + timedelta(days=3), start + timedelta(weeks=999, days=3)),
        (MONTH, datetime(2000, 1, 1, tzinfo=UTC), datetime(2083, 5, 1, tzinfo=UTC)),
    ]
    for interval, begin, end in cases:
        response = await viewer.GetDoraMetrics(
            interval=interval, start_time=stamp(begin), end_time=stamp(end)
        )
        assert len(response.buckets) == 1000, (interval, begin, end)
    too_many = [
        (DAY, start, start + timedelta(days=1001)),
        # 1000 days, but from noon: a half day at each end, 1001 buckets.
        (DAY, start + timedelta(hours=12), start + timedelta(days=1000, hours=12)),
        (WEEK, start, start + timedelta(weeks=1001)),
        (WEEK, start + timedelta(days=3), start + timedelta(weeks=1000, days=3)),
        (MONTH, datetime(2000, 1, 1, tzinfo=UTC), datetime(2083, 5, 2, tzinfo=UTC)),
    ]
    for interval, begin, end in too_many:
        error = await fails(
            viewer.GetDoraMetrics(interval=interval, start_time=stamp(begin), end_time=stamp(end)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["interval"], (interval, begin, end)


async def test_refused_requests(clients, deploy_channel, tokens):
    viewer = clients["viewer"]
    march = {"start_time": stamp(at("03-01 00:00")), "end_time": stamp(at("04-01 00:00"))}
    error = await fails(viewer.GetDoraMetrics(**march), grpc.StatusCode.INVALID_ARGUMENT)
    assert [v.field for v in error_details(error)[1]] == ["interval"]
    for end in ("03-01 00:00", "02-28 00:00"):
        error = await fails(
            viewer.GetDoraMetrics(
                interval=WEEK, start_time=march["start_time"], end_time=stamp(at(end))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["start_time"]
    service = Client(deploy_channel, tokens[Role.SERVICE])
    await fails(service.GetDoraMetrics(interval=WEEK, **march), grpc.StatusCode.PERMISSION_DENIED)


async def test_a_later_rollback_reaches_back_into_earlier_buckets(clients, db_url):
    """A success that recovered a failure is rolled back weeks later: it now counts as
    failed in its own day, and the failure it recovered waits for the rollback's
    redeployment instead. The figures are kept as deployments change, not only as they
    end (team V's service E in production environment Q of its own; April 2025)."""
    admin, lead = clients["admin"], clients["lead"]
    suffix = uuid.uuid4().hex[:8]
    team = await admin.CreateTeam(name=f"dora-v-{suffix}")
    service = await lead.CreateService(name=f"dora-e-{suffix}", team_id=team.id)
    staging = await admin.CreateEnvironment(
        name=f"dora-staging-e-{suffix}", environment_type=S.ENVIRONMENT_TYPE_STAGING
    )
    production = await admin.CreateEnvironment(
        name=f"dora-prod-e-{suffix}", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    history = History(team=team.name, other_team="", production_id=production.id)
    history.staging_id = staging.id
    plans = {
        "e0": ("1.0.0", False, "succeeded", "04-01 08:00", "04-01 10:00"),
        "e1": ("1.1.0", False, "failed", "04-02 08:00", "04-02 10:00"),
        "e2": ("1.1.1", False, "succeeded", "04-02 20:00", "04-03 10:00"),
    }
    for label, plan in plans.items():
        await ship(clients, history, service.id, label, plan)
    owner = await asyncpg.connect(libpq_dsn(owner_url(db_url)))

    async def move(table: str, column: str, moves: dict[str, str]) -> None:
        await owner.executemany(
            f"UPDATE {table} SET {column} = $2 WHERE id = $1",
            [(uuid.UUID(row_id), at(when)) for row_id, when in moves.items()],
        )

    april = {"start_time": stamp(at("04-01 00:00")), "end_time": stamp(at("05-01 00:00"))}
    viewer = clients["viewer"]
    try:
        async with owner.transaction():
            await move(
                "releases", "created_at", {history.releases[k]: p[3] for k, p in plans.items()}
            )
            await move(
                "deployments",
                "completed_at",
                {history.deployments[k]: p[4] for k, p in plans.items()},
            )
        [before] = (
            await viewer.GetDoraMetrics(interval=ALL, environment_id=production.id, **april)
        ).buckets
        assert figures(before) == bucket(
            "04-01 00:00",
            "05-01 00:00",
            deployments=2,  # e0, e2
            frequency=2 / 30,
            lead_time=(7200 + 50400) / 2,  # e0 2 h, e2 14 h
            failed=1,  # e1
            failure_rate=1 / 3,
            recovery_time=86400,  # e1 04-02 10:00 to e2 04-03 10:00
        )

        rollback = await lead.RollbackDeployment(
            deployment_id=history.deployments["e2"], reason="errors, weeks later"
        )
        redeployment = await lead.GetDeployment(
            deployment_id=rollback.redeployment_id, view=S.DEPLOYMENT_VIEW_WITH_STAGES
        )
        await run_all_stages(lead, redeployment)
        async with owner.transaction():
            await move("rollbacks", "created_at", {rollback.id: "04-05 10:00"})
            await move("deployments", "completed_at", {redeployment.id: "04-05 11:00"})
    finally:
        await owner.close()
    [after] = (
        await viewer.GetDoraMetrics(interval=ALL, environment_id=production.id, **april)
    ).buckets
    assert figures(after) == bucket(
        "04-01 00:00",
        "05-01 00:00",
        deployments=2,  # e0, the redeployment (of 1.0.0)
        frequency=2 / 30,
        lead_time=7200,  # e0 alone: the redeployment is a rollback's
        failed=2,  # e1, e2 (rolled back)
        failure_rate=0.5,
        # e2: rolled back 04-05 10:00, redeployed 11:00 (3600); e1: 04-02 10:00 to the
        # redeployment, e2 no longer a success (73 h = 262800): (3600 + 262800) / 2
        recovery_time=133200,
        rework=1,  # the redeployment
        rework_rate=0.5,
    )
    days = await viewer.GetDoraMetrics(
        interval=DAY,
        environment_id=production.id,
        start_time=stamp(at("04-03 00:00")),
        end_time=stamp(at("04-04 00:00")),
    )
    assert [figures(day) for day in days.buckets] == [
        bucket("04-03 00:00", "04-04 00:00", failed=1, failure_rate=1.0, recovery_time=3600)
    ]


async def test_the_facts_are_the_deployments_own(clients, history, db_url):
    """deployment_outcomes holds exactly what its view derives from the deployments as they
    are now (every deployment of every test so far); the services' role may read it, and
    cannot write it."""
    connection = await asyncpg.connect(libpq_dsn(runtime_url(db_url)))
    try:
        for first, second in (
            ("deployment_outcomes", "deployment_outcomes_derived"),
            ("deployment_outcomes_derived", "deployment_outcomes"),
        ):
            differ = await connection.fetch(f"TABLE {first} EXCEPT ALL TABLE {second}")
            assert differ == [], (first, differ)
        assert await connection.fetchval("SELECT count(*) FROM deployment_outcomes") >= 30
        one = await connection.fetchval(
            "SELECT deployment_id FROM deployment_outcomes WHERE deployment_id = $1",
            uuid.UUID(history.deployments["a3"]),
        )
        assert one is not None
        for attack in (
            "UPDATE deployment_outcomes SET recovery_s = 1 WHERE deployment_id = $1",
            "DELETE FROM deployment_outcomes WHERE deployment_id = $1",
            "SELECT relman_refresh_outcomes(ARRAY[$1::uuid])",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(attack, one)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(
                "INSERT INTO deployment_outcomes SELECT * FROM deployment_outcomes_derived LIMIT 0"
            )
    finally:
        await connection.close()


async def test_a_repeatable_read_or_serializable_change_is_refused(clients, history, db_url):
    """Its snapshot predates the lock the facts are kept under: a commit it waited for
    would be missed (a failure left unrecovered; PostgreSQL's serializable checks do not
    see the services' READ COMMITTED writers), so the change is refused whole."""
    owner = await asyncpg.connect(libpq_dsn(owner_url(db_url)))
    deployment_id = uuid.UUID(history.deployments["b7"])
    try:
        before = await owner.fetchval(
            "SELECT completed_at FROM deployments WHERE id = $1", deployment_id
        )
        for isolation in ("repeatable_read", "serializable"):
            with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="READ COMMITTED"):
                async with owner.transaction(isolation=isolation):
                    await owner.execute(
                        "UPDATE deployments SET completed_at = completed_at + interval '1 hour'"
                        " WHERE id = $1",
                        deployment_id,
                    )
        after = await owner.fetchval(
            "SELECT completed_at FROM deployments WHERE id = $1", deployment_id
        )
        assert after == before
    finally:
        await owner.close()
