"""RFC 6455 edges on /ws, driven byte by byte: each protocol error gets its close frame (1002, 1007, 1009)
rather than a dropped connection, the close handshake completes, the server records the code it sent, and
the other clients of the server carry on."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from conftest import Client, Server, frame_message, producer, replace_settings, watcher
from watchout.settings import Settings

STREAM = "cam-1"
Connect = Callable[..., Any]  # conftest's ws_connect
MakeToken = Callable[..., str]  # conftest's token
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN, RSV1, RSV2, RSV3 = 0x80, 0x40, 0x20, 0x10
MAX_MESSAGE_BYTES = 64 * 1024


def frame(payload: bytes, opcode: int, *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame exactly as given: any opcode, RSV bits, FIN, masked or not."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    head = bytes([(FIN if fin else 0) | rsv | opcode])
    if n < 126:
        head += bytes([mask_bit | n])
    elif n <= 0xFFFF:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + mask_bytes(payload, mask)


def mask_bytes(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR with the 4-byte mask, starting `offset` bytes into the masked payload."""
    key = (mask[offset % 4:] + mask[:offset % 4]) * (len(data) // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:len(data)], "big")).to_bytes(len(data), "big")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWs:
    """A WebSocket client made of bytes on asyncio streams: it writes any frame it is given and reads the
    server's frames as they are, so a test sees the close frame, or the reset, that a real client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deflate: bool) -> None:
        self.reader, self.writer = reader, writer
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -15) if deflate else None
        self.inflater = zlib.decompressobj(-15) if deflate else None

    @classmethod
    async def connect(cls, port: int, deflate: bool = False) -> RawWs:
        """Handshake; with `deflate`, offer permessage-deflate and insist that the server takes it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        offer = b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else b""
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (port, key, offer))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        assert b"\r\nSec-Websocket-Accept: " + accept + b"\r\n" in head, head
        assert (b"\r\nSec-Websocket-Extensions: permessage-deflate" in head) == deflate, head
        return cls(reader, writer, deflate)

    def deflate(self, data: bytes) -> bytes:
        """A message's payload as permessage-deflate sends it (RFC 7692 7.2.1: without the 00 00 ff ff tail)."""
        assert self.compressor is not None
        out = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(b"\0\0\xff\xff")
        return out[:-4]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload). Servers never mask, and this checks it."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            compressed = self.inflater is not None and b0 & 0x0F in (OP_TEXT, OP_BINARY) and bool(b0 & RSV1)
            assert b0 & 0x70 == (RSV1 if compressed else 0), f"RSV bits from the server: {b0:#x}"
            assert not b1 & 0x80, "a masked frame from the server"
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(n)
            if compressed:
                assert self.inflater is not None
                payload = self.inflater.decompress(payload + b"\0\0\xff\xff")
            return b0 & 0x0F, payload
        return await asyncio.wait_for(read(), timeout)

    async def recv_close(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Skip frames up to the server's close frame; its (code, reason). Raises on EOF or reset."""
        while True:
            opcode, payload = await self.recv(timeout)
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode()

    async def eof(self, timeout: float = 2.0) -> None:
        """Wait for the server to close TCP, reading nothing more than the end (a reset raises)."""
        rest = await asyncio.wait_for(self.reader.read(), timeout)
        assert rest == b"", f"data after the close frame: {rest[:40]!r}"

    def abort(self) -> None:
        self.writer.transport.abort()


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    return replace_settings(settings, max_message_bytes=MAX_MESSAGE_BYTES, max_control_message_bytes=16 * 1024,
                            **getattr(request, "param", {}))


@pytest.fixture
async def stream(ws_connect: Connect, token: MakeToken) -> AsyncIterator[tuple[Client, Client]]:
    """A phone and a dashboard on STREAM, connected before the bad client arrives; frames flow at the end."""
    phone = await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    await relays(phone, dash, 1)
    yield phone, dash
    await relays(phone, dash, 2)


async def relays(phone: Client, dash: Client, timestamp: int) -> None:
    await phone.send(frame_message(STREAM, timestamp=timestamp))
    assert (await dash.recv_type("video-frame"))["timestamp"] == timestamp


async def closes_counted(server: Server, code: int) -> float:
    """watchout_connections_closed_total{code} as /metrics shows it."""
    body = (await AsyncHTTPClient().fetch(server.url("/metrics"))).body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "watchout_connections_closed_total" and sample.labels == {"code": str(code)}:
                return float(sample.value)
    return 0.0


async def closed_lines(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[str]:
    """The server's `connection closed` log lines, once `count` of them are there."""
    for _ in range(300):
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "watchout.socket" and r.getMessage().startswith("connection closed")]
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} close lines: {lines}")


@pytest.fixture
def closes_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="watchout.socket")
    return caplog


async def expect_close(raw: RawWs, code: int, answer: bool = True) -> str:
    """The server answers with a close frame of `code`; the client completes the handshake (`answer`; not
    when its bad frame was its own close) and the server then closes TCP at once, without waiting out its
    linger timeout. Returns the reason."""
    got, reason = await raw.recv_close()
    assert got == code, (got, reason)
    if answer:
        await raw.send(frame(close_payload(code), OP_CLOSE))
    await raw.eof(timeout=2.0)
    return reason


# ------------------------------------------------------------------ 1002 and 1007 for protocol errors
PROTOCOL_ERRORS = {
    "unmasked-text": (frame(b'{"type":"ping"}', OP_TEXT, masked=False), 1002),
    "unmasked-close": (frame(close_payload(1000), OP_CLOSE, masked=False), 1002),
    "rsv1-without-extension": (frame(b'{"type":"ping"}', OP_TEXT, rsv=RSV1), 1002),
    "rsv2": (frame(b'{"type":"ping"}', OP_TEXT, rsv=RSV2), 1002),
    "rsv3-on-ping": (frame(b"", OP_PING, rsv=RSV3), 1002),
    "fragmented-ping": (frame(b"p", OP_PING, fin=False), 1002),
    "ping-over-125-bytes": (frame(b"p" * 126, OP_PING), 1002),
    "close-over-125-bytes": (frame(close_payload(1000, b"r" * 124), OP_CLOSE), 1002),
    "opcode-3": (frame(b"x", 0x3), 1002),
    "opcode-7": (frame(b"x", 0x7), 1002),
    "opcode-0xb": (frame(b"x", 0xB), 1002),
    "opcode-0xf": (frame(b"", 0xF), 1002),
    "continuation-without-a-message": (frame(b"x", OP_CONT), 1002),
    "new-message-inside-a-fragmented-one": (frame(b'{"ty', OP_TEXT, fin=False) + frame(b"x", OP_BINARY), 1002),
    "close-with-a-1-byte-payload": (frame(b"\x03", OP_CLOSE), 1002),
    "invalid-utf8": (frame(b'{"type":"\xff\xfe"}', OP_TEXT), 1007),
    "truncated-utf8": (frame(b'{"type":"ping","x":"\xe2\x82"}', OP_TEXT), 1007),
    "utf8-surrogate": (frame(b'"\xed\xa0\x80"', OP_TEXT), 1007),
    "utf8-overlong": (frame(b'"\xc0\xaf"', OP_TEXT), 1007),
    "invalid-utf8-across-fragments": (frame(b'{"a":"\xce', OP_TEXT, fin=False) + frame(b'"}', OP_CONT), 1007),
    "invalid-utf8-in-the-close-reason": (frame(close_payload(1000, b"\xff"), OP_CLOSE), 1007),
}


@pytest.mark.parametrize("data,code", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
async def test_protocol_error_gets_its_close_code_and_a_clean_close(
        server: Server, stream: tuple[Client, Client], closes_logged: pytest.LogCaptureFixture,
        data: bytes, code: int) -> None:
    before = await closes_counted(server, code)
    raw = await RawWs.connect(server.port)
    await raw.send(data)
    reason = await expect_close(raw, code, answer=data[0] & 0x0F != OP_CLOSE)
    assert reason and len(reason.encode()) <= 123
    assert (await closed_lines(closes_logged))[0].startswith(f"connection closed: {code} {reason} after ")
    assert await closes_counted(server, code) == before + 1


INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("client_code", INVALID_CLOSE_CODES)
async def test_invalid_close_code_is_answered_with_1002(
        server: Server, stream: tuple[Client, Client], closes_logged: pytest.LogCaptureFixture,
        client_code: int) -> None:
    raw = await RawWs.connect(server.port)
    await raw.send(frame(close_payload(client_code, b"bye"), OP_CLOSE))
    code, reason = await raw.recv_close()
    assert code == 1002 and str(client_code) in reason
    await raw.eof()  # the client has already sent its close: the server closes TCP at once
    assert (await closed_lines(closes_logged))[0].startswith(f"connection closed: 1002 {reason} after ")


@pytest.mark.parametrize("client_code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                                         3000, 4000, 4999])
async def test_valid_close_code_is_echoed(server: Server, stream: tuple[Client, Client],
                                          closes_logged: pytest.LogCaptureFixture, client_code: int) -> None:
    raw = await RawWs.connect(server.port)
    await raw.send(frame(close_payload(client_code, "au revoir, é".encode()), OP_CLOSE))
    assert (await raw.recv_close())[0] == client_code
    await raw.eof()
    assert (await closed_lines(closes_logged))[0].startswith(f"connection closed: {client_code} by the client ")


async def test_close_without_a_code_is_echoed_without_one(server: Server, stream: tuple[Client, Client]) -> None:
    raw = await RawWs.connect(server.port)
    await raw.send(frame(b"", OP_CLOSE))
    assert await raw.recv_close() == (None, "")
    await raw.eof()


async def test_valid_messages_pings_and_fragments_still_work(server: Server, token: MakeToken,
                                                             stream: tuple[Client, Client]) -> None:
    raw = await RawWs.connect(server.port)
    auth = f'{{"type":"auth","token":"{token()}","id":"é-1"}}'.encode()
    # three fragments with pings between them, the last two splitting the two bytes of é
    await raw.send(frame(auth[:10], OP_TEXT, fin=False) + frame(b"", OP_PING)
                   + frame(auth[10:-5], OP_CONT, fin=False) + frame(b"pong-me", OP_PING)
                   + frame(auth[-5:], OP_CONT))
    assert await raw.recv() == (OP_PONG, b"")
    assert await raw.recv() == (OP_PONG, b"pong-me")
    assert b'"authenticated"' in (await raw.recv())[1]
    await raw.send(frame(b'{"type":"ping","id":"\xc3\xa9-2"}', OP_TEXT))  # valid UTF-8: é
    assert b'"ref":"\xc3\xa9-2"' in (await raw.recv())[1]
    await raw.send(frame(close_payload(1000), OP_CLOSE))
    assert await raw.recv_close() == (1000, "")
    await raw.eof()


# ------------------------------------------------------------------ with permessage-deflate
@pytest.mark.parametrize("settings", [{"ws_compression": True}], indirect=True)
async def test_compressed_messages_are_checked_after_inflating(
        server: Server, token: MakeToken, stream: tuple[Client, Client]) -> None:
    raw = await RawWs.connect(server.port, deflate=True)
    auth = raw.deflate(f'{{"type":"auth","token":"{token()}"}}'.encode())
    await raw.send(frame(auth[:5], OP_TEXT, rsv=RSV1, fin=False) + frame(auth[5:], OP_CONT))
    assert b'"authenticated"' in (await raw.recv())[1]
    await raw.send(frame(raw.deflate(b'{"type":"ping","x":"\xff"}'), OP_TEXT, rsv=RSV1))
    assert await expect_close(raw, 1007) == "invalid UTF-8 in a text message"


COMPRESSION_ERRORS = {
    "rsv1-on-a-continuation": (lambda raw: frame(raw.deflate(b"[1,"), OP_TEXT, rsv=RSV1, fin=False)
                               + frame(raw.deflate(b"2]"), OP_CONT, rsv=RSV1), 1002, "reserved bits"),
    "rsv1-on-a-ping": (lambda raw: frame(raw.deflate(b"p"), OP_PING, rsv=RSV1), 1002, "reserved bits"),
    "not-deflate-data": (lambda raw: frame(b"\xff" * 16, OP_BINARY, rsv=RSV1), 1007, "invalid compressed data"),
    "inflates-past-max-message-bytes": (lambda raw: frame(raw.deflate(b"\0" * (MAX_MESSAGE_BYTES + 1)), OP_BINARY,
                                                          rsv=RSV1), 1009, "message too big after decompression"),
}


@pytest.mark.parametrize("settings", [{"ws_compression": True}], indirect=True)
@pytest.mark.parametrize("make,code,reason", COMPRESSION_ERRORS.values(), ids=COMPRESSION_ERRORS.keys())
async def test_compression_errors_get_their_close_code(
        server: Server, stream: tuple[Client, Client], make: Callable[[RawWs], bytes], code: int,
        reason: str) -> None:
    raw = await RawWs.connect(server.port, deflate=True)
    await raw.send(make(raw))
    assert (await expect_close(raw, code)).startswith(reason)


# ------------------------------------------------------------------ 1009: a lingering close
@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_message_over_max_message_bytes_closes_1009_while_the_client_still_writes(
        server: Server, stream: tuple[Client, Client], closes_logged: pytest.LogCaptureFixture,
        fragmented: bool) -> None:
    before = await closes_counted(server, 1009)
    raw = await RawWs.connect(server.port)
    size = MAX_MESSAGE_BYTES + 3 * 1024 * 1024
    mask = os.urandom(4)
    if fragmented:  # the first fragment fits; the second takes the message over the limit
        await raw.send(frame(b"x" * (MAX_MESSAGE_BYTES - 100), OP_BINARY, fin=False))
        head = bytes([FIN | OP_CONT, 0x80 | 127]) + struct.pack("!Q", size) + mask
    else:
        head = bytes([FIN | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", size) + mask

    answered = asyncio.Event()

    async def write_everything() -> None:
        """The whole message, 64 KiB at a time, the last 2 MiB after the server's close; then the client's close."""
        await raw.send(head)
        chunk = mask_bytes(b"\0" * 65536, mask)  # 65536 is a multiple of 4: the mask lines up in every chunk
        sent = 0
        while sent < size:
            if sent == size - 2 * 1024 * 1024:
                await answered.wait()
            await raw.send(chunk[:size - sent])
            sent += min(65536, size - sent)
            await asyncio.sleep(0)
        await raw.send(frame(close_payload(1009), OP_CLOSE))

    writing = asyncio.create_task(write_everything())
    try:
        assert await raw.recv_close() == (1009, "message too big")
        answered.set()
        await asyncio.wait_for(writing, 5)  # no reset, no broken pipe while the client finishes
        await raw.eof()
    finally:
        writing.cancel()
    assert (await closed_lines(closes_logged))[0].startswith("connection closed: 1009 message too big after ")
    assert await closes_counted(server, 1009) == before + 1


async def test_a_client_that_goes_silent_after_1009_is_dropped_after_the_linger(
        server: Server, stream: tuple[Client, Client], closes_logged: pytest.LogCaptureFixture) -> None:
    raw = await RawWs.connect(server.port)
    await raw.send(bytes([FIN | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 10 * MAX_MESSAGE_BYTES) + os.urandom(4)
                   + b"\0" * 1000)
    assert await raw.recv_close() == (1009, "message too big")
    started = asyncio.get_running_loop().time()
    await raw.eof(timeout=10)  # never finishes its message nor closes: the server gives up on it
    assert 4 <= asyncio.get_running_loop().time() - started < 7
    assert (await closed_lines(closes_logged))[0].startswith("connection closed: 1009 message too big after ")


# ------------------------------------------------------------------ ping timeout: recorded as 1000
@pytest.mark.parametrize("settings", [{"ws_ping_interval_s": 0.2, "ws_ping_timeout_s": 0.2}], indirect=True)
@pytest.mark.parametrize("answers_the_close", [False, True], ids=["hangs-up", "answers-the-close"])
async def test_ping_timeout_is_recorded_as_1000_ping_timed_out(
        server: Server, token: MakeToken, closes_logged: pytest.LogCaptureFixture,
        answers_the_close: bool) -> None:
    before = await closes_counted(server, 1000)
    raw = await RawWs.connect(server.port)
    await raw.send(frame(f'{{"type":"auth","token":"{token()}"}}'.encode(), OP_TEXT))
    opcodes = []
    while True:  # never answers a ping
        opcode, payload = await raw.recv()
        opcodes.append(opcode)
        if opcode == OP_CLOSE:
            break
    assert OP_PING in opcodes
    assert payload == close_payload(1000, b"ping timed out")
    if answers_the_close:
        await raw.send(frame(close_payload(1000), OP_CLOSE))
        await raw.eof()
    else:
        raw.abort()  # a client that vanishes without a close frame
    assert (await closed_lines(closes_logged))[0].startswith("connection closed: 1000 ping timed out after ")
    assert await closes_counted(server, 1000) == before + 1
    assert await closes_counted(server, 1006) == 0
