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
    """Base class; used as-is it means an unexpected internal failure.

    `close_code` None means a WebSocket gets an `error` reply and stays open.
    """

    code = "internal"
    http_status = 500
    close_code: CloseCode | None = CloseCode.INTERNAL
    ref: str | None = None  # the `id` of the client message that caused it, when known

    def __init__(self, message: str = "internal error", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidMessage(WatchoutError):
    code = "invalid-message"
    http_status = 400
    close_code = None


class Unauthenticated(WatchoutError):
    code = "unauthenticated"
    http_status = 401
    close_code = CloseCode.UNAUTHENTICATED


class AuthTimeout(WatchoutError):
    code = "auth-timeout"
    http_status = 401
    close_code = CloseCode.AUTH_TIMEOUT


class Forbidden(WatchoutError):
    code = "forbidden"
    http_status = 403
    close_code = CloseCode.FORBIDDEN


class NotFound(WatchoutError):
    code = "not-found"
    http_status = 404
    close_code = None


class StreamBusy(WatchoutError):
    code = "stream-busy"
    http_status = 409
    close_code = CloseCode.REPLACED


class TooLarge(WatchoutError):
    code = "too-large"
    http_status = 413
    close_code = CloseCode.TOO_BIG


class RateLimited(WatchoutError):
    code = "rate-limited"
    http_status = 429
    close_code = CloseCode.RATE_LIMITED


class SlowConsumer(WatchoutError):
    code = "slow-consumer"
    http_status = 503
    close_code = CloseCode.SLOW_CONSUMER


class StoreUnavailable(WatchoutError):
    """The database did not answer; the client may retry the same message (alerts are idempotent by `id`)."""

    code = "store-unavailable"
    http_status = 503
    close_code = None


class WriterBusy(WatchoutError):
    """Another node holds the stream's alert writer lease (internal: the intake waits and tries again)."""

    code = "writer-busy"
    http_status = 503
    close_code = None


class ConfigError(Exception):
    """Bad configuration: start-up stops with this message, which names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
