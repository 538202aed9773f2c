"""A consumer that stops reading must not slow the producer or anyone else; its memory stays bounded."""
from __future__ import annotations

import asyncio
import json
import os
import struct

import pytest

from conftest import alert_message, frame_message, replace_settings
from rawws import RawClient

STREAM = "cam-1"
SOFT, HARD = 256 * 1024, 1024 * 1024


@pytest.fixture
def settings(settings):
    return replace_settings(settings, outbox_soft_bytes=SOFT, outbox_hard_bytes=HARD)


async def _setup(server, ws_connect, token):
    producer = await ws_connect()
    await producer.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
    await producer.recv_type("registered")
    healthy = await ws_connect()
    await healthy.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "token": token("alice")})
    await healthy.recv_type("subscribed")
    stalled = await asyncio.to_thread(RawClient, server.port)
    stalled.send_json({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "token": token("alice")})
    await asyncio.to_thread(stalled.recv_frame)  # `subscribed`; after this it never reads again
    # the newest connection on the server is the stalled one
    stalled_peer = list(server.services.hub.peers.values())[-1]
    assert stalled_peer.watching and stalled_peer.outbox.messages_sent == 1
    return producer, healthy, stalled, stalled_peer


async def test_stalled_dashboard_does_not_slow_producer_or_other_dashboard(server, ws_connect, token):
    producer, healthy, stalled, stalled_peer = await _setup(server, ws_connect, token)
    frames = 300
    received = 0
    max_backlog = 0

    async def read_healthy():
        nonlocal received
        while received < frames:
            message = await healthy.recv_type("video-frame", timeout=10)
            assert message["timestamp"] == received  # in order, none missing
            received += 1

    reader = asyncio.create_task(read_healthy())
    for i in range(frames):
        await producer.send(frame_message(STREAM, os.urandom(64 * 1024), timestamp=i))
        max_backlog = max(max_backlog, stalled_peer.outbox.backlog_bytes)
        if i % 20 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(reader, 20)

    assert received == frames  # the healthy dashboard got every frame (>= 99% required)
    frame_wire = 64 * 1024 * 4 // 3 + 200
    assert max_backlog <= SOFT + 2 * frame_wire  # bounded: frames beyond the soft limit were dropped
    assert stalled_peer.outbox.frames_dropped > frames // 2
    assert server.services.hub.figures()["framesDropped"] >= stalled_peer.outbox.frames_dropped
    assert not stalled_peer.outbox.is_closed  # frames alone never close a slow consumer
    stalled.close()


async def test_alerts_to_a_stalled_dashboard_are_kept_until_the_hard_limit_then_it_is_closed_4413(
        server, ws_connect, token):
    producer, healthy, stalled, stalled_peer = await _setup(server, ws_connect, token)
    ml = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM, "consumes": [],
                   "token": token("detector", role="service", streams=[STREAM])})
    await ml.recv_type("subscribed")
    big_note = "x" * 8000  # ~8 KB alerts reach the 1 MiB hard limit after ~130 of them
    sent = 0
    while not stalled_peer.outbox.is_closed and sent < 1000:
        await ml.send(alert_message(STREAM, message=big_note[:2000], metadata={"note": big_note[:8000]}))
        sent += 1
        await ml.recv_type("ack")
    assert stalled_peer.outbox.is_closed, "the stalled consumer was never closed"
    for seq in range(1, sent + 1):  # the healthy dashboard got every alert, in order
        assert (await healthy.recv_type("alert"))["seq"] == seq
    # the stalled client finds the close frame behind what was already buffered for it
    code = None
    while code is None:
        opcode, payload = await asyncio.to_thread(stalled.recv_frame, 10)
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0]
        elif opcode == 0x1:
            assert json.loads(payload)["type"] in ("alert", "status", "error")
    assert code == 4413
    stalled.close()
