"""Two Watchout nodes in one process, over one shared store, each with its own connection to a real Redis.

Everything between the nodes crosses Redis (127.0.0.1:6379, a key prefix of its own per test).
"""
from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis
import tornado.httpclient
import tornado.websocket

from tests.conftest import JPEG, Client, Server, alert_message, frame_message, replace_settings, require_services, \
    start_server
from watchout.frames import encode_binary_frame
from watchout.settings import Settings
from watchout.store import Store

REDIS_URL = "redis://127.0.0.1:6379/0"


async def redis_answers(url: str = REDIS_URL) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    if not await redis_answers():
        if require_services():
            pytest.fail("Redis does not answer on 127.0.0.1:6379 (WATCHOUT_REQUIRE_SERVICES=1)")
        pytest.skip("Redis does not answer on 127.0.0.1:6379")
    name = f"wotest:{uuid.uuid4().hex[:12]}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def node_settings(settings: Settings, prefix: str, name: str, url: str = REDIS_URL) -> Settings:
    return replace_settings(settings, broker_url=url, broker_prefix=prefix, broker_heartbeat_s=0.2, node_id=name)


class Cluster:
    def __init__(self, settings: Settings, prefix: str) -> None:
        self.settings = settings
        self.prefix = prefix
        self.store: Store = Store.open(settings)
        self.nodes: list[Server] = []
        self.closers: list[Any] = []
        self.clients: list[Client] = []

    async def start_node(self, name: str, url: str = REDIS_URL) -> Server:
        server, close = await start_server(node_settings(self.settings, self.prefix, name, url), self.store)
        self.nodes.append(server)
        self.closers.append(close)
        return server

    async def connect(self, node: Server | str) -> Client:
        url = node if isinstance(node, str) else node.ws_url
        conn = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(url),
                                                         max_message_size=64 << 20)
        client = Client(conn)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:  # a node a test killed already
                pass
        self.store.close()


@pytest.fixture
async def cluster(settings: Settings, prefix: str) -> AsyncIterator[Cluster]:
    c = Cluster(settings, prefix)
    yield c
    await c.close()


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def register(client: Client, token: str, stream_id: str, consumes: list[str] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "register", "clientType": "mobile", "streamId": stream_id, "token": token}
    if consumes is not None:
        message["consumes"] = consumes
    await client.send(message)
    return await client.recv_type("registered")


async def subscribe(client: Client, token: str, stream_id: str, client_type: str = "dashboard",
                    **extra: Any) -> dict[str, Any]:
    await client.send({"type": "subscribe", "clientType": client_type, "streamId": stream_id, "token": token,
                       **extra})
    return await client.recv_type("subscribed")


async def channel_listeners(prefix: str, channel: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        counts = await client.pubsub_numsub(prefix + channel)
        return int(counts[0][1])
    finally:
        await client.aclose()


async def recv_frame(client: Client, timeout: float = 5.0) -> str | bytes:
    """The next video frame (JSON text or binary), skipping other messages."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        raw = await client.recv_raw(max(0.01, deadline - asyncio.get_running_loop().time()))
        assert raw is not None, "closed"
        if isinstance(raw, bytes) or json.loads(raw).get("type") == "video-frame":
            return raw


# ---------------------------------------------------------------------------------------------- tests

async def test_producer_on_one_node_reaches_dashboards_and_ml_on_the_other(cluster: Cluster, token: Any) -> None:
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "porch", consumes=["alert"])
    dash_json = await cluster.connect(n2)
    sub = await subscribe(dash_json, token("alice"), "porch")
    assert sub["status"] == "online"  # the producer is on the other node
    dash_bin = await cluster.connect(n2)
    await subscribe(dash_bin, token("alice"), "porch", format="binary")
    ml = await cluster.connect(n2)
    await subscribe(ml, token("detector", role="service", streams=["porch"]), "porch", client_type="ml-service")
    local_dash = await cluster.connect(n1)
    await subscribe(local_dash, token("alice"), "porch", consumes=["alert"])
    await eventually(lambda: channel_listeners(cluster.prefix, "v:porch"), what="node 2 listens for frames")

    # frames: node 1 -> node 2, in the form each dashboard asked for; the first frame says `streaming`
    jpeg = JPEG + b"cross-node"
    await phone.send(frame_message("porch", jpeg, timestamp=42, width=640, height=480))
    await dash_json.recv_type("status", status="streaming")
    raw = await recv_frame(dash_json)
    assert isinstance(raw, str)
    message = json.loads(raw)
    assert (message["streamId"], base64.b64decode(message["data"]), message["timestamp"]) == ("porch", jpeg, 42)
    assert (message["width"], message["height"]) == (640, 480)
    assert await recv_frame(dash_bin) == encode_binary_frame("porch", jpeg, 42, 640, 480)
    assert (await recv_frame(ml)) is not None

    # an alert from the ML service on node 2: stored once, acked, reaches the phone and the dashboards on both nodes
    await ml.send(alert_message("porch", id="a-1"))
    ack = await ml.recv_type("ack", ref="a-1")
    got = [await c.recv_type("alert", alertId=ack["alertId"]) for c in (phone, dash_json, dash_bin, local_dash)]
    assert {g["seq"] for g in got} == {ack["seq"]}
    stored = await cluster.store.replay("porch", 0, 10)
    assert [a["alertId"] for a in stored] == [ack["alertId"]]

    # acknowledged through REST on node 1: the dashboard on node 2 hears it
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        n1.url(f"/api/alerts/{ack['alertId']}/ack"), method="POST", body="{}",
        headers={"Authorization": f"Bearer {token('alice')}", "Content-Type": "application/json"})
    assert response.code == 200
    event = await dash_json.recv_type("alert-acknowledged")
    assert event["alertId"] == ack["alertId"]

    # the phone leaves: node 2's dashboards hear `offline`; node 2 stops listening for the stream's frames
    phone.close()
    await dash_json.recv_type("status", status="offline")
    for c in (dash_json, dash_bin, ml):
        c.close()
    await eventually(lambda: _zero(channel_listeners(cluster.prefix, "v:porch")), what="node 2 unsubscribed")


async def _zero(value: Any) -> bool:
    return await value == 0


async def test_each_message_is_delivered_once_when_both_nodes_have_watchers(cluster: Cluster, token: Any) -> None:
    """A node hears its own messages back from Redis and must skip them."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "yard")
    watchers = [await cluster.connect(n) for n in (n1, n2)]
    for w in watchers:
        await subscribe(w, token("alice"), "yard")
    ml = await cluster.connect(n1)
    await subscribe(ml, token("svc", role="service", streams="*"), "yard", client_type="ml-service", consumes=[])
    await eventually(lambda: channel_listeners(cluster.prefix, "v:yard"), what="subscriptions")
    await asyncio.sleep(0.1)
    for i in range(5):
        await phone.send(frame_message("yard", timestamp=i + 1))
    for i in range(3):
        await ml.send(alert_message("yard", id=f"x{i}"))
    for w in watchers:
        frames, alerts = [], []
        while len(frames) < 5 or len(alerts) < 3:
            raw = await w.recv_raw()
            assert isinstance(raw, str)
            m = json.loads(raw)
            if m["type"] == "video-frame":
                frames.append(m["timestamp"])
            elif m["type"] == "alert":
                alerts.append(m["seq"])
        assert frames == [1, 2, 3, 4, 5]
        assert alerts == [1, 2, 3]
        with pytest.raises(asyncio.TimeoutError):  # and nothing twice
            while True:
                raw = await w.recv_raw(timeout=0.4)
                assert isinstance(raw, str) and json.loads(raw)["type"] not in ("video-frame", "alert")


async def test_a_second_producer_on_the_other_node_takes_over(cluster: Cluster, token: Any) -> None:
    """Newer producer wins across nodes: the first gets `producer-replaced` and 4409; watchers see no `offline`."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    first = await cluster.connect(n1)
    await register(first, token("alice"), "door")
    dash = await cluster.connect(n1)
    await subscribe(dash, token("alice"), "door")
    second = await cluster.connect(n2)
    await register(second, token("alice"), "door")
    error = await first.recv_type("error")
    assert error["code"] == "producer-replaced"
    assert (await first.closed())[0] == 4409
    await second.send(frame_message("door", timestamp=7))
    raw = await recv_frame(dash)
    assert isinstance(raw, str) and json.loads(raw)["timestamp"] == 7
    lease = redis.Redis.from_url(REDIS_URL)
    try:
        holder = await lease.get(f"{cluster.prefix}producer:door")
    finally:
        await lease.aclose()
    assert holder is not None and holder.decode().startswith("node-2 ")
    assert n1.services.hub.streams["door"].producer is None
    # no `offline` reached the dashboard between the two producers
    with pytest.raises(asyncio.TimeoutError):
        await dash.recv_type("status", timeout=0.5, status="offline")


async def test_cluster_stats_are_the_sum_of_the_nodes(cluster: Cluster, token: Any) -> None:
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    for stream, node in (("s1", n1), ("s2", n2), ("s3", n2)):
        await register(await cluster.connect(node), token("alice"), stream)
    await subscribe(await cluster.connect(n1), token("alice"), "s2")
    await subscribe(await cluster.connect(n2), token("alice"), "s1")
    await subscribe(await cluster.connect(n2), token("alice"), "s1", client_type="ml-service")
    client = tornado.httpclient.AsyncHTTPClient()
    admin = {"Authorization": f"Bearer {token('root', role='admin')}"}

    async def stats(node: Server, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await client.fetch(node.url("/stats"), headers=headers or {})
        result: dict[str, Any] = json.loads(response.body)
        return result

    async def settled() -> bool:
        view = await stats(n1, admin)
        return view["nodeCount"] == 2 and view["totalConnections"] == 6
    await eventually(settled, what="both nodes reported")
    for node in (n1, n2):
        view = await stats(node, admin)
        by_node = {n["node"]: n for n in view["nodes"]}
        assert set(by_node) == {"node-1", "node-2"}
        for server, name in ((n1, "node-1"), (n2, "node-2")):
            local = server.services.hub.figures()
            for key in ("totalProducers", "totalVideoConsumers", "totalAlertConsumers", "totalConnections"):
                assert by_node[name][key] == local[key], (name, key)
        for key in ("totalProducers", "totalVideoConsumers", "totalAlertConsumers", "totalConnections",
                    "framesRelayed", "framesDropped"):
            assert view[key] == sum(n[key] for n in view["nodes"]), key
        assert (view["totalProducers"], view["totalConnections"]) == (3, 6)
        assert view["activeStreams"] == ["s1", "s2", "s3"]
        assert view["node"] == ("node-1" if node is n1 else "node-2")
    public = await stats(n2)
    assert public["activeStreamCount"] == 3 and "activeStreams" not in public and "nodes" not in public


async def test_a_node_that_stops_reporting_drops_out_of_the_stats(cluster: Cluster, token: Any) -> None:
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    await register(await cluster.connect(n2), token("alice"), "gone")
    client = tornado.httpclient.AsyncHTTPClient()

    async def count() -> int:
        body = json.loads((await client.fetch(n1.url("/stats"))).body)
        return int(body["nodeCount"])
    await eventually(lambda: _equals(count(), 2), what="two nodes")
    await kill_node(n2)
    await eventually(lambda: _equals(count(), 1), timeout=3.0, what="node 2 dropped out")


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def kill_node(node: Server) -> None:
    """Stop a node abruptly: listening socket closed, connections dropped without close frames, Redis cut."""
    node.http.stop()
    for peer in list(node.services.hub.peers.values()):
        handler: Any = peer.writer
        if handler is not None and handler.ws_connection is not None:
            handler.ws_connection.stream.close()  # no close frame
    broker: Any = node.services.broker
    for task in broker._tasks:
        task.cancel()
    await asyncio.gather(*broker._tasks, return_exceptions=True)
    broker._tasks = []
    if broker._redis is not None:
        await broker._redis.connection_pool.disconnect()


async def test_garbage_on_a_stream_channel_is_logged_and_changes_nothing(cluster: Cluster, token: Any,
                                                                        caplog: Any) -> None:
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "gate")
    dash = await cluster.connect(n2)
    await subscribe(dash, token("alice"), "gate")
    await eventually(lambda: channel_listeners(cluster.prefix, "v:gate"), what="subscriptions")
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        for junk in (b"", b"A", b"A\x05ab", b"A\x02n9\x00\x01", b"F\x02n9notaframe", b"Zunknown-kind",
                     b"S\x02n9{not json", b"C\x02n9"):
            await raw.publish(f"{cluster.prefix}s:gate", junk)
            await raw.publish(f"{cluster.prefix}v:gate", junk)
    finally:
        await raw.aclose()
    await phone.send(frame_message("gate", timestamp=99))
    frame = await recv_frame(dash)
    assert isinstance(frame, str) and json.loads(frame)["timestamp"] == 99
    assert any("malformed" in r.getMessage() for r in caplog.records)
