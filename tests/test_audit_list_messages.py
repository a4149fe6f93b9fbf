"""ListAuditLogs builds its rows' messages in the response itself (audit_svc.servicer
_add_audit_logs): each must be the message audit_log_message makes of the same row, which
LogAction and the webhooks' events send."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from audit_svc import trail
from audit_svc.servicer import _add_audit_logs
from relman.v1 import audit_pb2
from shared.framework.protos import audit_log_message

ALICE, BOT = uuid.uuid4(), uuid.uuid4()


def _row(**changes) -> trail.Stored:
    row = trail.Stored(
        id=uuid.uuid4(),
        created_at=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
        user_id=ALICE,
        action="deploy.start",
        resource_type="deployment",
        resource_id="res-42",
        details={"n": 12345.0, "source": "bench"},
        ip_address="10.0.1.2",
        user_agent="relman-bench/1",
        origin="client",
        recorded_by=BOT,
        sequence=987654321,
    )
    return row._replace(**changes)


ROWS = [
    _row(),
    _row(details={}),  # an empty Struct, set all the same
    _row(details={"a": {"b": [1.0, "x", True, None, {"c": False}]}, "z": None, "e": ""}),
    _row(user_id=None, recorded_by=None, origin=None, resource_id=None),
    _row(ip_address=None, user_agent=None, origin="relman", user_id=BOT),
    _row(created_at=datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC)),  # before the epoch
    _row(user_id=uuid.uuid4()),  # a user whose name is unknown
]
USERNAMES = {ALICE: "alice", BOT: "ci-bot"}


def test_each_row_is_the_message_audit_log_message_makes():
    response = audit_pb2.ListAuditLogsResponse(next_page_token="t", total_size=len(ROWS))
    _add_audit_logs(response.audit_logs, ROWS, USERNAMES)
    expected = audit_pb2.ListAuditLogsResponse(
        audit_logs=[
            audit_log_message(row, USERNAMES.get(row.user_id), USERNAMES.get(row.recorded_by))
            for row in ROWS
        ],
        next_page_token="t",
        total_size=len(ROWS),
    )
    assert list(response.audit_logs) == list(expected.audit_logs)
    assert all(message.HasField("details") for message in response.audit_logs)
    assert response.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
