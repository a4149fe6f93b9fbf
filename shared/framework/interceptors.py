"""The three interceptors every relman call passes through, outermost first, and the drain.

Server framework: `CallLifecycleInterceptor` takes a call from its arrival to its status
(the drain, the request id, the request check, the status of a failure, the log line and
metrics); `AuthInterceptor` admits the caller; `NamesInterceptor` puts ids in place of
the resource names in the request (shared.framework.names). `Drain` holds the calls in
flight; the server closes it when it stops (shared.framework.server). Each interceptor
wraps a method's handler once and keeps it, so a call costs a dict lookup per
interceptor, not a rebuild. Each wraps the handler's own coroutine (or async generator),
so they run in the task that serves the call: the caller's Actor set here is what the
servicer sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what a write to an ended call raises

from shared.framework.errors import InvalidArgument, Unavailable, from_exception
from shared.framework.names import NameResolver, plan_of
from shared.framework.observability import (
    REQUEST_ID,
    CallRecord,
    call_finished,
    call_started,
    current_call,
    grpc_type,
    message_received,
    message_sent,
)
from shared.identity.actor import current_actor
from shared.identity.auth import Authenticator
from shared.persistence.db import call_deadline

_UNDRAINED = ("/grpc.health.", "/grpc.reflection.")  # probes and reflection answer until the end
_REQUEST_STREAMS = ("client_stream", "bidi_stream")
_RESPONSE_STREAMS = ("server_stream", "bidi_stream")
# What a call's status is made from; AbortError (an abort already sent) passes through.
_FAILURES = (Exception, asyncio.CancelledError)
# The metadata a caller asks for a compressed response stream with, and its words.
COMPRESSION = "x-relman-compression"
COMPRESSIONS = {"gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once and keeps it: services are registered before the
    server starts, so the wrapped handler of a method never changes (no rebuild per call)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: not kept, callers choose the names
            return None
        self._wrapped[method] = wrapped = self.wrap(handler, method)
        return wrapped


def _rewrap(
    handler: grpc.RpcMethodHandler, wrap, request_deserializer=None
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `wrap` (and, if given, another
    request deserializer)."""
    codec = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **codec)


# -- the calls in flight ---------------------------------------------------------------------


STOPPED = Unavailable(
    "the server stopped before the call finished; retry", reason="SERVER_STOPPING"
)


class Drain:
    """The calls in flight, for a stop that answers every call OK or UNAVAILABLE.

    gRPC's own stop answers a call that arrives just as it begins with CANCELLED
    (seen: 1 call in 400 sent across a stop of a plain grpc.aio server), which no
    client retries. So on SIGTERM this comes first: new calls are refused with
    UNAVAILABLE (reason SERVER_STOPPING) while the port stays open, open-ended calls
    (watches) end at once, the others get the grace period to finish and are then
    ended, all with UNAVAILABLE; only then does the gRPC server stop.
    """

    def __init__(self, open_ended: frozenset[str]) -> None:
        self.open_ended = open_ended
        self.closing = False
        self._calls: dict[asyncio.Task, str] = {}  # the task serving each call -> method
        self._ended: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, method: str) -> asyncio.Task:
        """Admits a call (or refuses it, once stopping); returns the key `leave` takes.

        The key is the task serving the call, kept here: a stream handler's generator
        may be closed from another task (gRPC closes it after a cancel)."""
        if self.closing:
            raise Unavailable(
                "the server is stopping; retry (another replica serves)",
                reason="SERVER_STOPPING",
            )
        task = asyncio.current_task()
        self._calls[task] = method
        self._idle.clear()
        return task

    def leave(self, task: asyncio.Task) -> None:
        self._calls.pop(task, None)
        self._ended.discard(task)
        if not self._calls:
            self._idle.set()

    def ended_by_stop(self, task: asyncio.Task) -> bool:
        """Whether `task` was cancelled by `close` (then its call answers UNAVAILABLE)."""
        if task not in self._ended:
            return False
        task.uncancel()
        return True

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def _end(self, which: Callable[[str], bool]) -> int:
        tasks = [task for task, method in self._calls.items() if which(method)]
        for task in tasks:
            self._ended.add(task)
            task.cancel()
        return len(tasks)

    async def close(self, grace_s: float) -> int:
        """Refuses new calls, ends open-ended ones, lets the others run until shortly
        before `grace_s` is over and ends those still running; returns how many calls
        were ended. Returns within `grace_s`."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        ended = self._end(lambda method: method in self.open_ended)
        # Ended calls need a moment to roll back and answer: keep some of the grace for it.
        margin = min(1.0, grace_s / 4)
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, grace_s - margin))
        except TimeoutError:
            ended += self._end(lambda method: True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - time.monotonic()))
        return ended


# -- the call's lifecycle -------------------------------------------------------------------


class CallLifecycleInterceptor(_WrappingInterceptor):
    """The outermost wrapper: every call from its arrival to its status, in the steps of
    `_Call` (start, begin, fail, end) with the request check of `_MethodCalls`. What does
    not change between two calls of a method is decided once, when it is wrapped."""

    def __init__(self, drain: Drain) -> None:
        super().__init__()
        self.drain = drain

    def wrap(self, handler, method):
        drain = None if method.startswith(_UNDRAINED) else self.drain
        calls = _MethodCalls(method, grpc_type(handler), drain)
        return _rewrap(
            handler, calls.guard, request_deserializer=_tolerant(handler.request_deserializer)
        )


class _MethodCalls:
    """What every call of one method shares: its name and kind, whether the drain tracks
    it, how its request is checked."""

    def __init__(self, name: str, kind: str, drain: Drain | None) -> None:
        self.name = name
        self.kind = kind
        self.drain = drain
        self.streams_responses = kind in _RESPONSE_STREAMS
        self.check = _checked_stream if kind in _REQUEST_STREAMS else _checked_message

    def guard(self, behaviour):
        """`behaviour` run as one `_Call`: a response generator, or a coroutine (which, for
        a response stream, writes its messages itself with context.write). Two wrappers,
        since a generator cannot share a `try` with a coroutine; an async context manager
        could, at the cost of one more coroutine per call."""
        if inspect.isasyncgenfunction(behaviour):
            return self._guard_yielding(behaviour)
        return self._guard_returning(behaviour)

    def _guard_yielding(self, behaviour):
        check = self.check

        async def guarded_stream(request, context):
            call = _Call(self, context)
            try:
                await call.begin()
                async for response in behaviour(check(request, call.record), context):
                    yield response
                    message_sent(call.record)
            except _FAILURES as exc:
                await call.fail(exc)
            finally:
                call.end()

        return guarded_stream

    def _guard_returning(self, behaviour):
        check = self.check
        writes_itself = self.streams_responses

        async def guarded(request, context):
            call = _Call(self, context)
            try:
                await call.begin()
                if writes_itself:
                    return await behaviour(
                        check(request, call.record), _CountedWrites(context, call.record)
                    )
                response = await behaviour(check(request, call.record), context)
                message_sent(call.record)
                return response
            except _FAILURES as exc:
                await call.fail(exc)
            finally:
                call.end()

        return guarded


def asked_compression(context: grpc.aio.ServicerContext) -> grpc.Compression | None:
    """The compression a caller asked for its response stream (COMPRESSION; `identity` or
    no header: none); INVALID_ARGUMENT for a word gRPC has no algorithm for.

    An explicit ask, since gRPC's own signals cannot be one: every client lists gzip in
    grpc-accept-encoding (compressing on that would cost every stream CPU on both ends),
    and a servicer sees neither that header nor the request's grpc-encoding. Asking is
    also the caller's word that it can read it: gRPC sends what set_compression names
    even to a client that does not list it."""
    compression = None
    for key, value in context.invocation_metadata() or ():
        if key == COMPRESSION:
            word = value.strip().lower()
            if word != "identity" and word not in COMPRESSIONS:
                raise InvalidArgument(
                    f"{COMPRESSION}: {value[:40]!r} is none of identity, "
                    + ", ".join(COMPRESSIONS),
                    reason="UNSUPPORTED_COMPRESSION",
                    metadata={"supported": ",".join(("identity", *COMPRESSIONS))},
                )
            compression = COMPRESSIONS.get(word)
    return compression


class _Call:
    """One call in flight, in its steps: `start` (constructor), `begin`, then `fail` if the
    handler raised, and `end` whatever happened."""

    __slots__ = ("code", "context", "key", "method", "record")  # one per call: lighter

    def __init__(self, method: _MethodCalls, context: grpc.aio.ServicerContext) -> None:
        """Start: the caller's deadline bounds every unit of work of the call
        (shared.persistence.db), and the call's record (its log line and metrics) opens."""
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.key: asyncio.Task | None = None
        remaining = context.time_remaining()
        call_deadline.set(None if remaining is None else time.monotonic() + remaining)
        self.record = call_started(method.name, method.kind, context)

    async def begin(self) -> None:
        """Echoes the request id (a response stream compressed first if its caller asked:
        asked_compression), then enters the drain (which refuses it once stopping).

        The id goes in the initial metadata of a response stream (there before the first
        message), in the trailing metadata of a single response (sent with the status: a
        separate initial-metadata write cost about a quarter of LogAction's throughput,
        make bench)."""
        echo = ((REQUEST_ID, self.record.request_id),)
        if self.method.streams_responses:
            if (compression := asked_compression(self.context)) is not None:
                self.context.set_compression(compression)
            await self.context.send_initial_metadata(echo)
        else:
            self.context.set_trailing_metadata(echo)
        if self.method.drain is not None:
            self.key = self.method.drain.enter(self.method.name)

    async def fail(self, exc: BaseException) -> None:
        """Answers the call with the status `exc` maps to (errors.from_exception) and the
        request id, by raising AbortError. An abort already sent passes through; a
        cancellation that is not the drain's is the caller's: re-raised."""
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            if self.key is None or not self.method.drain.ended_by_stop(self.key):
                remaining = self.context.time_remaining()
                expired = remaining is not None and remaining <= 0
                self.code = (
                    grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                )
                raise exc
            exc = STOPPED
        error = from_exception(exc)
        self.code = error.code
        status = error.to_status()
        await self.context.abort_with_status(
            status._replace(
                trailing_metadata=(
                    *status.trailing_metadata,
                    (REQUEST_ID, self.record.request_id),
                )
            )
        )

    def end(self) -> None:
        """Leaves the drain; the log line is written and the metrics counted."""
        if self.key is not None:
            self.method.drain.leave(self.key)
        call_finished(self.record, self.code)


class _CountedWrites:
    """The context of a stream handler that writes its messages itself (context.write):
    each write counts as a message sent, as each yielded one does."""

    def __init__(self, context: grpc.aio.ServicerContext, record: CallRecord) -> None:
        self._context = context
        self._record = record

    async def write(self, message) -> None:
        """A write that fails because the call already ended (the caller cancelled, or its
        deadline passed while the server waited to send) is the caller's going, not an
        error of ours: it ends the handler as a cancellation, as grpc's own server treats
        a failed batch on a closed call (no INTERNAL, no traceback)."""
        try:
            await self._context.write(message)
        except ExecuteBatchError as exc:
            raise asyncio.CancelledError("the caller's call ended before this message") from exc
        message_sent(self._record)

    def __getattr__(self, name: str):
        return getattr(self._context, name)


# -- the request check ----------------------------------------------------------------------
#
# gRPC answers a request its deserializer refuses with UNKNOWN and logs a traceback. So the
# deserializer hands the handler an _Undecodable instead, and the check answers it
# INVALID_ARGUMENT (reason MALFORMED_REQUEST); each message that passes is counted.


class _Undecodable:
    """A request message that did not parse (corrupt, or nested past protobuf's depth)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    """`deserializer`, returning an _Undecodable where it would raise."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # protobuf's DecodeError, or whatever a parser raises
            return _Undecodable(error)

    return parse


def _refuse_undecodable(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"the request is not a valid message: {request.error}", reason="MALFORMED_REQUEST"
        )


def _checked_message(request, record: CallRecord):
    """The single request of a call, checked and counted."""
    _refuse_undecodable(request)
    message_received(record)
    return request


async def _checked_stream(requests, record: CallRecord):
    """A request stream whose undecodable messages raise INVALID_ARGUMENT, counted."""
    async for request in requests:
        _refuse_undecodable(request)
        message_received(record)
        yield request


# -- the caller -----------------------------------------------------------------------------


class AuthInterceptor(_WrappingInterceptor):
    """Admits each call (shared.identity.auth: authenticated, and its permission held);
    its Actor becomes `current_actor`."""

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self.authenticator = authenticator

    def wrap(self, handler, method):
        if self.authenticator.is_open(method):
            return handler
        return _rewrap(handler, lambda behaviour: self._admitting(behaviour, method))

    def _admitting(self, behaviour, method: str):
        authenticate = self.authenticator.authenticate_and_authorize

        if inspect.isasyncgenfunction(behaviour):

            async def admitted_stream(request, context):
                reset = current_actor.set(_named(await authenticate(method, context)))
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    current_actor.reset(reset)

            return admitted_stream

        async def admitted(request, context):
            reset = current_actor.set(_named(await authenticate(method, context)))
            try:
                return await behaviour(request, context)
            finally:
                current_actor.reset(reset)

        return admitted


def _named(actor):
    """The caller, also written into the call's log line."""
    record = current_call.get()
    if record is not None:
        record.caller = actor.username
    return actor


# -- names ------------------------------------------------------------------------------------


class NamesInterceptor(_WrappingInterceptor):
    """Puts the ids the names of a request stand for in their place, after the caller is
    admitted (a caller without the right learns nothing of which names exist). Methods
    whose requests hold no ids are not wrapped."""

    def __init__(self, resolver: NameResolver) -> None:
        super().__init__()
        self.resolver = resolver

    def wrap(self, handler, method):
        shape = plan_of(method)
        # A request stream's names are its use case's (shared.framework.names says why).
        streamed = handler.stream_unary is not None or handler.stream_stream is not None
        if not shape or streamed:
            return handler
        return _rewrap(handler, lambda behaviour: self._resolving(behaviour, shape))

    def _resolving(self, behaviour, shape):
        resolve = self.resolver.resolve

        if inspect.isasyncgenfunction(behaviour):

            async def resolved_stream(request, context):
                await resolve(request, shape)
                async for response in behaviour(request, context):
                    yield response

            return resolved_stream

        async def resolved(request, context):
            await resolve(request, shape)
            return await behaviour(request, context)

        return resolved
