"""Pruning: stale and expired streams (with their live sockets), old alerts, old hourly figures."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from watchout.protocol import CloseCode
from watchout.services import Services
from workers.progress import QUIET, Progress

log = logging.getLogger("watchout.jobs.cleanup")
NODE_RUNS_KEPT = dt.timedelta(days=1)  # the last runs of per-node jobs on nodes that have stopped


@dataclass(slots=True)
class RemovedStream:
    stream_id: str
    owner_id: str
    reason: str  # "never seen" or "offline"
    last_seen_at: dt.datetime | None
    created_at: dt.datetime


@dataclass(slots=True)
class Cleanup:
    """What a prune removed, or with dry_run would remove."""

    dry_run: bool
    streams: list[RemovedStream] = field(default_factory=list)
    alerts: dict[str, int] = field(default_factory=dict)  # streamId -> alerts removed
    usage_rows: int = 0

    def summary(self) -> dict[str, Any]:
        return {"dryRun": self.dry_run, "streams": len(self.streams),
                "streamIds": [s.stream_id for s in self.streams[:50]], "alerts": sum(self.alerts.values()),
                "usageRows": self.usage_rows}


Cutoffs = tuple[dt.datetime | None, dt.datetime | None, dt.datetime | None]


def cutoffs(services: Services, now: dt.datetime) -> Cutoffs:
    """(never-seen streams created before, offline streams last seen before, alerts received before); None: off."""
    s = services.settings
    return (now - dt.timedelta(hours=s.stale_after_h) if s.stale_after_h else None,
            now - dt.timedelta(days=s.stream_retention_d) if s.stream_retention_d else None,
            now - dt.timedelta(days=s.alert_retention_d) if s.alert_retention_d else None)


async def prune_stale_streams(services: Services, now: dt.datetime, *, dry_run: bool = False,
                              progress: Progress = QUIET) -> list[RemovedStream]:
    """Remove offline streams registered but never seen for stale_after_h, and offline streams last seen
    more than stream_retention_d ago, with their alerts and snapshots; their connections on this node are
    closed with 4410. A stream with a producer on this node is kept whatever the store says."""
    never_seen_before, seen_before, _ = cutoffs(services, now)
    candidates = await services.store.prunable_streams(never_seen_before, seen_before)
    removed = []
    for index, doc in enumerate(candidates, 1):
        stream_id = doc["streamId"]
        state = services.hub.streams.get(stream_id)
        if state is not None and state.producer is not None:
            continue
        if dry_run or await services.store.delete_stream_if_prunable(stream_id, never_seen_before, seen_before):
            seen = doc.get("lastSeenAt")
            removed.append(RemovedStream(stream_id, str(doc["ownerId"]), "never seen" if seen is None else "offline",
                                         seen, doc["createdAt"]))
            if not dry_run:
                services.commands.close_stream(stream_id, CloseCode.STREAM_DELETED, "stream removed by retention")
        progress.step("streams", index, len(candidates))
    progress.end()
    if removed and not dry_run:
        log.info("removed %d stream(s): %s", len(removed), ", ".join(r.stream_id for r in removed))
    return removed


async def prune_old_alerts(services: Services, now: dt.datetime, *, dry_run: bool = False,
                           progress: Progress = QUIET) -> dict[str, int]:
    """Remove alerts (and snapshots) received more than alert_retention_d ago, raising each stream's
    prunedSeq first; returns the count per stream. Works without the TTL index."""
    _, _, received_before = cutoffs(services, now)
    if received_before is None:
        return {}
    groups = await services.store.old_alerts_by_stream(received_before)
    if dry_run:
        return {g["streamId"]: g["count"] for g in groups}
    if not groups:
        return {}
    count = await services.store.remove_alerts_before(received_before, {g["streamId"]: g["maxSeq"] for g in groups})
    log.info("removed %d alert(s) received before %s", count, received_before.isoformat(timespec="seconds"))
    return {g["streamId"]: g["count"] for g in groups}


async def cleanup(services: Services, now: dt.datetime, *, dry_run: bool = False,
                  progress: Progress = QUIET) -> Cleanup:
    """Every prune: streams, then alerts, then hourly figures older than alert_retention_d."""
    result = Cleanup(dry_run)
    result.streams = await prune_stale_streams(services, now, dry_run=dry_run, progress=progress)
    result.alerts = await prune_old_alerts(services, now, dry_run=dry_run, progress=progress)
    _, _, received_before = cutoffs(services, now)
    if received_before is not None:
        result.usage_rows = await services.store.prune_usage(received_before, dry_run=dry_run)
    if not dry_run:
        await services.store.prune_job_runs(now - NODE_RUNS_KEPT)
    return result
