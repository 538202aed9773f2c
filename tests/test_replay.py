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


# ------------------------------------------------------------------ histories with an identity (epoch)

async def _subscribe(ws_connect, token, **position):
    dash = await ws_connect()
    await dash.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "consumes": ["alert"],
                     "token": token("alice"), **position})
    return dash, await dash.recv_type("subscribed")


async def test_a_position_from_a_deleted_and_recreated_stream_replays_the_new_history_from_its_start(
        server, ws_connect, token, api):
    phone = await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 50)
    old = (await api("GET", f"/api/streams/{STREAM}/alerts?limit=1", token=token("alice"))).json
    assert old["lastSeq"] == 50 and old["epoch"]
    assert (await api("DELETE", f"/api/streams/{STREAM}", token=token("alice"))).status == 204
    phone.close()
    ml.close()
    await producer(ws_connect, token, STREAM)  # the same id, registered again: a new history
    ml = await _ml(ws_connect, token)
    assert await _send_acked(ml, 80) == list(range(1, 81))

    dash, subscribed = await _subscribe(ws_connect, token, sinceSeq=old["lastSeq"], epoch=old["epoch"])
    assert subscribed["reset"] is True and subscribed["epoch"] != old["epoch"]
    seqs, done = await _collect_until_complete(dash)
    assert seqs == list(range(1, 81))  # not 51-80: those would skip the new history's first 50
    assert done["reset"] is True and done["complete"] is False and done["lastSeq"] == 80

    # the new position continues exactly, with complete: true
    again, subscribed = await _subscribe(ws_connect, token, sinceSeq=80, epoch=subscribed["epoch"])
    assert "reset" not in subscribed and subscribed["lastSeq"] == 80
    assert await _collect_until_complete(again) == ([], {"type": "replay-complete", "streamId": STREAM,
                                                         "lastSeq": 80, "complete": True})


async def test_a_position_beyond_the_histories_end_is_from_another_history(server, ws_connect, token, api):
    """Same epoch, a seq the history never reached (say, the database was restored from an older backup)."""
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 5)
    epoch = (await api("GET", f"/api/streams/{STREAM}/alerts", token=token("alice"))).json["epoch"]
    dash, subscribed = await _subscribe(ws_connect, token, sinceSeq=9, epoch=epoch)
    assert subscribed["reset"] is True
    seqs, done = await _collect_until_complete(dash)
    assert seqs == [1, 2, 3, 4, 5] and done["complete"] is False


async def test_without_an_epoch_sinceseq_is_taken_as_it_is(server, ws_connect, token):
    """Clients from before epochs keep their behaviour: no reset, `complete: false` when out of range."""
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await _send_acked(ml, 5)
    dash, subscribed = await _subscribe(ws_connect, token, sinceSeq=9)
    assert "reset" not in subscribed and subscribed["epoch"]
    assert await _collect_until_complete(dash) == ([], {"type": "replay-complete", "streamId": STREAM,
                                                        "lastSeq": 9, "complete": False})
