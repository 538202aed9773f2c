"""RelaySocket on /ws: authentication phase, dispatch to the core, and errors mapped to replies or closes."""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

import tornado.iostream
import tornado.web
import tornado.websocket

from handlers.wsprotocol import StrictProtocol13
from watchout.errors import AuthTimeout, RateLimited, SlowConsumer, StoreUnavailable, Unauthenticated, WatchoutError
from watchout.hub import Peer
from watchout.outbox import Outbox
from watchout.protocol import (Alert, Auth, CloseCode, Message, Ping, Register, Subscribe, Unsubscribe, VideoFrame,
                               dropped_ref, error_message, parse_binary, parse_text)
from watchout.services import Services

log = logging.getLogger("watchout.socket")
BAD_MESSAGE_WINDOW_S = 60.0
# closes worth an operator's attention; the others are part of normal operation
WARNING_CLOSES = frozenset({CloseCode.INTERNAL, CloseCode.SLOW_CONSUMER})


class _ConnectionState:
    """A connection's own fields, kept out of the handler's __dict__: Tornado already sets 27 attributes
    on it, and past 30 CPython stops sharing instance-dict keys, which costs ~1.3 KiB per connection."""

    __slots__ = ("peer", "timer", "bad", "tokens", "refilled", "limited_since", "limited_replied", "refused_at",
                 "opened", "stream", "close_cause")

    def __init__(self, burst: float) -> None:
        self.peer: Peer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.bad: deque[float] | None = None  # times of recent invalid messages, made on the first
        self.tokens = burst  # rate-limit bucket
        self.refilled = self.opened = time.monotonic()
        self.limited_since = self.limited_replied = self.refused_at = 0.0
        self.stream: str | None = None  # the stream of the last register/subscribe, for log lines
        self.close_cause: str | None = None  # why the server closed it, for the close log line


class RelaySocket(tornado.websocket.WebSocketHandler):
    """One client connection. Nothing raised in on_message escapes: every error becomes an `error`
    reply or a close with its code (an escaping exception would make Tornado drop the TCP connection).
    """

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services
        self._c = _ConnectionState(float(services.settings.rate_limit_burst))

    @property
    def peer(self) -> Peer:
        peer = self._c.peer
        assert peer is not None, "the connection has not opened"
        return peer

    def get_compression_options(self) -> dict[str, Any] | None:
        return {} if self.services.settings.ws_compression else None

    def get_websocket_protocol(self) -> tornado.websocket.WebSocketProtocol | None:
        """Tornado's protocol with an RFC 6455 frame reader (handlers/wsprotocol.py), on Tornado's parameters."""
        protocol = super().get_websocket_protocol()
        if not isinstance(protocol, tornado.websocket.WebSocketProtocol13):
            return protocol
        return StrictProtocol13(self, protocol.params, self._close_sent)

    # ------------------------------------------------------------------ Writer (for the Outbox)
    @property
    def is_compressed(self) -> bool:
        conn = self.ws_connection
        return conn is not None and getattr(conn, "_compressor", None) is not None

    def write_wire(self, data: bytes) -> asyncio.Future[None] | None:
        conn = self.ws_connection
        if conn is None or conn.is_closing():
            return None
        stream = getattr(conn, "stream", None)  # WebSocketProtocol13's IOStream
        if stream is None:
            return None
        try:
            future: asyncio.Future[None] = stream.write(data)
        except tornado.iostream.StreamClosedError:
            return None
        return future

    def write_payload(self, payload: bytes, binary: bool) -> asyncio.Future[None] | None:
        try:
            return self.write_message(payload, binary=binary)
        except tornado.websocket.WebSocketClosedError:
            return None

    def close_with(self, code: int, reason: str) -> None:
        """Close from the server's side (Peer.close, or the outbox giving up on a slow consumer)."""
        if self._c.close_cause is None:
            self._c.close_cause = reason
            if code == SlowConsumer.close_code:
                self._c.close_cause += f" ({self.peer.outbox.inflight} bytes unflushed)"
        if self.peer.closed_with is None:
            self.peer.closed_with = code
        self.close(code, reason.encode()[:123].decode(errors="ignore"))

    def _close_sent(self, code: int, reason: str) -> None:
        """The WebSocket layer started the close (a ping timeout, a protocol error, a message over
        max_message_bytes), or close_with did: record the code sent, so the close is not logged as 1006."""
        if self._c.close_cause is None:
            self._c.close_cause = reason or "by the server"
        peer = self._c.peer
        if peer is not None and peer.closed_with is None:
            peer.closed_with = code

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        s = self.services.settings
        self.set_nodelay(True)
        outbox = Outbox(self, self.services.hub.flusher, s.outbox_soft_bytes, s.outbox_hard_bytes)
        self._c.peer = Peer(secrets.token_hex(8), self, outbox)
        self.services.hub.add_peer(self.peer)
        log.debug("connection opened", extra={"conn": self.peer.id})
        header = self.request.headers.get("Authorization", "")
        # Nothing reads the upgrade request's headers again, but tornado's request coroutine keeps the
        # object for the connection's lifetime: empty it (~1.5 KiB less per connection)
        self.request.headers.clear()
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                self.services.relay.authenticate(self.peer, token.strip())
            except WatchoutError as exc:
                self._fail(exc, None)
                return
            self._watch_expiry()
        else:
            self._c.timer = asyncio.get_running_loop().call_later(s.auth_timeout_s, self._auth_timed_out)

    def on_close(self) -> None:
        if self._c.timer is not None:
            self._c.timer.cancel()
        peer = self._c.peer
        if peer is not None:
            code = peer.closed_with or self.close_code or 1006  # 1006: dropped without a close frame
            self.services.metrics.closes.labels(str(code)).inc()
            self._log_close(code)
            peer.outbox.is_closed = True
            self.services.relay.disconnect(peer)
            peer.detach()

    def _log_close(self, code: int) -> None:
        """One line per connection: its close code, why, and how long it lasted."""
        if self._c.close_cause is not None:
            cause = self._c.close_cause
        else:
            cause = "without a close code" if code == 1006 else "by the client"
        log.log(logging.WARNING if code in WARNING_CLOSES else logging.INFO,
                "connection closed: %d %s after %.1f s", code, cause, time.monotonic() - self._c.opened,
                extra=self._log_context())

    def _log_context(self, stream: str | None = None) -> dict[str, str]:
        """conn, and user and stream when known: the stream produced, else the one watched, else the
        last one asked for (a refused register or subscribe, a producer replaced)."""
        peer = self.peer
        context = {"conn": peer.id}
        if peer.principal is not None:
            context["user"] = peer.principal.sub
        if stream is None:
            watching = peer.watching
            stream = peer.producing or (next(iter(watching)) if len(watching) == 1 else None)
            if stream is None and not watching:
                stream = self._c.stream
        if stream is not None:
            context["stream"] = stream
        return context

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """An exception Tornado caught around open/on_close: one record, with the connection's context."""
        if self._c.peer is None or isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)
            return
        log.error("unexpected error on the connection", exc_info=value, extra=self._log_context())

    def _auth_timed_out(self) -> None:
        if self.peer.principal is None:
            self._fail(AuthTimeout("no valid token within the authentication time"), None)

    def _watch_expiry(self) -> None:
        """(Re)arm the close-on-expiry timer after a token was accepted."""
        principal = self.peer.principal
        assert principal is not None
        if self._c.timer is not None:
            self._c.timer.cancel()
        delay = principal.expires_at - time.time() + self._expiry_margin_s
        self._c.timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._token_expired)

    @property
    def _expiry_margin_s(self) -> float:
        """A token still opens connections until exp + leeway; a live one is closed after a grace on top."""
        s = self.services.settings
        return s.jwt_leeway_s + s.token_expiry_grace_s

    def _token_expired(self) -> None:
        principal = self.peer.principal
        if principal is not None and principal.expires_at + self._expiry_margin_s > time.time():
            self._watch_expiry()  # refreshed meanwhile
            return
        self._fail(Unauthenticated("token expired; send auth with a fresh token before it does",
                                   code="token-expired"), None)

    def on_pong(self, data: bytes) -> None:
        self.peer.last_heard = time.monotonic()  # alive: the offline job goes by this

    # ------------------------------------------------------------------ messages
    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        msg: Message | None = None
        self.peer.last_heard = time.monotonic()
        self.services.hub.bytes_in += len(message)
        try:
            if not self._within_rate(message):
                return None
            relay = self.services.relay
            msg = parse_binary(message) if isinstance(message, bytes) else parse_text(message, self.services.limits)
            if type(msg) is VideoFrame:
                relay.frame(self.peer, msg)
                return None
            if type(msg) is Alert:
                pending = relay.alert(self.peer, msg)
                return None if pending is None else self._guarded(pending, msg.ref)
            if self.peer.principal is None and not isinstance(msg, (Register, Subscribe, Auth)):
                raise Unauthenticated("authenticate first: register, subscribe or auth with a token",
                                      code="token-missing")
            if isinstance(msg, (Register, Subscribe)):
                self._c.stream = msg.stream_id
            if isinstance(msg, Register):
                return self._guarded(relay.register(self.peer, msg), msg.ref, authenticates=True)
            if isinstance(msg, Subscribe):
                return self._guarded(relay.subscribe(self.peer, msg), msg.ref, authenticates=True)
            if isinstance(msg, Auth):
                relay.auth(self.peer, msg)
                self._authenticated()
            elif isinstance(msg, Unsubscribe):
                relay.unsubscribe(self.peer, msg)
            elif isinstance(msg, Ping):
                self.peer.send({"type": "pong", **({"ref": msg.ref} if msg.ref else {})})
        except WatchoutError as exc:
            self._fail(exc, getattr(msg, "ref", None))
        except Exception:
            log.exception("unexpected error handling a message",
                          extra=self._log_context(getattr(msg, "stream_id", None)))
            self._fail(WatchoutError(), getattr(msg, "ref", None))
        return None

    async def _guarded(self, work: Awaitable[None], ref: str | None, authenticates: bool = False) -> None:
        try:
            await work
        except WatchoutError as exc:
            self._fail(exc, ref)
        except Exception:
            log.exception("unexpected error handling a message", extra=self._log_context())
            self._fail(WatchoutError(), ref)
        finally:
            if authenticates:
                self._authenticated()  # the token was accepted even if the message then failed

    def _authenticated(self) -> None:
        """Arm the expiry timer for a newly accepted token (no-op if none was accepted or it is closed)."""
        if self.peer.principal is not None and not self.peer.outbox.is_closed:
            self._watch_expiry()

    def _within_rate(self, message: str | bytes) -> bool:
        """Token bucket; over the limit a message is refused, and sustained for a second, 4429.

        A flood still gets a message through each time a token refills, so an admitted message does
        not end a period of limiting; only a second without refusals does. A refused message with an
        `id` is answered each time (`ref`), others at most every 0.1 s; `retryAfterMs` is when the
        bucket has a token again.
        """
        s = self.services.settings
        now = time.monotonic()
        c = self._c
        c.tokens = min(float(s.rate_limit_burst), c.tokens + (now - c.refilled) * s.rate_limit_msgs_per_s)
        self._c.refilled = now
        if self._c.tokens >= 1.0:
            self._c.tokens -= 1.0
            return True
        if now - self._c.refused_at > 1.0:
            self._c.limited_since = now
        self._c.refused_at = now
        if now - self._c.limited_since > 1.0:
            self._fail(RateLimited("message rate limit exceeded for too long"), None)
        else:
            ref = None if isinstance(message, bytes) else dropped_ref(message, self.services.limits)
            if ref is not None or now - self._c.limited_replied > 0.1:
                if ref is None:
                    self._c.limited_replied = now
                reply = error_message("rate-limited", "too many messages; this one was dropped", ref)
                reply["retryAfterMs"] = max(1, math.ceil((1.0 - c.tokens) * 1000 / s.rate_limit_msgs_per_s))
                self.peer.send(reply)
        return False

    def _fail(self, exc: WatchoutError, ref: str | None) -> None:
        """The one place where core errors become an `error` reply or a close code."""
        if isinstance(exc, (Unauthenticated, AuthTimeout)):
            self.services.metrics.auth_failures.labels(exc.code).inc()
        reply = error_message(exc.code, exc.message, ref or exc.ref)
        if exc.close_code is None:
            self.peer.send(reply)
            if not isinstance(exc, StoreUnavailable) and self._strike():
                self.peer.send(error_message("too-many-errors", "too many invalid messages"))
                self.peer.outbox.flush()
                self.peer.close(CloseCode.POLICY, "too many invalid messages")
            return
        if self._c.close_cause is None:
            self._c.close_cause = exc.code  # logged, with the close code, when the connection has closed
        self.peer.send(reply)
        self.peer.close(exc.close_code, exc.message)

    def _strike(self) -> bool:
        now = time.monotonic()
        if self._c.bad is None:
            self._c.bad = deque(maxlen=self.services.settings.max_bad_messages)
        self._c.bad.append(now)
        return len(self._c.bad) == self._c.bad.maxlen and now - self._c.bad[0] < BAD_MESSAGE_WINDOW_S
