"""Alert intake: store first (batched per stream), then `ack` the sender, then fan out; retries are idempotent."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from collections import OrderedDict
from typing import Any

from watchout.backoff import Backoff
from watchout.broker import AlertItems, Broker
from watchout.errors import StoreUnavailable, WriterBusy
from watchout.hub import Hub, Peer, StreamState
from watchout.protocol import Alert, ack_message, alert_message, encode, error_message
from watchout.sequencer import Sequencer
from watchout.store import Store, new_alert_id, utcnow

log = logging.getLogger("watchout.alerts")
MAX_BATCH = 256
RECENT_IDS = 100_000
WRITER_LEASE_S = 10.0  # with several nodes: how long a node that stopped mid-batch keeps others waiting
WRITER_WAIT = Backoff(base_s=0.005, cap_s=0.2, jitter=False)  # polling the lease: 5 ms, 10 ms … 200 ms


class _Pending:
    __slots__ = ("peer", "alert", "sender", "epoch", "waiters", "result", "arrived")

    def __init__(self, peer: Peer, alert: Alert, sender: str, epoch: str | None) -> None:
        self.arrived = time.perf_counter()
        self.peer = peer
        self.alert = alert
        self.sender = sender
        self.epoch = epoch  # the stream's history it went into: a deleted stream's ids mean nothing after
        self.waiters: list[tuple[Peer, str | None]] = []  # retries that arrived while this was in flight
        self.result: tuple[str, int] | None = None


class AlertIntake:
    """Accepts alerts without awaiting the store in the sender's read loop.

    Alerts of one stream are stored in arrival order, in batches of those that arrived while the
    previous batch was being written; `seq` is allocated per batch with one atomic increment.
    A client `id` seen recently from the same sender on the same stream (or, on MongoDB, stored at all)
    yields the same alertId and seq and no second fan-out.

    With a shared broker (several nodes) a node takes the stream's writer lease for each batch, so one
    node at a time writes a stream's alerts and the committed lastSeq stays a true watermark.
    """

    def __init__(self, store: Store, hub: Hub, sequencer: Sequencer, broker: Broker,
                 on_latency: Callable[[float], None] | None = None) -> None:
        self.on_stored: Callable[[], None] | None = None  # alerts were stored (the notification engine wakes)
        self._store = store
        self._hub = hub
        self.sequencer = sequencer
        self._broker = broker
        self._lease_s = WRITER_LEASE_S if broker.is_shared else 0.0
        self._on_latency = on_latency  # seconds from arrival to fan-out, per alert
        self._queues: dict[str, list[_Pending]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._recent: OrderedDict[tuple[str, str, str], _Pending] = OrderedDict()
        self.stored = 0

    def submit(self, peer: Peer, state: StreamState, alert: Alert, sender: str) -> None:
        key = (alert.stream_id, sender, alert.client_id) if alert.client_id else None
        known = self._recent.get(key) if key is not None else None
        if known is not None and known.epoch == state.epoch:
            if known.result is None:
                known.waiters.append((peer, alert.ref))
            else:
                _ack(peer, alert.stream_id, known.result, alert.ref, duplicate=True)
            return
        pending = _Pending(peer, alert, sender, state.epoch)
        if key is not None:
            self._recent[key] = pending
            if len(self._recent) > RECENT_IDS:
                self._recent.popitem(last=False)
        self._queues.setdefault(alert.stream_id, []).append(pending)
        if alert.stream_id not in self._tasks:
            self._tasks[alert.stream_id] = asyncio.create_task(self._drain(state))

    @property
    def is_idle(self) -> bool:
        """No alert is waiting to be stored."""
        return not self._tasks

    async def drain(self) -> None:
        """Wait until every accepted alert is stored and acknowledged (graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def _drain(self, state: StreamState) -> None:
        sid = state.stream_id
        queue = self._queues[sid]
        try:
            while queue:
                batch = queue[:MAX_BATCH]
                del queue[:MAX_BATCH]
                try:
                    await self._store_batch(state, batch)
                except StoreUnavailable as exc:
                    log.error("%d alerts not stored: %s", len(batch), exc.message, extra={"stream": sid})
                    self._fail(batch, exc)
                except Exception:
                    log.exception("%d alerts not stored", len(batch), extra={"stream": sid})
                    self._fail(batch, StoreUnavailable("could not store alert"))
        finally:
            del self._tasks[sid]
            if not queue:
                self._queues.pop(sid, None)

    async def _reserve(self, stream_id: str, count: int) -> tuple[int, int]:
        """(first seq, lastSeq before the batch), waiting while another node writes this stream's alerts."""
        attempt, deadline = 0, time.monotonic() + 2 * WRITER_LEASE_S
        while True:
            try:
                return await self._store.reserve_batch(stream_id, count, self._broker.node_id, self._lease_s)
            except WriterBusy:
                if time.monotonic() > deadline:
                    raise StoreUnavailable("another node kept this stream's alerts locked") from None
                await asyncio.sleep(WRITER_WAIT.delay_s(attempt))
                attempt += 1

    async def _store_batch(self, state: StreamState, batch: list[_Pending]) -> None:
        sid = state.stream_id
        first_seq, prev = await self._reserve(sid, len(batch))
        received = utcnow()
        docs: list[dict[str, Any]] = []
        for offset, p in enumerate(batch):
            a = p.alert
            docs.append({"alertId": new_alert_id(), "streamId": a.stream_id, "seq": first_seq + offset,
                         "ownerId": state.owner_id, "senderId": p.sender, "severity": a.severity,
                         "message": a.message, "metadata": a.metadata, "timestamp": a.timestamp,
                         "receivedAt": received, "clientId": a.client_id, "acknowledged": None,
                         "hasSnapshot": a.snapshot is not None})
        for p, doc in zip(batch, docs):  # snapshots first, so a failure leaves no alert without its image
            if p.alert.snapshot is not None:
                await self._store.save_snapshot(doc["alertId"], state.stream_id, p.alert.snapshot)
        try:
            duplicates = await self._store.insert_alerts(docs)
            await self._store.mark_stored(sid, docs[-1]["seq"])
        finally:
            if self._lease_s:
                await self._store.release_writer(sid, self._broker.node_id)
        items: AlertItems = []
        fanned_out: list[_Pending] = []
        for p, doc in zip(batch, docs):
            if doc["clientId"] is not None and doc["clientId"] in duplicates:
                await self._settle_duplicate(p)
                continue
            p.result = (doc["alertId"], doc["seq"])
            self.stored += 1
            self._acknowledge(p)
            items.append((doc["seq"], encode(alert_message(doc))))
            fanned_out.append(p)
        if items and self.on_stored is not None:
            self.on_stored()
        self._broker.alerts(sid, prev, items)
        live = self._hub.streams.get(sid)  # the watchers' state, also when they came during the write
        if live is not None:
            self.sequencer.deliver(live, prev, items)
        if self._on_latency is not None:
            now = time.perf_counter()
            for p in fanned_out:
                self._on_latency(now - p.arrived)

    async def _settle_duplicate(self, p: _Pending) -> None:
        """Another node (or an earlier run) stored this client id: answer with that row, no fan-out."""
        assert p.alert.client_id is not None
        existing = await self._store.find_alert_by_client_id(p.alert.stream_id, p.sender, p.alert.client_id)
        if existing is None:  # pragma: no cover - removed between insert and lookup
            self._fail([p], StoreUnavailable("alert vanished"))
            return
        p.result = (existing["alertId"], existing["seq"])
        _ack(p.peer, p.alert.stream_id, p.result, p.alert.ref, duplicate=True)
        for peer, ref in p.waiters:
            _ack(peer, p.alert.stream_id, p.result, ref, duplicate=True)

    def _acknowledge(self, p: _Pending) -> None:
        assert p.result is not None
        _ack(p.peer, p.alert.stream_id, p.result, p.alert.ref)
        for peer, ref in p.waiters:
            _ack(peer, p.alert.stream_id, p.result, ref, duplicate=True)
        p.waiters.clear()

    def _fail(self, batch: list[_Pending], exc: StoreUnavailable) -> None:
        for p in batch:
            if p.alert.client_id is not None:
                self._recent.pop((p.alert.stream_id, p.sender, p.alert.client_id), None)
            for peer, ref in [(p.peer, p.alert.ref), *p.waiters]:
                peer.send(error_message(exc.code, f"{exc.message}; send it again", ref))


def _ack(peer: Peer, stream_id: str, result: tuple[str, int], ref: str | None, *, duplicate: bool = False) -> None:
    peer.send(ack_message(stream_id, result[0], result[1], duplicate=duplicate, ref=ref))
