"""`audit.logged` (domain layer): the audit trail streamed to webhooks, row by row, a step
of the dispatcher.

Writing an audit row costs nothing more for it: no event row is written. Each webhook
that takes `audit.logged` keeps a cursor (webhooks.audit_cursor, the last sequence handed
to it); each step turns the rows after it into its deliveries, oldest first, and moves
it, in one transaction with the webhook's row locked (SKIP LOCKED: one replica streams a
webhook at a time; a delivery per row and webhook at most, by a unique key). Only sealed
rows are streamed (up to the last seal's last_sequence): the sealer seals a sequence range
only once every transaction that took a value in it has ended, so a row that commits late
with a lower sequence is never passed over. A row reaches a receiver about a seal interval
(AUDIT_SEAL_INTERVAL_S, 0.5 s) after its commit, while audit_svc runs, and a receiver can
check every row it got against the seals (ListAuditSeals, VerifyAuditLog).

The whole trail goes to such a webhook: service_id and team_id filter events of a
service, and an audit row has none. A webhook made with `audit.logged` starts at the
trail's end (its cursor is set when it is made); the rows before it are the export's.
"""

from __future__ import annotations

import json

from google.protobuf import json_format
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.protos import audit_log_message


def slack_escape(line: str) -> str:
    """What Slack asks of text: &, < and > as entities."""
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


BATCH = 1_000  # rows per webhook and step
WEBHOOKS_PER_STEP = 10

_SEALED = text("SELECT last_sequence FROM audit_seals ORDER BY seal_number DESC LIMIT 1")
_WEBHOOKS = text(
    """
    SELECT w.id, w.audit_cursor, w.format,
           coalesce(s.slack_channel, t.slack_channel, st.slack_channel) AS channel
    FROM webhooks w
    LEFT JOIN services s ON s.id = w.service_id
    LEFT JOIN teams st ON st.id = s.team_id
    LEFT JOIN teams t ON t.id = w.team_id
    WHERE w.active AND 'audit.logged' = ANY (w.event_types)
      AND coalesce(w.audit_cursor, 0) < :sealed
    ORDER BY w.id
    LIMIT :limit
    FOR UPDATE OF w SKIP LOCKED
    """
)
_ROWS = text(
    """
    SELECT a.*, u.username, r.username AS recorded_by_username
    FROM audit_logs a
    LEFT JOIN users u ON u.id = a.user_id
    LEFT JOIN users r ON r.id = a.recorded_by
    WHERE a.sequence > :after AND a.sequence <= :sealed
    ORDER BY a.sequence
    LIMIT :limit
    """
)
_DELIVER = text(
    """
    INSERT INTO webhook_deliveries (webhook_id, audit_sequence, event_type, body)
    SELECT :webhook_id, sequence, 'audit.logged', body
    FROM unnest(CAST(:sequences AS bigint[]), CAST(:bodies AS bytea[])) AS r (sequence, body)
    ON CONFLICT DO NOTHING
    """
)
_MOVE = text("UPDATE webhooks SET audit_cursor = :cursor WHERE id = :webhook_id")


def body(row, webhook_format: str, channel: str | None) -> bytes:
    """The delivery's body: the row as ListAuditLogs returns it (JSON), or one line
    (SLACK)."""
    if webhook_format == "slack":
        who = row.username or row.recorded_by_username or "relman"
        target = f"{row.resource_type} {row.resource_id}" if row.resource_id else row.resource_type
        message = {"text": slack_escape(f"audit: {who} {row.action} {target}")}
        if channel:  # as the dispatcher's Slack bodies: no channel, the hook's own
            message["channel"] = channel
    else:
        audit_log = audit_log_message(row, row.username, row.recorded_by_username)
        message = {
            "id": str(row.id),
            "type": "audit.logged",
            "occurred_at": audit_log.created_at.ToJsonString(),
            "data": {
                "audit_log": json_format.MessageToDict(audit_log, preserving_proto_field_name=True)
            },
        }
    return json.dumps(message, separators=(",", ":")).encode()


async def enqueue(session: AsyncSession) -> int:
    """One step: the sealed rows after each due webhook's cursor become its deliveries;
    returns how many rows were handed out."""
    sealed = await session.scalar(_SEALED)
    if not sealed:
        return 0
    handed = 0
    webhooks = (
        await session.execute(_WEBHOOKS, {"sealed": sealed, "limit": WEBHOOKS_PER_STEP})
    ).all()
    for webhook in webhooks:
        rows = (
            await session.execute(
                _ROWS, {"after": webhook.audit_cursor or 0, "sealed": sealed, "limit": BATCH}
            )
        ).all()
        if rows:
            await session.execute(
                _DELIVER,
                {
                    "webhook_id": webhook.id,
                    "sequences": [row.sequence for row in rows],
                    "bodies": [body(row, webhook.format, webhook.channel) for row in rows],
                },
            )
        # Past the rows handed out, or to the seal when a range held none (gaps).
        cursor = rows[-1].sequence if len(rows) == BATCH else sealed
        await session.execute(_MOVE, {"cursor": cursor, "webhook_id": webhook.id})
        handed += len(rows)
    return handed
