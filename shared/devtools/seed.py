"""The sample data set: `python -m shared.devtools.seed [--reset]` (also `make seed`).

Dev tools, never imported by a service. Fixed volumes and names, which the tests
check: 3 teams, 8 users, 5 services, 3 environments, 10 releases, 8 deployments,
5 approvals, 20 audit logs, 2 rollbacks, 3 runbooks, 8 metrics, and 25 pipeline
stages (the five standard ones of five deployments, two of them staging runs: no
release reaches production without a staging deployment whose five stages
succeeded). The data tells one consistent story that obeys relman's deployment
rules (promotion order, one active deployment per service and environment, votes
by leads or admins other than the deployer, rollbacks to the newest earlier
succeeded release):

- auth-service 1.4.0 went development -> staging -> production (approved by
  two leads/admin other than the deployer) and is `completed`;
- auth-service 1.5.0 reached production twice and was rolled back to 1.4.0
  both times (an incident, then a failed smoke test): `rolled_back`;
- payment-api 2.3.0 is being deployed to development right now: `in_progress`;
- the seven other releases were never deployed: `draft`.

Ids are UUIDv5 of stable names, so the README and tests can name seeded rows,
and timestamps lie within the last 30 days, relative to when the seed runs.
A second run adds nothing. `--reset` drops the schema, migrates and reseeds
(audit rows are append-only, so dropping the schema is the only way back).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import bcrypt
from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.identity.users import BCRYPT_COST
from shared.persistence import audit_log, schema
from shared.persistence.db import Database, database_url, describe, migration_database_url
from shared.persistence.models import (
    STANDARD_STAGES,
    Approval,
    ApprovalStatus,
    AuditLog,
    Base,
    Deployment,
    DeploymentMetric,
    DeploymentStatus,
    Environment,
    EnvironmentType,
    PipelineStage,
    Release,
    ReleaseStatus,
    Role,
    Rollback,
    RollbackStatus,
    Runbook,
    Service,
    StageStatus,
    Team,
    User,
)

SEED_PASSWORD = "password123"
SEED_NAMESPACE = uuid.UUID("6f1c1a52-8e0b-4d1e-9a55-7a3c3f0e2b10")
# Serializes concurrent seeders (two `make run`s on one database).
SEED_LOCK_KEY = 0x7265_6C6D_616E  # "relman"


def seed_id(kind: str, name: str) -> uuid.UUID:
    """The stable id of a seeded row, e.g. seed_id("user", "admin")."""
    return uuid.uuid5(SEED_NAMESPACE, f"{kind}:{name}")


@dataclass(frozen=True)
class SeedUser:
    username: str
    full_name: str
    role: Role
    team: str


# fmt: off
# The data set is laid out as tables, one row a line.
USERS = (
    SeedUser("admin", "Avery Admin", Role.ADMIN, "Platform"),
    SeedUser("lena", "Lena Fischer", Role.LEAD, "Platform"),
    SeedUser("marco", "Marco Rossi", Role.LEAD, "Backend"),
    SeedUser("priya", "Priya Nair", Role.DEVELOPER, "Platform"),
    SeedUser("tom", "Tom Becker", Role.DEVELOPER, "Backend"),
    SeedUser("sofia", "Sofia Alves", Role.DEVELOPER, "Frontend"),
    SeedUser("victor", "Victor Chen", Role.VIEWER, "Backend"),
    SeedUser("wendy", "Wendy Park", Role.VIEWER, "Frontend"),
)

TEAMS = (
    ("Platform", "Identity, edge and shared infrastructure.", "#team-platform"),
    ("Backend", "Payments and notifications.", "#team-backend"),
    ("Frontend", "The customer-facing dashboard.", "#team-frontend"),
)

ENVIRONMENTS = (
    ("development", EnvironmentType.DEVELOPMENT, "Shared development cluster.", "k8s/dev"),
    ("staging", EnvironmentType.STAGING, "Production-like pre-release cluster.", "k8s/staging"),
    ("production", EnvironmentType.PRODUCTION, "Customer traffic. Approvals required.", "k8s/prod"),
)

# name, team, owner, description
SERVICES = (
    ("auth-service", "Platform", "lena", "Login, sessions and token issuance."),
    ("api-gateway", "Platform", "tom", "Public edge: routing, rate limits, TLS."),
    ("payment-api", "Backend", "marco", "Card payments and refunds."),
    ("notification-service", "Backend", "priya", "E-mail, SMS and push delivery."),
    ("user-dashboard", "Frontend", "sofia", "The customer web dashboard."),
)

# key, service, version, status, author, day created (0 = 30 days ago), notes
RELEASES = (
    ("A1", "auth-service", "1.4.0", ReleaseStatus.COMPLETED, "priya", 2.0,
     "Refresh-token rotation; faster JWKS cache."),
    ("A2", "auth-service", "1.5.0", ReleaseStatus.ROLLED_BACK, "priya", 10.0,
     "Session store moved to the shared cache cluster."),
    ("A3", "auth-service", "1.6.0", ReleaseStatus.DRAFT, "tom", 27.0,
     "Session store migration, second attempt, behind a flag."),
    ("P1", "payment-api", "2.3.0", ReleaseStatus.IN_PROGRESS, "tom", 25.0,
     "Idempotency keys on refunds."),
    ("P2", "payment-api", "2.4.0", ReleaseStatus.DRAFT, "tom", 28.0,
     "3-D Secure 2.2 challenge flow."),
    ("U1", "user-dashboard", "3.0.0", ReleaseStatus.DRAFT, "sofia", 5.0,
     "New navigation and dark mode."),
    ("U2", "user-dashboard", "3.1.0", ReleaseStatus.DRAFT, "sofia", 20.0,
     "Invoice downloads as PDF."),
    ("G1", "api-gateway", "0.9.0", ReleaseStatus.DRAFT, "tom", 8.0,
     "Per-tenant rate limits."),
    ("G2", "api-gateway", "1.0.0", ReleaseStatus.DRAFT, "tom", 22.0,
     "HTTP/3 on the public listener."),
    ("N1", "notification-service", "1.2.0", ReleaseStatus.DRAFT, "priya", 15.0,
     "SMS fallback when push fails."),
)


@dataclass(frozen=True)
class SeedDeployment:
    key: str
    release: str
    environment: str
    status: DeploymentStatus
    deployer: str
    created: float  # day offset from 30 days ago
    deployed_after_min: float | None  # minutes from creation to first stage start
    completed_after_min: float | None  # minutes from creation to completion


DEPLOYMENTS = (
    SeedDeployment("D1", "A1", "development", DeploymentStatus.SUCCEEDED, "priya", 3.4, 2, 20),
    SeedDeployment("D2", "A1", "staging", DeploymentStatus.SUCCEEDED, "priya", 4.4, 2, 24),
    SeedDeployment("D3", "A1", "production", DeploymentStatus.SUCCEEDED, "lena", 6.6, 60, 85),
    SeedDeployment("D4", "A2", "development", DeploymentStatus.SUCCEEDED, "priya", 11.4, 2, 19),
    SeedDeployment("D5", "A2", "staging", DeploymentStatus.SUCCEEDED, "priya", 12.4, 3, 26),
    SeedDeployment("D6", "A2", "production", DeploymentStatus.ROLLED_BACK, "lena", 14.4, 30, 55),
    SeedDeployment("D7", "A2", "production", DeploymentStatus.ROLLED_BACK, "lena", 17.45, 30, 55),
    # In progress right now: created two hours before the seed ran (day 30 is "now").
    SeedDeployment("D8", "P1", "development", DeploymentStatus.IN_PROGRESS, "tom", 30 - 2 / 24, 5,
                   None),
)

# deployment, approver, status, minutes after the deployment was created, notes
APPROVALS = (
    ("D3", "marco", ApprovalStatus.APPROVED, 30, "Change reviewed; canary plan looks good."),
    ("D3", "admin", ApprovalStatus.APPROVED, 40, "Approved for the Tuesday window."),
    ("D6", "marco", ApprovalStatus.APPROVED, 20, "Cache cluster capacity confirmed."),
    ("D6", "admin", ApprovalStatus.PENDING, None, None),  # requested, not needed in the end
    ("D7", "admin", ApprovalStatus.APPROVED, 15, "Config fix verified in staging."),
)

# Stage runs: deployment -> (status, minutes from deployment start to start, duration, output)
STAGE_RUNS = {
    "D2": (
        (StageStatus.SUCCEEDED, 0, 5, "built image auth-service:1.4.0 (sha256:4be1...)"),
        (StageStatus.SUCCEEDED, 5, 6, "412 passed, 0 failed"),
        (StageStatus.SUCCEEDED, 11, 4, "0 critical, 0 high, 2 low findings"),
        (StageStatus.SUCCEEDED, 15, 4, "rolled out 2/2 pods"),
        (StageStatus.SUCCEEDED, 19, 2, "GET /healthz 200 in 38 ms; login flow ok"),
    ),
    "D5": (
        (StageStatus.SUCCEEDED, 0, 5, "built image auth-service:1.5.0 (sha256:9c07...)"),
        (StageStatus.SUCCEEDED, 5, 7, "431 passed, 0 failed"),
        (StageStatus.SUCCEEDED, 12, 4, "0 critical, 0 high, 1 low finding"),
        (StageStatus.SUCCEEDED, 16, 4, "rolled out 2/2 pods"),
        (StageStatus.SUCCEEDED, 20, 3, "GET /healthz 200 in 45 ms; login flow ok"),
    ),
    "D3": (
        (StageStatus.SUCCEEDED, 0, 6, "built image auth-service:1.4.0 (sha256:4be1...)"),
        (StageStatus.SUCCEEDED, 6, 7, "412 passed, 0 failed"),
        (StageStatus.SUCCEEDED, 13, 4, "0 critical, 0 high, 2 low findings"),
        (StageStatus.SUCCEEDED, 17, 5, "rolled out 6/6 pods"),
        (StageStatus.SUCCEEDED, 22, 3, "GET /healthz 200 in 41 ms; login flow ok"),
    ),
    "D7": (
        (StageStatus.SUCCEEDED, 0, 6, "built image auth-service:1.5.0 (sha256:9c07...)"),
        (StageStatus.SUCCEEDED, 6, 8, "431 passed, 0 failed"),
        (StageStatus.SUCCEEDED, 14, 4, "0 critical, 0 high, 1 low finding"),
        (StageStatus.SUCCEEDED, 18, 5, "rolled out 6/6 pods"),
        (StageStatus.FAILED, 23, 2, "login flow: 503 from session store after 3 retries"),
    ),
    "D8": (
        (StageStatus.SUCCEEDED, 0, 7, "built image payment-api:2.3.0 (sha256:1d3a...)"),
        (StageStatus.RUNNING, 7, None, None),
        (StageStatus.PENDING, None, None, None),
        (StageStatus.PENDING, None, None, None),
        (StageStatus.PENDING, None, None, None),
    ),
}

# The running stage of the in-progress deployment may take a week: the stage-timeout
# sweeper of deploy_svc would otherwise fail it half an hour after seeding.
STAGE_TIMEOUTS = {("D8", "test"): 7 * 24 * 3600}

# deployment, metric name, value, unit
METRICS = (
    ("D3", "duration_seconds", 1500.0, "seconds"),
    ("D3", "cpu_usage_percent", 37.5, "percent"),
    ("D3", "memory_usage_mb", 412.0, "MB"),
    ("D6", "duration_seconds", 1380.0, "seconds"),
    ("D6", "cpu_usage_percent", 64.2, "percent"),
    ("D6", "memory_usage_mb", 588.0, "MB"),
    ("D7", "duration_seconds", 1500.0, "seconds"),
    ("D7", "cpu_usage_percent", 41.0, "percent"),
)

# key, rolled-back deployment, target release, initiator, minutes after its completion, reason
ROLLBACKS = (
    ("R1", "D6", "A1", "lena", 18 * 60,
     "Login error rate rose to 4% after 1.5.0: session store timeouts under peak load."),
    ("R2", "D7", "A1", "marco", 10,
     "Smoke test failed: session store returned 503 to the login flow."),
)

DEPLOYMENT_GUIDE = """\
# Deployment guide

Every release goes **development -> staging -> production**; relman refuses a
target whose predecessor has no succeeded deployment of the same release.

## Before you promote
1. The release's pipeline passed in the previous environment
   (build, test, security_scan, deploy, smoke_test).
2. The change log is in the release notes.
3. Dashboards for the service are open and you are on the deploy channel.

## Production
- Promote with at least one reviewer: a lead or admin other than yourself.
- Deploy inside the change window (Tuesday to Thursday, 10:00 to 16:00 UTC).
- Watch the deployment until `smoke_test` succeeds:
  `grpcurl ... relman.v1.DeployService/WatchDeployment`.

## After
Record duration, CPU and memory as deployment metrics, and close the change.
"""

ROLLBACK_PROCEDURE = """\
# Rollback procedure

Roll back when a production deployment breaks an SLO or fails its smoke test.

1. **Decide fast.** Error rate or latency past the SLO for five minutes is enough.
2. **Roll back in relman**, not by hand: `RollbackDeployment` with a reason.
   It redeploys the newest earlier release that succeeded in that environment
   and that was not itself rolled back.
3. **Watch the redeployment** until every stage has succeeded.
4. **Tell people**: post the reason and the restored version in the service channel.
5. **Follow up**: open an incident review within two working days.

| situation | action |
|---|---|
| smoke test failed | roll back at once |
| errors rising slowly | roll back, then investigate |
| data migration involved | page the owning team lead first |
"""

INCIDENT_RESPONSE = """\
# Incident response: auth-service

## Symptoms
- Login error rate above 1% (dashboard *auth / logins*).
- p99 of token issuance above 300 ms.

## First ten minutes
1. Acknowledge the page and open an incident channel.
2. Check the last deployment of auth-service in production (ListLiveDeployments).
3. If it is less than 24 hours old, **roll it back** (see *Rollback procedure*).
4. Otherwise check the session store: `redis-cli --latency` on the primary.

## Escalation
- Platform team lead, then the on-call SRE.
- Security on call if tokens may have leaked: revoke signing keys.
"""

# title, service, environment, tags, author, day, content
RUNBOOKS = (
    ("Deployment guide", None, None, ["deployment", "guide"], "lena", 1.0, DEPLOYMENT_GUIDE),
    ("Rollback procedure", None, "production", ["rollback", "production"], "marco", 1.5,
     ROLLBACK_PROCEDURE),
    ("Incident response: auth-service", "auth-service", "production",
     ["incident", "on-call", "auth-service"], "admin", 15.5, INCIDENT_RESPONSE),
)

# user, action, resource type, resource key, day, details
AUDIT_TRAIL = (
    ("priya", "create", "release", "A1", 2.0, {"version": "1.4.0", "service": "auth-service"}),
    ("priya", "deploy", "deployment", "D1", 3.4, {"environment": "development"}),
    ("priya", "deploy", "deployment", "D2", 4.4, {"environment": "staging"}),
    ("sofia", "create", "release", "U1", 5.0, {"version": "3.0.0", "service": "user-dashboard"}),
    ("lena", "deploy", "deployment", "D3", 6.6, {"environment": "production"}),
    ("marco", "approve", "deployment", "D3", 6.6 + 30 / 1440, {"vote": "approved"}),
    ("admin", "approve", "deployment", "D3", 6.6 + 40 / 1440, {"vote": "approved"}),
    ("tom", "create", "release", "G1", 8.0, {"version": "0.9.0", "service": "api-gateway"}),
    ("priya", "create", "release", "A2", 10.0, {"version": "1.5.0", "service": "auth-service"}),
    ("priya", "deploy", "deployment", "D4", 11.4, {"environment": "development"}),
    ("priya", "deploy", "deployment", "D5", 12.4, {"environment": "staging"}),
    ("marco", "update", "service", "payment-api", 13.0,
     {"changed": {"slack_channel": ["#payments", "#team-backend"]}}),
    ("lena", "deploy", "deployment", "D6", 14.4, {"environment": "production"}),
    ("marco", "approve", "deployment", "D6", 14.4 + 20 / 1440, {"vote": "approved"}),
    ("lena", "rollback", "deployment", "D6", None, {"rollback": "R1", "target_version": "1.4.0"}),
    ("admin", "delete", "runbook", "legacy-checklist", 16.0,
     {"title": "Legacy deploy checklist", "superseded_by": "Deployment guide"}),
    ("lena", "deploy", "deployment", "D7", 17.45, {"environment": "production"}),
    ("admin", "approve", "deployment", "D7", 17.45 + 15 / 1440, {"vote": "approved"}),
    ("marco", "rollback", "deployment", "D7", None, {"rollback": "R2", "target_version": "1.4.0"}),
    ("tom", "deploy", "deployment", "D8", 30 - 2 / 24, {"environment": "development"}),
)

# fmt: on

USER_AGENTS = {
    "admin": "grpcurl/v1.8.9 grpc-go/1.61.0",
    "lena": "relman-cli/0.1 grpc-python/1.85.1",
    "marco": "relman-cli/0.1 grpc-python/1.85.1",
    "priya": "ci-runner/4.2 grpc-python/1.85.1",
    "tom": "ci-runner/4.2 grpc-python/1.85.1",
    "sofia": "grpcurl/v1.8.9 grpc-go/1.61.0",
}


def _git_commit(service: str, version: str) -> str:
    return hashlib.sha1(f"{service}@{version}".encode()).hexdigest()


def _hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def build(now: datetime, password_hashes: list[str]) -> list[Base]:
    """Every seeded row, with timestamps relative to `now`, one table after the other in
    dependency order (`seed` inserts them a table at a time)."""
    rows = _SampleRows(now, password_hashes)
    return [
        *rows.teams(),
        *rows.users(),
        *rows.environments(),
        *rows.services(),
        *rows.releases(),
        *rows.deployments(),
        *rows.approvals(),
        *rows.pipeline_stages(),
        *rows.deployment_metrics(),
        *rows.rollbacks(),
        *rows.runbooks(),
        *rows.audit_logs(),
    ]


def _after(start: datetime | None, minutes: float | None) -> datetime | None:
    """`minutes` after `start`; None when either is unknown (not started, not finished)."""
    if start is None or minutes is None:
        return None
    return start + timedelta(minutes=minutes)


class _SampleRows:
    """The rows of each kind, built from the tables above. Rows point to each other by
    key (a user name, a release key such as "A1"): the ids below turn a key into the row's
    seed_id, and an unknown key is a KeyError here rather than a dangling reference."""

    def __init__(self, now: datetime, password_hashes: list[str]) -> None:
        self.start = now.replace(microsecond=0) - timedelta(days=30)  # day 0
        self.password_hashes = password_hashes
        self.user_id = {u.username: seed_id("user", u.username) for u in USERS}
        self.team_id = {name: seed_id("team", name) for name, _, _ in TEAMS}
        self.env_id = {name: seed_id("environment", name) for name, *_ in ENVIRONMENTS}
        self.service_id = {name: seed_id("service", name) for name, *_ in SERVICES}
        self.release_id = {key: seed_id("release", key) for key, *_ in RELEASES}
        self.deployment_id = {d.key: seed_id("deployment", d.key) for d in DEPLOYMENTS}
        self.release_service = {key: service for key, service, *_ in RELEASES}
        self.deployment = {d.key: d for d in DEPLOYMENTS}
        # rolled-back deployment -> minutes from its completion to its rollback
        self.rollback_after_min = {deployment: after for _, deployment, _, _, after, _ in ROLLBACKS}

    def day(self, offset: float) -> datetime:
        """A day offset of the tables (0 = 30 days before the seed runs) as a timestamp."""
        return self.start + timedelta(days=offset)

    def deployment_times(self, key: str) -> tuple[datetime, datetime | None, datetime | None]:
        """When deployment `key` was created, started its first stage and completed."""
        d = self.deployment[key]
        created = self.day(d.created)
        return (
            created,
            _after(created, d.deployed_after_min),
            _after(created, d.completed_after_min),
        )

    def rollback_started(self, deployment: str) -> datetime:
        """When the rollback of `deployment` began (its audit row has no day of its own)."""
        return _after(self.deployment_times(deployment)[2], self.rollback_after_min[deployment])

    # -- users, teams, services and environments -------------------------------------------

    def teams(self) -> list[Team]:
        created = self.day(0)
        return [
            Team(
                id=self.team_id[name],
                name=name,
                description=description,
                slack_channel=channel,
                member_count=sum(1 for u in USERS if u.team == name),
                created_at=created,
                updated_at=created,
            )
            for name, description, channel in TEAMS
        ]

    def users(self) -> list[User]:
        created = self.day(0)
        return [
            User(
                id=self.user_id[user.username],
                email=f"{user.username}@relman.example",
                username=user.username,
                full_name=user.full_name,
                hashed_password=password_hash,
                is_active=True,
                role=user.role.value,
                is_admin=user.role == Role.ADMIN,
                created_at=created,
                updated_at=created,
            )
            for user, password_hash in zip(USERS, self.password_hashes, strict=True)
        ]

    def environments(self) -> list[Environment]:
        created = self.day(0)
        return [
            Environment(
                id=self.env_id[name],
                name=name,
                environment_type=env_type.value,
                description=description,
                config_path=config_path,
                is_active=True,
                created_at=created,
                updated_at=created,
            )
            for name, env_type, description, config_path in ENVIRONMENTS
        ]

    def services(self) -> list[Service]:
        created = self.day(0)
        return [
            Service(
                id=self.service_id[name],
                name=name,
                description=description,
                repository_url=f"https://git.relman.example/{team.lower()}/{name}",
                team_id=self.team_id[team],
                owner_id=self.user_id[owner],
                slack_channel=f"#{name}",
                is_active=True,
                created_at=created,
                updated_at=created,
            )
            for name, team, owner, description in SERVICES
        ]

    # -- releases and their deployments ----------------------------------------------------

    def releases(self) -> list[Release]:
        return [
            Release(
                id=self.release_id[key],
                service_id=self.service_id[service],
                version=version,
                status=status.value,
                release_notes=notes,
                git_commit=_git_commit(service, version),
                created_by=self.user_id[author],
                created_at=self.day(day),
                updated_at=self.day(day),
            )
            for key, service, version, status, author, day, notes in RELEASES
        ]

    def deployments(self) -> list[Deployment]:
        rows = []
        for d in DEPLOYMENTS:
            created, deployed, completed = self.deployment_times(d.key)
            rows.append(
                Deployment(
                    id=self.deployment_id[d.key],
                    release_id=self.release_id[d.release],
                    service_id=self.service_id[self.release_service[d.release]],
                    environment_id=self.env_id[d.environment],
                    status=d.status.value,
                    deployed_by=self.user_id[d.deployer],
                    deployed_at=deployed,
                    completed_at=completed,
                    created_at=created,
                    updated_at=completed or deployed or created,
                )
            )
        return rows

    def approvals(self) -> list[Approval]:
        rows = []
        for deployment, approver, status, after_min, notes in APPROVALS:
            requested = self.deployment_times(deployment)[0]
            voted = _after(requested, after_min)
            rows.append(
                Approval(
                    id=seed_id("approval", f"{deployment}:{approver}"),
                    deployment_id=self.deployment_id[deployment],
                    approver_id=self.user_id[approver],
                    status=status.value,
                    notes=notes,
                    approved_at=voted,
                    created_at=requested,
                    updated_at=voted or requested,
                )
            )
        return rows

    def pipeline_stages(self) -> list[PipelineStage]:
        """The standard stages of each deployment in STAGE_RUNS, in their order."""
        rows = []
        for deployment, runs in STAGE_RUNS.items():
            created = self.deployment_times(deployment)[0]
            first_start = _after(created, self.deployment[deployment].deployed_after_min or 0)
            for order, (name, (status, start_min, duration_min, output)) in enumerate(
                zip(STANDARD_STAGES, runs, strict=True)
            ):
                started = _after(first_start, start_min)
                completed = _after(started, duration_min)
                rows.append(
                    PipelineStage(
                        id=seed_id("stage", f"{deployment}:{name}"),
                        deployment_id=self.deployment_id[deployment],
                        name=name,
                        order=order,
                        status=status.value,
                        timeout_seconds=STAGE_TIMEOUTS.get((deployment, name), 1800),
                        started_at=started,
                        completed_at=completed,
                        output=output,
                        created_at=created,
                        updated_at=completed or started or created,
                    )
                )
        return rows

    def deployment_metrics(self) -> list[DeploymentMetric]:
        """Each recorded when its deployment completed."""
        rows = []
        for deployment, name, value, unit in METRICS:
            recorded = self.deployment_times(deployment)[2]
            rows.append(
                DeploymentMetric(
                    id=seed_id("metric", f"{deployment}:{name}"),
                    deployment_id=self.deployment_id[deployment],
                    metric_name=name,
                    metric_value=value,
                    unit=unit,
                    created_at=recorded,
                    updated_at=recorded,
                )
            )
        return rows

    def rollbacks(self) -> list[Rollback]:
        """Each completed 31 minutes after it began."""
        rows = []
        for key, deployment, target, initiator, _, reason in ROLLBACKS:
            started = self.rollback_started(deployment)
            finished = started + timedelta(minutes=31)
            rows.append(
                Rollback(
                    id=seed_id("rollback", key),
                    deployment_id=self.deployment_id[deployment],
                    target_release_id=self.release_id[target],
                    reason=reason,
                    status=RollbackStatus.COMPLETED.value,
                    initiated_by=self.user_id[initiator],
                    completed_at=finished,
                    created_at=started,
                    updated_at=finished,
                )
            )
        return rows

    # -- runbooks and the audit trail ------------------------------------------------------

    def runbooks(self) -> list[Runbook]:
        return [
            Runbook(
                id=seed_id("runbook", title),
                title=title,
                content=content,
                service_id=self.service_id[service] if service else None,
                environment_id=self.env_id[environment] if environment else None,
                tags=tags,
                created_by=self.user_id[author],
                is_active=True,
                created_at=self.day(day),
                updated_at=self.day(day),
            )
            for title, service, environment, tags, author, day, content in RUNBOOKS
        ]

    def audit_logs(self) -> list[AuditLog]:
        """A rollback's row (no day in AUDIT_TRAIL) is dated when the rollback began; a
        resource that was not seeded (a deleted runbook) gets the id it would have had."""
        resource_ids = {**self.release_id, **self.deployment_id, **self.service_id}
        rows = []
        for index, (user, action, resource_type, resource, day, details) in enumerate(AUDIT_TRAIL):
            when = self.rollback_started(resource) if day is None else self.day(day)
            resource_id = resource_ids.get(resource) or seed_id(resource_type, resource)
            rows.append(
                AuditLog(
                    id=seed_id("audit", str(index)),
                    user_id=self.user_id[user],
                    action=action,
                    resource_type=resource_type,
                    resource_id=str(resource_id),
                    details=details,
                    ip_address=f"10.20.0.{11 + index % 7}",
                    user_agent=USER_AGENTS[user],
                    created_at=when,
                )
            )
        return rows


async def _migrated_to_head(session: AsyncSession) -> str | None:
    """The database's revision, or None when it has never been migrated."""
    exists = await session.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    if not exists:
        return None
    return await session.scalar(text("SELECT version_num FROM alembic_version"))


async def seed(url: URL, now: datetime | None = None) -> bool:
    """Insert the sample data set unless it is there, its days counted back from `now`
    (default: the clock). Returns True when rows were added."""
    head = schema.head_revision()
    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            revision = await _migrated_to_head(session)
            if revision != head:
                raise SeedError(
                    f"database is at revision {revision or 'none'}, not {head}: run `make migrate`"
                )
            await session.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEED_LOCK_KEY}
            )
            if await session.get(User, seed_id("user", "admin")) is not None:
                return False
            hashes = await asyncio.gather(
                *(asyncio.to_thread(_hash_password, SEED_PASSWORD) for _ in USERS)
            )
            rows = build(now or datetime.now(UTC), list(hashes))
            # Its audit rows are dated up to a month back, before a new database's first
            # partition (migration 008 makes them from the month it runs in).
            await audit_log.make_months(
                session, [row.created_at for row in rows if isinstance(row, AuditLog)]
            )
            # The models declare no relationship between most tables, so the unit of work
            # cannot order their INSERTs: flush one table at a time, in dependency order.
            for _, table_rows in itertools.groupby(rows, key=type):
                session.add_all(list(table_rows))
                await session.flush()
            return True
    finally:
        await database.dispose()


async def drop_schema(url: URL) -> None:
    """Drop everything relman created (tables, trigger functions, alembic_version)."""
    database = Database(url, pool_size=1)
    try:
        async with database.transaction() as session:
            await session.execute(text("DROP SCHEMA public CASCADE"))
            await session.execute(text("CREATE SCHEMA public"))
    finally:
        await database.dispose()


class SeedError(RuntimeError):
    """The database cannot be seeded as it is (not migrated)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.devtools.seed", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="drop the schema, migrate to head and seed again (destroys all data)",
    )
    args = parser.parse_args(argv)
    url = migration_database_url()  # as the schema's owner
    target = describe(url)
    if args.reset:
        asyncio.run(drop_schema(url))
        schema.upgrade(url, runtime_role=schema.runtime_role(url, database_url()))
        print(f"schema dropped and migrated to {schema.head_revision()} on {target}")
    try:
        added = asyncio.run(seed(url))
    except SeedError as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 2
    if added:
        print(
            f"seeded {target}: 3 teams, 8 users, 5 services, 3 environments, 10 releases, "
            f"8 deployments (password of every user: {SEED_PASSWORD})"
        )
    else:
        print(f"database already seeded ({target}): nothing added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
