"""Webhooks: subscriptions, the outbox of events, and the deliveries.

Revision ID: 013_webhooks
Revises: 012_deployment_outcomes
Create Date: 2026-11-30

- webhooks: a receiver's URL, the event types it takes (optionally one service's or one
  team's), its format (json, slack), its secret encrypted with the key file
  (WEBHOOK_SECRET_KEY_FILE: whoever holds only the database cannot sign), whether it is
  active, how many deliveries failed in a row, and the audit trail's cursor for
  `audit.logged` (the last sequence handed to it). `version` makes the etag.
- webhook_events: the outbox. A change writes its events in its own transaction, so an
  event exists exactly when its change committed; the dispatcher turns each into a
  delivery per matching webhook and marks it dispatched.
- webhook_deliveries: one event for one webhook, with the body it sends on every attempt
  (so a retry and a redelivery send the same bytes under the same delivery id), its
  status, attempts and the next attempt's time. A dispatcher claims a due delivery by
  moving next_attempt_at past its lease before it sends: a replica that dies mid-delivery
  leaves it due again once the lease ends.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "013_webhooks"
down_revision: str | None = "012_deployment_outcomes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamps() -> list[sa.Column]:
    return [
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("service_id", sa.Uuid()),
        sa.Column("team_id", sa.Uuid()),
        sa.Column("format", sa.String(10), nullable=False),
        sa.Column("secret_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column(
            "consecutive_failures", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("audit_cursor", sa.BigInteger()),
        sa.Column("created_by", sa.Uuid(), nullable=False),
        *_timestamps(),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.CheckConstraint("format IN ('json', 'slack')", name=op.f("ck_webhooks_format")),
        sa.CheckConstraint(
            "cardinality(event_types) BETWEEN 1 AND 50", name=op.f("ck_webhooks_event_types")
        ),
        sa.CheckConstraint("char_length(url) <= 2048", name=op.f("ck_webhooks_url_length")),
        sa.ForeignKeyConstraint(
            ["service_id"],
            ["services.id"],
            name=op.f("fk_webhooks_service_id_services"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name=op.f("fk_webhooks_team_id_teams"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["users.id"],
            name=op.f("fk_webhooks_created_by_users"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    for column in ("service_id", "team_id", "created_by"):
        op.create_index(op.f(f"ix_webhooks_{column}"), "webhooks", [column])
    op.create_index("ix_webhooks_created_at_id", "webhooks", ["created_at", "id"])
    # The etag moves with what UpdateWebhook changes (and deactivation), not with the
    # dispatcher's counters (consecutive_failures, audit_cursor), which move all the time.
    op.execute(
        "CREATE TRIGGER bump_version BEFORE UPDATE OF url, event_types, service_id, team_id,"
        " format, secret_encrypted, active ON webhooks "
        "FOR EACH ROW EXECUTE FUNCTION relman_bump_version()"
    )

    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("event_type", sa.String(50), nullable=False),
        # The clock's time, not the transaction's: one change's events keep their order.
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.clock_timestamp(),
            nullable=False,
        ),
        sa.Column("service_id", sa.Uuid()),
        sa.Column("team_id", sa.Uuid()),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("dispatched", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    op.create_index(
        "ix_webhook_events_undispatched",
        "webhook_events",
        ["occurred_at"],
        postgresql_where=sa.text("NOT dispatched"),
    )
    op.create_index(
        "ix_webhook_events_dispatched",
        "webhook_events",
        ["occurred_at"],
        postgresql_where=sa.text("dispatched"),
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("webhook_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Uuid()),
        # audit.logged: the audit row's sequence (no outbox event: read from the trail).
        sa.Column("audit_sequence", sa.BigInteger()),
        sa.Column("event_type", sa.String(50), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(10), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        *_timestamps(),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed', 'dead')",
            name=op.f("ck_webhook_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_events.id"],
            name=op.f("fk_webhook_deliveries_event_id_webhook_events"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        # One delivery of an event per webhook, whichever replica fans it out.
        sa.UniqueConstraint(
            "webhook_id", "event_id", name=op.f("uq_webhook_deliveries_webhook_id_event_id")
        ),
        sa.UniqueConstraint(
            "webhook_id",
            "audit_sequence",
            name=op.f("uq_webhook_deliveries_webhook_id_audit_sequence"),
        ),
        sa.CheckConstraint(
            "(event_type = 'audit.logged') = (audit_sequence IS NOT NULL)",
            name=op.f("ck_webhook_deliveries_audit_sequence"),
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_webhook_deliveries_webhook_id_created_at_id",
        "webhook_deliveries",
        ["webhook_id", "created_at", "id"],
    )
    op.create_index(op.f("ix_webhook_deliveries_event_id"), "webhook_deliveries", ["event_id"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_events")
    op.execute("DROP TRIGGER bump_version ON webhooks")
    op.drop_table("webhooks")
