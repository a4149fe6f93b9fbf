"""The one place a relman gRPC server is built, started and stopped.

Both `python -m deploy_svc` and `python -m audit_svc` call `main(spec)`:
settings are validated, the database is reached (a short bounded retry), the
server gets the error-mapping interceptor, health and reflection, and listens.

Health (grpc.health.v1): the overall service "" is liveness, SERVING while the
process runs; each `relman.v1.*` service is readiness, following a periodic
database check and turning NOT_SERVING at shutdown. On SIGTERM or SIGINT
readiness turns NOT_SERVING first, then new calls are refused with UNAVAILABLE,
watches end, calls in flight get the grace period to finish (see Drain), the
gRPC server stops, the pool is disposed and the process exits 0.

A start-up failure (bad setting, unreachable database, address in use) is one
line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.framework.config import ConfigError, Settings
from shared.framework.errors import InvalidArgument, Unavailable, from_exception
from shared.framework.observability import (
    REQUEST_ID,
    call_finished,
    call_started,
    configure_logging,
    current_call,
    gauge,
    grpc_type,
    message_received,
    message_sent,
    serve_metrics,
    watch_pool,
)
from shared.identity.actor import current_actor
from shared.identity.auth import Authenticator
from shared.persistence import roles
from shared.persistence.db import (
    Database,
    DatabaseUrlError,
    call_deadline,
    database_url,
    describe,
    libpq_dsn,
    listen_url,
)

log = logging.getLogger("relman.server")

# Largest message either way. A LogActions batch or a runbook fits easily; export
# chunks are ~64 KiB. Bigger requests are refused with RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
READINESS_INTERVAL_S = 2.0
READINESS_PING_TIMEOUT_S = 2.0
STARTUP_DB_WAIT_S = 5.0

TRAIL_PROTECTED = gauge(
    "relman_audit_trail_protected",
    "1 when this process's database role can only INSERT and SELECT audit rows, else 0.",
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Resources:
    """What a process's servicers are built with."""

    database: Database
    settings: Settings
    authenticator: Authenticator
    # Awaited after the server has stopped: background work a servicer started.
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class ServiceSpec:
    """What makes one relman process: its name, its address setting, its servicers."""

    name: str  # "deploy_svc"
    address: Callable[[Settings], str]
    # Adds the servicers to the server; returns their full service names.
    register: Callable[[grpc.aio.Server, Resources], Sequence[str]]
    # Its Prometheus port setting (None: no endpoint).
    metrics_port: Callable[[Settings], int | None] = lambda settings: None
    # Methods ("/pkg.Service/Method") that run until the caller leaves (watches): ended
    # with UNAVAILABLE as soon as the process stops, so that callers watch elsewhere.
    open_ended: frozenset[str] = frozenset()


class StartupError(RuntimeError):
    """The process cannot start; the message is the one line printed."""


# -- stopping -----------------------------------------------------------------------------

_UNDRAINED = ("/grpc.health.", "/grpc.reflection.")
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


# -- interceptors ------------------------------------------------------------------------
#
# Both wrap the handler's own coroutine (or async generator), so they run in the
# task that serves the call: the caller's Actor set here is what the servicer sees.


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


class ErrorMappingInterceptor(_WrappingInterceptor):
    """Turns any exception a handler raises into a proper status (shared.framework.errors), and
    keeps the calls in flight in `drain`."""

    def __init__(self, drain: Drain) -> None:
        super().__init__()
        self.drain = drain

    def wrap(self, handler, method):
        # Probes and reflection answer until the end.
        drain = None if method.startswith(_UNDRAINED) else self.drain
        kind = grpc_type(handler)
        return _rewrap(
            handler,
            lambda behaviour: _map_errors(behaviour, drain, method, kind),
            request_deserializer=_tolerant(handler.request_deserializer),
        )


class AuthInterceptor(_WrappingInterceptor):
    """Admits each call (shared.identity.auth); its Actor becomes `current_actor`."""

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self.authenticator = authenticator

    def wrap(self, handler, method):
        if self.authenticator.is_open(method):
            return handler
        return _rewrap(handler, lambda behaviour: self._admitting(behaviour, method))

    def _admitting(self, behaviour, method: str):
        admit = self.authenticator.admit

        if inspect.isasyncgenfunction(behaviour):

            async def admitted_stream(request, context):
                reset = current_actor.set(_named(await admit(method, context)))
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    current_actor.reset(reset)

            return admitted_stream

        async def admitted(request, context):
            reset = current_actor.set(_named(await admit(method, context)))
            try:
                return await behaviour(request, context)
            finally:
                current_actor.reset(reset)

        return admitted


def _start_call(context: grpc.aio.ServicerContext) -> None:
    """Makes the caller's deadline the bound of every unit of work of this call."""
    remaining = context.time_remaining()
    call_deadline.set(None if remaining is None else time.monotonic() + remaining)


def _named(actor):
    """The caller, also written into the call's log line."""
    record = current_call.get()
    if record is not None:
        record.caller = actor.username
    return actor


class _Undecodable:
    """A request message that did not parse (corrupt, or nested past protobuf's depth)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer):
    """gRPC answers a request its deserializer refuses with UNKNOWN and logs a traceback;
    this hands the handler an _Undecodable instead, answered INVALID_ARGUMENT."""
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


async def _checked(requests, record):
    """A request stream whose undecodable messages raise INVALID_ARGUMENT, counted."""
    async for request in requests:
        _refuse_undecodable(request)
        message_received(record)
        yield request


class _Call:
    """One call as the outermost wrapper sees it: admitted by the drain, its request
    checked, its status mapped from whatever the handler raised, its log line and
    metrics recorded once it ends (shared.framework.observability)."""

    def __init__(self, drain: Drain | None, method: str, kind: str, context) -> None:
        self.drain = drain
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.key: asyncio.Task | None = None
        _start_call(context)
        self.record = call_started(method, kind, context)

    async def begin(self) -> None:
        """Echoes the request id: in the initial metadata of a response stream (there
        before the first message), in the trailing metadata of a single response (sent
        with the status: a separate initial-metadata write cost about a quarter of
        LogAction's throughput, make bench)."""
        echo = ((REQUEST_ID, self.record.request_id),)
        if self.record.grpc_type in ("server_stream", "bidi_stream"):
            await self.context.send_initial_metadata(echo)
        else:
            self.context.set_trailing_metadata(echo)
        if self.drain is not None:
            self.key = self.drain.enter(self.method)

    async def fail(self, exc: BaseException) -> None:
        """Answers the call with the status `exc` maps to (raises AbortError); a
        cancellation that is not the drain's is the caller's: re-raised."""
        if isinstance(exc, asyncio.CancelledError):
            if self.key is None or not self.drain.ended_by_stop(self.key):
                self.code = grpc.StatusCode.CANCELLED
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
        if self.key is not None:
            self.drain.leave(self.key)
        call_finished(self.record, self.code)


class _CountedWrites:
    """The context of a stream handler that writes its messages itself (context.write):
    each write counts as a message sent, as each yielded one does."""

    def __init__(self, context: grpc.aio.ServicerContext, record) -> None:
        self._context = context
        self._record = record

    async def write(self, message) -> None:
        await self._context.write(message)
        message_sent(self._record)

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _map_errors(behaviour, drain: Drain | None, method: str, kind: str):
    def checked(request, record):
        if kind in ("client_stream", "bidi_stream"):
            return _checked(request, record)
        _refuse_undecodable(request)
        message_received(record)
        return request

    if inspect.isasyncgenfunction(behaviour):

        async def guarded_stream(request, context):
            call = _Call(drain, method, kind, context)
            try:
                await call.begin()
                async for response in behaviour(checked(request, call.record), context):
                    yield response
                    message_sent(call.record)
            except grpc.aio.AbortError:
                raise
            except (Exception, asyncio.CancelledError) as exc:
                await call.fail(exc)
            finally:
                call.end()

        return guarded_stream

    async def guarded(request, context):  # also stream handlers that write with context.write()
        call = _Call(drain, method, kind, context)
        try:
            await call.begin()
            if kind in ("server_stream", "bidi_stream"):
                response = await behaviour(
                    checked(request, call.record), _CountedWrites(context, call.record)
                )
            else:
                response = await behaviour(checked(request, call.record), context)
                message_sent(call.record)
            return response
        except grpc.aio.AbortError:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            await call.fail(exc)
        finally:
            call.end()

    return guarded


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


# -- health -------------------------------------------------------------------------------


class Readiness:
    """Keeps the readiness of `services` equal to "the database answers"."""

    def __init__(self, health_servicer, services: Sequence[str], database: Database) -> None:
        self.health = health_servicer
        self.services = list(services)
        self.database = database
        self.stopping = asyncio.Event()
        self.ready: bool | None = None

    async def set(self, ready: bool) -> None:
        if ready != self.ready:
            log.log(
                logging.INFO if ready else logging.WARNING,
                "readiness: %s",
                "SERVING" if ready else "NOT_SERVING (database unreachable)",
            )
        self.ready = ready
        for service in self.services:
            await self.health.set(service, SERVING if ready else NOT_SERVING)

    async def watch(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.database.ping(READINESS_PING_TIMEOUT_S)
                ready = True
            except Exception:
                ready = False
            if self.stopping.is_set():
                return
            await self.set(ready)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), READINESS_INTERVAL_S)

    async def shut_down(self) -> None:
        """Readiness NOT_SERVING for good; liveness ("") stays SERVING until exit."""
        self.stopping.set()
        for service in self.services:
            await self.health.set(service, NOT_SERVING)
        log.info("readiness: NOT_SERVING (shutting down)")


# -- start and stop -------------------------------------------------------------------------


async def _wait_for_database(database: Database) -> None:
    deadline = time.monotonic() + STARTUP_DB_WAIT_S
    delay = 0.2
    while True:
        try:
            await database.ping(min(READINESS_PING_TIMEOUT_S, STARTUP_DB_WAIT_S))
            return
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                reason = (
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                )
                raise StartupError(
                    f"cannot reach the {describe(database.url)} "
                    f"after {STARTUP_DB_WAIT_S:.0f} s: {reason}"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        require_client_auth=tls.client_ca is not None,
    )


def _bind(server: grpc.aio.Server, address: str, settings: Settings) -> str:
    """Listens on `address`; returns it with the port actually bound (for port 0)."""
    credentials = _server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the address is in use or not available")
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


async def serve(spec: ServiceSpec, settings: Settings, database: Database) -> int:
    try:
        return await _serve(spec, settings, database)
    finally:
        await database.dispose()


async def _check_trail(spec: ServiceSpec, settings: Settings, database: Database) -> None:
    """Says at start-up whether this process's own database roles (the pool's, and the
    LISTEN connection's when it has a URL of its own) could alter the audit trail: one
    WARNING line naming what they can do and the gauge at 0, or, with
    REQUIRE_PROTECTED_TRAIL, a refusal to start."""
    problems = []
    async with database.autocommit_connection(deadline_s=STARTUP_DB_WAIT_S) as connection:
        problems.append(await _exposure(connection, "DATABASE_URL"))
    if database.listen_url != database.url:
        try:
            connection = await asyncpg.connect(libpq_dsn(database.listen_url), timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise StartupError(f"cannot connect to DATABASE_LISTEN_URL: {exc}") from None
        try:
            problems.append(await _exposure(connection, "DATABASE_LISTEN_URL"))
        finally:
            await connection.close()
    problems = [problem for problem in problems if problem]
    TRAIL_PROTECTED.set(0 if problems else 1)
    if not problems:
        return
    problem = (
        "; ".join(problems)
        + "; run the services as a role with INSERT and SELECT only on audit_logs"
        " (README: Database roles)"
    )
    if settings.require_protected_trail:
        raise StartupError(f"{problem} (REQUIRE_PROTECTED_TRAIL=1)")
    log.warning("%s: %s", spec.name, problem)


async def _exposure(connection: asyncpg.Connection, setting: str) -> str:
    """What the connection's role could do to the trail, as words ("" when nothing)."""
    try:
        exposure = await roles.trail_exposure(connection)
    except asyncpg.UndefinedTableError:
        raise StartupError(
            "the database has no audit_logs table: migrate it first (make migrate)"
        ) from None
    if not exposure:
        return ""
    role = await connection.fetchval("SELECT current_user")
    return (
        f"the database role {role} ({setting}) can alter the audit trail: it {', '.join(exposure)}"
    )


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def _serve(spec: ServiceSpec, settings: Settings, database: Database) -> int:
    await _wait_for_database(database)
    await _check_trail(spec, settings, database)

    authenticator = Authenticator(database)
    drain = Drain(spec.open_ended)
    server = grpc.aio.server(
        # The first is outermost: refusals raised while admitting are mapped too.
        interceptors=[ErrorMappingInterceptor(drain), AuthInterceptor(authenticator)],
        options=[
            ("grpc.so_reuseport", 0),  # a second process on the same port must fail, not share
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    resources = Resources(database, settings, authenticator)
    services = list(spec.register(server, resources))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    readiness = Readiness(health_servicer, services, database)
    await readiness.set(True)
    reflection.enable_server_reflection(
        [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    listening = _bind(server, spec.address(settings), settings)
    if settings.tls is None and not _is_loopback(listening):
        log.warning(
            "%s listens on %s without TLS: tokens and passwords cross the network in clear"
            " (set TLS_CERT and TLS_KEY)",
            spec.name,
            listening,
        )

    metrics_port = spec.metrics_port(settings)
    if metrics_port is not None:
        host = listening.rpartition(":")[0].strip("[]") or "::"
        try:
            bound = serve_metrics(metrics_port, "0.0.0.0" if host in ("::", "0.0.0.0") else host)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on port {metrics_port}: {exc}") from None
        watch_pool(database.engine.pool)
        log.info("%s metrics on http://%s:%d/metrics", spec.name, host, bound)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGUSR1: one line of what the process holds, to see that nothing leaks.
    loop.add_signal_handler(
        signal.SIGUSR1,
        lambda: log.info(
            "state: %d calls in flight, %d tasks, %d pooled connections in use",
            drain.in_flight,
            len(asyncio.all_tasks()),
            database.engine.pool.checkedout(),
        ),
    )

    await server.start()
    # Everything made so far (modules, descriptors, the engine) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it
    # (measured: 22 ms pauses in the middle of calls before, make bench ListAuditLogs).
    gc.freeze()
    mode = (
        "plaintext" if settings.tls is None else ("mutual TLS" if settings.tls.client_ca else "TLS")
    )
    log.info(
        "%s listening on %s (%s), using the %s", spec.name, listening, mode, describe(database.url)
    )
    watcher = asyncio.create_task(readiness.watch())
    try:
        await stop.wait()
    finally:
        await readiness.shut_down()
        watcher.cancel()
        log.info(
            "%s stopping: %d calls in flight have %.0f s to finish; new calls are refused",
            spec.name,
            drain.in_flight,
            settings.shutdown_grace_s,
        )
        ended = await drain.close(settings.shutdown_grace_s)
        if ended:
            log.info(
                "%s ended %d calls with UNAVAILABLE (watches, or past the grace)", spec.name, ended
            )
        await server.stop(0)
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        for stop_background in resources.on_stop:
            await stop_background()
        log.info("%s stopped", spec.name)
    return 0


def main(spec: ServiceSpec) -> int:
    """Entry point of `python -m <service>`: exit 0 after a clean stop, 2 if it cannot start."""
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        database = Database(
            database_url(),
            pool_size=settings.db_pool_size,
            application_name=spec.name,
            statement_cache=settings.db_statement_cache,
            listen_url=listen_url(),
        )
        # uvloop: about 11% more calls/s than asyncio's own loop under the same load.
        return uvloop.run(serve(spec, settings, database))
    except (ConfigError, DatabaseUrlError, StartupError) as exc:
        print(f"{spec.name}: {exc}", file=sys.stderr)
        return 2
