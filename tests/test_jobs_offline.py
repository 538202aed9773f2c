"""Marking silent producers offline, called directly with an injected clock (no waiting for the threshold)."""
from __future__ import annotations

import asyncio
import datetime as dt

from conftest import frame_message, producer, watcher
from workers.clock import Instant
from workers.offline import check_producers, mark_unseen_offline

STREAM = "cam"


def _at(base: Instant, mono: float) -> Instant:
    """The instant at monotonic reading `mono`, on both clocks."""
    return base.later(mono - base.mono)


async def _status(store, stream_id):
    doc = await store.get_stream(stream_id)
    return doc["status"], doc["lastSeenAt"]


async def test_a_producer_silent_past_offline_after_is_closed_and_marked_offline_and_watchers_told(
        server, ws_connect, token):
    services = server.services
    after = services.settings.offline_after_s
    phone = await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    peer = services.hub.streams[STREAM].producer
    base = Instant.now()
    heard_wall = base.wall_at(peer.last_heard)

    check = await check_producers(services, _at(base, peer.last_heard + after - 0.01))  # just before
    assert check.silent == [] and check.live == 1
    assert services.hub.streams[STREAM].producer is peer
    assert (await _status(services.store, STREAM))[0] == "online"

    check = await check_producers(services, _at(base, peer.last_heard + after + 0.01))  # just after
    assert check.silent == [STREAM]
    assert (await dash.recv_type("status"))["status"] == "offline"
    code, reason = await phone.closed()
    assert code == 1000 and "nothing heard" in reason
    status, last_seen = await _status(services.store, STREAM)
    assert status == "offline"
    # lastSeenAt stays true: when the producer was last heard, not when the job noticed
    assert abs((last_seen - heard_wall).total_seconds()) < 0.01


async def test_frames_and_pongs_count_as_heard(server, ws_connect, token):
    services = server.services
    after = services.settings.offline_after_s
    phone = await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    peer = services.hub.streams[STREAM].producer
    registered = peer.last_heard

    await asyncio.sleep(0.05)
    await phone.send(frame_message(STREAM))
    await dash.recv_type("video-frame")
    assert peer.last_heard > registered

    framed = peer.last_heard
    await asyncio.sleep(0.05)
    peer.writer.ping(b"")  # the server's WebSocket ping; the client's library answers with a pong
    for _ in range(100):
        if peer.last_heard > framed:
            break
        await asyncio.sleep(0.01)
    assert peer.last_heard > framed

    # silent for offline_after_s since the registration, but not since the pong: still online
    base = Instant.now()
    check = await check_producers(services, _at(base, registered + after + 0.06))
    assert check.silent == [] and services.hub.streams[STREAM].producer is peer


async def test_each_check_saves_live_producers_last_seen_and_last_frame(server, ws_connect, token):
    services = server.services
    phone = await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    await phone.send(frame_message(STREAM))
    await dash.recv_type("video-frame")
    await asyncio.sleep(0.05)
    _, first_seen = await _status(services.store, STREAM)  # saved when the stream started streaming
    await phone.send(frame_message(STREAM, timestamp=2))  # a later frame: only a check saves it
    await dash.recv_type("video-frame")
    peer = services.hub.streams[STREAM].producer
    base = Instant.now()
    await check_producers(services, _at(base, peer.last_heard + 1.0))
    doc = await services.store.get_stream(STREAM)
    assert doc["lastSeenAt"] > first_seen + dt.timedelta(milliseconds=40)
    assert abs((doc["lastSeenAt"] - base.wall_at(peer.last_heard)).total_seconds()) < 0.01
    assert abs(doc["lastFrameAt"].timestamp() - services.hub.streams[STREAM].last_frame_at) < 0.01


async def test_streams_no_live_node_vouches_for_are_marked_offline_after_the_threshold(server, ws_connect, token):
    services, store = server.services, server.services.store
    settings = services.settings
    # "orphan" was left online by a node that stopped; "here" has its producer on this node
    await store.create_stream("orphan", "alice", status="online")
    _, seen = await _status(store, "orphan")
    dash = await watcher(ws_connect, token, "orphan")
    await producer(ws_connect, token, "here")
    threshold = dt.timedelta(seconds=settings.offline_after_s + settings.offline_check_s)

    assert await mark_unseen_offline(services, seen + threshold) == []  # lastSeenAt not yet before the cutoff
    assert (await _status(store, "orphan"))[0] == "online"

    later = seen + threshold + dt.timedelta(milliseconds=1)
    assert await mark_unseen_offline(services, later) == ["orphan"]
    assert (await dash.recv_type("status"))["status"] == "offline"
    status, last_seen = await _status(store, "orphan")
    assert status == "offline" and last_seen == seen
    assert (await _status(store, "here"))[0] == "online"  # live here, whatever its stored lastSeenAt


async def test_checks_save_frames_and_online_time_per_hour(server, ws_connect, token):
    services = server.services
    phone = await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    for i in range(3):
        await phone.send(frame_message(STREAM, timestamp=i))
        await dash.recv_type("video-frame")
    base = Instant.now()
    await check_producers(services, base)
    phone.close()
    await dash.recv_type("status", status="offline")
    await check_producers(services, base.later(0.5))  # the time online up to the disconnect is kept
    hour = base.wall.replace(minute=0, second=0, microsecond=0)
    rows = await services.store.usage_between(hour - dt.timedelta(hours=1), base.wall + dt.timedelta(hours=1))
    assert sum(r["framesIn"] for r in rows) == 3
    assert sum(r["framesRelayed"] for r in rows) == 3
    online = sum(r["onlineS"] for r in rows)
    assert 0 < online < 10
    await check_producers(services, base.later(100))  # offline since: no more time online
    rows = await services.store.usage_between(hour - dt.timedelta(hours=1), base.wall + dt.timedelta(hours=1))
    assert sum(r["onlineS"] for r in rows) == online
