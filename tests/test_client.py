"""watchout.client against a real server: reconnects across restarts, token refresh, analysis off the loop,
backoff, the frame queue, and alerts delivered once."""
from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import jwt
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.testing
import tornado.web
import tornado.websocket

from conftest import JPEG, Server, alert_message, producer, replace_settings, watcher
from handlers import DEFAULT_HANDLER, METRICS_ROUTES, ROUTES
from watchout.app import make_app, server_options
from watchout.client import (Ack, Alert, Backoff, Connection, Detection, Forbidden, MLService, Producer, Replaced,
                             ReplayComplete, StreamDeleted, Unauthorized, Watcher)
from watchout.errors import StoreUnavailable
from watchout.serve import stop_serving, wait_closed
from watchout.services import open_services
from watchout.store import Store, open_store
from watchout.store.sqlite import SQLiteStore

STREAM = "porch"
FAST = Backoff(base_s=0.05, cap_s=0.5)


@pytest.fixture
def settings(settings, request):
    return replace_settings(settings, **getattr(request, "param", {}))


async def _serve(settings, store: Store, port: int = 0):
    """The app over `store` on `port` (0: a free one), as `watchout serve` runs it; returns (server, stop).

    stop(abrupt=False) is SIGTERM: stop listening, finish alert writes, close sockets with 1001.
    stop(abrupt=True) drops every connection without a close frame, as when the process dies.
    """
    context = open_services(settings, store)
    services = await context.__aenter__()
    http = tornado.httpserver.HTTPServer(make_app(services, ROUTES + METRICS_ROUTES, DEFAULT_HANDLER),
                                         **server_options(services))
    if port:
        http.add_sockets(tornado.netutil.bind_sockets(port, "127.0.0.1"))
    else:
        sock, port = tornado.testing.bind_unused_port()
        http.add_sockets([sock])

    stopped = False

    async def stop(abrupt: bool = False) -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        timeout_s = services.settings.shutdown_timeout_s
        if abrupt:
            http.stop()
            for peer in list(services.hub.peers.values()):
                _drop(peer)
            await wait_closed(services.hub.peers, timeout_s)
        else:
            await stop_serving(services, [http], timeout_s)
        await context.__aexit__(None, None, None)

    return Server(services, port, http), stop


def _drop(peer: Any) -> None:
    """Close a server connection's TCP socket without a close frame, as a crash or a pulled cable does."""
    peer.writer.ws_connection.stream.close()


async def _until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _collect(feed, into: list[Any]) -> asyncio.Task[None]:
    async def run() -> None:
        async for item in feed:
            into.append(item)
    return asyncio.create_task(run())


def _stream_frames(phone: Producer, interval_s: float = 0.02) -> asyncio.Task[None]:
    async def run() -> None:
        timestamp = 0
        while True:
            timestamp += 1
            phone.send_frame(JPEG, timestamp_ms=timestamp)
            await asyncio.sleep(interval_s)
    return asyncio.create_task(run())


def _service_token(token):
    return lambda: token("detector", role="service", streams=[STREAM])


def _person(jpeg: bytes) -> Detection:
    return Detection("person detected", metadata={"confidence": 0.9, "objectType": "person"})


@pytest.mark.parametrize("abrupt", [False, True], ids=["sigterm", "crash"])
async def test_server_restart_mid_stream_clients_reconnect_and_the_watchers_alerts_equal_the_store(
        settings, token, abrupt):
    store = open_store(settings)
    await store.start(0.0)
    server, stop = await _serve(settings, store)
    url, port = server.ws_url, server.port
    phone = Producer(url, lambda: token("alice"), STREAM, backoff=FAST)
    # the dashboard comes back 0.5 s after the others: the alerts stored meanwhile must be replayed to it
    dash = Watcher(url, lambda: token("alice"), STREAM, backoff=Backoff(base_s=0.5, cap_s=0.5, random=lambda: 1.0))
    ml = MLService(url, _service_token(token), STREAM, _person, backoff=FAST)
    alerts: list[Alert] = []
    frames: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        phone.start()
        await phone.wait_ready(5)
        dash.start()
        ml.start()
        await dash.wait_ready(5)
        await ml.wait_ready(5)
        tasks += [_collect(dash.alerts(), alerts), _collect(dash.frames(), frames), _stream_frames(phone)]
        await _until(lambda: len(alerts) >= 10, what="alerts before the restart")

        await stop(abrupt=abrupt)
        await _until(lambda: "ready" not in (phone.state, dash.state, ml.state), what="clients to notice")
        frames_before, stored_before = len(frames), await store.count_alerts(STREAM)
        server, stop = await _serve(settings, store, port)

        await _until(lambda: len(frames) > frames_before + 10, what="frames after the restart")
        await _until(lambda: len(alerts) > stored_before + 10, what="alerts after the restart")
        assert (phone.connects, dash.connects, ml.connects) == (2, 2, 2)
        tasks.pop().cancel()  # no more frames, so no more alerts
        await ml.close()
        assert ml.unacked_alerts == 0 and ml.alerts_acked == ml.alerts_sent
        stored = await store.replay(STREAM, 0, 100_000)
        await _until(lambda: len(alerts) == len(stored), what="the watcher to catch up")
        assert [(a.seq, a.alert_id) for a in alerts] == [(d["seq"], d["alertId"]) for d in stored]
        assert [a.seq for a in alerts] == list(range(1, len(stored) + 1))
    finally:
        for task in tasks:
            task.cancel()
        for client in (phone, dash, ml):
            await client.close(timeout_s=0)
        await stop()
        store.close()


async def test_token_refresh_keeps_the_connection_open_past_the_first_tokens_expiry(server, token, ws_connect):
    issued: list[str] = []

    async def provider() -> str:
        issued.append(token("alice", ttl_s=2))
        return issued[-1]

    async with Producer(server.ws_url, provider, STREAM) as phone:
        await phone.wait_ready(5)
        dash = await watcher(ws_connect, token, STREAM)
        first_exp = jwt.decode(issued[0], options={"verify_signature": False})["exp"]
        # the server closes a connection at exp + leeway (0) + grace (0.5 s) unless a fresh token came
        await asyncio.sleep(first_exp + 0.5 + 1.0 - time.time())
        assert phone.connects == 1 and phone.last_close is None and phone.is_ready
        assert phone.token_refreshes >= 2 and len(issued) >= 3
        phone.send_frame(JPEG, timestamp_ms=42)
        assert (await dash.recv_type("video-frame"))["timestamp"] == 42


@pytest.mark.parametrize("settings", [{"ws_ping_interval_s": 0.5, "ws_ping_timeout_s": 0.5}], indirect=True)
async def test_slow_analyse_does_not_cause_a_ping_timeout_and_skips_frames_while_busy(server, token):
    def slow(jpeg: bytes) -> Detection:
        time.sleep(1.5)  # a CPU-heavy model holding its thread, three times the server's ping timeout
        return Detection("slow person", metadata={"objectType": "person"})

    async def ml_service() -> dict[str, Any]:
        # on a loop of its own, as in another process: a blocked client loop must not stall the server's pings
        async with MLService(server.ws_url, service_token, STREAM, slow) as ml:
            await ml.wait_ready(5)
            await asyncio.sleep(3.8)
            seen = {"connects": ml.connects, "last_close": ml.last_close, "ready": ml.is_ready,
                    "received": ml.frames_received, "analysed": ml.frames_analysed, "skipped": ml.frames_skipped}
            await _until(lambda: ml.alerts_acked >= 2, what="acks")
            return seen

    service_token = _service_token(token)()
    async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
        await phone.wait_ready(5)
        feeder = _stream_frames(phone, 0.05)
        try:
            seen = await asyncio.get_running_loop().run_in_executor(None, asyncio.run, ml_service())
        finally:
            feeder.cancel()
    assert (seen["connects"], seen["last_close"], seen["ready"]) == (1, None, True)
    assert seen["analysed"] >= 2 and seen["skipped"] > 20
    # the rest: one frame in analysis, one waiting for it
    assert 0 <= seen["received"] - seen["skipped"] - seen["analysed"] <= 2


def _closed_port() -> int:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()
    return port


async def test_reconnect_attempts_follow_capped_exponential_backoff_with_full_jitter():
    url = f"ws://127.0.0.1:{_closed_port()}/ws"

    async def schedule(backoff_random, attempts: int = 9) -> list[float]:
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            await asyncio.sleep(0)

        conn = Connection(url, "t", backoff=Backoff(base_s=0.2, cap_s=10.0, random=backoff_random, sleep=sleep))
        conn.start()
        await _until(lambda: len(waits) >= attempts, what="attempts")
        await conn.close()
        assert conn.connects == 0 and conn.state == "closed" and conn.error is None
        return waits[:attempts]

    bounds = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert await schedule(lambda: 1.0) == pytest.approx(bounds)
    seeded = random.Random(7)
    expected = [seeded.random() * bound for bound in bounds]
    assert await schedule(random.Random(7).random) == pytest.approx(expected)

    # and the attempts really are spaced that way
    starts: list[float] = []
    conn = Connection(url, "t", backoff=Backoff(base_s=0.05, cap_s=0.2, random=lambda: 1.0))
    conn.add_state_listener(lambda state: starts.append(time.monotonic()) if state == "connecting" else None)
    conn.start()
    await _until(lambda: len(starts) >= 5, what="attempts")
    await conn.close()
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    for gap, wanted in zip(gaps, [0.05, 0.1, 0.2, 0.2]):
        assert wanted - 0.01 <= gap < wanted + 0.2


async def test_frames_queued_while_disconnected_keep_only_the_newest(server, token, ws_connect):
    phone_ = await producer(ws_connect, token, STREAM)  # creates the stream, so a dashboard can watch it
    phone_.close()
    dash = await watcher(ws_connect, token, STREAM)
    phone = Producer(server.ws_url, lambda: token("alice"), STREAM, max_queued_frames=5)
    for timestamp in range(20):
        phone.send_frame(JPEG, timestamp_ms=timestamp)
    assert (phone.queued_frames, phone.frames_dropped) == (5, 15)
    async with phone:
        received = [(await dash.recv_type("video-frame"))["timestamp"] for _ in range(5)]
        assert received == [15, 16, 17, 18, 19]
        await _until(lambda: phone.frames_sent == 5, what="frames sent")


class GatedStore(SQLiteStore):
    """The first alert write waits for `gate`, so a connection can be cut while it is in flight."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.fail_first = False

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        if not self.entered.is_set():
            self.entered.set()
            if self.fail_first:
                raise StoreUnavailable("database did not answer")
            await self.gate.wait()
        return await super().insert_alerts(alerts)


@pytest.mark.parametrize("abrupt", [False, True], ids=["closed-1001", "dropped"])
async def test_an_alert_cut_off_before_its_ack_is_resent_with_its_id_and_stored_once(settings, token, abrupt):
    from conftest import start_server
    store = GatedStore()
    await store.start()
    server, close = await start_server(settings, store)
    try:
        async with Producer(server.ws_url, lambda: token("alice"), STREAM, alerts=False) as phone:
            await phone.wait_ready(5)  # the stream exists before the detector's alert
            conn = Connection(server.ws_url, _service_token(token), backoff=FAST)
            states: list[str] = []
            conn.add_state_listener(states.append)
            async with conn:
                await conn.wait_ready(5)
                sending = asyncio.create_task(conn.send_alert(STREAM, "person", alert_id="det-1"))
                await asyncio.wait_for(store.entered.wait(), 5)
                (peer,) = [p for p in server.services.hub.peers.values() if p.client_type is None]  # the detector
                if abrupt:
                    _drop(peer)
                else:
                    peer.close(1001, "going away")
                await _until(lambda: "waiting" in states, what="the disconnect")  # it may be back already
                store.gate.set()  # stored now, but its ack has no connection to go to
                ack: Ack = await asyncio.wait_for(sending, 5)
                assert conn.connects == 2 and ack.seq == 1 and ack.duplicate
                assert await store.count_alerts(STREAM) == 1
    finally:
        store.gate.set()  # else a failure above would leave the server's shutdown waiting for the write
        await close()


async def test_an_alert_refused_with_store_unavailable_is_resent_until_stored(settings, token):
    from conftest import start_server
    store = GatedStore()
    await store.start()
    store.fail_first = True
    server, close = await start_server(settings, store)
    try:
        async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
            await phone.wait_ready(5)  # the stream exists before the detector's alert
            async with Connection(server.ws_url, _service_token(token), backoff=FAST) as conn:
                await conn.wait_ready(5)
                ack = await asyncio.wait_for(conn.send_alert(STREAM, "person", alert_id="det-2"), 5)
                assert not ack.duplicate and conn.connects == 1  # seq 1 went with the failed write
                assert await store.count_alerts(STREAM) == 1
    finally:
        await close()


async def test_watcher_resumes_from_the_streams_last_seq_and_history_then_alerts_is_the_stored_list(server, token):
    async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
        await phone.wait_ready(5)
        async with Connection(server.ws_url, _service_token(token)) as ml:
            await ml.wait_ready(5)
            for i in range(5):
                await ml.send_alert(STREAM, f"alert {i}")
            slow = Backoff(base_s=0.3, cap_s=0.3, random=lambda: 1.0)
            async with Watcher(server.ws_url, lambda: token("alice"), STREAM, video=False, backoff=slow) as dash:
                await dash.wait_ready(5)
                # cut off before it saw any alert: it resumes after the lastSeq it started from, not from 0 or now
                (peer,) = [p for p in server.services.hub.peers.values() if p.client_type == "dashboard"]
                peer.close(1001, "going away")
                await _until(lambda: dash.state != "ready", what="the disconnect")
                await ml.send_alert(STREAM, "alert 5")  # stored while the dashboard is away
                live = await asyncio.wait_for(anext(dash.alerts()), 5)
                assert (live.seq, live.message, dash.connects) == (6, "alert 5", 2)
                await ml.send_alert(STREAM, "alert 6")
                past = await dash.history()
                assert [a.seq for a in past] == [1, 2, 3, 4, 5, 6, 7]
                await ml.send_alert(STREAM, "alert 7")
                later = [await asyncio.wait_for(anext(dash.alerts()), 5)]
                assert [a.seq for a in later] == [8] and later[0].message == "alert 7"
                stored = await server.services.store.replay(STREAM, 0, 100)
                assert [a.alert_id for a in past + later] == [d["alertId"] for d in stored]
                assert past[:2] == await _replayed(server, token)  # REST and WebSocket alerts compare equal


async def test_a_watcher_of_a_stream_not_created_yet_gets_all_its_alerts_once_it_exists(server, token):
    dash = Watcher(server.ws_url, lambda: token("alice"), STREAM, video=False)
    dash.resubscribe_s = 0.5
    async with dash:
        with pytest.raises(TimeoutError):
            await dash.wait_ready(0.2)  # not-found: the phone has not registered yet
        async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
            await phone.wait_ready(5)
            async with Connection(server.ws_url, _service_token(token)) as ml:
                await ml.wait_ready(5)
                await ml.send_alert(STREAM, "before the dashboard is in")
                assert dash.state == "open"
                first = await asyncio.wait_for(anext(dash.alerts()), 5)
                assert (first.seq, first.message) == (1, "before the dashboard is in")


async def test_a_since_seq_from_another_history_of_the_stream_id_starts_it_again_from_seq_0(server, token):
    async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
        await phone.wait_ready(5)
        async with Connection(server.ws_url, _service_token(token)) as ml:
            await ml.wait_ready(5)
            for i in range(3):
                await ml.send_alert(STREAM, f"alert {i}")
            # 50: the last seq seen of an earlier stream with this id, deleted and created again since
            dash = Watcher(server.ws_url, lambda: token("alice"), STREAM, video=False, since_seq=50)
            replays: list[ReplayComplete] = []
            dash.add_listener(lambda m: replays.append(m) if isinstance(m, ReplayComplete) else None)
            async with dash:
                alerts = [await asyncio.wait_for(anext(dash.alerts()), 5) for _ in range(3)]
                assert [a.seq for a in alerts] == [1, 2, 3]
                assert [(r.last_seq, r.complete) for r in replays] == [(50, False), (3, True)]


async def _replayed(server: Server, token) -> list[Alert]:
    """The first two alerts as a Watcher from sinceSeq 0 receives them over the WebSocket."""
    async with Watcher(server.ws_url, lambda: token("alice"), STREAM, video=False, since_seq=0) as dash:
        return [await asyncio.wait_for(anext(dash.alerts()), 5) for _ in range(2)]


class MisbehavingSocket(tornado.websocket.WebSocketHandler):
    """A stand-in server that repeats alerts and lets a replaced subscription's alert through first:
    what a client must survive (a failover, a race), which the real server does not do on demand."""

    def on_message(self, message: str | bytes) -> None:
        request = json.loads(message)
        assert request["type"] == "subscribe"
        since = request.get("sinceSeq", 0)
        if since:  # a live alert of the subscription being replaced, then the replay, then live
            self._send({"type": "alert", **_alert_fields(since + 2)})
        self._send({"type": "subscribed", "streamId": STREAM, "connectionId": "0" * 16, "status": "online",
                    "format": "binary", "ref": request["id"]})
        seqs = [1, 2, 2, 1, 3] if not since else [since + 1, since + 2, since + 2, since + 3]
        for seq in seqs:
            self._send({"type": "alert", **_alert_fields(seq)})
        self._send({"type": "replay-complete", "streamId": STREAM, "lastSeq": max(seqs), "complete": True})

    def _send(self, message: dict[str, Any]) -> None:
        self.write_message(json.dumps(message))


class MisbehavingHistory(tornado.web.RequestHandler):
    last_seq = 0

    def get(self, stream_id: str) -> None:
        seqs = range(self.last_seq, 0, -1)
        self.write({"items": [{**_alert_fields(seq), "receivedAt": "2026-11-26T10:00:00.000Z", "acknowledged": None,
                               "snapshotUrl": None} for seq in seqs], "nextCursor": None, "lastSeq": self.last_seq})


def _alert_fields(seq: int) -> dict[str, Any]:
    return {"streamId": STREAM, "severity": "high", "message": f"alert {seq}", "metadata": {}, "timestamp": seq,
            "alertId": f"{seq:024x}", "seq": seq, "receivedAt": 1764150000000}


async def test_watcher_never_repeats_or_reorders_alerts_even_when_the_server_does():
    app = tornado.web.Application([("/ws", MisbehavingSocket), (r"/api/streams/([^/]+)/alerts", MisbehavingHistory)])
    http = tornado.httpserver.HTTPServer(app)
    sock, port = tornado.testing.bind_unused_port()
    http.add_sockets([sock])
    try:
        async with Watcher(f"ws://127.0.0.1:{port}/ws", "t", STREAM, video=False) as dash:
            first = [await asyncio.wait_for(anext(dash.alerts()), 5) for _ in range(3)]
            assert [a.seq for a in first] == [1, 2, 3] and dash.alert_repeats == 2
            MisbehavingHistory.last_seq = 5
            assert [a.seq for a in await dash.history()] == [1, 2, 3, 4, 5]
            after = [await asyncio.wait_for(anext(dash.alerts()), 5) for _ in range(3)]
            assert [a.seq for a in after] == [6, 7, 8]
    finally:
        MisbehavingHistory.last_seq = 0
        http.stop()


async def test_a_replaced_producer_stops_with_replaced_and_does_not_reconnect(server, token, ws_connect):
    async with Producer(server.ws_url, lambda: token("alice"), STREAM, backoff=FAST) as phone:
        await phone.wait_ready(5)
        await producer(ws_connect, token, STREAM)  # a newer phone takes over
        error = await asyncio.wait_for(phone.wait_closed(), 5)
        assert isinstance(error, Replaced) and error.close_code == 4409 and error.code == "producer-replaced"
        await asyncio.sleep(0.3)
        assert phone.connects == 1 and phone.state == "closed"
        with pytest.raises(Replaced):
            phone.send_frame(JPEG)


async def test_a_forbidden_register_and_a_deleted_stream_end_the_connection_for_good(server, token, api):
    bobs = Producer(server.ws_url, lambda: token("bob"), STREAM, backoff=FAST)
    async with Producer(server.ws_url, lambda: token("alice"), STREAM, backoff=FAST) as phone:
        await phone.wait_ready(5)
        async with Watcher(server.ws_url, lambda: token("alice"), STREAM, backoff=FAST) as dash:
            await dash.wait_ready(5)
            async with bobs:
                with pytest.raises(Forbidden) as refused:
                    await bobs.wait_ready(5)
            assert (refused.value.close_code, refused.value.code, bobs.connects) == (4403, "forbidden", 1)
            assert (await api("DELETE", f"/api/streams/{STREAM}", token=token("alice"))).status == 204
            deleted = await asyncio.wait_for(dash.wait_closed(), 5)
            assert isinstance(deleted, StreamDeleted) and deleted.close_code == 4410
            with pytest.raises(StreamDeleted):
                await asyncio.wait_for(anext(dash.alerts()), 5)
            assert isinstance(await asyncio.wait_for(phone.wait_closed(), 5), StreamDeleted)
            await asyncio.sleep(0.2)
            assert (phone.connects, dash.connects) == (1, 1)


async def test_a_token_refused_again_after_a_fresh_one_is_unauthorized(server, token):
    calls: list[int] = []

    def expired() -> str:
        calls.append(1)
        return token("alice", ttl_s=-5)

    phone = Producer(server.ws_url, expired, STREAM, backoff=FAST)
    async with phone:
        with pytest.raises(Unauthorized) as caught:
            await phone.wait_ready(5)
    assert caught.value.close_code == 4401 and caught.value.code == "token-expired"
    assert phone.connects == 2 and len(calls) == 2  # the second try had a fresh token from the provider


async def test_alerts_reach_the_producer_and_messages_are_typed(server, token, ws_connect):
    async with Producer(server.ws_url, lambda: token("alice"), STREAM) as phone:
        await phone.wait_ready(5)
        ml = await ws_connect(headers={"Authorization": f"Bearer {_service_token(token)()}"})
        await ml.send(alert_message(STREAM, id="x-1"))
        alert = await asyncio.wait_for(anext(phone.alerts()), 5)
        assert (alert.stream_id, alert.seq, alert.severity, alert.metadata["objectType"]) == (STREAM, 1, "high",
                                                                                              "person")
        assert isinstance(alert.received_at_ms, int) and not alert.has_snapshot


async def test_a_watcher_across_a_restart_on_a_new_database_ends_with_exactly_the_stored_list(settings, token):
    """Issue 12, defect 1: a Watcher had seen seq 1-50; the server came back on an empty database and stored
    80 new alerts (seq 1-80). It must not resume at 51: its epoch tells the server its position was in
    another history, which is replayed from the start; (epoch, seq) then names every alert it yielded."""
    stores = [SQLiteStore(":memory:"), SQLiteStore(":memory:")]
    for store in stores:
        await store.start()
    server, stop = await _serve(settings, stores[0])
    port = server.port
    got: list[Alert] = []
    dash = Watcher(server.ws_url, lambda: token("alice"), STREAM, video=False, since_seq=0, backoff=FAST)
    dash.resubscribe_s = 0.1  # the stream does not exist yet on each database when it first asks
    async with dash:

        async def collect() -> None:
            async for alert in dash.alerts():
                got.append(alert)
        reader = asyncio.create_task(collect())
        try:
            for store, count in ((stores[0], 50), (stores[1], 80)):
                if store is stores[1]:
                    await stop(abrupt=True)
                    server, stop = await _serve(settings, store, port)  # the same address, a new database
                async with Producer(server.ws_url, lambda: token("alice"), STREAM, alerts=False) as phone:
                    await phone.wait_ready(5)
                    async with Connection(server.ws_url, _service_token(token), backoff=FAST) as ml:
                        await ml.wait_ready(5)
                        for i in range(count):
                            await ml.send_alert(STREAM, f"alert {i}", alert_id=f"{count}-{i}")
                    await _until(lambda: len(got) == 50 + (count if count == 80 else 0), what=f"{count} alerts")
        finally:
            reader.cancel()
            await stop()
    first, second = {a.epoch for a in got[:50]}, {a.epoch for a in got[50:]}
    assert len(first) == len(second) == 1 and first != second and None not in first | second
    stored = await stores[1].replay(STREAM, 0, 1000)
    assert [(a.seq, a.alert_id) for a in got[50:]] == [(a["seq"], a["alertId"]) for a in stored]  # 1..80, not 51..80
    assert [a.seq for a in got[:50]] == list(range(1, 51)) and dash.history_resets == 1
    for store in stores:
        store.close()
