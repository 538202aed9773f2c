"""/health and /stats in the seed's JSON shape; stream ids only for admin tokens."""
from __future__ import annotations

import datetime as dt
from typing import Any

from handlers.base import ApiHandler
from watchout.errors import StoreUnavailable


class FiguresHandler(ApiHandler):
    """The seed's figures for this node; stream ids only for an admin token."""

    def stats(self) -> dict[str, Any]:
        principal = self.optional_principal()
        figures = self.services.hub.figures()
        if principal is None or not principal.is_admin:
            figures["activeStreamCount"] = len(figures.pop("activeStreams"))
        else:
            figures["activeStreamCount"] = len(figures["activeStreams"])
            figures["alertsStored"] = self.services.intake.stored
            if self.services.jobs.jobs:  # the scheduled jobs of this node, when it runs them
                figures["jobs"] = self.services.jobs.view()
        return figures


class StatsHandler(FiguresHandler):
    def get(self) -> None:
        self.write_json(self.stats())


class HealthHandler(FiguresHandler):
    async def get(self) -> None:
        stats = self.stats()
        status, code = "healthy", 200
        try:
            await self.services.store.ping()
        except StoreUnavailable:
            status, code = "degraded", 503
        self.write_json({"status": status, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
                         "stats": stats}, code)
