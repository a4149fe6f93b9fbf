"""Transport: WebhookService (DESIGN §12), on deploy_svc's port. (Being built.)"""

from __future__ import annotations

from relman.v1 import webhook_pb2, webhook_pb2_grpc

WEBHOOK_SERVICE = webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"]


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, resources) -> None:
        self.resources = resources
