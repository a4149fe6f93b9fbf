"""`audit.logged`: the audit trail streamed to a webhook, every row once, as ListAuditLogs
returns it, signed; the rows from before the webhook was made are not sent."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import json_format

from relman.v1 import audit_pb2, audit_pb2_grpc, webhook_pb2, webhook_pb2_grpc
from shared.persistence.models import Role
from tests.harness import bearer, poll
from tests.receiver import Receiver
from tests.test_audit import batches

ROWS = 10_000


@pytest.fixture
def audit(audit_channel) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(audit_channel)


async def test_every_row_of_a_10000_row_batch_reaches_the_stream(deploy_channel, audit, tokens):
    admin, service = bearer(tokens[Role.ADMIN]), bearer(tokens[Role.SERVICE])
    webhooks = webhook_pb2_grpc.WebhookServiceStub(deploy_channel)
    before = f"stream-before-{uuid.uuid4().hex[:8]}"
    await audit.LogAction(
        audit_pb2.LogActionRequest(action="bulk.write", resource_type=before), metadata=service
    )
    marker = f"stream-{uuid.uuid4().hex[:8]}"
    async with Receiver() as receiver:
        made = await webhooks.CreateWebhook(
            webhook_pb2.CreateWebhookRequest(
                url=receiver.url(),
                event_types=["audit.logged"],
                format=webhook_pb2.WEBHOOK_FORMAT_JSON,
            ),
            metadata=admin,
        )
        try:
            response = await audit.LogActions(batches(marker, ROWS, 1_000), metadata=service)
            assert response.count == ROWS

            tag = marker.encode()
            await poll(
                lambda: sum(tag in r.body for r in receiver.requests) >= ROWS,
                120,
                "every row of the batch streamed",
                every_s=0.5,
            )
        finally:
            await webhooks.DeleteWebhook(
                webhook_pb2.DeleteWebhookRequest(webhook_id=made.webhook.id), metadata=admin
            )
    logged = [(r, r.json()) for r in receiver.requests]  # each body parsed once
    received = [
        (r, body) for r, body in logged if body["data"]["audit_log"].get("resource_type") == marker
    ]
    # Each row once, under a delivery id of its own, signed with the webhook's secret.
    assert sorted(int(body["data"]["audit_log"]["resource_id"]) for _, body in received) == list(
        range(ROWS)
    )
    assert len({r.delivery for r, _ in received}) == ROWS
    assert all(r.signed_with(made.secret) for r, _ in received)
    assert {r.headers["X-Relman-Event"] for r, _ in received} == {"audit.logged"}
    # The row before the webhook was made is not sent.
    sent_types = {body["data"]["audit_log"].get("resource_type") for _, body in logged}
    assert before not in sent_types
    # A row as ListAuditLogs returns it.
    listed = await audit.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(resource_type=marker, resource_id="9999")
        ),
        metadata=admin,
    )
    [row] = listed.audit_logs
    [event] = [body for _, body in received if body["data"]["audit_log"]["resource_id"] == "9999"]
    assert event["id"] == row.id and event["type"] == "audit.logged"
    expected = json_format.MessageToDict(row, preserving_proto_field_name=True)
    assert event["data"]["audit_log"] == expected
