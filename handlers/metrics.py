"""GET /metrics: Prometheus exposition, OpenMetrics or text format as the scraper asks."""
from __future__ import annotations

from handlers.base import ApiHandler


class MetricsHandler(ApiHandler):
    def get(self) -> None:
        body, content_type = self.services.metrics.render(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)
