"""Transport settings: handshake/idle timeout, origin check, compression, size limit, server pings."""
from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
import tornado.httpclient
import tornado.websocket
import websockets

from conftest import frame_message, replace_settings


@pytest.fixture
def settings(settings, request):
    return replace_settings(settings, **getattr(request, "param", {}))


@pytest.mark.parametrize("settings", [{"idle_connection_timeout_s": 0.5}], indirect=True)
async def test_half_open_handshake_is_closed_after_the_idle_timeout(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hung up
    writer.close()


@pytest.mark.parametrize("settings", [{"trusted_origins": ("https://ops.example",)}], indirect=True)
async def test_websocket_from_an_untrusted_origin_is_refused(server, token):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
            server.ws_url, headers={"Origin": "https://evil.example"}))
    assert info.value.code == 403
    trusted = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
        server.ws_url, headers={"Origin": "https://ops.example"}))
    await trusted.write_message(json.dumps({"type": "ping", "id": "p"}))
    reply = await trusted.read_message()
    assert json.loads(reply)["type"] == "error"  # open and talking (unauthenticated ping is refused)
    trusted.close()
    same_site = await tornado.websocket.websocket_connect(tornado.httpclient.HTTPRequest(
        server.ws_url, headers={"Origin": f"http://127.0.0.1:{server.port}"}))
    same_site.close()


async def _relay_one_frame(server, token, compression):
    payload = os.urandom(70_000)
    async with websockets.connect(server.ws_url, compression=compression, max_size=None) as producer, \
            websockets.connect(server.ws_url, compression=compression, max_size=None) as consumer:
        await producer.send(json.dumps({"type": "register", "clientType": "mobile", "streamId": "z",
                                        "token": token("alice")}))
        await producer.recv()
        await consumer.send(json.dumps({"type": "subscribe", "clientType": "dashboard", "streamId": "z",
                                        "token": token("alice")}))
        await consumer.recv()
        await producer.send(json.dumps(frame_message("z", payload)))
        while (message := json.loads(await consumer.recv()))["type"] != "video-frame":
            pass
        assert base64.b64decode(message["data"]) == payload
        return consumer.protocol.extensions


async def test_compression_is_off_by_default_even_when_offered(server, token):
    assert await _relay_one_frame(server, token, "deflate") == []


@pytest.mark.parametrize("settings", [{"ws_compression": True}], indirect=True)
async def test_compression_when_enabled_is_negotiated_and_frames_still_flow(server, token):
    extensions = await _relay_one_frame(server, token, "deflate")
    assert [e.name for e in extensions] == ["permessage-deflate"]


@pytest.mark.parametrize("settings", [{"max_message_bytes": 100_000, "max_control_message_bytes": 50_000}],
                         indirect=True)
async def test_message_over_the_size_limit_closes_1009(server, ws_connect, token):
    client = await ws_connect()
    await client.send("x" * 150_000)
    assert (await client.closed())[0] == 1009


@pytest.mark.parametrize("settings", [{"ws_ping_interval_s": 0.2, "ws_ping_timeout_s": 0.2}], indirect=True)
async def test_server_pings_and_closes_a_peer_that_never_answers(server, token):
    from rawws import RawClient
    raw = await asyncio.to_thread(RawClient, server.port)
    raw.send_json({"type": "subscribe", "clientType": "dashboard", "streamId": "none", "token": token("alice")})
    opcodes = []
    try:
        while True:  # the raw client never answers pings
            opcode, _ = await asyncio.to_thread(raw.recv_frame, 3)
            opcodes.append(opcode)
            if opcode == 0x8:
                break
    except ConnectionError:
        pass
    assert 0x9 in opcodes and opcodes[-1] == 0x8  # the server pinged, then closed ("ping timed out")
    for _ in range(400):  # Tornado waits up to 5 s for the close reply before dropping the socket
        if not server.services.hub.peers:
            break
        await asyncio.sleep(0.02)
    assert not server.services.hub.peers  # and dropped the silent peer
    raw.close()
