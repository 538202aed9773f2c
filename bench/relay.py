#!/usr/bin/env python3
"""Size a Watchout deployment: four load scenarios against a live server, printed as one table.

    python bench/relay.py                                  # starts its own `watchout serve`
    python bench/relay.py --url ws://127.0.0.1:3000/ws --pid 12345   # a server you started
    python bench/relay.py --scenarios A,C --duration 5 --json bench/results/run.json

A  fan-out throughput: 1 phone -> 2 consumers (dashboard + ml-service), 64 KiB frames, credit window
B  latency at a fixed rate: 10 streams x 15 fps x 3 consumers, 32 KiB frames
C  alerts: 1 ml-service -> 20 alert consumers (1 phone + 19 dashboards), ~200-byte alerts, credit window
D  2,000 idle authenticated connections (1,000 phones + 1,000 dashboards): RSS and CPU per connection

Clients run in separate processes (asyncio + `websockets`), so the server, not one Python client
process, sets the pace. Server CPU comes from /proc/PID/stat, RSS from /proc/PID/status: Linux only,
loopback only. bench/README.md explains every column.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import heapq
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
from array import array
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SCENARIOS = ("A", "B", "C", "D")
RUN_ORDER = ("D", "A", "B", "C")  # D first: later scenarios leave freed heap that would hide its RSS growth

# Every bench frame's base64 data starts with this 24-byte header (32 base64 characters, no padding):
# magic, stream index, sequence number, send time (time.monotonic_ns(), shared by all local processes).
MAGIC = b"WOBN"
HEADER = struct.Struct("!4sIQQ")
HEADER_B64 = 32
DATA_KEY = b'"data":"'
MAX_LATENCY_SAMPLES = 2_000_000  # per client process


class BenchError(Exception):
    """A scenario cannot go on; its message goes into the table."""


# =============================================================================== client side (workers)
# Each worker process runs one asyncio loop with the `websockets` client and obeys commands from the
# orchestrator over a multiprocessing pipe: setup, start, finish, close, exit. Every wait is bounded.

def _ms() -> int:
    return int(time.time() * 1000)


async def _arecv(conn: Any, timeout: float) -> Any:
    """Receive one object from a multiprocessing Connection without blocking the loop; None on timeout."""
    if conn.poll():
        return conn.recv()
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)
    return conn.recv()


async def _open(url: str, timeout: float = 10.0) -> Any:
    from websockets.asyncio.client import connect
    return await connect(url, compression=None, max_size=64 << 20, max_queue=4096, ping_interval=None,
                         open_timeout=timeout, close_timeout=2, proxy=None, user_agent_header=None)


async def _handshake(ws: Any, message: dict[str, Any], want: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send register/subscribe and wait for registered/subscribed; an `error` reply raises."""
    import orjson
    await ws.send(orjson.dumps(message), text=True)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"no {want} within {timeout:.0f} s")
        raw = await asyncio.wait_for(ws.recv(decode=False), left)
        reply: dict[str, Any] = orjson.loads(raw)
        if reply.get("type") == want:
            return reply
        if reply.get("type") == "error":
            raise BenchError(f"{message['type']} refused: {reply.get('code')}: {reply.get('message')}")


def _register_msg(sid: str, token: str) -> dict[str, Any]:
    return {"type": "register", "clientType": "mobile", "streamId": sid, "token": token}


def _subscribe_msg(sid: str, client_type: str, token: str) -> dict[str, Any]:
    return {"type": "subscribe", "clientType": client_type, "streamId": sid, "token": token}


def _describe(exc: BaseException) -> str:
    if hasattr(exc, "rcvd"):  # websockets ConnectionClosed: the close code says what happened
        return "connection closed " + _close_code(exc)
    if isinstance(exc, BenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _close_code(exc: BaseException) -> str:
    rcvd = getattr(exc, "rcvd", None)
    if rcvd is not None:
        return f"{rcvd.code} {rcvd.reason}".strip()
    return type(exc).__name__


async def _close_all(sockets: list[Any], timeout: float = 10.0) -> None:
    if not sockets:
        return
    try:
        closing = asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        await asyncio.wait_for(closing, timeout)
    except TimeoutError:
        for ws in sockets:
            ws.transport.abort()


class _Worker:
    """What every worker has: its sockets, a record of server errors and closes, and bounded waits."""

    # set by the consumer workers, which count numbered deliveries per client slot
    credit: _CreditSender
    total: dict[int, int]
    dup: dict[int, int]
    gaps: dict[int, int]

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.sockets: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.server_errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}

    def note_error(self, message: dict[str, Any]) -> None:
        key = str(message.get("code"))
        self.server_errors[key] = self.server_errors.get(key, 0) + 1

    def note_close(self, exc: BaseException) -> None:
        key = _close_code(exc)
        self.closes[key] = self.closes.get(key, 0) + 1

    def note_small(self, raw: bytes) -> None:
        """A message that is not bench payload: count `error` replies, ignore status/ack/pong."""
        import orjson
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.server_errors["unparseable"] = self.server_errors.get("unparseable", 0) + 1
            return
        if message.get("type") == "error":
            self.note_error(message)

    async def drain_socket(self, ws: Any) -> None:
        """Read and discard what a sending socket receives (status, errors), recording errors and closes."""
        from websockets.exceptions import ConnectionClosed
        try:
            while True:
                self.note_small(await ws.recv(decode=False))
        except ConnectionClosed as exc:
            if not self.spec.get("closing"):
                self.note_close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, never silent
            self.closes[f"reader {type(exc).__name__}: {exc}"] = 1

    def count_delivery(self, slot: int, seq: int, last: int) -> bool:
        """Consumers: count one numbered delivery after `last`; False for a duplicate or stale one."""
        if seq <= last:
            self.dup[slot] += 1
            return False
        if seq > last + 1:
            self.gaps[slot] += seq - last - 1
        self.total[slot] += 1
        self.credit.delivered(slot, seq)
        return True

    def common_result(self) -> dict[str, Any]:
        return {"server_errors": self.server_errors, "closes": self.closes}

    async def cmd_close(self) -> dict[str, Any]:
        self.spec["closing"] = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await _close_all(self.sockets)
        self.sockets.clear()
        return {}


class _CreditSender:
    """Consumer side of a credit window: per-consumer progress (highest sequence number received + 1),
    sent to the producer once per loop turn. Progress, not a count, so a message the server dropped
    does not shrink the window for good (the gap is counted as lost separately)."""

    def __init__(self, conn: Any, slots: list[int]) -> None:
        self.conn = conn
        self.counts = {slot: 0 for slot in slots}
        self._dirty: set[int] = set()
        self._scheduled = False

    def delivered(self, slot: int, seq: int) -> None:
        self.counts[slot] = seq + 1
        if self.conn is None:
            return
        self._dirty.add(slot)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        payload = array("q")
        for slot in self._dirty:
            payload.extend((slot, self.counts[slot]))
        self._dirty.clear()
        try:
            self.conn.send_bytes(payload.tobytes())
        except (BrokenPipeError, OSError):
            self.conn = None


class _CreditWindow:
    """Producer side: at most `size` messages not yet delivered to every one of `n` consumers.

    When nothing progresses for `stall_s` while messages are in flight, the missing ones are written
    off (counted, and each consumer's progress floored at what was sent) so the run goes on; the
    consumers' own counts still show what was really lost.
    """

    def __init__(self, readers: list[Any], n: int, size: int, stall_s: float = 1.0) -> None:
        self.readers = readers
        self.n = n
        self.size = size
        self.stall_s = stall_s
        self.counts = [0] * n
        self.floors = [0] * n
        self.written_off = 0
        self.sent = 0
        self.done = 0
        self.last_progress = time.monotonic()
        self.event = asyncio.Event()
        self.wait_s = 0.0  # time the sender spent waiting for credit
        self.credit_messages = 0
        loop = asyncio.get_running_loop()
        for reader in readers:
            loop.add_reader(reader.fileno(), self._on_readable, reader)

    def _on_readable(self, reader: Any) -> None:
        try:
            while reader.poll():
                pairs = array("q")
                pairs.frombytes(reader.recv_bytes())
                self.credit_messages += 1
                for k in range(0, len(pairs), 2):
                    self.counts[pairs[k]] = pairs[k + 1]
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(reader.fileno())
            return
        done = min(max(c, f) for c, f in zip(self.counts, self.floors))
        if done > self.done:
            self.done = done
            self.last_progress = time.monotonic()
        if self.sent - self.done < self.size:
            self.event.set()

    def can_send(self) -> bool:
        return self.sent - self.done < self.size

    def watchdog(self) -> None:
        if self.sent > self.done and time.monotonic() - self.last_progress > self.stall_s:
            for i in range(self.n):
                have = max(self.counts[i], self.floors[i])
                self.written_off += self.sent - have
                self.floors[i] = self.sent
            self.done = self.sent
            self.last_progress = time.monotonic()

    async def wait_credit(self, until_ns: int) -> None:
        self.event.clear()
        timeout = min(0.1, max(0.0, (until_ns - time.monotonic_ns()) / 1e9))
        began = time.monotonic()
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            self.watchdog()
        self.wait_s += time.monotonic() - began

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.done < self.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.done >= self.sent

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for reader in self.readers:
            try:
                loop.remove_reader(reader.fileno())
            except (OSError, ValueError):
                pass


class FrameProducer(_Worker):
    """Phones sending JSON video frames: `window` mode (A, credit window) or `rate` mode (B, fixed fps)."""

    def __init__(self, spec: dict[str, Any], credit_readers: list[Any]) -> None:
        super().__init__(spec)
        self.credit_readers = credit_readers
        self.streams: list[tuple[int, str]] = spec["streams"]
        raw = spec["frame_bytes"] - HEADER.size
        self.bodies = [base64.b64encode(os.urandom(raw)) for _ in range(8)]
        self.window: _CreditWindow | None = None
        self.sent = 0
        self.sent_window: dict[int, int] = {index: 0 for index, _ in self.streams}
        self.message_bytes = 0
        self.pump_error: str | None = None

    async def cmd_setup(self) -> dict[str, Any]:
        for _, sid in self.streams:
            ws = await _open(self.spec["url"])
            self.sockets.append(ws)
            await _handshake(ws, _register_msg(sid, self.spec["token"]), "registered")
            self.tasks.append(asyncio.create_task(self.drain_socket(ws)))
        return {}

    def _frame(self, k: int, seq: int, now_ns: int) -> bytes:
        index, sid = self.streams[k]
        header = base64.b64encode(HEADER.pack(MAGIC, index, seq, now_ns))
        return b"".join((b'{"type":"video-frame","streamId":"', sid.encode(), b'","data":"', header,
                         self.bodies[seq & 7], b'","timestamp":', str(_ms()).encode(), b"}"))

    async def cmd_start(self, t_start: int, t0: int, t1: int) -> dict[str, Any]:
        if self.spec["mode"] == "window":
            self.window = _CreditWindow(self.credit_readers, self.spec["consumers"], self.spec["window"])
            self.tasks.append(asyncio.create_task(self._guard(self._pump_window(t0, t1))))
        else:
            self.tasks.append(asyncio.create_task(self._guard(self._pump_rate(t_start, t0, t1))))
        return {}

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the result
            self.pump_error = _describe(exc)

    async def _pump_window(self, t0: int, t1: int) -> None:
        win = self.window
        assert win is not None
        ws = self.sockets[0]
        while True:
            now = time.monotonic_ns()
            if now >= t1:
                return
            if not win.can_send():
                await win.wait_credit(t1)
                continue
            frame = self._frame(0, win.sent, now)
            self.message_bytes = len(frame)
            await ws.send(frame, text=True)
            win.sent += 1
            if now >= t0:
                self.sent_window[0] += 1

    async def _pump_rate(self, t_start: int, t0: int, t1: int) -> None:
        period = 1e9 / self.spec["fps"]
        count = len(self.streams)
        seqs = [0] * count
        heap = [(t_start + k * period / count, k) for k in range(count)]  # streams staggered over one period
        heapq.heapify(heap)
        while heap:
            due, k = heap[0]
            if due >= t1:
                return
            delay = (due - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic_ns()
            if now >= t1:
                return
            frame = self._frame(k, seqs[k], now)
            self.message_bytes = len(frame)
            await self.sockets[k].send(frame, text=True)
            self.sent += 1
            if now >= t0:
                self.sent_window[self.streams[k][0]] += 1
            seqs[k] += 1
            heapq.heapreplace(heap, (t_start + k * period / count + seqs[k] * period, k))

    async def cmd_finish(self, drain_s: float) -> dict[str, Any]:
        result: dict[str, Any] = {"message_bytes": self.message_bytes, "pump_error": self.pump_error}
        if self.window is not None:
            await self.window.drain(drain_s)
            self.window.close()
            win = self.window
            result.update(sent=win.sent, sent_window=self.sent_window, written_off=win.written_off,
                          credit_wait_s=round(win.wait_s, 3), credit_messages=win.credit_messages)
        else:
            result.update(sent=self.sent, sent_window=self.sent_window, written_off=0)
        result.update(self.common_result())
        return result


class FrameConsumer(_Worker):
    """Dashboards / ml-services receiving frames; latency from the header's send time.

    `window` is "recv" (A: count what arrives between t0 and t1) or "send" (B: count frames sent
    between t0 and t1, whenever they arrive).
    """

    def __init__(self, spec: dict[str, Any], credit_conn: Any) -> None:
        super().__init__(spec)
        # (slot, stream id, client type, stream index)
        self.clients: list[tuple[int, str, str, int]] = spec["clients"]
        self.credit = _CreditSender(credit_conn, [c[0] for c in self.clients])
        self.total = {c[0]: 0 for c in self.clients}
        self.in_window = {c[0]: 0 for c in self.clients}
        self.dup = {c[0]: 0 for c in self.clients}
        self.gaps = {c[0]: 0 for c in self.clients}
        self.latency = array("d")
        self.bytes_in_window = 0

    async def cmd_setup(self) -> dict[str, Any]:
        async def one(sid: str, client_type: str) -> Any:
            ws = await _open(self.spec["url"])
            self.sockets.append(ws)
            token = self.spec["ml_token"] if client_type == "ml-service" else self.spec["token"]
            await _handshake(ws, _subscribe_msg(sid, client_type, token), "subscribed")
            return ws
        self.ws_by_slot = dict(zip([c[0] for c in self.clients],
                                   await asyncio.gather(*(one(sid, ct) for _, sid, ct, _ in self.clients))))
        return {}

    async def cmd_start(self, t_start: int, t0: int, t1: int) -> dict[str, Any]:
        for slot, _, _, _ in self.clients:
            self.tasks.append(asyncio.create_task(self._read(slot, self.ws_by_slot[slot], t0, t1)))
        return {}

    async def _read(self, slot: int, ws: Any, t0: int, t1: int) -> None:
        from websockets.exceptions import ConnectionClosed
        by_send = self.spec["window"] == "send"
        last = -1
        latency = self.latency
        try:
            while True:
                raw = await ws.recv(decode=False)
                now = time.monotonic_ns()
                at = raw.find(DATA_KEY, 0, 300) if len(raw) > 1024 else -1
                if at < 0:
                    self.note_small(raw)
                    continue
                at += len(DATA_KEY)
                magic, _, seq, sent_ns = HEADER.unpack(base64.b64decode(raw[at:at + HEADER_B64]))
                if magic != MAGIC:
                    self.server_errors["foreign-frame"] = self.server_errors.get("foreign-frame", 0) + 1
                    continue
                if not self.count_delivery(slot, seq, last):
                    continue
                last = seq
                if t0 <= (sent_ns if by_send else now) < t1:
                    self.in_window[slot] += 1
                    self.bytes_in_window += len(raw)
                    if len(latency) < MAX_LATENCY_SAMPLES:
                        latency.append((now - sent_ns) / 1e6)
        except ConnectionClosed as exc:
            if not self.spec.get("closing"):
                self.note_close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.closes[f"reader {type(exc).__name__}: {exc}"] = 1

    async def cmd_finish(self, expect: dict[int, int], drain_s: float) -> dict[str, Any]:
        """expect: slot -> messages that slot should have (A: total sent; B: sent in the window)."""
        counts = self.total if self.spec["window"] == "recv" else self.in_window
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and any(counts[s] < n for s, n in expect.items()):
            await asyncio.sleep(0.01)
        return {"total": self.total, "in_window": self.in_window, "dup": self.dup, "gaps": self.gaps,
                "bytes_in_window": self.bytes_in_window, "latency": self.latency.tobytes(),
                "latency_capped": len(self.latency) >= MAX_LATENCY_SAMPLES, **self.common_result()}


class AlertProducer(_Worker):
    """The ml-service of C: sends ~200-byte alerts under a credit window and counts the server's acks."""

    def __init__(self, spec: dict[str, Any], credit_readers: list[Any]) -> None:
        super().__init__(spec)
        self.credit_readers = credit_readers
        self.window: _CreditWindow | None = None
        self.sent_window = 0
        self.acks = 0
        self.ack_seqs_ok = True
        self.last_ack_seq = 0
        self.pump_error: str | None = None
        self.bytes_sent = 0
        sid = spec["sid"].encode()
        self.head = b'{"type":"alert","streamId":"' + sid + b'","severity":"high","message":"'
        self.tail = b'","metadata":{"confidence":0.95,"objectType":"person","seq":'
        fixed = len(self.head) + len(self.tail) + 6 + len(b',"t":') + 16 + len(b'},"timestamp":') + 13 + 1
        self.pad = (b"Suspicious person near the gate " * 8)[:max(8, spec["alert_bytes"] - fixed)]

    async def cmd_setup(self) -> dict[str, Any]:
        ws = await _open(self.spec["url"])
        self.sockets.append(ws)
        message = _subscribe_msg(self.spec["sid"], "ml-service", self.spec["ml_token"])
        await _handshake(ws, message, "subscribed")
        return {}

    async def cmd_start(self, t_start: int, t0: int, t1: int) -> dict[str, Any]:
        self.window = _CreditWindow(self.credit_readers, self.spec["consumers"], self.spec["window"])
        self.tasks.append(asyncio.create_task(self._read_acks(self.sockets[0])))
        self.tasks.append(asyncio.create_task(self._pump(t0, t1)))
        return {}

    async def _read_acks(self, ws: Any) -> None:
        import orjson
        from websockets.exceptions import ConnectionClosed
        try:
            while True:
                message = orjson.loads(await ws.recv(decode=False))
                kind = message.get("type")
                if kind == "ack":
                    self.acks += 1
                    if message.get("seq") != self.last_ack_seq + 1 and self.last_ack_seq:
                        self.ack_seqs_ok = False
                    self.last_ack_seq = message.get("seq") or 0
                elif kind == "error":
                    self.note_error(message)
        except ConnectionClosed as exc:
            if not self.spec.get("closing"):
                self.note_close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.closes[f"reader {type(exc).__name__}: {exc}"] = 1

    async def _pump(self, t0: int, t1: int) -> None:
        win = self.window
        assert win is not None
        ws = self.sockets[0]
        try:
            while True:
                now = time.monotonic_ns()
                if now >= t1:
                    return
                if not win.can_send():
                    await win.wait_credit(t1)
                    continue
                alert = b"".join((self.head, self.pad, self.tail, str(win.sent).encode(), b',"t":',
                                  str(now).encode(), b'},"timestamp":', str(_ms()).encode(), b"}"))
                await ws.send(alert, text=True)
                self.bytes_sent += len(alert)
                win.sent += 1
                if now >= t0:
                    self.sent_window += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.pump_error = _describe(exc)

    async def cmd_finish(self, drain_s: float) -> dict[str, Any]:
        win = self.window
        assert win is not None
        deadline = time.monotonic() + drain_s
        await win.drain(drain_s)
        while self.acks < win.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        win.close()
        return {"sent": win.sent, "sent_window": self.sent_window, "written_off": win.written_off,
                "credit_wait_s": round(win.wait_s, 3), "credit_messages": win.credit_messages,
                "acks": self.acks, "ack_seqs_consecutive": self.ack_seqs_ok, "pump_error": self.pump_error,
                "message_bytes": round(self.bytes_sent / max(1, win.sent)), **self.common_result()}


class AlertConsumer(_Worker):
    """Alert receivers of C: the phone that owns the stream (registers) and dashboards (subscribe)."""

    def __init__(self, spec: dict[str, Any], credit_conn: Any) -> None:
        super().__init__(spec)
        self.clients: list[tuple[int, str]] = spec["clients"]  # slot, "mobile" | "dashboard"
        self.credit = _CreditSender(credit_conn, [c[0] for c in self.clients])
        self.total = {c[0]: 0 for c in self.clients}
        self.dup = {c[0]: 0 for c in self.clients}
        self.gaps = {c[0]: 0 for c in self.clients}
        self.in_window = 0
        self.latency = array("d")
        self.ws_by_slot: dict[int, Any] = {}

    async def cmd_setup(self, phase: str) -> dict[str, Any]:
        async def one(slot: int, role: str) -> None:
            ws = await _open(self.spec["url"])
            self.sockets.append(ws)
            self.ws_by_slot[slot] = ws
            if role == "mobile":
                await _handshake(ws, _register_msg(self.spec["sid"], self.spec["token"]), "registered")
            else:
                message = _subscribe_msg(self.spec["sid"], "dashboard", self.spec["token"])
                await _handshake(ws, message, "subscribed")
        wanted = "mobile" if phase == "register" else "dashboard"
        await asyncio.gather(*(one(slot, role) for slot, role in self.clients if role == wanted))
        return {}

    async def cmd_start(self, t_start: int, t0: int, t1: int) -> dict[str, Any]:
        for slot, _ in self.clients:
            self.tasks.append(asyncio.create_task(self._read(slot, self.ws_by_slot[slot], t0, t1)))
        return {}

    async def _read(self, slot: int, ws: Any, t0: int, t1: int) -> None:
        import orjson
        from websockets.exceptions import ConnectionClosed
        last = -1
        latency = self.latency
        try:
            while True:
                raw = await ws.recv(decode=False)
                now = time.monotonic_ns()
                message = orjson.loads(raw)
                if message.get("type") != "alert":
                    if message.get("type") == "error":
                        self.note_error(message)
                    continue
                meta = message.get("metadata") or {}
                seq, sent_ns = meta.get("seq"), meta.get("t")
                if not isinstance(seq, int) or not isinstance(sent_ns, int):
                    self.server_errors["foreign-alert"] = self.server_errors.get("foreign-alert", 0) + 1
                    continue
                if not self.count_delivery(slot, seq, last):
                    continue
                last = seq
                if t0 <= now < t1:
                    self.in_window += 1
                    if len(latency) < MAX_LATENCY_SAMPLES:
                        latency.append((now - sent_ns) / 1e6)
        except ConnectionClosed as exc:
            if not self.spec.get("closing"):
                self.note_close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.closes[f"reader {type(exc).__name__}: {exc}"] = 1

    async def cmd_finish(self, expect: int, drain_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and any(n < expect for n in self.total.values()):
            await asyncio.sleep(0.01)
        return {"total": self.total, "in_window": self.in_window, "dup": self.dup, "gaps": self.gaps,
                "latency": self.latency.tobytes(), "latency_capped": len(self.latency) >= MAX_LATENCY_SAMPLES,
                **self.common_result()}


class IdleClients(_Worker):
    """D: phones that register and dashboards that subscribe, then sit idle."""

    async def cmd_setup(self, phase: str) -> dict[str, Any]:
        sids = self.spec["mobiles"] if phase == "mobiles" else self.spec["dashboards"]
        gate = asyncio.Semaphore(self.spec["parallel"])
        errors: dict[str, int] = {}
        ok = 0
        deadline = time.monotonic() + self.spec["phase_s"]

        async def one(sid: str) -> None:
            nonlocal ok
            async with gate:
                if time.monotonic() > deadline or (ok == 0 and sum(errors.values()) >= 20):
                    key = "not attempted (earlier attempts failed or the phase ran out of time)"
                    errors[key] = errors.get(key, 0) + 1
                    return
                try:
                    ws = await _open(self.spec["url"], timeout=10)
                    self.sockets.append(ws)
                    if phase == "mobiles":
                        await _handshake(ws, _register_msg(sid, self.spec["token"]), "registered", 10)
                    else:
                        message = _subscribe_msg(sid, "dashboard", self.spec["token"])
                        await _handshake(ws, message, "subscribed", 10)
                    ok += 1
                except Exception as exc:  # noqa: BLE001 - counted per kind
                    key = _describe(exc)[:120]
                    errors[key] = errors.get(key, 0) + 1
        await asyncio.gather(*(one(sid) for sid in sids))
        return {"ok": True, "connected": ok, "errors": errors}

    async def cmd_count(self) -> dict[str, Any]:
        from websockets.protocol import State
        live = sum(1 for ws in self.sockets if ws.state is State.OPEN)
        codes: dict[str, int] = {}
        for ws in self.sockets:
            if ws.state is not State.OPEN:
                key = f"{ws.close_code} {ws.close_reason or ''}".strip()
                codes[key] = codes.get(key, 0) + 1
        return {"live": live, "closed": codes}


WORKERS = {"frame-producer": FrameProducer, "frame-consumer": FrameConsumer,
           "alert-producer": AlertProducer, "alert-consumer": AlertConsumer, "idle": IdleClients}


async def _worker_main(kind: str, spec: dict[str, Any], ctrl: Any, credit: Any) -> None:
    cls = WORKERS[kind]
    worker = cls(spec, credit) if cls is not IdleClients else cls(spec)
    deadline = time.monotonic() + spec["max_s"]
    try:
        while time.monotonic() < deadline and os.getppid() == spec["parent"]:
            try:
                command = await _arecv(ctrl, 1.0)
            except (EOFError, OSError):
                return
            if command is None:
                continue
            name = command.pop("cmd")
            if name == "exit":
                return
            try:
                result = await getattr(worker, "cmd_" + name)(**command)
                result.setdefault("ok", True)
            except Exception as exc:  # noqa: BLE001 - sent back to the orchestrator
                result = {"ok": False, "error": _describe(exc)}
            ctrl.send(result)
    finally:
        worker.spec["closing"] = True
        for task in worker.tasks:
            task.cancel()
        await _close_all(worker.sockets, 5.0)


def _worker_entry(kind: str, spec: dict[str, Any], ctrl: Any, credit: Any, cpus: list[int] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the orchestrator, which stops us
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        asyncio.run(_worker_main(kind, spec, ctrl, credit))
    except Exception:  # noqa: BLE001
        try:
            ctrl.send({"ok": False, "error": "worker crashed: " + traceback.format_exc(limit=3)})
        except OSError:
            pass


# =============================================================================== orchestrator side

def proc_stat(pid: int) -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor+major page faults) of a process, all threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # after ") ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7]) + int(fields[9])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        match = re.search(r"VmRSS:\s+(\d+)\s+kB", fh.read())
    return int(match.group(1)) if match else 0


class Snap:
    def __init__(self, server_pid: int, worker_pids: list[int]) -> None:
        self.t = time.monotonic()
        self.srv_user, self.srv_sys, self.srv_faults = proc_stat(server_pid)
        self.workers: dict[int, float] = {}
        for pid in worker_pids:
            try:
                u, s, _ = proc_stat(pid)
                self.workers[pid] = u + s
            except OSError:
                pass


def cpu_between(a: Snap, b: Snap) -> dict[str, Any]:
    wall = b.t - a.t
    srv = (b.srv_user + b.srv_sys) - (a.srv_user + a.srv_sys)
    utils = [(b.workers[p] - a.workers[p]) / wall for p in b.workers if p in a.workers] if wall > 0 else []
    return {"wall_s": round(wall, 3), "server_cpu_s": round(srv, 3),
            "server_sys_share": round((b.srv_sys - a.srv_sys) / srv, 3) if srv > 0 else None,
            "server_util": round(srv / wall, 3) if wall > 0 else None,
            "server_page_faults": b.srv_faults - a.srv_faults,
            "client_util_max": round(max(utils), 3) if utils else None,
            "client_util_sum": round(sum(utils), 3) if utils else None,
            "client_processes": len(utils)}


def percentiles(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    samples.sort()
    n = len(samples)

    def rank(p: float) -> float:
        return samples[min(n - 1, max(0, -(-int(p * n) // 100) - 1))]
    return {"samples": n, "p50_ms": round(rank(50), 3), "p99_ms": round(rank(99), 3),
            "max_ms": round(samples[-1], 3), "mean_ms": round(sum(samples) / n, 3)}


def latencies(results: list[dict[str, Any]]) -> list[float]:
    out: list[float] = []
    for r in results:
        values = array("d")
        values.frombytes(r.pop("latency", b""))
        out.extend(values)
    return out


def merge_counts(results: list[dict[str, Any]], key: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for r in results:
        for k, v in r.get(key, {}).items():
            merged[str(k)] = merged.get(str(k), 0) + v
    return merged


class Proc:
    """One client worker process and its command pipe."""

    def __init__(self, ctx: Any, name: str, kind: str, spec: dict[str, Any], credit: Any,
                 cpus: list[int] | None) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        spec = {**spec, "parent": os.getpid(), "max_s": spec.get("max_s", 240)}
        self.process = ctx.Process(target=_worker_entry, args=(kind, spec, child, credit, cpus), name=name,
                                   daemon=True)
        self._child = child

    def start(self) -> None:
        self.process.start()
        self._child.close()

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def send(self, cmd: str, **kw: Any) -> None:
        self.conn.send({"cmd": cmd, **kw})

    def wait(self, cmd: str, timeout: float) -> dict[str, Any]:
        if not self.conn.poll(max(0.0, timeout)):
            raise BenchError(f"{self.name}: no answer to {cmd} within {timeout:.0f} s")
        try:
            result: dict[str, Any] = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name} exited (code {self.process.exitcode}) during {cmd}") from None
        if not result.get("ok"):
            raise BenchError(f"{self.name} {cmd}: {result.get('error')}")
        return result

    def call(self, cmd: str, timeout: float, **kw: Any) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self.wait(cmd, timeout)

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.send("exit")
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1)
        self.conn.close()


def call_all(procs: list[Proc], cmd: str, timeout: float, per_proc: dict[str, dict[str, Any]] | None = None,
             **kw: Any) -> list[dict[str, Any]]:
    """Send one command to several workers at once, then collect every answer (one common deadline)."""
    for p in procs:
        p.send(cmd, **{**kw, **(per_proc or {}).get(p.name, {})})
    deadline = time.monotonic() + timeout
    results, failure = [], None
    for p in procs:
        try:
            results.append(p.wait(cmd, deadline - time.monotonic()))
        except BenchError as exc:
            failure = failure or exc
    if failure:
        raise failure
    return results


def sleep_until_ns(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, server_pid: int, tokens: dict[str, str]) -> None:
        self.args = args
        self.url = url
        self.pid = server_pid
        self.tokens = tokens
        self.tag = secrets.token_hex(3)
        self.ctx = mp.get_context("spawn")
        self.client_cpus = [0] if args.pin else None
        parsed = urllib.parse.urlsplit(url)
        self.http = f"http://{parsed.hostname}:{parsed.port or 80}"

    # ------------------------------------------------------------------ helpers
    def stats(self) -> dict[str, Any]:
        """The server's /stats as an admin sees it (alertsStored, framesDropped); {} when unreachable."""
        request = urllib.request.Request(self.http + "/stats",
                                         headers={"Authorization": "Bearer " + self.tokens["admin"]})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data
        except (OSError, ValueError):
            return {}

    def spawn(self, procs: list[Proc]) -> list[Proc]:
        started = []
        try:
            for p in procs:
                p.start()
                started.append(p)
        except BaseException:
            for p in started:
                p.stop()
            raise
        return procs

    def proc(self, name: str, kind: str, spec: dict[str, Any], credit: Any = None) -> Proc:
        base = {"url": self.url, "token": self.tokens["user"], "ml_token": self.tokens["ml"],
                "max_s": self.args.duration + 240}  # a worker never outlives this, whatever happens
        return Proc(self.ctx, name, kind, {**base, **spec}, credit, self.client_cpus)

    def timeline(self, warmup: float) -> tuple[int, int, int]:
        t_start = time.monotonic_ns() + 200_000_000
        t0 = t_start + int(warmup * 1e9)
        return t_start, t0, t0 + int(self.args.duration * 1e9)

    def measure(self, procs: list[Proc], t_start: int, t0: int, t1: int) -> tuple[Snap, Snap]:
        call_all(procs, "start", 10, t_start=t_start, t0=t0, t1=t1)
        pids = [p.pid for p in procs]
        sleep_until_ns(t0)
        s0 = Snap(self.pid, pids)
        sleep_until_ns(t1)
        return s0, Snap(self.pid, pids)

    @staticmethod
    def issues(results: list[dict[str, Any]]) -> list[str]:
        notes = []
        errors = merge_counts(results, "server_errors")
        closes = merge_counts(results, "closes")
        if errors:
            notes.append("server errors " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())))
        if closes:
            notes.append("closed " + ", ".join(f"{k} x{v}" for k, v in sorted(closes.items())))
        for r in results:
            if r.get("pump_error"):
                notes.append("sender stopped: " + r["pump_error"])
        return notes

    def consumer_groups(self, n: int) -> list[list[int]]:
        procs = max(1, min(self.args.procs, n))
        return [list(range(k, n, procs)) for k in range(procs)]

    # ------------------------------------------------------------------ A
    def scenario_a(self) -> dict[str, Any]:
        a = self.args
        sid = f"bench-a-{self.tag}"
        consumers = [(0, sid, "dashboard", 0), (1, sid, "ml-service", 0)]
        groups = self.consumer_groups(len(consumers))
        pipes = [self.ctx.Pipe(duplex=False) for _ in groups]
        producer = self.proc("A-producer", "frame-producer",
                             {"streams": [(0, sid)], "frame_bytes": a.a_bytes, "mode": "window",
                              "window": a.a_window, "consumers": len(consumers)}, [r for r, _ in pipes])
        cons = [self.proc(f"A-consumers{k}", "frame-consumer",
                          {"clients": [consumers[i] for i in g], "window": "recv"}, pipes[k][1])
                for k, g in enumerate(groups)]
        procs = self.spawn([producer, *cons])
        try:
            for r, w in pipes:
                r.close()
                w.close()
            producer.call("setup", 20)
            call_all(cons, "setup", 20)
            stats0 = self.stats()
            t_start, t0, t1 = self.timeline(a.a_warmup)
            s0, s1 = self.measure(procs, t_start, t0, t1)
            prod = producer.call("finish", 10, drain_s=3.0)
            sent = prod["sent"]
            per_proc = {p.name: {"expect": {slot: sent for slot in (consumers[i][0] for i in g)}}
                        for p, g in zip(cons, groups)}
            results = call_all(cons, "finish", 10, per_proc, drain_s=2.0)
            stats1 = self.stats()
            call_all(procs, "close", 15)
        finally:
            for p in procs:
                p.stop()
        cpu = cpu_between(s0, s1)
        total = merge_counts(results, "total")
        delivered = sum(sum(r["in_window"].values()) for r in results)
        lost = {slot: sent - n for slot, n in total.items()}
        res: dict[str, Any] = {
            "scenario": "A",
            "desc": f"fan-out 1 -> {len(consumers)}, {a.a_bytes} B frames ({prod['message_bytes']} B JSON), "
                    f"window {a.a_window}",
            "delivered": delivered, "msgs_per_s": round(delivered / cpu["wall_s"], 1),
            "frames_sent": sent, "frames_sent_in_window": prod["sent_window"][0],
            "egress_MB_per_s": round(sum(r["bytes_in_window"] for r in results) / 1e6 / cpu["wall_s"], 1),
            "lost": sum(lost.values()), "lost_per_consumer": lost,
            "dup": sum(sum(r["dup"].values()) for r in results), "written_off": prod["written_off"],
            "server_frames_dropped": _delta(stats0, stats1, "framesDropped"),
            **percentiles(latencies(results)), **cpu,
        }
        res["server_cpu_s_per_1k"] = _per_1k(cpu["server_cpu_s"], delivered)
        res["sender_credit_wait_s"] = prod.get("credit_wait_s")
        res["server_page_faults_per_msg"] = _ratio(cpu["server_page_faults"], delivered)
        res["notes"] = self.issues([prod, *results])
        return res

    # ------------------------------------------------------------------ B
    def scenario_b(self) -> dict[str, Any]:
        a = self.args
        streams = [(i, f"bench-b-{self.tag}-{i}") for i in range(a.b_streams)]
        kinds = ("dashboard", "ml-service", "dashboard")
        consumers = [(i * 3 + j, sid, kinds[j], i) for i, sid in streams for j in range(3)]
        groups = self.consumer_groups(len(consumers))
        producer = self.proc("B-producers", "frame-producer",
                             {"streams": streams, "frame_bytes": a.b_bytes, "mode": "rate", "fps": a.b_fps})
        cons = [self.proc(f"B-consumers{k}", "frame-consumer",
                          {"clients": [consumers[i] for i in g], "window": "send"})
                for k, g in enumerate(groups)]
        procs = self.spawn([producer, *cons])
        try:
            producer.call("setup", 30)
            call_all(cons, "setup", 30)
            stats0 = self.stats()
            t_start, t0, t1 = self.timeline(a.b_warmup)
            s0, s1 = self.measure(procs, t_start, t0, t1)
            prod = producer.call("finish", 10, drain_s=0)
            sent_window = {int(k): v for k, v in prod["sent_window"].items()}
            per_proc = {p.name: {"expect": {consumers[i][0]: sent_window[consumers[i][3]] for i in g}}
                        for p, g in zip(cons, groups)}
            results = call_all(cons, "finish", 10, per_proc, drain_s=1.5)
            stats1 = self.stats()
            call_all(procs, "close", 15)
        finally:
            for p in procs:
                p.stop()
        cpu = cpu_between(s0, s1)
        measured_sent = sum(sent_window.values())
        expected = measured_sent * 3
        delivered = sum(sum(r["in_window"].values()) for r in results)
        res: dict[str, Any] = {
            "scenario": "B",
            "desc": f"{a.b_streams} streams x {a.b_fps:g} fps x 3 consumers, {a.b_bytes} B frames "
                    f"({prod['message_bytes']} B JSON)",
            "delivered": delivered, "msgs_per_s": round(delivered / a.duration, 1),
            "frames_sent_in_window": measured_sent, "offered_fps": round(measured_sent / a.duration, 1),
            "delivered_ratio": round(delivered / expected, 4) if expected else None,
            "lost": expected - delivered, "dup": sum(sum(r["dup"].values()) for r in results),
            "server_frames_dropped": _delta(stats0, stats1, "framesDropped"),
            **percentiles(latencies(results)), **cpu,
        }
        res["server_cpu_s_per_1k"] = _per_1k(cpu["server_cpu_s"], delivered)
        res["notes"] = self.issues([prod, *results])
        return res

    # ------------------------------------------------------------------ C
    def scenario_c(self) -> dict[str, Any]:
        a = self.args
        sid = f"bench-c-{self.tag}"
        consumers = [(0, "mobile")] + [(k, "dashboard") for k in range(1, a.c_consumers)]
        groups = self.consumer_groups(len(consumers))
        pipes = [self.ctx.Pipe(duplex=False) for _ in groups]
        producer = self.proc("C-ml-service", "alert-producer",
                             {"sid": sid, "window": a.c_window, "consumers": len(consumers),
                              "alert_bytes": a.c_bytes}, [r for r, _ in pipes])
        cons = [self.proc(f"C-consumers{k}", "alert-consumer",
                          {"sid": sid, "clients": [consumers[i] for i in g]}, pipes[k][1])
                for k, g in enumerate(groups)]
        procs = self.spawn([producer, *cons])
        try:
            for r, w in pipes:
                r.close()
                w.close()
            call_all(cons, "setup", 20, phase="register")  # the phone creates (and owns) the stream
            call_all(cons, "setup", 20, phase="subscribe")
            producer.call("setup", 20)
            stats0 = self.stats()
            t_start, t0, t1 = self.timeline(a.c_warmup)
            s0, s1 = self.measure(procs, t_start, t0, t1)
            prod = producer.call("finish", 10, drain_s=3.0)
            sent = prod["sent"]
            results = call_all(cons, "finish", 10, expect=sent, drain_s=2.0)
            stats1 = self.stats()
            call_all(procs, "close", 15)
        finally:
            for p in procs:
                p.stop()
        cpu = cpu_between(s0, s1)
        total = merge_counts(results, "total")
        delivered = sum(r["in_window"] for r in results)
        stored = _delta(stats0, stats1, "alertsStored")
        lost = {slot: sent - n for slot, n in total.items()}
        res: dict[str, Any] = {
            "scenario": "C",
            "desc": f"1 ml-service -> {len(consumers)} alert consumers, {prod['message_bytes']} B alerts, "
                    f"window {a.c_window}",
            "delivered": delivered, "msgs_per_s": round(delivered / cpu["wall_s"], 1),
            "alerts_sent": sent, "alerts_sent_per_s": round(prod["sent_window"] / cpu["wall_s"], 1),
            "acks": prod["acks"], "ack_seqs_consecutive": prod["ack_seqs_consecutive"],
            "alerts_stored": stored, "lost": sum(lost.values()), "lost_max_per_consumer": max(lost.values()),
            "dup": sum(sum(r["dup"].values()) for r in results), "written_off": prod["written_off"],
            **percentiles(latencies(results)), **cpu,
        }
        res["server_cpu_s_per_1k"] = _per_1k(cpu["server_cpu_s"], delivered)
        res["sender_credit_wait_s"] = prod.get("credit_wait_s")
        res["credit_messages"] = prod.get("credit_messages")
        notes = self.issues([prod, *results])
        if prod["acks"] != sent:
            notes.append(f"acks {prod['acks']} != alerts sent {sent}")
        if stored is not None and stored != sent:
            notes.append(f"server stored {stored} alerts, {sent} sent")
        if stored is None:
            notes.append("alertsStored unavailable from /stats")
        res["notes"] = notes
        return res

    # ------------------------------------------------------------------ D
    def scenario_d(self) -> dict[str, Any]:
        a = self.args
        half = a.d_conns // 2
        sids = [f"bench-d-{self.tag}-{i}" for i in range(half)]
        nprocs = max(1, a.procs)
        dash_sids = [sids[i % half] for i in range(a.d_conns - half)]
        specs = [{"mobiles": sids[k::nprocs], "dashboards": dash_sids[k::nprocs],
                  "parallel": max(1, 100 // nprocs), "phase_s": 60} for k in range(nprocs)]
        procs = self.spawn([self.proc(f"D-clients{k}", "idle", spec) for k, spec in enumerate(specs)])
        pids = [p.pid for p in procs]
        try:
            time.sleep(1.0)  # let the workers import and the server settle
            rss0 = rss_kib(self.pid)
            s0 = Snap(self.pid, pids)
            mob = call_all(procs, "setup", 90, phase="mobiles")
            s_mid = Snap(self.pid, pids)
            dash = call_all(procs, "setup", 90, phase="dashboards")
            s1 = Snap(self.pid, pids)
            time.sleep(2.0)
            rss1 = rss_kib(self.pid)
            i0 = Snap(self.pid, pids)
            time.sleep(3.0)
            i1 = Snap(self.pid, pids)
            rss_idle = rss_kib(self.pid)
            counts = call_all(procs, "count", 10)
            stats = self.stats()
            call_all(procs, "close", 30)
            time.sleep(1.0)
            rss2 = rss_kib(self.pid)
        finally:
            for p in procs:
                p.stop()
        setup = cpu_between(s0, s1)
        idle = cpu_between(i0, i1)
        ok = sum(r["connected"] for r in mob + dash)
        live = sum(r["live"] for r in counts)
        errors = merge_counts(mob + dash, "errors")
        closed = merge_counts(counts, "closed")
        res: dict[str, Any] = {
            "scenario": "D",
            "desc": f"{a.d_conns} idle connections ({half} phones + {a.d_conns - half} dashboards)",
            "delivered": live, "connections_ok": ok, "connections_live_after_idle": live,
            "msgs_per_s": round(ok / setup["wall_s"], 1) if setup["wall_s"] else None,
            "server_connections_reported": stats.get("totalConnections"),
            "rss_before_MiB": round(rss0 / 1024, 1), "rss_after_setup_MiB": round(rss1 / 1024, 1),
            "rss_after_idle_MiB": round(rss_idle / 1024, 1), "rss_after_close_MiB": round(rss2 / 1024, 1),
            "rss_KiB_per_conn": round((rss_idle - rss0) / live, 1) if live else None,
            "server_cpu_ms_per_conn_setup": round(setup["server_cpu_s"] * 1000 / ok, 3) if ok else None,
            "server_cpu_ms_per_phone_setup": _ms_per(cpu_between(s0, s_mid)["server_cpu_s"],
                                                     sum(r["connected"] for r in mob)),
            "server_cpu_ms_per_dashboard_setup": _ms_per(cpu_between(s_mid, s1)["server_cpu_s"],
                                                         sum(r["connected"] for r in dash)),
            "idle_server_util": idle["server_util"], "lost": a.d_conns - live, "dup": 0,
            **setup,
        }
        res["server_cpu_s_per_1k"] = _per_1k(setup["server_cpu_s"], ok)
        notes = []
        if errors:
            notes.append("set-up errors " + ", ".join(f"{k} x{v}" for k, v in sorted(errors.items())))
        if closed:
            notes.append("closed while idle " + ", ".join(f"{k} x{v}" for k, v in sorted(closed.items())))
        res["notes"] = notes
        return res


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int | None:
    if key in before and key in after:
        return int(after[key]) - int(before[key])
    return None


def _ratio(a: float, b: int) -> float | None:
    return round(a / b, 2) if b else None


def _ms_per(cpu_s: float, count: int) -> float | None:
    return round(cpu_s * 1000 / count, 3) if count else None


def _per_1k(cpu_s: float, count: int) -> float | None:
    return float(f"{cpu_s / count * 1000:.4g}") if count else None


# =============================================================================== server, table, main

class OwnServer:
    """`watchout serve` on a free loopback port with a generated secret; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w+b")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "watchout", "serve", "--host", "127.0.0.1",
                                         "--port", "0"], cwd=REPO, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = self._wait_url(20.0)
        self.exit_code: int | None = None

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"WebSocket:\s+(ws://\S+)", text)
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise BenchError(f"watchout serve exited with {self.process.returncode}:\n{text[-2000:]}")
            time.sleep(0.05)
        self.process.kill()
        raise BenchError(f"watchout serve did not announce its URL within {timeout:.0f} s")

    def stop(self) -> int | None:
        if self.log.closed:
            return self.exit_code
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.exit_code = self.process.returncode
        self.log.close()
        return self.exit_code

    def log_summary(self) -> dict[str, Any]:
        """Warnings, errors and connection closes the server logged, grouped without timestamps/ids."""
        groups: dict[str, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not re.search(r" (WARNING|ERROR|CRITICAL) |closing connection:|Traceback", line):
                continue
            key = re.sub(r"^\S+\s+", "", line)
            key = re.sub(r"\b(conn|user|stream)=\S+", r"\1=…", key)
            key = re.sub(r"\d+ bytes", "N bytes", key)
            groups[key] = groups.get(key, 0) + 1
        return groups


def raise_fd_limit(want: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def process_fd_limit(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    match = re.search(r"Max open files\s+(\d+|unlimited)", text)
    if not match:
        return None
    return None if match.group(1) == "unlimited" else int(match.group(1))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if digits < 0:
            return f"{value:.3g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


COLUMNS = ("scen", "delivered", "msg/s", "srv CPU%", "srv CPU s/1k", "msg/s/core", "p50 ms", "p99 ms",
           "max ms", "ratio", "lost", "dup", "RSS/conn", "cli CPU% max/sum", "notes")


def table(results: list[dict[str, Any]], pinned: bool = False, cpus: int = 1) -> str:
    rows = [COLUMNS]
    for r in results:
        if r.get("error"):
            rows.append((r["scenario"], *["-"] * (len(COLUMNS) - 2), "FAILED: " + r["error"]))
            continue
        util = r.get("client_util_max")
        cli = "-" if util is None else f"{util * 100:.0f}/{r['client_util_sum'] * 100:.0f}"
        notes = list(r.get("notes", []))
        if util is not None and (util >= 0.9 or (pinned and r["client_util_sum"] >= 0.9)):
            cli += " !"
            notes.append("client-bound: a client process (or the pinned client CPU) was busy >= 90%")
        elif util is not None and r.get("server_util") is not None \
                and r["server_util"] + r["client_util_sum"] >= 0.9 * cpus:
            notes.append(f"machine-bound: server + clients used "
                         f"{r['server_util'] + r['client_util_sum']:.1f} of {cpus} CPUs")
        if r["scenario"] == "D" and r.get("server_cpu_ms_per_conn_setup") is not None:
            notes.insert(0, f"{r['server_cpu_ms_per_conn_setup']:.3f} ms CPU/conn set-up, "
                            f"msg/s = set-ups/s")
        if r["scenario"] in "AC" and r.get("written_off"):
            notes.append(f"written off {r['written_off']}")
        if r.get("server_frames_dropped"):
            notes.append(f"server dropped {r['server_frames_dropped']} frames")
        if r["scenario"] == "C" and r.get("alerts_stored") is not None:
            notes.insert(0, f"{r['alerts_sent']:,} alerts sent, {r['acks']:,} acked, "
                            f"{r['alerts_stored']:,} stored")
        srv_util = r.get("server_util")
        rows.append((r["scenario"], _fmt(r.get("delivered")), _fmt(r.get("msgs_per_s"), 0),
                     "-" if srv_util is None else f"{srv_util * 100:.0f}",
                     _fmt(r.get("server_cpu_s_per_1k"), -1), _fmt(r.get("msgs_per_server_core_s"), 0),
                     _fmt(r.get("p50_ms"), 2),
                     _fmt(r.get("p99_ms"), 2), _fmt(r.get("max_ms"), 2),
                     _fmt(r.get("delivered_ratio"), 4), _fmt(r.get("lost")), _fmt(r.get("dup")),
                     "-" if r.get("rss_KiB_per_conn") is None else f"{r['rss_KiB_per_conn']:.1f} KiB",
                     cli, "; ".join(notes)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells) + "  " + str(row[-1]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 2
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="ws://127.0.0.1:PORT/ws of a running server (default: start one)")
    p.add_argument("--pid", type=int, help="that server's process id (required with --url)")
    p.add_argument("--scenarios", default="A,B,C,D", help="comma-separated subset of A,B,C,D")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario (A, B, C)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--procs", type=int, default=max(1, min(4, cpus - 1)),
                   help="client processes for the consumers (and for D's connections)")
    p.add_argument("--pin", action="store_true", help="pin the server to CPU 1 and every client to CPU 0")
    p.add_argument("--max-seconds", type=float, default=600.0, help="skip scenarios that would start later")
    g = p.add_argument_group("scenario parameters (defaults are the reference scenarios)")
    g.add_argument("--a-bytes", type=int, default=65536, help="A: raw bytes per frame (base64 in JSON)")
    g.add_argument("--a-window", type=int, default=8, help="A: frames in flight (not yet at every consumer)")
    g.add_argument("--a-warmup", type=float, default=2.0)
    g.add_argument("--b-streams", type=int, default=10)
    g.add_argument("--b-fps", type=float, default=15.0)
    g.add_argument("--b-bytes", type=int, default=32768)
    g.add_argument("--b-warmup", type=float, default=1.0)
    g.add_argument("--c-consumers", type=int, default=20, help="C: 1 phone + (N-1) dashboards")
    g.add_argument("--c-window", type=int, default=64, help="C: alerts in flight (not yet at every consumer)")
    g.add_argument("--c-bytes", type=int, default=200, help="C: approximate alert message size")
    g.add_argument("--c-warmup", type=float, default=2.0)
    g.add_argument("--d-conns", type=int, default=2000)
    args = p.parse_args(argv)
    args.scenario_list = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    if bad or not args.scenario_list:
        p.error(f"unknown scenario {', '.join(bad) or '(none)'}; choose from A,B,C,D")
    if args.url and not args.pid:
        p.error("--url needs --pid (the server's process id, for CPU and RSS from /proc)")
    if args.pid and not args.url:
        p.error("--pid is only used with --url")
    if min(args.a_bytes, args.b_bytes) < HEADER.size + 3 or args.d_conns < 2 or args.c_consumers < 1:
        p.error("frames must be at least 27 bytes, D needs 2 connections, C 1 consumer")
    if args.duration <= 0:
        p.error("--duration must be positive")
    return args


def settings_for_tokens(env: dict[str, str]) -> Any:
    sys.path.insert(0, str(REPO))
    from watchout.settings import load_settings
    return load_settings(None, env)


def mint_tokens(settings: Any) -> dict[str, str]:
    from watchout.auth import mint_token
    alg = settings.algorithms[0]
    if not settings.jwt_secret or not alg.startswith("HS"):
        raise BenchError("tokens are minted with WATCHOUT_JWT_SECRET (HS256); set it to the server's secret")
    common = {"ttl_s": 7200, "issuer": settings.jwt_issuer, "audience": settings.jwt_audience}
    return {"user": mint_token(settings.jwt_secret, alg, "bench-user", "user", **common),
            "ml": mint_token(settings.jwt_secret, alg, "bench-ml", "service", streams="*", **common),
            "admin": mint_token(settings.jwt_secret, alg, "bench-admin", "admin", **common)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/relay.py reads /proc for CPU and RSS: Linux only", file=sys.stderr)
        return 2
    try:
        import orjson  # noqa: F401 - the workers need both
        import websockets  # noqa: F401
    except ImportError as exc:
        print(f"bench/relay.py needs {exc.name}: pip install websockets orjson (or pip install -e '.[test]')",
              file=sys.stderr)
        return 2
    soft, hard = raise_fd_limit(max(8192, args.d_conns * 2 + 1024))
    if args.pin and (os.cpu_count() or 1) < 2:
        print("--pin needs at least 2 CPUs", file=sys.stderr)
        return 2
    began = time.monotonic()
    server: OwnServer | None = None
    log_dir = tempfile.mkdtemp(prefix="watchout-bench-")
    try:
        if args.url:
            host = urllib.parse.urlsplit(args.url).hostname
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise BenchError("--url must be a loopback address "
                                 "(CPU and RSS are read from this machine's /proc)")
            if not Path(f"/proc/{args.pid}/stat").exists():
                raise BenchError(f"no process {args.pid}")
            if not os.environ.get("WATCHOUT_JWT_SECRET"):
                raise BenchError("set WATCHOUT_JWT_SECRET to the server's secret (tokens are minted from it)")
            tokens = mint_tokens(settings_for_tokens(dict(os.environ)))
            url, pid = args.url, args.pid
        else:
            env = dict(os.environ)
            env["WATCHOUT_JWT_SECRET"] = secrets.token_urlsafe(48)
            env.pop("WATCHOUT_JWT_PUBLIC_KEY_FILE", None)
            env.pop("WATCHOUT_JWT_ALGORITHMS", None)
            tokens = mint_tokens(settings_for_tokens(env))
            server = OwnServer(env, Path(log_dir) / "server.log")
            url, pid = server.url, server.process.pid
            print(f"[bench] started watchout serve (pid {pid}) at {url}; log {server.log_path}",
                  file=sys.stderr)
        if args.pin:
            os.sched_setaffinity(pid, {1})
            os.sched_setaffinity(0, {0})
        server_fds = process_fd_limit(pid)
        bench = Bench(args, url, pid, tokens)
        meta: dict[str, Any] = {
            "url": url, "server_pid": pid, "own_server": server is not None, "duration_s": args.duration,
            "client_processes": args.procs, "pinned": args.pin, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "fd_limit_clients": soft, "fd_limit_server": server_fds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rss_start_MiB": round(rss_kib(pid) / 1024, 1),
        }
        results = []
        runners = {"A": bench.scenario_a, "B": bench.scenario_b, "C": bench.scenario_c, "D": bench.scenario_d}
        for name in [s for s in RUN_ORDER if s in args.scenario_list]:
            t = time.monotonic()
            if t - began > args.max_seconds:
                results.append({"scenario": name,
                                "error": f"skipped: past --max-seconds {args.max_seconds:g}"})
                continue
            if name == "D" and server_fds is not None and server_fds < args.d_conns + 64:
                print(f"[bench] warning: the server may open only {server_fds} files; "
                      f"D needs {args.d_conns}+", file=sys.stderr)
            print(f"[bench] {name} running ...", file=sys.stderr, flush=True)
            try:
                result = runners[name]()
            except KeyboardInterrupt:
                results.append({"scenario": name, "error": "interrupted"})
                print("[bench] interrupted", file=sys.stderr)
                break
            except Exception as exc:  # noqa: BLE001 - one failed scenario must not stop the others
                result = {"scenario": name, "error": _describe(exc)[:400]}
            cpu_s, count = result.get("server_cpu_s"), result.get("delivered")
            if cpu_s and count:
                result["msgs_per_server_core_s"] = round(count / cpu_s, 1)
            result["scenario_total_s"] = round(time.monotonic() - t, 1)
            results.append(result)
            failed = f": FAILED {result['error']}" if result.get("error") else ""
            print(f"[bench] {name} done in {result['scenario_total_s']} s{failed}",
                  file=sys.stderr, flush=True)
            try:
                os.kill(pid, 0)
            except OSError:
                print("[bench] the server process is gone; stopping", file=sys.stderr)
                break
        results.sort(key=lambda r: r["scenario"])
        meta["rss_end_MiB"] = round(rss_kib(pid) / 1024, 1) if Path(f"/proc/{pid}").exists() else None
    except BenchError as exc:
        print(f"bench/relay.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        meta["server_exit_code"] = server.exit_code
        meta["server_log"] = str(server.log_path)
        meta["server_log_warnings"] = server.log_summary()
    meta["total_s"] = round(time.monotonic() - began, 1)

    print(f"\nWatchout relay benchmark: {url} (pid {pid}), {args.duration:g} s measured per scenario, "
          f"{args.procs} client process(es){', pinned' if args.pin else ''}, {os.cpu_count()} CPUs")
    for r in results:
        if not r.get("error"):
            print(f"  {r['scenario']}: {r['desc']}")
    print()
    print(table(results, args.pin, os.cpu_count() or 1))
    if server is not None:
        warnings = meta["server_log_warnings"]
        print(f"\nserver: exit code {meta['server_exit_code']}, log {meta['server_log']}"
              + ("" if warnings else ", no warnings or errors logged"))
        for line, count in sorted(warnings.items(), key=lambda kv: -kv[1])[:8]:
            print(f"  x{count}  {line[:160]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
        print(f"\nJSON written to {args.json}")
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
