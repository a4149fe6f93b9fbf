"""Domain exceptions, and their one mapping to gRPC statuses with rich details (AIP-193).

Server framework. The domain raises these without knowing gRPC; the call-lifecycle
interceptor (shared.framework.interceptors) turns each, through `from_exception`, into
a status whose details carry a google.rpc.ErrorInfo (reason, domain "relman", the ids
involved), for INVALID_ARGUMENT a google.rpc.BadRequest with one field violation per
bad field, and when waiting helps (a throttled login) a google.rpc.RetryInfo saying
how long. Database failures become UNAVAILABLE, DEADLINE_EXCEEDED or ABORTED;
anything else is a bug: INTERNAL, logged with its traceback, answered without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import asyncpg
import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

DOMAIN = "relman"
log = logging.getLogger("relman.errors")


class DomainError(Exception):
    """A refusal the caller can act on. Subclasses fix the status code; the default reason
    is the code's name unless a subclass names another."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__ and "default_reason" not in cls.__dict__:
            cls.default_reason = cls.code.name

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.field_violations = dict(field_violations or {})
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        details = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        ]
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations.items()
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(max(0, round(self.retry_after_s * 1000)))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return rpc_status.to_status(
            status_pb2.Status(
                code=getattr(code_pb2, self.code.name), message=self.message, details=packed
            )
        )


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def field(cls, field: str, description: str, **kwargs) -> InvalidArgument:
        """One bad field: `InvalidArgument.field("runbook_id", "not a UUID")`."""
        return cls(f"{field}: {description}", field_violations={field: description}, **kwargs)


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    """A rule blocks the action: do not retry until the state changes."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DomainError):
    """A lost race: retrying is safe."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DomainError):
    """A limit was reached: retry later (after `retry_after_s` when it is known)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    """The database cannot be reached: retry with backoff."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DATABASE_UNAVAILABLE"


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization failure, deadlock
# The server ends or refuses the session: admin shutdown (a restart), crash shutdown,
# still starting up. The next attempt meets a new server.
_SHUTDOWN_SQLSTATES = {"57P01", "57P02", "57P03"}
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection the server ended (a restart) used before its socket closed: asyncpg
    # is still reading the server's last error ("another operation is in progress").
    asyncpg.InternalClientError,
)


# A rule the database holds by a named constraint or trigger, as the status its refusal
# gives the caller: registered by the domain that owns the rule. Looked up first, so a
# unique constraint registered here answers with its own reason instead of CONFLICT.
CONSTRAINT_ERRORS: dict[str, Callable[[], DomainError]] = {}


def missing_partition(driver_error: BaseException) -> bool:
    """Whether the database refused a row for want of a partition to hold it (a check
    violation naming no constraint): audit_logs' month not made yet. Retrying helps once
    it is, which is what UNAVAILABLE tells a caller; INTERNAL would say "do not retry"."""
    return (
        getattr(driver_error, "sqlstate", None) == "23514"
        and getattr(driver_error, "constraint_name", None) is None
    )


def from_exception(exc: BaseException) -> DomainError:
    """The status a failure maps to: domain errors as they are, database trouble by kind."""
    if isinstance(exc, DomainError):
        return exc
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    # SQLAlchemy's asyncpg adapter keeps the driver's exception as __cause__.
    driver_error = getattr(cause, "__cause__", None) or cause
    if isinstance(exc, TimeoutError) or isinstance(driver_error, asyncpg.QueryCanceledError):
        return DeadlineExceeded("the call's deadline passed while waiting for the database")
    if (named := CONSTRAINT_ERRORS.get(getattr(driver_error, "constraint_name", None))) is not None:
        return named()
    if getattr(driver_error, "sqlstate", None) == "23505":  # a unique constraint held a race
        constraint = getattr(driver_error, "constraint_name", None) or ""
        return AlreadyExists(
            "conflicts with an existing record",
            reason="CONFLICT",
            metadata={"constraint": constraint},
        )
    if missing_partition(driver_error):
        return Unavailable(
            "no partition of the audit trail holds this month yet; retry shortly",
            reason="AUDIT_PARTITION_MISSING",
        )
    if getattr(driver_error, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return Aborted("the transaction lost a race with another; retry", reason="CONFLICT")
    if (
        isinstance(driver_error, _CONNECTION_ERRORS)
        or getattr(driver_error, "sqlstate", None) in _SHUTDOWN_SQLSTATES
        or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)
    ):
        return Unavailable("the database is unreachable; retry with backoff")
    log.error("unexpected error", exc_info=exc)
    return DomainError("internal error", reason="INTERNAL")
