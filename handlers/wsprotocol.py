"""RFC 6455 on the server side of Tornado's WebSocketProtocol13: close codes for protocol errors, a lingering close.

Checked with Tornado 6.6.1. Its frame reader (`_receive_frame`, `_handle_message`) drops the TCP connection
on every protocol error (reserved bits, an unknown opcode, a fragmented or oversized control frame, a stray
continuation, invalid UTF-8), does not check that client frames are masked, echoes any close code, and
after its 1009 closes the socket while the client is still sending, so the client reads a reset instead of
the close frame. `StrictProtocol13` replaces that reader and nothing else: the handshake, writing, pings
and the close handshake stay Tornado's. It relies on these WebSocketProtocol13 internals: `_read_bytes`,
`_wire_bytes_in`, `_message_bytes_in`, `_decompressor`, `_send_pong`, `_received_pong`, `_run_callback`,
`params.max_message_size`, and `close()` arming a 5 s timer that aborts the connection;
tests/test_ws_protocol_edges.py fails if a Tornado upgrade changes them.
"""
from __future__ import annotations

import struct
import zlib
from asyncio import Future
from collections.abc import Callable
from typing import Any

import tornado.util
from tornado.websocket import WebSocketHandler, WebSocketProtocol13, _DecompressTooLargeError, _WebSocketParams

from watchout.protocol import CloseCode

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
KNOWN_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
LINGER_CHUNK_BYTES = 64 * 1024


def is_valid_close_code(code: int) -> bool:
    """Whether a client may send this code (RFC 6455 7.4 and the IANA registry): 1004-1006 and 1015 are
    reserved, 1016-2999 are unassigned, 3000-4999 belong to libraries and applications."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class StrictProtocol13(WebSocketProtocol13):
    """WebSocketProtocol13 with a frame reader that fails the connection as RFC 6455 7.1.7 asks: a close
    frame with 1002 (protocol error), 1007 (invalid UTF-8) or 1009 (over `max_message_size`), then a
    lingering close: the rest of the client's data is read and dropped, unparsed beyond frame lengths,
    until its close frame has been read (the TCP connection then closes at once) or until Tornado's close
    timeout of 5 s. No message is delivered after the failure.

    `on_close_sent(code, reason)` is called when this side starts the close handshake (a ping timeout, a
    protocol error, or the handler's own close), not when it echoes the client's close.
    """

    # slots, not instance-dict keys: Tornado's 29 attributes are just under CPython's key-sharing limit
    __slots__ = ("_on_close_sent", "_fragments", "_fragments_opcode", "_compressed", "_linger_skip",
                 "_client_closing")

    def __init__(self, handler: WebSocketHandler, params: _WebSocketParams,
                 on_close_sent: Callable[[int, str], None]) -> None:
        super().__init__(handler, False, params)
        self._on_close_sent = on_close_sent
        self._fragments: bytearray | None = None  # the data message being received in fragments
        self._fragments_opcode = OP_TEXT
        self._compressed = False  # the current data message has RSV1 (permessage-deflate)
        self._linger_skip: int | None = None  # after a failure: bytes of the current frame still to drop
        self._client_closing = False  # the frame being dropped is the client's close

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not (self.server_terminated or self.client_terminated or self.stream.closed()):
            sent = CloseCode.NORMAL if code is None and reason is not None else code  # what Tornado puts on the wire
            if sent is not None:
                self._on_close_sent(sent, reason or "")
        super().close(code, reason)

    async def _receive_frame(self) -> None:
        if self._linger_skip is not None:
            await self._linger()
            return
        b0, b1 = await self._read_bytes(2)
        fin, rsv, opcode, masked = bool(b0 & self.FIN), b0 & self.RSV_MASK, b0 & self.OPCODE_MASK, bool(b1 & 0x80)
        length = await self._read_length(b1)
        compressed = self._decompressor is not None and opcode in (OP_TEXT, OP_BINARY) and bool(rsv & self.RSV1)
        if compressed:
            rsv &= ~self.RSV1
        problem = self._frame_problem(fin, rsv, opcode, masked, length)
        if problem is not None:
            self._fail(CloseCode.PROTOCOL_ERROR, problem, length + 4 * masked, client_closing=opcode == OP_CLOSE)
            return
        if length + (len(self._fragments) if self._fragments is not None else 0) > self.params.max_message_size:
            self._fail(CloseCode.TOO_BIG, "message too big", 4 + length)
            return
        mask = await self._read_bytes(4)
        data = tornado.util._websocket_mask(mask, await self._read_bytes(length))
        if opcode & 0x8:
            handled = self._control_frame(opcode, data)
        elif opcode != OP_CONTINUATION and not fin:
            self._fragments, self._fragments_opcode, self._compressed = bytearray(data), opcode, compressed
            return
        elif opcode != OP_CONTINUATION:
            self._compressed = compressed
            handled = self._data_message(opcode, data)
        else:
            assert self._fragments is not None
            self._fragments += data
            if not fin:
                return
            data, self._fragments = bytes(self._fragments), None
            handled = self._data_message(self._fragments_opcode, data)
        if handled is not None:
            await handled

    async def _read_length(self, b1: int) -> int:
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self._read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._read_bytes(8))[0]
        return length

    def _frame_problem(self, fin: bool, rsv: int, opcode: int, masked: bool, length: int) -> str | None:
        """Why this frame header is a protocol error (RFC 6455 5.2-5.5), or None."""
        if rsv:
            return "reserved bits set without an extension"
        if opcode not in KNOWN_OPCODES:
            return f"unknown opcode {opcode:#x}"
        if not masked:
            return "unmasked frame"
        if opcode & 0x8 and not fin:
            return "fragmented control frame"
        if opcode & 0x8 and length > 125:
            return "control frame over 125 bytes"
        if length >> 63:
            return "payload length with the most significant bit set"
        if opcode == OP_CONTINUATION and self._fragments is None:
            return "continuation frame without a message"
        if opcode in (OP_TEXT, OP_BINARY) and self._fragments is not None:
            return "new message before the last fragment of the previous one"
        return None

    def _data_message(self, opcode: int, data: bytes) -> Future[Any] | None:
        if self._compressed:
            assert self._decompressor is not None
            try:
                data = self._decompressor.decompress(data)
            except _DecompressTooLargeError:
                self._fail(CloseCode.TOO_BIG, "message too big after decompression", 0)
                return None
            except zlib.error:
                self._fail(CloseCode.INVALID_DATA, "invalid compressed data", 0)
                return None
        self._message_bytes_in += len(data)
        if opcode == OP_BINARY:
            return self._run_callback(self.handler.on_message, data)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message", 0)
            return None
        return self._run_callback(self.handler.on_message, text)

    def _control_frame(self, opcode: int, data: bytes) -> Future[Any] | None:
        if opcode == OP_PING:
            self._send_pong(data)
            self._run_callback(self.handler.on_ping, data)
            return None
        if opcode == OP_PONG:
            self._received_pong = True
            return self._run_callback(self.handler.on_pong, data)
        if len(data) == 1:
            self._fail(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload", 0, client_closing=True)
            return None
        code = struct.unpack("!H", data[:2])[0] if data else None
        if code is not None and not is_valid_close_code(code):
            self._fail(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}", 0, client_closing=True)
            return None
        try:
            reason = data[2:].decode() if len(data) > 2 else None
        except UnicodeDecodeError:
            self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in the close reason", 0, client_closing=True)
            return None
        self.client_terminated = True
        self.close_code, self.close_reason = code, reason
        self.close(code)  # echo the client's code (RFC 6455 5.5.1)
        return None

    def _fail(self, code: int, reason: str, skip: int, client_closing: bool = False) -> None:
        """Send close `code` and linger: drop the `skip` bytes left of the current frame, then whole frames,
        up to the client's close (`client_closing`: the current frame is that close)."""
        self._fragments = None
        self._linger_skip, self._client_closing = skip, client_closing
        self.close(code, reason)

    async def _linger(self) -> None:
        """One step of the lingering close (Tornado's receive loop yields to the IOLoop between steps)."""
        assert self._linger_skip is not None
        if self._linger_skip:
            chunk = await self.stream.read_bytes(min(self._linger_skip, LINGER_CHUNK_BYTES), partial=True)
            self._wire_bytes_in += len(chunk)
            self._linger_skip -= len(chunk)
        elif self._client_closing:
            self.client_terminated = True
            self.close()  # the close frame has gone out: this only closes the TCP connection
        else:
            b0, b1 = await self._read_bytes(2)
            self._linger_skip = await self._read_length(b1) + 4 * bool(b1 & 0x80)
            self._client_closing = b0 & self.OPCODE_MASK == OP_CLOSE
