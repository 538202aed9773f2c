"""The REST API with the WebSocket relay: history then live without gaps, stream life cycle, acks, snapshots."""
from __future__ import annotations

import asyncio
import base64

from conftest import JPEG, alert_message, frame_message, producer, watcher

STREAM = "porch"


async def _ml(ws_connect, token, stream=STREAM):
    return await watcher(ws_connect, token, stream, client_type="ml-service", consumes=[], sub="detector",
                         role="service", streams=[stream])


async def test_dashboard_reads_history_in_pages_then_goes_live_with_no_gap_and_no_duplicate(
        server, ws_connect, token, api):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    for i in range(120):
        await ml.send(alert_message(STREAM, message=f"alert {i}", id=f"k{i}"))
    for _ in range(120):
        await ml.recv_type("ack")
    total = 400
    sending = asyncio.Event()

    async def keep_sending():  # the ML service never stops while the dashboard catches up
        for i in range(120, total):
            await ml.send(alert_message(STREAM, message=f"alert {i}", id=f"k{i}"))
            sending.set()
            await asyncio.sleep(0.001)

    sender = asyncio.create_task(keep_sending())
    await sending.wait()
    history, cursor, last_seq = [], None, None
    while True:  # newest first, several pages, all pinned at the first page's lastSeq
        path = f"/api/streams/{STREAM}/alerts?limit=50" + (f"&cursor={cursor}" if cursor else "")
        page = (await api("GET", path, token=token("alice"))).json
        last_seq = page["lastSeq"] if last_seq is None else last_seq
        assert page["lastSeq"] == last_seq
        history.extend(item["seq"] for item in page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert history == list(range(last_seq, 0, -1)) and len(history) > 100
    dash = await watcher(ws_connect, token, STREAM, sinceSeq=last_seq)
    live = []
    while True:
        message = await dash.recv()
        if message["type"] == "alert":
            live.append(message["seq"])
        elif message["type"] == "replay-complete":
            break
    await sender
    while last_seq + len(live) < total:
        live.append((await dash.recv_type("alert"))["seq"])
    combined = sorted(history) + live
    stored = [a["seq"] for a in await server.services.store.replay(STREAM, 0, 1000)]
    assert combined == stored == list(range(1, total + 1))


async def test_registered_stream_goes_online_shows_live_figures_and_delete_closes_its_sockets(
        server, ws_connect, token, api):
    created = await api("POST", "/api/streams", token=token("alice"), body={"name": "Front door", "streamId": "door"})
    assert created.status == 201 and created.headers["Location"] == "/api/streams/door"
    assert created.json["ownerId"] == "alice" and created.json["status"] == "offline"
    phone = await producer(ws_connect, token, "door")
    dash = await watcher(ws_connect, token, "door")
    for i in range(30):
        await phone.send(frame_message("door", timestamp=i))
        await asyncio.sleep(0.01)
    for _ in range(30):
        await dash.recv_type("video-frame")
    listing = (await api("GET", "/api/streams?status=streaming", token=token("alice"))).json
    assert [s["streamId"] for s in listing["items"]] == ["door"]
    detail = (await api("GET", "/api/streams/door", token=token("alice"))).json
    live = detail["live"]
    assert detail["status"] == "streaming" and live["producerConnected"] is True and live["consumers"] == 1
    assert live["framesRelayed"] == 30 and live["framesDropped"] == 0 and 0 <= live["lastFrameAgeMs"] < 5000
    deleted = await api("DELETE", "/api/streams/door", token=token("alice"))
    assert deleted.status == 204
    for client in (phone, dash):
        assert (await client.recv_type("error"))["code"] == "stream-deleted"
        assert (await client.closed())[0] == 4410
    assert (await api("GET", "/api/streams/door", token=token("alice"))).status == 404


async def test_acknowledging_an_alert_is_stored_and_pushed_to_the_dashboards(server, ws_connect, token, api):
    await producer(ws_connect, token, STREAM)
    dash = await watcher(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await ml.send(alert_message(STREAM))
    alert_id = (await ml.recv_type("ack"))["alertId"]
    await dash.recv_type("alert")
    acked = await api("POST", f"/api/alerts/{alert_id}/ack", token=token("alice"))
    assert acked.status == 200 and acked.json["acknowledged"]["by"] == "alice"
    pushed = await dash.recv_type("alert-acknowledged")
    assert pushed["alertId"] == alert_id and pushed["acknowledged"]["by"] == "alice"
    again = await api("POST", f"/api/alerts/{alert_id}/ack", token=token("root", role="admin"))
    assert again.json["acknowledged"] == acked.json["acknowledged"]  # the first acknowledgement stays
    unacked = (await api("GET", "/api/alerts?acknowledged=false", token=token("alice"))).json
    assert unacked["items"] == []


async def test_alert_snapshot_is_served_with_the_same_permission_check(server, ws_connect, token, api):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    await ml.send(alert_message(STREAM, snapshot=base64.b64encode(JPEG).decode()))
    alert_id = (await ml.recv_type("ack"))["alertId"]
    item = (await api("GET", f"/api/streams/{STREAM}/alerts", token=token("alice"))).json["items"][0]
    assert item["snapshotUrl"] == f"/api/alerts/{alert_id}/snapshot.jpg"
    image = await api("GET", item["snapshotUrl"], token=token("alice"))
    assert image.status == 200 and image.body == JPEG and image.headers["Content-Type"] == "image/jpeg"
    assert (await api("GET", item["snapshotUrl"], token=token("bob"))).status == 404


async def test_history_filters_by_severity_time_and_after_seq(server, ws_connect, token, api):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    for severity in ("low", "high", "critical", "low", "medium"):
        await ml.send(alert_message(STREAM, severity=severity))
        await ml.recv_type("ack")
    alice = token("alice")
    pick = await api("GET", f"/api/streams/{STREAM}/alerts?severity=low,critical", token=alice)
    assert [i["seq"] for i in pick.json["items"]] == [4, 3, 1]
    after = await api("GET", f"/api/streams/{STREAM}/alerts?afterSeq=3", token=alice)
    assert [i["seq"] for i in after.json["items"]] == [5, 4]
    future = await api("GET", "/api/alerts?since=2999-01-01T00:00:00Z", token=alice)
    assert future.json == {"items": [], "nextCursor": None, "lastSeq": {}, "epoch": {}}
    everything = await api("GET", "/api/alerts?until=2999-01-01T00:00:00Z&limit=2", token=alice)
    assert len(everything.json["items"]) == 2 and everything.json["lastSeq"] == {STREAM: 5}
    rest = await api("GET", f"/api/alerts?limit=2&cursor={everything.json['nextCursor']}", token=alice)
    seen = [i["seq"] for i in everything.json["items"] + rest.json["items"]]
    assert len(seen) == 4 and len(set(seen)) == 4


async def test_bodies_far_over_the_limit_get_413_json_before_they_are_read(server, token, api):
    huge = b'{"name": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    response = await api("POST", "/api/streams", token=token("alice"), body=huge)
    assert response.status == 413 and response.json["error"]["code"] == "too-large"
    assert (await api("GET", "/api/streams", token=token("alice"))).json["items"] == []


async def test_alert_metadata_keys_mongodb_refuses_are_invalid_not_retryable(server, ws_connect, token):
    await producer(ws_connect, token, STREAM)
    ml = await _ml(ws_connect, token)
    for metadata in ({"a\u0000b": 1}, {"$where": "1"}, {"box": [{"$x": 1}]}):
        await ml.send(alert_message(STREAM, metadata=metadata, id="k"))
        assert (await ml.recv_type("error"))["code"] == "invalid-field"
    assert await server.services.store.count_alerts(STREAM) == 0
