"""Server-side WebSocket frames built once per message, so the same bytes go to every consumer."""
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
