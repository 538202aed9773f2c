"""Marking silent producers offline: this node's live producers, and streams no live node vouches for."""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from watchout.hub import Tally
from watchout.protocol import CloseCode, StreamStatus
from watchout.services import Services
from workers.clock import Instant, floor_hour, utc

log = logging.getLogger("watchout.jobs.offline")


@dataclass(slots=True)
class ProducerCheck:
    silent: list[str] = field(default_factory=list)  # streams whose producer was closed and marked offline
    live: int = 0  # producers heard from recently; their lastSeenAt was saved

    def summary(self) -> dict[str, Any]:
        return {"silent": len(self.silent), "silentStreams": self.silent[:50], "live": self.live}


async def check_producers(services: Services, at: Instant) -> ProducerCheck:
    """This node's producers: one not heard from (message, frame or pong) for offline_after_s is detached,
    its watchers get `status: offline`, its connection is closed (1000) and its stream is marked offline
    with lastSeenAt = when it was last heard. For the others lastSeenAt and lastFrameAt are saved. The
    frame counters and online time since the last check are added to the stream's hourly figures.

    Runs on every node: only this node can see its own connections.
    """
    hub, settings = services.hub, services.settings
    check = ProducerCheck()
    silent: dict[str, dt.datetime] = {}
    beats: list[tuple[str, dt.datetime, dt.datetime | None]] = []
    for state in list(hub.streams.values()):
        peer = state.producer
        if peer is None:
            continue
        quiet_s = at.mono - peer.last_heard
        heard = at.wall_at(peer.last_heard)
        if quiet_s > settings.offline_after_s:
            services.commands.release_producer(state)
            reason = f"nothing heard from the producer for {quiet_s:.0f} s"
            peer.close(CloseCode.NORMAL, reason)  # as Tornado's own ping timeout: it may reconnect at once
            silent[state.stream_id] = heard
            log.info("producer silent: %s; marked offline", reason, extra={"conn": peer.id, "stream": state.stream_id})
        else:
            beats.append((state.stream_id, heard, utc(state.last_frame_at) if state.last_frame_at else None))
    check.silent = sorted(silent)
    check.live = len(beats)
    await services.store.mark_streams_offline(silent)
    await services.store.record_heartbeats(beats)
    await save_figures(services, at.wall)
    for stream_id in silent:  # a producer that registered again meanwhile: its status stays true
        again = hub.streams.get(stream_id)
        if again is not None and again.producer is not None:
            await services.store.set_stream_status(stream_id, again.status)
    return check


async def save_figures(services: Services, now: dt.datetime) -> None:
    """Add the frame counters and online time since the last save to the hourly figures (`usage`)."""
    await services.store.add_usage(usage_rows(services.hub.take_tallies(now.timestamp()), now))


def usage_rows(tallies: list[Tally], now: dt.datetime) -> list[dict[str, Any]]:
    """Hourly figures: online time split at hour boundaries; frame counts filed under the current hour."""
    rows: dict[tuple[str, dt.datetime], dict[str, Any]] = {}

    def row(tally: Tally, hour: dt.datetime) -> dict[str, Any]:
        key = (tally.stream_id, hour)
        if key not in rows:
            rows[key] = {"streamId": tally.stream_id, "ownerId": tally.owner_id, "hour": hour, "framesIn": 0,
                         "framesRelayed": 0, "framesDropped": 0, "onlineS": 0.0}
        return rows[key]

    for tally in tallies:
        if tally.frames_in or tally.frames_relayed or tally.frames_dropped:
            current = row(tally, floor_hour(now))
            current["framesIn"] += tally.frames_in
            current["framesRelayed"] += tally.frames_relayed
            current["framesDropped"] += tally.frames_dropped
        for start, end in tally.online:
            moment = utc(start)
            finish = utc(end)
            while moment < finish:
                hour = floor_hour(moment)
                piece_end = min(finish, hour + dt.timedelta(hours=1))
                row(tally, hour)["onlineS"] += (piece_end - moment).total_seconds()
                moment = piece_end
    return list(rows.values())


async def mark_unseen_offline(services: Services, now: dt.datetime) -> list[str]:
    """Streams marked online or streaming whose lastSeenAt is older than offline_after_s + offline_check_s,
    and whose producer is on none of this node's connections, become offline (lastSeenAt unchanged): their
    producer's node stopped, or lost the database, without marking them. This node's watchers of those
    streams get `status: offline`.

    Live producers' lastSeenAt is saved at every check_producers(), so the extra offline_check_s keeps a
    healthy producer on another node from being marked offline. Runs on one node per firing.
    """
    settings, hub = services.settings, services.hub
    seen_before = now - dt.timedelta(seconds=settings.offline_after_s + settings.offline_check_s)
    live_here = {sid for sid, state in hub.streams.items() if state.producer is not None}
    marked = await services.store.mark_unseen_streams_offline(seen_before, live_here)
    for stream_id in marked:
        hub.announce_status(stream_id, StreamStatus.OFFLINE)
    if marked:
        log.info("marked %d stream(s) offline whose producer was last seen before %s", len(marked),
                 seen_before.isoformat(timespec="seconds"))
    return marked
