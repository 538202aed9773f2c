"""The one error hierarchy: each error knows its stable code, HTTP status and WebSocket close code."""
from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """Every WebSocket close the server makes (docs/protocol.md, "Close codes"); private ones are 4000 + the
    nearest HTTP status."""

    NORMAL = 1000  # also a ping timeout and a producer gone silent: it may reconnect at once
    GOING_AWAY = 1001  # server shutting down
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007  # invalid UTF-8, or compressed data that does not inflate
    POLICY = 1008  # too many invalid messages
    TOO_BIG = 1009
    INTERNAL = 1011
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    AUTH_TIMEOUT = 4408
    REPLACED = 4409  # a newer producer took the stream
    STREAM_DELETED = 4410
    SLOW_CONSUMER = 4413
    RATE_LIMITED = 4429


class WatchoutError(Exception):
    """Base class: a stable code, an HTTP status and a message. Raise one of its two kinds.

    Over a WebSocket a `ReplyError` is answered with an `error` reply and the connection stays open; a
    `Disconnect` is answered the same way, then the connection closes with its `close_code` (centrifuge's
    Error/Disconnect split). `watchout.session.Session.fail` is the one place that tells them apart.
    """

    code = "internal"
    http_status = 500
    ref: str | None = None  # the `id` of the client message that caused it, when known

    def __init__(self, message: str = "internal error", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ReplyError(WatchoutError):
    """An error the client is told of; its connection stays open."""


class Disconnect(WatchoutError):
    """An error that closes the connection, with this close code."""

    close_code: CloseCode = CloseCode.INTERNAL


class InternalError(Disconnect):
    """An unexpected failure (logged where it was caught): 500, or close 1011."""


class InvalidMessage(ReplyError):
    code = "invalid-message"
    http_status = 400


class Unauthenticated(Disconnect):
    code = "unauthenticated"
    http_status = 401
    close_code = CloseCode.UNAUTHENTICATED


class AuthTimeout(Disconnect):
    code = "auth-timeout"
    http_status = 401
    close_code = CloseCode.AUTH_TIMEOUT


class Forbidden(Disconnect):
    code = "forbidden"
    http_status = 403
    close_code = CloseCode.FORBIDDEN


class NotFound(ReplyError):
    code = "not-found"
    http_status = 404


class StreamBusy(Disconnect):
    code = "stream-busy"
    http_status = 409
    close_code = CloseCode.REPLACED


class TooLarge(Disconnect):
    code = "too-large"
    http_status = 413
    close_code = CloseCode.TOO_BIG


class RateLimited(Disconnect):
    code = "rate-limited"
    http_status = 429
    close_code = CloseCode.RATE_LIMITED


class SlowConsumer(Disconnect):
    code = "slow-consumer"
    http_status = 503
    close_code = CloseCode.SLOW_CONSUMER


class StoreUnavailable(ReplyError):
    """The database did not answer; the client may retry the same message (alerts are idempotent by `id`)."""

    code = "store-unavailable"
    http_status = 503


class WriterBusy(ReplyError):
    """Another node holds the stream's alert writer lease (internal: the intake waits and tries again)."""

    code = "writer-busy"
    http_status = 503


class ConfigError(Exception):
    """Bad configuration: start-up stops with this message, which names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
