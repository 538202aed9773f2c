"""Video frames in both wire forms (JSON with base64, binary with a header), each encoded at most once.

Binary layout (all integers big-endian), used in both directions:

    offset  size  field
    0       2     magic, the ASCII bytes "WO"
    2       1     layout version, 1
    3       1     L, length of the streamId in bytes (1..128)
    4       8     timestamp, milliseconds since the Unix epoch (unsigned)
    12      2     width in pixels, 0 when not given
    14      2     height in pixels, 0 when not given
    16      L     streamId (ASCII, same charset as in JSON messages)
    16+L    ...   the JPEG bytes (at least one)
"""
from __future__ import annotations

import struct

import orjson
import pybase64

from watchout.errors import InvalidMessage
from watchout.outgoing import Outgoing

MAGIC = b"WO"
VERSION = 1
HEADER = struct.Struct("!2sBBQHH")
HEADER_SIZE = HEADER.size  # 16


class Frame:
    """One video frame from a producer. Converted to the other form at most once, on first demand."""

    __slots__ = ("stream_id", "timestamp", "width", "height", "_json", "_jpeg", "_binary")

    def __init__(self, stream_id: str, timestamp: int, width: int, height: int, *,
                 json_payload: bytes | None = None, jpeg: bytes | None = None,
                 binary_payload: bytes | None = None) -> None:
        self.stream_id = stream_id
        self.timestamp = timestamp
        self.width = width
        self.height = height
        self._jpeg = jpeg
        self._json = Outgoing(json_payload, False, is_droppable=True) if json_payload is not None else None
        self._binary = Outgoing(binary_payload, True, is_droppable=True) if binary_payload is not None else None

    @property
    def jpeg(self) -> bytes:
        if self._jpeg is None:
            assert self._binary is not None
            sid_len = self._binary.payload[3]
            self._jpeg = self._binary.payload[HEADER_SIZE + sid_len:]
        return self._jpeg

    def as_json(self) -> Outgoing:
        if self._json is None:
            self._json = Outgoing(encode_json_frame(self.stream_id, self.jpeg, self.timestamp,
                                                    self.width, self.height), False, is_droppable=True)
        return self._json

    def as_binary(self) -> Outgoing:
        if self._binary is None:
            self._binary = Outgoing(encode_binary_frame(self.stream_id, self.jpeg, self.timestamp,
                                                        self.width, self.height), True, is_droppable=True)
        return self._binary


def encode_json_frame(stream_id: str, jpeg: bytes, timestamp: int, width: int, height: int) -> bytes:
    """The seed's video-frame message; base64 is spliced in rather than run through a JSON encoder."""
    tail: dict[str, int] = {"timestamp": timestamp}
    if width:
        tail["width"] = width
    if height:
        tail["height"] = height
    return b"".join((b'{"type":"video-frame","streamId":', orjson.dumps(stream_id), b',"data":"',
                     pybase64.b64encode(jpeg), b'",', orjson.dumps(tail)[1:]))


def encode_binary_frame(stream_id: str, jpeg: bytes, timestamp: int, width: int, height: int) -> bytes:
    sid = stream_id.encode("ascii")
    return HEADER.pack(MAGIC, VERSION, len(sid), timestamp, width, height) + sid + jpeg


def parse_binary_frame(data: bytes) -> tuple[str, Frame]:
    """Validate a binary frame from a producer; the stream id is checked by the caller."""
    if len(data) < HEADER_SIZE + 2:
        raise InvalidMessage("binary frame shorter than its header", code="invalid-binary-frame")
    magic, version, sid_len, timestamp, width, height = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise InvalidMessage('binary frame must start with "WO"', code="invalid-binary-frame")
    if version != VERSION:
        raise InvalidMessage(f"binary frame layout version {version} is not supported (use 1)",
                             code="invalid-binary-frame")
    if not 1 <= sid_len <= 128 or len(data) <= HEADER_SIZE + sid_len:
        raise InvalidMessage("binary frame streamId length or JPEG size is wrong", code="invalid-binary-frame")
    try:
        stream_id = data[HEADER_SIZE:HEADER_SIZE + sid_len].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidMessage("binary frame streamId must be ASCII", code="invalid-stream-id") from None
    return stream_id, Frame(stream_id, timestamp, width, height, binary_payload=bytes(data))
