"""Transport: WebhookService (DESIGN §12), on deploy_svc's port: proto in, proto out.

Each RPC reads its request's fields, calls one use case of deploy_svc.webhooks and
converts what it returns (deploy_svc.convert). The SecretBox that seals webhook secrets
is loaded once per process, from WEBHOOK_SECRET_KEY_FILE (made when missing), when the
server is built: a key file that cannot be read stops the start, not a later call.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from deploy_svc import convert, webhook_secrets, webhooks
from relman.v1 import webhook_pb2, webhook_pb2_grpc
from shared.framework.server import Resources, StartupError
from shared.framework.validation import (
    enum_word,
    masked_changes,
    optional_uuid,
    parse_uuid,
    request_key,
)
from shared.identity.actor import current_actor

WEBHOOK_SERVICE = webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"]


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, resources: Resources) -> None:
        self.database = resources.database
        self.allowed_networks = resources.settings.webhook_allowed_networks
        try:
            self.box = webhook_secrets.load_box(resources.settings.webhook_secret_key_file)
        except webhook_secrets.SecretKeyError as error:
            raise StartupError(str(error)) from None

    async def CreateWebhook(self, request, context):
        actor = current_actor.get()
        created = await webhooks.create_webhook(
            self.database,
            actor,
            self.box,
            self.allowed_networks,
            webhooks.WebhookRequest(
                url=request.url,
                event_types=list(request.event_types),
                service_id=optional_uuid("service_id", request.service_id),
                team_id=optional_uuid("team_id", request.team_id),
                format=enum_word(
                    "format", webhook_pb2.WebhookFormat, request.format, required=True
                ),
                key=request_key(actor, "CreateWebhook", request),
            ),
        )
        return webhook_pb2.CreateWebhookResponse(
            webhook=convert.webhook(created.webhook), secret=created.secret
        )

    async def ListWebhooks(self, request, context):
        page = await webhooks.list_webhooks(
            self.database, page_size=request.page_size, page_token=request.page_token
        )
        return webhook_pb2.ListWebhooksResponse(
            webhooks=[convert.webhook(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateWebhook(self, request, context):
        webhook = request.webhook
        webhook_id = parse_uuid("webhook.id", webhook.id)
        changes = masked_changes(
            request.update_mask,
            {
                "url": lambda: webhook.url,  # resolved by the use case, before its transaction
                "event_types": lambda: webhooks.check_event_types(
                    webhook.event_types, "webhook.event_types"
                ),
                "active": lambda: webhook.active,
            },
            fixed=webhooks.FIXED,
        )
        row = await webhooks.update_webhook(
            self.database,
            current_actor.get(),
            webhook_id,
            changes,
            webhook.etag,
            self.allowed_networks,
        )
        return convert.webhook(row)

    async def DeleteWebhook(self, request, context):
        webhook_id = parse_uuid("webhook_id", request.webhook_id)
        await webhooks.delete_webhook(self.database, current_actor.get(), webhook_id)
        return empty_pb2.Empty()

    async def ListWebhookDeliveries(self, request, context):
        webhook_id = parse_uuid("webhook_id", request.webhook_id)
        page = await webhooks.list_deliveries(
            self.database,
            webhook_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return webhook_pb2.ListWebhookDeliveriesResponse(
            deliveries=[convert.webhook_delivery(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def RedeliverWebhookDelivery(self, request, context):
        delivery_id = parse_uuid("delivery_id", request.delivery_id)
        delivery = await webhooks.redeliver(self.database, current_actor.get(), delivery_id)
        return convert.webhook_delivery(delivery)
