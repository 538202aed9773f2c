"""Per-consumer outgoing budget: frames drop (newest wins), alerts and status never drop, 4413 past the limit.

Messages queued in one event-loop turn are written to the socket together, as one write.
"""
from __future__ import annotations

import asyncio
from typing import Any, Protocol

from watchout.errors import SlowConsumer
from watchout.outgoing import Outgoing


class Writer(Protocol):
    """The socket side of an outbox (RelaySocket implements it)."""

    @property
    def is_compressed(self) -> bool: ...

    def write_wire(self, data: bytes) -> asyncio.Future[None] | None:
        """Write pre-built WebSocket frames; None when the socket is already closing."""

    def write_payload(self, payload: bytes, binary: bool) -> asyncio.Future[None] | None:
        """Write one message through the connection's own (compressing) encoder."""

    def close_with(self, code: int, reason: str) -> None:
        """Close the connection; the socket logs it, with the connection's context."""


class Flusher:
    """Collects the outboxes touched in this loop turn and flushes each once at its end."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._scheduled = False

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for outbox in dirty:
            outbox.flush()


class Outbox:
    """Bounded queue in front of one consumer's socket.

    soft_bytes: beyond this many unflushed bytes, video frames are held (one per stream, newest wins)
    and the ones they replace are counted as dropped. hard_bytes: when alerts/status would push the
    unflushed total past this, the consumer is closed with 4413.
    """

    __slots__ = ("_writer", "_flusher", "_soft", "_hard", "_batch", "_batch_bytes", "_held", "_marked",
                 "_drain_waiter", "inflight", "is_closed", "frames_sent", "frames_dropped", "messages_sent",
                 "bytes_sent")

    def __init__(self, writer: Writer, flusher: Flusher, soft_bytes: int, hard_bytes: int) -> None:
        self._writer: Writer | None = writer
        self._flusher = flusher
        self._soft = soft_bytes
        self._hard = hard_bytes
        self._batch: list[Outgoing] = []
        self._batch_bytes = 0
        self._held: dict[str, Outgoing] = {}
        self._marked = False
        self._drain_waiter: tuple[int, asyncio.Future[None]] | None = None  # (below bytes, woken then)
        self.inflight = 0
        self.is_closed = False
        self.frames_sent = 0
        self.frames_dropped = 0
        self.messages_sent = 0
        self.bytes_sent = 0

    @property
    def backlog_bytes(self) -> int:
        return self.inflight + self._batch_bytes

    def send(self, message: Outgoing, stream_id: str = "") -> int:
        """Queue a message; never blocks and never raises for a slow consumer (it closes it instead).

        Returns 1 when this dropped a video frame (the one it replaced), else 0.
        """
        if self.is_closed:
            return 0
        size = len(message.wire)
        backlog = self.inflight + self._batch_bytes
        if message.is_droppable:
            if backlog and backlog + size > self._soft:
                dropped = 1 if stream_id in self._held else 0
                self.frames_dropped += dropped
                self._held[stream_id] = message
                return dropped
        elif backlog + size > self._hard:
            self._give_up()
            return 0
        self._batch.append(message)
        self._batch_bytes += size
        if not self._marked:
            self._marked = True
            self._flusher.mark(self)
        return 0

    def flush(self) -> None:
        """Write this turn's batch (called once per loop turn by the Flusher)."""
        self._marked = False
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        if self.is_closed or not batch:
            return
        self._write(batch, size)

    async def drained(self, below_bytes: int) -> None:
        """Return once fewer than `below_bytes` are unflushed, or the outbox is closed (one waiter at a time)."""
        if self.is_closed or self.backlog_bytes < below_bytes:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drain_waiter = (below_bytes, waiter)
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def _wake_drained(self) -> None:
        waiting = self._drain_waiter
        if waiting is not None and (self.is_closed or self.backlog_bytes < waiting[0]) and not waiting[1].done():
            waiting[1].set_result(None)

    def detach(self) -> None:
        """The socket has closed: forget it (and anything still queued)."""
        self.is_closed = True
        self._writer = None
        self._batch.clear()
        self._held.clear()
        self._wake_drained()

    def _write(self, batch: list[Outgoing], size: int) -> None:
        writer = self._writer
        if writer is None:
            return
        if writer.is_compressed:
            future = None
            for message in batch:
                future = writer.write_payload(message.payload, message.binary)
        else:
            future = writer.write_wire(batch[0].wire if len(batch) == 1 else b"".join(m.wire for m in batch))
        if future is None:
            self.is_closed = True
            return
        frames = sum(1 for m in batch if m.is_droppable)
        self.frames_sent += frames
        self.messages_sent += len(batch)
        self.bytes_sent += size
        self.inflight += size
        future.add_done_callback(lambda f: self._on_flushed(f, size))

    def _on_flushed(self, future: asyncio.Future[Any], size: int) -> None:
        self.inflight -= size
        if future.cancelled() or future.exception() is not None:
            self.is_closed = True
            self._wake_drained()
            return
        if self._drain_waiter is not None:
            self._wake_drained()
        if self._held and self.inflight + self._batch_bytes <= self._soft:
            held = list(self._held.values())
            self._held.clear()
            for message in held:
                self._batch.append(message)
                self._batch_bytes += len(message.wire)
            if not self._marked:
                self._marked = True
                self._flusher.mark(self)

    def _give_up(self) -> None:
        self.is_closed = True
        self._wake_drained()
        self.frames_dropped += len(self._held)
        self._held.clear()
        self._batch.clear()
        error = SlowConsumer("consumer too slow: outgoing buffer limit reached")
        if self._writer is not None:
            self._writer.close_with(error.close_code, error.message)
