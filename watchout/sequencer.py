"""Sequencer: the one owner of alert order. Each stream's alerts reach this node's watchers in seq order,
once each: live batches, gaps filled from the store, and replays handed over to live without a gap.

Alerts come in batches, from this node's intake or from another node through the broker, each with
`prev`: the stream's committed lastSeq before the batch was stored (or, from a replay that read stored
alerts this node had not delivered yet, the seq it read them after). Every alert up to `prev` is in
the store, so when this node has delivered less than `prev` something was missed (Redis pub/sub is
at-most-once, or two nodes wrote one after the other and their batches crossed): the missing alerts
are read from the store and sent first. Seqs the store never kept (duplicates, failed writes) are
simply absent. Later batches wait behind a running fill, so order holds.

A watcher that subscribes with sinceSeq is replaying: live alerts are held for it while the stored ones
are read, then the held ones it did not already get are sent and it goes live, in one step.

The per-stream fields this module keeps on StreamState (alert_seq, alert_backlog, replaying) are written
here only; the hub drops a departing watcher's hold buffer with its other memberships.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from watchout.broker import AlertItems
from watchout.errors import StoreUnavailable
from watchout.hub import Hub, Peer, StreamState
from watchout.outgoing import Outgoing
from watchout.protocol import CloseCode, alert_message, encode, error_message, replay_complete_message
from watchout.store import Store

log = logging.getLogger("watchout.sequencer")
FILL_PAGE = 500
REPLAY_PAGE = 500
MAX_REPLAY_BUFFER = 10_000  # live alerts held for one replaying watcher before it is closed (4413)


class Sequencer:
    def __init__(self, store: Store, hub: Hub, *, replay_pace_bytes: int = 256 * 1024) -> None:
        self._store = store
        self._hub = hub
        self.replay_pace_bytes = replay_pace_bytes  # a replay reads its next page once the watcher is below this
        self._fills: set[asyncio.Task[None]] = set()
        self.filled = 0  # alerts this node read from the store because it had missed them live

    # ------------------------------------------------------------------ live batches
    def follow(self, state: StreamState, last_seq: int) -> None:
        """A stream this node starts to follow: every alert up to last_seq (the store's) counts as delivered."""
        if state.alert_seq is None:
            state.alert_seq = last_seq

    @staticmethod
    def delivered(state: StreamState) -> int | None:
        """The last seq this node delivered on the stream (None: not known yet)."""
        return state.alert_seq

    def deliver(self, state: StreamState, prev: int, items: AlertItems) -> None:
        """Send a batch to the stream's local watchers in order (never awaits)."""
        if state.alert_backlog is not None:  # a fill is running: queue behind it
            state.alert_backlog.append((prev, items))
        elif state.alert_seq is not None and prev > state.alert_seq:
            state.alert_backlog = [(prev, items)]
            task = asyncio.create_task(self._fill(state))
            self._fills.add(task)
            task.add_done_callback(self._fills.discard)
        else:
            self._send(state, prev, items)

    def _send(self, state: StreamState, prev: int, items: AlertItems) -> None:
        last = state.alert_seq
        for seq, payload in items:
            if last is None or seq > last:
                self._fan_out(state, payload, seq)
                last = seq
        state.alert_seq = prev if last is None else max(last, prev)

    def _fan_out(self, state: StreamState, payload: bytes, seq: int) -> None:
        message = Outgoing(payload)
        self._hub.send_to_alert_watchers(state, message)
        if not state.replaying:
            return
        for peer, held in list(state.replaying.items()):
            held.append((seq, message))
            if len(held) > MAX_REPLAY_BUFFER:  # the replay cannot keep up: this watcher must reconnect
                state.replaying.pop(peer, None)
                peer.send(error_message("slow-consumer", "replay fell too far behind"))
                peer.close(CloseCode.SLOW_CONSUMER, "replay fell too far behind")

    async def _fill(self, state: StreamState) -> None:
        backlog = state.alert_backlog
        assert backlog is not None
        try:
            while backlog:
                prev, items = backlog[0]
                await self._read_missed(state, prev)
                backlog.pop(0)
                self._send(state, prev, items)
        finally:
            state.alert_backlog = None

    async def _read_missed(self, state: StreamState, prev: int) -> None:
        """Send the stored alerts between what this node delivered and `prev`."""
        while state.alert_seq is not None and state.alert_seq < prev:
            try:
                page = await self._store.replay(state.stream_id, state.alert_seq, FILL_PAGE)
            except StoreUnavailable as exc:
                log.error("could not read missed alerts: %s", exc.message, extra={"stream": state.stream_id})
                return  # the watchers resume from the store with sinceSeq when they reconnect
            missed = [(a["seq"], encode(alert_message(a))) for a in page if a["seq"] <= prev]
            self.filled += len(missed)
            self._send(state, prev if len(missed) < FILL_PAGE else missed[-1][0], missed)

    # ------------------------------------------------------------------ replays
    @staticmethod
    def hold(state: StreamState, peer: Peer) -> None:
        """The watcher will replay: hold the stream's live alerts for it until finish_replay()."""
        state.replaying[peer] = []

    async def replay(self, peer: Peer, state: StreamState, since_seq: int, history: dict[str, Any] | None,
                     reset: bool) -> None:
        """Stored alerts after since_seq in order, then `replay-complete`, then live, without gap or repeat.

        The watcher was held (hold()) before the first read, so an alert stored after that read is held
        for it and sent after the replay unless the replay already covered it. `reset`: the watcher's
        position was from another history; this one is replayed from its start, never as complete.
        Pages are read as the watcher reads: the next one once its outbox is below replay_pace_bytes.
        """
        sid, last, complete = state.stream_id, since_seq, not reset
        if history is not None and not reset:
            # alerts up to prunedSeq may have been removed by retention; a sinceSeq beyond the stream's last
            # alert comes from another history (a client that did not say its epoch)
            complete = history.get("prunedSeq", 0) <= since_seq <= history.get("lastSeq", 0)
        try:
            while _still_replaying(peer, state):
                page = await self._store.replay(sid, last, REPLAY_PAGE)
                if not _still_replaying(peer, state):
                    return
                # Only what this node has delivered live already; the rest of the page goes through
                # deliver(), which sends it once, in order, to every watcher here (to this one through the
                # hold buffer) and skips it when its batch is fanned out. Waiting for that fan-out is not
                # enough: the node may have started following the stream from a read taken just before
                # the batch was fanned out to nobody here (or missed it from Redis), and then nothing
                # would send it before the stream's next alert.
                delivered = state.alert_seq
                caught_up = len(page) < REPLAY_PAGE
                for index, alert in enumerate(page):
                    if delivered is not None and alert["seq"] > delivered:
                        self.deliver(state, last, [(a["seq"], encode(alert_message(a))) for a in page[index:]])
                        caught_up = True
                        break
                    peer.outbox.send(Outgoing(encode(alert_message(alert))))
                    last = alert["seq"]
                if caught_up:
                    break
                await peer.outbox.drained(self.replay_pace_bytes)  # the watcher reads before the next page
        except StoreUnavailable as exc:
            complete = False
            peer.send(error_message(exc.code, f"replay stopped: {exc.message}"))
        if not _still_replaying(peer, state):
            return
        peer.send(replay_complete_message(sid, last, complete=complete, reset=reset))
        self._finish_replay(state, peer, last)

    def _finish_replay(self, state: StreamState, peer: Peer, last_seq: int) -> None:
        """Send the live alerts held during the replay that it did not already cover, and make the watcher
        live, in one step (no alert can slip between)."""
        held = state.replaying.pop(peer, None)
        if held is None:
            return
        for seq, message in held:
            if seq > last_seq:
                peer.outbox.send(message)
                last_seq = seq
        self._hub.make_alert_watcher(state, peer)

    async def drain(self) -> None:
        while self._fills:
            await asyncio.gather(*list(self._fills), return_exceptions=True)


def _still_replaying(peer: Peer, state: StreamState) -> bool:
    return peer in state.replaying and not peer.outbox.is_closed
