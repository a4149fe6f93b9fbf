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
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

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
    target,
)
from shared.framework import errors as server_errors
from shared.persistence.models import Role
from tests.deploying import DEV, PROD, STAGING, S
from tests.harness import client_address, error_details
from tests.test_tls import _issue, _write


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

    async def RecordDeploymentMetric(self, request, context):
        if not self._attempt("RecordDeploymentMetric", request, context):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is away")
        return common_pb2.DeploymentMetric(deployment_id=request.deployment_id)


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
            await relman.deploy.RecordDeploymentMetric(
                deploy_pb2.RecordDeploymentMetricRequest(deployment_id=str(uuid.uuid4()))
            )
    attempts = servicer.attempts["LogAction"]
    assert len(attempts) == 3  # two UNAVAILABLE, then OK
    request_ids = {request.request_id for request, _ in attempts}
    assert len(request_ids) == 1 and logged.id == request_ids.pop()  # filled in, kept
    assert all(meta["authorization"] == "Bearer rm_secret" for _, meta in attempts)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(refused.value, Unavailable)  # typed, after gRPC's retries (none here)
    assert len(servicer.attempts["RecordDeploymentMetric"]) == 1  # not safe to repeat


def test_the_service_config_retries_only_what_is_safe_to_repeat():
    policy = {
        (name["service"].rpartition(".")[2], name["method"]): config
        for config in service_config()["methodConfig"]
        for name in config["name"]
    }
    retried = {method for (_, method), config in policy.items() if "retryPolicy" in config}
    assert {
        "LogAction",
        "PromoteRelease",
        "CreateRelease",
        "UpdatePipelineStage",  # with a request_id (AIP-155), as every call that has one
        "ApproveDeployment",
        "GetDeployment",
        "ListAuditLogs",
    } <= retried
    assert not retried & {"RecordDeploymentMetric", "UpdateService", "LogActions", "Logout"}
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
    assert uuid.UUID(logged.id)
    assert len(environments.environments) >= 3


async def test_the_client_takes_names_where_ids_go(relman, tokens, service_id):
    """A release, an environment and a watched deployment named as people name them; the
    request ids the helper fills in make a retried promotion return the first answer."""
    async with client_of(relman, tokens[Role.DEVELOPER]) as client:
        deploy = client.deploy
        service = await deploy.GetService(deploy_pb2.GetServiceRequest(service_id=service_id))
        release = await deploy.CreateRelease(
            deploy_pb2.CreateReleaseRequest(service_id=service.resource_name, version="1.0.0")
        )
        assert release.resource_name == f"{service.resource_name}/releases/1.0.0"
        promote = deploy_pb2.PromoteReleaseRequest(
            release_id=release.resource_name,
            target_environment_id="environments/development",
            request_id=str(uuid.uuid4()),
        )
        deployment = await deploy.PromoteRelease(promote)
        assert await deploy.PromoteRelease(promote) == deployment  # a retry: the first answer
        await run_stages(deploy, deployment.stages)
        snapshots = [s async for s in client.watch_deployment(deployment.resource_name)]
    assert snapshots[-1].id == deployment.id
    assert snapshots[-1].status == S.DEPLOYMENT_STATUS_SUCCEEDED


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
    complaint = "'x' is not a UUID, nor a release name like services/{name}/releases/{version}"
    assert unary.value.field_violations == [("release_id", complaint)]
    assert unary.value.field_violations[0] == FieldViolation("release_id", complaint)
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


# -- several replicas: per-call round robin, retries elsewhere, a watch re-opened ----------


class Dying(audit_pb2_grpc.AuditServiceServicer, deploy_pb2_grpc.DeployServiceServicer):
    """A replica on its way out: every call UNAVAILABLE, as a draining server answers."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    async def _refuse(self, method: str, context) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")

    async def LogAction(self, request, context):
        await self._refuse("LogAction", context)

    async def RecordDeploymentMetric(self, request, context):
        await self._refuse("RecordDeploymentMetric", context)


def test_a_list_of_replicas_is_one_target_of_addresses_of_one_family():
    assert target("relman:50051") == "relman:50051"
    assert target(["10.0.0.7:50051"]) == "10.0.0.7:50051"
    assert target(["10.0.0.7:50051", "10.0.0.8:50051"]) == "ipv4:10.0.0.7:50051,10.0.0.8:50051"
    assert target(("[fd00::7]:50051", "[fd00::8]:50051")) == "ipv6:[fd00::7]:50051,[fd00::8]:50051"
    for bad in (
        ["deploy-a:50051", "deploy-b:50051"],  # names: use one dns:/// target
        ["10.0.0.7", "10.0.0.8:50051"],  # no port
        ["fd00::7:50051", "fd00::8:50051"],  # IPv6 without brackets
        ["10.0.0.7:50051", "[fd00::8]:50051"],  # two families
        [],
    ):
        with pytest.raises(ValueError):
            target(bad)
    assert service_config()["loadBalancingConfig"] == [{"round_robin": {}}]


async def test_calls_alternate_over_replicas_and_retries_move_to_a_live_one():
    """Of two replicas one refuses everything: every repeatable call still succeeds (its
    retry goes to the next replica), a call that is not repeatable fails UNAVAILABLE
    where it landed on the dying one, and is not repeated there."""
    dying, healthy = Dying(), Flaky(failures=0)
    async with (
        serving(dying) as dying_address,
        serving(healthy) as healthy_address,
        RelmanClient(
            deploy=[dying_address, healthy_address],
            audit=[dying_address, healthy_address],
            token="rm_secret",
        ) as relman,
    ):
        for n in range(20):
            logged = await relman.audit.LogAction(
                audit_pb2.LogActionRequest(action="client.balanced", resource_id=str(n))
            )
            assert logged.action == "client.balanced"
        outcomes = []
        for _ in range(20):
            try:
                await relman.deploy.RecordDeploymentMetric(
                    deploy_pb2.RecordDeploymentMetricRequest(deployment_id=str(uuid.uuid4()))
                )
                outcomes.append("OK")
            except Unavailable:
                outcomes.append("UNAVAILABLE")
    assert len(healthy.attempts["LogAction"]) == 20  # each call once on the live replica
    assert dying.attempts["LogAction"] >= 1  # round robin sent some there first
    assert dying.attempts["RecordDeploymentMetric"] == outcomes.count("UNAVAILABLE") >= 1
    assert len(healthy.attempts["RecordDeploymentMetric"]) == outcomes.count("OK") >= 1


class Watched(audit_pb2_grpc.AuditServiceServicer, deploy_pb2_grpc.DeployServiceServicer):
    """A watch whose first call is cut after one snapshot (as `ending` says); the next
    call starts again with the same snapshot, then the deployment's end."""

    def __init__(self, ending) -> None:
        self.ending = ending
        self.calls = 0

    async def WatchDeployment(self, request, context):
        self.calls += 1
        pending = common_pb2.Deployment(
            id=request.deployment_id, status=S.DEPLOYMENT_STATUS_PENDING
        )
        yield pending
        if self.calls == 1:
            await self.ending(context)
        yield common_pb2.Deployment(id=request.deployment_id, status=S.DEPLOYMENT_STATUS_SUCCEEDED)


async def _watch(servicer, **options) -> list[int]:
    async with (
        serving(servicer) as address,
        RelmanClient(deploy=address, audit=address, token="rm_secret") as relman,
    ):
        return [d.status async for d in relman.watch_deployment("d-1", **options)]


async def test_a_watch_cut_in_transit_is_reopened_and_misses_nothing():
    for cut in (
        lambda context: context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone"),
        # What a proxy's RST_STREAM becomes: INTERNAL without relman's ErrorInfo.
        lambda context: context.abort(grpc.StatusCode.INTERNAL, "stream reset"),
    ):
        servicer = Watched(cut)
        statuses = await _watch(servicer)
        assert statuses == [S.DEPLOYMENT_STATUS_PENDING, S.DEPLOYMENT_STATUS_SUCCEEDED]
        assert servicer.calls == 2  # re-opened once; the repeated snapshot given once


async def test_a_watch_refused_by_relman_is_not_reopened():
    async def bug(context):
        await context.abort_with_status(server_errors.DomainError("internal error").to_status())

    servicer = Watched(bug)
    with pytest.raises(RelmanError) as refused:
        await _watch(servicer)
    assert refused.value.code() == grpc.StatusCode.INTERNAL and refused.value.reason == "INTERNAL"
    assert servicer.calls == 1


async def test_a_list_of_replicas_over_tls_is_checked_against_the_authority_given(tmp_path):
    """gRPC would check the certificate against the list itself: `authority` names the
    host the certificate is for."""
    ca_key, ca = _issue("relman test CA", None, None, ca=True)
    key, cert = _issue(
        "relman", ca_key, ca.subject, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    key_path, cert_path = _write(tmp_path, "server", key, cert)
    pair = [(key_path.read_bytes(), cert_path.read_bytes())]
    credentials = grpc.ssl_channel_credentials(ca.public_bytes(serialization.Encoding.PEM))
    servers, addresses = [], []
    for _ in range(2):
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        audit_pb2_grpc.add_AuditServiceServicer_to_server(Flaky(failures=0), server)
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    request = audit_pb2.LogActionRequest(action="client.tls")

    def client(authority: str) -> RelmanClient:
        return RelmanClient(
            deploy=addresses,
            audit=addresses,
            token="t",
            credentials=credentials,
            authority=authority,
        )

    try:
        async with client("localhost") as relman:
            assert (await relman.audit.LogAction(request)).action == "client.tls"
        async with client("elsewhere.example") as relman:
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await relman.audit.LogAction(request, timeout=1)
    finally:
        for server in servers:
            await server.stop(None)
