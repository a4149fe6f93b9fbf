"""shared.client, the helper for internal callers: the token, request ids, retries,
typed errors.

Retries, and a stream that fails after its first message with rich details, are
checked against a small real gRPC server (the relman services cannot be made to fail
on cue); the token, request ids and typed errors of real refusals against the real
services.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import uuid

import grpc
import pytest

from relman.v1 import audit_pb2, audit_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc
from shared.client import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    RelmanClient,
    RelmanError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
    service_config,
)
from shared.framework import errors as server_errors
from shared.persistence.models import Role
from tests.deploying import DEV, PROD, STAGING, S
from tests.harness import client_address, error_details


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


class Exporter(audit_pb2_grpc.AuditServiceServicer):
    """Sends one chunk of an export, then refuses the rest as a relman server would."""

    async def ExportAuditLogs(self, request, context):
        yield audit_pb2.ExportAuditLogsResponse(data="id,action\n")
        refusal = server_errors.ResourceExhausted(
            "too many exports at once", reason="EXPORTS_BUSY", retry_after_s=1.5
        )
        await context.abort_with_status(refusal.to_status())


@contextlib.asynccontextmanager
async def serving(servicer):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
    if isinstance(servicer, deploy_pb2_grpc.DeployServiceServicer):
        deploy_pb2_grpc.add_DeployServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def flaky():
    servicer = Flaky(failures=2)
    async with serving(servicer) as address:
        yield servicer, address


def client_of(relman, token: str) -> RelmanClient:
    """A RelmanClient of the real services, as the user `token` belongs to."""
    return RelmanClient(
        deploy=client_address(relman.addresses["deploy_svc"]),
        audit=client_address(relman.addresses["audit_svc"]),
        token=token,
    )


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
    assert isinstance(refused.value, Unavailable)  # typed, after gRPC's retries (none here)
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
        batch = audit_pb2.LogActionsRequest(
            actions=[audit_pb2.LogActionRequest(action="client.stream", resource_type="test")]
        )
        streamed = await client.audit.LogActions(iter([batch]))  # streaming calls too
    assert streamed.count == 1
    assert logged.user_id  # the service user the token belongs to
    assert uuid.UUID(logged.id)  # the request_id the helper filled in became the row id
    assert len(environments.environments) >= 3


# -- typed errors ------------------------------------------------------------------------------


async def run_stages(deploy, stages, status=S.STAGE_STATUS_SUCCEEDED) -> None:
    for stage in stages:
        if status == S.STAGE_STATUS_SUCCEEDED:
            await deploy.UpdatePipelineStage(
                deploy_pb2.UpdatePipelineStageRequest(
                    stage_id=stage.id, status=S.STAGE_STATUS_RUNNING
                )
            )
        await deploy.UpdatePipelineStage(
            deploy_pb2.UpdatePipelineStageRequest(stage_id=stage.id, status=status)
        )


async def test_a_refused_promotion_is_a_failed_precondition_with_its_reason(
    relman, tokens, service_id
):
    """Staging skipped test and security_scan; the lead's promotion to production is refused."""
    async with (
        client_of(relman, tokens[Role.DEVELOPER]) as developer,
        client_of(relman, tokens[Role.LEAD]) as lead,
    ):
        deploy = developer.deploy
        release = await deploy.CreateRelease(
            deploy_pb2.CreateReleaseRequest(service_id=service_id, version="1.0.0")
        )
        promote = deploy_pb2.PromoteReleaseRequest(release_id=release.id)
        promote.target_environment_id = DEV
        await run_stages(deploy, (await deploy.PromoteRelease(promote)).stages)
        promote.target_environment_id = STAGING
        staging = await deploy.PromoteRelease(promote)
        build, test, scan, *rest = staging.stages
        await run_stages(deploy, [build])
        await run_stages(deploy, [test, scan], S.STAGE_STATUS_SKIPPED)
        await run_stages(deploy, rest)
        promote.target_environment_id = PROD
        with pytest.raises(FailedPrecondition) as refused:
            await lead.deploy.PromoteRelease(promote)
    error = refused.value
    assert error.reason == "REQUIRED_STAGES_NOT_PASSED" and error.domain == "relman"
    assert error.metadata["stages_not_passed"] == "test,security_scan"
    assert error.metadata["staging_deployment_id"] == staging.id
    assert error.grpc_status_code == error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == error.details() and "security_scan" in error.message
    assert error.field_violations == [] and error.retry_delay is None
    assert error.error_info is not None and error.error_details[0] is error.error_info
    assert type(error.__cause__) is grpc.aio.AioRpcError  # the original, kept
    assert str(error).startswith("FAILED_PRECONDITION REQUIRED_STAGES_NOT_PASSED: ")


async def test_invalid_arguments_carry_their_field_violations(relman, tokens):
    async with client_of(relman, tokens[Role.DEVELOPER]) as client:
        with pytest.raises(InvalidArgument) as unary:
            await client.deploy.GetRelease(deploy_pb2.GetReleaseRequest(release_id="x"))
    async with client_of(relman, tokens[Role.SERVICE]) as client:
        batch = audit_pb2.LogActionsRequest(
            actions=[
                audit_pb2.LogActionRequest(action="client.ok", resource_type="test"),
                audit_pb2.LogActionRequest(action="", resource_type="test"),
            ]
        )
        with pytest.raises(InvalidArgument) as streamed:  # a client-streaming call
            await client.audit.LogActions(iter([batch]))
    assert unary.value.field_violations == [("release_id", "'x' is not a UUID")]
    assert unary.value.field_violations[0] == FieldViolation("release_id", "'x' is not a UUID")
    assert unary.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in streamed.value.field_violations] == ["actions[1].action"]
    assert streamed.value.field_violations[0].description


async def test_errors_while_iterating_a_server_stream_are_typed(relman, tokens, service_id):
    async with client_of(relman, tokens[Role.DEVELOPER]) as client:
        with pytest.raises(InvalidArgument) as refused:
            async for _ in client.deploy.WatchDeployment(
                deploy_pb2.WatchDeploymentRequest(deployment_id="x")
            ):
                pass
        assert [v.field for v in refused.value.field_violations] == ["deployment_id"]

        # Mid-stream: a pending deployment's first snapshot comes, then the deadline passes.
        release = await client.deploy.CreateRelease(
            deploy_pb2.CreateReleaseRequest(service_id=service_id, version="1.0.0")
        )
        pending = await client.deploy.PromoteRelease(
            deploy_pb2.PromoteReleaseRequest(release_id=release.id, target_environment_id=DEV)
        )
        request = deploy_pb2.WatchDeploymentRequest(deployment_id=pending.id)

        async def iterate() -> list:
            seen = []
            with pytest.raises(DeadlineExceeded):
                async for snapshot in client.deploy.WatchDeployment(request, timeout=2):
                    seen.append(snapshot.id)
            return seen

        async def read() -> list:
            watch = client.deploy.WatchDeployment(request, timeout=2)
            seen = [(await watch.read()).id]
            with pytest.raises(DeadlineExceeded):
                await watch.read()
            assert await watch.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return seen

        assert await asyncio.gather(iterate(), read()) == [[pending.id], [pending.id]]


async def test_rich_details_of_an_error_after_the_first_message_are_unpacked():
    async with (
        serving(Exporter()) as address,
        RelmanClient(deploy=address, audit=address, token="rm_secret") as client,
    ):
        chunks = []
        with pytest.raises(ResourceExhausted) as refused:
            async for chunk in client.audit.ExportAuditLogs(audit_pb2.ExportAuditLogsRequest()):
                chunks.append(chunk.data)
    assert chunks == ["id,action\n"]
    assert refused.value.reason == "EXPORTS_BUSY" and refused.value.domain == "relman"
    assert refused.value.retry_delay == 1.5


async def test_callers_of_aio_rpc_error_still_work(relman, tokens):
    """The typed error is an AioRpcError: its catchers, accessors and the call's own
    status keep working."""
    missing = deploy_pb2.GetReleaseRequest(release_id=str(uuid.uuid4()))
    async with client_of(relman, tokens[Role.DEVELOPER]) as client:
        call = client.deploy.GetRelease(missing)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            caught = error
        assert await call.code() == grpc.StatusCode.NOT_FOUND
        assert dict(await call.trailing_metadata())["x-request-id"]
    assert isinstance(caught, NotFound) and isinstance(caught, RelmanError)
    assert caught.code() == grpc.StatusCode.NOT_FOUND and caught.details() == caught.message
    assert error_details(caught)[0].reason == caught.reason == "RELEASE_NOT_FOUND"
    assert from_rpc_error(caught) is caught and from_rpc_error(caught.__cause__) is not caught
    copied = pickle.loads(pickle.dumps(caught))
    assert type(copied) is NotFound and copied.reason == caught.reason
