"""Log output as `watchout serve` writes it: no token in a full session, one line per event, context on each line."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import Client, Server, alert_message, frame_message, producer, replace_settings, start_server, watcher
from rawws import RawClient
from watchout.auth import mint_token
from watchout.errors import StoreUnavailable
from watchout.logs import setup_logging
from watchout.settings import Settings
from watchout.store.sqlite import SQLiteStore

Connect = Callable[..., Awaitable[Client]]
Token = Callable[..., str]
Api = Callable[..., Awaitable[Any]]
OTHER_SECRET = "not-the-server-key-0123456789abcdef0123456789"
GARBAGE = "opaque-garbage-credential-42"
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}")
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: ")


class Recorder(logging.Handler):
    """Counts what reaches the root logger's handlers, to hold the output to one line (or object) per record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def installed_logging(log_format: str) -> Iterator[tuple[io.StringIO, Recorder]]:
    """setup_logging as the CLI calls it, writing to a buffer instead of stderr; restored afterwards.

    Set up and restored within the test's own phase, so pytest's capture handlers are left as they were.
    """
    root, access = logging.getLogger(), logging.getLogger("tornado.access")
    saved = (root.handlers[:], root.level, access.level)
    out, recorder = io.StringIO(), Recorder()
    with contextlib.redirect_stderr(out):
        setup_logging(log_format, "debug")
    root.addHandler(recorder)
    try:
        yield out, recorder
    finally:
        handlers, root_level, access_level = saved
        root.handlers[:] = handlers
        root.setLevel(root_level)
        access.setLevel(access_level)


@dataclass
class Session:
    """What a session used (every credential) and the connection ids the server gave."""

    secrets: list[str] = field(default_factory=list)
    conns: dict[str, str] = field(default_factory=dict)


async def run_session(server: Server, ws_connect: Connect, token: Token, api: Api) -> Session:
    """Register, subscribe, frames, an alert and its acknowledgement, REST calls, a token in the upgrade URL,
    a refresh, a bad, an expired and a garbage token, a refused subscribe and register; then every close."""
    session = Session()

    def minted(*args: Any, **kwargs: Any) -> str:
        session.secrets.append(token(*args, **kwargs))
        return session.secrets[-1]

    in_url = minted("alice", ttl_s=3599)
    phone = await ws_connect(f"{server.ws_url}?token={in_url}")
    await phone.send({"type": "register", "clientType": "mobile", "streamId": "cam", "token": minted("alice"),
                      "consumes": ["alert"]})
    session.conns["phone"] = (await phone.recv_type("registered"))["connectionId"]
    dash = await watcher(ws_connect, minted, "cam")
    ml = await watcher(ws_connect, minted, "cam", client_type="ml-service", consumes=["video-frame"],
                       sub="detector", role="service", streams=["cam"])
    for i in range(3):
        await phone.send(frame_message("cam", timestamp=i))
    await dash.recv_type("video-frame")
    await ml.send(alert_message("cam"))
    alert_id = (await ml.recv_type("ack"))["alertId"]
    await phone.recv_type("alert")
    await dash.send({"type": "auth", "token": minted("alice", ttl_s=3601)})
    await dash.recv_type("authenticated")

    assert (await api("GET", "/api/streams", token=minted("alice", ttl_s=3602))).status == 200
    assert (await api("GET", "/api/streams/cam/alerts", token=minted("alice", ttl_s=3602))).status == 200
    assert (await api("POST", f"/api/alerts/{alert_id}/ack", token=minted("alice", ttl_s=3602))).status == 200
    assert (await api("GET", f"/api/streams?token={in_url}", token=minted("alice", ttl_s=3602))).status == 400
    assert (await api("GET", "/api/streams", token=GARBAGE)).status == 401

    other_key = mint_token(OTHER_SECRET, "HS256", "alice", "user")
    expired = minted("alice", ttl_s=-60)
    session.secrets += [other_key, GARBAGE]
    for name, credential in (("bad", other_key), ("expired", expired), ("garbage", GARBAGE)):
        ws = await ws_connect()
        await ws.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": credential})
        assert (await ws.closed())[0] == 4401, name
    ws = await ws_connect(headers={"Authorization": f"Bearer {other_key}"})
    assert (await ws.closed())[0] == 4401
    bob = await ws_connect()
    await bob.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": minted("bob")})
    assert (await bob.recv_type("error"))["code"] == "not-found"  # refused, and the connection stays
    await bob.send({"type": "register", "clientType": "mobile", "streamId": "cam", "token": minted("bob")})
    assert (await bob.closed())[0] == 4403

    phone.conn.close(1000, "done")
    dash.conn.close(1001, "page closed")
    ml.conn.close()
    for _ in range(500):
        if not server.services.hub.peers:
            break
        await asyncio.sleep(0.01)
    assert not server.services.hub.peers
    return session


def assert_no_credential(output: str, session: Session) -> None:
    for secret in session.secrets:
        assert secret not in output
        if secret.count(".") == 2:
            assert secret.rsplit(".", 1)[1] not in output  # the signature alone
    assert not JWT_LIKE.search(output), JWT_LIKE.search(output)
    values = re.findall(r"token=(\S{0,10})", output)
    assert values, "the session logged no URL with a token"
    assert all(v.startswith("[redacted]") for v in values), values


def text_events(output: str) -> list[str]:
    """The output as events: one header line each, plus the traceback lines that follow one."""
    events: list[str] = []
    in_traceback = False
    for line in output.splitlines():
        if TEXT_LINE.match(line):
            events.append(line)
            in_traceback = False
        elif events and (line == "Traceback (most recent call last):" or in_traceback):
            events[-1] += "\n" + line
            in_traceback = True
        else:
            raise AssertionError(f"a line that starts no event and is no traceback: {line!r}")
    return events


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_full_session_logs_no_token(
        server: Server, ws_connect: Connect, token: Token, api: Api, log_format: str) -> None:
    with installed_logging(log_format) as (out, recorder):
        session = await run_session(server, ws_connect, token, api)
    output = out.getvalue()
    assert "producer registered" in output and "/ws?token=[redacted]" in output, output
    assert_no_credential(output, session)


async def test_json_lines_are_objects_with_connection_user_and_stream(
        server: Server, ws_connect: Connect, token: Token, api: Api) -> None:
    with installed_logging("json") as (out, recorder):
        session = await run_session(server, ws_connect, token, api)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(recorder.records)
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines]
    for entry in entries:
        assert isinstance(entry, dict) and {"ts", "level", "logger", "msg"} <= entry.keys(), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), entry
        if entry["logger"] in ("watchout.socket", "watchout.relay"):
            assert "conn" in entry, entry  # every line about a connection says which

    def only(msg: str, **fields: Any) -> dict[str, Any]:
        found = [e for e in entries if e["msg"].startswith(msg) and all(e.get(k) == v for k, v in fields.items())]
        assert len(found) == 1, (msg, fields, [e for e in entries if e["logger"].startswith("watchout")])
        return found[0]

    phone = session.conns["phone"]
    assert only("producer registered")["level"] == "info"
    assert only("producer registered", conn=phone, user="alice", stream="cam")
    assert only("consumer subscribed", user="detector", stream="cam")["conn"] != phone
    assert only("connection closed: 1000 by the client", conn=phone, user="alice", stream="cam")
    assert only("connection closed: 1001 by the client", user="alice", stream="cam")["level"] == "info"
    assert only("connection closed: 1006 without a close code", user="detector", stream="cam")
    assert only("connection closed: 4401 token-expired", stream="cam")["level"] == "info"
    assert len([e for e in entries if e["msg"].startswith("connection closed: 4401 token-invalid")]) == 3
    refused = only("connection closed: 4403 forbidden", user="bob", stream="cam")
    assert refused["conn"] != phone and refused["logger"] == "watchout.socket"
    closes = [e for e in entries if e["msg"].startswith("connection closed")]
    opens = [e for e in entries if e["msg"] == "connection opened"]
    assert len(closes) == len(opens) == 8 and {e["conn"] for e in closes} == {e["conn"] for e in opens}
    assert not [e for e in entries if e["logger"].startswith("watchout") and e["level"] in ("warning", "error")]


async def test_text_lines_are_one_per_event(server: Server, ws_connect: Connect, token: Token, api: Api) -> None:
    with installed_logging("text") as (out, recorder):
        await run_session(server, ws_connect, token, api)
        session_events = text_events(out.getvalue())
        assert len(session_events) == len(recorder.records)
        assert all("\n" not in event for event in session_events)  # no traceback in a clean session
        start = len(out.getvalue())
        log = logging.getLogger("watchout.test_logs")
        log.warning("a message that spans\ntwo lines", extra={"conn": "c1", "user": "eve\nx"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed\r\nwhile testing", extra={"stream": "cam"})
    events = text_events(out.getvalue()[start:])
    assert len(events) == 2
    assert events[0].endswith(r"a message that spans\ntwo lines conn=c1 user=eve\nx")
    head, *traceback = events[1].splitlines()
    assert head.endswith(r"failed\r\nwhile testing stream=cam")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: boom"


class FailingStore(SQLiteStore):
    """The embedded store, failing the operations a test names."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.failing: set[str] = set()

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        if "insert_alerts" in self.failing:
            raise StoreUnavailable("database did not answer")
        return await super().insert_alerts(alerts)

    async def set_stream_status(self, stream_id: str, status: str, **kwargs: Any) -> None:
        if "set_stream_status" in self.failing:
            raise StoreUnavailable("database did not answer")
        await super().set_stream_status(stream_id, status, **kwargs)

    async def list_streams(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if "list_streams" in self.failing:
            raise RuntimeError("unexpected failure in the store")
        return await super().list_streams(*args, **kwargs)


async def test_failures_are_one_record_each_with_their_context(settings: Settings, token: Token) -> None:
    import tornado.httpclient
    import tornado.websocket
    store = FailingStore()
    await store.start()
    server, close = await start_server(settings, store)
    try:
        async def connect(url: str | None = None) -> Client:
            return Client(await tornado.websocket.websocket_connect(url or server.ws_url))

        with installed_logging("json") as (out, recorder):
            phone = await producer(connect, token, "cam")
            ml = await watcher(connect, token, "cam", client_type="ml-service", consumes=[],
                               sub="detector", role="service", streams=["cam"])
            store.failing = {"insert_alerts", "set_stream_status", "list_streams"}
            await phone.send(frame_message("cam"))
            await ml.send(alert_message("cam"))
            assert (await ml.recv_type("error"))["code"] == "store-unavailable"
            bearer = token("alice")
            response = await tornado.httpclient.AsyncHTTPClient().fetch(
                server.url("/api/streams"), headers={"Authorization": f"Bearer {bearer}"},
                raise_error=False)
            assert response.code == 500
            for _ in range(100):
                if any("stream status update failed" in r.getMessage() for r in recorder.records):
                    break
                await asyncio.sleep(0.01)
            store.failing = set()
            phone.close()
            ml.close()
    finally:
        await close()
    output = out.getvalue()
    entries = [json.loads(line) for line in output.splitlines()]
    assert len(entries) == len(recorder.records)
    by_msg = {e["msg"]: e for e in entries if e["logger"].startswith("watchout")}
    assert by_msg["1 alerts not stored: database did not answer"]["stream"] == "cam"
    assert by_msg["stream status update failed: database did not answer"]["stream"] == "cam"
    failed = by_msg["unexpected error: GET /api/streams (127.0.0.1)"]
    assert failed["level"] == "error" and failed["user"] == "alice"
    assert failed["exc"].endswith("RuntimeError: unexpected failure in the store")
    assert [e for e in entries if "exc" in e] == [failed], "the exception was logged more than once"
    assert bearer not in output and not JWT_LIKE.search(output)


async def test_a_slow_consumer_close_is_one_warning_with_its_connection(settings: Settings, token: Token) -> None:
    import tornado.websocket
    server, close = await start_server(replace_settings(settings, outbox_soft_bytes=64 * 1024,
                                                        outbox_hard_bytes=256 * 1024))
    try:
        async def connect(url: str | None = None) -> Client:
            return Client(await tornado.websocket.websocket_connect(url or server.ws_url))

        with installed_logging("json") as (out, recorder):
            phone = await producer(connect, token, "cam")
            ml = await watcher(connect, token, "cam", client_type="ml-service", consumes=[],
                               sub="detector", role="service", streams=["cam"])
            stalled = await asyncio.to_thread(RawClient, server.port)
            stalled.send_json({"type": "subscribe", "clientType": "dashboard", "streamId": "cam",
                               "token": token("alice")})
            await asyncio.to_thread(stalled.recv_frame)  # `subscribed`; it never reads again
            stalled_peer = list(server.services.hub.peers.values())[-1]
            for _ in range(500):
                if stalled_peer.outbox.is_closed:
                    break
                await ml.send(alert_message("cam", metadata={"note": "x" * 8000}))
                await ml.recv_type("ack")
            assert stalled_peer.outbox.is_closed
            stalled.close()
            for _ in range(500):
                if stalled_peer.id not in server.services.hub.peers:
                    break
                await asyncio.sleep(0.01)
        phone.close()
        ml.close()
    finally:
        await close()
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    closes = [e for e in entries if e["msg"].startswith("connection closed")]
    assert len(closes) == 1, closes
    assert closes[0]["level"] == "warning" and closes[0]["logger"] == "watchout.socket"
    assert re.fullmatch(r"connection closed: 4413 consumer too slow: outgoing buffer limit reached "
                        r"\(\d+ bytes unflushed\) after \d+\.\d s", closes[0]["msg"]), closes[0]
    context = {k: closes[0].get(k) for k in ("conn", "user", "stream")}
    assert context == {"conn": stalled_peer.id, "user": "alice", "stream": "cam"}
    assert not [e for e in entries if e["logger"] == "watchout.outbox"]
