"""What a relman process tells its operators: one log line per RPC, and Prometheus metrics.

Server framework: the log format, the record of each call (opened and closed by the
call-lifecycle interceptor, shared.framework.interceptors) and the metrics registry.

Logs: JSON lines on stderr (one object per record, the RPC line carrying method,
code, duration_ms, caller, peer and request_id), readable text when stderr is a
terminal. The request id is the caller's `x-request-id` metadata (when it is a
short printable token) or a new one; it is echoed in the response's metadata
(trailing for a single response, initial for a response stream), so a caller can
quote it. Request and response bodies are never logged, nor is any metadata but the
request id: no token or password reaches a log line.

Metrics (when DEPLOY_METRICS_PORT / AUDIT_METRICS_PORT is set): the names of Go's
grpc-prometheus (grpc_server_started_total, grpc_server_handled_total,
grpc_server_handling_seconds, grpc_server_msg_received_total /
grpc_server_msg_sent_total), the pool's connections, the read replica's lag, and what a
service counts (`counter()` / `gauge()` below, used by the domain).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REQUEST_ID = "x-request-id"
_REQUEST_ID_FORMAT = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_QUIET = ("/grpc.health.", "/grpc.reflection.")  # probes: logged at DEBUG only

# Every metric of the process, registered here so that tests and the endpoint see
# exactly relman's (and not the library's default process collectors twice).
REGISTRY = CollectorRegistry()
_LABELS = ("grpc_type", "grpc_service", "grpc_method")
STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", _LABELS, registry=REGISTRY
)
HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    (*_LABELS, "grpc_code"),
    registry=REGISTRY,
)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its status, on the server.",
    _LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Stream messages received on the server (request streams).",
    _LABELS,
    registry=REGISTRY,
)
SENT = Counter(
    "grpc_server_msg_sent_total",
    "Stream messages sent by the server (response streams).",
    _LABELS,
    registry=REGISTRY,
)


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
    """A domain counter of this process (audit rows ingested, export rows streamed...)."""
    return Counter(name, documentation, labels, registry=REGISTRY)


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, documentation, labels, registry=REGISTRY)


def watch_pool(pool) -> None:
    """Gauges of a SQLAlchemy pool: connections in use, idle, and its size."""
    connections = gauge(
        "relman_db_pool_connections", "Pooled database connections, by state.", ("state",)
    )
    connections.labels("in_use").set_function(pool.checkedout)
    connections.labels("idle").set_function(pool.checkedin)
    connections.labels("size").set_function(pool.size)


def watch_replica(lag_s: Callable[[], float | None], serving: Callable[[], bool]) -> None:
    """Gauges of the read replica (DATABASE_READ_URL), read at each scrape from its last
    check (every 2 s): its lag, and whether reads that opt in go to it now.

    An unknown lag (the replica unreachable, or not checked yet) is -1, not NaN: an alert
    on `lag > N` stays quiet either way, but -1 keeps graphs and max() usable; that the
    replica is out of use is `relman_replica_serving_reads` 0, the one to alert on."""
    gauge(
        "relman_replica_lag_seconds",
        "How far the read replica's replay is behind the primary: how long ago the primary"
        " flushed the oldest WAL the replica has not replayed (0: none); -1 when unknown.",
    ).set_function(lambda: -1.0 if (lag := lag_s()) is None else lag)
    gauge(
        "relman_replica_serving_reads",
        "1 when reads that may use the read replica go to it, 0 when they go to the primary"
        " (the replica unreachable, or lagging more than DATABASE_READ_MAX_LAG_S).",
    ).set_function(lambda: 1.0 if serving() else 0.0)


_serving = False


def serving_metrics() -> bool:
    """Whether this process has a metrics endpoint (gauges that cost a query are only
    refreshed then)."""
    return _serving


def serve_metrics(port: int, address: str) -> int:
    """The Prometheus endpoint (/metrics on `port`, 0: a free one), served by a thread of
    its own; returns the port bound."""
    global _serving
    httpd, _ = start_http_server(port, addr=address, registry=REGISTRY)
    _serving = True
    return httpd.server_address[1]


# -- one record per call ------------------------------------------------------------------


@dataclass
class CallRecord:
    """What the log line and the metrics of one RPC need; the auth layer adds the caller."""

    method: str  # /pkg.Service/Method
    grpc_type: str  # unary, client_stream, server_stream, bidi_stream
    request_id: str
    peer: str
    started: float = field(default_factory=time.perf_counter)
    caller: str | None = None
    metrics: _MethodMetrics | None = None

    @property
    def labels(self) -> tuple[str, str, str]:
        service, _, name = self.method.lstrip("/").partition("/")
        return self.grpc_type, service, name


current_call: ContextVar[CallRecord | None] = ContextVar("current_call", default=None)


def grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id, if it is a usable token; a new one otherwise."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and _REQUEST_ID_FORMAT.fullmatch(value):
            return value
    return uuid.uuid4().hex


class _MethodMetrics:
    """The metric children of one method, resolved once (labels() per call costs a lock
    and a dict lookup each, measured in make bench)."""

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started = STARTED.labels(*labels)
        self.handling = HANDLING.labels(*labels)
        self.received = RECEIVED.labels(*labels)
        self.sent = SENT.labels(*labels)
        self._handled: dict[grpc.StatusCode, Counter] = {}

    def handled(self, code: grpc.StatusCode) -> Counter:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = HANDLED.labels(*self.labels, code.name)
        return child


_METRICS: dict[str, _MethodMetrics] = {}


def call_started(method: str, kind: str, context: grpc.aio.ServicerContext) -> CallRecord:
    record = CallRecord(method, kind, request_id_of(context), context.peer() or "")
    metrics = _METRICS.get(method)
    if metrics is None:
        metrics = _METRICS[method] = _MethodMetrics(record.labels)
    record.metrics = metrics
    metrics.started.inc()
    current_call.set(record)
    return record


def call_finished(record: CallRecord, code: grpc.StatusCode) -> None:
    seconds = time.perf_counter() - record.started
    record.metrics.handled(code).inc()
    record.metrics.handling.observe(seconds)
    quiet = record.method.startswith(_QUIET)
    if quiet and not _rpc_lines.debug:
        return
    _rpc_lines.write(
        {
            "ts": _now(),
            "level": "DEBUG" if quiet else "INFO",
            "logger": "relman.rpc",
            "msg": f"{record.method} {code.name} {seconds * 1000:.1f} ms",
            "method": record.method,
            "code": code.name,
            "duration_ms": round(seconds * 1000, 2),
            "caller": record.caller,
            "peer": record.peer,
            "request_id": record.request_id,
        }
    )


def message_received(record: CallRecord) -> None:
    record.metrics.received.inc()


def message_sent(record: CallRecord) -> None:
    record.metrics.sent.inc()


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class _RpcLines:
    """The per-RPC lines, written apart from the logging module: at thousands of calls
    a second its records, formatter and a write per line cost a third of LogAction's
    throughput (make bench). Lines are buffered and written together FLUSH_AFTER_S after
    the first of them (a write per event-loop turn was still 6% of deploy_svc's Python
    time under the lifecycle load), before any other log record (log_handler), and at
    exit; readable text on a terminal."""

    FLUSH_AFTER_S = 0.005

    def __init__(self) -> None:
        self.enabled = True
        self.debug = False
        self.readable = False
        self._pending: list[str] = []

    def configure(self, level: str, readable: bool) -> None:
        self.enabled = logging.getLevelName(level) <= logging.INFO
        self.debug = logging.getLevelName(level) <= logging.DEBUG
        self.readable = readable

    def write(self, line: dict) -> None:
        if not self.enabled:
            return
        if self.readable:
            text = f"{line['ts']} {line['level']} relman.rpc: {line['msg']} {line['request_id']}"
        else:
            text = json.dumps(line, ensure_ascii=False)
        if not self._pending:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_AFTER_S, self.flush)
            except RuntimeError:  # no loop: write now
                self._pending.append(text)
                self.flush()
                return
        self._pending.append(text)

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = self._pending, []
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()


_rpc_lines = _RpcLines()
atexit.register(_rpc_lines.flush)


# -- log format -----------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, the RPC's fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rpc = getattr(record, "rpc", None)
        if rpc:
            line.update(rpc)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _AfterRpcLines(logging.StreamHandler):
    """Writes the RPC lines still buffered first, so that lines keep their events' order."""

    def emit(self, record: logging.LogRecord) -> None:
        _rpc_lines.flush()
        super().emit(record)


def log_handler(stream) -> logging.Handler:
    """A handler writing JSON lines, or readable text when `stream` is a terminal."""
    handler = _AfterRpcLines(stream)
    if stream.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    return handler


def configure_logging(level: str) -> None:
    """The process's logging, on stderr: JSON lines, or readable text on a terminal."""
    logging.basicConfig(level=level, handlers=[log_handler(sys.stderr)], force=True)
    _rpc_lines.configure(level, readable=sys.stderr.isatty())
