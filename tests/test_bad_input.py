"""Bad input: each malformed message gets its documented error or close code, and the stream keeps flowing."""
from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import tornado.websocket

from conftest import JPEG, Client, alert_message, frame_message, replace_settings
from watchout.protocol import MAX_NESTING
from watchout.settings import Settings

STREAM = "cam-1"
Connect = Callable[..., Any]  # conftest's ws_connect
MakeToken = Callable[..., str]  # conftest's token
Message = dict[str, Any] | str | bytes
BIG_JPEG = JPEG * 3  # its JSON frame is past protocol.FAST_FRAME_MIN_CHARS: the spliced fast path


def with_settings(**changes: Any) -> pytest.MarkDecorator:
    """Run a test against a server with these settings (the module's `settings` fixture applies them)."""
    return pytest.mark.parametrize("settings", [changes], indirect=True,
                                   ids=[",".join(f"{k}={v}" for k, v in changes.items())])


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """By default enough strikes for one connection to send the whole table without a 1008."""
    return replace_settings(settings, **getattr(request, "param", {"max_bad_messages": 1000}))


def compact(message: dict[str, Any]) -> str:
    """JSON as clients send it for speed: no spaces, so a big frame takes the fast path."""
    return json.dumps(message, separators=(",", ":"))


def binary_frame(stream_id: bytes = STREAM.encode(), *, magic: bytes = b"WO", version: int = 1,
                 sid_len: int | None = None, jpeg: bytes = JPEG) -> bytes:
    """A binary frame in the watchout.frames layout, with any header field overridable."""
    length = len(stream_id) if sid_len is None else sid_len
    return struct.pack("!2sBBQHH", magic, version, length, 1764150000000, 640, 480) + stream_id + jpeg


def nested(depth: int) -> Any:
    """A metadata value `depth` levels deep as protocol.MAX_NESTING counts them (the scalar is a level)."""
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def without(message: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != key}


def alert_text(metadata_json: str) -> str:
    """An otherwise valid alert with hand-written metadata JSON (for what json.dumps cannot produce)."""
    return ('{"type":"alert","streamId":"%s","severity":"high","message":"m","timestamp":1764150000000,'
            '"metadata":%s}' % (STREAM, metadata_json))


def frame_text(timestamp_json: str) -> str:
    return '{"type":"video-frame","streamId":"%s","data":"%s","timestamp":%s}' % (
        STREAM, base64.b64encode(JPEG).decode(), timestamp_json)


DATA = base64.b64encode(JPEG).decode()
BIG_DATA = base64.b64encode(BIG_JPEG).decode()
UNSUBSCRIBE = {"type": "unsubscribe", "streamId": STREAM}


def case(name: str, message: dict[str, Any] | str | bytes, code: str) -> Any:
    """One row: (message, error code, expected ref).

    A dict gets `"id": name` and is sent as compact JSON (a big frame then takes the fast path); its reply
    must carry `ref: name`. Text and bytes are sent as they are and expect no ref.
    """
    if isinstance(message, dict):
        return pytest.param(compact({**message, "id": name}), code, name, id=name)
    return pytest.param(message, code, None, id=name)


def with_space(data: str) -> str:
    return data[:100] + " " + data[100:]


BAD_MESSAGES = [
    # not a JSON object
    case("invalid-json", '{"type": "ping"', "invalid-json"),
    case("trailing-garbage", '{"type": "ping"} x', "invalid-json"),
    case("json-array", '[{"type": "ping"}]', "not-an-object"),
    case("json-string", '"ping"', "not-an-object"),
    case("json-number", "42", "not-an-object"),
    case("json-null", "null", "not-an-object"),
    # strict JSON
    case("duplicate-key", '{"type": "ping", "type": "ping"}', "duplicate-key"),
    case("duplicate-key-in-metadata", alert_text('{"confidence": 0.5, "confidence": 0.9}'), "duplicate-key"),
    case("nan", frame_text("NaN"), "invalid-number"),
    case("infinity", frame_text("Infinity"), "invalid-number"),
    case("minus-infinity", frame_text("-Infinity"), "invalid-number"),
    case("float-overflow", frame_text("1e999"), "invalid-number"),
    case("100k-brackets", '{"type": "ping", "pad": ' + "[" * 100_000 + "]" * 100_000 + "}", "too-deep"),
    # type, id, fields
    case("missing-type", {"streamId": STREAM}, "missing-field"),
    case("non-string-type", {"type": 7}, "invalid-field"),
    case("unknown-type", {"type": "hello"}, "unknown-type"),
    case("unknown-field", {"type": "ping", "extra": 1}, "unknown-field"),
    case("id-not-a-string", '{"type": "ping", "id": 5}', "invalid-field"),
    case("id-empty", '{"type": "ping", "id": ""}', "invalid-field"),
    case("id-too-long", compact({"type": "ping", "id": "i" * 129}), "invalid-field"),
    case("id-lone-surrogate", '{"type": "ping", "id": "\\ud800"}', "invalid-field"),
    # register, subscribe, auth
    case("register-as-dashboard", {"type": "register", "clientType": "dashboard", "streamId": STREAM},
         "invalid-client-type"),
    case("subscribe-as-mobile", {"type": "subscribe", "clientType": "mobile", "streamId": STREAM},
         "invalid-client-type"),
    case("subscribe-client-type-not-a-string", {"type": "subscribe", "clientType": ["dashboard"],
                                                "streamId": STREAM}, "invalid-field"),
    case("produces-unknown-kind", {"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                                   "produces": ["audio"]}, "invalid-field"),
    case("subscribe-format-xml", {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                                  "format": "xml"}, "invalid-field"),
    case("consumes-not-a-list", {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                                 "consumes": "video-frame"}, "invalid-field"),
    case("since-seq-fraction", {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                                "sinceSeq": 1.5}, "invalid-field"),
    case("since-seq-negative", {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                                "sinceSeq": -1}, "invalid-field"),
    case("auth-without-token", {"type": "auth"}, "missing-field"),
    case("auth-token-not-a-string", {"type": "auth", "token": 42}, "invalid-field"),
    case("auth-token-lone-surrogate", {"type": "auth", "token": "\ud800"}, "invalid-field"),
    # streamId (on an otherwise valid unsubscribe)
    case("stream-id-missing", {"type": "unsubscribe"}, "missing-field"),
    case("stream-id-empty", {**UNSUBSCRIBE, "streamId": ""}, "invalid-stream-id"),
    case("stream-id-129-chars", {**UNSUBSCRIBE, "streamId": "s" * 129}, "invalid-stream-id"),
    case("stream-id-space", {**UNSUBSCRIBE, "streamId": "cam 1"}, "invalid-stream-id"),
    case("stream-id-slash", {**UNSUBSCRIBE, "streamId": "cam/1"}, "invalid-stream-id"),
    case("stream-id-unicode", {**UNSUBSCRIBE, "streamId": "cäm-1"}, "invalid-stream-id"),
    case("stream-id-leading-dash", {**UNSUBSCRIBE, "streamId": "-cam"}, "invalid-stream-id"),
    case("stream-id-number", {**UNSUBSCRIBE, "streamId": 42}, "invalid-stream-id"),
    case("unsubscribe-not-subscribed", {**UNSUBSCRIBE, "streamId": "other-cam"}, "not-subscribed"),
    # alert
    case("severity-not-in-enum", alert_message(STREAM, severity="urgent"), "invalid-severity"),
    case("severity-missing", without(alert_message(STREAM), "severity"), "invalid-severity"),
    case("alert-message-missing", without(alert_message(STREAM), "message"), "missing-field"),
    case("alert-message-too-long", alert_message(STREAM, message="m" * 2001), "invalid-field"),
    case("alert-message-lone-surrogate", alert_message(STREAM, message="bad \ud800"), "invalid-field"),
    case("alert-timestamp-missing", without(alert_message(STREAM), "timestamp"), "missing-field"),
    case("confidence-above-1", alert_message(STREAM, metadata={"confidence": 1.5}), "invalid-field"),
    case("confidence-not-a-number", alert_message(STREAM, metadata={"confidence": "high"}), "invalid-field"),
    case("metadata-not-an-object", alert_message(STREAM, metadata=[1, 2]), "invalid-field"),
    case("metadata-9-levels", alert_message(STREAM, metadata=nested(9)), "too-deep"),
    case("metadata-101-levels", alert_message(STREAM, metadata=nested(101)), "too-deep"),
    case("metadata-500-levels", alert_message(STREAM, metadata=nested(500)), "too-deep"),
    case("metadata-over-16-kib", alert_message(STREAM, metadata={"blob": "x" * 16 * 1024}),
         "metadata-too-large"),
    case("metadata-int-past-64-bits", alert_message(STREAM, metadata={"count": 10**30}), "invalid-field"),
    case("metadata-int-past-2**53", alert_message(STREAM, metadata={"count": 2**53}), "invalid-field"),
    case("object-type-not-a-string", alert_message(STREAM, metadata={"objectType": 7}), "invalid-field"),
    case("metadata-lone-surrogate", alert_message(STREAM, metadata={"\ud800": 1}), "invalid-field"),
    case("snapshot-not-base64", alert_message(STREAM, snapshot="not base64!"), "invalid-base64"),
    case("alert-for-unknown-stream", alert_message("nobody-cam"), "not-found"),
    # video-frame in JSON
    case("frame-data-not-base64", frame_message(STREAM, data="not base64!"), "invalid-base64"),
    case("frame-data-empty", frame_message(STREAM, data=""), "invalid-field"),
    case("frame-data-missing", without(frame_message(STREAM), "data"), "invalid-field"),
    case("frame-data-whitespace", frame_message(STREAM, data=with_space(DATA)), "invalid-base64"),
    case("frame-timestamp-missing", without(frame_message(STREAM), "timestamp"), "missing-field"),
    case("frame-timestamp-negative", frame_message(STREAM, timestamp=-1), "invalid-field"),
    case("frame-timestamp-string", {**frame_message(STREAM), "timestamp": "1"}, "invalid-field"),
    case("frame-width-over-65535", frame_message(STREAM, width=65536), "invalid-field"),
    case("frame-format-png", frame_message(STREAM, format="png"), "invalid-field"),
    # big JSON frames: the fast path, and its fallback to the general parser
    case("fast-frame-bad-stream-id", frame_message("cam 1", BIG_JPEG), "invalid-stream-id"),
    case("fast-frame-data-whitespace", frame_message(STREAM, data=with_space(BIG_DATA)), "invalid-base64"),
    case("fast-frame-duplicate-data", compact(frame_message(STREAM, BIG_JPEG))[:-1] + ',"data":"AAAA"}',
         "duplicate-key"),
    # binary frames
    case("binary-bad-magic", binary_frame(magic=b"XX"), "invalid-binary-frame"),
    case("binary-version-2", binary_frame(version=2), "invalid-binary-frame"),
    case("binary-shorter-than-header", binary_frame()[:17], "invalid-binary-frame"),
    case("binary-stream-id-length-0", binary_frame(sid_len=0), "invalid-binary-frame"),
    case("binary-stream-id-past-end", binary_frame(sid_len=128, jpeg=b""), "invalid-binary-frame"),
    case("binary-no-jpeg", binary_frame(jpeg=b""), "invalid-binary-frame"),
    case("binary-stream-id-not-ascii", binary_frame("cäm".encode()), "invalid-stream-id"),
    case("binary-stream-id-space", binary_frame(b"cam 1"), "invalid-stream-id"),
]


# ----------------------------------------------------------------------------- helpers

async def open_stream(ws_connect: Connect, token: MakeToken) -> tuple[Client, Client]:
    """A registered producer of STREAM and a dashboard watching it (both alice's)."""
    producer = await ws_connect()
    await producer.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token()})
    await producer.recv_type("registered")
    dashboard = await ws_connect()
    await dashboard.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                          "token": token()})
    await dashboard.recv_type("subscribed")
    return producer, dashboard


async def open_attacker(ws_connect: Connect, token: MakeToken) -> Client:
    """Alice again, on the same stream, watching alerts only so it receives no frames."""
    attacker: Client = await ws_connect()
    await attacker.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                         "consumes": ["alert"], "token": token()})
    await attacker.recv_type("subscribed")
    return attacker


async def relay_frame(producer: Client, dashboard: Client, timestamp: int) -> None:
    """The producer sends one frame; it must be the next frame the dashboard gets."""
    await producer.send(frame_message(STREAM, timestamp=timestamp))
    frame = await dashboard.recv_type("video-frame")
    assert (frame["timestamp"], frame["streamId"], frame["data"]) == (timestamp, STREAM, DATA)


async def send_and_expect_close(client: Client, message: Message) -> tuple[str, int | None]:
    """Send; returns the code of the error reply and the close code that follows it."""
    await client.send(message)
    reply = await client.recv_type("error")
    code, _ = await client.closed()
    return reply["code"], code


# ----------------------------------------------------------------------------- error replies

async def test_bad_message_table_is_large_and_distinct() -> None:
    messages = [p.values[0] for p in BAD_MESSAGES]
    assert len(BAD_MESSAGES) >= 30
    assert len(set(messages)) == len(messages)


@pytest.mark.parametrize("message, code, ref", BAD_MESSAGES)
async def test_bad_message_gets_its_error_code_and_the_connection_stays(
        ws_connect: Connect, token: MakeToken, message: Message, code: str, ref: str | None) -> None:
    client = await ws_connect()
    await client.send({"type": "auth", "token": token()})
    assert (await client.recv())["type"] == "authenticated"
    await client.send(message)
    reply = await client.recv()
    assert (reply["type"], reply["code"], reply.get("ref")) == ("error", code, ref)
    await client.send({"type": "ping", "id": "still-open"})
    assert await client.recv() == {"type": "pong", "ref": "still-open"}


async def test_every_bad_message_is_answered_while_a_dashboard_gets_every_frame(
        ws_connect: Connect, token: MakeToken) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    attacker = await open_attacker(ws_connect, token)
    for n, row in enumerate(BAD_MESSAGES, start=1):
        message, code, ref = row.values
        await attacker.send(message)
        await producer.send(frame_message(STREAM, timestamp=n))  # in flight together with the bad message
        reply = await attacker.recv_type("error")
        assert (reply["code"], reply.get("ref")) == (code, ref), row.id
        frame = await dashboard.recv_type("video-frame")
        assert (frame["timestamp"], frame["data"]) == (n, DATA), f"frame {n} missing after {row.id}"
    await attacker.send({"type": "ping", "id": "after-table"})
    assert (await attacker.recv_type("pong"))["ref"] == "after-table"
    await relay_frame(producer, dashboard, len(BAD_MESSAGES) + 1)


async def test_alert_metadata_at_the_nesting_limit_is_stored_and_relayed(
        ws_connect: Connect, token: MakeToken) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    ml = await ws_connect()
    await ml.send({"type": "auth", "token": token()})
    await ml.recv_type("authenticated")
    metadata = nested(MAX_NESTING)
    await ml.send(alert_message(STREAM, metadata=metadata, id="deepest"))
    assert (await ml.recv_type("ack"))["ref"] == "deepest"
    assert (await dashboard.recv_type("alert"))["metadata"] == metadata
    await ml.send(alert_message(STREAM, metadata=nested(MAX_NESTING + 1), id="too-deep"))
    assert (await ml.recv_type("error"))["code"] == "too-deep"


# ----------------------------------------------------------------------------- closes

@pytest.mark.parametrize("frame", [frame_message(STREAM), binary_frame()], ids=["json", "binary"])
async def test_frame_for_a_stream_not_produced_closes_4403_and_the_stream_flows_on(
        ws_connect: Connect, token: MakeToken, frame: dict[str, Any] | bytes) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    attacker = await open_attacker(ws_connect, token)
    assert await send_and_expect_close(attacker, frame) == ("not-producer", 4403)
    await relay_frame(producer, dashboard, 1)


@pytest.mark.parametrize("frame", [frame_message(STREAM), binary_frame()], ids=["json", "binary"])
async def test_frame_before_any_authentication_closes_4401(
        ws_connect: Connect, token: MakeToken, frame: dict[str, Any] | bytes) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    stranger = await ws_connect()
    assert await send_and_expect_close(stranger, frame) == ("token-missing", 4401)
    await relay_frame(producer, dashboard, 1)


@with_settings(max_bad_messages=10)
async def test_tenth_bad_message_within_a_minute_closes_1008(ws_connect: Connect, token: MakeToken) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    client = await ws_connect()
    await client.send({"type": "auth", "token": token()})
    assert (await client.recv())["type"] == "authenticated"
    for n in range(1, 10):
        await client.send({"type": "hello", "id": f"bad-{n}"})
        reply = await client.recv()
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "unknown-type", f"bad-{n}")
    await client.send({"type": "ping", "id": "ninth-strike-still-open"})
    assert (await client.recv())["ref"] == "ninth-strike-still-open"
    await client.send({"type": "hello", "id": "bad-10"})
    assert [(await client.recv())["code"] for _ in range(2)] == ["unknown-type", "too-many-errors"]
    assert (await client.closed())[0] == 1008
    await relay_frame(producer, dashboard, 1)


@with_settings(max_control_message_bytes=4096)
@pytest.mark.parametrize("message", [
    {"type": "ping", "pad": "x" * 5000},
    {"type": "alert", "streamId": STREAM, "severity": "high", "message": "m" * 5000, "timestamp": 1},
    # '"video-frame"' early in the text must not buy a control message the frame size limit
    {"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "consumes": ["video-frame"],
     "userId": "u" * 5000},
], ids=["ping", "alert", "subscribe-naming-video-frame"])
async def test_control_message_over_max_control_message_bytes_closes_1009(
        ws_connect: Connect, token: MakeToken, message: dict[str, Any]) -> None:
    client = await ws_connect()
    await client.send({"type": "auth", "token": token()})
    await client.recv_type("authenticated")
    assert await send_and_expect_close(client, message) == ("too-large", 1009)


@with_settings(max_message_bytes=64 * 1024)
async def test_message_over_max_message_bytes_closes_1009(ws_connect: Connect, token: MakeToken) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    await relay_frame(producer, dashboard, 1)
    await producer.send(frame_message(STREAM, JPEG * 40, timestamp=2))  # ~110 KB of base64
    assert (await producer.closed())[0] == 1009
    assert (await dashboard.recv_type("status"))["status"] == "offline"


@with_settings(auth_timeout_s=0.3)
async def test_no_authentication_within_auth_timeout_closes_4408(ws_connect: Connect) -> None:
    client = await ws_connect()
    started = asyncio.get_running_loop().time()
    assert (await client.recv())["code"] == "auth-timeout"
    assert (await client.closed())[0] == 4408
    assert asyncio.get_running_loop().time() - started >= 0.25


@with_settings(rate_limit_msgs_per_s=50, rate_limit_burst=10)
async def test_sustained_flood_gets_rate_limited_replies_then_4429_while_the_stream_flows(
        ws_connect: Connect, token: MakeToken) -> None:
    producer, dashboard = await open_stream(ws_connect, token)
    attacker = await open_attacker(ws_connect, token)
    replies: list[dict[str, Any]] = []

    async def read_until_closed() -> None:
        while (raw := await attacker.recv_raw(timeout=5)) is not None:
            replies.append(json.loads(raw))

    loop = asyncio.get_running_loop()
    reading = asyncio.create_task(read_until_closed())
    started = loop.time()
    frames = 0
    while not reading.done() and loop.time() - started < 4:
        try:
            for _ in range(20):  # ~500 messages/s against a limit of 50/s
                await attacker.send({"type": "ping"})
        except tornado.websocket.WebSocketClosedError:
            break
        frames += 1  # the producer stays under the limit: ~25 frames/s
        await relay_frame(producer, dashboard, frames)
        await asyncio.sleep(0.04)
    await reading
    closed_after = loop.time() - started

    assert attacker.conn.close_code == 4429
    assert closed_after >= 1.0, "closed before the flood had lasted a second"
    codes = [r["code"] for r in replies if r["type"] == "error"]
    assert len(codes) >= 2 and set(codes) == {"rate-limited"}
    assert sum(r["type"] == "pong" for r in replies) <= 10 + 50 * closed_after + 5
    for _ in range(3):
        frames += 1
        await relay_frame(producer, dashboard, frames)
