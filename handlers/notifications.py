"""REST handlers for webhooks and delivery receipts (watchout.destinations)."""
from __future__ import annotations

from handlers.base import ApiHandler
from watchout import destinations


class WebhooksHandler(ApiHandler):
    async def post(self) -> None:
        principal = self.principal()
        self.write_json(await destinations.create_webhook(self.services, principal, self.json_body()), 201)

    async def get(self) -> None:
        self.write_json(await destinations.list_webhooks(self.services, self.principal(), self.query_args()))


class WebhookHandler(ApiHandler):
    async def get(self, destination_id: str) -> None:
        self.write_json(await destinations.get_webhook(self.services, self.principal(), destination_id))

    async def delete(self, destination_id: str) -> None:
        await destinations.delete_webhook(self.services, self.principal(), destination_id)
        self.set_status(204)
        self.finish()


class WebhookTestHandler(ApiHandler):
    async def post(self, destination_id: str) -> None:
        self.write_json(await destinations.test_webhook(self.services, self.principal(), destination_id))


class WebhookRotateHandler(ApiHandler):
    async def post(self, destination_id: str) -> None:
        self.write_json(await destinations.rotate_webhook_secret(self.services, self.principal(), destination_id))


class AlertDeliveriesHandler(ApiHandler):
    async def get(self, alert_id: str) -> None:
        self.write_json(await destinations.alert_deliveries(self.services, self.principal(), alert_id))


class PushKeyHandler(ApiHandler):
    async def get(self) -> None:
        self.write_json(await destinations.push_public_key(self.services, self.principal()))


class PushSubscriptionsHandler(ApiHandler):
    async def post(self) -> None:
        principal = self.principal()
        self.write_json(await destinations.subscribe_push(self.services, principal, self.json_body()), 201)

    async def delete(self) -> None:
        principal = self.principal()
        await destinations.unsubscribe_push(self.services, principal, self.json_body())
        self.set_status(204)
        self.finish()
