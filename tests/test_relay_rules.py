"""Rules of the relay that earlier versions got wrong: each test fails without its fix."""
from __future__ import annotations

import asyncio

from conftest import alert_message, producer


async def test_token_accepted_by_a_failing_first_message_still_expires(server, ws_connect, token):
    client = await ws_connect()
    await client.send({"type": "subscribe", "clientType": "dashboard", "streamId": "nope",
                       "token": token("alice", ttl_s=1)})
    assert (await client.recv_type("error"))["code"] == "not-found"  # authenticated, but the message failed
    code, _ = await client.closed(timeout=4)
    assert code == 4401


async def test_register_refused_for_a_second_stream_creates_nothing(server, ws_connect, token):
    mobile = await producer(ws_connect, token, "first")
    await mobile.send({"type": "register", "clientType": "mobile", "streamId": "second", "token": token("alice")})
    assert (await mobile.recv_type("error"))["code"] == "invalid-client-type"
    assert await server.services.store.get_stream("second") is None


async def test_probing_streams_without_live_peers_leaves_no_state_behind(server, ws_connect, token):
    mobile = await producer(ws_connect, token, "quiet")
    mobile.close()
    while server.services.hub.streams:
        await asyncio.sleep(0.01)
    ml = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": "other", "consumes": [],
                   "token": token("detector", role="service", streams="*")})
    assert (await ml.recv_type("error"))["code"] == "not-found"
    await ml.send(alert_message("quiet", id="q1"))  # stored although nobody watches it here
    assert (await ml.recv_type("ack"))["seq"] == 1
    assert server.services.hub.streams == {}


async def test_same_alert_id_from_two_senders_is_two_alerts(server, ws_connect, token):
    await producer(ws_connect, token, "cam")
    acks = []
    for sender in ("detector-a", "detector-b"):
        ml = await ws_connect()
        await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": "cam", "consumes": [],
                       "token": token(sender, role="service", streams=["cam"])})
        await ml.recv_type("subscribed")
        await ml.send(alert_message("cam", id="frame-17"))
        acks.append(await ml.recv_type("ack"))
    assert [a["seq"] for a in acks] == [1, 2] and not any(a.get("duplicate") for a in acks)


async def test_admin_token_scope_limits_watching_too(server, ws_connect, token):
    await producer(ws_connect, token, "cam")
    admin = await ws_connect()
    await admin.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam",
                      "token": token("root", role="admin", streams=["elsewhere"])})
    assert (await admin.recv_type("error"))["code"] == "not-found"


async def test_refresh_with_a_narrower_scope_drops_subscriptions_it_no_longer_allows(server, ws_connect, token):
    for stream in ("a", "b"):
        await producer(ws_connect, token, stream)
    dash = await ws_connect()
    for stream in ("a", "b"):
        await dash.send({"type": "subscribe", "clientType": "dashboard", "streamId": stream,
                         "token": token("alice", streams=["a", "b"])})
        await dash.recv_type("subscribed", streamId=stream)
    await dash.send({"type": "auth", "token": token("alice", streams=["a"])})
    error = await dash.recv_type("error")
    assert (error["code"], error["streamId"]) == ("not-found", "b")
    await dash.recv_type("authenticated")
    peer = next(p for p in server.services.hub.peers.values() if p.watching)
    assert set(peer.watching) == {"a"}
