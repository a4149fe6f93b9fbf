"""Environment policies through the real DeployService (issue 18, the policy half).

Every test works in environments of its own, made by an admin (CreateEnvironment), and with
a service of its own: the seeded environments keep their policies for the other tests. A
release promoted into a fresh production environment is deployed only to the seeded
development environment and to the test's own staging one, so that the staging policy that
gates it is the test's.

Each promotion, allowed or refused, is first put to CheckPromotion by the same caller
(`promote`, `gates_agree`): its answer must be PromoteRelease's.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import field_mask_pb2, json_format
from sqlalchemy import text

from relman.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from shared.devtools.seed import seed_id
from shared.persistence.models import STANDARD_STAGES, Role
from tests.deploying import DEV, GATES, Client, S, run_all_stages
from tests.deploying import policy_rules as rules
from tests.harness import bearer, error_details, fails

STANDARD = list(STANDARD_STAGES)
# A canary between the scan and the deploy: the standard five stay an ordered subsequence,
# so requiring this list instead of them strengthens a policy (it takes effect at once).
WITH_CANARY = ["build", "test", "security_scan", "canary", "deploy", "smoke_test"]
WEAKEN_DELAY_S = 86400  # POLICY_WEAKEN_DELAY_S's default: the test server leaves it unset
ADMIN_ID = str(seed_id("user", "admin"))
MARCO_ID = str(seed_id("user", "marco"))

# The gate of CheckPromotion that reports each refusal of PromoteRelease.
GATE_OF = {
    "PROMOTION_ORDER": "promotion_order",
    "ENVIRONMENT_INACTIVE": "promotion_order",
    "SERVICE_INACTIVE": "promotion_order",
    "REQUIRED_STAGES_NOT_PASSED": "required_stages",
    "BAKE_TIME_NOT_ELAPSED": "bake_time",
    "DEPLOYMENT_FROZEN": "freeze",
    "DEPLOYER_ROLE_NOT_ALLOWED": "deployer_role",
    "ACTIVE_DEPLOYMENT_EXISTS": "active_deployment",
}
CODE_OF = {"DEPLOYER_ROLE_NOT_ALLOWED": grpc.StatusCode.PERMISSION_DENIED}


# -- helpers ---------------------------------------------------------------------------------


async def new_environment(admin: Client, kind: str) -> common_pb2.Environment:
    """An environment of type `kind` (development, staging, production) of the test's own."""
    return await admin.CreateEnvironment(
        name=f"policy-{kind}-{uuid.uuid4().hex[:10]}",
        environment_type=getattr(S, f"ENVIRONMENT_TYPE_{kind.upper()}"),
    )


async def update(admin: Client, environment_id: str, etag: str = "", **fields):
    """UpdateEnvironmentPolicy of the fields given (the update mask names exactly them)."""
    return await admin.UpdateEnvironmentPolicy(
        policy=common_pb2.EnvironmentPolicy(environment_id=environment_id, etag=etag, **fields),
        update_mask=field_mask_pb2.FieldMask(paths=list(fields)),
    )


def audited_rules(values: dict) -> dict:
    """The five rules of an audit row's before/after/pending, role lists as sets of words."""
    return {
        "required_approvals": values["required_approvals"],
        "approver_roles": sorted(values["approver_roles"]),
        "deployer_roles": sorted(values["deployer_roles"]),
        "required_stages": list(values["required_stages"]),
        "bake_minutes": values["bake_minutes"],
    }


async def gates_agree(client: Client, release_id: str, target: str, refusal: str | None = None):
    """CheckPromotion by `client` for the release and target: all seven gates in order,
    approvals informational; allowed with every gate passed when PromoteRelease would
    create the deployment (`refusal` None), else not allowed with the gate of `refusal`
    (PromoteRelease's reason) the first that failed."""
    check = await client.CheckPromotion(release_id=release_id, target_environment_id=target)
    assert [gate.name for gate in check.gates] == GATES, check
    failed = [gate.name for gate in check.gates if not gate.passed]
    assert check.gates[-1].passed, check  # approvals
    if refusal is None:
        assert check.allowed and failed == [], check
    else:
        assert not check.allowed and failed[:1] == [GATE_OF[refusal]], check
    return check


async def promote(
    client: Client, release_id: str, target: str, refusal: str | None = None, **fields
):
    """PromoteRelease after CheckPromotion by the same caller says the same: the deployment,
    or with `refusal` the error (that reason, with its status code)."""
    await gates_agree(client, release_id, target, refusal)
    call = client.PromoteRelease(release_id=release_id, target_environment_id=target, **fields)
    if refusal is None:
        return await call
    return await fails(call, CODE_OF.get(refusal, grpc.StatusCode.FAILED_PRECONDITION), refusal)


async def succeeded_in(client: Client, release_id: str, *environments: str) -> list:
    """Promotes the release to each environment in turn and runs every stage there; the
    deployments."""
    done = []
    for environment in environments:
        deployment = await promote(client, release_id, environment)
        assert deployment.status == S.DEPLOYMENT_STATUS_PENDING
        await run_all_stages(client, deployment)
        done.append(deployment)
    return done


async def audit_rows(audit_channel, token: str, environment_id: str, action: str) -> list:
    """The audit rows of `action` about the environment's policy, newest first."""
    page = await audit_pb2_grpc.AuditServiceStub(audit_channel).ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(action=action, resource_id=environment_id)
        ),
        metadata=bearer(token),
        timeout=30,
    )
    return list(page.audit_logs)


def status_of(deployment) -> str:
    return S.DeploymentStatus.Name(deployment.status).removeprefix("DEPLOYMENT_STATUS_")


# -- reading and changing a policy -------------------------------------------------------------


async def test_a_new_environment_gets_the_default_policy_of_its_type(
    clients, deploy_channel, tokens
):
    """A viewer reads the policy each type gets; a service user and bad ids are refused."""
    admin, viewer = clients["admin"], clients["viewer"]
    approvers = [S.ROLE_ADMIN, S.ROLE_LEAD]
    everyone = [S.ROLE_ADMIN, S.ROLE_LEAD, S.ROLE_DEVELOPER]
    for kind, expected in (
        ("development", (0, approvers, everyone, [], 0)),
        ("staging", (0, approvers, everyone, STANDARD, 0)),
        ("production", (1, approvers, approvers, STANDARD, 0)),
    ):
        environment = await new_environment(admin, kind)
        policy = await viewer.GetEnvironmentPolicy(environment_id=environment.id)
        assert policy.environment_id == environment.id
        assert tuple(rules(policy).values()) == expected, kind
        assert policy.etag and policy.HasField("update_time"), kind
        assert not policy.HasField("pending_change"), kind
        assert not policy.HasField("pending_effective_at"), kind

    await fails(
        viewer.GetEnvironmentPolicy(environment_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND
    )
    error = await fails(
        viewer.GetEnvironmentPolicy(environment_id="nope"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [v.field for v in error_details(error)[1]] == ["environment_id"]
    # A CI pipeline (a service user, catalog.read) may read the rules it deploys under.
    read_by_ci = await Client(deploy_channel, tokens[Role.SERVICE]).GetEnvironmentPolicy(
        environment_id=environment.id
    )
    assert read_by_ci.environment_id == environment.id


async def test_an_update_with_a_stale_etag_changes_nothing(clients):
    """Every change gives a new etag; an update with an old one is ABORTED and changes nothing."""
    admin = clients["admin"]
    production = await new_environment(admin, "production")
    first = await admin.GetEnvironmentPolicy(environment_id=production.id)

    changed = await update(
        admin, production.id, etag=first.etag, required_approvals=2, bake_minutes=30
    )
    assert (changed.required_approvals, changed.bake_minutes) == (2, 30)
    assert changed.etag != first.etag
    assert changed.update_time.ToDatetime() > first.update_time.ToDatetime()
    assert await admin.GetEnvironmentPolicy(environment_id=production.id) == changed

    await fails(
        update(admin, production.id, etag=first.etag, required_approvals=3),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert await admin.GetEnvironmentPolicy(environment_id=production.id) == changed

    unconditional = await update(admin, production.id, required_approvals=3)  # no etag
    assert unconditional.required_approvals == 3 and unconditional.bake_minutes == 30
    assert unconditional.etag not in (first.etag, changed.etag)

    # Role lists come back in enum order, each role once.
    staging = await new_environment(admin, "staging")
    narrowed = await update(
        admin, staging.id, deployer_roles=[S.ROLE_LEAD, S.ROLE_ADMIN, S.ROLE_LEAD]
    )
    assert list(narrowed.deployer_roles) == [S.ROLE_ADMIN, S.ROLE_LEAD]


async def test_bad_policies_are_refused_naming_the_field(clients):
    """Out-of-range values, empty or foreign role lists, bad stage lists and masks are refused
    naming the field, and change nothing; the limits themselves are accepted."""
    admin = clients["admin"]
    production = await new_environment(admin, "production")
    before = await admin.GetEnvironmentPolicy(environment_id=production.id)
    many = [*STANDARD, *(f"extra-{n}" for n in range(16))]  # 21 stages
    for fields, mask, field in [
        ({}, [], "update_mask"),
        ({"required_approvals": 2}, ["required_approvals", "name"], "update_mask"),
        ({"required_approvals": 11}, None, "policy.required_approvals"),
        ({"required_approvals": -1}, None, "policy.required_approvals"),
        ({"approver_roles": []}, None, "policy.approver_roles"),
        ({"approver_roles": [S.ROLE_ADMIN, S.ROLE_DEVELOPER]}, None, "policy.approver_roles"),
        ({"approver_roles": [S.ROLE_VIEWER]}, None, "policy.approver_roles"),
        ({"deployer_roles": []}, None, "policy.deployer_roles"),
        ({"deployer_roles": [S.ROLE_ADMIN, S.ROLE_VIEWER]}, None, "policy.deployer_roles"),
        ({"deployer_roles": [S.ROLE_SERVICE]}, None, "policy.deployer_roles"),
        ({"required_stages": many}, None, "policy.required_stages"),
        ({"required_stages": [*STANDARD, ""]}, None, "policy.required_stages"),
        ({"required_stages": [*STANDARD, "x" * 101]}, None, "policy.required_stages"),
        ({"required_stages": [*STANDARD, "canary", "canary"]}, None, "policy.required_stages"),
        ({"bake_minutes": -1}, None, "policy.bake_minutes"),
        ({"bake_minutes": 43201}, None, "policy.bake_minutes"),
    ]:
        error = await fails(
            admin.UpdateEnvironmentPolicy(
                policy=common_pb2.EnvironmentPolicy(environment_id=production.id, **fields),
                update_mask=field_mask_pb2.FieldMask(paths=list(fields) if mask is None else mask),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        # The field, or one of its elements (policy.approver_roles[1]).
        named = [v.field.split("[")[0] for v in error_details(error)[1]]
        assert named == [field], fields
    error = await fails(
        update(admin, "nope", required_approvals=2), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [v.field for v in error_details(error)[1]] == ["policy.environment_id"]
    await fails(update(admin, str(uuid.uuid4()), required_approvals=2), grpc.StatusCode.NOT_FOUND)
    assert await admin.GetEnvironmentPolicy(environment_id=production.id) == before

    # The limits themselves are fine.
    longest = [*STANDARD, *(f"{n:02}" + "x" * 98 for n in range(15))]  # 20 stages of <= 100
    most = await update(
        admin, production.id, required_approvals=10, bake_minutes=43200, required_stages=longest
    )
    assert (most.required_approvals, most.bake_minutes) == (10, 43200)
    assert list(most.required_stages) == longest


async def test_only_admins_change_a_policy(clients):
    """A lead, a developer or a viewer changing a policy is refused, and it stays as it was."""
    admin = clients["admin"]
    production = await new_environment(admin, "production")
    before = await admin.GetEnvironmentPolicy(environment_id=production.id)
    for role in ("lead", "developer", "viewer"):
        await fails(
            update(clients[role], production.id, required_approvals=2),
            grpc.StatusCode.PERMISSION_DENIED,
            "MISSING_PERMISSION",
        )
    assert await admin.GetEnvironmentPolicy(environment_id=production.id) == before
    assert (await update(admin, production.id, required_approvals=2)).required_approvals == 2


async def test_a_policy_change_is_audited_with_before_and_after(clients, tokens, audit_channel):
    """`policy.update` rows hold the rules before and after, and a weakening's pending rules."""
    admin = clients["admin"]
    production = await new_environment(admin, "production")
    await update(
        admin,
        production.id,
        required_approvals=2,
        approver_roles=[S.ROLE_ADMIN],
        required_stages=WITH_CANARY,
        bake_minutes=15,
    )
    (row,) = await audit_rows(audit_channel, tokens[Role.LEAD], production.id, "policy.update")
    assert (row.resource_type, row.resource_id, row.username) == (
        "environment_policy",
        production.id,
        "admin",
    )
    details = json_format.MessageToDict(row.details)
    assert audited_rules(details["before"]) == {
        "required_approvals": 1,
        "approver_roles": ["admin", "lead"],
        "deployer_roles": ["admin", "lead"],
        "required_stages": STANDARD,
        "bake_minutes": 0,
    }
    assert audited_rules(details["after"]) == {
        "required_approvals": 2,
        "approver_roles": ["admin"],
        "deployer_roles": ["admin", "lead"],
        "required_stages": WITH_CANARY,
        "bake_minutes": 15,
    }
    assert details.get("pending") is None

    # A weakening: in force after the call is the old count; the new one is pending.
    await update(admin, production.id, required_approvals=0)
    newest, _ = await audit_rows(audit_channel, tokens[Role.ADMIN], production.id, "policy.update")
    details = json_format.MessageToDict(newest.details)
    assert details["before"]["required_approvals"] == 2
    assert details["after"]["required_approvals"] == 2
    assert audited_rules(details["pending"]) == {
        "required_approvals": 0,
        "approver_roles": ["admin"],
        "deployer_roles": ["admin", "lead"],
        "required_stages": WITH_CANARY,
        "bake_minutes": 15,
    }
    assert details["pending_effective_at"]


async def test_weakening_waits_and_strengthening_applies_at_once(clients, service_id):
    """One update that weakens three rules and strengthens one: the stronger rule holds at
    once, the weaker ones wait a day, and setting a rule back cancels its pending value."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    asked_at = datetime.now(UTC)
    policy = await update(
        admin,
        production.id,
        required_approvals=0,  # weaker
        approver_roles=[S.ROLE_ADMIN],  # stronger
        deployer_roles=[S.ROLE_ADMIN, S.ROLE_LEAD, S.ROLE_DEVELOPER],  # weaker
        required_stages=["build", "test", "canary"],  # weaker: three standard stages gone
    )
    assert rules(policy) == {
        "required_approvals": 1,
        "approver_roles": [S.ROLE_ADMIN],
        "deployer_roles": [S.ROLE_ADMIN, S.ROLE_LEAD],
        "required_stages": STANDARD,
        "bake_minutes": 0,
    }
    assert rules(policy.pending_change) == {
        "required_approvals": 0,
        "approver_roles": [S.ROLE_ADMIN],
        "deployer_roles": [S.ROLE_ADMIN, S.ROLE_LEAD, S.ROLE_DEVELOPER],
        "required_stages": ["build", "test", "canary"],
        "bake_minutes": 0,
    }
    due = policy.pending_effective_at.ToDatetime(tzinfo=UTC) - asked_at
    assert abs(due - timedelta(seconds=WEAKEN_DELAY_S)) < timedelta(minutes=2), due
    assert await admin.GetEnvironmentPolicy(environment_id=production.id) == policy

    # The rules in force are the returned ones: no developer, one vote, an admin's.
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV, staging.id)
    await promote(developer, release.id, production.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    waiting = await promote(lead, release.id, production.id)
    assert status_of(waiting) == "AWAITING_APPROVAL"
    assert [s.name for s in waiting.stages] == STANDARD
    await fails(
        clients["reviewer"].ApproveDeployment(deployment_id=waiting.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "APPROVER_NOT_ELIGIBLE",
    )
    await admin.ApproveDeployment(deployment_id=waiting.id)
    assert status_of(await lead.GetDeployment(deployment_id=waiting.id)) == "PENDING"

    # Setting a weakened field back to its value in force drops its pending value.
    policy = await update(admin, production.id, required_approvals=1)
    assert policy.pending_change.required_approvals == 1
    assert list(policy.pending_change.required_stages) == ["build", "test", "canary"]
    policy = await update(
        admin,
        production.id,
        deployer_roles=[S.ROLE_ADMIN, S.ROLE_LEAD],
        required_stages=STANDARD,
    )
    assert not policy.HasField("pending_change") and not policy.HasField("pending_effective_at")
    assert rules(policy)["approver_roles"] == [S.ROLE_ADMIN]


async def test_a_weakening_applies_once_it_is_due(
    clients, service_id, database, tokens, audit_channel
):
    """Once pending_effective_at has passed, the weaker rules decide at once, and the sweeper
    writes them down and audits `policy.update_effective`."""
    admin, developer = clients["admin"], clients["developer"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    weaker = {
        "required_approvals": 0,
        "approver_roles": [S.ROLE_ADMIN, S.ROLE_LEAD],
        "deployer_roles": [S.ROLE_ADMIN, S.ROLE_LEAD, S.ROLE_DEVELOPER],
        "required_stages": ["build", "test", "canary"],
        "bake_minutes": 0,
    }
    pending = await update(
        admin,
        production.id,
        required_approvals=0,
        deployer_roles=weaker["deployer_roles"],
        required_stages=weaker["required_stages"],
    )
    assert rules(pending.pending_change) == weaker and rules(pending) != weaker

    async with database.transaction() as session:
        await session.execute(
            text(
                "UPDATE environment_policies SET pending_effective_at = now() - interval '1 second'"
                " WHERE environment_id = :id"
            ),
            {"id": uuid.UUID(production.id)},
        )
    assert rules(await admin.GetEnvironmentPolicy(environment_id=production.id)) == weaker

    # A developer now deploys to production, at once, with its three stages.
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV, staging.id)
    (deployment,) = await succeeded_in(developer, release.id, production.id)
    assert [s.name for s in deployment.stages] == ["build", "test", "canary"]
    done = await developer.GetDeployment(deployment_id=deployment.id)
    assert status_of(done) == "SUCCEEDED"

    # The sweeper writes the change down and audits it (within ~2 s; polled: no event).
    async with asyncio.timeout(15):
        while not (  # noqa: ASYNC110 - polling the audit trail
            rows := await audit_rows(
                audit_channel, tokens[Role.ADMIN], production.id, "policy.update_effective"
            )
        ):
            await asyncio.sleep(0.1)
    # Written by relman itself (no user): the deploy service's sweeper.
    assert [(row.user_id, row.user_agent) for row in rows] == [("", "relman-deploy-svc")]
    written = await admin.GetEnvironmentPolicy(environment_id=production.id)
    assert rules(written) == weaker
    assert not written.HasField("pending_change") and not written.HasField("pending_effective_at")


async def test_stages_move_under_a_policy_with_a_pending_change(clients, service_id, database):
    """A stage's move reads its policy as a plain row on the asyncpg connection, pending
    change (JSONB) included: the pending rules are read as rules, and the moves pass."""
    admin, developer = clients["admin"], clients["developer"]
    environment = await new_environment(admin, "development")
    async with database.transaction() as session:
        await session.execute(
            text(
                "UPDATE environment_policies SET pending = CAST(:pending AS jsonb),"
                " pending_effective_at = now() + interval '1 day' WHERE environment_id = :id"
            ),
            {
                "id": uuid.UUID(environment.id),
                "pending": '{"required_approvals": 0, "approver_roles": ["admin"],'
                ' "deployer_roles": ["admin"], "required_stages": [], "bake_minutes": 0}',
            },
        )
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await developer.PromoteRelease(
        release_id=release.id, target_environment_id=environment.id
    )
    await run_all_stages(developer, deployment)
    done = await developer.GetDeployment(deployment_id=deployment.id)
    assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED


# -- what a policy decides -------------------------------------------------------------------------


async def test_required_approvals_decide_how_many_votes_a_deployment_waits_for(clients, service_id):
    """0: pending at once, no reviewers, no votes; 1: one vote opens it; 2 (in staging): one
    vote keeps it waiting, the second opens it."""
    admin, developer, lead, reviewer = (
        clients["admin"],
        clients["developer"],
        clients["lead"],
        clients["reviewer"],
    )
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    first = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await promote(developer, first.id, staging.id, "PROMOTION_ORDER")
    await succeeded_in(developer, first.id, DEV)

    # None required (staging's default): pending at once, and nothing to vote on.
    error = await fails(
        developer.PromoteRelease(
            release_id=first.id, target_environment_id=staging.id, reviewer_ids=[MARCO_ID]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["reviewer_ids"]
    none = await promote(developer, first.id, staging.id)
    assert status_of(none) == "PENDING"
    await promote(developer, first.id, staging.id, "ACTIVE_DEPLOYMENT_EXISTS")
    await fails(
        reviewer.ApproveDeployment(deployment_id=none.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_AWAITING_APPROVAL",
    )
    await run_all_stages(developer, none)

    # One (production's default): one vote opens it.
    check = await gates_agree(lead, first.id, production.id)
    assert "1" in check.gates[-1].detail, check
    one = await promote(lead, first.id, production.id)
    assert status_of(one) == "AWAITING_APPROVAL"
    await reviewer.ApproveDeployment(deployment_id=one.id)
    assert status_of(await lead.GetDeployment(deployment_id=one.id)) == "PENDING"

    # Two, in staging: one vote keeps it waiting, the second opens it.
    assert (await update(admin, staging.id, required_approvals=2)).required_approvals == 2
    second = await developer.CreateRelease(service_id=service_id, version="1.1.0")
    await succeeded_in(developer, second.id, DEV)
    check = await gates_agree(developer, second.id, staging.id)
    assert "2" in check.gates[-1].detail, check
    two = await promote(developer, second.id, staging.id)
    assert status_of(two) == "AWAITING_APPROVAL"
    await reviewer.ApproveDeployment(deployment_id=two.id)
    assert status_of(await developer.GetDeployment(deployment_id=two.id)) == "AWAITING_APPROVAL"
    await fails(
        developer.UpdatePipelineStage(stage_id=two.stages[0].id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AWAITING_APPROVAL",
    )
    await admin.ApproveDeployment(deployment_id=two.id)
    assert status_of(await developer.GetDeployment(deployment_id=two.id)) == "PENDING"
    await run_all_stages(developer, two)


async def test_only_the_approver_roles_vote(clients, service_id):
    """With approvers [ADMIN], a lead can neither be asked to review nor vote; an admin's vote
    opens the deployment."""
    admin, developer, lead, reviewer = (
        clients["admin"],
        clients["developer"],
        clients["lead"],
        clients["reviewer"],
    )
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    await update(admin, production.id, approver_roles=[S.ROLE_ADMIN])
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV, staging.id)

    error = await fails(
        lead.PromoteRelease(
            release_id=release.id, target_environment_id=production.id, reviewer_ids=[MARCO_ID]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v.field for v in error_details(error)[1]] == ["reviewer_ids[0]"]
    waiting = await promote(lead, release.id, production.id, reviewer_ids=[ADMIN_ID])
    assert status_of(waiting) == "AWAITING_APPROVAL"

    for vote in (reviewer.ApproveDeployment, reviewer.RejectDeployment):
        await fails(
            vote(deployment_id=waiting.id),
            grpc.StatusCode.PERMISSION_DENIED,
            "APPROVER_NOT_ELIGIBLE",
        )
    # For the lead who was refused, a promotion now meets the deployment waiting there.
    await gates_agree(reviewer, release.id, production.id, "ACTIVE_DEPLOYMENT_EXISTS")
    state = await lead.GetDeployment(deployment_id=waiting.id, view=S.DEPLOYMENT_VIEW_FULL)
    assert status_of(state) == "AWAITING_APPROVAL"
    assert [a.status for a in state.approvals] == [S.APPROVAL_STATUS_PENDING]  # the request

    await admin.ApproveDeployment(deployment_id=waiting.id)
    assert status_of(await lead.GetDeployment(deployment_id=waiting.id)) == "PENDING"


async def test_deployer_roles_decide_who_deploys_to_production(clients, service_id):
    """Developers are kept out of production by its default policy; with deployers [ADMIN] a
    lead can neither deploy there nor change the admin's deployment."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV, staging.id)

    # Production's default deployers are leads and admins.
    error = await promote(developer, release.id, production.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    metadata = error_details(error)[0].metadata
    assert metadata["environment_id"] == production.id and "developer" in metadata["role"].lower()

    await update(admin, production.id, deployer_roles=[S.ROLE_ADMIN])
    error = await promote(lead, release.id, production.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    assert "lead" in error_details(error)[0].metadata["role"].lower()
    await fails(
        lead.CreateDeployment(release_id=release.id, environment_id=production.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    deployment = await promote(admin, release.id, production.id)
    await clients["reviewer"].ApproveDeployment(deployment_id=deployment.id)

    # Nor may the lead change the admin's deployment there.
    for attempt in (
        lead.UpdatePipelineStage(stage_id=deployment.stages[0].id, status=S.STAGE_STATUS_RUNNING),
        lead.CancelDeployment(deployment_id=deployment.id),
        lead.RecordDeploymentMetric(
            deployment_id=deployment.id, metric_name="error_rate", metric_value=0.1
        ),
    ):
        await fails(attempt, grpc.StatusCode.PERMISSION_DENIED, "DEPLOYER_ROLE_NOT_ALLOWED")
    await gates_agree(lead, release.id, production.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    await run_all_stages(admin, deployment)
    assert status_of(await admin.GetDeployment(deployment_id=deployment.id)) == "SUCCEEDED"


async def test_a_staging_policy_can_keep_developers_out(clients, service_id):
    """Staging with deployers [LEAD, ADMIN]: a developer can neither deploy there nor run stages."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    await update(admin, staging.id, deployer_roles=[S.ROLE_LEAD, S.ROLE_ADMIN])
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV)

    await promote(developer, release.id, staging.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    await fails(
        developer.CreateDeployment(release_id=release.id, environment_id=staging.id),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    deployment = await promote(lead, release.id, staging.id)
    assert status_of(deployment) == "PENDING"
    await fails(
        developer.UpdatePipelineStage(
            stage_id=deployment.stages[0].id, status=S.STAGE_STATUS_RUNNING
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    await gates_agree(developer, release.id, staging.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    await run_all_stages(lead, deployment)
    assert status_of(await lead.GetDeployment(deployment_id=deployment.id)) == "SUCCEEDED"


async def test_keeping_developers_out_holds_from_the_next_move_of_a_running_deployment(
    clients, service_id
):
    """A developer starts a deployment's first stage; an admin then takes developers out
    of the environment's deployers: the developer's next move of it is refused at once,
    although the process that made the first move decides the next from what it wrote
    (its write holds only at the policy version it was decided under), and a lead's goes
    through."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    environment = await new_environment(admin, "development")
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    deployment = await promote(developer, release.id, environment.id)
    first = deployment.stages[0]
    await developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_RUNNING)
    await update(admin, environment.id, deployer_roles=[S.ROLE_LEAD, S.ROLE_ADMIN])
    await fails(
        developer.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED),
        grpc.StatusCode.PERMISSION_DENIED,
        "DEPLOYER_ROLE_NOT_ALLOWED",
    )
    now = await lead.GetDeployment(deployment_id=deployment.id, view=S.DEPLOYMENT_VIEW_WITH_STAGES)
    assert now.stages[0].status == S.STAGE_STATUS_RUNNING
    moved = await lead.UpdatePipelineStage(stage_id=first.id, status=S.STAGE_STATUS_SUCCEEDED)
    assert moved.status == S.STAGE_STATUS_SUCCEEDED


async def test_required_stages_of_staging_gate_production(clients, service_id):
    """Staging requires a canary: deployments there start with the required stages in order,
    and one whose canary was SKIPPED does not open production."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    policy = await update(admin, staging.id, required_stages=WITH_CANARY)
    assert list(policy.required_stages) == WITH_CANARY and not policy.HasField("pending_change")
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV)

    for names in ([*STANDARD, "canary"], STANDARD, ["canary", *STANDARD], ["build", "test"]):
        error = await fails(
            developer.CreateDeployment(
                release_id=release.id, environment_id=staging.id, stage_names=names
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["stage_names"], names
    await gates_agree(developer, release.id, staging.id)  # the promotion itself is fine

    # The required stages first, then one's own; the canary is skipped.
    skipping = await developer.CreateDeployment(
        release_id=release.id, environment_id=staging.id, stage_names=[*WITH_CANARY, "verify"]
    )
    assert [s.name for s in skipping.stages] == [*WITH_CANARY, "verify"]
    for stage in skipping.stages:
        if stage.name == "canary":
            await developer.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_SKIPPED)
        else:
            await run_all_stages(developer, type(skipping)(stages=[stage]))
    assert status_of(await developer.GetDeployment(deployment_id=skipping.id)) == "SUCCEEDED"

    error = await promote(lead, release.id, production.id, "REQUIRED_STAGES_NOT_PASSED")
    assert error_details(error)[0].metadata["stages_not_passed"] == "canary"
    await fails(
        lead.CreateDeployment(release_id=release.id, environment_id=production.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUIRED_STAGES_NOT_PASSED",
    )

    # A staging run whose required stages all succeeded opens production.
    (passed,) = await succeeded_in(developer, release.id, staging.id)
    assert [s.name for s in passed.stages] == WITH_CANARY
    production_run = await promote(lead, release.id, production.id)
    assert status_of(production_run) == "AWAITING_APPROVAL"
    assert [s.name for s in production_run.stages] == STANDARD


async def test_required_stages_of_production_start_every_deployment_there(clients, service_id):
    """Production's own required stages begin every deployment into it."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    await update(admin, production.id, required_stages=WITH_CANARY)
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(developer, release.id, DEV, staging.id)

    for names in (STANDARD, [*STANDARD, "canary"]):
        error = await fails(
            lead.CreateDeployment(
                release_id=release.id, environment_id=production.id, stage_names=names
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in error_details(error)[1]] == ["stage_names"], names
    promoted = await promote(lead, release.id, production.id)
    assert [s.name for s in promoted.stages] == WITH_CANARY
    await lead.CancelDeployment(deployment_id=promoted.id, reason="with a verify stage")
    created = await lead.CreateDeployment(
        release_id=release.id, environment_id=production.id, stage_names=[*WITH_CANARY, "verify"]
    )
    assert [s.name for s in created.stages] == [*WITH_CANARY, "verify"]
    assert status_of(created) == "AWAITING_APPROVAL"


async def test_bake_time_holds_promotion_until_the_release_has_baked(clients, service_id, database):
    """A 1-minute bake in staging: production waits until ready_at (the bake is checked before
    the deployer's role), and opens once the staging run completed 2 minutes ago."""
    admin, developer, lead = clients["admin"], clients["developer"], clients["lead"]
    staging = await new_environment(admin, "staging")
    production = await new_environment(admin, "production")
    assert (await update(admin, staging.id, bake_minutes=1)).bake_minutes == 1
    release = await developer.CreateRelease(service_id=service_id, version="1.0.0")
    _, baking = await succeeded_in(developer, release.id, DEV, staging.id)
    completed = (await developer.GetDeployment(deployment_id=baking.id)).completed_at

    error = await promote(lead, release.id, production.id, "BAKE_TIME_NOT_ELAPSED")
    ready_at = datetime.fromisoformat(error_details(error)[0].metadata["ready_at"])
    expected = completed.ToDatetime(tzinfo=UTC) + timedelta(minutes=1)
    assert ready_at.tzinfo is not None and abs(ready_at - expected) < timedelta(seconds=1)
    await fails(
        lead.CreateDeployment(release_id=release.id, environment_id=production.id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "BAKE_TIME_NOT_ELAPSED",
    )
    # The bake comes before the role: a developer hears about the bake first.
    await promote(developer, release.id, production.id, "BAKE_TIME_NOT_ELAPSED")

    async with database.transaction() as session:
        await session.execute(
            text(
                "UPDATE deployments SET completed_at = now() - interval '2 minutes' WHERE id = :id"
            ),
            {"id": uuid.UUID(baking.id)},
        )
    await promote(developer, release.id, production.id, "DEPLOYER_ROLE_NOT_ALLOWED")
    baked = await promote(lead, release.id, production.id)
    assert status_of(baked) == "AWAITING_APPROVAL"


async def test_check_promotion_checks_its_input(clients, service_id):
    """CheckPromotion refuses unknown and malformed ids, and writes nothing."""
    viewer = clients["viewer"]
    release = await clients["developer"].CreateRelease(service_id=service_id, version="1.0.0")
    check = await viewer.CheckPromotion(release_id=release.id, target_environment_id=DEV)
    assert [gate.name for gate in check.gates] == GATES
    for fields, code in (
        ({"release_id": str(uuid.uuid4()), "target_environment_id": DEV}, "NOT_FOUND"),
        ({"release_id": release.id, "target_environment_id": str(uuid.uuid4())}, "NOT_FOUND"),
        ({"release_id": "nope", "target_environment_id": DEV}, "INVALID_ARGUMENT"),
        ({"release_id": release.id, "target_environment_id": "nope"}, "INVALID_ARGUMENT"),
    ):
        await fails(viewer.CheckPromotion(**fields), getattr(grpc.StatusCode, code))
    # It wrote nothing: the release is still a draft nowhere deployed.
    assert (await viewer.ListDeployments(release_id=release.id)).total_size == 0


async def test_a_stronger_approval_rule_catches_deployments_not_yet_started(
    clients, service_id, tokens, audit_channel
):
    """A deployment made while its environment needed no votes has not started when an
    admin raises the approvals to 1: it waits for a vote again (audited await_approval),
    cannot start a stage until it has one, and runs after it. Without this, an admin could
    lower the rule (after the delay), have a deployment made, and restore the rule."""
    lead, reviewer, admin = clients["lead"], clients["reviewer"], clients["admin"]
    staging = await new_environment(admin, "staging")
    release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    await succeeded_in(lead, release.id, DEV)
    made = await lead.PromoteRelease(release_id=release.id, target_environment_id=staging.id)
    assert made.status == S.DEPLOYMENT_STATUS_PENDING
    await update(admin, staging.id, required_approvals=1)
    state = await lead.GetDeployment(deployment_id=made.id)
    assert state.status == S.DEPLOYMENT_STATUS_AWAITING_APPROVAL
    await fails(
        lead.UpdatePipelineStage(stage_id=made.stages[0].id, status=S.STAGE_STATUS_RUNNING),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AWAITING_APPROVAL",
    )
    audit = audit_pb2_grpc.AuditServiceStub(audit_channel)
    rows = await audit.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(resource_id=made.id, action="await_approval")
        ),
        metadata=bearer(tokens[Role.ADMIN]),
    )
    assert [row.username for row in rows.audit_logs] == ["admin"]
    await reviewer.ApproveDeployment(deployment_id=made.id)
    await run_all_stages(lead, made)
    done = await lead.GetDeployment(deployment_id=made.id)
    assert done.status == S.DEPLOYMENT_STATUS_SUCCEEDED
