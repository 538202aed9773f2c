"""Local connections per stream and fan-out to them; nothing here awaits a consumer."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from watchout.auth import Principal
from watchout.broker import AlertItems, Broker, MemoryBroker
from watchout.frames import Frame
from watchout.outgoing import Outgoing
from watchout.outbox import Flusher, Outbox, Writer
from watchout.errors import StreamBusy
from watchout.protocol import StreamStatus, encode, error_message, status_message

EVENTS, VIDEO = 1, 2  # the broker channels of a stream a node listens to
FPS_WINDOW_S = 2.0


def status_now(stream_id: str, status: StreamStatus) -> bytes:
    """The `status` message telling a stream's participants its status, as of now, encoded."""
    return encode(status_message(stream_id, status, int(time.time() * 1000)))


class Peer:
    """One WebSocket connection as the core sees it."""

    __slots__ = ("id", "principal", "outbox", "producing", "watching", "client_type", "writer", "closed_with",
                 "last_heard", "__weakref__")

    def __init__(self, connection_id: str, writer: Writer, outbox: Outbox) -> None:
        self.id = connection_id
        self.writer: Writer | None = writer
        self.outbox = outbox
        self.principal: Principal | None = None
        self.producing: str | None = None
        self.watching: dict[str, Subscription] = {}
        self.client_type: str | None = None
        self.closed_with: int | None = None  # the close code when the server closed it
        self.last_heard = time.monotonic()  # the last message or pong from it (set by the socket)

    def send(self, message: dict[str, Any]) -> None:
        self.outbox.send(Outgoing(encode(message)))

    def close(self, code: int, reason: str) -> None:
        """Write what is queued (e.g. the error that explains the close), then close with `code`."""
        writer = self.writer
        if self.closed_with is None:
            self.closed_with = code
        self.outbox.flush()
        self.outbox.is_closed = True
        if writer is not None:
            writer.close_with(code, reason)

    def detach(self) -> None:
        """Drop the references back to the socket once it has closed, so refcounting frees the
        connection at once instead of leaving a cycle for the garbage collector."""
        self.outbox.detach()
        self.writer = None


def close_replaced(peer: Peer) -> None:
    """Tell a producer that a newer one took over its stream (here or on another node), then close it (4409)."""
    busy = StreamBusy("a newer producer took over this stream", code="producer-replaced")
    peer.send(error_message(busy.code, busy.message))
    peer.close(busy.close_code, busy.message)


class Subscription:
    __slots__ = ("client_type", "video", "alerts", "binary")

    def __init__(self, client_type: str, video: bool, alerts: bool, binary: bool) -> None:
        self.client_type = client_type
        self.video = video
        self.alerts = alerts
        self.binary = binary


class StreamState:
    """What this node knows live about one stream: its producer, watchers and figures."""

    __slots__ = ("stream_id", "owner_id", "producer", "json_video", "binary_video", "alert_watchers",
                 "watchers", "replaying", "status", "frames_in", "frames_relayed", "frames_dropped",
                 "last_frame_at", "producer_since", "_rate_start", "_rate_count", "fps", "tallied", "online_since",
                 "alert_seq", "alert_backlog", "channels", "epoch")

    def __init__(self, stream_id: str, owner_id: str) -> None:
        self.stream_id = stream_id
        self.owner_id = owner_id
        self.producer: Peer | None = None
        self.json_video: dict[Peer, None] = {}
        self.binary_video: dict[Peer, None] = {}
        self.alert_watchers: dict[Peer, None] = {}
        self.watchers: dict[Peer, Subscription] = {}
        # watchers catching up on stored alerts: live alerts wait here, with their seq, until then
        self.replaying: dict[Peer, list[tuple[int, Outgoing]]] = {}
        self.status = StreamStatus.OFFLINE
        self.frames_in = 0
        self.frames_relayed = 0
        self.frames_dropped = 0
        self.last_frame_at = 0.0
        self.producer_since = 0.0
        self._rate_start = 0.0
        self._rate_count = 0
        self.fps = 0.0  # frames per second over the last complete 2 s window
        self.tallied = (0, 0, 0)  # frames_in, frames_relayed, frames_dropped already handed to take_tallies()
        self.online_since = 0.0  # wall time from which the producer's online time is not tallied yet; 0: none
        # the next three are watchout.sequencer's: alert order on this node
        self.alert_seq: int | None = None  # the last alert seq delivered here; None: not yet known
        self.alert_backlog: list[tuple[int, AlertItems]] | None = None  # batches waiting behind a gap fill
        self.channels = 0  # what this node asked the broker for: 0 nothing, EVENTS, EVENTS | VIDEO
        self.epoch: str | None = None  # the identity of the stream's alert history, as the store gave it

    def count_frame(self, now: float) -> None:
        self.frames_in += 1
        self.count_rate(now)

    def count_rate(self, now: float) -> None:
        self.last_frame_at = now
        self._rate_count += 1
        elapsed = now - self._rate_start
        if elapsed >= FPS_WINDOW_S:
            self.fps = self._rate_count / elapsed if elapsed < 2 * FPS_WINDOW_S else 0.0
            self._rate_start, self._rate_count = now, 0

    def current_fps(self, now: float) -> float:
        """The recent frame rate; 0 once frames have stopped for a whole window."""
        return self.fps if now - self.last_frame_at < 2 * FPS_WINDOW_S else 0.0

    @property
    def is_idle(self) -> bool:
        return self.producer is None and not self.watchers

    def participants(self) -> Iterable[Peer]:
        if self.producer is not None:
            yield self.producer
        yield from self.watchers


class Tally:
    """A stream's figures since the last take_tallies(): frames and the spans (wall-time seconds) it was online."""

    __slots__ = ("stream_id", "owner_id", "frames_in", "frames_relayed", "frames_dropped", "online")

    def __init__(self, stream_id: str, owner_id: str) -> None:
        self.stream_id = stream_id
        self.owner_id = owner_id
        self.frames_in = self.frames_relayed = self.frames_dropped = 0
        self.online: list[tuple[float, float]] = []

    @property
    def is_empty(self) -> bool:
        return not (self.frames_in or self.frames_relayed or self.frames_dropped or self.online)


class Hub:
    """All local peers and stream states of this node."""

    def __init__(self, broker: Broker | None = None) -> None:
        self.broker = broker if broker is not None else MemoryBroker("local")
        self.flusher = Flusher()
        self.peers: dict[str, Peer] = {}
        self.streams: dict[str, StreamState] = {}
        self.frames_dropped_closed = 0  # drops counted on connections that have since closed
        self.frames_relayed_closed = 0
        self.bytes_out_closed = 0
        self.frames_in = 0
        self.bytes_in = 0
        self.untallied: dict[str, Tally] = {}  # figures of producers and streams gone since the last tally
        self.on_status: Callable[[str, StreamStatus], None] | None = None  # a status decided here (notifications)

    # ------------------------------------------------------------------ membership
    def add_peer(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    def state(self, stream_id: str, owner_id: str) -> StreamState:
        state = self.streams.get(stream_id)
        if state is None:
            state = self.streams[stream_id] = StreamState(stream_id, owner_id)
        return state

    def set_producer(self, state: StreamState, peer: Peer, wants_alerts: bool) -> Peer | None:
        """Make peer the producer; returns the producer it replaced, if any."""
        previous = state.producer if state.producer is not peer else None
        if previous is not None:
            previous.producing = None
            state.alert_watchers.pop(previous, None)
        state.producer = peer
        state.producer_since = time.time()
        if not state.online_since:
            state.online_since = state.producer_since
        peer.producing = state.stream_id
        if wants_alerts:
            state.alert_watchers[peer] = None
        self._sync_channels(state)
        return previous

    def add_watcher(self, state: StreamState, peer: Peer, sub: Subscription, *, live_alerts: bool = True) -> None:
        """Add a watcher; without `live_alerts` it gets the stream's alerts only once make_alert_watcher() is
        called (a replaying watcher: watchout.sequencer holds its live alerts meanwhile)."""
        self._drop_watcher(state, peer)
        state.watchers[peer] = sub
        peer.watching[state.stream_id] = sub
        if sub.video:
            (state.binary_video if sub.binary else state.json_video)[peer] = None
        if sub.alerts and live_alerts:
            state.alert_watchers[peer] = None
        self._sync_channels(state)

    @staticmethod
    def make_alert_watcher(state: StreamState, peer: Peer) -> None:
        state.alert_watchers[peer] = None

    def remove_watcher(self, state: StreamState, peer: Peer) -> None:
        self._drop_watcher(state, peer)
        peer.watching.pop(state.stream_id, None)
        self._forget_if_idle(state)
        self._sync_channels(state)

    def _drop_watcher(self, state: StreamState, peer: Peer) -> None:
        state.watchers.pop(peer, None)
        state.json_video.pop(peer, None)
        state.binary_video.pop(peer, None)
        state.replaying.pop(peer, None)
        if state.producer is not peer:
            state.alert_watchers.pop(peer, None)

    def remove_peer(self, peer: Peer) -> StreamState | None:
        """Forget a closed peer; returns the stream it was producing (now without producer), if any."""
        self.peers.pop(peer.id, None)
        self.frames_dropped_closed += peer.outbox.frames_dropped
        self.frames_relayed_closed += peer.outbox.frames_sent
        self.bytes_out_closed += peer.outbox.bytes_sent
        for stream_id in list(peer.watching):
            state = self.streams.get(stream_id)
            if state is not None:
                self.remove_watcher(state, peer)
        orphaned = None
        if peer.producing is not None:
            state = self.streams.get(peer.producing)
            if state is not None and state.producer is peer:
                state.producer = None
                state.alert_watchers.pop(peer, None)
                state.status = StreamStatus.OFFLINE
                self._tally_offline(state)
                orphaned = state
                self._forget_if_idle(state)
                self._sync_channels(state)
            peer.producing = None
        return orphaned

    def forget_stream(self, stream_id: str) -> None:
        """The stream was deleted: its participants (being closed) leave it at once and its live state goes,
        so a stream registered again under the id starts afresh (its new history, from the store)."""
        state = self.streams.get(stream_id)
        if state is None:
            return
        self.release_producer(state, announce=False)
        for peer in list(state.watchers):
            self.remove_watcher(state, peer)
        self._forget_if_idle(state)  # also when it had no participant left to remove
        self._sync_channels(state)

    def release_producer(self, state: StreamState, *, announce: bool = True) -> Peer | None:
        """Detach the stream's producer, which stays connected until closed, and (with `announce`) send
        `status: offline` to the watchers; returns the producer, if there was one. Its later disconnect
        changes nothing. Without `announce`: a producer on another node took over."""
        peer = state.producer
        if peer is None:
            return None
        state.producer = None
        peer.producing = None
        state.alert_watchers.pop(peer, None)
        self._tally_offline(state)
        if announce:
            self.publish_status(state, StreamStatus.OFFLINE)
        self._forget_if_idle(state)
        self._sync_channels(state)
        return peer

    def _sync_channels(self, state: StreamState) -> None:
        """Listen to a stream's broker channels only while this node has participants (video: video watchers)."""
        live = self.streams.get(state.stream_id) is state
        wanted = (EVENTS | (VIDEO if state.json_video or state.binary_video else 0)) if live else 0
        if wanted != state.channels:
            state.channels = wanted
            if wanted:
                self.broker.watch(state.stream_id, bool(wanted & VIDEO))
            else:
                self.broker.unwatch(state.stream_id)

    def _forget_if_idle(self, state: StreamState) -> None:
        if state.is_idle and self.streams.get(state.stream_id) is state:
            del self.streams[state.stream_id]
            if (state.frames_in, state.frames_relayed, state.frames_dropped) != state.tallied:
                self._tally_frames(state, self._untallied(state))

    # ------------------------------------------------------------------ tallies (jobs save them)
    def take_tallies(self, now: float) -> list[Tally]:
        """Frames and online time (up to `now`, wall time) of every stream since the last call."""
        tallies = self.untallied
        self.untallied = {}
        for state in self.streams.values():
            tally = tallies.get(state.stream_id) or Tally(state.stream_id, state.owner_id)
            self._tally_frames(state, tally)
            if state.online_since and now > state.online_since:
                tally.online.append((state.online_since, now))
                state.online_since = now
            if not tally.is_empty:
                tallies[state.stream_id] = tally
        return [t for t in tallies.values() if not t.is_empty]

    def _untallied(self, state: StreamState) -> Tally:
        tally = self.untallied.get(state.stream_id)
        if tally is None:
            tally = self.untallied[state.stream_id] = Tally(state.stream_id, state.owner_id)
        return tally

    def _tally_offline(self, state: StreamState) -> None:
        if state.online_since:
            now = time.time()
            if now > state.online_since:
                self._untallied(state).online.append((state.online_since, now))
            state.online_since = 0.0

    @staticmethod
    def _tally_frames(state: StreamState, tally: Tally) -> None:
        frames_in, relayed, dropped = state.tallied
        tally.frames_in += state.frames_in - frames_in
        tally.frames_relayed += state.frames_relayed - relayed
        tally.frames_dropped += state.frames_dropped - dropped
        state.tallied = (state.frames_in, state.frames_relayed, state.frames_dropped)

    # ------------------------------------------------------------------ fan-out
    def publish_frame(self, state: StreamState, frame: Frame) -> None:
        """Send a producer's frame to every video watcher here and on other nodes; never blocks."""
        state.count_frame(time.time())
        self.frames_in += 1
        self.broker.frame(frame)
        self.deliver_frame(state, frame)

    def deliver_frame(self, state: StreamState, frame: Frame) -> None:
        """Send a frame to this node's video watchers in the form each asked for."""
        sid = state.stream_id
        dropped = 0
        if state.json_video:
            message = frame.as_json()
            for peer in state.json_video:
                dropped += peer.outbox.send(message, sid)
        if state.binary_video:
            message = frame.as_binary()
            for peer in state.binary_video:
                dropped += peer.outbox.send(message, sid)
        state.frames_relayed += len(state.json_video) + len(state.binary_video)
        state.frames_dropped += dropped

    @staticmethod
    def send_to_alert_watchers(state: StreamState, message: Outgoing) -> None:
        """One alert to this node's live alert watchers (watchout.sequencer decides which and when)."""
        for peer in state.alert_watchers:
            peer.outbox.send(message)

    def publish_to_watchers(self, stream_id: str, message: dict[str, Any]) -> None:
        """A message for everyone, on every node, who receives the stream's alerts (e.g. an acknowledgement)."""
        payload = encode(message)
        self.broker.to_watchers(stream_id, payload)
        state = self.streams.get(stream_id)
        if state is not None:
            self.deliver_to_watchers(state, payload)

    def deliver_to_watchers(self, state: StreamState, payload: bytes) -> None:
        outgoing = Outgoing(payload)
        for peer in (*state.alert_watchers, *state.replaying):
            peer.outbox.send(outgoing)

    def publish_status(self, state: StreamState, status: StreamStatus, *, skip: Peer | None = None) -> None:
        """Tell the stream's participants here and on other nodes its new status (and `on_status`)."""
        if self.on_status is not None:
            self.on_status(state.stream_id, status)
        payload = status_now(state.stream_id, status)
        self.broker.status(state.stream_id, payload)
        self.deliver_status(state, status, payload, skip=skip)

    def announce_status(self, stream_id: str, status: StreamStatus) -> None:
        """A stream's status decided without its producer (a job found it gone): every node's watchers hear it."""
        state = self.streams.get(stream_id)
        if state is None:
            if self.on_status is not None:
                self.on_status(stream_id, status)
            self.broker.status(stream_id, status_now(stream_id, status))
        elif state.producer is None:
            self.publish_status(state, status)

    def deliver_status(self, state: StreamState, status: StreamStatus, payload: bytes, *,
                       skip: Peer | None = None) -> None:
        state.status = status
        message = Outgoing(payload)
        for peer in state.participants():
            if peer is not skip:
                peer.outbox.send(message)

    # ------------------------------------------------------------------ figures
    def figures(self) -> dict[str, Any]:
        """The seed's /stats figures plus frame counters, for this node."""
        producers = sum(1 for s in self.streams.values() if s.producer is not None)
        live = [p.outbox for p in self.peers.values()]
        return {
            "totalProducers": producers,
            "totalVideoConsumers": sum(len(s.json_video) + len(s.binary_video) for s in self.streams.values()),
            "totalAlertConsumers": sum(len(s.alert_watchers) for s in self.streams.values()),
            "totalConnections": len(self.peers),
            "activeStreams": sorted(s.stream_id for s in self.streams.values() if s.producer is not None),
            "framesRelayed": self.frames_relayed_closed + sum(o.frames_sent for o in live),
            "framesDropped": self.frames_dropped_closed + sum(o.frames_dropped for o in live),
        }
