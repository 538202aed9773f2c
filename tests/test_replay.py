"""subscribe with sinceSeq: stored alerts after it, then replay-complete, then live; no gap, no repeat."""
from __future__ import annotations

import asyncio

import pytest

from conftest import alert_message, producer, replace_settings, watcher

STREAM = "porch"


async def _ml(ws_connect, token):
    return await watcher(ws_connect, token, STREAM, client_type="ml-service", consumes=[], sub="detector",
                         role="service", streams=[STREAM])


async def _send_acked(ml, count, start=0):
    for i in range(start, start + count):
        await ml.send(alert_message(STREAM, message=f"alert {i}", id=f"id-{i}"))
    return [(await ml.recv_type("ack"))["seq"] for _ in range(count)]


async def _collect_until_complete(client):
    seqs = []
    while True:
        message = await client.recv()
        if message["type"] == "alert":
            seqs.append(message["seq"])
        elif message["type"] == "replay-complete":
            return seqs, message


async def test_replay_sends_stored_alerts_after_since_seq_then_completes_then_goes_live(server, ws_connect, token):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    assert await _send_acked(ml, 10) == list(range(1, 11))
    dash = await watcher(ws_connect, token, STREAM, sinceSeq=4)
    seqs, done = await _collect_until_complete(dash)
    assert seqs == list(range(5, 11))
    assert done == {"type": "replay-complete", "streamId": STREAM, "lastSeq": 10, "complete": True}
    await _send_acked(ml, 1, start=10)
    assert (await dash.recv_type("alert"))["seq"] == 11


@pytest.fixture
def settings(settings, request):
    # a small soft limit makes the replay pause between pages, so live alerts really arrive mid-replay
    return replace_settings(settings, **getattr(request, "param", {}))


@pytest.mark.parametrize("settings", [{"outbox_soft_bytes": 16 * 1024}], indirect=True)
async def test_replay_while_alerts_keep_arriving_has_no_gap_and_no_duplicate(server, ws_connect, token):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 1100)  # more than two replay pages are stored already
    total = 1600

    async def keep_sending():
        for i in range(1100, total):
            await ml.send(alert_message(STREAM, id=f"id-{i}"))
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # spread over the replay, however fast the store is

    sender = asyncio.create_task(keep_sending())
    dash = await watcher(ws_connect, token, STREAM, sinceSeq=0)
    seqs, done = await _collect_until_complete(dash)
    assert done["complete"] is True and done["lastSeq"] == seqs[-1]
    # alerts were stored while the replay ran, and keep coming after it
    assert server.services.intake.stored > 1100 and not sender.done()
    await sender
    while len(seqs) < total:
        seqs.append((await dash.recv_type("alert"))["seq"])
    assert seqs == list(range(1, total + 1))
    assert await server.services.store.count_alerts(STREAM) == total


async def test_replayed_alerts_look_like_live_ones(server, ws_connect, token):
    await producer(ws_connect, token, STREAM)
    live = await watcher(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 1)
    live_alert = await live.recv_type("alert")
    late = await watcher(ws_connect, token, STREAM, sinceSeq=0)
    (seqs, _), = [await _collect_until_complete(late)]
    assert seqs == [1]
    # the same message, field for field, whether it arrived live or was replayed
    replayed = await (await watcher(ws_connect, token, STREAM, sinceSeq=0)).recv_type("alert")
    assert replayed == live_alert


async def test_since_seq_from_another_history_is_reported_incomplete(server, ws_connect, token):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 3)
    dash = await watcher(ws_connect, token, STREAM, sinceSeq=50)
    seqs, done = await _collect_until_complete(dash)
    assert seqs == [] and done["complete"] is False and done["lastSeq"] == 50


async def test_frames_flow_during_replay_and_unsubscribe_ends_it(server, ws_connect, token):
    from conftest import frame_message
    phone = await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 600)
    dash = await watcher(ws_connect, token, STREAM, sinceSeq=0)
    await phone.send(frame_message(STREAM, timestamp=99))
    assert (await dash.recv_type("video-frame", timeout=10))["timestamp"] == 99
    await dash.send({"type": "unsubscribe", "streamId": STREAM})
    await dash.recv_type("unsubscribed")
    assert server.services.hub.streams[STREAM].replaying == {}
