"""Operators' view: Prometheus metrics after known calls, one JSON log line per RPC with
the request id echoed, and no secret in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import uuid

import grpc
import pytest
from sqlalchemy import func, select

from relman.v1 import audit_pb2, audit_pb2_grpc, auth_pb2, auth_pb2_grpc
from shared.framework.observability import (
    CallRecord,
    _MethodMetrics,
    _rpc_lines,
    call_finished,
    log_handler,
)
from shared.persistence.models import Deployment, DeploymentStatus, Role
from tests.deploying import DEV, Client
from tests.harness import (
    bearer,
    client_address,
    error_details,
    scrape_metrics,
    start_service,
)

AUDIT = "relman.v1.AuditService"


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
async def observed(db_url, tokens):
    """Both services with metrics endpoints on free ports (their own processes)."""
    deploy = await start_service(db_url, "deploy_svc", DEPLOY_METRICS_PORT="0")
    audit = await start_service(db_url, "audit_svc", AUDIT_METRICS_PORT="0")
    try:
        async with (
            grpc.aio.insecure_channel(client_address(deploy.addresses["deploy_svc"])) as dch,
            grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ach,
        ):
            yield deploy, audit, dch, ach
    finally:
        for process in (deploy, audit):
            assert await process.stop() == 0, process.output


async def test_metrics_count_known_calls(observed, tokens, service_id, database):
    deploy, audit, deploy_channel, audit_channel = observed
    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)
    service_auth = bearer(tokens[Role.SERVICE])
    before = await scrape_metrics(audit)
    for _ in range(3):
        await stub.LogAction(
            audit_pb2.LogActionRequest(action="metrics.ok", resource_type="t"),
            metadata=service_auth,
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.LogAction(audit_pb2.LogActionRequest(action="Bad!"), metadata=service_auth)
    batch = audit_pb2.LogActionsRequest(
        actions=[audit_pb2.LogActionRequest(action="metrics.bulk", resource_type="t")] * 5
    )
    await stub.LogActions(iter([batch, batch]), metadata=service_auth)
    tag = uuid.uuid4().hex
    # One row logged alone, then 20 rows of some 50 KB: the export takes several messages.
    exported = audit_pb2.LogActionRequest(
        action="metrics.export", resource_type="t", resource_id=tag
    )
    await stub.LogAction(exported, metadata=service_auth)
    exported.details.update({"pad": "x" * 50_000})
    await stub.LogActions(
        iter([audit_pb2.LogActionsRequest(actions=[exported] * 20)]), metadata=service_auth
    )
    messages = [
        m
        async for m in stub.ExportAuditLogs(
            audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id=tag)),
            metadata=bearer(tokens[Role.LEAD]),
        )
    ]
    after = await scrape_metrics(audit)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    unary = {"grpc_type": "unary", "grpc_service": AUDIT, "grpc_method": "LogAction"}
    assert delta("grpc_server_started_total", **unary) == 5
    assert delta("grpc_server_handled_total", **unary, grpc_code="OK") == 4
    assert delta("grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT") == 1
    assert delta("grpc_server_handling_seconds_count", **unary) == 5
    bulk = {"grpc_type": "client_stream", "grpc_service": AUDIT, "grpc_method": "LogActions"}
    assert delta("grpc_server_msg_received_total", **bulk) == 3
    assert delta("grpc_server_handled_total", **bulk, grpc_code="OK") == 2
    export = {"grpc_type": "server_stream", "grpc_service": AUDIT, "grpc_method": "ExportAuditLogs"}
    assert len(messages) >= 2
    assert delta("grpc_server_msg_sent_total", **export) == len(messages)
    assert delta("relman_audit_rows_ingested_total", rpc="LogAction") == 4
    assert delta("relman_audit_rows_ingested_total", rpc="LogActions") == 30
    assert delta("relman_audit_export_rows_total") == 22  # the header and 21 rows
    assert _value(after, "relman_db_pool_connections", state="size") == 10

    # deploy_svc: deployments by status, as the database holds them (refreshed every 2 s).
    lead = Client(deploy_channel, tokens[Role.LEAD])
    release = await lead.CreateRelease(service_id=service_id, version="1.0.0")
    await lead.PromoteRelease(release_id=release.id, target_environment_id=DEV)
    async with asyncio.timeout(15):
        while True:
            async with database.read() as session:
                expected = await session.scalar(
                    select(func.count())
                    .select_from(Deployment)
                    .where(Deployment.status == DeploymentStatus.PENDING.value)
                )
            scraped = await scrape_metrics(deploy)
            if _value(scraped, "relman_deployments", status="pending") == expected:
                break
            await asyncio.sleep(0.2)  # the gauge is refreshed every 2 s
    assert expected >= 1
    assert (
        _value(
            scraped,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="relman.v1.DeployService",
            grpc_method="PromoteRelease",
            grpc_code="OK",
        )
        >= 1
    )


async def test_one_json_line_per_rpc_with_the_request_id_and_no_secret(observed, tokens):
    deploy, audit, deploy_channel, audit_channel = observed
    auth = auth_pb2_grpc.AuthServiceStub(deploy_channel)
    password = "password123"
    login = await auth.Login(auth_pb2.LoginRequest(username="marco", password=password))
    call = auth.WhoAmI(
        auth_pb2.WhoAmIRequest(),
        metadata=(*bearer(login.access_token), ("x-request-id", "req-42")),
    )
    me = await call
    echoed = dict(await call.trailing_metadata())["x-request-id"]
    unnamed = auth.WhoAmI(auth_pb2.WhoAmIRequest(), metadata=bearer(login.access_token))
    await unnamed
    generated = dict(await unnamed.trailing_metadata())["x-request-id"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await auth.WhoAmI(
            auth_pb2.WhoAmIRequest(),
            metadata=(*bearer("rm_wrong" + "x" * 40), ("x-request-id", "req-refused")),
        )
    assert dict(refused.value.trailing_metadata())["x-request-id"] == "req-refused"
    error_details(refused.value)  # the rich status details are still there
    # A response stream has it in its initial metadata, before the first message.
    export = audit_pb2_grpc.AuditServiceStub(audit_channel).ExportAuditLogs(
        audit_pb2.ExportAuditLogsRequest(filter=audit_pb2.AuditLogFilter(resource_id="none")),
        metadata=(*bearer(tokens[Role.LEAD]), ("x-request-id", "req-export")),
    )
    assert dict(await export.initial_metadata())["x-request-id"] == "req-export"
    async for _ in export:
        pass
    await auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(login.access_token))
    stub = audit_pb2_grpc.AuditServiceStub(audit_channel)
    await stub.LogAction(
        audit_pb2.LogActionRequest(action="logs.check", resource_type="t"),
        metadata=bearer(tokens[Role.SERVICE]),
    )
    await audit.wait_for_line(r'"method": "/relman.v1.AuditService/LogAction"', 10)

    assert me.username == "marco" and echoed == "req-42" and len(generated) == 32
    rpc_lines = [json.loads(line) for line in deploy.lines if '"method"' in line]
    who = [line for line in rpc_lines if line["method"].endswith("/WhoAmI")]
    named = next(line for line in who if line["request_id"] == "req-42")
    assert named["code"] == "OK" and named["caller"] == "marco"
    assert named["peer"] and named["duration_ms"] >= 0 and named["level"] == "INFO"
    assert any(line["request_id"] == generated for line in who)
    assert any(line["code"] == "UNAUTHENTICATED" and line["caller"] is None for line in who)
    for process in (deploy, audit):
        # relman's own lines are JSON objects (stderr is not a terminal); gRPC's C core
        # may print its own.
        ours = [json.loads(line) for line in process.lines if line.startswith("{")]
        assert len(ours) > 3 and all(line["logger"].startswith("relman") for line in ours)
        everything = process.output
        for secret in (password, login.access_token, *tokens.values()):
            assert secret not in everything


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_readable_lines_on_a_terminal_json_elsewhere():
    record = CallRecord("/relman.v1.AuthService/WhoAmI", "unary", "req-7", "ipv4:10.0.0.1:5")
    record.metrics = _MethodMetrics(record.labels)
    record.caller = "marco"
    logger = logging.getLogger("relman.test.format")
    logger.propagate = False
    outputs = {}
    for name, stream in (("terminal", _Terminal()), ("pipe", io.StringIO())):
        handler = log_handler(stream)
        logger.addHandler(handler)
        logger.warning("hello %s", "there")
        logger.removeHandler(handler)
        with contextlib.redirect_stderr(stream):
            _rpc_lines.configure("INFO", readable=stream.isatty())
            call_finished(record, grpc.StatusCode.OK)  # no event loop: written at once
        outputs[name] = stream.getvalue().splitlines()
    probe = CallRecord("/grpc.health.v1.Health/Check", "unary", "req-8", "ipv4:10.0.0.1:6")
    probe.metrics = _MethodMetrics(probe.labels)
    quiet = {}
    for level in ("INFO", "DEBUG"):
        stream = io.StringIO()
        with contextlib.redirect_stderr(stream):
            _rpc_lines.configure(level, readable=False)
            call_finished(probe, grpc.StatusCode.OK)
        quiet[level] = stream.getvalue()
    _rpc_lines.configure("INFO", readable=False)
    assert quiet["INFO"] == ""  # probes: only at DEBUG
    assert json.loads(quiet["DEBUG"])["level"] == "DEBUG"
    terminal, pipe = outputs["terminal"], outputs["pipe"]
    assert terminal[0].endswith("WARNING relman.test.format: hello there")
    assert "relman.rpc: /relman.v1.AuthService/WhoAmI OK" in terminal[1]
    assert terminal[1].endswith("req-7")
    first, rpc = (json.loads(line) for line in pipe)
    assert (first["logger"], first["msg"]) == ("relman.test.format", "hello there")
    assert (rpc["caller"], rpc["request_id"], rpc["code"]) == ("marco", "req-7", "OK")


async def test_rpc_lines_keep_their_order_with_other_log_records():
    """RPC lines are written a few milliseconds after their call, together; a log record
    in between writes them first, so the stream keeps the order of the events."""
    record = CallRecord("/relman.v1.AuthService/WhoAmI", "unary", "req-9", "ipv4:10.0.0.1:7")
    record.metrics = _MethodMetrics(record.labels)
    logger = logging.getLogger("relman.test.order")
    logger.propagate = False
    stream = io.StringIO()
    handler = log_handler(stream)
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stderr(stream):
            _rpc_lines.configure("INFO", readable=False)
            call_finished(record, grpc.StatusCode.OK)
            assert stream.getvalue() == ""  # buffered
            logger.warning("after the call")
            call_finished(record, grpc.StatusCode.NOT_FOUND)
            _rpc_lines.flush()  # as the timer, or exit, would
    finally:
        logger.removeHandler(handler)
        _rpc_lines.configure("INFO", readable=False)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    order = [line.get("code", line["msg"]) for line in lines]
    assert order == ["OK", "after the call", "NOT_FOUND"]
