"""AlertFeed: a stream's alerts reach this node's watchers in seq order, once each, gaps filled from the store.

Alerts come in batches, from this node's intake or from another node through the broker, each with
`prev`: the stream's committed lastSeq before the batch was stored (or, from a replay that read stored
alerts this node had not delivered yet, the seq it read them after). Every alert up to `prev` is in
the store, so when this node has delivered less than `prev` something was missed (Redis pub/sub is
at-most-once, or two nodes wrote one after the other and their batches crossed): the missing alerts
are read from the store and sent first. Seqs the store never kept (duplicates, failed writes) are
simply absent. Later batches wait behind a running fill, so order holds.
"""
from __future__ import annotations

import asyncio
import logging

from watchout.broker import AlertItems
from watchout.errors import StoreUnavailable
from watchout.hub import Hub, StreamState
from watchout.protocol import encode
from watchout.store import Store
from watchout.views import alert_event

log = logging.getLogger("watchout.feed")
FILL_PAGE = 500


class AlertFeed:
    def __init__(self, store: Store, hub: Hub) -> None:
        self._store = store
        self._hub = hub
        self._fills: set[asyncio.Task[None]] = set()
        self.filled = 0  # alerts this node read from the store because it had missed them live

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
                self._hub.deliver_alert(state, payload, seq)
                last = seq
        state.alert_seq = prev if last is None else max(last, prev)

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
            missed = [(a["seq"], encode(alert_event(a))) for a in page if a["seq"] <= prev]
            self.filled += len(missed)
            self._send(state, prev if len(missed) < FILL_PAGE else missed[-1][0], missed)

    async def drain(self) -> None:
        while self._fills:
            await asyncio.gather(*list(self._fills), return_exceptions=True)
