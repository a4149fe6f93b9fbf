"""Fault 7: races on one deployment, then every invariant of the deployment rules checked.

Each race fires its calls at once from several callers; whatever order the server
picks, each call must get OK or a refusal that names the lost race (FAILED_PRECONDITION,
ALREADY_EXISTS, ABORTED), and the database must end up consistent.
"""

from __future__ import annotations

import asyncio
import collections

import asyncpg

from shared.persistence.db import libpq_dsn
from tests.deploying import DEV, PROD, STAGING, Client, S, deployed, run_all_stages
from tests.faults.conftest import assert_no_internal_errors, new_service_id, services
from tests.faults.invariants import check_invariants
from tests.faults.load import code_of

LOST_RACE = {"FAILED_PRECONDITION", "ALREADY_EXISTS", "ABORTED"}
ROUNDS = 4


async def _codes(calls) -> collections.Counter:
    return collections.Counter(await asyncio.gather(*map(code_of, calls)))


async def test_concurrent_votes_stage_updates_and_rollbacks_keep_every_invariant(
    fault_db, fault_tokens, fault_report
):
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    async with services(fault_db) as running:
        lena = Client(running.deploy_channel, fault_tokens["lena"])
        marco = Client(running.deploy_channel, fault_tokens["marco"])
        admin = Client(running.deploy_channel, fault_tokens["admin"])
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
