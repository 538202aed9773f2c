"""Cross-node fan-out: the broker interface, the in-process MemoryBroker and the wire envelope.

A node publishes what its local clients produce (frames, stored alerts, status, acknowledgements,
producer claims, stream closes); the broker carries it to the other nodes, whose Sink delivers it
to their local clients. MemoryBroker (one node) carries nothing; RedisBroker (watchout.redisbroker)
uses Redis pub/sub on per-stream channels.

Envelope of a message between nodes: one kind byte, the sending node's id (length-prefixed, so a
node skips its own messages), then the payload:
    F  a video frame in its binary wire form (watchout.frames layout)
    A  an alert batch: prev (the stream's committed lastSeq before the batch, 8 bytes), then per
       alert its seq (8 bytes), payload length (4 bytes) and the `alert` message as sent to clients
    S  a `status` message;  W  a message for the stream's alert watchers (`alert-acknowledged`)
    P  producer claimed (payload: its lease, "<ms>|<node>|<connection>");  C  stream closed (code, reason)
    I  a node started listening to the stream's frames (the producer's node publishes them at once)
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Protocol

from watchout.frames import Frame

FRAME, ALERTS, STATUS, WATCHERS, PRODUCER, CLOSE, INTEREST = b"F", b"A", b"S", b"W", b"P", b"C", b"I"
_SEQ = struct.Struct("!Q")
_ITEM = struct.Struct("!QI")
_CODE = struct.Struct("!H")
AlertItems = list[tuple[int, bytes]]  # (seq, the `alert` message's JSON)


class Sink(Protocol):
    """What a node does with a message from another node (watchout.cluster.ClusterSink)."""

    def on_frame(self, stream_id: str, binary_frame: bytes) -> None: ...
    def on_alerts(self, stream_id: str, prev: int, items: AlertItems) -> None: ...
    def on_status(self, stream_id: str, message: bytes) -> None: ...
    def on_watchers(self, stream_id: str, message: bytes) -> None: ...
    def on_producer(self, stream_id: str, connection_id: str) -> None: ...
    def on_close(self, stream_id: str, code: int, reason: str) -> None: ...
    def on_resync(self, stream_ids: Iterable[str]) -> None: ...
    def local_producers(self) -> list[tuple[str, str]]: ...
    def on_producer_lost(self, stream_id: str, connection_id: str) -> None: ...
    def figures(self) -> dict[str, Any]: ...


class Broker(Protocol):
    """What the core asks of the fan-out between nodes. Implementations: MemoryBroker (one node) and
    watchout.redisbroker.RedisBroker (several nodes). Nothing here may block the caller: publishing is
    fire-and-forget, and what other nodes send arrives through the attached Sink."""

    is_shared: bool  # whether other nodes exist (alerts then take the stream's writer lease)
    node_id: str

    @property
    def healthy(self) -> bool:
        """Whether messages cross right now (False while Redis is away: /health says degraded)."""

    def attach(self, sink: Sink) -> None:
        """Where other nodes' messages go (before start())."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def watch(self, stream_id: str, video: bool) -> None:
        """This node has local participants of stream_id (and local video watchers when `video`)."""

    def unwatch(self, stream_id: str) -> None:
        """This node no longer has participants of stream_id."""

    async def ready(self, stream_id: str) -> None:
        """Return once what other nodes publish for stream_id reaches this node (bounded wait)."""

    def frame(self, frame: Frame) -> None:
        """A producer's frame, for other nodes' video watchers."""

    def alerts(self, stream_id: str, prev: int, items: AlertItems) -> None:
        """A stored batch (seq, encoded alert), after `prev`, the stream's lastSeq before it."""

    def status(self, stream_id: str, message: bytes) -> None: ...

    def to_watchers(self, stream_id: str, message: bytes) -> None:
        """A message for every alert watcher of the stream on other nodes (an acknowledgement)."""

    def claim_producer(self, stream_id: str, connection_id: str) -> None:
        """A producer registered here: one on another node closes (the newer wins)."""

    def release_producer(self, stream_id: str, connection_id: str) -> None: ...

    def close_stream(self, stream_id: str, code: int, reason: str) -> None:
        """Close every connection of the stream on other nodes (e.g. it was deleted)."""

    async def other_nodes(self) -> list[dict[str, Any]] | None:
        """The latest figures of every other live node; None when they cannot be read."""


class MemoryBroker:
    """One node: every client is local, so nothing crosses and every method is a no-op."""

    is_shared = False

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    @property
    def healthy(self) -> bool:
        return True

    def attach(self, sink: Sink) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def watch(self, stream_id: str, video: bool) -> None:
        """This node has local participants of stream_id (and local video watchers when `video`)."""

    def unwatch(self, stream_id: str) -> None:
        """This node no longer has participants of stream_id."""

    async def ready(self, stream_id: str) -> None:
        """Return once what other nodes publish for stream_id reaches this node (bounded wait)."""

    def frame(self, frame: Frame) -> None:
        pass

    def alerts(self, stream_id: str, prev: int, items: AlertItems) -> None:
        pass

    def status(self, stream_id: str, message: bytes) -> None:
        pass

    def to_watchers(self, stream_id: str, message: bytes) -> None:
        pass

    def claim_producer(self, stream_id: str, connection_id: str) -> None:
        pass

    def release_producer(self, stream_id: str, connection_id: str) -> None:
        pass

    def close_stream(self, stream_id: str, code: int, reason: str) -> None:
        pass

    async def other_nodes(self) -> list[dict[str, Any]] | None:
        """The latest figures of every other live node (none here); None when they cannot be read."""
        return []


# ---------------------------------------------------------------------- envelope
def envelope(kind: bytes, node: bytes, payload: bytes) -> bytes:
    return b"".join((kind, bytes((len(node),)), node, payload))


def open_envelope(data: bytes) -> tuple[bytes, bytes, memoryview]:
    """(kind, sending node id, payload); raises ValueError on a malformed message."""
    if len(data) < 2 or len(data) < 2 + data[1]:
        raise ValueError("message shorter than its envelope")
    end = 2 + data[1]
    return data[:1], data[2:end], memoryview(data)[end:]


def pack_alerts(prev: int, items: AlertItems) -> bytes:
    parts = [_SEQ.pack(prev)]
    for seq, payload in items:
        parts.append(_ITEM.pack(seq, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unpack_alerts(payload: memoryview) -> tuple[int, AlertItems]:
    (prev,) = _SEQ.unpack_from(payload)
    items: AlertItems = []
    offset = _SEQ.size
    while offset < len(payload):
        seq, size = _ITEM.unpack_from(payload, offset)
        offset += _ITEM.size
        if offset + size > len(payload):
            raise ValueError("alert batch cut short")
        items.append((seq, bytes(payload[offset:offset + size])))
        offset += size
    return prev, items


def pack_close(code: int, reason: str) -> bytes:
    return _CODE.pack(code) + reason.encode()


def unpack_close(payload: memoryview) -> tuple[int, str]:
    (code,) = _CODE.unpack_from(payload)
    return code, bytes(payload[_CODE.size:]).decode(errors="replace")
