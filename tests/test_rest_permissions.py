"""REST permissions: every route against every kind of caller, in one table.

The world is built through the real API and WebSocket: alice owns a1 and a2, bob owns b1, and an
ML service has sent alerts on all three (one on a1 with a snapshot). A stream or alert the caller
may not see answers exactly like one that does not exist.
"""
from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import JPEG, Response, alert_message

Api = Callable[..., Awaitable[Response]]  # conftest's api
MakeToken = Callable[..., str]  # conftest's token
Connect = Callable[..., Any]  # conftest's ws_connect
ALL = frozenset({"a1", "a2", "b1"})
ALERTS_PER_STREAM = {"a1": 2, "a2": 1, "b1": 1}  # a1's first alert carries the snapshot
MISSING_STREAM = "zz-missing"
MISSING_ALERT = "0" * 24  # a well-formed alert id that was never given out


def error_of(reply: Response) -> dict[str, str]:
    """The {"error": {"code", "message"}} body, checked for shape."""
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    body = reply.json
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return dict(body["error"])


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    api: Api
    token: MakeToken
    alerts: dict[str, str] = field(default_factory=dict)  # "a1-snap", "a1", "a2", "b1" -> alertId

    def admin(self) -> str:
        return self.token("root", role="admin")

    async def stream_ids(self) -> set[str]:
        reply = await self.api("GET", "/api/streams", token=self.admin())
        assert reply.status == 200
        return {s["streamId"] for s in reply.json["items"]}

    async def alert(self, alert_id: str) -> dict[str, Any] | None:
        """The alert as an admin lists it, None when it is gone."""
        reply = await self.api("GET", "/api/alerts", token=self.admin())
        assert reply.status == 200
        return next((a for a in reply.json["items"] if a["alertId"] == alert_id), None)


async def build_world(api: Api, ws_connect: Connect, token: MakeToken) -> World:
    world = World(api, token)
    for owner, stream_id in (("alice", "a1"), ("alice", "a2"), ("bob", "b1")):
        reply = await api("POST", "/api/streams", token=token(owner), body={"streamId": stream_id, "name": stream_id})
        assert reply.status == 201, reply.body
    ml = await ws_connect()
    await ml.send({"type": "auth", "token": token("detector", role="service", streams="*")})
    await ml.recv_type("authenticated")
    snapshot = base64.b64encode(JPEG).decode()
    for label in ("a1-snap", "a1", "a2", "b1"):
        extra = {"snapshot": snapshot} if label == "a1-snap" else {}
        await ml.send(alert_message(label[:2], id=label, **extra))
    for _ in range(4):
        ack = await ml.recv_type("ack")
        world.alerts[ack["ref"]] = ack["alertId"]
    ml.close()
    return world


# ----------------------------------------------------------------------------- callers

# name -> (sub, role, streams claim); None sends no Authorization header, a str is sent as the token
PRINCIPALS: dict[str, tuple[str, str, list[str] | str | None] | str | None] = {
    "owner": ("alice", "user", None),
    "other-user": ("bob", "user", None),
    "service-a1": ("detector", "service", ["a1"]),
    "service-star": ("detector", "service", "*"),
    "service-unscoped": ("detector", "service", None),
    "admin": ("root", "admin", None),
    "admin-b1": ("root", "admin", ["b1"]),
    "owner-a2": ("alice", "user", ["a2"]),
    "no-token": None,
    "bad-token": "not-a-jwt",
}


def bearer_for(who: str, token: MakeToken) -> str | None:
    spec = PRINCIPALS[who]
    if spec is None or isinstance(spec, str):
        return spec
    sub, role, streams = spec
    return token(sub, role=role, streams=streams)


def sub_of(who: str) -> str:
    spec = PRINCIPALS[who]
    assert isinstance(spec, tuple)
    return spec[0]


# ----------------------------------------------------------------------------- routes

@dataclass(frozen=True)
class Err:
    status: int
    code: str


F = Err(403, "forbidden")
N = Err(404, "not-found")
M = Err(401, "token-missing")
X = Err(401, "token-invalid")
Expected = int | frozenset[str] | Err  # a success status, the stream ids a 200 list holds, or an error


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: each is one row of the table
class Route:
    method: str
    path: str  # {alert} is a1's plain alert, {snap} a1's alert with a snapshot
    body: dict[str, Any] | None = None

    def resolve(self, world: World, missing: bool = False) -> str:
        """The path; with `missing`, the same request about a stream or alert that does not exist."""
        if missing:
            return self.path.replace("a1", MISSING_STREAM).replace("{alert}", MISSING_ALERT).replace(
                "{snap}", MISSING_ALERT)
        return self.path.format(alert=world.alerts["a1"], snap=world.alerts["a1-snap"])


CREATE = Route("POST", "/api/streams", {"streamId": "new-cam", "name": "New camera"})
LIST = Route("GET", "/api/streams")
LIST_ALICE = Route("GET", "/api/streams?owner=alice")
READ = Route("GET", "/api/streams/a1")
DELETE = Route("DELETE", "/api/streams/a1")
HISTORY = Route("GET", "/api/streams/a1/alerts")
ALERTS = Route("GET", "/api/alerts")
ACK = Route("POST", "/api/alerts/{alert}/ack")
SNAPSHOT = Route("GET", "/api/alerts/{snap}/snapshot.jpg")

A = frozenset({"a1", "a2"})
B = frozenset({"b1"})
A1 = frozenset({"a1"})
A2 = frozenset({"a2"})
NONE: frozenset[str] = frozenset()

# A cell is a success status, the stream ids a 200 list holds (for alert lists: every alert of those
# streams), or an error: F 403 forbidden, N 404 not-found, M 401 token-missing, X 401 token-invalid.
COLUMNS = list(PRINCIPALS)
MATRIX: dict[Route, tuple[Expected, ...]] = {
    #            owner other  svc-a1 svc-*  svc-0  admin  adm-b1 own-a2 none bad
    CREATE:     (201,  201,   F,     F,     F,     201,   F,     F,     M,   X),
    LIST:       (A,    B,     A1,    ALL,   NONE,  ALL,   B,     A2,    M,   X),
    LIST_ALICE: (F,    F,     F,     F,     F,     A,     NONE,  F,     M,   X),
    READ:       (200,  N,     200,   200,   N,     200,   N,     N,     M,   X),
    DELETE:     (204,  N,     F,     F,     N,     204,   N,     N,     M,   X),
    HISTORY:    (A1,   N,     A1,    A1,    N,     A1,    N,     N,     M,   X),
    ALERTS:     (A,    B,     A1,    ALL,   NONE,  ALL,   B,     A2,    M,   X),
    ACK:        (200,  N,     200,   200,   N,     200,   N,     N,     M,   X),
    SNAPSHOT:   (200,  N,     200,   200,   N,     200,   N,     N,     M,   X),
}
CELLS = [pytest.param(route, who, expected, id=f"{route.method} {route.path} as {who}")
         for route, row in MATRIX.items() for who, expected in zip(COLUMNS, row, strict=True)]


# ----------------------------------------------------------------------------- checks per route

async def check_success(route: Route, world: World, who: str, reply: Response, expected: Expected) -> None:
    body = reply.json if route not in (SNAPSHOT, DELETE) else None
    if isinstance(expected, frozenset):  # a list: exactly these streams, and every alert of them
        assert isinstance(body, dict)
        seen = Counter(item["streamId"] for item in body["items"])
        if route in (LIST, LIST_ALICE):
            assert seen == Counter(expected)
        else:
            assert seen == Counter({s: ALERTS_PER_STREAM[s] for s in expected})
            last_seqs = {s: ALERTS_PER_STREAM[s] for s in expected}
            assert body["lastSeq"] == (last_seqs["a1"] if route is HISTORY else last_seqs)
        assert body["nextCursor"] is None
        return
    assert isinstance(expected, int)
    if route is CREATE:
        assert body is not None and (body["streamId"], body["ownerId"]) == ("new-cam", sub_of(who))
        assert await world.stream_ids() == ALL | {"new-cam"}
    elif route is READ:
        assert body is not None and (body["streamId"], body["ownerId"], body["lastSeq"]) == ("a1", "alice", 2)
    elif route is DELETE:
        assert reply.body == b""
        assert await world.stream_ids() == {"a2", "b1"}
        assert await world.alert(world.alerts["a1"]) is None and await world.alert(world.alerts["a2"]) is not None
    elif route is ACK:
        assert body is not None and body["alertId"] == world.alerts["a1"]
        assert body["acknowledged"]["by"] == sub_of(who)
        stored = await world.alert(world.alerts["a1"])
        assert stored is not None and stored["acknowledged"]["by"] == sub_of(who)
    elif route is SNAPSHOT:
        assert reply.headers["Content-Type"] == "image/jpeg" and reply.body == JPEG


async def check_unchanged(world: World) -> None:
    """A refused request left the world as it was."""
    assert await world.stream_ids() == ALL
    stored = await world.alert(world.alerts["a1"])
    assert stored is not None and stored["acknowledged"] is None


@pytest.mark.parametrize(("route", "who", "expected"), CELLS)
async def test_route_answers_each_caller_as_the_permission_table_says(
        api: Api, ws_connect: Connect, token: MakeToken, route: Route, who: str, expected: Expected) -> None:
    world = await build_world(api, ws_connect, token)
    bearer = bearer_for(who, token)
    reply = await api(route.method, route.resolve(world), token=bearer, body=route.body)
    if not isinstance(expected, Err):
        wanted = expected if isinstance(expected, int) else 200
        assert reply.status == wanted, reply.body
        await check_success(route, world, who, reply, expected)
        return
    assert (reply.status, error_of(reply)["code"]) == (expected.status, expected.code), reply.body
    if expected.status == 404:
        # no existence leak: the same answer as for something that does not exist, but for the id
        missing = await api(route.method, route.resolve(world, missing=True), token=bearer, body=route.body)
        assert missing.status == 404
        if route in (ACK, SNAPSHOT):
            hidden_id, missing_id = world.alerts["a1-snap" if route is SNAPSHOT else "a1"], MISSING_ALERT
        else:
            hidden_id, missing_id = "a1", MISSING_STREAM
        assert error_of(reply) == {k: v.replace(missing_id, hidden_id) for k, v in error_of(missing).items()}
        assert missing.headers["Content-Type"] == reply.headers["Content-Type"]
    await check_unchanged(world)
