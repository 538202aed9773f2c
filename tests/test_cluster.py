"""Two Watchout nodes in one process, over one shared store, each with its own connection to a real Redis.

Everything between the nodes crosses Redis (127.0.0.1:6379, a key prefix of its own per test).
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis
import tornado.httpclient
import tornado.websocket

from conftest import (JPEG, Client, OwnService, Server, alert_message, frame_message, mongomock_store,
                      replace_settings, require_services, start_server)
from test_client import _collect, _stream_frames
from watchout.client import Backoff, Detection, MLService, Producer, Watcher
from watchout.frames import encode_binary_frame
from watchout.settings import Settings
from watchout.store.mongo import MongoStore

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
        self.store: MongoStore = mongomock_store()  # several nodes share MongoDB
        self.nodes: list[Server] = []
        self.closers: list[Any] = []
        self.clients: list[Client] = []

    async def start_node(self, name: str, url: str = REDIS_URL) -> Server:
        if not self.nodes:
            await self.store.start(0.0)
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
    assert holder is not None and holder.decode().split("|")[1] == "node-2"
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


async def test_garbage_on_a_stream_channel_is_logged_and_changes_nothing(
        cluster: Cluster, token: Any, caplog: Any) -> None:
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


class Balancer:
    """A TCP proxy standing in for the load balancer: new connections go to the current target node."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def test_a_node_dies_and_its_clients_resume_on_the_other_with_every_alert_once(
        cluster: Cluster, token: Any) -> None:
    """Producer on node 1; dashboard and ML service on node 2 through the balancer. Node 2 dies abruptly;
    they reconnect (to node 1) and the dashboard's alerts equal the store's: none missing, none twice."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    balancer = Balancer(n2.port)
    await balancer.start()
    fast = Backoff(base_s=0.05, cap_s=0.3)
    phone = Producer(n1.ws_url, lambda: token("alice"), "porch", backoff=fast)
    dash = Watcher(balancer.ws_url, lambda: token("alice"), "porch", backoff=fast)
    ml = MLService(balancer.ws_url, lambda: token("detector", role="service", streams=["porch"]), "porch",
                   lambda jpeg: Detection("person", metadata={"confidence": 0.9, "objectType": "person"}),
                   backoff=fast)
    alerts: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        phone.start()
        await phone.wait_ready(5)
        dash.start()
        ml.start()
        await dash.wait_ready(5)
        await ml.wait_ready(5)
        tasks += [_collect(dash.alerts(), alerts), _stream_frames(phone)]
        await eventually(lambda: len(alerts) >= 10, what="alerts across the nodes")

        balancer.target = n1.port
        await kill_node(n2)
        await eventually(lambda: dash.connects >= 2 and ml.connects >= 2, what="reconnected through the balancer")
        assert all(peer.principal is None or peer.principal.sub in ("alice", "detector")
                   for peer in n1.services.hub.peers.values())
        stored_then = await cluster.store.count_alerts("porch")
        await eventually(lambda: len(alerts) > stored_then + 10, what="alerts after node 2 died")
        tasks.pop().cancel()  # no more frames, so no more alerts
        await ml.close()
        assert ml.unacked_alerts == 0
        stored = await cluster.store.replay("porch", 0, 100_000)
        await eventually(lambda: len(alerts) == len(stored), what="the dashboard to catch up")
        assert [(a.seq, a.alert_id) for a in alerts] == [(d["seq"], d["alertId"]) for d in stored]
        assert [a.seq for a in alerts] == list(range(1, len(stored) + 1))
        assert phone.connects == 1  # the producer's node never went away
    finally:
        for task in tasks:
            task.cancel()
        for client in (phone, dash, ml):
            await client.close()
        await balancer.close()


class OwnRedis(OwnService):
    """A redis-server of this test's own, to stop and start again without disturbing anyone else."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    async def answers(self) -> bool:
        return await redis_answers(self.url)


@pytest.fixture
async def own_redis(prefix: str) -> AsyncIterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        if require_services():
            pytest.fail("redis-server is not installed (WATCHOUT_REQUIRE_SERVICES=1)")
        pytest.skip("redis-server is not installed")
    server = OwnRedis()
    await server.start()
    yield server
    server.stop()


async def test_redis_stopped_and_restarted(own_redis: OwnRedis, cluster: Cluster, token: Any) -> None:
    """Local delivery never stops, /health says degraded, the node idles; once Redis is back cross-node
    delivery resumes by itself and the other node's dashboard gets the alerts raised meanwhile, once each."""
    n1 = await cluster.start_node("node-1", own_redis.url)
    n2 = await cluster.start_node("node-2", own_redis.url)
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "porch")
    near, far = await cluster.connect(n1), await cluster.connect(n2)
    await subscribe(near, token("alice"), "porch")
    await subscribe(far, token("alice"), "porch")
    ml = await cluster.connect(n1)
    await subscribe(ml, token("detector", role="service", streams=["porch"]), "porch", client_type="ml-service",
                    consumes=[])
    received: dict[str, list[dict[str, Any]]] = {"near": [], "far": []}

    async def read(name: str, client: Client) -> None:
        while (raw := await client.conn.read_message()) is not None:
            assert isinstance(raw, str)
            received[name].append({**json.loads(raw), "at": time.monotonic()})
    readers = [asyncio.create_task(read("near", near)), asyncio.create_task(read("far", far))]

    def seen(name: str, kind: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [m for m in received[name] if m["type"] == kind and m["at"] > after]

    stamp, alert_no = 0, 0

    async def send_for(seconds: float) -> None:
        nonlocal stamp, alert_no
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            stamp += 1
            await phone.send(frame_message("porch", timestamp=stamp))
            if stamp % 5 == 0:
                alert_no += 1
                await ml.send(alert_message("porch", id=f"al-{alert_no}"))
            await asyncio.sleep(0.05)

    http = tornado.httpclient.AsyncHTTPClient()
    try:
        await send_for(0.6)
        assert seen("far", "video-frame") and seen("far", "alert")

        own_redis.stop()
        await eventually(lambda: not n1.services.broker.healthy, what="node 1 to notice")
        down_at, cpu_at = time.monotonic(), time.process_time()
        await send_for(3.0)
        cpu_s, wall_s = time.process_time() - cpu_at, time.monotonic() - down_at
        health = json.loads((await http.fetch(n1.url("/health"), raise_error=False)).body)
        assert health["status"] == "degraded" and health["stats"]["brokerAvailable"] is False
        metrics = (await http.fetch(n1.url("/metrics"))).body.decode()
        assert "watchout_broker_up 0.0" in metrics
        assert float(metrics.split("\nwatchout_broker_frames_dropped_total ")[1].split()[0]) >= 50
        near_frames = [m["at"] for m in seen("near", "video-frame", down_at)]
        assert len(near_frames) >= 50  # ~60 sent: local delivery went on
        assert max(b - a for a, b in zip(near_frames, near_frames[1:])) < 0.5
        assert not seen("far", "video-frame", down_at + 0.3)  # nothing crossed meanwhile
        assert cpu_s < 0.3 * wall_s, f"{cpu_s:.2f} s CPU in {wall_s:.2f} s with Redis away"

        await own_redis.start()
        back_at = time.monotonic()
        await eventually(lambda: n1.services.broker.healthy and n2.services.broker.healthy, timeout=10.0,
                         what="both nodes to reconnect")
        await send_for(0.5)
        await eventually(lambda: seen("far", "video-frame", back_at), what="frames to cross again")
        stored = await cluster.store.replay("porch", 0, 1000)
        assert len(stored) == alert_no
        await eventually(lambda: len(seen("far", "alert")) == len(stored), what="the far dashboard to catch up")
        assert [m["seq"] for m in seen("far", "alert")] == [d["seq"] for d in stored]
        assert [m["seq"] for m in seen("near", "alert")] == [d["seq"] for d in stored]
        health = json.loads((await http.fetch(n1.url("/health"))).body)
        assert health["status"] == "healthy"
        metrics = (await http.fetch(n2.url("/metrics"))).body.decode()
        assert "watchout_broker_up 1.0" in metrics and "watchout_broker_reconnects_total 1.0" in metrics
    finally:
        for task in readers:
            task.cancel()


async def test_ml_services_on_both_nodes_alerting_one_stream_reach_every_watcher_in_order(
        cluster: Cluster, token: Any) -> None:
    """Two nodes write one stream's alerts by turns (writer lease): every watcher on either node gets the
    stored list exactly, in seq order, and the history's lastSeq never runs ahead of a missing alert."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "hall")
    watchers = {"w1": await cluster.connect(n1), "w2": await cluster.connect(n2)}
    for w in watchers.values():
        await subscribe(w, token("alice"), "hall", consumes=["alert"])
    services = [await cluster.connect(n) for n in (n1, n2)]
    for ml in services:
        await subscribe(ml, token("svc", role="service", streams="*"), "hall", client_type="ml-service", consumes=[])
    await eventually(lambda: _equals(channel_listeners(cluster.prefix, "s:hall"), 2), what="subscriptions")

    async def fire(ml: Client, name: str) -> None:
        for i in range(40):
            await ml.send(alert_message("hall", id=f"{name}-{i}"))
            if i % 7 == 0:
                await asyncio.sleep(0.003)
    await asyncio.gather(fire(services[0], "a"), fire(services[1], "b"))
    for ml in services:
        for _ in range(40):
            await ml.recv_type("ack", timeout=10.0)
    stored = await cluster.store.replay("hall", 0, 1000)
    assert len(stored) == 80
    doc = await cluster.store.get_stream("hall")
    assert doc is not None and doc["lastSeq"] == stored[-1]["seq"]
    for name, w in watchers.items():
        seqs = []
        while len(seqs) < 80:
            seqs.append((await w.recv_type("alert", timeout=5.0))["seq"])
        assert seqs == [d["seq"] for d in stored], name


async def test_the_seed_client_flow_with_clients_split_across_nodes(cluster: Cluster, token: Any) -> None:
    """The seed document's examples, message for message: the phone on node 1, dashboard and ML on node 2."""
    import test_seed_clients
    seed_flow = test_seed_clients.test_seed_examples_frames_reach_dashboard_and_ml_and_alerts_reach_mobile_and_dashboard
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    nodes = iter([n1, n2, n2])  # mobile, dashboard, ML service, in the order the flow connects them

    async def connect() -> Client:
        return await cluster.connect(next(nodes))
    await seed_flow(connect, token)


async def test_a_dashboard_joining_on_another_node_gets_the_next_frame(cluster: Cluster, token: Any) -> None:
    """While nobody else listens the producer's node keeps frames off Redis; a node that starts listening
    says so, and the very next frame crosses (no wait for the once-a-second re-check)."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "shed")
    for stamp in (1, 2, 3):  # nobody on node 2 yet: these find no listener and quiet the stream
        await phone.send(frame_message("shed", timestamp=stamp))
    broker: Any = n1.services.broker
    await eventually(lambda: n1.services.hub.streams["shed"].frames_in == 3 and "shed" in broker._quiet_until
                     and not broker._queue, what="node 1 to hold frames back")
    dash = await cluster.connect(n2)
    await subscribe(dash, token("alice"), "shed")
    await eventually(lambda: "shed" not in broker._quiet_until, timeout=0.9, what="node 2's notice")
    await phone.send(frame_message("shed", timestamp=4))
    raw = await recv_frame(dash, timeout=0.9)
    assert isinstance(raw, str) and json.loads(raw)["timestamp"] == 4


async def test_deleting_a_stream_on_one_node_closes_its_connections_on_every_node(
        cluster: Cluster, token: Any) -> None:
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "attic")
    far = await cluster.connect(n2)
    await subscribe(far, token("alice"), "attic")
    other_phone = await cluster.connect(n1)
    await register(other_phone, token("alice"), "cellar")  # another stream: untouched
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        n2.url("/api/streams/attic"), method="DELETE", headers={"Authorization": f"Bearer {token('alice')}"})
    assert response.code == 204
    for client in (phone, far):
        assert (await client.recv_type("error"))["code"] == "stream-deleted"
        assert (await client.closed())[0] == 4410
    await other_phone.send(frame_message("cellar", timestamp=1))
    await other_phone.send({"type": "ping"})
    assert (await other_phone.recv_type("pong"))["type"] == "pong"


async def test_a_node_idle_for_several_heartbeats_still_subscribes(cluster: Cluster, token: Any) -> None:
    """The pub/sub link keeps itself alive while it listens to nothing, and a late first subscription works."""
    n1, n2 = await cluster.start_node("node-1"), await cluster.start_node("node-2")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "barn")
    await asyncio.sleep(1.0)  # 5 heartbeats of 0.2 s with nothing to listen to on node 2
    dash = await cluster.connect(n2)
    started = time.monotonic()
    await subscribe(dash, token("alice"), "barn")
    assert time.monotonic() - started < 0.5  # Redis confirmed it: no 1 s wait
    await phone.send(frame_message("barn", timestamp=5))
    raw = await recv_frame(dash)
    assert isinstance(raw, str) and json.loads(raw)["timestamp"] == 5


async def test_two_producers_accepted_while_redis_was_away_the_newer_keeps_the_stream(
        own_redis: OwnRedis, cluster: Cluster, token: Any) -> None:
    n1 = await cluster.start_node("node-1", own_redis.url)
    n2 = await cluster.start_node("node-2", own_redis.url)
    own_redis.stop()
    await eventually(lambda: not n1.services.broker.healthy and not n2.services.broker.healthy,
                     what="both nodes to notice")
    older = await cluster.connect(n1)
    await register(older, token("alice"), "loft")
    await asyncio.sleep(0.05)
    newer = await cluster.connect(n2)
    await register(newer, token("alice"), "loft")
    await own_redis.start()
    assert (await older.recv_type("error", timeout=10.0))["code"] == "producer-replaced"
    assert (await older.closed())[0] == 4409
    await asyncio.sleep(0.6)  # a few more heartbeats: the newer one stays
    assert n2.services.hub.streams["loft"].producer is not None
    await newer.send({"type": "ping"})
    await newer.recv_type("pong")


async def test_a_node_started_while_redis_is_down_serves_locally_then_joins(own_redis: OwnRedis, cluster: Cluster,
                                                                            token: Any) -> None:
    own_redis.stop()
    n1 = await cluster.start_node("node-1", own_redis.url)  # starts anyway: Redis is optional for local clients
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "dock")
    near = await cluster.connect(n1)
    await subscribe(near, token("alice"), "dock")
    await phone.send(frame_message("dock", timestamp=1))
    raw = await recv_frame(near)
    assert isinstance(raw, str) and json.loads(raw)["timestamp"] == 1
    health = json.loads((await tornado.httpclient.AsyncHTTPClient().fetch(n1.url("/health"))).body)
    assert health["status"] == "degraded"
    await own_redis.start()
    n2 = await cluster.start_node("node-2", own_redis.url)
    await eventually(lambda: n1.services.broker.healthy, timeout=10.0, what="node 1 to reach Redis")
    far = await cluster.connect(n2)
    await subscribe(far, token("alice"), "dock")
    await phone.send(frame_message("dock", timestamp=2))
    raw = await recv_frame(far, timeout=3.0)
    assert isinstance(raw, str) and json.loads(raw)["timestamp"] == 2


async def test_a_claim_older_than_the_local_producer_does_not_close_it(cluster: Cluster, token: Any) -> None:
    """A claim that was still on its way while a newer producer registered here loses; a newer one wins."""
    n1 = await cluster.start_node("node-1")
    phone = await cluster.connect(n1)
    await register(phone, token("alice"), "pier")
    lease = n1.services.broker._claims["pier"]  # type: ignore[attr-defined]
    claimed_at = int(lease.split("|")[0])
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        stale = f"{claimed_at - 50}|node-9|c0ffee".encode()
        await raw.publish(f"{cluster.prefix}s:pier", b"P\x06node-9" + stale)
        await phone.send({"type": "ping"})
        await phone.recv_type("pong")
        await asyncio.sleep(0.2)
        assert n1.services.hub.streams["pier"].producer is not None
        newer = f"{claimed_at + 50}|node-9|c0ffee".encode()
        await raw.publish(f"{cluster.prefix}s:pier", b"P\x06node-9" + newer)
    finally:
        await raw.aclose()
    assert (await phone.recv_type("error"))["code"] == "producer-replaced"
    assert (await phone.closed())[0] == 4409
