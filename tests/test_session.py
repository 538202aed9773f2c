"""A connection's policy driven without a socket: a recording writer and a clock the test moves."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from watchout.services import Services, open_services
from watchout.session import Clock, Session
from watchout.settings import Settings

Token = Callable[..., str]


class FakeTimer:
    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(Clock):
    """Monotonic and wall time that move only when the test says; timers fire as `advance` passes them."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = time.time()
        self.timers: list[FakeTimer] = []

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.mono + delay_s, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        target = self.mono + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.due <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.due)
            self.timers.remove(timer)
            self._move_to(timer.due)
            timer.callback()
        self._move_to(target)

    def _move_to(self, mono: float) -> None:
        self.wall += mono - self.mono
        self.mono = mono


class RecordingWriter:
    """The socket side of the outbox: keeps what was written and the close."""

    is_compressed = True  # the outbox then writes each message's payload, not pre-built WebSocket frames

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def write_wire(self, data: bytes) -> asyncio.Future[None] | None:
        raise AssertionError("a compressed writer gets payloads")

    def write_payload(self, payload: bytes, binary: bool) -> asyncio.Future[None] | None:
        if self.closed is not None:
            return None
        self.messages.append(json.loads(payload))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def close_with(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = (code, reason)


class Conn:
    def __init__(self, services: Services, clock: FakeClock, authorization: str = "") -> None:
        self.writer = RecordingWriter()
        self.session = Session(services, clock)
        self.session.open(self.writer, authorization)

    @property
    def close_code(self) -> int | None:
        return None if self.writer.closed is None else self.writer.closed[0]

    async def send(self, message: dict[str, Any] | str) -> list[dict[str, Any]]:
        """Hand the session one message; returns what it wrote back (after this loop turn's flush)."""
        pending = self.session.receive(json.dumps(message) if isinstance(message, dict) else message)
        if pending is not None:
            await pending
        return await self.written()

    async def written(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0)
        out, self.writer.messages = self.writer.messages, []
        return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    policy = dataclasses.replace(settings, rate_limit_msgs_per_s=1.0, rate_limit_burst=1, max_bad_messages=3)
    async with open_services(policy) as opened:
        yield opened


async def test_no_token_within_the_auth_timeout_closes_4408(services: Services, clock: FakeClock) -> None:
    conn = Conn(services, clock)
    clock.advance(services.settings.auth_timeout_s - 0.1)
    assert conn.close_code is None
    clock.advance(0.2)
    assert conn.close_code == 4408
    assert [m["code"] for m in await conn.written()] == ["auth-timeout"]


async def test_a_bearer_header_stops_the_auth_timeout(services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token()}")
    clock.advance(services.settings.auth_timeout_s + 1)
    assert conn.close_code is None
    assert conn.session.peer.principal is not None


@pytest.mark.parametrize("message", [{"type": "ping", "id": "m1"},
                                     {"type": "unsubscribe", "streamId": "cam", "id": "m1"}])
async def test_a_first_message_without_a_token_gets_token_missing(
        services: Services, clock: FakeClock, message: dict[str, Any]) -> None:
    conn = Conn(services, clock)
    replies = await conn.send(message)
    assert [(m["code"], m.get("ref")) for m in replies] == [("token-missing", "m1")]
    assert conn.close_code == 4401


async def test_subscribe_without_a_token_first_gets_token_missing(services: Services, clock: FakeClock) -> None:
    conn = Conn(services, clock)
    replies = await conn.send({"type": "subscribe", "streamId": "cam", "clientType": "dashboard", "id": "s1"})
    assert [(m["code"], m.get("ref")) for m in replies] == [("token-missing", "s1")]


async def test_bad_messages_close_1008_after_max_bad_messages(
        services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token()}")
    for _ in range(services.settings.max_bad_messages - 1):
        clock.advance(1.5)  # under the rate limit
        assert [m["code"] for m in await conn.send("{not json")] == ["invalid-json"]
        assert conn.close_code is None
    clock.advance(1.5)
    assert [m["code"] for m in await conn.send("{not json")] == ["invalid-json", "too-many-errors"]
    assert conn.close_code == 1008


async def test_over_the_rate_limit_messages_are_refused_with_ref_then_4429_after_a_second(
        services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token()}")  # 1 message a second, a burst of 1
    assert await conn.send({"type": "ping", "id": "a"}) == [{"type": "pong", "ref": "a"}]
    refused = await conn.send({"type": "ping", "id": "b"})
    assert [(m["code"], m["ref"], m["retryAfterMs"]) for m in refused] == [("rate-limited", "b", 1000)]
    clock.advance(0.5)
    refused = await conn.send({"type": "ping", "id": "c"})
    assert [(m["code"], m["ref"], m["retryAfterMs"]) for m in refused] == [("rate-limited", "c", 500)]
    clock.advance(0.6)  # a token refilled: let through, but the limiting goes on
    assert await conn.send({"type": "ping", "id": "d"}) == [{"type": "pong", "ref": "d"}]
    assert conn.close_code is None
    replies = await conn.send({"type": "ping", "id": "e"})
    assert conn.close_code == 4429
    assert [m["code"] for m in replies] == ["rate-limited"]


async def test_a_second_without_refusals_ends_the_limiting(
        services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token()}")
    await conn.send({"type": "ping", "id": "a"})
    assert [m["code"] for m in await conn.send({"type": "ping", "id": "b"})] == ["rate-limited"]
    clock.advance(1.5)
    assert await conn.send({"type": "ping", "id": "c"}) == [{"type": "pong", "ref": "c"}]
    assert [m["code"] for m in await conn.send({"type": "ping", "id": "d"})] == ["rate-limited"]
    assert conn.close_code is None


async def test_an_expired_token_closes_4401_after_the_grace(
        services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token(ttl_s=60)}")
    clock.advance(58)
    assert conn.close_code is None
    clock.advance(3 + services.settings.token_expiry_grace_s)
    assert conn.close_code == 4401
    assert [m["code"] for m in await conn.written()] == ["token-expired"]


async def test_auth_with_a_fresh_token_keeps_the_connection_open(
        services: Services, clock: FakeClock, token: Token) -> None:
    conn = Conn(services, clock, f"Bearer {token(ttl_s=60)}")
    clock.advance(30)
    replies = await conn.send({"type": "auth", "token": token(ttl_s=3600), "id": "r"})
    assert [(m["type"], m["ref"]) for m in replies] == [("authenticated", "r")]
    clock.advance(120)
    assert conn.close_code is None
    clock.advance(3600)
    assert conn.close_code == 4401
