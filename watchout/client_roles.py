"""The client SDK's roles over one Connection: Producer (a phone), Watcher (a dashboard) and MLService."""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import tornado.httpclient
import tornado.iostream
import tornado.websocket

from watchout.client import (Ack, Alert, Backoff, Connection, Feed, Forbidden, Frame, Message, ReplayComplete, Reply,
                             ServerError, Status, TokenSource, Unauthorized, WatchoutClientError)
from watchout.frames import encode_binary_frame, encode_json_frame
from watchout.errors import InvalidMessage
from watchout.protocol import check_stream_id

log = logging.getLogger("watchout.client")
HISTORY_PAGE = 500


def _checked_stream_id(stream_id: str) -> str:
    """The server's stream-id rule, raised as ValueError: a bad argument, found before anything is sent."""
    try:
        return check_stream_id(stream_id, field="stream_id")
    except InvalidMessage as exc:
        raise ValueError(exc.message) from None


def api_base(ws_url: str) -> str:
    """The REST base URL of a WebSocket URL: ws://host:3000/ws -> http://host:3000."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path[:-3] if parts.path.endswith("/ws") else parts.path
    return urllib.parse.urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


class Producer(Connection):
    """A phone: registers `stream_id` on every connection and streams JPEG frames.

    send_frame() never blocks. Frames wait in a queue of `max_queued_frames` while disconnected, or
    while the socket is still taking the previous frame; when it is full the oldest is dropped
    (counted in frames_dropped). alerts() yields the stream's alerts as they arrive. `register` has
    no sinceSeq, so alerts stored while the producer was disconnected are not replayed to it: use a
    Watcher for the exact list. A newer producer taking over ends it with Replaced (4409).
    """

    def __init__(self, url: str, token: TokenSource, stream_id: str, *, binary: bool = True, alerts: bool = True,
                 max_queued_frames: int = 16, backoff: Backoff | None = None) -> None:
        super().__init__(url, token, backoff=backoff)
        self.stream_id = _checked_stream_id(stream_id)
        self.binary = binary
        self.consume_alerts = alerts
        self.frames_sent = 0
        self.frames_dropped = 0
        self._frames: deque[bytes] = deque(maxlen=max_queued_frames)
        self._frames_waiting = asyncio.Event()
        self._alert_feed: Feed[Alert] = Feed()

    def send_frame(self, jpeg: bytes, timestamp_ms: int | None = None, width: int = 0, height: int = 0) -> None:
        """Queue a frame (timestamp: now unless given, ms). Raises the fatal error once closed for good."""
        if self.state == "closed":
            raise self.error or WatchoutClientError("the producer is closed")
        timestamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        encode = encode_binary_frame if self.binary else encode_json_frame
        if len(self._frames) == self._frames.maxlen:
            self.frames_dropped += 1
        self._frames.append(encode(self.stream_id, jpeg, timestamp, width, height))
        self._frames_waiting.set()

    @property
    def queued_frames(self) -> int:
        return len(self._frames)

    def alerts(self) -> Feed[Alert]:
        return self._alert_feed

    def _started(self) -> None:
        self._spawn(self._write_frames())

    async def _opened(self) -> None:
        self.send({"type": "register", "clientType": "mobile", "streamId": self.stream_id,
                   "consumes": ["alert"] if self.consume_alerts else [], "id": "register"})

    def _received(self, message: Message) -> None:
        if isinstance(message, Reply) and message.type == "registered" and message.stream_id == self.stream_id:
            self._mark_ready()
            self._frames_waiting.set()
        elif isinstance(message, Alert) and message.stream_id == self.stream_id:
            self._alert_feed.put(message)

    def _ended(self, error: WatchoutClientError | None) -> None:
        self._alert_feed.end(error)

    async def _write_frames(self) -> None:
        """One frame at a time: the next is written once the socket has taken the previous one."""
        while True:
            await self._frames_waiting.wait()
            self._frames_waiting.clear()
            while self._frames and self.is_ready:
                future = self._write(self._frames[0], self.binary)
                if future is None:
                    break
                self._frames.popleft()
                try:
                    await future
                except (tornado.websocket.WebSocketClosedError, tornado.iostream.StreamClosedError):
                    break  # the frame went down with the connection
                self.frames_sent += 1


class _Subscriber(Connection):
    """Subscribes to one stream on every connection; alerts resume with sinceSeq, exactly once, in order."""

    client_type = "dashboard"
    # After `not-found` (no such stream yet): at most 9 tries a minute, under the server's 10 bad messages per 60 s.
    resubscribe_s = 7.0

    def __init__(self, url: str, token: TokenSource, stream_id: str, *, video: bool, alerts: bool, binary: bool,
                 since_seq: int | None, api_url: str | None, backoff: Backoff | None, epoch: str | None = None
                 ) -> None:
        super().__init__(url, token, backoff=backoff)
        self.stream_id = _checked_stream_id(stream_id)
        self.video = video
        self.consume_alerts = alerts
        self.binary = binary
        self.api_url = api_url or api_base(url)
        self.last_seq = since_seq  # the last alert seq delivered: the next subscribe's sinceSeq
        self.epoch = epoch  # the history last_seq belongs to (from `subscribed` or the REST history)
        self.history_resets = 0  # times the server started the stream's current history over for us
        self.stream_status: str | None = None
        self.last_replay: ReplayComplete | None = None
        self.alert_repeats = 0  # alerts dropped because their seq was delivered already
        self._alert_feed: Feed[Alert] = Feed()
        self._subscribes = 0
        self._subscribe_ref: str | None = None
        self._since_sent: int | None = None
        self._epoch_sent: str | None = None
        self._accepting = False  # alerts count only after the current subscribe's `subscribed`
        self._retry: asyncio.TimerHandle | None = None

    def alerts(self) -> Feed[Alert]:
        """The stream's alerts in seq order, none missed or repeated across reconnects (one reader)."""
        return self._alert_feed

    async def _opened(self) -> None:
        if self.consume_alerts and self.last_seq is None:
            self.last_seq, self.epoch = await self._read_position()
        self._subscribe()

    def _subscribe(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._subscribes += 1
        self._subscribe_ref = f"subscribe-{self._subscribes}"
        self._accepting = False
        consumes = (["video-frame"] if self.video else []) + (["alert"] if self.consume_alerts else [])
        message: dict[str, Any] = {"type": "subscribe", "clientType": self.client_type, "streamId": self.stream_id,
                                   "consumes": consumes, "format": "binary" if self.binary else "json",
                                   "id": self._subscribe_ref}
        self._since_sent = self.last_seq if self.consume_alerts else None
        self._epoch_sent = self.epoch if self._since_sent is not None else None
        if self._since_sent is not None:
            message["sinceSeq"] = self._since_sent
            if self._epoch_sent is not None:
                message["epoch"] = self._epoch_sent
        self.send(message)

    def _resubscribe_later(self) -> None:
        session = self._session

        def again() -> None:
            if self._session == session and self.state in ("open", "ready"):
                self._subscribe()
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(self.resubscribe_s, again)

    def _received(self, message: Message) -> None:
        if isinstance(message, Reply):
            if message.type == "subscribed" and message.ref == self._subscribe_ref:
                self._accepting = True
                self.stream_status = message.fields.get("status")
                if message.fields.get("reset") is True and self.consume_alerts:
                    # our position was in another history of the stream id (deleted and created again, or a
                    # new database): the replay that follows starts the current one at its first alert
                    self.last_seq = 0
                    self.history_resets += 1
                epoch = message.fields.get("epoch")
                if isinstance(epoch, str):
                    self.epoch = epoch
                self._mark_ready()
        elif isinstance(message, ServerError):
            ours = message.ref == self._subscribe_ref or (message.ref is None and message.stream_id == self.stream_id)
            if ours and message.code == "not-found":  # not created yet, or no longer in the token's scope
                self._accepting = False
                self._resubscribe_later()
            elif ours:
                log.error("subscribe to %s refused: %s %s", self.stream_id, message.code, message.message)
        elif getattr(message, "stream_id", None) != self.stream_id:
            return
        elif isinstance(message, Alert):
            self._take_alert(message)
        elif isinstance(message, Frame):
            self._take_frame(message)
        elif isinstance(message, Status):
            self.stream_status = message.status
        elif isinstance(message, ReplayComplete):
            self.last_replay = message
            if not message.complete and not message.reset and self._epoch_sent is None \
                    and message.last_seq == self._since_sent and self._since_sent:
                # a position sent without its epoch, beyond the history's end: from another history
                self.last_seq = 0
                self._subscribe()

    def _take_alert(self, alert: Alert) -> None:
        if not self._accepting:
            return  # from a subscription being replaced: the new one replays it
        if self.last_seq is not None and alert.seq <= self.last_seq:
            self.alert_repeats += 1
            return
        self.last_seq = alert.seq
        self._alert_feed.put(alert if self.epoch is None else replace(alert, epoch=self.epoch))

    def _take_frame(self, frame: Frame) -> None:
        """A video frame of the stream."""

    def _ended(self, error: WatchoutClientError | None) -> None:
        if self._retry is not None:
            self._retry.cancel()
        self._alert_feed.end(error)

    async def _read_position(self) -> tuple[int | None, str | None]:
        """The stream's (lastSeq, epoch) from the REST API, so that the first subscribe continues from now.

        (0, None) for a stream that does not exist yet: all of its alerts will be new.
        """
        try:
            page = await self._api_get(f"/api/streams/{urllib.parse.quote(self.stream_id)}/alerts", {"limit": 1})
            epoch = page.get("epoch")
            return int(page["lastSeq"]), epoch if isinstance(epoch, str) else None
        except (OSError, ValueError, KeyError, WatchoutClientError, tornado.httpclient.HTTPClientError) as exc:
            if isinstance(exc, WatchoutClientError) and exc.code == "not-found":
                return 0, None
            log.info("no lastSeq for %s (%s): subscribing for live alerts only", self.stream_id, exc)
            return None, None

    async def _api_get(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
        token = await self._tokens.get()
        url = self.api_url + path + "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        request = tornado.httpclient.HTTPRequest(url, headers={"Authorization": f"Bearer {token}"},
                                                 connect_timeout=self.connect_timeout_s, request_timeout=30.0)
        response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        body = orjson.loads(response.body) if response.body else {}
        if response.code != 200 or not isinstance(body, dict):
            error = body.get("error", {}) if isinstance(body, dict) else {}
            cls = {401: Unauthorized, 403: Forbidden}.get(response.code, WatchoutClientError)
            raise cls(f"GET {path}: HTTP {response.code} {error.get('message', '')}".strip(), code=error.get("code"))
        return body


class Watcher(_Subscriber):
    """A dashboard: frames() (newest win: at most `max_queued_frames` wait) and alerts() of one stream.

    With `since_seq` None, alerts() starts from the stream's lastSeq when it first connects (read from
    the REST API), or from history() when that is called. Each reconnect resumes after the last alert
    delivered, so the list has no gap and no repeat.
    """

    def __init__(self, url: str, token: TokenSource, stream_id: str, *, video: bool = True, alerts: bool = True,
                 binary: bool = True, since_seq: int | None = None, epoch: str | None = None,
                 max_queued_frames: int = 8, api_url: str | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(url, token, stream_id, video=video, alerts=alerts, binary=binary, since_seq=since_seq,
                         api_url=api_url, backoff=backoff, epoch=epoch)
        self._frame_feed: Feed[Frame] = Feed(maxlen=max_queued_frames)

    def frames(self) -> Feed[Frame]:
        return self._frame_feed

    async def history(self) -> list[Alert]:
        """Every stored alert of the stream, oldest first, from GET /api/streams/{id}/alerts (all pages).

        alerts() then continues right after the last one (subscribe with sinceSeq=lastSeq): alerts
        already waiting in it are discarded and come again in order. Raises WatchoutClientError.
        """
        path = f"/api/streams/{urllib.parse.quote(self.stream_id)}/alerts"
        items: list[Alert] = []
        last_seq: int | None = None
        epoch: str | None = None
        cursor: str | None = None
        while True:
            page = await self._api_get(path, {"limit": HISTORY_PAGE, "cursor": cursor})
            if last_seq is None:
                last_seq = int(page["lastSeq"])  # every later page is pinned to the first page's lastSeq
                epoch = page.get("epoch") if isinstance(page.get("epoch"), str) else None
            items.extend(replace(Alert.from_json(item), epoch=epoch) for item in page["items"])
            cursor = page.get("nextCursor")
            if not cursor:
                break
        items.reverse()
        if self.consume_alerts:
            self._alert_feed.clear()
            self.last_seq, self.epoch = last_seq, epoch
            if self.state in ("open", "ready"):
                self._subscribe()
        return items

    def _take_frame(self, frame: Frame) -> None:
        self._frame_feed.put(frame)

    def _ended(self, error: WatchoutClientError | None) -> None:
        super()._ended(error)
        self._frame_feed.end(error)


@dataclass(frozen=True, slots=True)
class Detection:
    """What analyse() found in a frame: sent as an alert with the frame's timestamp."""

    message: str
    severity: str = "high"
    metadata: dict[str, Any] = field(default_factory=dict)  # confidence (0-1), objectType, box, ...
    snapshot: bytes | None = None  # a JPEG stored with the alert (at most 512 KiB)


class MLService(_Subscriber):
    """Runs `analyse(jpeg)` on the stream's frames and sends what it detects as alerts.

    analyse may be slow and synchronous: it runs in `executor` (default: one worker thread), never
    on the event loop, so the connection keeps answering pings. While it is busy only the newest
    frame waits; the frames it replaces are counted in frames_skipped. Alerts carry a uuid `id` and
    are resent with it until acked. With a ProcessPoolExecutor, analyse must be picklable.
    """

    client_type = "ml-service"

    def __init__(self, url: str, token: TokenSource, stream_id: str, analyse: Callable[[bytes], Detection | None],
                 *, executor: Executor | None = None, alerts: bool = False, api_url: str | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(url, token, stream_id, video=True, alerts=alerts, binary=True, since_seq=None,
                         api_url=api_url, backoff=backoff)
        self.analyse = analyse
        self._executor = executor
        self._owns_executor = executor is None
        self._latest: Frame | None = None
        self._frame_waiting = asyncio.Event()
        self.frames_received = 0
        self.frames_analysed = 0
        self.frames_skipped = 0
        self.analyse_errors = 0
        self.alerts_sent = 0
        self.alerts_acked = 0

    def _started(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="watchout-analyse")
        self._spawn(self._analyse_frames())

    def _take_frame(self, frame: Frame) -> None:
        self.frames_received += 1
        if self._latest is not None:
            self.frames_skipped += 1
        self._latest = frame
        self._frame_waiting.set()

    async def _analyse_frames(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._frame_waiting.wait()
            self._frame_waiting.clear()
            frame, self._latest = self._latest, None
            if frame is None:
                continue
            try:
                detection = await loop.run_in_executor(self._executor, self.analyse, frame.jpeg)
            except Exception:
                log.exception("analyse failed on a frame of %s", self.stream_id)
                self.analyse_errors += 1
                continue
            self.frames_analysed += 1
            if detection is not None:
                future = self._submit_alert(self.stream_id, detection.message, detection.severity,
                                            metadata=detection.metadata, timestamp_ms=frame.timestamp,
                                            snapshot=detection.snapshot)
                self.alerts_sent += 1
                future.add_done_callback(self._alert_settled)

    def _alert_settled(self, future: asyncio.Future[Ack]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self.alerts_acked += 1
        else:
            log.warning("alert on %s not delivered: %s", self.stream_id, error)

    def _ended(self, error: WatchoutClientError | None) -> None:
        super()._ended(error)
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
