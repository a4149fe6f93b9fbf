"""Channels for internal callers of relman: the token on every call, default deadlines,
and retries on UNAVAILABLE (gRPC's own, with exponential backoff and jitter) for the
calls that are safe to repeat.

Safe to repeat: reads (Get*, List*, WhoAmI, WatchDeployment, ExportAuditLogs) and
creates whose request has a `request_id` (AIP-155): the helper fills in a new one
when the caller left it empty, so a retried create returns the first attempt's row
instead of making a second. Everything else (stage updates, votes, cancels,
LogActions streams) is tried once.

    async with RelmanClient(deploy="deploy:50051", audit="audit:50052", token=token) as relman:
        await relman.audit.LogAction(audit_pb2.LogActionRequest(
            action="release.shipped", resource_type="service", resource_id="payments"))
        deployment = await relman.deploy.PromoteRelease(deploy_pb2.PromoteReleaseRequest(
            release_id=release_id, target_environment_id=staging_id))
"""

from __future__ import annotations

import json
import uuid

import grpc

from relman.v1 import audit_pb2_grpc, auth_pb2_grpc, deploy_pb2_grpc
from shared.framework.protos import rpc_methods

DEFAULT_DEADLINE_S = 30
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "3s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
_OPEN_ENDED = {"WatchDeployment", "ExportAuditLogs"}  # no default deadline


def _repeatable(method) -> bool:
    name = method.name
    reads = name.startswith(("Get", "List")) or name in {"WhoAmI", *_OPEN_ENDED}
    return reads or "request_id" in method.input_type.fields_by_name


def service_config() -> dict:
    """The gRPC service config: a deadline for every call but the open-ended ones, and
    the retry policy for the repeatable ones."""
    configs = []
    for method in rpc_methods():
        config = {"name": [{"service": method.containing_service.full_name, "method": method.name}]}
        if method.name not in _OPEN_ENDED:
            config["timeout"] = f"{DEFAULT_DEADLINE_S}s"
        if _repeatable(method):
            config["retryPolicy"] = RETRY_POLICY
        configs.append(config)
    return {"methodConfig": configs}


class _Caller(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds the token to every call, and a request_id to creates that have none."""

    def __init__(self, token: str) -> None:
        self.authorization = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self.authorization)
        return details._replace(metadata=metadata)

    @staticmethod
    def _with_request_id(request):
        if "request_id" in type(request).DESCRIPTOR.fields_by_name and not request.request_id:
            filled = type(request)()
            filled.CopyFrom(request)
            filled.request_id = str(uuid.uuid4())
            return filled
        return request

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), self._with_request_id(request))

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def channel(
    address: str, token: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.aio.Channel:
    """A channel to one relman service, with the token, deadlines and retries."""
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config())),
    ]
    interceptors = [_Caller(token)]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options, interceptors=interceptors)


class RelmanClient:
    """Stubs of both services over channels from `channel()`; an async context manager."""

    def __init__(
        self,
        *,
        deploy: str,
        audit: str,
        token: str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._deploy_channel = channel(deploy, token, credentials)
        self._audit_channel = channel(audit, token, credentials)
        self.deploy = deploy_pb2_grpc.DeployServiceStub(self._deploy_channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self._deploy_channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self._audit_channel)

    async def __aenter__(self) -> RelmanClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._deploy_channel.close()
        await self._audit_channel.close()
