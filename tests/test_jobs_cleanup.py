"""Pruning with an injected clock: each threshold just before and just after, retention and prunedSeq, dry runs."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt

from conftest import alert_message, producer, replace_settings, start_server, watcher
from watchout.store import AlertFilter
from workers.cleanup import cleanup, prune_old_alerts, prune_stale_streams

MS = dt.timedelta(milliseconds=1)


async def _ids(store):
    return sorted(s["streamId"] for s in await store.list_streams(None, None, 100))


async def _alerts(store, stream_id):
    return sorted(await store.stream_history(stream_id, 10**9, AlertFilter(), 100), key=lambda a: a["seq"])


async def _send_alerts(ml, stream_id, count, **extra):
    acks = []
    for _ in range(count):
        await ml.send(alert_message(stream_id, **extra))
        acks.append(await ml.recv_type("ack"))
    return acks


async def test_a_registered_stream_never_seen_goes_just_after_stale_after_h_and_its_sockets_close(
        server, ws_connect, token):
    services, store = server.services, server.services.store
    stale = dt.timedelta(hours=services.settings.stale_after_h)
    doc = await store.create_stream("fresh", "alice", "Front door")
    dash = await watcher(ws_connect, token, "fresh")

    assert await prune_stale_streams(services, doc["createdAt"] + stale) == []  # not yet older than the limit
    assert await _ids(store) == ["fresh"]

    removed = await prune_stale_streams(services, doc["createdAt"] + stale + MS)
    assert [(r.stream_id, r.reason) for r in removed] == [("fresh", "never seen")]
    assert await _ids(store) == []
    assert (await dash.recv_type("error"))["code"] == "stream-deleted"
    assert (await dash.closed())[0] == 4410


async def test_an_offline_stream_goes_with_its_alerts_just_after_stream_retention_d(server, ws_connect, token):
    services, store = server.services, server.services.store
    retention = dt.timedelta(days=services.settings.stream_retention_d)
    phone = await producer(ws_connect, token, "old")
    ml = await watcher(ws_connect, token, "old", client_type="ml-service", sub="detector", role="service",
                       streams="*")
    await _send_alerts(ml, "old", 2)
    ml.close()
    phone.close()
    await store.create_stream("busy", "alice", status="online")  # online: never removed, however old
    for _ in range(100):
        doc = await store.get_stream("old")
        if doc["status"] == "offline":
            break
        await asyncio.sleep(0.01)
    last_seen = doc["lastSeenAt"]

    assert await prune_stale_streams(services, last_seen + retention) == []
    removed = await prune_stale_streams(services, last_seen + retention + MS)
    assert [(r.stream_id, r.reason) for r in removed] == [("old", "offline")]
    assert await _ids(store) == ["busy"]
    assert await store.count_alerts("old") == 0


async def test_a_stream_with_a_producer_here_is_kept_whatever_the_store_says(server, ws_connect, token):
    services, store = server.services, server.services.store
    await producer(ws_connect, token, "live")
    await services.commands.drain()
    await store.set_stream_status("live", "offline")  # e.g. wrongly marked by another node
    far = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=10 * 365)
    assert await prune_stale_streams(services, far) == []
    assert await _ids(store) == ["live"]


async def test_alerts_go_just_after_alert_retention_d_and_replay_then_says_incomplete(server, ws_connect, token):
    services, store = server.services, server.services.store
    retention = dt.timedelta(days=services.settings.alert_retention_d)
    await producer(ws_connect, token, "cam")
    ml = await watcher(ws_connect, token, "cam", client_type="ml-service", sub="detector", role="service",
                       streams="*")
    jpeg = b"\xff\xd8old\xff\xd9"
    first = await _send_alerts(ml, "cam", 2, snapshot=base64.b64encode(jpeg).decode())
    await asyncio.sleep(0.01)  # alert 3 arrives measurably later
    kept = await store.get_alert((await _send_alerts(ml, "cam", 1))[0]["alertId"])

    removed = await prune_old_alerts(services, kept["receivedAt"] + retention)  # cutoff: alert 3's own time
    assert removed == {"cam": 2}
    assert [a["seq"] for a in await _alerts(store, "cam")] == [3]
    assert await store.get_snapshot(first[0]["alertId"]) is None
    pruned = (await store.get_stream("cam"))["prunedSeq"]
    assert pruned == 2

    replay = await watcher(ws_connect, token, "cam", sinceSeq=0)
    done = await replay.recv_type("replay-complete")
    assert done["complete"] is False and done["lastSeq"] == 3
    replay = await watcher(ws_connect, token, "cam", sinceSeq=pruned)
    assert (await replay.recv_type("replay-complete"))["complete"] is True

    assert await prune_old_alerts(services, kept["receivedAt"] + retention + MS) == {"cam": 1}
    assert await _alerts(store, "cam") == []
    assert (await store.get_stream("cam"))["prunedSeq"] == 3


async def test_a_dry_run_reports_everything_and_changes_nothing(server, ws_connect, token):
    services, store = server.services, server.services.store
    await store.create_stream("never", "alice")
    await producer(ws_connect, token, "cam")
    ml = await watcher(ws_connect, token, "cam", client_type="ml-service", sub="detector", role="service",
                       streams="*")
    await _send_alerts(ml, "cam", 3)
    far = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3650)

    result = await cleanup(services, far, dry_run=True)
    assert [s.stream_id for s in result.streams] == ["never"]
    assert result.alerts == {"cam": 3}
    assert await _ids(store) == ["cam", "never"]
    assert await store.count_alerts("cam") == 3
    assert (await store.get_stream("cam"))["prunedSeq"] == 0

    result = await cleanup(services, far)
    assert await _ids(store) == ["cam"] and await store.count_alerts("cam") == 0


async def test_retention_settings_of_0_keep_everything(settings, token):
    server, close = await start_server(replace_settings(settings, stale_after_h=0.0, stream_retention_d=0.0,
                                                        alert_retention_d=0.0))
    try:
        store = server.services.store
        await store.create_stream("never", "alice")
        await store.create_stream("gone", "alice", status="online")
        await store.set_stream_status("gone", "offline")
        far = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3650)
        result = await cleanup(server.services, far)
        assert (result.streams, result.alerts) == ([], {})
        assert await _ids(store) == ["gone", "never"]
    finally:
        await close()
