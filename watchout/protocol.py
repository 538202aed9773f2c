"""The WebSocket protocol v1 and its vocabulary: strict parsing of client messages (once), encoding of server
messages, the close codes, the stream statuses and the stream-id rule.

Error codes a client can receive in `error` replies are the `code=` strings below; docs/protocol.md
lists them. Sizes are checked before any JSON is parsed.

Client messages are parsed with the standard library's decoder and an object-pairs hook, because the strict
JSON rules need it: msgspec Structs (considered for issue 13) reject unknown fields but take the last of
duplicate keys silently (msgspec 0.23), which these rules refuse.
"""
from __future__ import annotations

import binascii
import datetime as dt
import enum
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
import pybase64

# CloseCode is the vocabulary's, defined beside the errors that close (errors.py cannot import this module)
from watchout.errors import CloseCode as CloseCode  # noqa: F401
from watchout.errors import InvalidMessage, TooLarge
from watchout.frames import Frame, parse_binary_frame

STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
STREAM_ID_RULE = "1-128 characters of A-Z a-z 0-9 _ . : - starting with a letter or digit"
SEVERITIES = ("low", "medium", "high", "critical")
KINDS = ("video-frame", "alert")
MAX_ID_CHARS = 128
MAX_TOKEN_CHARS = 8192
MAX_ALERT_MESSAGE_CHARS = 2000
# How deep alert and stream metadata may nest, a scalar counting as a level ({"a": 1} is 2). MongoDB refuses
# a document nested past 100 levels and metadata sits one level inside its alert or stream; 8 keeps every
# store well clear of that and is deeper than any detector or camera description needs.
MAX_NESTING = 8
MAX_DIMENSION = 65535
MAX_TIMESTAMP_MS = 2**53 - 1
# A video frame bigger than this is parsed by splicing its base64 out of the JSON first.
FAST_FRAME_MIN_CHARS = 4096
_DATA_KEY = b'"data":"'


class StreamStatus(enum.StrEnum):
    """A stream's status, as `status` messages, the REST API and the store spell it."""

    OFFLINE = "offline"
    ONLINE = "online"
    STREAMING = "streaming"


STREAM_STATUSES = tuple(StreamStatus)


def is_stream_id(value: Any) -> TypeGuard[str]:
    """The stream-id rule (STREAM_ID_RULE)."""
    return isinstance(value, str) and STREAM_ID_RE.fullmatch(value) is not None


def check_stream_id(value: Any, *, field: str = "streamId") -> str:
    """`value` if it is a valid stream id; otherwise raises InvalidMessage (`invalid-stream-id`) naming `field`."""
    if not is_stream_id(value):
        raise InvalidMessage(f"{field} must be {STREAM_ID_RULE}", code="invalid-stream-id")
    return value


@dataclass(slots=True)
class Register:
    stream_id: str
    token: str | None
    produces: tuple[str, ...]
    consumes: tuple[str, ...]
    ref: str | None


@dataclass(slots=True)
class Subscribe:
    stream_id: str
    client_type: str
    token: str | None
    produces: tuple[str, ...]
    consumes: tuple[str, ...]
    since_seq: int | None
    binary: bool
    ref: str | None
    epoch: str | None = None  # the history sinceSeq belongs to (from `subscribed` or the REST history)


@dataclass(slots=True)
class Unsubscribe:
    stream_id: str
    ref: str | None


@dataclass(slots=True)
class Auth:
    token: str
    ref: str | None


@dataclass(slots=True)
class Ping:
    ref: str | None


@dataclass(slots=True)
class VideoFrame:
    frame: Frame
    ref: str | None


@dataclass(slots=True)
class Alert:
    stream_id: str
    severity: str
    message: str
    metadata: dict[str, Any]
    timestamp: int | float
    snapshot: bytes | None
    client_id: str | None
    ref: str | None


Message = Register | Subscribe | Unsubscribe | Auth | Ping | VideoFrame | Alert


# ----------------------------------------------------------------------------- strict JSON

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise InvalidMessage(f"duplicate key {dup!r}", code="duplicate-key")
    return obj


def _no_constant(name: str) -> Any:
    raise InvalidMessage(f"{name} is not valid JSON", code="invalid-number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidMessage(f"number {text[:20]} is out of range", code="invalid-number")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constant, parse_float=_finite_float)


def loads_object(text: str | bytes) -> dict[str, Any]:
    """Parse one JSON object strictly: no duplicate keys, NaN/Infinity, or pathological nesting."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = _DECODER.decode(text)
    except RecursionError:
        raise InvalidMessage("JSON nested too deeply", code="too-deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InvalidMessage):
            raise
        raise InvalidMessage(f"not valid JSON: {str(exc)[:80]}", code="invalid-json") from None
    if not isinstance(obj, dict):
        raise InvalidMessage("a message must be a JSON object", code="not-an-object")
    return obj


# ----------------------------------------------------------------------------- field checks

def _is_text(value: Any, max_chars: int) -> TypeGuard[str]:
    """A non-empty str that can be re-encoded: a JSON \\u escape can smuggle in a lone surrogate."""
    if not isinstance(value, str) or not value or len(value) > max_chars:
        return False
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def has_unstorable_key(value: Any) -> bool:
    """Whether a key holds NUL or starts with "$": MongoDB refuses such field names, so a retry could
    never succeed; they are refused as invalid input instead."""
    if isinstance(value, dict):
        return any("\x00" in key or key.startswith("$") or has_unstorable_key(item) for key, item in value.items())
    return isinstance(value, list) and any(has_unstorable_key(item) for item in value)


def nesting_depth(value: Any, level: int = 1) -> int:
    """Nesting depth as MAX_NESTING counts it, counted only up to MAX_NESTING + 1 so the recursion stays
    shallow (so any result past MAX_NESTING means too deep)."""
    if level > MAX_NESTING:
        return level
    if isinstance(value, dict):
        return max((nesting_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((nesting_depth(v, level + 1) for v in value), default=level)
    return level


class _Fields:
    """Typed access to one message's fields; unknown and mistyped fields raise InvalidMessage."""

    def __init__(self, obj: dict[str, Any], allowed: frozenset[str]) -> None:
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise InvalidMessage(f"unknown field {unknown[0]!r} for {obj['type']}", code="unknown-field")
        self.obj = obj

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if required:
                raise InvalidMessage(f"{name} is required", code="missing-field")
            return None
        return self.obj[name]

    def text(self, name: str, required: bool = False, max_chars: int = MAX_ID_CHARS) -> str | None:
        value = self._get(name, required)
        if value is not None and not _is_text(value, max_chars):
            raise InvalidMessage(f"{name} must be a non-empty string of at most {max_chars} characters",
                                 code="invalid-field")
        return value

    def stream_id(self) -> str:
        return check_stream_id(self._get("streamId", True))

    def number(self, name: str, required: bool = False, low: float = 0, high: float = MAX_TIMESTAMP_MS
               ) -> int | float | None:
        value = self._get(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise InvalidMessage(f"{name} must be a number from {low:g} to {high:g}", code="invalid-field")
        return value

    def kinds(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(name, False)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(k, str) and k in KINDS for k in value):
            raise InvalidMessage(f"{name} must be a list of {' / '.join(KINDS)}", code="invalid-field")
        return tuple(dict.fromkeys(value))

    def token(self) -> str | None:
        return self.text("token", max_chars=MAX_TOKEN_CHARS)


def _ref(obj: dict[str, Any]) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if not _is_text(value, MAX_ID_CHARS):
        raise InvalidMessage(f"id must be a non-empty string of at most {MAX_ID_CHARS} characters",
                             code="invalid-field")
    return value


def _decode_base64(value: Any, name: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"{name} must be a non-empty base64 string", code="invalid-field")
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise InvalidMessage(f"{name} is larger than {max_bytes} bytes", code=f"{name}-too-large")
    try:
        return bytes(pybase64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"{name} is not valid base64", code="invalid-base64") from None


# ----------------------------------------------------------------------------- per type

_COMMON = frozenset({"type", "id"})
_REGISTER = _COMMON | {"clientType", "streamId", "produces", "consumes", "userId", "token"}
_SUBSCRIBE = _REGISTER | {"format", "sinceSeq", "epoch"}
_UNSUBSCRIBE = _COMMON | {"streamId"}
_AUTH = _COMMON | {"token", "userId"}
_FRAME = _COMMON | {"streamId", "data", "timestamp", "width", "height", "format"}
_ALERT = _COMMON | {"streamId", "severity", "message", "metadata", "timestamp", "snapshot"}


class Limits:
    """The size limits a parser enforces (from Settings)."""

    __slots__ = ("max_control_bytes", "max_metadata_bytes", "max_snapshot_bytes")

    def __init__(self, max_control_bytes: int, max_metadata_bytes: int, max_snapshot_bytes: int) -> None:
        self.max_control_bytes = max_control_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.max_snapshot_bytes = max_snapshot_bytes


def _register(obj: dict[str, Any], limits: Limits) -> Register:
    f = _Fields(obj, _REGISTER)
    if f.text("clientType", required=True, max_chars=32) != "mobile":
        raise InvalidMessage("register is for clientType 'mobile'; consumers use subscribe",
                             code="invalid-client-type")
    f.text("userId")  # accepted for the seed's clients, never trusted
    return Register(f.stream_id(), f.token(), f.kinds("produces", ("video-frame",)),
                    f.kinds("consumes", ("alert",)), _ref(obj))


def _subscribe(obj: dict[str, Any], limits: Limits) -> Subscribe:
    f = _Fields(obj, _SUBSCRIBE)
    client_type = f.text("clientType", required=True, max_chars=32)
    if client_type not in ("dashboard", "ml-service"):
        raise InvalidMessage("subscribe is for clientType 'dashboard' or 'ml-service'",
                             code="invalid-client-type")
    f.text("userId")
    since = f.number("sinceSeq", high=2**53 - 1)
    if since is not None and not isinstance(since, int):
        raise InvalidMessage("sinceSeq must be a whole number", code="invalid-field")
    epoch = f.text("epoch", max_chars=64)
    form = f.text("format", max_chars=16)
    if form not in (None, "json", "binary"):
        raise InvalidMessage("format must be 'json' or 'binary'", code="invalid-field")
    default_consumes = ("video-frame", "alert") if client_type == "dashboard" else ("video-frame",)
    default_produces = ("alert",) if client_type == "ml-service" else ()
    return Subscribe(f.stream_id(), client_type, f.token(), f.kinds("produces", default_produces),
                     f.kinds("consumes", default_consumes), since, form == "binary", _ref(obj), epoch)


def _unsubscribe(obj: dict[str, Any], limits: Limits) -> Unsubscribe:
    return Unsubscribe(_Fields(obj, _UNSUBSCRIBE).stream_id(), _ref(obj))


def _auth(obj: dict[str, Any], limits: Limits) -> Auth:
    f = _Fields(obj, _AUTH)
    f.text("userId")
    token = f.token()
    if token is None:
        raise InvalidMessage("token is required", code="missing-field")
    return Auth(token, _ref(obj))


def _ping(obj: dict[str, Any], limits: Limits) -> Ping:
    _Fields(obj, _COMMON)
    return Ping(_ref(obj))


def _frame_fields(obj: dict[str, Any]) -> tuple[str, int, int, int]:
    f = _Fields(obj, _FRAME)
    stream_id = f.stream_id()
    timestamp = f.number("timestamp", required=True)
    width = f.number("width", high=MAX_DIMENSION) or 0
    height = f.number("height", high=MAX_DIMENSION) or 0
    if f.text("format", max_chars=16) not in (None, "jpeg"):
        raise InvalidMessage("video-frame format must be 'jpeg'", code="invalid-field")
    return stream_id, int(timestamp or 0), int(width), int(height)


def _video_frame(obj: dict[str, Any], limits: Limits) -> VideoFrame:
    """The general path (small or unusual frames): re-encoded once from the parsed fields."""
    stream_id, timestamp, width, height = _frame_fields(obj)
    jpeg = _decode_base64(obj.get("data"), "data", 1 << 40)
    return VideoFrame(Frame(stream_id, timestamp, width, height, jpeg=jpeg), _ref(obj))


def _alert(obj: dict[str, Any], limits: Limits) -> Alert:
    f = _Fields(obj, _ALERT)
    stream_id = f.stream_id()
    severity = obj.get("severity")
    if severity not in SEVERITIES:
        raise InvalidMessage(f"severity must be one of {', '.join(SEVERITIES)}", code="invalid-severity")
    message = f.text("message", required=True, max_chars=MAX_ALERT_MESSAGE_CHARS)
    timestamp = f.number("timestamp", required=True)
    metadata = obj.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidMessage("metadata must be an object", code="invalid-field")
    if nesting_depth(metadata) > MAX_NESTING:  # first: the checks below recurse
        raise InvalidMessage(f"metadata nests deeper than {MAX_NESTING} levels", code="too-deep")
    if has_unstorable_key(metadata):
        raise InvalidMessage("metadata keys may not contain NUL (\\u0000) or start with $", code="invalid-field")
    try:
        metadata_size = len(orjson.dumps(metadata, option=orjson.OPT_STRICT_INTEGER))
    except orjson.JSONEncodeError:  # integers past 2**53 (JSON-safe, BSON-safe), lone surrogates (\ud800)
        raise InvalidMessage("metadata holds a value that cannot be relayed", code="invalid-field") from None
    if metadata_size > limits.max_metadata_bytes:
        raise InvalidMessage(f"metadata is larger than {limits.max_metadata_bytes} bytes",
                             code="metadata-too-large")
    confidence = metadata.get("confidence")
    if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))
                                   or not 0 <= confidence <= 1):
        raise InvalidMessage("metadata.confidence must be a number from 0 to 1", code="invalid-field")
    if "objectType" in metadata and not isinstance(metadata["objectType"], str):
        raise InvalidMessage("metadata.objectType must be a string", code="invalid-field")
    snapshot = None
    if obj.get("snapshot") is not None:
        snapshot = _decode_base64(obj["snapshot"], "snapshot", limits.max_snapshot_bytes)
        if len(snapshot) > limits.max_snapshot_bytes:
            raise InvalidMessage(f"snapshot is larger than {limits.max_snapshot_bytes} bytes",
                                 code="snapshot-too-large")
    assert message is not None and timestamp is not None
    ref = _ref(obj)
    return Alert(stream_id, severity, message, metadata, timestamp, snapshot, ref, ref)


_PARSERS: dict[str, Callable[[dict[str, Any], Limits], Message]] = {
    "register": _register,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "auth": _auth,
    "ping": _ping,
    "video-frame": _video_frame,
    "alert": _alert,
}


def _attach_ref(exc: InvalidMessage, obj: dict[str, Any]) -> None:
    """Let the error reply carry the message's `id` as `ref`, when that id is itself valid."""
    if exc.ref is None and _is_text(obj.get("id"), MAX_ID_CHARS):
        exc.ref = obj["id"]


def _dispatch(obj: dict[str, Any], limits: Limits) -> Message:
    try:
        kind = obj.get("type")
        if not isinstance(kind, str):
            raise InvalidMessage("a message needs a string 'type'", code="missing-field" if kind is None
                                 else "invalid-field")
        parser = _PARSERS.get(kind)
        if parser is None:
            raise InvalidMessage(f"unknown message type {kind[:40]!r}", code="unknown-type")
        return parser(obj, limits)
    except InvalidMessage as exc:
        _attach_ref(exc, obj)
        raise


def _fast_video_frame(raw: bytes, limits: Limits) -> VideoFrame | None:
    """Parse a large JSON frame without running its base64 through a JSON parser.

    The envelope (everything but the data string) is parsed strictly; the data is checked as strict
    base64, which also proves it holds no quote or backslash. The frame is then forwarded as the
    producer's own bytes. Returns None when the text is not in the plain shape (escapes, odd spacing):
    the general path handles it.
    """
    start = raw.find(_DATA_KEY)
    if start < 0:
        return None
    start += len(_DATA_KEY)
    end = raw.find(b'"', start)
    if end < 0:
        return None
    try:
        jpeg = pybase64.b64decode(memoryview(raw)[start:end], validate=True)
    except (binascii.Error, ValueError):
        return None
    obj = loads_object(raw[:start] + raw[end:])
    if obj.get("type") != "video-frame" or obj.get("data") != "" or not jpeg:
        return None
    try:
        stream_id, timestamp, width, height = _frame_fields(obj)
    except InvalidMessage as exc:
        _attach_ref(exc, obj)
        raise
    frame = Frame(stream_id, timestamp, width, height, json_payload=raw, jpeg=bytes(jpeg))
    return VideoFrame(frame, _ref(obj))


def parse_text(text: str, limits: Limits) -> Message:
    """Parse one text message. Raises InvalidMessage (reply) or TooLarge (close CloseCode.TOO_BIG)."""
    if len(text) > FAST_FRAME_MIN_CHARS and text.startswith('{"type":"video-frame"'):
        raw = text.encode("utf-8")
        message = _fast_video_frame(raw, limits)
        if message is not None:
            return message
    # sizes are UTF-8 bytes, as on the wire; a str knows cheaply whether it is pure ASCII
    too_big = (len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))) > limits.max_control_bytes
    if too_big and '"video-frame"' not in text[:256]:  # spare the parser what is refused anyway
        raise TooLarge(f"a non-frame message may be at most {limits.max_control_bytes} bytes")
    obj = loads_object(text)
    if too_big and obj.get("type") != "video-frame":  # '"video-frame"' may have sat in another field
        raise TooLarge(f"a non-frame message may be at most {limits.max_control_bytes} bytes")
    return _dispatch(obj, limits)


def dropped_ref(text: str, limits: Limits) -> str | None:
    """The `id` of a text message dropped unread (over the rate limit), for its error's `ref`.

    None for a video frame, for a message over `max_control_bytes` (neither is parsed: a flood must stay
    cheap) and for one without a readable `id`. Nothing else of the message is checked.
    """
    if len(text) > limits.max_control_bytes or '"video-frame"' in text[:256]:
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if _is_text(value, MAX_ID_CHARS) else None


def parse_binary(data: bytes) -> VideoFrame:
    """Parse one binary message: always a video frame in the binary layout (watchout.frames)."""
    stream_id, frame = parse_binary_frame(data)
    check_stream_id(stream_id, field="a binary frame's streamId")
    return VideoFrame(frame, None)


# ----------------------------------------------------------------------------- server messages
# Every message the server sends is built here, by one constructor per `type` (the video frame, built once
# per form for every consumer, by `watchout.frames`). A constructor takes the message's fields as typed
# arguments and leaves out what a client would receive as absent; `ref` echoes the `id` of the client
# message answered.

ServerMessage = dict[str, Any]


def encode(message: ServerMessage) -> bytes:
    """A server message as JSON bytes (camelCase keys as given)."""
    return orjson.dumps(message)


def epoch_ms(value: dt.datetime) -> int:
    """A stored time as the wire's milliseconds since the epoch."""
    return int(value.timestamp() * 1000)


def _with_ref(message: ServerMessage, ref: str | None) -> ServerMessage:
    if ref is not None:
        message["ref"] = ref
    return message


def error_message(code: str, text: str, ref: str | None = None, *, stream_id: str | None = None,
                  retry_after_ms: int | None = None) -> ServerMessage:
    """`error`: what went wrong with a client message (`code` is stable, `message` for people)."""
    message: ServerMessage = {"type": "error", "code": code, "message": text}
    if stream_id is not None:
        message["streamId"] = stream_id
    if retry_after_ms is not None:
        message["retryAfterMs"] = retry_after_ms
    return _with_ref(message, ref)


def authenticated_message(sub: str, role: str, expires_at_s: float, ref: str | None) -> ServerMessage:
    """`authenticated`: the answer to `auth`, with when the new token expires."""
    return _with_ref({"type": "authenticated", "sub": sub, "role": role, "expiresAt": int(expires_at_s * 1000)}, ref)


def registered_message(stream_id: str, connection_id: str, ref: str | None) -> ServerMessage:
    """`registered`: the answer to a producer's `register`."""
    return _with_ref({"type": "registered", "streamId": stream_id, "connectionId": connection_id,
                      "status": StreamStatus.ONLINE}, ref)


def subscribed_message(stream_id: str, connection_id: str, status: StreamStatus, *, binary: bool,
                       epoch: str | None, last_seq: int | None, reset: bool, ref: str | None) -> ServerMessage:
    """`subscribed`: the answer to `subscribe`; `reset` says the watcher's saved history is another one."""
    message: ServerMessage = {"type": "subscribed", "streamId": stream_id, "connectionId": connection_id,
                              "status": status, "format": "binary" if binary else "json"}
    if epoch is not None:
        message["epoch"] = epoch
    if last_seq is not None:
        message["lastSeq"] = last_seq
    if reset:
        message["reset"] = True
    return _with_ref(message, ref)


def unsubscribed_message(stream_id: str, ref: str | None) -> ServerMessage:
    return _with_ref({"type": "unsubscribed", "streamId": stream_id}, ref)


def pong_message(ref: str | None) -> ServerMessage:
    return _with_ref({"type": "pong"}, ref)


def status_message(stream_id: str, status: StreamStatus, at_ms: int) -> ServerMessage:
    """`status`: a stream's status, to its participants."""
    return {"type": "status", "streamId": stream_id, "status": status, "timestamp": at_ms}


def ack_message(stream_id: str, alert_id: str, seq: int, *, duplicate: bool, ref: str | None) -> ServerMessage:
    """`ack`: the alert is stored, with its id and seq (`duplicate`: it was stored before, under this id)."""
    message: ServerMessage = {"type": "ack", "streamId": stream_id, "alertId": alert_id, "seq": seq}
    if duplicate:
        message["duplicate"] = True
    return _with_ref(message, ref)


def alert_message(doc: dict[str, Any]) -> ServerMessage:
    """`alert`, live or replayed, from the stored alert: the sender's fields first, then the server's."""
    message: ServerMessage = {"type": "alert", "streamId": doc["streamId"], "severity": doc["severity"],
                              "message": doc["message"], "metadata": doc["metadata"], "timestamp": doc["timestamp"],
                              "alertId": doc["alertId"], "seq": doc["seq"], "receivedAt": epoch_ms(doc["receivedAt"])}
    if doc.get("hasSnapshot"):
        message["hasSnapshot"] = True
    if doc.get("acknowledged"):
        message["acknowledged"] = {"by": doc["acknowledged"]["by"], "at": epoch_ms(doc["acknowledged"]["at"])}
    return message


def alert_acknowledged_message(doc: dict[str, Any]) -> ServerMessage:
    """`alert-acknowledged`: to a stream's alert watchers when an operator acknowledges one of its alerts."""
    ack = doc["acknowledged"]
    return {"type": "alert-acknowledged", "streamId": doc["streamId"], "alertId": doc["alertId"], "seq": doc["seq"],
            "acknowledged": {"by": ack["by"], "at": epoch_ms(ack["at"])}}


def replay_complete_message(stream_id: str, last_seq: int, *, complete: bool, reset: bool) -> ServerMessage:
    """`replay-complete`: the stored alerts since `sinceSeq` are sent (`complete` false: the store failed)."""
    message: ServerMessage = {"type": "replay-complete", "streamId": stream_id, "lastSeq": last_seq,
                              "complete": complete}
    if reset:
        message["reset"] = True
    return message
