"""RelaySocket on /ws: Tornado glue and the writer; the connection's policy lives in watchout/session.py."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from types import TracebackType
from typing import Any

import tornado.iostream
import tornado.web
import tornado.websocket

from handlers.wsprotocol import StrictProtocol13
from watchout.errors import SlowConsumer
from watchout.hub import Peer
from watchout.protocol import CloseCode
from watchout.services import Services
from watchout.session import Session

log = logging.getLogger("watchout.socket")
# closes worth an operator's attention; the others are part of normal operation
WARNING_CLOSES = frozenset({CloseCode.INTERNAL, CloseCode.SLOW_CONSUMER})


class RelaySocket(tornado.websocket.WebSocketHandler):
    """One client connection: Tornado's callbacks handed to its `Session`, and the `Writer` its outbox writes
    through. Nothing raised in on_message escapes (the session turns every error into an `error` reply or a
    close): an escaping exception would make Tornado drop the TCP connection.
    """

    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services
        # one attribute: Tornado already sets 27 on the handler, and past 30 CPython stops sharing
        # instance-dict keys, which costs ~1.3 KiB per connection
        self._s = Session(services)

    @property
    def peer(self) -> Peer:
        return self._s.peer

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
        session = self._s
        if session.close_cause is None:
            session.close_cause = reason
            if code == SlowConsumer.close_code:
                session.close_cause += f" ({self.peer.outbox.inflight} bytes unflushed)"
        if self.peer.closed_with is None:
            self.peer.closed_with = code
        self.close(code, reason.encode()[:123].decode(errors="ignore"))

    def _close_sent(self, code: int, reason: str) -> None:
        """The WebSocket layer started the close (a ping timeout, a protocol error, a message over
        max_message_bytes), or close_with did: record the code sent, so the close is not logged as 1006."""
        session = self._s
        if session.close_cause is None:
            session.close_cause = reason or "by the server"
        if session.is_open and session.peer.closed_with is None:
            session.peer.closed_with = code

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        self.set_nodelay(True)
        header = self.request.headers.get("Authorization", "")
        # Nothing reads the upgrade request's headers again, but tornado's request coroutine keeps the
        # object for the connection's lifetime: empty it (~1.5 KiB less per connection)
        self.request.headers.clear()
        peer = self._s.open(self, header)
        log.debug("connection opened", extra={"conn": peer.id})

    def on_close(self) -> None:
        session = self._s
        if session.is_open:
            code = session.peer.closed_with or self.close_code or 1006  # 1006: dropped without a close frame
            self.services.metrics.closes.labels(str(code)).inc()
            self._log_close(code)
        session.end()

    def _log_close(self, code: int) -> None:
        """One line per connection: its close code, why, and how long it lasted."""
        session = self._s
        if session.close_cause is not None:
            cause = session.close_cause
        else:
            cause = "without a close code" if code == 1006 else "by the client"
        log.log(logging.WARNING if code in WARNING_CLOSES else logging.INFO,
                "connection closed: %d %s after %.1f s", code, cause, session.clock.monotonic() - session.opened,
                extra=session.log_context())

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """An exception Tornado caught around open/on_close: one record, with the connection's context."""
        if not self._s.is_open or isinstance(value, tornado.web.HTTPError):
            super().log_exception(typ, value, tb)
            return
        log.error("unexpected error on the connection", exc_info=value, extra=self._s.log_context())

    def on_pong(self, data: bytes) -> None:
        self._s.heard()

    # ------------------------------------------------------------------ messages
    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        return self._s.receive(message)
