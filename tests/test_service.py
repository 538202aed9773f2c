"""The service as an operator meets it: `watchout serve` start-up, SIGTERM, producer takeover, /health, /stats."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys

import tornado.httpclient
import tornado.websocket

from conftest import Client, alert_message, frame_message, producer, watcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_serve(env_extra: dict[str, str]) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_")}
    env.update({"WATCHOUT_PORT": str(port), "WATCHOUT_DATA_DIR": ":memory:", **env_extra})
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", "serve", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines: list[str] = []
    assert proc.stdout is not None
    while not any("Stats:" in line for line in lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line, "watchout serve exited early:\n" + "".join(lines)
        lines.append(line)
    if "WATCHOUT_JWT_SECRET" not in env_extra:  # then the admin token's two lines follow
        lines.append((await asyncio.wait_for(proc.stdout.readline(), 5)).decode())
        lines.append((await asyncio.wait_for(proc.stdout.readline(), 5)).decode())
    return proc, port, lines


async def test_embedded_serve_prints_urls_and_a_working_admin_token_and_warns_data_is_not_kept():
    proc, port, lines = await _start_serve({})
    try:
        output = "".join(lines)
        assert f"ws://127.0.0.1:{port}/ws" in output and f"http://127.0.0.1:{port}/health" in output
        assert "nothing is kept" in output
        admin = re.search(r"(eyJ[\w-]+\.[\w-]+\.[\w-]+)", output).group(1)
        request = tornado.httpclient.HTTPRequest(f"http://127.0.0.1:{port}/stats",
                                                 headers={"Authorization": f"Bearer {admin}"})
        stats = json.loads((await tornado.httpclient.AsyncHTTPClient().fetch(request)).body)
        assert stats["activeStreams"] == [] and stats["totalConnections"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_sigterm_closes_clients_with_1001_stores_pending_alerts_and_exits_0():
    secret = "sigterm-secret-0123456789abcdef0123456789"
    proc, port, _ = await _start_serve({"WATCHOUT_JWT_SECRET": secret})
    from watchout.auth import mint_token
    user = mint_token(secret, "HS256", "alice", "user")
    ml_token = mint_token(secret, "HS256", "detector", "service", streams="*")
    url = f"ws://127.0.0.1:{port}/ws"
    mobile = Client(await tornado.websocket.websocket_connect(url))
    await mobile.send({"type": "register", "clientType": "mobile", "streamId": "s1", "token": user})
    await mobile.recv_type("registered")
    ml = Client(await tornado.websocket.websocket_connect(url))
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": "s1", "token": ml_token})
    await ml.recv_type("subscribed")
    for i in range(20):
        await ml.send(alert_message("s1", id=f"k{i}"))
    await mobile.recv_type("alert")  # alerts are flowing
    proc.send_signal(signal.SIGTERM)
    acks = 0
    while (raw := await asyncio.wait_for(ml.conn.read_message(), 10)) is not None:
        acks += json.loads(raw)["type"] == "ack"
    assert acks == 20  # every accepted alert was stored and acknowledged before the close
    assert ml.conn.close_code == 1001
    assert (await mobile.closed())[0] == 1001
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_serve_refuses_a_port_in_use_with_a_clear_message():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchout", "serve", "--port", str(port),
            env={**os.environ, "WATCHOUT_JWT_SECRET": "x" * 40, "WATCHOUT_DATA_DIR": ":memory:"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(result.communicate(), 20)
    assert result.returncode == 1
    assert b"cannot listen" in out and b"Traceback" not in out


async def test_newer_producer_takes_over_and_the_old_one_is_closed_4409(server, ws_connect, token):
    old = await producer(ws_connect, token, "cam")
    dash = await watcher(ws_connect, token, "cam")
    new = await producer(ws_connect, token, "cam")
    assert (await old.recv_type("error"))["code"] == "producer-replaced"
    assert (await old.closed())[0] == 4409
    await new.send(frame_message("cam", timestamp=42))
    assert (await dash.recv_type("video-frame"))["timestamp"] == 42
    figures = server.services.hub.figures()
    assert figures["totalProducers"] == 1 and figures["totalVideoConsumers"] == 1


async def test_producer_disconnect_sends_offline_status_to_watchers(server, ws_connect, token):
    mobile = await producer(ws_connect, token, "cam")
    dash = await watcher(ws_connect, token, "cam")
    await mobile.send(frame_message("cam"))
    assert (await dash.recv_type("status"))["status"] == "streaming"
    mobile.close()
    assert (await dash.recv_type("status"))["status"] == "offline"
    stream = await server.services.store.get_stream("cam")
    for _ in range(50):
        if stream["status"] == "offline":
            break
        await asyncio.sleep(0.02)
        stream = await server.services.store.get_stream("cam")
    assert stream["status"] == "offline" and stream["lastSeenAt"] is not None


async def test_health_and_stats_have_the_seeds_shape_and_show_stream_ids_only_to_admins(server, ws_connect, token):
    await producer(ws_connect, token, "cam")
    await watcher(ws_connect, token, "cam")
    http = tornado.httpclient.AsyncHTTPClient()
    health = json.loads((await http.fetch(server.url("/health"))).body)
    assert health["status"] == "healthy" and "timestamp" in health
    expected = {"totalProducers": 1, "totalVideoConsumers": 1, "totalAlertConsumers": 2, "totalConnections": 2}
    assert {k: health["stats"][k] for k in expected} == expected
    assert "activeStreams" not in health["stats"] and health["stats"]["activeStreamCount"] == 1
    as_user = await http.fetch(tornado.httpclient.HTTPRequest(
        server.url("/stats"), headers={"Authorization": f"Bearer {token('alice')}"}))
    assert "activeStreams" not in json.loads(as_user.body)
    as_admin = json.loads((await http.fetch(tornado.httpclient.HTTPRequest(
        server.url("/stats"), headers={"Authorization": f"Bearer {token('root', role='admin')}"}))).body)
    assert as_admin["activeStreams"] == ["cam"]
    assert {k: as_admin[k] for k in expected} == expected
    bad = await http.fetch(tornado.httpclient.HTTPRequest(server.url("/stats"),
                                                          headers={"Authorization": "Bearer nope"}), raise_error=False)
    assert bad.code == 401 and json.loads(bad.body)["error"]["code"] == "token-invalid"


async def test_closed_connections_are_freed_without_the_cycle_collector(server, ws_connect, token):
    """A closed connection must leave no reference cycle: collecting thousands of them at once is a
    pause of hundreds of milliseconds that every stream would feel as latency."""
    import gc
    gc.collect()
    clients = []
    for i in range(10):
        client = await ws_connect()
        if i % 2 == 0:
            await client.send({"type": "register", "clientType": "mobile", "streamId": f"c{i}",
                               "token": token("alice")})
        else:
            await client.send({"type": "subscribe", "clientType": "dashboard", "streamId": f"c{i - 1}",
                               "token": token("alice")})
        await client.recv()
        clients.append(client)
    for client in clients:
        client.close()
    while server.services.hub.peers:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ("RelaySocket", "Peer", "Outbox")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []


async def test_metrics_port_serves_metrics_alone_and_the_main_port_stops_serving_them():
    metrics_port = _free_port()
    proc, port, lines = await _start_serve({"WATCHOUT_JWT_SECRET": "m" * 40,
                                            "WATCHOUT_METRICS_PORT": str(metrics_port)})
    try:
        assert f"http://127.0.0.1:{metrics_port}/metrics" in "".join(lines)
        http = tornado.httpclient.AsyncHTTPClient()
        scraped = await http.fetch(f"http://127.0.0.1:{metrics_port}/metrics")
        assert b"watchout_connections" in scraped.body
        assert (await http.fetch(f"http://127.0.0.1:{metrics_port}/health", raise_error=False)).code == 404
        assert (await http.fetch(f"http://127.0.0.1:{port}/metrics", raise_error=False)).code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
