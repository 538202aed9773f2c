"""One connection's policy: the authentication phase, token expiry, the rate limit, strikes and dispatch."""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from watchout.errors import (AuthTimeout, Disconnect, InternalError, RateLimited, StoreUnavailable, Unauthenticated,
                             WatchoutError)
from watchout.hub import Peer
from watchout.outbox import Outbox, Writer
from watchout.protocol import (Alert, Auth, CloseCode, Message, Ping, Register, Subscribe, Unsubscribe, VideoFrame,
                               dropped_ref, error_message, pong_message, parse_binary, parse_text)
from watchout.services import Services

log = logging.getLogger("watchout.session")
BAD_MESSAGE_WINDOW_S = 60.0


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock:
    """Real time: time.monotonic for intervals, time.time (wall) for token expiry, the running loop's timers."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


SYSTEM_CLOCK = Clock()


class Session:
    """One connection as the policy sees it: it gets the raw messages and decides, for each, to reply, to close
    with a code, or to dispatch it to the commands. Nothing raised by the core escapes `receive`: every error
    becomes an `error` reply or a close. Writes go through the connection's `Writer` (the socket).

    Slotted and without a task of its own: an idle connection costs its fields only.
    """

    __slots__ = ("services", "clock", "_peer", "timer", "bad", "tokens", "refilled", "limited_since",
                 "limited_replied", "refused_at", "opened", "stream", "close_cause")

    def __init__(self, services: Services, clock: Clock = SYSTEM_CLOCK) -> None:
        self.services = services
        self.clock = clock
        self._peer: Peer | None = None
        self.timer: Timer | None = None  # the authentication deadline, then the token's expiry
        self.bad: deque[float] | None = None  # times of recent invalid messages, made on the first
        self.tokens = float(services.settings.rate_limit_burst)  # rate-limit bucket
        self.refilled = self.opened = clock.monotonic()
        self.limited_since = self.limited_replied = self.refused_at = 0.0
        self.stream: str | None = None  # the stream of the last register/subscribe, for log lines
        self.close_cause: str | None = None  # why the server closed it, for the close log line

    @property
    def peer(self) -> Peer:
        peer = self._peer
        assert peer is not None, "the connection has not opened"
        return peer

    @property
    def is_open(self) -> bool:
        """Whether `open` has made the connection's peer."""
        return self._peer is not None

    # ------------------------------------------------------------------ lifecycle
    def open(self, writer: Writer, authorization: str) -> Peer:
        """Join the hub; `authorization` is the upgrade request's Authorization header ("" when none).

        A bearer token authenticates now (a bad one closes); without one the client has `auth_timeout_s`
        to send register, subscribe or auth with a token, else 4408.
        """
        s = self.services.settings
        outbox = Outbox(writer, self.services.hub.flusher, s.outbox_soft_bytes, s.outbox_hard_bytes)
        peer = self._peer = Peer(secrets.token_hex(8), writer, outbox)
        peer.last_heard = self.clock.monotonic()
        self.services.hub.add_peer(peer)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                self.services.commands.authenticate(peer, token.strip())
            except WatchoutError as exc:
                self.fail(exc, None)
                return peer
            self._watch_expiry()
        else:
            self.timer = self.clock.call_later(s.auth_timeout_s, self._auth_timed_out)
        return peer

    def heard(self) -> None:
        """The client answered a ping: alive (the offline job goes by last_heard)."""
        self.peer.last_heard = self.clock.monotonic()

    def end(self) -> None:
        """The connection has closed: stop the timer, leave the commands and the hub, drop the writer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        peer = self._peer
        if peer is not None:
            peer.outbox.is_closed = True
            self.services.commands.disconnect(peer)
            peer.detach()

    def log_context(self, stream: str | None = None) -> dict[str, str]:
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
                stream = self.stream
        if stream is not None:
            context["stream"] = stream
        return context

    # ------------------------------------------------------------------ timers
    def _auth_timed_out(self) -> None:
        if self.peer.principal is None:
            self.fail(AuthTimeout("no valid token within the authentication time"), None)

    def _watch_expiry(self) -> None:
        """(Re)arm the close-on-expiry timer after a token was accepted."""
        principal = self.peer.principal
        assert principal is not None
        if self.timer is not None:
            self.timer.cancel()
        delay = principal.expires_at - self.clock.time() + self._expiry_margin_s
        self.timer = self.clock.call_later(max(0.0, delay), self._token_expired)

    @property
    def _expiry_margin_s(self) -> float:
        """A token still opens connections until exp + leeway; a live one is closed after a grace on top."""
        s = self.services.settings
        return s.jwt_leeway_s + s.token_expiry_grace_s

    def _token_expired(self) -> None:
        principal = self.peer.principal
        if principal is not None and principal.expires_at + self._expiry_margin_s > self.clock.time():
            self._watch_expiry()  # refreshed meanwhile
            return
        self.fail(Unauthenticated("token expired; send auth with a fresh token before it does",
                                  code="token-expired"), None)

    def _authenticated(self) -> None:
        """Arm the expiry timer for a newly accepted token (no-op if none was accepted or it is closed)."""
        if self.peer.principal is not None and not self.peer.outbox.is_closed:
            self._watch_expiry()

    # ------------------------------------------------------------------ messages
    def receive(self, message: str | bytes) -> Awaitable[None] | None:
        """One message as read from the socket. Returns the work still pending (a register, a subscribe, an
        alert on a stream not live here), for the socket to await so that messages are handled in order."""
        msg: Message | None = None
        peer = self.peer
        peer.last_heard = self.clock.monotonic()
        self.services.hub.bytes_in += len(message)
        try:
            if not self._within_rate(message):
                return None
            commands = self.services.commands
            msg = parse_binary(message) if isinstance(message, bytes) else parse_text(message, self.services.limits)
            if peer.principal is None and not isinstance(msg, (Register, Subscribe, Auth)):
                raise Unauthenticated("authenticate first: register, subscribe or auth with a token",
                                      code="token-missing")
            if type(msg) is VideoFrame:
                commands.frame(peer, msg)
                return None
            if type(msg) is Alert:
                pending = commands.alert(peer, msg)
                return None if pending is None else self._guarded(pending, msg.ref)
            if isinstance(msg, (Register, Subscribe)):
                self.stream = msg.stream_id
            if isinstance(msg, Register):
                return self._guarded(commands.register(peer, msg), msg.ref, authenticates=True)
            if isinstance(msg, Subscribe):
                return self._guarded(commands.subscribe(peer, msg), msg.ref, authenticates=True)
            if isinstance(msg, Auth):
                commands.auth(peer, msg)
                self._authenticated()
            elif isinstance(msg, Unsubscribe):
                commands.unsubscribe(peer, msg)
            elif isinstance(msg, Ping):
                peer.send(pong_message(msg.ref))
        except WatchoutError as exc:
            self.fail(exc, getattr(msg, "ref", None))
        except Exception:
            log.exception("unexpected error handling a message",
                          extra=self.log_context(getattr(msg, "stream_id", None)))
            self.fail(InternalError(), getattr(msg, "ref", None))
        return None

    async def _guarded(self, work: Awaitable[None], ref: str | None, authenticates: bool = False) -> None:
        try:
            await work
        except WatchoutError as exc:
            self.fail(exc, ref)
        except Exception:
            log.exception("unexpected error handling a message", extra=self.log_context())
            self.fail(InternalError(), ref)
        finally:
            if authenticates:
                self._authenticated()  # the token was accepted even if the message then failed

    def _within_rate(self, message: str | bytes) -> bool:
        """Token bucket; over the limit a message is refused, and sustained for a second, 4429.

        A flood still gets a message through each time a token refills, so an admitted message does
        not end a period of limiting; only a second without refusals does. A refused message with an
        `id` is answered each time (`ref`), others at most every 0.1 s; `retryAfterMs` is when the
        bucket has a token again.
        """
        s = self.services.settings
        now = self.clock.monotonic()
        self.tokens = min(float(s.rate_limit_burst), self.tokens + (now - self.refilled) * s.rate_limit_msgs_per_s)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        if now - self.refused_at > 1.0:
            self.limited_since = now
        self.refused_at = now
        if now - self.limited_since > 1.0:
            self.fail(RateLimited("message rate limit exceeded for too long"), None)
        else:
            ref = None if isinstance(message, bytes) else dropped_ref(message, self.services.limits)
            if ref is not None or now - self.limited_replied > 0.1:
                if ref is None:
                    self.limited_replied = now
                retry_ms = max(1, math.ceil((1.0 - self.tokens) * 1000 / s.rate_limit_msgs_per_s))
                self.peer.send(error_message("rate-limited", "too many messages; this one was dropped", ref,
                                             retry_after_ms=retry_ms))
        return False

    def fail(self, exc: WatchoutError, ref: str | None) -> None:
        """The one place where core errors become an `error` reply (a ReplyError) or a reply and a close (a
        Disconnect, with its close code)."""
        if isinstance(exc, (Unauthenticated, AuthTimeout)):
            self.services.metrics.auth_failures.labels(exc.code).inc()
        peer = self.peer
        peer.send(error_message(exc.code, exc.message, ref or exc.ref))
        if isinstance(exc, Disconnect):
            if self.close_cause is None:
                self.close_cause = exc.code  # logged, with the close code, when the connection has closed
            peer.close(exc.close_code, exc.message)
        elif not isinstance(exc, StoreUnavailable) and self._strike():
            peer.send(error_message("too-many-errors", "too many invalid messages"))
            peer.outbox.flush()
            peer.close(CloseCode.POLICY, "too many invalid messages")

    def _strike(self) -> bool:
        now = self.clock.monotonic()
        if self.bad is None:
            self.bad = deque(maxlen=self.services.settings.max_bad_messages)
        self.bad.append(now)
        return len(self.bad) == self.bad.maxlen and now - self.bad[0] < BAD_MESSAGE_WINDOW_S
