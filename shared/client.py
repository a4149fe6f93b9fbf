"""Channels for internal callers of relman: the token on every call, default deadlines,
and retries on UNAVAILABLE (gRPC's own, with exponential backoff and jitter) for the
calls that are safe to repeat.

Safe to repeat: reads (Get*, List*, WhoAmI, WatchDeployment, ExportAuditLogs) and
calls whose request has a `request_id` (AIP-155: creates, stage updates, votes,
cancels, rollbacks, LogAction): the helper fills in a new one when the caller left it
empty, so a retry returns the first attempt's answer instead of acting twice (a
CreateApiToken whose first attempt went through returns the record without its secret,
which is never sent twice). Everything else (other updates, metrics, deletes, LogActions
streams) is tried once.

    async with RelmanClient(deploy="deploy:50051", audit="audit:50052", token=token) as relman:
        await relman.audit.LogAction(audit_pb2.LogActionRequest(
            action="release.shipped", resource_type="service", resource_id="payments"))
        deployment = await relman.deploy.PromoteRelease(deploy_pb2.PromoteReleaseRequest(
            release_id=release_id, target_environment_id=staging_id))

Every failed call raises a `RelmanError` of the status code's class (named as
google-api-core names them) with the server's rich details already unpacked, so
callers branch on a reason instead of parsing trailers:

    try:
        await relman.deploy.PromoteRelease(request)
    except FailedPrecondition as error:
        if error.reason == "REQUIRED_STAGES_NOT_PASSED": ...

RelmanError subclasses grpc.aio.AioRpcError, so `except grpc.aio.AioRpcError`,
`.code()`, `.details()` and `.trailing_metadata()` keep working as before.

Several replicas: give a service a list of addresses and the channel balances per call
over them (`round_robin`: each call goes to the next connected replica); a repeatable
call that meets a replica dying is retried by gRPC on the next one, the others fail
UNAVAILABLE. A balancer in front (nginx, docker/nginx.conf) is one address instead:

    async with RelmanClient(
        deploy=["10.0.0.7:50051", "10.0.0.8:50051"],
        audit=["10.0.0.7:50052", "10.0.0.8:50052"],
        token=token,
    ) as relman:
        async for deployment in relman.watch_deployment(deployment_id):
            ...  # re-opened on another replica when the one serving it goes away
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from relman.v1 import audit_pb2_grpc, auth_pb2_grpc, common_pb2, deploy_pb2, deploy_pb2_grpc
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
# A watch cut this many times in a row (UNAVAILABLE, or a proxy's reset stream) without
# a message between is given up (the error is raised); between attempts, RETRY_POLICY's
# backoff.
WATCH_REOPEN_ATTEMPTS = 5


def _repeatable(method) -> bool:
    name = method.name
    reads = name.startswith(("Get", "List")) or name in {"WhoAmI", *_OPEN_ENDED}
    return reads or "request_id" in method.input_type.fields_by_name


def service_config() -> dict:
    """The gRPC service config: per-call round robin over the target's addresses, a
    deadline for every call but the open-ended ones, and the retry policy for the
    repeatable ones.

    round_robin with one address is that address; with several (a list, or a DNS name
    with several records, `dns:///deploy-svc:50051`) each call goes to the next ready
    one, and a retry, after UNAVAILABLE, to the next again: a replica that died is not
    ready, so the retry lands on a live one."""
    configs = []
    for method in rpc_methods():
        config = {"name": [{"service": method.containing_service.full_name, "method": method.name}]}
        if method.name not in _OPEN_ENDED:
            config["timeout"] = f"{DEFAULT_DEADLINE_S}s"
        if _repeatable(method):
            config["retryPolicy"] = RETRY_POLICY
        configs.append(config)
    return {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": configs}


# -- typed errors ------------------------------------------------------------------------------

# The google.rpc detail types a relman server (or gRPC itself) may send; others stay Any.
_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


class FieldViolation(NamedTuple):
    """One bad request field (google.rpc.BadRequest); compares equal to a plain tuple."""

    field: str
    description: str


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailer, or None when there is none or it disagrees
    with the call's own code and message (then the transport's status is the truth)."""
    try:
        return rpc_status.from_call(error)
    except (ValueError, message.DecodeError):
        return None


def _unpack(detail: any_pb2.Any) -> message.Message:
    for detail_type in _DETAIL_TYPES:
        if detail.Is(detail_type.DESCRIPTOR):
            unpacked = detail_type()
            detail.Unpack(unpacked)
            return unpacked
    return detail


class RelmanError(grpc.aio.AioRpcError):
    """A failed relman call with its AIP-193 details unpacked.

    A subclass of AioRpcError built from the same five values (so it pickles as one,
    and code that catches AioRpcError or calls `.code()` / `.details()` still works):
    the status code is `.code()` (and `grpc_status_code`), the message `.details()`
    (and `message`). The raw unpacked detail messages are `error_details`, not
    google-api-core's `details`, which AioRpcError already uses for the message.
    The original AioRpcError is `__cause__`.
    """

    grpc_status_code: grpc.StatusCode | None = None  # fixed by each subclass

    def __init__(
        self,
        code: grpc.StatusCode,
        initial_metadata: grpc.aio.Metadata | None = None,
        trailing_metadata: grpc.aio.Metadata | None = None,
        details: str | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(code, initial_metadata, trailing_metadata, details, debug_error_string)
        self.grpc_status_code = code
        self.message: str = details or ""
        status = _rich_status(self)
        self.error_details: list[message.Message] = (
            [_unpack(detail) for detail in status.details] if status is not None else []
        )
        self.error_info: error_details_pb2.ErrorInfo | None = None
        self.field_violations: list[FieldViolation] = []
        self.retry_delay: float | None = None
        for detail in self.error_details:
            if isinstance(detail, error_details_pb2.ErrorInfo) and self.error_info is None:
                self.error_info = detail
            elif isinstance(detail, error_details_pb2.BadRequest):
                self.field_violations.extend(
                    FieldViolation(v.field, v.description) for v in detail.field_violations
                )
            elif isinstance(detail, error_details_pb2.RetryInfo) and self.retry_delay is None:
                self.retry_delay = detail.retry_delay.ToTimedelta().total_seconds()
        info = self.error_info
        self.reason: str = info.reason if info is not None else ""
        self.domain: str = info.domain if info is not None else ""
        self.metadata: dict[str, str] = dict(info.metadata) if info is not None else {}

    def __str__(self) -> str:
        text = f"{self.code().name}"
        if self.reason:
            text += f" {self.reason}"
        text += f": {self.message}"
        if self.field_violations:
            text += " [" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + "]"
        return text


class InvalidArgument(RelmanError):
    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RelmanError):
    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RelmanError):
    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RelmanError):
    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RelmanError):
    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(RelmanError):
    """A rule blocks the action: retrying will not help until the state changes."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RelmanError):
    """A lost race: retrying the whole read-modify-write is safe."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRange(RelmanError):
    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(RelmanError):
    """A limit was reached: retry after `retry_delay` when it is known."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RelmanError):
    """Still failing after the service config's retries (or not retried: not repeatable)."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RelmanError):
    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(RelmanError):
    grpc_status_code = grpc.StatusCode.INTERNAL


class Unknown(RelmanError):
    grpc_status_code = grpc.StatusCode.UNKNOWN


class Cancelled(RelmanError):
    """Cancelled by the server; a caller's own cancel is asyncio.CancelledError, as before."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class Unimplemented(RelmanError):
    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class DataLoss(RelmanError):
    grpc_status_code = grpc.StatusCode.DATA_LOSS


_ERROR_CLASSES: dict[grpc.StatusCode, type[RelmanError]] = {
    cls.grpc_status_code: cls for cls in RelmanError.__subclasses__()
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> RelmanError:
    """The typed error for a failed call (the same object if it is typed already)."""
    if isinstance(error, RelmanError):
        return error
    typed = _ERROR_CLASSES.get(error.code(), RelmanError)(
        error.code(),
        error.initial_metadata(),
        error.trailing_metadata(),
        error.details(),
        error.debug_error_string(),
    )
    typed.__cause__ = error
    return typed


@contextlib.contextmanager
def _typed_errors():
    try:
        yield
    except RelmanError:
        raise
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from error


class _TypedCall:
    """A call that raises typed errors where the RPC's status surfaces: awaiting the
    response, reading or iterating responses. The rest goes to the call as it is, so
    metadata, code() and cancel() are the call's own; gRPC's retries happen underneath."""

    def __init__(self, call) -> None:
        self._call = call

    def cancel(self) -> bool:
        return self._call.cancel()

    def cancelled(self) -> bool:
        return self._call.cancelled()

    def done(self) -> bool:
        return self._call.done()

    def add_done_callback(self, callback) -> None:
        self._call.add_done_callback(callback)

    def time_remaining(self) -> float | None:
        return self._call.time_remaining()

    async def initial_metadata(self):
        return await self._call.initial_metadata()

    async def trailing_metadata(self):
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def details(self) -> str:
        return await self._call.details()

    async def debug_error_string(self) -> str | None:
        return await self._call.debug_error_string()

    async def wait_for_connection(self) -> None:
        with _typed_errors():
            await self._call.wait_for_connection()


class _OneResponse:
    def __await__(self):
        with _typed_errors():
            response = yield from self._call.__await__()
        return response


class _StreamedResponses:
    _responses = None

    def __aiter__(self):
        if self._responses is None:
            self._responses = self._iterate()
        return self._responses

    async def _iterate(self):
        with _typed_errors():
            async for response in self._call:
                yield response

    async def read(self):
        with _typed_errors():
            return await self._call.read()


class _StreamedRequests:
    async def write(self, request) -> None:
        with _typed_errors():
            await self._call.write(request)

    async def done_writing(self) -> None:
        with _typed_errors():
            await self._call.done_writing()

    @property
    def _done_writing_flag(self) -> bool:  # read by grpc.aio's intercepted write()
        return self._call._done_writing_flag


class _UnaryUnary(_OneResponse, _TypedCall, grpc.aio.UnaryUnaryCall):
    pass


class _UnaryStream(_StreamedResponses, _TypedCall, grpc.aio.UnaryStreamCall):
    pass


class _StreamUnary(_OneResponse, _StreamedRequests, _TypedCall, grpc.aio.StreamUnaryCall):
    pass


class _StreamStream(_StreamedResponses, _StreamedRequests, _TypedCall, grpc.aio.StreamStreamCall):
    pass


class _Caller:
    """Adds the token to every call, and a request_id to requests that have none; the
    call it returns raises typed errors. One subclass per arity: grpc.aio files an
    interceptor under the first arity it implements only, so one class for all four
    would leave streaming calls without the token."""

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


class _UnaryUnaryCaller(_Caller, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        call = await continuation(self._details(details), self._with_request_id(request))
        return _UnaryUnary(call)


class _UnaryStreamCaller(_Caller, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return _UnaryStream(await continuation(self._details(details), request))


class _StreamUnaryCaller(_Caller, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return _StreamUnary(await continuation(self._details(details), requests))


class _StreamStreamCaller(_Caller, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return _StreamStream(await continuation(self._details(details), requests))


_CALLERS = (_UnaryUnaryCaller, _UnaryStreamCaller, _StreamUnaryCaller, _StreamStreamCaller)


def target(addresses: str | Sequence[str]) -> str:
    """The gRPC target of one address (as it is: `host:port`, `dns:///name:port`...) or of
    a list of replicas' `ip:port` addresses (`ipv4:a:p,b:p` or `ipv6:[a]:p,[b]:p`).

    A list names addresses, not host names (gRPC's ipv4:/ipv6: targets resolve nothing),
    all of one family; anything else is a ValueError at once, not a channel that never
    connects. For host names with several addresses use one `dns:///` target."""
    if isinstance(addresses, str):
        return addresses
    addresses = list(addresses)
    if len(addresses) == 1:
        return addresses[0]
    if not addresses:
        raise ValueError("no address given")
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            ip = None
        if ip is None or not sep or not port.isdigit() or (ip.version == 6) != host.startswith("["):
            raise ValueError(
                f"{address!r} is not ip:port ([ipv6]:port): a list names replicas by address"
            )
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError(f"{addresses} mixes IPv4 and IPv6: gRPC balances over one family")
    return f"ipv{families.pop()}:{','.join(addresses)}"


def channel(
    address: str | Sequence[str],
    token: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    authority: str | None = None,
) -> grpc.aio.Channel:
    """A channel to one relman service (one address, or its replicas' addresses: see
    `target`), with the token, deadlines, retries and per-call round robin. `authority`:
    the name the servers' TLS certificate carries, when the target is a list of
    addresses."""
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config())),
    ]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    interceptors = [caller(token) for caller in _CALLERS]
    if credentials is None:
        return grpc.aio.insecure_channel(
            target(address), options=options, interceptors=interceptors
        )
    return grpc.aio.secure_channel(target(address), credentials, options, interceptors=interceptors)


class RelmanClient:
    """Stubs of both services over channels from `channel()`; an async context manager.
    `deploy` and `audit` are each one address or a list of replicas' addresses."""

    def __init__(
        self,
        *,
        deploy: str | Sequence[str],
        audit: str | Sequence[str],
        token: str,
        credentials: grpc.ChannelCredentials | None = None,
        authority: str | None = None,
    ) -> None:
        self._deploy_channel = channel(deploy, token, credentials, authority=authority)
        self._audit_channel = channel(audit, token, credentials, authority=authority)
        self.deploy = deploy_pb2_grpc.DeployServiceStub(self._deploy_channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(self._deploy_channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self._audit_channel)

    async def watch_deployment(
        self, deployment_id: str, *, attempts: int = WATCH_REOPEN_ATTEMPTS
    ) -> AsyncIterator[common_pb2.Deployment]:
        """The deployment's snapshots as they change, until it ends (a terminal status),
        surviving the replica that serves the watch.

        A watch is one long call to one replica: when that replica dies or drains the
        call ends, and gRPC's retries no longer apply (the first message was received).
        Directly, it ends UNAVAILABLE; through nginx, whose response to the client had
        begun, it ends with a reset stream, which gRPC reports as INTERNAL without the
        ErrorInfo every relman status carries (`cut_in_transit`). Either way the watch
        is opened again (on another replica: the dead one is not ready) after a backoff,
        and the server starts it with the deployment as it is then, so no change made
        meanwhile is missed; a snapshot equal to the last one given is not given twice.
        After `attempts` such failures in a row without a new snapshot the last error is
        raised; any other error at once (a relman INTERNAL too: a bug is not retried)."""
        request = deploy_pb2.WatchDeploymentRequest(deployment_id=deployment_id)
        failures, last = 0, None
        while True:
            call = self.deploy.WatchDeployment(request)
            try:
                async for snapshot in call:
                    if snapshot != last:  # only news counts as progress: a replica
                        failures = 0  # that cuts every re-opened watch at once cannot
                        last = snapshot  # keep this loop going for ever
                        yield snapshot
                return
            except RelmanError as error:
                failures += 1
                if not cut_in_transit(error) or failures >= attempts:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(_backoff_s(failures))

    async def __aenter__(self) -> RelmanClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._deploy_channel.close()
        await self._audit_channel.close()


def cut_in_transit(error: RelmanError) -> bool:
    """Whether a call failed because its connection to a replica was lost, not because a
    relman server answered: UNAVAILABLE, or INTERNAL without relman's ErrorInfo (a
    proxy's RST_STREAM after the replica behind it died mid-stream)."""
    if isinstance(error, Unavailable):
        return True
    return isinstance(error, Internal) and error.error_info is None


def _backoff_s(failures: int) -> float:
    """RETRY_POLICY's backoff for the `failures`-th attempt: exponential, full jitter."""
    initial = float(RETRY_POLICY["initialBackoff"].rstrip("s"))
    ceiling = float(RETRY_POLICY["maxBackoff"].rstrip("s"))
    multiplier = RETRY_POLICY["backoffMultiplier"]
    return random.uniform(0, min(ceiling, initial * multiplier ** (failures - 1)))
