"""ClusterSink: what this node does with messages from other nodes, and its figures for the cluster view."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson

from watchout.broker import AlertItems
from watchout.errors import InvalidMessage, StoreUnavailable
from watchout.frames import parse_binary_frame
from watchout.hub import Hub, StreamState, close_replaced, status_now
from watchout.protocol import STREAM_STATUSES, CloseCode, StreamStatus, error_message
from watchout.sequencer import Sequencer
from watchout.store import Store

log = logging.getLogger("watchout.cluster")


class ClusterSink:
    """Delivers other nodes' frames, alerts and events to this node's clients (never awaits on that path)."""

    def __init__(self, hub: Hub, sequencer: Sequencer, store: Store) -> None:
        self._hub = hub
        self._sequencer = sequencer
        self._store = store
        self._tasks: set[asyncio.Task[None]] = set()

    def on_frame(self, stream_id: str, binary_frame: bytes) -> None:
        state = self._hub.streams.get(stream_id)
        if state is None or not (state.json_video or state.binary_video):
            return
        try:
            _, frame = parse_binary_frame(binary_frame)
        except InvalidMessage:
            log.warning("malformed frame from another node", extra={"stream": stream_id})
            return
        state.count_rate(time.time())
        self._hub.deliver_frame(state, frame)

    def on_alerts(self, stream_id: str, prev: int, items: AlertItems) -> None:
        state = self._hub.streams.get(stream_id)
        if state is not None:
            self._sequencer.deliver(state, prev, items)

    def on_status(self, stream_id: str, message: bytes) -> None:
        state = self._hub.streams.get(stream_id)
        if state is None or state.producer is not None:  # a local producer's status is this node's to say
            return
        status = _status_of(message)
        if status is not None:
            self._hub.deliver_status(state, status, message)

    def on_watchers(self, stream_id: str, message: bytes) -> None:
        state = self._hub.streams.get(stream_id)
        if state is not None:
            self._hub.deliver_to_watchers(state, message)

    def on_producer(self, stream_id: str, connection_id: str) -> None:
        """A producer on another node registered for stream_id: a local one is replaced (newer wins)."""
        state = self._hub.streams.get(stream_id)
        if state is not None and state.producer is not None and state.producer.id != connection_id:
            self.on_producer_lost(stream_id, state.producer.id)

    def on_producer_lost(self, stream_id: str, connection_id: str) -> None:
        state = self._hub.streams.get(stream_id)
        if state is None or state.producer is None or state.producer.id != connection_id:
            return
        peer = self._hub.release_producer(state, announce=False)  # the new producer said `online` already
        if peer is not None:
            close_replaced(peer)
            log.info("producer replaced by one on another node", extra={"conn": peer.id, "stream": stream_id})

    def on_close(self, stream_id: str, code: int, reason: str) -> None:
        state = self._hub.streams.get(stream_id)
        if state is None:
            return
        for peer in list(state.participants()):
            peer.send(error_message("stream-deleted" if code == CloseCode.STREAM_DELETED else "closed", reason))
            peer.close(code, reason)
        if code == CloseCode.STREAM_DELETED:  # deleted: a stream registered again under the id starts afresh
            self._hub.forget_stream(stream_id)

    def on_resync(self, stream_ids: Iterable[str]) -> None:
        """The broker (re)subscribed: catch up on what may have been missed meanwhile, from the store."""
        for stream_id in stream_ids:
            task = asyncio.create_task(self._resync(stream_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resync(self, stream_id: str) -> None:
        try:
            doc = await self._store.get_stream(stream_id)
        except StoreUnavailable as exc:
            log.error("could not catch up after the broker reconnected: %s", exc.message, extra={"stream": stream_id})
            return
        state = self._hub.streams.get(stream_id)
        if doc is None or state is None:
            return
        if state.producer is None and doc.get("status") in STREAM_STATUSES and doc["status"] != state.status:
            status = StreamStatus(doc["status"])
            self._hub.deliver_status(state, status, status_now(stream_id, status))
        self._sequencer.deliver(state, int(doc.get("lastSeq", 0)), [])

    def local_producers(self) -> list[tuple[str, str]]:
        return [(s.stream_id, s.producer.id) for s in self._hub.streams.values() if s.producer is not None]

    def figures(self) -> dict[str, Any]:
        return self._hub.figures()

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _status_of(message: bytes) -> StreamStatus | None:
    try:
        value = orjson.loads(message).get("status")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return StreamStatus(value) if value in STREAM_STATUSES else None


def initial_state(state: StreamState, doc: dict[str, Any] | None, *, status: bool) -> None:
    """A stream this node starts to follow: its history's epoch (and, with `status`, its status: the
    producer may be on another node) as the store knows them. Its alert watermark is the sequencer's."""
    if doc is None:
        return
    if status and state.producer is None and doc.get("status") in STREAM_STATUSES:
        state.status = StreamStatus(doc["status"])
    if state.epoch is None:
        state.epoch = doc.get("epoch")
