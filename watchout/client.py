"""Python client SDK (asyncio): a WebSocket connection to Watchout that stays up, with typed messages.

`Connection` reconnects with capped exponential backoff and full jitter, refreshes its token before
it expires, and sends alerts until the server acknowledges them (same `id`, so the server stores each
once). The roles built on it, `Producer`, `Watcher` and `MLService`, live in watchout.client_roles and
are importable from here. Only tornado, PyJWT, orjson and pybase64 are used: the service's own
dependencies. See docs/sdk.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

import jwt
import orjson
import pybase64
import tornado.httpclient
import tornado.websocket

from watchout.backoff import Backoff
from watchout.errors import InvalidMessage
from watchout.frames import parse_binary_frame
from watchout.protocol import SEVERITIES, CloseCode

if TYPE_CHECKING:
    from watchout.client_roles import Detection, MLService, Producer, Watcher

__all__ = ["Ack", "Alert", "AlertRejected", "Backoff", "Connection", "Detection", "Feed", "Forbidden", "Frame",
           "MLService", "Message", "Producer", "Replaced", "ReplayComplete", "Reply", "ServerError", "State",
           "Status", "StreamDeleted", "Unauthorized", "Watcher", "WatchoutClientError", "parse_message"]

log = logging.getLogger("watchout.client")
T = TypeVar("T")
State = Literal["idle", "connecting", "open", "ready", "waiting", "closed"]
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
REFRESH_AT = 0.8  # refresh a token when this fraction of its lifetime has passed
MIN_REFRESH_S = 1.0
# Alerts refused for the rate limit go again this much slower than the server advised, so that timing jitter
# does not overrun it again (a connection over it for more than a second is closed).
RATE_SLACK = 1.25
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# ----------------------------------------------------------------------------- errors

class WatchoutClientError(Exception):
    """The SDK's base error. `close_code`/`reason` are the server's close, `code` its `error` code."""

    def __init__(self, message: str, *, close_code: int | None = None, reason: str = "",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.reason = reason
        self.code = code


class Unauthorized(WatchoutClientError):
    """Closed 4401, and a fresh token from the provider was refused too."""


class Forbidden(WatchoutClientError):
    """Closed 4403: the token may not produce this stream (or sent frames for another one)."""


class Replaced(WatchoutClientError):
    """Closed 4409: a newer producer took over the stream. The SDK does not take it back."""


class StreamDeleted(WatchoutClientError):
    """Closed 4410: the stream was deleted through the REST API."""


class AlertRejected(WatchoutClientError):
    """The server refused an alert for good (`code`: not-found, invalid-field, ...); resending cannot help."""


FATAL_CLOSES: dict[int, type[WatchoutClientError]] = {CloseCode.FORBIDDEN: Forbidden, CloseCode.REPLACED: Replaced,
                                                      CloseCode.STREAM_DELETED: StreamDeleted}


# ----------------------------------------------------------------------------- messages

def _ms(value: Any) -> int:
    """A server time: milliseconds (WebSocket) or ISO-8601 (REST)."""
    if isinstance(value, str):
        return (dt.datetime.fromisoformat(value) - _EPOCH) // dt.timedelta(milliseconds=1)
    return int(value)


@dataclass(frozen=True, slots=True)
class Alert:
    """A stored alert, live, replayed or from the REST history (the same fields either way)."""

    stream_id: str
    seq: int
    alert_id: str
    severity: str
    message: str
    metadata: dict[str, Any]
    timestamp: int | float  # the sender's time, ms
    received_at_ms: int
    has_snapshot: bool = False
    acknowledged_by: str | None = None
    acknowledged_at_ms: int | None = None
    epoch: str | None = None  # the stream history it belongs to: (epoch, seq) names it across histories

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> Alert:
        ack = m.get("acknowledged") or {}
        return cls(m["streamId"], int(m["seq"]), m["alertId"], m["severity"], m["message"], m.get("metadata") or {},
                   m["timestamp"], _ms(m["receivedAt"]), bool(m.get("hasSnapshot") or m.get("snapshotUrl")),
                   ack.get("by"), _ms(ack["at"]) if ack.get("at") is not None else None)


@dataclass(frozen=True, slots=True)
class Ack:
    stream_id: str
    alert_id: str
    seq: int
    duplicate: bool  # the server had stored this alert `id` already
    ref: str | None


@dataclass(frozen=True, slots=True)
class Status:
    stream_id: str
    status: str  # online, streaming, offline
    timestamp: int


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: str
    jpeg: bytes
    timestamp: int  # ms since the epoch
    width: int = 0  # 0: not given
    height: int = 0


@dataclass(frozen=True, slots=True)
class ReplayComplete:
    stream_id: str
    last_seq: int
    complete: bool  # False: alerts after sinceSeq may be gone, or sinceSeq is from another history
    reset: bool = False  # the replay started the stream's current history from its first alert


@dataclass(frozen=True, slots=True)
class ServerError:
    code: str
    message: str
    ref: str | None = None
    stream_id: str | None = None
    retry_after_ms: int | None = None  # rate-limited: when the connection may send a message again


@dataclass(frozen=True, slots=True)
class Reply:
    """Any other server message (registered, subscribed, authenticated, pong, alert-acknowledged, ...)."""

    type: str
    ref: str | None
    stream_id: str | None
    fields: dict[str, Any]


Message = Alert | Ack | Status | Frame | ReplayComplete | ServerError | Reply


def parse_message(raw: str | bytes) -> Message | None:
    """A server message as a typed object; None for one that is not an object with a `type`.

    Raises ValueError, KeyError or TypeError for a malformed one, InvalidMessage for a bad binary frame.
    """
    if isinstance(raw, bytes):
        stream_id, frame = parse_binary_frame(raw)
        return Frame(stream_id, frame.jpeg, frame.timestamp, frame.width, frame.height)
    m = orjson.loads(raw)
    kind = m.get("type") if isinstance(m, dict) else None
    if not isinstance(kind, str):
        return None
    if kind == "alert":
        return Alert.from_json(m)
    if kind == "ack":
        return Ack(m["streamId"], m["alertId"], int(m["seq"]), bool(m.get("duplicate")), m.get("ref"))
    if kind == "status":
        return Status(m["streamId"], m["status"], int(m["timestamp"]))
    if kind == "video-frame":
        return Frame(m["streamId"], pybase64.b64decode(m["data"]), int(m["timestamp"]), int(m.get("width", 0)),
                     int(m.get("height", 0)))
    if kind == "replay-complete":
        return ReplayComplete(m["streamId"], int(m["lastSeq"]), bool(m["complete"]), m.get("reset") is True)
    if kind == "error":
        retry = m.get("retryAfterMs")
        return ServerError(m["code"], m.get("message", ""), m.get("ref"), m.get("streamId"),
                           int(retry) if isinstance(retry, (int, float)) and retry >= 0 else None)
    return Reply(kind, m.get("ref"), m.get("streamId"), m)


class Feed(Generic[T]):
    """An async iterator of received items. With `maxlen`, the oldest item is dropped (and counted) when full.

    It ends when its connection closes; if that was for a fatal reason, iterating raises that error.
    """

    def __init__(self, maxlen: int | None = None) -> None:
        self._items: deque[T] = deque(maxlen=maxlen)
        self._wake = asyncio.Event()
        self._ended = False
        self._error: WatchoutClientError | None = None
        self.dropped = 0

    def put(self, item: T) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._wake.set()

    def clear(self) -> None:
        self._items.clear()

    def end(self, error: WatchoutClientError | None) -> None:
        self._ended, self._error = True, error
        self._wake.set()

    def __len__(self) -> int:
        return len(self._items)

    def __aiter__(self) -> Feed[T]:
        return self

    async def __anext__(self) -> T:
        while not self._items:
            if self._ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()


# ----------------------------------------------------------------------------- tokens

def refresh_time(token: str, now: float) -> float | None:
    """When to replace `token` (epoch s): at REFRESH_AT of its iat..exp lifetime; None without `exp`.

    The token is decoded without checking its signature: only the server can, and does.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)):
        return None
    start = iat if isinstance(iat, (int, float)) and iat < exp else now
    return max(start + REFRESH_AT * (exp - start), now + MIN_REFRESH_S)


class _Tokens:
    """The current token; a provider is called at connect (when the token is due) and before expiry."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source
        self.token = source if isinstance(source, str) else None
        self.refresh_at: float | None = None  # None: a fixed token, or one without `exp`
        self.fetches = 0

    @property
    def is_fixed(self) -> bool:
        return isinstance(self._source, str)

    async def get(self, fresh: bool = False) -> str:
        if self.token is None or (not self.is_fixed and (
                fresh or (self.refresh_at is not None and time.time() >= self.refresh_at))):
            return await self.fetch()
        return self.token

    async def fetch(self) -> str:
        """Call the provider: a coroutine function on the loop, a plain function in the default executor."""
        source = self._source
        if isinstance(source, str):
            return source
        value: Any
        if inspect.iscoroutinefunction(source):
            value = await source()
        else:
            value = await asyncio.get_running_loop().run_in_executor(None, source)
            if inspect.isawaitable(value):
                value = await value
        if not isinstance(value, str) or not value:
            raise WatchoutClientError("the token provider returned no token")
        self.token, self.refresh_at = value, refresh_time(value, time.time())
        self.fetches += 1
        return value


@dataclass(slots=True)
class _PendingAlert:
    message: dict[str, Any]
    future: asyncio.Future[Ack]
    session: int = 0  # the connection it was last sent on (0: not sent yet)
    retries: int = 0


# ----------------------------------------------------------------------------- the connection

class Connection:
    """One WebSocket connection to `url` that reconnects until closed or until a fatal close.

    Fatal: 4403, 4409, 4410, and 4401 when a fresh token is refused as well (`Unauthorized`), or an
    HTTP 4xx handshake. Everything else (1001, 1006, 1011, ping timeouts, refused connections...)
    reconnects after `backoff`. Message callbacks run on the event loop and must not block.
    Roles subclass it and override `_opened` (send register/subscribe) and `_received`.
    """

    connect_timeout_s = 10.0
    ping_interval_s = 20.0  # client pings, to notice a dead network; the server pings too
    max_message_bytes = 17 * 2**20

    def __init__(self, url: str, token: TokenSource, *, backoff: Backoff | None = None) -> None:
        self.url = url
        self.backoff = backoff or Backoff()
        self.state: State = "idle"
        self.error: WatchoutClientError | None = None  # why it closed for good, when it did
        self.connects = 0  # successful WebSocket handshakes
        self.token_refreshes = 0
        self.last_close: tuple[int, str] | None = None  # (code, reason) of the last connection to close
        self._tokens = _Tokens(token)
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._session = 0
        self._unauthorized = 0  # 4401 closes since the last ready connection
        self._server_error: ServerError | None = None  # the last error of this connection (explains a close)
        self._alerts: dict[str, _PendingAlert] = {}
        self._paced: deque[str] = deque()  # ids of alerts refused with rate-limited: sent again one at a time
        self._pacer: asyncio.TimerHandle | None = None
        self._pace_s = 0.0  # the interval between them, as the server advised
        self._listeners: list[Callable[[Message], None]] = []
        self._state_listeners: list[Callable[[State], None]] = []
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ public
    def add_listener(self, callback: Callable[[Message], None]) -> None:
        """Call `callback` with every message received (on the loop; it must not block)."""
        self._listeners.append(callback)

    def add_state_listener(self, callback: Callable[[State], None]) -> None:
        """Call `callback` with each new state: connecting, open, ready, waiting, closed."""
        self._state_listeners.append(callback)

    def start(self) -> None:
        """Start connecting in the background (call within the running loop); returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
            self._started()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until registered/subscribed. Raises the fatal error if it closes first, TimeoutError."""
        waiters = {asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._done.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._done.is_set():
            raise self.error or WatchoutClientError("the connection is closed")
        if not self._ready.is_set():
            raise TimeoutError("not ready in time")

    async def wait_closed(self) -> WatchoutClientError | None:
        """Wait until it closes for good; returns the fatal error, or None after close()."""
        await self._done.wait()
        return self.error

    async def close(self, timeout_s: float = 5.0) -> None:
        """Wait up to `timeout_s` for unacknowledged alerts, then close (1000). Idempotent."""
        pending = [p.future for p in self._alerts.values()]
        if pending and self.state != "closed" and timeout_s > 0:
            await asyncio.wait(pending, timeout=timeout_s)
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._finish(None)

    def send(self, message: dict[str, Any]) -> bool:
        """Send a JSON message now; False when not connected (nothing is queued)."""
        return self._write(orjson.dumps(message), False) is not None

    async def send_alert(self, stream_id: str, message: str, severity: str = "high", *,
                         metadata: dict[str, Any] | None = None, timestamp_ms: int | float | None = None,
                         snapshot: bytes | None = None, alert_id: str | None = None) -> Ack:
        """Send an alert and wait for its `ack`; resent with the same id after a reconnect,
        `store-unavailable` or `rate-limited`, so it is stored once. Raises AlertRejected, or the fatal
        close error."""
        return await asyncio.shield(self._submit_alert(stream_id, message, severity, metadata=metadata,
                                                       timestamp_ms=timestamp_ms, snapshot=snapshot,
                                                       alert_id=alert_id))

    @property
    def unacked_alerts(self) -> int:
        return len(self._alerts)

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    # ------------------------------------------------------------------ for roles
    def _started(self) -> None:
        """Start the role's own background tasks."""

    async def _opened(self) -> None:
        """A new connection is open: send register/subscribe. A bare Connection pings: the `pong`
        shows the token on the upgrade request was accepted (otherwise: `error` and close 4401)."""
        self.send({"type": "ping", "id": "ready-check"})

    def _received(self, message: Message) -> None:
        """A message for the role."""
        if isinstance(message, Reply) and message.type == "pong" and message.ref == "ready-check":
            self._mark_ready()

    def _ended(self, error: WatchoutClientError | None) -> None:
        """Closed for good: end the role's feeds."""

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _mark_ready(self) -> None:
        """Registered/subscribed: (re)send every unacknowledged alert, oldest first."""
        if self.state != "open":
            return
        self._unauthorized = 0
        self._set_state("ready")
        self._ready.set()
        self._stop_pacing()  # a new connection has a full rate allowance
        for pending in list(self._alerts.values()):
            if pending.session != self._session:
                self._send_alert(pending)

    def _write(self, payload: bytes, binary: bool) -> asyncio.Future[None] | None:
        ws = self._ws
        if ws is None:
            return None
        try:
            future = ws.write_message(payload, binary=binary)
        except tornado.websocket.WebSocketClosedError:
            return None
        future.add_done_callback(_consume_error)
        return future

    def _submit_alert(self, stream_id: str, message: str, severity: str = "high", *,
                      metadata: dict[str, Any] | None = None, timestamp_ms: int | float | None = None,
                      snapshot: bytes | None = None, alert_id: str | None = None) -> asyncio.Future[Ack]:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        if self.state == "closed":
            raise self.error or WatchoutClientError("the connection is closed")
        alert_id = alert_id or uuid.uuid4().hex
        if alert_id in self._alerts:
            return self._alerts[alert_id].future
        body: dict[str, Any] = {"type": "alert", "id": alert_id, "streamId": stream_id, "severity": severity,
                                "message": message, "metadata": metadata or {},
                                "timestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)}
        if snapshot is not None:
            body["snapshot"] = pybase64.b64encode(snapshot).decode("ascii")
        pending = _PendingAlert(body, asyncio.get_running_loop().create_future())
        self._alerts[alert_id] = pending
        if self._paced:
            self._paced.append(alert_id)  # behind the alerts the rate limit refused
        elif self.is_ready:
            self._send_alert(pending)
        return pending.future

    # ------------------------------------------------------------------ internals
    def _send_alert(self, pending: _PendingAlert) -> None:
        if pending.message["id"] in self._alerts and self.send(pending.message):
            pending.session = self._session

    def _set_state(self, state: State) -> None:
        if state == self.state:
            return
        self.state = state
        for callback in list(self._state_listeners):
            try:
                callback(state)
            except Exception:
                log.exception("state listener failed")

    async def _run(self) -> None:
        failures = 0  # attempts since the last connection that got ready
        while not self._stopping:
            self._set_state("connecting")
            was_ready, error = await self._connect_once()
            if error is not None:
                self._finish(error)
                return
            if was_ready:
                failures = 0
            self._set_state("waiting")
            await self.backoff.sleep(self.backoff.delay_s(failures))
            failures += 1
        self._finish(None)

    async def _connect_once(self) -> tuple[bool, WatchoutClientError | None]:
        """One connection, from handshake to close: (whether it got ready, a fatal error)."""
        try:
            token = await self._tokens.get(fresh=self._unauthorized > 0)
        except Exception as exc:  # the user's provider: try again after the backoff
            log.warning("the token provider failed: %s", exc)
            return False, None
        closed = asyncio.get_running_loop().create_future()

        def on_message(raw: str | bytes | None) -> None:
            if raw is not None:
                self._on_raw(raw)
            elif not closed.done():
                closed.set_result(None)

        request = tornado.httpclient.HTTPRequest(self.url, headers={"Authorization": f"Bearer {token}"},
                                                 connect_timeout=self.connect_timeout_s,
                                                 request_timeout=self.connect_timeout_s)
        self._server_error = None
        try:
            ws = await tornado.websocket.websocket_connect(
                request, on_message_callback=on_message, max_message_size=self.max_message_bytes,
                ping_interval=self.ping_interval_s or None, ping_timeout=self.ping_interval_s or None)
        except tornado.httpclient.HTTPClientError as exc:
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                return False, WatchoutClientError(f"the server refused the WebSocket handshake: HTTP {exc.code}")
            log.info("connecting to %s failed: %s", self.url, exc)
            return False, None
        except (OSError, tornado.websocket.WebSocketError) as exc:
            log.info("connecting to %s failed: %s", self.url, exc)
            return False, None
        self.connects += 1
        self._session += 1
        self._ws = ws
        self._set_state("open")
        refresher = asyncio.create_task(self._refresh_token())
        try:
            if not closed.done():
                await self._opened()
            await closed
        finally:
            was_ready = self.state == "ready"
            refresher.cancel()
            self._ws = None
            self._ready.clear()
            ws.close(CloseCode.NORMAL)
        code = ws.close_code if ws.close_code is not None else 1006  # 1006: no close frame
        reason = ws.close_reason or ""
        self.last_close = (code, reason)
        log.info("connection to %s closed: %s %s", self.url, code, reason)
        return was_ready, self._fatal(code, reason)

    def _fatal(self, code: int, reason: str) -> WatchoutClientError | None:
        error = self._server_error
        detail = f"closed {code} {reason}" + (f" ({error.code}: {error.message})" if error else "")
        error_code = error.code if error else None
        if code == CloseCode.UNAUTHENTICATED:
            self._unauthorized += 1
            if self._unauthorized >= 2:  # the retry had a fresh token (or the same fixed one)
                return Unauthorized(detail, close_code=code, reason=reason, code=error_code)
            return None
        cls = FATAL_CLOSES.get(code)
        return cls(detail, close_code=code, reason=reason, code=error_code) if cls else None

    async def _refresh_token(self) -> None:
        """Send `auth` with a fresh token at ~80% of the current one's lifetime, while this connection lasts."""
        while not self._tokens.is_fixed:
            due = self._tokens.refresh_at
            if due is None:
                return
            await asyncio.sleep(max(0.0, due - time.time()))
            try:
                token = await self._tokens.fetch()
            except Exception as exc:  # the user's provider: try again shortly
                log.warning("the token provider failed: %s", exc)
                await asyncio.sleep(MIN_REFRESH_S)
                continue
            if self.send({"type": "auth", "token": token, "id": f"auth-{self.token_refreshes + 1}"}):
                self.token_refreshes += 1

    def _on_raw(self, raw: str | bytes) -> None:
        """Every message, from tornado's read loop: an exception here would drop the connection."""
        try:
            message = parse_message(raw)
        except (ValueError, KeyError, TypeError, InvalidMessage) as exc:
            log.warning("unreadable message from the server: %s", exc)
            return
        if message is None:
            return
        try:
            if isinstance(message, ServerError):
                self._server_error = message
            if isinstance(message, (Ack, ServerError)) and message.ref in self._alerts:
                self._settle_alert(message)
            elif isinstance(message, ServerError) and message.code == "rate-limited" and message.ref is None:
                # dropped unread, and the server does not say which message (an older server): every alert
                # sent on this connection without an ack may have been
                self._resend_alerts_later(1.0, unanswered=True)
            self._received(message)
            for listener in list(self._listeners):
                listener(message)
        except Exception:
            log.exception("handling a %s message failed", type(message).__name__)

    def _settle_alert(self, message: Ack | ServerError) -> None:
        assert message.ref is not None
        pending = self._alerts[message.ref]
        if isinstance(message, Ack):
            del self._alerts[message.ref]
            if not pending.future.done():
                pending.future.set_result(message)
        elif message.code == "store-unavailable":
            pending.retries += 1
            pending.session = 0  # not stored: send again
            self._resend_alerts_later(self.backoff.delay_s(pending.retries) + 0.05)
        elif message.code == "rate-limited":
            pending.retries += 1
            retry_s = (message.retry_after_ms / 1000 if message.retry_after_ms is not None
                       else self.backoff.delay_s(pending.retries) + 0.05)
            self._pace(pending, retry_s)
        else:
            del self._alerts[message.ref]
            if not pending.future.done():
                pending.future.set_exception(AlertRejected(message.message, code=message.code))

    def _pace(self, pending: _PendingAlert, interval_s: float) -> None:
        """Send a refused alert again behind those already waiting, one every `interval_s` (the time the
        server advised for its rate limit to allow one more message), so they do not overrun it again."""
        pending.session = 0  # dropped unread: send again
        if pending.message["id"] not in self._paced:
            self._paced.append(pending.message["id"])
        self._pace_s = max(self._pace_s, interval_s * RATE_SLACK)
        if self._pacer is None:
            self._pacer = asyncio.get_running_loop().call_later(self._pace_s, self._send_paced)

    def _send_paced(self) -> None:
        self._pacer = None
        while self._paced and self._paced[0] not in self._alerts:
            self._paced.popleft()  # acknowledged meanwhile
        if not self._paced or not self.is_ready:
            self._stop_pacing()  # disconnected: all of them go again once ready
            return
        self._send_alert(self._alerts[self._paced.popleft()])
        if self._paced:
            self._pacer = asyncio.get_running_loop().call_later(self._pace_s, self._send_paced)
        else:
            self._pace_s = 0.0

    def _stop_pacing(self) -> None:
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        self._paced.clear()
        self._pace_s = 0.0

    def _resend_alerts_later(self, delay_s: float, unanswered: bool = False) -> None:
        """Send again the alerts refused on this connection, or with `unanswered` all without an ack."""
        session = self._session

        def resend() -> None:
            if self._session == session and self.is_ready:
                for pending in list(self._alerts.values()):
                    if pending.message["id"] in self._paced:
                        continue  # waits for its turn under the rate limit
                    if pending.session == 0 or (unanswered and pending.session == session):
                        self._send_alert(pending)
        asyncio.get_running_loop().call_later(delay_s, resend)

    def _finish(self, error: WatchoutClientError | None) -> None:
        if self._done.is_set():
            return
        self._stopping = True
        self.error = error
        self._stop_pacing()
        for task in list(self._background):
            task.cancel()
        failure = error or WatchoutClientError("the connection was closed before the alert was acknowledged")
        for pending in self._alerts.values():
            if not pending.future.done():
                pending.future.set_exception(failure)
                pending.future.exception()  # retrieved: nobody may be waiting
        self._alerts.clear()
        self._set_state("closed")
        self._ended(error)
        self._done.set()
        if error is not None:
            log.warning("connection to %s closed for good: %s", self.url, error)


def _consume_error(future: asyncio.Future[None]) -> None:
    """A write that failed because the connection closed: the close itself is handled elsewhere."""
    if not future.cancelled():
        future.exception()


_ROLES = ("Detection", "MLService", "Producer", "Watcher")


def __getattr__(name: str) -> Any:
    """The roles, from watchout.client_roles (imported on first use: it builds on this module)."""
    if name in _ROLES:
        from watchout import client_roles
        return getattr(client_roles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
