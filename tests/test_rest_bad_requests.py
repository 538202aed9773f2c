"""Bad REST requests: each gets its documented status and error code, in the API's error shape, and changes nothing.

The world is built through the real API and WebSocket: alice owns a1 (three alerts, the first with a
snapshot) and a2 (one alert), bob owns b1 (one alert). After every bad request the streams, the alerts
and what alice may list are exactly as before.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
import pytest
import tornado.httputil

from conftest import JPEG, TEST_SECRET, Response, Server, alert_message
from watchout.auth import mint_token
from watchout.protocol import MAX_NESTING

Api = Callable[..., Awaitable[Response]]  # conftest's api
MakeToken = Callable[..., str]  # conftest's token
Connect = Callable[..., Any]  # conftest's ws_connect
JSON = "application/json"


# ----------------------------------------------------------------------------- HTTP

async def send_raw(server: Server, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
    """A request with a body and no Content-Type, which tornado's client (and so `api`) would fill in."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, _, header_text = head.decode("latin-1").partition("\r\n")
    return Response(int(status_line.split()[1]), payload, tornado.httputil.HTTPHeaders.parse(header_text))


def error_of(reply: Response) -> dict[str, str]:
    """The {"error": {"code", "message"}} body, checked for shape."""
    assert reply.headers.get("Content-Type", "").startswith(JSON), (reply.status, reply.headers, reply.body)
    body = reply.json
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return dict(body["error"])


def cursor(position: Any) -> str:
    """A hand-made cursor in the API's encoding (urlsafe base64 of JSON, unpadded)."""
    return cursor_text(json.dumps(position))


def cursor_text(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    api: Api
    token: MakeToken
    values: dict[str, str]  # what a case's path may name: {alert} (a1's second alert), {snap} (its first)

    async def get(self, path: str, sub: str = "root", role: str = "admin") -> Any:
        reply = await self.api("GET", path, token=self.token(sub, role=role))
        assert reply.status == 200, reply.body
        return reply.json

    async def resolve(self, path: str) -> str:
        """The path with its {names} filled in; a {..._cursor} is the second page's cursor of that listing."""
        listings = {"a1_cursor": "/api/streams/a1/alerts", "streams_cursor": "/api/streams",
                    "alerts_cursor": "/api/alerts"}
        for name, listing in listings.items():
            if f"{{{name}}}" in path:
                self.values[name] = (await self.get(f"{listing}?limit=1", "alice", "user"))["nextCursor"]
                assert self.values[name]
        return path.format(**self.values)

    async def state(self) -> tuple[Any, ...]:
        """Every stream and alert as an admin lists them, and what alice may list."""
        streams = [(s["streamId"], s["ownerId"], s["name"], s["metadata"], s["lastSeq"])
                   for s in (await self.get("/api/streams"))["items"]]
        alerts = [(a["alertId"], a["streamId"], a["seq"], a["acknowledged"])
                  for a in (await self.get("/api/alerts"))["items"]]
        alices = {s["streamId"] for s in (await self.get("/api/streams", "alice", "user"))["items"]}
        assert alices == {"a1", "a2"}
        return streams, alerts, alices


async def build_world(api: Api, ws_connect: Connect, token: MakeToken) -> World:
    world = World(api, token, {})
    for owner, stream_id in (("alice", "a1"), ("alice", "a2"), ("bob", "b1")):
        reply = await api("POST", "/api/streams", token=token(owner), body={"streamId": stream_id, "name": stream_id})
        assert reply.status == 201, reply.body
    ml = await ws_connect()
    await ml.send({"type": "auth", "token": token("detector", role="service", streams="*")})
    await ml.recv_type("authenticated")
    for n, stream_id in enumerate(("a1", "a1", "a1", "a2", "b1")):
        extra = {"snapshot": base64.b64encode(JPEG).decode()} if n == 0 else {}
        await ml.send(alert_message(stream_id, id=f"alert-{n}", **extra))
    ids = {(ack := await ml.recv_type("ack"))["ref"]: ack["alertId"] for _ in range(5)}
    ml.close()
    world.values = {"snap": ids["alert-0"], "alert": ids["alert-1"]}
    return world


# ----------------------------------------------------------------------------- callers

def _claims(**claims: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "role": "user", "iat": now, "exp": now + 600, **claims}


def _without_exp() -> dict[str, Any]:
    claims = _claims()
    del claims["exp"]
    return claims


def _signed(**claims: Any) -> str:
    return jwt.encode(_claims(**claims), TEST_SECRET, algorithm="HS256")


# name -> the Authorization header, from conftest's token(); None sends none
AUTH: dict[str, Callable[[MakeToken], str | None]] = {
    "alice": lambda token: f"Bearer {token('alice')}",
    "admin": lambda token: f"Bearer {token('root', role='admin')}",
    "none": lambda token: None,
    "garbage": lambda token: "Bearer not-a-jwt",
    "expired": lambda token: f"Bearer {token('alice', ttl_s=-60)}",
    "wrong-key": lambda token: f"Bearer {mint_token('another-secret-0123456789abcdef0123', 'HS256', 'alice', 'user')}",
    "alg-none": lambda token: f"Bearer {jwt.encode(_claims(), '', algorithm='none')}",
    "bad-role": lambda token: f"Bearer {jwt.encode(_claims(role='superuser'), TEST_SECRET, algorithm='HS256')}",
    "no-exp": lambda token: f"Bearer {jwt.encode(_without_exp(), TEST_SECRET, algorithm='HS256')}",
    "exp-string": lambda token: f"Bearer {_signed(exp=str(int(time.time()) + 600))}",
    "exp-10e20": lambda token: f"Bearer {_signed(exp=10**20)}",
    "exp-true": lambda token: f"Bearer {_signed(exp=True)}",
    "iat-string": lambda token: f"Bearer {_signed(iat=str(int(time.time())))}",
    "nbf-10e20": lambda token: f"Bearer {_signed(nbf=10**20)}",
    "basic": lambda token: "Basic YWxpY2U6c2VjcmV0",
    "bearer-only": lambda token: "Bearer",
}


# ----------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Bad:
    method: str
    path: str  # may name {alert}, {snap}, {a1_cursor}, {streams_cursor}, {alerts_cursor}
    status: int
    code: str
    body: bytes | None = None
    content_type: str | None = JSON
    who: str = "alice"


def q(value: str) -> str:
    return quote(value, safe="")


def post_stream(body: str | bytes, status: int = 400, code: str = "invalid-field", **kw: Any) -> Bad:
    return Bad("POST", "/api/streams", status, code, body.encode() if isinstance(body, str) else body, **kw)


DEEP_METADATA = '{"name": "x", "metadata": ' + '{"a": ' * 300 + "1" + "}" * 301


def nested(depth: int) -> Any:
    """A metadata value `depth` levels deep as protocol.MAX_NESTING counts them (the scalar is a level)."""
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


BIG_BODY = json.dumps({"name": "x", "metadata": {"pad": "x" * (64 * 1024)}}).encode()

CASES = {
    # --- GET /api/streams: query values are typed and validated
    "limit zero": Bad("GET", "/api/streams?limit=0", 400, "invalid-query"),
    "limit past 500": Bad("GET", "/api/streams?limit=501", 400, "invalid-query"),
    "limit not a number": Bad("GET", "/api/streams?limit=abc", 400, "invalid-query"),
    "limit negative": Bad("GET", "/api/streams?limit=-1", 400, "invalid-query"),
    "limit a unicode digit": Bad("GET", "/api/streams?limit=" + q("²"), 400, "invalid-query"),
    "limit 5000 digits": Bad("GET", "/api/streams?limit=" + "9" * 5000, 400, "invalid-query"),
    "limit given twice": Bad("GET", "/api/streams?limit=1&limit=2", 400, "invalid-query"),
    "owner operator key": Bad("GET", "/api/streams?owner[$ne]=x", 400, "invalid-query"),
    "status operator object": Bad("GET", "/api/streams?status=" + q('{"$ne":null}'), 400, "invalid-query"),
    "status unknown": Bad("GET", "/api/streams?status=bogus", 400, "invalid-query"),
    "status not utf-8": Bad("GET", "/api/streams?status=%FF", 400, "invalid-query"),
    "owner by a user": Bad("GET", "/api/streams?owner=bob", 403, "forbidden"),
    "owner empty": Bad("GET", "/api/streams?owner=", 400, "invalid-query", who="admin"),
    "owner too long": Bad("GET", "/api/streams?owner=" + "x" * 129, 400, "invalid-query", who="admin"),
    "unknown parameter": Bad("GET", "/api/streams?sort=name", 400, "invalid-query"),
    "cursor garbage": Bad("GET", "/api/streams?cursor=garbage!", 400, "invalid-query"),
    "cursor not an object": Bad("GET", "/api/streams?cursor=" + cursor([1]), 400, "invalid-query"),
    "cursor nested 2000 deep": Bad("GET", "/api/streams?cursor=" + cursor_text("[" * 2000), 400, "invalid-query"),
    "cursor of /api/alerts": Bad("GET", "/api/streams?cursor={alerts_cursor}", 400, "invalid-query"),
    # --- GET /api/alerts
    "severity unknown": Bad("GET", "/api/alerts?severity=urgent", 400, "invalid-query"),
    "severity empty item": Bad("GET", "/api/alerts?severity=high,", 400, "invalid-query"),
    "since not a time": Bad("GET", "/api/alerts?since=yesterday", 400, "invalid-query"),
    "since without zone": Bad("GET", "/api/alerts?since=2026-01-01T00:00:00", 400, "invalid-query"),
    "since after until": Bad("GET", "/api/alerts?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z", 400,
                             "invalid-query"),
    "since equals until": Bad("GET", "/api/alerts?since=2026-01-01T00:00:00Z&until=2026-01-01T00:00:00Z", 400,
                              "invalid-query"),
    "until past year 9999 in UTC": Bad("GET", "/api/alerts?until=" + q("9999-12-31T23:59:59-23:59"), 400,
                                       "invalid-query"),
    "since before year 1 in UTC": Bad("GET", "/api/alerts?since=" + q("0001-01-01T00:00:00+01:00"), 400,
                                      "invalid-query"),
    "afterSeq negative": Bad("GET", "/api/alerts?afterSeq=-1", 400, "invalid-query"),
    "afterSeq fraction": Bad("GET", "/api/alerts?afterSeq=1.5", 400, "invalid-query"),
    "afterSeq a unicode digit": Bad("GET", "/api/alerts?afterSeq=" + q("²"), 400, "invalid-query"),
    "acknowledged yes": Bad("GET", "/api/alerts?acknowledged=yes", 400, "invalid-query"),
    "acknowledged True": Bad("GET", "/api/alerts?acknowledged=True", 400, "invalid-query"),
    "alerts owner by a user": Bad("GET", "/api/alerts?owner=bob", 403, "forbidden"),
    "alerts unknown parameter": Bad("GET", "/api/alerts?streamId=b1", 400, "invalid-query"),
    "cursor of /api/streams": Bad("GET", "/api/alerts?cursor={streams_cursor}", 400, "invalid-query"),
    "cursor of a stream's alerts": Bad("GET", "/api/alerts?cursor={a1_cursor}", 400, "invalid-query"),
    # --- GET /api/streams/{id} and its alerts
    "cursor of another stream": Bad("GET", "/api/streams/a2/alerts?cursor={a1_cursor}", 400, "invalid-query"),
    "owner on a stream's alerts": Bad("GET", "/api/streams/a1/alerts?owner=alice", 400, "invalid-query"),
    "stream id leading dash": Bad("GET", "/api/streams/-a1", 400, "invalid-stream-id"),
    "stream id too long": Bad("GET", "/api/streams/" + "a" * 129, 400, "invalid-stream-id"),
    "stream id with a space": Bad("DELETE", "/api/streams/a%201", 400, "invalid-stream-id"),
    # --- POST /api/streams: the body
    "body not json": post_stream("{name", code="invalid-json"),
    "body a json array": post_stream('["a1"]', code="invalid-json"),
    "body empty": post_stream("", code="invalid-json"),
    "body text/plain": post_stream('{"name": "x"}', 415, "unsupported-media-type", content_type="text/plain"),
    "body without content type": post_stream('{"name": "x"}', 415, "unsupported-media-type", content_type=None),
    "body form-encoded": post_stream("name=x", 415, "unsupported-media-type",
                                     content_type="application/x-www-form-urlencoded"),
    "body past 64 KiB": post_stream(BIG_BODY, 413, "too-large"),
    "body not utf-8": post_stream(b'{"name": "\xff"}', code="invalid-json"),
    "body nested 60000 deep": post_stream("[" * 60000, code="invalid-json"),
    "duplicate keys": post_stream('{"name": "x", "name": "y"}', code="invalid-json"),
    "NaN": post_stream('{"name": "x", "metadata": {"a": NaN}}', code="invalid-json"),
    "number out of range": post_stream('{"name": "x", "metadata": {"a": 1e999}}', code="invalid-json"),
    "name missing": post_stream('{"streamId": "new-cam"}'),
    "name empty": post_stream('{"name": ""}'),
    "name blank": post_stream('{"name": "   "}'),
    "name too long": post_stream(json.dumps({"name": "x" * 201})),
    "name not a string": post_stream('{"name": 5}'),
    "name a lone surrogate": post_stream('{"name": "\\ud800"}'),
    "streamId bad charset": post_stream('{"name": "x", "streamId": "front door!"}', code="invalid-stream-id"),
    "streamId leading dash": post_stream('{"name": "x", "streamId": "-cam"}', code="invalid-stream-id"),
    "streamId not a string": post_stream('{"name": "x", "streamId": 7}', code="invalid-stream-id"),
    "unknown field ownerId": post_stream('{"name": "x", "ownerId": "bob"}', code="unknown-field"),
    "metadata not an object": post_stream('{"name": "x", "metadata": [1]}'),
    "metadata past 4 KiB": post_stream(json.dumps({"name": "x", "metadata": {"a": "x" * 5000}})),
    "metadata integer past 2**63": post_stream('{"name": "x", "metadata": {"a": 123456789012345678901234567890}}'),
    "metadata nested 300 deep": post_stream(DEEP_METADATA),
    "metadata nested 9 deep": post_stream(json.dumps({"name": "x", "metadata": nested(MAX_NESTING + 1)})),
    "metadata nested 101 deep (past MongoDB's limit)": post_stream(json.dumps({"name": "x",
                                                                               "metadata": nested(101)})),
    "metadata nested 9 deep in a list": post_stream(json.dumps({"name": "x", "metadata": {"a": [nested(7)]}})),
    "metadata key with NUL": post_stream('{"name": "x", "metadata": {"a\\u0000b": 1}}'),
    "existing streamId": post_stream('{"name": "x", "streamId": "a1"}', 409, "stream-exists"),
    "another user's streamId": post_stream('{"name": "x", "streamId": "b1"}', 409, "stream-exists"),
    "authentication before the body": post_stream("{name", 401, "token-missing", who="none"),
    # --- POST /api/alerts/{id}/ack and the snapshot
    "ack with a field": Bad("POST", "/api/alerts/{alert}/ack", 400, "unknown-field", b'{"note": "seen"}'),
    "ack with an array": Bad("POST", "/api/alerts/{alert}/ack", 400, "invalid-json", b"[]"),
    "ack text/plain": Bad("POST", "/api/alerts/{alert}/ack", 415, "unsupported-media-type", b"{}", "text/plain"),
    "ack body past 64 KiB": Bad("POST", "/api/alerts/{alert}/ack", 413, "too-large", BIG_BODY),
    "ack id not an id": Bad("POST", "/api/alerts/not-an-id/ack", 404, "not-found"),
    "ack id an operator": Bad("POST", "/api/alerts/%24ne/ack", 404, "not-found"),
    "ack id 25 hex digits": Bad("POST", "/api/alerts/" + "a" * 25 + "/ack", 404, "not-found"),
    "ack id 1000 characters": Bad("POST", "/api/alerts/" + "x" * 1000 + "/ack", 404, "not-found"),
    "snapshot id not an id": Bad("GET", "/api/alerts/not-an-id/snapshot.jpg", 404, "not-found"),
    "snapshot of an alert without one": Bad("GET", "/api/alerts/{alert}/snapshot.jpg", 404, "not-found"),
    "snapshot id not utf-8": Bad("GET", "/api/alerts/%FF/snapshot.jpg", 400, "http-error"),
    # --- methods and paths
    "PUT a stream": Bad("PUT", "/api/streams/a1", 405, "method-not-allowed", b'{"name": "x"}'),
    "PATCH the streams": Bad("PATCH", "/api/streams", 405, "method-not-allowed", b'{"name": "x"}'),
    "DELETE the alerts": Bad("DELETE", "/api/alerts", 405, "method-not-allowed"),
    "DELETE an ack": Bad("DELETE", "/api/alerts/{alert}/ack", 405, "method-not-allowed"),
    "GET an ack": Bad("GET", "/api/alerts/{alert}/ack", 405, "method-not-allowed"),
    "POST a snapshot": Bad("POST", "/api/alerts/{snap}/snapshot.jpg", 405, "method-not-allowed", b"{}"),
    "unknown path": Bad("GET", "/api/nope", 404, "not-found"),
    "path under a stream": Bad("GET", "/api/streams/a1/frames", 404, "not-found"),
    "trailing slash": Bad("GET", "/api/streams/", 404, "not-found"),
    # --- the bearer token
    "no Authorization": Bad("GET", "/api/streams", 401, "token-missing", who="none"),
    "Basic credentials": Bad("GET", "/api/streams", 401, "token-missing", who="basic"),
    "Bearer without a token": Bad("GET", "/api/streams", 401, "token-missing", who="bearer-only"),
    "garbage token": Bad("GET", "/api/streams", 401, "token-invalid", who="garbage"),
    "expired token": Bad("GET", "/api/alerts", 401, "token-expired", who="expired"),
    "token signed with another key": Bad("GET", "/api/streams", 401, "token-invalid", who="wrong-key"),
    "unsigned token (alg none)": Bad("GET", "/api/streams", 401, "token-invalid", who="alg-none"),
    "token with an unknown role": Bad("GET", "/api/streams", 401, "token-invalid", who="bad-role"),
    "token without exp": Bad("GET", "/api/streams", 401, "token-invalid", who="no-exp"),
    "expired token on DELETE": Bad("DELETE", "/api/streams/a1", 401, "token-expired", who="expired"),
    "token with exp a numeric string": Bad("GET", "/api/streams", 401, "token-invalid", who="exp-string"),
    "token with exp 10**20": Bad("GET", "/api/streams", 401, "token-invalid", who="exp-10e20"),
    "token with exp true": Bad("GET", "/api/streams", 401, "token-invalid", who="exp-true"),
    "token with iat a numeric string": Bad("GET", "/api/alerts", 401, "token-invalid", who="iat-string"),
    "token with nbf 10**20": Bad("GET", "/api/streams", 401, "token-invalid", who="nbf-10e20"),

    # --- hand-made cursors: right kind and field types, values out of range
    "forged streams cursor time": Bad("GET", "/api/streams?cursor=" + cursor({"k": "s", "c": "x", "i": "a1"}), 400,
                                      "invalid-query"),
    "forged alerts cursor id": Bad("GET", "/api/alerts?cursor=" + cursor(
        {"k": "a", "r": "2026-01-01T00:00:00Z", "i": "zzz"}), 400, "invalid-query"),
    "forged alerts cursor time": Bad("GET", "/api/alerts?cursor=" + cursor(
        {"k": "a", "r": "x", "i": "0" * 24}), 400, "invalid-query"),
    "forged stream alerts cursor seq": Bad("GET", "/api/streams/a1/alerts?cursor=" + cursor(
        {"k": "sa", "p": 2**70, "s": 1, "i": "a1"}), 400, "invalid-query"),
    "negative stream alerts cursor seq": Bad("GET", "/api/streams/a1/alerts?cursor=" + cursor(
        {"k": "sa", "p": -5, "s": 1, "i": "a1"}), 400, "invalid-query"),
}
PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()]


def test_there_are_at_least_twenty_distinct_bad_requests() -> None:
    assert len(set(CASES.values())) == len(CASES) >= 20


@pytest.mark.parametrize("case", PARAMS)
async def test_bad_request_gets_its_status_and_code_and_changes_nothing(
        server: Server, api: Api, ws_connect: Connect, token: MakeToken, case: Bad) -> None:
    world = await build_world(api, ws_connect, token)
    before = await world.state()
    path = await world.resolve(case.path)
    authorization = AUTH[case.who](token)
    headers = {"Authorization": authorization} if authorization is not None else {}
    if case.content_type is None:
        assert case.body is not None
        reply = await send_raw(server, case.method, path, headers, case.body)
    else:
        reply = await api(case.method, path, body=case.body, content_type=case.content_type, headers=headers)
    assert (reply.status, error_of(reply)["code"]) == (case.status, case.code), reply.body
    assert await world.state() == before


async def test_stream_metadata_at_the_nesting_limit_is_stored_and_one_level_more_is_refused(
        api: Api, token: MakeToken) -> None:
    metadata = nested(MAX_NESTING)
    created = await api("POST", "/api/streams", token=token("alice"), body={"name": "deep", "metadata": metadata})
    assert created.status == 201, created.body
    stored = await api("GET", f"/api/streams/{created.json['streamId']}", token=token("alice"))
    assert stored.json["metadata"] == metadata
    refused = await api("POST", "/api/streams", token=token("alice"),
                        body={"name": "deeper", "metadata": nested(MAX_NESTING + 1)})
    error = error_of(refused)
    assert (refused.status, error["code"]) == (400, "invalid-field")
    assert f"deeper than {MAX_NESTING} levels" in error["message"]


async def test_operator_lookalike_values_are_plain_strings_that_match_nothing(
        api: Api, ws_connect: Connect, token: MakeToken) -> None:
    world = await build_world(api, ws_connect, token)
    for path in ("/api/streams?owner=", "/api/alerts?owner="):
        for value in ('{"$ne":null}', '{"$gt":""}', "$where"):
            reply = await api("GET", path + q(value), token=token("root", role="admin"))
            assert reply.status == 200 and reply.json["items"] == [], (path, value, reply.body)
    for value in ('{"$ne":null}', '{"$gt":""}'):  # a user's filter values never widen what they see
        reply = await api("GET", "/api/alerts?severity=" + q(value), token=token("alice"))
        assert (reply.status, error_of(reply)["code"]) == (400, "invalid-query")
    assert (await world.state())[2] == {"a1", "a2"}


async def test_head_on_a_route_without_it_is_405_without_a_body(api: Api, token: MakeToken) -> None:
    reply = await api("HEAD", "/api/streams", token=token("alice"))
    assert (reply.status, reply.body) == (405, b"")
