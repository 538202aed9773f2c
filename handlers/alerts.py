"""REST handlers for alert history, acknowledgement and snapshots."""
from __future__ import annotations

from handlers.base import ApiHandler
from watchout import rest


class StreamAlertsHandler(ApiHandler):
    async def get(self, stream_id: str) -> None:
        self.write_json(await rest.stream_alerts(self.services, self.principal(), stream_id, self.query_args()))


class AlertsHandler(ApiHandler):
    async def get(self) -> None:
        self.write_json(await rest.all_alerts(self.services, self.principal(), self.query_args()))


class AlertAckHandler(ApiHandler):
    async def post(self, alert_id: str) -> None:
        principal = self.principal()
        if self.json_body(optional=True):
            self.write_json({"error": {"code": "unknown-field", "message": "this request takes no fields"}}, 400)
            return
        self.write_json(await rest.acknowledge(self.services, principal, alert_id))


class SnapshotHandler(ApiHandler):
    async def get(self, alert_id: str) -> None:
        jpeg = await rest.snapshot(self.services, self.principal(), alert_id)
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Cache-Control", "private, max-age=3600")
        self.finish(jpeg)
