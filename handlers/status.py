"""/health and /stats in the seed's JSON shape, for the whole cluster; stream ids only for admin tokens."""
from __future__ import annotations

import datetime as dt
from typing import Any

from handlers.base import ApiHandler
from watchout.errors import StoreUnavailable
from watchout.resources import cluster_figures


class FiguresHandler(ApiHandler):
    """The seed's figures summed over every live node; per node and stream ids only for an admin token."""

    async def stats(self) -> dict[str, Any]:
        principal = self.optional_principal()
        services = self.services
        local = services.hub.figures()
        others = await services.broker.other_nodes()
        figures = cluster_figures(services.broker.node_id, local, others or [])
        figures["brokerAvailable"] = others is not None
        if principal is None or not principal.is_admin:
            figures["activeStreamCount"] = len(figures.pop("activeStreams"))
            figures.pop("nodes")
        else:
            figures["activeStreamCount"] = len(figures["activeStreams"])
            figures["alertsStored"] = services.intake.stored
            if services.jobs.jobs:  # the scheduled jobs of this node, when it runs them
                figures["jobs"] = services.jobs.view()
        return figures


class StatsHandler(FiguresHandler):
    async def get(self) -> None:
        self.write_json(await self.stats())


class HealthHandler(FiguresHandler):
    async def get(self) -> None:
        """503 when the store does not answer; `degraded` with 200 when only the broker is away
        (this node still serves its own clients, so a load balancer should keep it)."""
        stats = await self.stats()
        status, code = "healthy", 200
        if not self.services.broker.healthy:
            status = "degraded"
        try:
            await self.services.store.ping()
        except StoreUnavailable:
            status, code = "degraded", 503
        self.write_json({"status": status, "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
                         "stats": stats}, code)
