"""The documentation checked against the code: docs/asyncapi.yaml against what a real server sends,
accepts and refuses; docs/configuration.md and config/watchout.toml against Settings; and the runnable
examples in docs/examples/ against a real server."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import re
import struct
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
import tornado.httpclient
import tornado.websocket
import yaml

from conftest import JPEG, TEST_SECRET, Client, alert_message, frame_message, producer, start_server, watcher
from watchout import frames, protocol
from watchout.errors import StoreUnavailable
from watchout.settings import FIELDS, Settings
from watchout.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
BASE = "urn:watchout:asyncapi"


class AsyncApi:
    """docs/asyncapi.yaml: its messages by direction and `type`, and validators for their payloads."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = document
        resource = referencing.Resource.from_contents(document, default_specification=referencing.jsonschema.DRAFT7)
        self.registry: referencing.Registry[Any] = referencing.Registry().with_resource(BASE, resource)
        self.client: dict[str, str] = {}  # message type ("binary" for binary frames) -> components/messages key
        self.server: dict[str, str] = {}
        for operation in document["operations"].values():
            to = self.client if operation["action"] == "receive" else self.server
            for ref in operation["messages"]:
                self._index(to, ref)
            for ref in operation.get("reply", {}).get("messages", []):
                self._index(self.server, ref)

    def resolve_once(self, node: dict[str, str]) -> Any:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references: {ref}"
        target: Any = self.doc
        for part in ref[2:].split("/"):
            target = target[part]
        return target

    def resolve(self, node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = self.resolve_once(node)
        return node

    def _index(self, to: dict[str, str], ref: dict[str, str]) -> None:
        """`ref` points into the channel's messages, whose entries point into components/messages."""
        key = self.resolve_once(ref)["$ref"].rsplit("/", 1)[1]
        message = self.doc["components"]["messages"][key]
        kind = "binary" if message["contentType"] == "application/octet-stream" else \
            self.resolve(message["payload"])["properties"]["type"]["const"]
        assert to.get(kind, key) == key, f"two messages for {kind} in one direction"
        to[kind] = key

    def payload(self, key: str) -> dict[str, Any]:
        schema: dict[str, Any] = self.resolve(self.doc["components"]["messages"][key]["payload"])
        return schema

    def validator(self, key: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({"$ref": f"{BASE}#/components/messages/{key}/payload"},
                                          registry=self.registry)

    def check_client(self, message: dict[str, Any]) -> None:
        self.validator(self.client[message["type"]]).validate(message)

    def check_server(self, message: dict[str, Any]) -> None:
        key = self.server[message["type"]]
        self.validator(key).validate(message)
        undocumented = set(message) - set(self.payload(key)["properties"])
        assert not undocumented, f"{message['type']} carries undocumented fields {undocumented}"

    def check_binary(self, data: bytes, direction: dict[str, str]) -> dict[str, Any]:
        """Decode a binary frame with the layout the document gives; assert its fixed fields."""
        layout = self.doc["components"]["messages"][direction["binary"]]["x-watchout-binary-layout"]
        assert layout["byteOrder"] == "big-endian"
        fields = {f["name"]: int.from_bytes(data[f["offset"]:f["offset"] + f["size"]], "big")
                  for f in layout["fields"]}
        for f in layout["fields"]:
            if "value" in f:
                raw = data[f["offset"]:f["offset"] + f["size"]]
                assert (raw.decode() if isinstance(f["value"], str) else fields[f["name"]]) == f["value"], f
        start = layout["streamIdOffset"]
        sid_len = fields["streamIdLength"]
        stream_id = data[start:start + sid_len].decode("ascii")
        assert re.fullmatch(self.named_schema("StreamId")["pattern"], stream_id)
        jpeg = data[start + sid_len:]
        assert jpeg, "a binary frame carries at least one JPEG byte"
        return {**fields, "streamId": stream_id, "jpeg": jpeg}

    def named_schema(self, name: str) -> dict[str, Any]:
        schema: dict[str, Any] = self.doc["components"]["schemas"][name]
        return schema


@pytest.fixture(scope="module")
def spec() -> AsyncApi:
    return AsyncApi(yaml.safe_load((DOCS / "asyncapi.yaml").read_text()))


# ----------------------------------------------------------------------------- the document itself

def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _error_codes_in_protocol_md() -> set[str]:
    text = (DOCS / "protocol.md").read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    return {code for line in section.splitlines() if line.startswith("| `")
            for code in re.findall(r"`([a-z0-9-]+)`", line.split("|")[1])}


def test_asyncapi_is_a_3x_document_whose_references_resolve_and_whose_operations_use_every_message(spec):
    assert str(spec.doc["asyncapi"]).startswith("3.")
    assert [c["address"] for c in spec.doc["channels"].values()] == ["/ws"]
    for ref in _refs(spec.doc):
        spec.resolve({"$ref": ref})  # raises KeyError for a dangling reference
    used = {ref.rsplit("/", 1)[1] for op in spec.doc["operations"].values()
            for ref in _refs(op["messages"]) + _refs(op.get("reply", {}).get("messages", []))}
    assert used == set(spec.doc["channels"]["relay"]["messages"]) == set(spec.doc["components"]["messages"])
    for operation in spec.doc["operations"].values():
        assert operation["action"] in ("send", "receive")
    assert set(spec.doc["components"]["securitySchemes"]) == {"tokenInFirstMessage", "bearerHeader"}


def test_asyncapi_client_messages_have_exactly_the_fields_and_limits_the_parser_has(spec):
    allowed = {"register": protocol._REGISTER, "subscribe": protocol._SUBSCRIBE, "unsubscribe": protocol._UNSUBSCRIBE,
               "auth": protocol._AUTH, "ping": protocol._COMMON, "video-frame": protocol._FRAME,
               "alert": protocol._ALERT}
    assert set(spec.client) == set(protocol._PARSERS) | {"binary"}
    for kind, fields in allowed.items():
        assert set(spec.payload(spec.client[kind])["properties"]) == fields, kind
    schemas = spec.doc["components"]["schemas"]
    assert schemas["StreamId"]["pattern"] == f"^{protocol.STREAM_ID_RE.pattern}$"
    assert schemas["Id"]["maxLength"] == schemas["Ref"]["maxLength"] == protocol.MAX_ID_CHARS
    assert schemas["Token"]["maxLength"] == protocol.MAX_TOKEN_CHARS
    assert schemas["Alert"]["properties"]["message"]["maxLength"] == protocol.MAX_ALERT_MESSAGE_CHARS
    assert tuple(schemas["Severity"]["enum"]) == protocol.SEVERITIES
    assert tuple(schemas["Kinds"]["items"]["enum"]) == protocol.KINDS
    assert schemas["Timestamp"]["maximum"] == protocol.MAX_TIMESTAMP_MS
    assert schemas["Dimension"]["maximum"] == protocol.MAX_DIMENSION


def test_asyncapi_error_codes_are_the_ones_protocol_md_lists(spec):
    codes = spec.doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert set(codes) == _error_codes_in_protocol_md()


def test_asyncapi_binary_layout_is_the_one_frames_py_packs(spec):
    layout = spec.doc["components"]["messages"]["videoFrameBinary"]["x-watchout-binary-layout"]
    assert spec.doc["components"]["messages"]["relayedVideoFrameBinary"]["x-watchout-binary-layout"] == layout
    offset, expected = 0, []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", frames.HEADER.format.lstrip("!")):
        size = struct.calcsize(f"!{count}{code}")
        expected.append((offset, size))
        offset += size
    assert [(f["offset"], f["size"]) for f in layout["fields"]] == expected
    assert layout["streamIdOffset"] == frames.HEADER_SIZE
    values = {f["name"]: f.get("value") for f in layout["fields"]}
    assert (values["magic"], values["version"]) == (frames.MAGIC.decode(), frames.VERSION)
    sample = frames.encode_binary_frame("cam-1", JPEG, 1764150000000, 640, 480)
    decoded = spec.check_binary(sample, spec.client)
    assert (decoded["streamId"], decoded["timestamp"], decoded["width"], decoded["height"], decoded["jpeg"]) == \
        ("cam-1", 1764150000000, 640, 480, JPEG)


# ----------------------------------------------------------------------------- against a real server

class Capture:
    """Sends client messages and reads server messages, validating each against the document."""

    def __init__(self, spec: AsyncApi) -> None:
        self.spec = spec
        self.seen: Counter[str] = Counter()

    async def send(self, client: Client, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, bytes):
            self.spec.check_binary(message, self.spec.client)
        else:
            self.spec.check_client(json.loads(message) if isinstance(message, str) else message)
        await client.send(message)

    async def until(self, client: Client, kind: str, **match: Any) -> Any:
        """Read (and validate) messages until one of this type ("binary" for a binary frame) arrives."""
        while True:
            raw = await client.recv_raw()
            if raw is None:
                raise ConnectionError(f"closed: {client.conn.close_code} waiting for {kind}")
            if isinstance(raw, bytes):
                self.seen["binary"] += 1
                frame = self.spec.check_binary(raw, self.spec.server)
                if kind == "binary":
                    return frame
                continue
            message = json.loads(raw)
            self.spec.check_server(message)
            self.seen[message["type"]] += 1
            if message["type"] == kind and all(message.get(k) == v for k, v in match.items()):
                return message
            assert message["type"] != "error" or kind == "error", f"unexpected {message}"


async def test_every_message_type_of_a_full_session_matches_the_asyncapi_document(spec, server, ws_connect, token):
    cap, stream, user = Capture(spec), "yard-cam", token("alice")
    phone = await ws_connect()
    await cap.send(phone, {"type": "register", "clientType": "mobile", "streamId": stream, "produces": ["video-frame"],
                           "consumes": ["alert"], "userId": "alice", "token": user, "id": "r1"})
    assert (await cap.until(phone, "registered"))["ref"] == "r1"
    dash = await ws_connect()
    await cap.send(dash, {"type": "subscribe", "clientType": "dashboard", "streamId": stream, "token": user,
                          "id": "s1"})
    assert (await cap.until(dash, "subscribed"))["format"] == "json"
    viewer = await ws_connect()
    await cap.send(viewer, {"type": "subscribe", "clientType": "dashboard", "streamId": stream, "token": user,
                            "consumes": ["video-frame"], "format": "binary"})
    await cap.until(viewer, "subscribed", format="binary")
    ml = await ws_connect(headers={"Authorization": f"Bearer {token('detector', role='service', streams=[stream])}"})
    await cap.send(ml, {"type": "subscribe", "clientType": "ml-service", "streamId": stream, "consumes": [],
                        "produces": ["alert"]})
    await cap.until(ml, "subscribed")

    # frames: JSON in, both forms out; binary in; a large JSON frame forwarded as the producer wrote it
    await cap.send(phone, frame_message(stream, timestamp=1764150000000, width=640, height=480))
    await cap.until(phone, "status", status="streaming")
    assert (await cap.until(dash, "video-frame"))["width"] == 640
    assert (await cap.until(viewer, "binary"))["jpeg"] == JPEG
    await cap.send(phone, frames.encode_binary_frame(stream, JPEG, 1764150000001, 0, 0))
    assert "width" not in await cap.until(dash, "video-frame", timestamp=1764150000001)
    assert (await cap.until(viewer, "binary"))["timestamp"] == 1764150000001
    big = json.dumps(frame_message(stream, JPEG * 3, timestamp=1764150000002, id="f1", format="jpeg"),
                     separators=(",", ":"))
    await cap.send(phone, big)
    assert (await cap.until(dash, "video-frame", timestamp=1764150000002))["id"] == "f1"

    # alerts: stored and acked, a duplicate, one with a snapshot
    await cap.send(ml, alert_message(stream, id="a1"))
    ack = await cap.until(ml, "ack", ref="a1")
    assert (await cap.until(phone, "alert"))["seq"] == (await cap.until(dash, "alert"))["seq"] == ack["seq"]
    await cap.send(ml, alert_message(stream, id="a1"))
    assert (await cap.until(ml, "ack", ref="a1"))["duplicate"] is True
    await cap.send(ml, alert_message(stream, id="a2", snapshot=base64.b64encode(JPEG).decode()))
    await cap.until(ml, "ack", ref="a2")
    assert (await cap.until(dash, "alert", seq=ack["seq"] + 1))["hasSnapshot"] is True

    # an operator acknowledges the first alert over REST; a late dashboard replays the stored alerts
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        server.url(f"/api/alerts/{ack['alertId']}/ack"), method="POST", body=b"",
        headers={"Authorization": f"Bearer {user}"})
    assert response.code == 200
    assert (await cap.until(dash, "alert-acknowledged"))["acknowledged"]["by"] == "alice"
    late = await ws_connect()
    await cap.send(late, {"type": "subscribe", "clientType": "dashboard", "streamId": stream, "token": user,
                          "consumes": ["alert"], "sinceSeq": 0})
    assert (await cap.until(late, "alert", seq=ack["seq"]))["acknowledged"]["by"] == "alice"
    assert (await cap.until(late, "replay-complete"))["lastSeq"] == ack["seq"] + 1

    # replies and errors
    await cap.send(dash, {"type": "ping", "id": "p1"})
    await cap.until(dash, "pong", ref="p1")
    await cap.send(dash, {"type": "auth", "token": token("alice"), "id": "au1"})
    assert (await cap.until(dash, "authenticated", ref="au1"))["sub"] == "alice"
    await cap.send(dash, {"type": "unsubscribe", "streamId": stream, "id": "u1"})
    await cap.until(dash, "unsubscribed", ref="u1")
    await cap.send(dash, {"type": "unsubscribe", "streamId": stream, "id": "u2"})
    assert (await cap.until(dash, "error", ref="u2"))["code"] == "not-subscribed"
    await cap.send(ml, {"type": "auth", "token": token("detector", role="service", streams=["elsewhere"])})
    assert (await cap.until(ml, "error", code="not-found"))["streamId"] == stream
    await cap.until(ml, "authenticated")

    # a newer producer takes over; then it leaves
    phone2 = await ws_connect()
    await cap.send(phone2, {"type": "register", "clientType": "mobile", "streamId": stream, "token": user})
    await cap.until(phone2, "registered")
    assert (await cap.until(phone, "error"))["code"] == "producer-replaced"
    assert (await phone.closed())[0] == 4409
    await cap.until(viewer, "status", status="online")
    phone2.close()
    await cap.until(viewer, "status", status="offline")

    assert set(cap.seen) == set(spec.server), "every server message in the document was seen and checked"


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"type": "register", "clientType": "mobile", "streamId": "-cam"}, "invalid-stream-id"),
    ({"type": "register", "clientType": "mobile", "streamId": "c" * 129}, "invalid-stream-id"),
    ({"type": "register", "clientType": "mobile", "streamId": "cam", "consumes": ["audio"]}, "invalid-field"),
    ({"type": "subscribe", "clientType": "mobile", "streamId": "cam"}, "invalid-client-type"),
    ({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "format": "png"}, "invalid-field"),
    ({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "sinceSeq": -1}, "invalid-field"),
    ({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "sinceSeq": 1.5}, "invalid-field"),
    ({"type": "unsubscribe"}, "missing-field"),
    ({"type": "auth"}, "missing-field"),
    ({"type": "ping", "x": 1}, "unknown-field"),
    ({"type": "ping", "id": "i" * 129}, "invalid-field"),
    (frame_message("cam", data="not base64!"), "invalid-base64"),
    (frame_message("cam", width=70000), "invalid-field"),
    (frame_message("cam", format="png"), "invalid-field"),
    (alert_message("cam", severity="urgent"), "invalid-severity"),
    (alert_message("cam", message=""), "invalid-field"),
    (alert_message("cam", message="m" * 2001), "invalid-field"),
    (alert_message("cam", timestamp=-1), "invalid-field"),
    (alert_message("cam", metadata={"confidence": 1.5}), "invalid-field"),
    (alert_message("cam", metadata={"objectType": 7}), "invalid-field"),
    (alert_message("cam", snapshot="###"), "invalid-base64"),
]


@pytest.mark.parametrize("message, code", REFUSED, ids=[f"{m['type']}-{c}-{i}" for i, (m, c) in enumerate(REFUSED)])
async def test_a_message_the_server_refuses_is_refused_by_its_asyncapi_schema(spec, ws_connect, token, message, code):
    with pytest.raises(jsonschema.ValidationError):
        spec.check_client(message)
    client = await ws_connect(headers={"Authorization": f"Bearer {token('alice')}"})
    await client.send(message)
    assert (await client.recv_type("error"))["code"] == code


# ----------------------------------------------------------------------------- configuration reference

def _documented_settings() -> dict[str, dict[str, str]]:
    """docs/configuration.md's tables: key -> {section, env, type, default} (default as a TOML literal)."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in (DOCS / "configuration.md").read_text().splitlines():
        heading = re.fullmatch(r"## \[(\w+)\]", line)
        if heading:
            section = heading.group(1)
        elif section and line.startswith("| `"):
            key, env, kind, default = (cell.strip() for cell in line.strip("|").split("|")[:4])
            assert key.strip("`") not in rows, f"{key} documented twice"
            rows[key.strip("`")] = {"section": section, "env": env.strip("`"), "type": kind,
                                    "default": default.strip("`")}
    return rows


TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
              "tuple[str, ...]": "list of strings"}


def test_configuration_reference_documents_every_setting_with_its_variable_type_and_default():
    documented = _documented_settings()
    assert set(documented) == set(FIELDS)
    defaults = Settings()
    for key, row in documented.items():
        assert row["env"] == f"WATCHOUT_{key.upper()}", key
        assert row["type"] == TYPE_NAMES[str(FIELDS[key].type)], key
        value = tomllib.loads(f"v = {row['default']}")["v"]
        value = tuple(value) if isinstance(value, list) else value
        expected = getattr(defaults, key)
        assert value == expected and type(value) is type(expected), f"{key}: {row['default']} != {expected!r}"


def test_configuration_reference_and_watchout_toml_have_the_same_sections_and_defaults():
    document = tomllib.loads((ROOT / "config" / "watchout.toml").read_text())
    in_file = {key: (section, value) for section, table in document.items() for key, value in table.items()}
    documented = _documented_settings()
    assert set(in_file) == set(documented) == {f.name for f in dataclasses.fields(Settings)}
    for key, (section, value) in in_file.items():
        assert documented[key]["section"] == section, key
        assert tomllib.loads(f"v = {documented[key]['default']}")["v"] == value, key


# ----------------------------------------------------------------------------- defaults stated in prose
# Besides configuration.md's table, the documents give defaults in running text and other tables, in
# these forms: "`auth_timeout_s` [10 s]" (protocol.md's convention), "`auth_timeout_s` (10 s)",
# "`alert_retention_d` days (90 by default)", "`log_level` (`info` by default; ...)", "`port`, 3000 by
# default", "`rate_limit_burst` 20,000", "`max_bad_messages`: 10", "`broker_prefix` | ... (default
# `watchout:`)", "16 KiB (`max_metadata_bytes`)", and for two settings "`jwt_leeway_s` +
# `token_expiry_grace_s` [10 + 5 s]", or their sum: "`offline_after_s` + `offline_check_s` (45 s by default)".

PROSE_DOCUMENTS = [ROOT / "README.md", DOCS / "asyncapi.yaml", *sorted(DOCS.glob("*.md"))]
_SETTING = "|".join(sorted(FIELDS, key=len, reverse=True))
_NAMES = rf"`(?:{_SETTING})`(?:\s+\+\s+`(?:{_SETTING})`)*"
_AMOUNT = r"(?:\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?:\s?(?:KiB|MiB|GiB|ms|min|s|h|days?|/s))?(?![\w/])"
_VALUE = rf"{_AMOUNT}(?:\s*\+\s*{_AMOUNT})*|`[^`\n]+`|on\b|off\b"
_STATEMENTS = [  # in order of precedence: a name is read by the first form that matches it
    re.compile(rf"(?P<names>{_NAMES})(?:\s+[a-z]+){{0,2}}\s+\[(?P<value>{_VALUE})\]"),
    re.compile(rf"(?P<names>{_NAMES})(?:\s+(?:days|hours|seconds))?\s+\((?P<default>default\s+)?"
               rf"(?P<value>{_VALUE})(?P<by_default>\s+by\s+default)?\s*[),;:]"),
    re.compile(rf"(?P<names>{_NAMES})[,:]?\s+(?P<value>{_AMOUNT})"),
    re.compile(rf"(?P<names>`(?:{_SETTING})`)[^`\n]{{0,80}}\(default\s+(?P<value>{_VALUE})"),
    re.compile(rf"(?P<value>{_AMOUNT})\s+\((?P<names>`(?:{_SETTING})`)\)"),
]
_UNITS = {"": 1, "/s": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SECONDS = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "day": 86400, "days": 86400}


@dataclasses.dataclass(frozen=True)
class Stated:
    """A default stated in a document: the settings it names, the value as written, the line."""

    names: tuple[str, ...]
    value: str
    line: int
    text: str


def stated_defaults(text: str) -> list[Stated]:
    taken: set[int] = set()  # where a name already read starts
    found: list[Stated] = []
    for pattern in _STATEMENTS:
        for match in pattern.finditer(text):
            starts = {match.start("names") + m.start() for m in re.finditer("`", match["names"])}
            if starts & taken or _is_example(match):
                continue
            taken |= starts
            found.append(Stated(tuple(re.findall(r"`(\w+)`", match["names"])), match["value"],
                                text.count("\n", 0, match.start()) + 1, " ".join(match[0].split())))
    return sorted(found, key=lambda s: s.line)


def _is_example(match: re.Match[str]) -> bool:
    """In parentheses, `code` not called the default is an example (`./watchout-data/watchout.db`),
    unless it is written as in watchout.toml (`"00:00"`)."""
    value = match["value"]
    return (value.startswith("`") and not value.startswith('`"') and "default" in match.re.groupindex
            and not (match["default"] or match["by_default"]))


def _in_units_of(amount: str, name: str) -> float:
    """'16 MiB' -> 16777216, '24 h' for stale_after_h -> 24, '10,000/s' -> 10000."""
    match = re.fullmatch(r"([\d,.]+)\s?(\S*)", amount.strip())
    assert match, amount
    number, unit = match.groups()
    value = float(number.replace(",", ""))
    if unit in _SECONDS:
        return value * _SECONDS[unit] / (3600 if name.endswith("_h") else 86400 if name.endswith("_d") else 1)
    return value * _UNITS[unit]


def agrees_with_settings(stated: Stated) -> bool:
    expected = [getattr(Settings(), name) for name in stated.names]
    if stated.value.startswith("`"):
        literal = stated.value.strip("`")
        try:
            value = tomllib.loads(f"v = {literal}")["v"]
        except tomllib.TOMLDecodeError:
            value = literal  # a bare word: `info`, `./watchout-data`
        if isinstance(value, str) and isinstance(expected[0], str):
            value, expected[0] = value.removeprefix("./"), expected[0].removeprefix("./")
        return expected == [value]
    if stated.value in ("on", "off"):
        return expected == [stated.value == "on"]
    if not all(isinstance(e, int | float) and not isinstance(e, bool) for e in expected):
        return False
    amounts = re.split(r"\s*\+\s*", stated.value)
    if len(amounts) == 1 and len(expected) > 1:  # the sum of the settings
        return math.isclose(_in_units_of(amounts[0], stated.names[0]), sum(expected))
    return len(amounts) == len(expected) and all(
        math.isclose(_in_units_of(a, n), e) for a, n, e in zip(amounts, stated.names, expected))


@pytest.mark.parametrize("sentence, names, value, agrees", [
    ("within `auth_timeout_s` [10 s]. Otherwise", ("auth_timeout_s",), "10 s", True),
    ("only when `ws_compression` is on [off]. The", ("ws_compression",), "off", True),
    ("`rate_limit_msgs_per_s` [10000], burst", ("rate_limit_msgs_per_s",), "10000", False),
    ("`rate_limit_burst` 20,000; applies", ("rate_limit_burst",), "20,000", False),
    ("`rate_limit_msgs_per_s` (20,000/s by default): past", ("rate_limit_msgs_per_s",), "20,000/s", True),
    ("`jwt_leeway_s` (10 s, at most 30)", ("jwt_leeway_s",), "10 s", True),
    ("| `max_message_bytes`, 16 MiB |", ("max_message_bytes",), "16 MiB", True),
    ("`max_bad_messages`: 10 `error` replies", ("max_bad_messages",), "10", True),
    ("(`port`, 3000 by default)", ("port",), "3000", True),
    ("`log_level` (`info` by default; `debug` adds", ("log_level",), "`info`", True),
    ("`data_dir` (default `./watchout-data`, relative", ("data_dir",), "`./watchout-data`", True),
    ("`report_schedule` (`\"00:00\"`: daily at midnight)", ("report_schedule",), "`\"00:00\"`", True),
    ("`broker_prefix` | the same on every node (default `watchout:`) |", ("broker_prefix",), "`watchout:`", True),
    ("`alert_retention_d` days (90 by default) after", ("alert_retention_d",), "90", True),
    ("`stale_after_h` (24 h), and", ("stale_after_h",), "24 h", True),
    ("at most 16 KiB (`max_metadata_bytes`) and", ("max_metadata_bytes",), "16 KiB", True),
    ("at `exp` + `jwt_leeway_s` + `token_expiry_grace_s` [10 + 5 s]. To", ("jwt_leeway_s", "token_expiry_grace_s"),
     "10 + 5 s", True),
    ("`jwt_leeway_s` +\n`token_expiry_grace_s` (10 s + 5 s by default)", ("jwt_leeway_s", "token_expiry_grace_s"),
     "10 s + 5 s", True),
    ("within `offline_after_s` +\n  `offline_check_s` (45 s by default).", ("offline_after_s", "offline_check_s"),
     "45 s", True),
    ("within `offline_after_s` + `offline_check_s` (40 s by default).", ("offline_after_s", "offline_check_s"),
     "40 s", False),
])
def test_a_default_stated_in_prose_is_read_and_checked(sentence: str, names: tuple[str, ...], value: str,
                                                       agrees: bool) -> None:
    [stated] = stated_defaults(sentence)
    assert (stated.names, stated.value) == (names, value)
    assert agrees_with_settings(stated) is agrees


@pytest.mark.parametrize("sentence", [
    "until `exp` + `jwt_leeway_s`; a live connection",
    "scrape `metrics_port` + 0 … N − 1, one port per worker",
    "within `offline_after_s` + `offline_check_s`: with the defaults, 45 s",
    "waits `shutdown_timeout_s` plus 5 s",
    "under `data_dir` (`./watchout-data/watchout.db`: the database)",
    "list it in `trusted_origins` (`WATCHOUT_TRUSTED_ORIGINS=https://ops.example.com`).",
])
def test_a_setting_named_without_a_default_states_none(sentence: str) -> None:
    assert stated_defaults(sentence) == []


@pytest.mark.parametrize("document", PROSE_DOCUMENTS, ids=lambda path: path.name)
def test_every_default_a_document_states_is_the_one_settings_has(document: Path) -> None:
    wrong = [f"{document.name}:{s.line}: {s.text!r}, but Settings has "
             + ", ".join(f"{name} = {getattr(Settings(), name)!r}" for name in s.names)
             for s in stated_defaults(document.read_text()) if not agrees_with_settings(s)]
    assert not wrong, "\n".join(wrong)


def test_the_documents_state_the_defaults_of_the_limits_and_timers() -> None:
    """A guard on the reader: the statements it was written for are still found."""
    named = {name for path in PROSE_DOCUMENTS for s in stated_defaults(path.read_text()) for name in s.names}
    assert {"rate_limit_msgs_per_s", "rate_limit_burst", "max_message_bytes", "max_control_message_bytes",
            "max_metadata_bytes", "max_snapshot_bytes", "auth_timeout_s", "offline_after_s", "offline_check_s",
            "outbox_soft_bytes", "outbox_hard_bytes", "jwt_leeway_s", "token_expiry_grace_s", "ws_ping_interval_s",
            "ws_ping_timeout_s", "max_bad_messages", "shutdown_timeout_s", "alert_retention_d"} <= named


# ----------------------------------------------------------------------------- runnable examples

EXAMPLE_ENV = {**os.environ, "WATCHOUT_JWT_SECRET": TEST_SECRET}


async def _start(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLES / script), *args, env=EXAMPLE_ENV,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _finish(proc: asyncio.subprocess.Process, timeout: float = 30) -> tuple[int, str, dict[str, int]]:
    """Wait for the example; returns (exit code, its output, the summary it prints last)."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode()
    assert text.strip(), err.decode()
    summary: dict[str, int] = json.loads(text.strip().splitlines()[-1])
    assert proc.returncode is not None
    return proc.returncode, text + err.decode(), summary


def _token_command(sub: str, ttl: str, *extra: str) -> str:
    return " ".join([sys.executable, "-m", "watchout", "token", "--sub", sub, "--ttl", ttl, *extra])


async def _existing_stream(ws_connect, token, stream: str) -> Client:
    """Create the stream as alice's (a phone registers and leaves) and return a dashboard watching it."""
    phone = await producer(ws_connect, token, stream)
    phone.close()
    return await watcher(ws_connect, token, stream)


@pytest.mark.parametrize("form", ["json", "binary"])
async def test_producer_example_streams_every_frame_to_a_dashboard_and_prints_alerts(server, ws_connect, token, form):
    dash = await _existing_stream(ws_connect, token, "porch")
    ml = await ws_connect(headers={"Authorization": f"Bearer {token('detector', role='service', streams=['porch'])}"})
    proc = await _start("producer.py", "--url", server.ws_url, "--token", token("alice"), "--stream", "porch",
                        "--frames", "40", "--fps", "40", *(["--binary"] if form == "binary" else []))
    first = await dash.recv_type("video-frame", timeout=15)
    await ml.send(alert_message("porch", id="seen-by-phone"))
    received = 1
    while received < 40:
        frame = await dash.recv_type("video-frame")
        assert base64.b64decode(frame["data"]).startswith(b"\xff\xd8")
        received += 1
    code, output, summary = await _finish(proc)
    assert code == 0, output
    assert first["streamId"] == "porch" and summary["framesSent"] == 40 and summary["reconnects"] == 0
    assert summary["alertsReceived"] == 1 and "alert #1 high: Suspicious person" in output


async def test_producer_example_refreshes_its_token_before_it_expires(server, ws_connect, token):
    dash = await _existing_stream(ws_connect, token, "porch")
    # a 6 s token: refreshed at 4 s; without that the server closes the connection at 6.5 s (exp + grace)
    proc = await _start("producer.py", "--url", server.ws_url, "--token-command", _token_command("alice", "6s"),
                        "--stream", "porch", "--seconds", "7.5", "--fps", "10", "--binary")
    code, output, summary = await _finish(proc)
    assert code == 0, output
    assert summary["tokenRefreshes"] >= 1 and summary["reconnects"] == 0, output
    statuses = []
    while True:
        try:
            statuses.append((await dash.recv_type("status", timeout=0.5))["status"])
        except TimeoutError:
            break
    # without the refresh the server closes it at exp + grace, and it comes back: online, streaming, offline twice
    assert statuses[statuses.index("online"):] == ["online", "streaming", "offline"], statuses


async def test_producer_example_stops_when_a_newer_producer_takes_over(server, ws_connect, token):
    dash = await _existing_stream(ws_connect, token, "porch")
    proc = await _start("producer.py", "--url", server.ws_url, "--token", token("alice"), "--stream", "porch",
                        "--seconds", "30")
    await dash.recv_type("status", timeout=15, status="streaming")
    await producer(ws_connect, token, "porch")
    code, output, summary = await _finish(proc, timeout=10)
    assert code == 3 and "took over" in output and summary["reconnects"] == 0, output


class FlakyAlertStore(SQLiteStore):
    """The first alert write fails, as when MongoDB steps down; later ones land."""

    failures = 1

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("database did not answer")
        return await super().insert_alerts(alerts)


async def test_ml_service_example_retries_until_acked_and_each_alert_is_stored_and_relayed_once(settings, token):
    store = FlakyAlertStore(":memory:")
    await store.start()
    server, close = await start_server(settings, store)
    try:
        async def connect() -> Client:
            return Client(await tornado.websocket.websocket_connect(server.ws_url))

        phone = await connect()
        await phone.send({"type": "register", "clientType": "mobile", "streamId": "porch", "token": token("alice"),
                          "consumes": []})
        await phone.recv_type("registered")
        dash = await connect()
        await dash.send({"type": "subscribe", "clientType": "dashboard", "streamId": "porch", "consumes": ["alert"],
                         "token": token("alice")})
        await dash.recv_type("subscribed")
        proc = await _start("ml_service.py", "--url", server.ws_url, "--stream", "porch", "--seconds", "4",
                            "--cooldown", "0.5", "--token", token("detector", role="service", streams=["porch"]))
        for timestamp in range(60):  # 3 s of frames at 20 fps
            await phone.send(frame_message("porch", timestamp=timestamp))
            await asyncio.sleep(0.05)
        code, output, summary = await _finish(proc)
        assert code == 0, output
        assert summary["framesReceived"] > 0 and summary["framesAnalysed"] > 0, output
        assert summary["retries"] >= 1 and summary["alertsAcked"] == summary["alertsSent"] >= 2, output
        assert await store.count_alerts("porch") == summary["alertsAcked"] - summary["duplicates"]
        relayed = []
        while True:
            try:
                relayed.append(await dash.recv_type("alert", timeout=0.5))
            except TimeoutError:
                break
        assert len(relayed) == len({a["alertId"] for a in relayed}) == await store.count_alerts("porch")
        assert all(a["metadata"]["objectType"] == "person" for a in relayed)
    finally:
        await close()
