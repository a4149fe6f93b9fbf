"""shared.client, the helper for internal callers: the token, request ids, retries.

Retries are checked against a small real gRPC server that refuses the first attempts
with UNAVAILABLE and records every attempt (the relman services cannot be made to
fail on cue); the token and request ids against the real services.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from relman.v1 import audit_pb2, audit_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc
from shared.client import RelmanClient, service_config
from shared.persistence.models import Role
from tests.harness import client_address


class Flaky(audit_pb2_grpc.AuditServiceServicer, deploy_pb2_grpc.DeployServiceServicer):
    """Answers UNAVAILABLE to the first `failures` attempts of each method."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, list] = {}

    def _attempt(self, method: str, request, context) -> bool:
        seen = self.attempts.setdefault(method, [])
        seen.append((request, dict(context.invocation_metadata())))
        return len(seen) > self.failures

    async def LogAction(self, request, context):
        if not self._attempt("LogAction", request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is away")
        return audit_pb2.AuditLog(id=request.request_id, action=request.action)

    async def UpdatePipelineStage(self, request, context):
        if not self._attempt("UpdatePipelineStage", request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is away")
        return common_pb2.PipelineStage(id=request.stage_id)


@pytest.fixture
async def flaky():
    servicer = Flaky(failures=2)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
    deploy_pb2_grpc.add_DeployServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_repeatable_calls_are_retried_with_one_request_id_others_tried_once(flaky):
    servicer, address = flaky
    async with RelmanClient(deploy=address, audit=address, token="rm_secret") as relman:
        logged = await relman.audit.LogAction(
            audit_pb2.LogActionRequest(action="client.retry", resource_type="test")
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await relman.deploy.UpdatePipelineStage(
                deploy_pb2.UpdatePipelineStageRequest(stage_id=str(uuid.uuid4()))
            )
    attempts = servicer.attempts["LogAction"]
    assert len(attempts) == 3  # two UNAVAILABLE, then OK
    request_ids = {request.request_id for request, _ in attempts}
    assert len(request_ids) == 1 and logged.id == request_ids.pop()  # filled in, kept
    assert all(meta["authorization"] == "Bearer rm_secret" for _, meta in attempts)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.attempts["UpdatePipelineStage"]) == 1  # not safe to repeat


def test_the_service_config_retries_only_what_is_safe_to_repeat():
    policy = {
        (name["service"].rpartition(".")[2], name["method"]): config
        for config in service_config()["methodConfig"]
        for name in config["name"]
    }
    retried = {method for (_, method), config in policy.items() if "retryPolicy" in config}
    assert {"LogAction", "PromoteRelease", "CreateRelease", "GetDeployment", "ListAuditLogs"} <= (
        retried
    )
    assert not retried & {"UpdatePipelineStage", "ApproveDeployment", "LogActions", "Logout"}
    assert "timeout" not in policy[("DeployService", "WatchDeployment")]
    assert policy[("AuditService", "LogAction")]["timeout"] == "30s"


async def test_the_client_calls_the_real_services_with_its_token(relman, tokens, database):
    async with RelmanClient(
        deploy=client_address(relman.addresses["deploy_svc"]),
        audit=client_address(relman.addresses["audit_svc"]),
        token=tokens[Role.SERVICE],
    ) as client:
        logged = await client.audit.LogAction(
            audit_pb2.LogActionRequest(action="client.helper", resource_type="test")
        )
        environments = await client.deploy.ListEnvironments(deploy_pb2.ListEnvironmentsRequest())
    assert logged.user_id  # the service user the token belongs to
    assert uuid.UUID(logged.id)  # the request_id the helper filled in became the row id
    assert len(environments.environments) >= 3
