"""Fault 7: races on one deployment, then every invariant of the deployment rules checked.

Each race fires its calls at once from several callers; whatever order the server
picks, each call must get OK or a refusal that names the lost race (FAILED_PRECONDITION,
ALREADY_EXISTS, ABORTED), and the database must end up consistent.

The environment policy races (issue 18) run in environments and services of their own,
so their policies and freeze windows touch nothing else: updates of one policy with one
etag, promotions racing a freeze window and a policy change, votes under a policy of two
approvals. For them the cluster tracks commit timestamps, which tell the invariants
whether a freeze window or a policy change had committed before a racing deployment
began (see tests/faults/invariants.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from relman.v1 import common_pb2
from shared.persistence.db import libpq_dsn
from shared.persistence.models import STANDARD_STAGES
from tests.deploying import (
    DEV,
    PROD,
    STAGING,
    Client,
    S,
    deployed,
    policy_rules,
    production_requiring,
    run_all_stages,
)
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.invariants import check_invariants
from tests.faults.load import code_of
from tests.harness import error_details

LOST_RACE = {"FAILED_PRECONDITION", "ALREADY_EXISTS", "ABORTED"}
ROUNDS = 4
STANDARD = list(STANDARD_STAGES)


def _as(running, tokens: dict[str, str], *usernames: str) -> list[Client]:
    """DeployService as each of `usernames`, through the running services."""
    return [Client(running.deploy_channel, tokens[name]) for name in usernames]


async def _codes(calls) -> collections.Counter:
    return collections.Counter(await asyncio.gather(*map(code_of, calls)))


async def test_concurrent_votes_stage_updates_and_rollbacks_keep_every_invariant(
    fault_db, fault_tokens, fault_report
):
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    async with services(fault_db) as running:
        lena, marco, admin = _as(running, fault_tokens, "lena", "marco", "admin")
        for round_ in range(ROUNDS):
            service_id = await new_service_id(fault_db)

            # Votes: two leads approve and reject the same production deployment at once.
            release = await deployed(lena, service_id, f"1.{round_}.0", DEV, STAGING)
            waiting = await lena.PromoteRelease(release_id=release.id, target_environment_id=PROD)
            votes = [
                voter.ApproveDeployment(deployment_id=waiting.id)
                if approve
                else voter.RejectDeployment(deployment_id=waiting.id)
                for voter in (marco, admin)
                for approve in (True, False, True, False)
            ]
            seen["votes"] += await _codes(votes)
            voted = await lena.GetDeployment(deployment_id=waiting.id)
            outcomes["votes"][S.DeploymentStatus.Name(voted.status)] += 1

            # Stage updates: every transition of the first two stages, all at once, with a
            # cancel among them.
            other = await new_service_id(fault_db)
            release = await lena.CreateRelease(service_id=other, version="1.0.0")
            running_deployment = await lena.PromoteRelease(
                release_id=release.id, target_environment_id=DEV
            )
            first, second = running_deployment.stages[:2]
            updates = [
                lena.UpdatePipelineStage(stage_id=stage.id, status=status)
                for stage in (first, second)
                for status in (
                    S.STAGE_STATUS_RUNNING,
                    S.STAGE_STATUS_SUCCEEDED,
                    S.STAGE_STATUS_FAILED,
                    S.STAGE_STATUS_SKIPPED,
                    S.STAGE_STATUS_RUNNING,
                )
            ]
            updates.append(lena.CancelDeployment(deployment_id=running_deployment.id))
            seen["stage updates"] += await _codes(updates)
            after = await lena.GetDeployment(deployment_id=running_deployment.id)
            outcomes["stage updates"][S.DeploymentStatus.Name(after.status)] += 1

            # Rollbacks: the same succeeded deployment rolled back by three callers at once.
            third = await new_service_id(fault_db)
            await deployed(lena, third, "1.0.0", DEV)
            newer = await lena.CreateRelease(service_id=third, version="2.0.0")
            target = await lena.PromoteRelease(release_id=newer.id, target_environment_id=DEV)
            await run_all_stages(lena, target)
            rollbacks = [
                caller.RollbackDeployment(deployment_id=target.id, reason=f"race {n}")
                for n, caller in enumerate((lena, marco, admin) * 2)
            ]
            codes = await _codes(rollbacks)
            seen["rollbacks"] += codes
            assert codes["OK"] == 1, codes
        assert_no_internal_errors(running)

    for race, codes in seen.items():
        assert set(codes) <= {"OK"} | LOST_RACE, (race, codes)
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        checked = await check_invariants(db)
        votes_per_approver = await db.fetchval(
            "SELECT max(n) FROM (SELECT count(*) n FROM approvals"
            " GROUP BY deployment_id, approver_id) per_voter"
        )
        rollbacks_per_deployment = await db.fetchval(
            "SELECT max(n) FROM (SELECT count(*) n FROM rollbacks GROUP BY deployment_id) r"
        )
    finally:
        await db.close()
    assert votes_per_approver == 1 and rollbacks_per_deployment == 1
    fault_report(
        f"{ROUNDS} rounds of: 8 votes (approve and reject, 2 leads) on one production "
        f"deployment -> {dict(seen['votes'])}, ending {dict(outcomes['votes'])}; 10 stage "
        f"transitions and a cancel on one deployment at once -> {dict(seen['stage updates'])}, "
        f"ending {dict(outcomes['stage updates'])}; 6 rollbacks of one deployment -> "
        f"{dict(seen['rollbacks'])}; afterwards all {checked} invariants hold, one vote per "
        "approver, one rollback per deployment"
    )


# -- environment policies and freeze windows (issue 18) ---------------------------------------


@pytest.fixture(scope="module")
async def commit_timestamps(cluster, fault_db) -> bool:
    """The fault cluster tracks commit timestamps (a restart, once): with them the
    invariants tell a freeze window that committed before a racing deployment began from
    one that committed while it was being made (which it could not have seen)."""
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        tracked = await db.fetchval("SELECT current_setting('track_commit_timestamp') = 'on'")
        if not tracked:
            await db.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    finally:
        await db.close()
    if not tracked:
        await asyncio.to_thread(cluster.stop)
        await asyncio.to_thread(cluster.start)
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        return await db.fetchval("SELECT current_setting('track_commit_timestamp') = 'on'")
    finally:
        await db.close()


async def _outcome(call) -> str:
    """How an awaited call ended: "OK", or its status code and ErrorInfo reason."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        try:
            reason = error_details(error)[0].reason
        except AssertionError:  # no relman ErrorInfo: the code alone
            reason = ""
        code = error.code().name
        return code if reason in ("", code) else f"{code} {reason}"
    return "OK"


async def _outcomes(calls) -> list[str]:
    return list(await asyncio.gather(*map(_outcome, calls)))


def _unexpected_errors(running) -> list[str]:
    """The exception of each traceback the services logged as an unexpected error."""
    found = []
    for line in (running.deploy.output + running.audit.output).splitlines():
        if '"unexpected error"' in line:
            with contextlib.suppress(ValueError, KeyError):
                lines = json.loads(line)["exc"].strip().splitlines()
                errors = [x for x in lines if "Error" in x and not x.startswith(("[", " "))]
                found.append((errors or lines)[-1][:300])
    return found


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _new_environment(admin: Client, kind: int, prefix: str) -> str:
    environment = await admin.CreateEnvironment(
        name=f"{prefix}-{uuid.uuid4().hex[:10]}", environment_type=kind
    )
    return environment.id


async def _check_all(fault_db) -> int:
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        return await check_invariants(db)
    finally:
        await db.close()


def _policy_update(environment_id: str, etag: str, **fields):
    return {
        "policy": common_pb2.EnvironmentPolicy(environment_id=environment_id, etag=etag, **fields),
        "update_mask": field_mask_pb2.FieldMask(paths=list(fields)),
    }


async def test_policy_updates_with_one_etag_let_exactly_one_through(
    fault_db, fault_tokens, fault_report, commit_timestamps
):
    """Eight updates of one policy at once, all with the etag read before: one wins, the
    others are ABORTED ETAG_MISMATCH and change nothing (one policy.update row)."""
    admin_role, lead_role = S.ROLE_ADMIN, S.ROLE_LEAD
    seen: collections.Counter = collections.Counter()
    winners: collections.Counter = collections.Counter()
    async with services(fault_db) as running:
        admin = Client(running.deploy_channel, fault_tokens["admin"])
        for round_ in range(ROUNDS):
            kind = S.ENVIRONMENT_TYPE_PRODUCTION if round_ % 2 else S.ENVIRONMENT_TYPE_STAGING
            environment_id = await _new_environment(admin, kind, "race-policy")
            read = await admin.GetEnvironmentPolicy(environment_id=environment_id)
            # What strengthens applies at once, what weakens waits in pending.
            changes: list[dict] = [
                {"required_approvals": read.required_approvals + 1},
                {"required_approvals": read.required_approvals + 2},
                {"bake_minutes": 30},
                {"required_stages": [*read.required_stages, "canary"]},
                {"approver_roles": [admin_role]},
                {"deployer_roles": [admin_role]},
                {"required_stages": read.required_stages[1:]},  # weakens
                {"approver_roles": [admin_role, lead_role], "required_approvals": 0},  # weakens
            ]
            random.Random(round_).shuffle(changes)  # the first sent tends to win
            calls = [
                admin.UpdateEnvironmentPolicy(**_policy_update(environment_id, read.etag, **c))
                for c in changes
            ]
            outcomes = await _outcomes(calls)
            seen.update(outcomes)
            assert outcomes.count("OK") == 1, outcomes
            assert set(outcomes) == {"OK", "ABORTED ETAG_MISMATCH"}, outcomes
            winner = changes[outcomes.index("OK")]
            winners[",".join(winner)] += 1
            after = await admin.GetEnvironmentPolicy(environment_id=environment_id)
            assert after.etag != read.etag
            expected = {**policy_rules(read), **winner}
            if after.HasField("pending_change"):  # the winner weakened: it waits
                assert policy_rules(after.pending_change) == expected, (winner, after)
                assert policy_rules(after) == policy_rules(read)
            else:
                assert policy_rules(after) == expected, (winner, after)
            # The losers' etag is stale for good: retried, they are refused again.
            again = await _outcome(
                admin.UpdateEnvironmentPolicy(
                    **_policy_update(environment_id, read.etag, bake_minutes=60)
                )
            )
            assert again == "ABORTED ETAG_MISMATCH", again
            db = await asyncpg.connect(libpq_dsn(fault_db))
            try:
                audited = await db.fetchval(
                    "SELECT count(*) FROM audit_logs WHERE action = 'policy.update'"
                    " AND resource_type = 'environment_policy' AND resource_id = $1",
                    environment_id,
                )
            finally:
                await db.close()
            assert audited == 1, audited
        assert_no_internal_errors(running)
    checked = await _check_all(fault_db)
    fault_report(
        f"{ROUNDS} rounds of 8 UpdateEnvironmentPolicy with one etag (strengthening and "
        f"weakening) -> {dict(seen)}; the winner each round: {dict(winners)}; one "
        f"policy.update row per round; afterwards all {checked} invariants hold"
    )


async def test_promotions_racing_a_freeze_window_are_refused_or_made_before_it(
    fault_db, fault_tokens, fault_report, commit_timestamps
):
    """A lead's freeze window for a fresh environment created while three leads' and an
    admin's (with an override reason) promotions into it are made: each promotion is made
    before the window or refused DEPLOYMENT_FROZEN (the admin's passes, audited as an
    override only when the window was in force); afterwards every new promotion is
    refused, and one made before the window cannot start its first stage in it."""
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    async with services(fault_db) as running:
        lena, marco, admin = _as(running, fault_tokens, "lena", "marco", "admin")
        for round_ in range(ROUNDS):
            environment_id = await _new_environment(
                admin, S.ENVIRONMENT_TYPE_DEVELOPMENT, "race-freeze"
            )
            releases = []
            for _ in range(5):
                service_id = await new_service_id(fault_db)
                releases.append(await lena.CreateRelease(service_id=service_id, version="1.0.0"))
            if round_ % 2:  # recurring: an occurrence starts every minute and lasts two hours
                form = {"cron": "* * * * *", "time_zone": "Europe/Berlin", "duration_minutes": 120}
            else:
                now = datetime.now(UTC)
                form = {
                    "start_time": _stamp(now - timedelta(minutes=5)),
                    "end_time": _stamp(now + timedelta(hours=2)),
                }
            window = common_pb2.FreezeWindow(
                environment_id=environment_id, reason=f"race {round_}", **form
            )
            calls = {
                "window": marco.CreateFreezeWindow(
                    freeze_window=window, request_id=str(uuid.uuid4())
                ),
                **{
                    f"lead promotion {n}": lena.PromoteRelease(
                        release_id=releases[n].id, target_environment_id=environment_id
                    )
                    for n in range(3)
                },
                "admin promotion with a reason": admin.PromoteRelease(
                    release_id=releases[3].id,
                    target_environment_id=environment_id,
                    freeze_override_reason=f"hotfix {round_}",
                ),
                "check": lena.CheckPromotion(
                    release_id=releases[4].id, target_environment_id=environment_id
                ),
            }
            outcomes = dict(zip(calls, await _outcomes(calls.values()), strict=True))
            for name, outcome in outcomes.items():
                seen[name.rstrip(" 0123456789")][outcome] += 1
            assert outcomes["window"] == outcomes["admin promotion with a reason"] == "OK"
            assert outcomes["check"] == "OK", outcomes
            leads = [outcomes[f"lead promotion {n}"] for n in range(3)]
            assert set(leads) <= {"OK", "FAILED_PRECONDITION DEPLOYMENT_FROZEN"}, outcomes

            # The window is in force now: a lead's promotion is refused, CheckPromotion
            # says so, and one made before it cannot start.
            late = await _outcome(
                lena.PromoteRelease(release_id=releases[4].id, target_environment_id=environment_id)
            )
            assert late == "FAILED_PRECONDITION DEPLOYMENT_FROZEN", late
            check = await lena.CheckPromotion(
                release_id=releases[4].id, target_environment_id=environment_id
            )
            assert not check.allowed
            assert [g.name for g in check.gates if not g.passed] == ["freeze"], check
            db = await asyncpg.connect(libpq_dsn(fault_db))
            try:
                made = await db.fetch(
                    "SELECT d.id::text, d.release_id::text, d.freeze_override_reason,"
                    " (SELECT count(*) FROM audit_logs a WHERE a.action = 'freeze.override'"
                    "   AND a.resource_type = 'deployment' AND a.resource_id = d.id::text)"
                    "   AS override_rows"
                    " FROM deployments d WHERE d.environment_id = $1",
                    uuid.UUID(environment_id),
                )
            finally:
                await db.close()
            assert len(made) == leads.count("OK") + 1, (made, outcomes)
            for row in made:
                by_admin = row["release_id"] == releases[3].id
                overridden = row["override_rows"] == 1
                assert (row["freeze_override_reason"] is not None) == overridden, dict(row)
                if by_admin:
                    passed = "override audited" if overridden else "made before the window"
                    seen["admin promotion with a reason"][passed] += 1
                else:
                    assert not overridden, dict(row)
                full = await lena.GetDeployment(
                    deployment_id=row["id"], view=S.DEPLOYMENT_VIEW_WITH_STAGES
                )
                start = await _outcome(
                    lena.UpdatePipelineStage(
                        stage_id=full.stages[0].id, status=S.STAGE_STATUS_RUNNING
                    )
                )
                seen["first stage started after the race"][start] += 1
                # Made before the window, it may not start inside it; passed by an
                # admin's override, it may.
                assert start == ("OK" if overridden else "FAILED_PRECONDITION DEPLOYMENT_FROZEN")
        assert_no_internal_errors(running)
    checked = await _check_all(fault_db)
    fault_report(
        f"{ROUNDS} rounds (one-off and recurring windows) of CreateFreezeWindow for a fresh "
        "environment at once with 3 lead promotions, an admin's with freeze_override_reason "
        f"and a CheckPromotion -> {dict((k, dict(v)) for k, v in seen.items())}; afterwards "
        f"new promotions refused DEPLOYMENT_FROZEN, and all {checked} invariants hold "
        "(nothing created or started inside a window without an override; commit "
        f"timestamps tracked: {commit_timestamps})"
    )


async def _votes_and_required(fault_db, deployment_id: str) -> tuple[int, int]:
    """(approved votes by others than the deployer, approvals its policy requires now)."""
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        row = await db.fetchrow(
            "SELECT (SELECT count(*) FROM approvals a WHERE a.deployment_id = d.id"
            "   AND a.status = 'approved' AND a.approver_id <> d.deployed_by) AS votes,"
            " p.required_approvals AS required"
            " FROM deployments d JOIN environment_policies p"
            "   ON p.environment_id = d.environment_id WHERE d.id = $1",
            uuid.UUID(deployment_id),
        )
    finally:
        await db.close()
    return row["votes"], row["required"]


async def test_votes_under_a_two_approval_policy_and_a_tightening_at_once(
    fault_db, fault_tokens, fault_report, commit_timestamps
):
    """A production environment of its own requiring two approvals: both eligible
    approvers vote three times at once, with a developer's and the deployer's votes among
    them; in some rounds the admin's votes race a rejection of their own, in others the
    admin raising the requirement to three. One vote per approver counts; a deployment
    runs only with the votes its policy asks for when it starts."""
    seen: collections.Counter = collections.Counter()
    endings: collections.Counter = collections.Counter()
    held = 0  # left pending by a tightening that raced its last vote, unable to start
    async with services(fault_db) as running:
        lena, marco, admin = _as(running, fault_tokens, "lena", "marco", "admin")
        priya = Client(running.deploy_channel, fault_tokens["priya"])
        for round_ in range(ROUNDS + 2):
            production = await production_requiring(admin, 2)
            service_id = await new_service_id(fault_db)
            release = await deployed(lena, service_id, "1.0.0", DEV, STAGING)
            waiting = await lena.PromoteRelease(
                release_id=release.id, target_environment_id=production
            )
            assert waiting.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
            variant = ("approvals", "a rejection", "a tightening")[round_ % 3]
            calls = {}
            if variant == "a rejection":  # sent first, so that it wins some rounds
                calls["admin rejects"] = admin.RejectDeployment(deployment_id=waiting.id)
            if variant == "a tightening":
                calls["three required"] = admin.UpdateEnvironmentPolicy(
                    **_policy_update(production, "", required_approvals=3)
                )
            for n in range(3):
                calls[f"marco approves {n}"] = marco.ApproveDeployment(deployment_id=waiting.id)
                calls[f"admin approves {n}"] = admin.ApproveDeployment(deployment_id=waiting.id)
            calls["priya approves"] = priya.ApproveDeployment(deployment_id=waiting.id)
            calls["lena approves"] = lena.ApproveDeployment(deployment_id=waiting.id)
            outcomes = dict(zip(calls, await _outcomes(calls.values()), strict=True))
            seen.update(outcomes.values())
            assert {o.split()[0] for o in outcomes.values()} <= {"OK", "PERMISSION_DENIED"} | (
                LOST_RACE
            ), (variant, outcomes, _unexpected_errors(running))
            assert outcomes["priya approves"] in {  # a developer: no approver by role
                "PERMISSION_DENIED MISSING_PERMISSION",
                "PERMISSION_DENIED APPROVER_NOT_ELIGIBLE",
            }, outcomes
            assert outcomes["lena approves"] in {  # the deployer: as such, or too late
                "PERMISSION_DENIED SELF_APPROVAL",
                "FAILED_PRECONDITION NOT_AWAITING_APPROVAL",
            }, outcomes
            for voter in ("marco", "admin"):
                approved = [outcomes[f"{voter} approves {n}"] for n in range(3)]
                assert approved.count("OK") <= 1, outcomes
            if variant == "a tightening":
                assert outcomes["three required"] == "OK", outcomes
            after = await lena.GetDeployment(deployment_id=waiting.id)
            ending = S.DeploymentStatus.Name(after.status).removeprefix("DEPLOYMENT_STATUS_")
            endings[f"{variant}: {ending}"] += 1
            votes, required = await _votes_and_required(fault_db, waiting.id)
            if variant == "approvals":
                assert ending == "PENDING" and votes == 2, outcomes
            if ending == "PENDING" and votes < required:
                # The tightening's sweep of deployments not started missed one whose last
                # vote committed meanwhile: it cannot start (the trigger counts again).
                held += 1
                start = await _outcome(
                    lena.UpdatePipelineStage(
                        stage_id=waiting.stages[0].id, status=S.STAGE_STATUS_RUNNING
                    )
                )
                assert start == "FAILED_PRECONDITION APPROVALS_REQUIRED", start
                await lena.CancelDeployment(deployment_id=waiting.id, reason="race over")
            elif ending == "PENDING":
                await run_all_stages(lena, waiting)
            elif ending == "AWAITING_APPROVAL":
                # Only the tightening leaves it waiting (two of three); nobody else may vote.
                assert variant == "a tightening" and votes < required, (outcomes, votes)
                await lena.CancelDeployment(deployment_id=waiting.id, reason="race over")
            else:
                assert ending == "REJECTED" and variant == "a rejection", outcomes
        assert_no_internal_errors(running)
    db = await asyncpg.connect(libpq_dsn(fault_db))
    try:
        checked = await check_invariants(db)
        votes_per_approver = await db.fetchval(
            "SELECT max(n) FROM (SELECT count(*) n FROM approvals"
            " GROUP BY deployment_id, approver_id) per_voter"
        )
    finally:
        await db.close()
    assert votes_per_approver == 1
    fault_report(
        f"{ROUNDS + 2} rounds of 8 votes at once on a deployment awaiting 2 approvals (3 "
        "each by the two approvers, a developer's, the deployer's), with a rejection or a "
        f"tightening to 3 in some rounds -> {dict(seen)}; ending {dict(endings)}; the pending "
        f"ones ran to success ({held} left pending by a tightening could not start); "
        f"afterwards all {checked} invariants hold"
    )


async def test_promotions_racing_a_tightening_of_stages_and_approvals(
    fault_db, fault_tokens, fault_report, commit_timestamps
):
    """An admin adds a required stage (at the front: it applies at once), and in some
    rounds requires a vote too, in a fresh staging environment while leads deploy into it,
    naming the old stages, the new ones or none: each deployment starts with the stages of
    the policy it met, and none starts without the votes asked for when it starts."""
    seen: collections.Counter = collections.Counter()
    starts: collections.Counter = collections.Counter()
    async with services(fault_db) as running:
        lena, marco, admin = _as(running, fault_tokens, "lena", "marco", "admin")
        for round_ in range(ROUNDS):
            staging = await _new_environment(admin, S.ENVIRONMENT_TYPE_STAGING, "race-stages")
            releases = [
                await deployed(lena, await new_service_id(fault_db), f"1.{round_}.0", DEV)
                for _ in range(4)
            ]
            tightening = {"required_stages": ["canary", *STANDARD]}
            if round_ % 2:  # and a vote required where none was
                tightening["required_approvals"] = 1
            calls = {
                "tightening": admin.UpdateEnvironmentPolicy(
                    **_policy_update(staging, "", **tightening)
                ),
                "promotion 0": lena.PromoteRelease(
                    release_id=releases[0].id, target_environment_id=staging
                ),
                "promotion 1": marco.PromoteRelease(
                    release_id=releases[1].id, target_environment_id=staging
                ),
                "old stages": lena.CreateDeployment(
                    release_id=releases[2].id, environment_id=staging, stage_names=STANDARD
                ),
                "new stages": marco.CreateDeployment(
                    release_id=releases[3].id,
                    environment_id=staging,
                    stage_names=["canary", *STANDARD, "verify"],
                ),
            }
            outcomes = dict(zip(calls, await _outcomes(calls.values()), strict=True))
            seen.update(outcomes.values())
            assert outcomes["tightening"] == "OK", (outcomes, _unexpected_errors(running))
            lost = {"FAILED_PRECONDITION APPROVALS_REQUIRED"} if round_ % 2 else set()
            for name in ("promotion 0", "promotion 1"):
                assert outcomes[name] in {"OK"} | lost, (outcomes, _unexpected_errors(running))
            for name in ("old stages", "new stages"):  # each fits one policy or the other
                assert outcomes[name].split()[0] in {"OK", "INVALID_ARGUMENT"} or (
                    outcomes[name] in lost
                ), (outcomes, _unexpected_errors(running))
            # Whatever was made: started now, it runs only with the votes asked for now.
            db = await asyncpg.connect(libpq_dsn(fault_db))
            try:
                made = await db.fetch(
                    "SELECT id::text, status FROM deployments WHERE environment_id = $1",
                    uuid.UUID(staging),
                )
            finally:
                await db.close()
            for row in made:
                deployment = await lena.GetDeployment(
                    deployment_id=row["id"], view=S.DEPLOYMENT_VIEW_WITH_STAGES
                )
                start = await _outcome(
                    lena.UpdatePipelineStage(
                        stage_id=deployment.stages[0].id, status=S.STAGE_STATUS_RUNNING
                    )
                )
                starts[f"{row['status']}: {start}"] += 1
                if round_ % 2:  # a vote is required now, and none was cast
                    assert start.startswith("FAILED_PRECONDITION"), (row, start)
                else:
                    assert start == "OK", (row, start)
            # Once the change is made, the old stages are refused whatever else is true.
            late = await _outcome(
                lena.CreateDeployment(
                    release_id=releases[2].id, environment_id=staging, stage_names=STANDARD
                )
            )
            assert late.startswith("INVALID_ARGUMENT"), late
        assert_no_internal_errors(running)
    checked = await _check_all(fault_db)
    fault_report(
        f"{ROUNDS} rounds of a required stage (and in half of them a vote) added to a fresh "
        f"staging environment at once with 4 deployments into it -> {dict(seen)}; starting "
        f"what was made -> {dict(starts)}; afterwards all {checked} invariants hold (each "
        "deployment starts with the stages its policy required, none ran without its votes)"
    )
