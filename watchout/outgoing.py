"""An outgoing message: its payload and its server-side WebSocket frame, built once, so the same bytes go to
every consumer."""
from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
_FIN = 0x80


def build_ws_frame(payload: bytes, opcode: int) -> bytes:
    """One unfragmented, unmasked data frame (RFC 6455 5.2; servers never mask).

    Only for connections without permessage-deflate: a compressed connection needs its own
    per-connection compressor and goes through Tornado's write_message instead.
    """
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _FIN | opcode, n)
    elif n <= 0xFFFF:
        header = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return header + payload


class Outgoing:
    """A payload and its wire frame, built on first use and shared by every consumer."""

    __slots__ = ("payload", "binary", "_wire", "is_droppable")

    def __init__(self, payload: bytes, binary: bool = False, *, is_droppable: bool = False) -> None:
        self.payload = payload
        self.binary = binary
        self.is_droppable = is_droppable  # video frames may be dropped for a slow consumer
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = build_ws_frame(self.payload, OP_BINARY if self.binary else OP_TEXT)
        return self._wire

    def __len__(self) -> int:
        return len(self.payload)
