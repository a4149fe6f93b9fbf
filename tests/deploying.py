"""Helpers for driving deployments through the real DeployService in tests."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2

from relman.v1 import common_pb2, deploy_pb2, deploy_pb2_grpc
from shared.devtools.seed import seed_id
from tests.harness import bearer

DEV = str(seed_id("environment", "development"))
STAGING = str(seed_id("environment", "staging"))
PROD = str(seed_id("environment", "production"))
S = common_pb2  # enum values
# CheckPromotion's gates, in the order it lists them.
GATES = [
    "promotion_order",
    "required_stages",
    "bake_time",
    "freeze",
    "deployer_role",
    "active_deployment",
    "approvals",
]


class Client:
    """DeployService as one user, through the real server."""

    def __init__(self, channel: grpc.aio.Channel, token: str, timeout_s: float = 30) -> None:
        self.stub = deploy_pb2_grpc.DeployServiceStub(channel)
        self.auth = bearer(token)
        self.timeout_s = timeout_s

    def __getattr__(self, rpc: str):
        method = getattr(self.stub, rpc)
        request_type = getattr(deploy_pb2, f"{rpc}Request")

        async def invoke(**fields):
            return await method(request_type(**fields), metadata=self.auth, timeout=self.timeout_s)

        return invoke


async def release_status(client: Client, release_id: str) -> str:
    release = await client.GetRelease(release_id=release_id)
    return S.ReleaseStatus.Name(release.status).removeprefix("RELEASE_STATUS_").lower()


async def run_all_stages(client: Client, deployment) -> None:
    for stage in deployment.stages:
        await client.UpdatePipelineStage(stage_id=stage.id, status=S.STAGE_STATUS_RUNNING)
        await client.UpdatePipelineStage(
            stage_id=stage.id, status=S.STAGE_STATUS_SUCCEEDED, output=f"{stage.name} ok"
        )


async def deployed(client: Client, service_id: str, version: str, *environments: str):
    """A release that succeeded in each of `environments`, in order."""
    release = await client.CreateRelease(service_id=service_id, version=version)
    for environment in environments:
        deployment = await client.PromoteRelease(
            release_id=release.id, target_environment_id=environment
        )
        await run_all_stages(client, deployment)
    return release


async def production_requiring(admin: Client, approvals: int) -> str:
    """A production environment of its own whose policy requires `approvals` votes (the
    seeded one is shared by every test); returns its id."""
    environment = await admin.CreateEnvironment(
        name=f"prod-{uuid.uuid4().hex[:10]}", environment_type=S.ENVIRONMENT_TYPE_PRODUCTION
    )
    await admin.UpdateEnvironmentPolicy(
        policy=common_pb2.EnvironmentPolicy(
            environment_id=environment.id, required_approvals=approvals
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["required_approvals"]),
    )
    return environment.id


def policy_rules(policy) -> dict:
    """What an EnvironmentPolicy message decides, without its etag and times."""
    return {
        "required_approvals": policy.required_approvals,
        "approver_roles": list(policy.approver_roles),
        "deployer_roles": list(policy.deployer_roles),
        "required_stages": list(policy.required_stages),
        "bake_minutes": policy.bake_minutes,
    }
