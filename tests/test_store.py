"""Store contract: the same tests on SQLite, on the MongoDB store over mongomock-motor, and with
WATCHOUT_TEST_MONGO_URI on a real MongoDB."""
from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from conftest import mongomock_store
from watchout.store import new_alert_id, utcnow
from watchout.store.mongo import MongoStore
from watchout.store.sqlite import SQLiteStore

MONGO_URI = os.environ.get("WATCHOUT_TEST_MONGO_URI", "")


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def store(request, tmp_path):
    """The contract runs on SQLite (a file), on the MongoDB store over mongomock-motor, and on a real MongoDB
    when WATCHOUT_TEST_MONGO_URI is set."""
    if request.param == "sqlite":
        st = SQLiteStore(str(tmp_path / "watchout.db"))
    elif request.param == "mongomock":
        st = mongomock_store()
    elif not MONGO_URI:
        pytest.skip("set WATCHOUT_TEST_MONGO_URI=mongodb://... to run the store contract on a real MongoDB")
    else:
        st = MongoStore.connect(MONGO_URI, f"watchout_contract_{uuid.uuid4().hex[:8]}")
    await st.start(0.0)
    yield st
    if request.param == "mongodb":
        await st.drop()
    st.close()


def _alert(seq, client_id=None, sender="ml", stream="s1"):
    return {"alertId": new_alert_id(), "streamId": stream, "seq": seq, "ownerId": "alice", "senderId": sender,
            "severity": "high", "message": "m", "metadata": {"confidence": 0.9, "box": [1, 2, 3, 4]},
            "timestamp": 1764150000000, "receivedAt": utcnow(), "clientId": client_id, "acknowledged": None,
            "hasSnapshot": False}


async def test_create_and_get_stream_with_aware_datetimes(store):
    created = await store.create_stream("s1", "alice", status="online")
    fetched = await store.get_stream("s1")
    assert fetched["streamId"] == created["streamId"] == "s1"
    assert (fetched["ownerId"], fetched["status"], fetched["alertSeq"]) == ("alice", "online", 0)
    assert fetched["createdAt"].tzinfo is not None
    assert await store.get_stream("missing") is None


async def test_creating_an_existing_stream_returns_the_first_one(store):
    await store.create_stream("s1", "alice")
    again = await store.create_stream("s1", "bob")
    assert again["ownerId"] == "alice"


async def test_reserved_seqs_never_overlap_under_concurrency(store):
    await store.create_stream("s1", "alice")
    batches = await asyncio.gather(*(store.reserve_batch("s1", n, "", 0.0) for n in (1, 5, 2, 7, 3)))
    ranges = sorted((f, f + n - 1) for (f, _), n in zip(batches, (1, 5, 2, 7, 3)))
    assert ranges[0][0] == 1 and ranges[-1][1] == 18
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))


async def test_status_update_keeps_last_seen_and_frame_times(store):
    await store.create_stream("s1", "alice")
    frame_at = utcnow()
    await store.set_stream_status("s1", "streaming", frame_at=frame_at)
    doc = await store.get_stream("s1")
    assert doc["status"] == "streaming" and doc["lastSeenAt"] is not None
    assert abs((doc["lastFrameAt"] - frame_at).total_seconds()) < 0.002  # MongoDB keeps milliseconds


async def test_alerts_round_trip_in_seq_order_and_by_client_id(store):
    await store.create_stream("s1", "alice")
    first = (await store.reserve_batch("s1", 3, "", 0.0))[0]
    docs = [_alert(first + i, client_id=f"c{i}") for i in range(3)]
    assert await store.insert_alerts(docs) == set()
    listed = await store.replay("s1", 0, 100)
    assert [a["seq"] for a in listed] == [1, 2, 3]
    assert [a["alertId"] for a in listed] == [d["alertId"] for d in docs]
    found = await store.find_alert_by_client_id("s1", "ml", "c1")
    assert found["seq"] == 2 and found["metadata"] == {"confidence": 0.9, "box": [1, 2, 3, 4]}
    assert await store.find_alert_by_client_id("s1", "other-sender", "c1") is None
    assert await store.count_alerts("s1") == 3


async def test_a_stored_client_id_is_reported_as_duplicate(store):
    await store.create_stream("s1", "alice")
    await store.insert_alerts([_alert(1, client_id="same")])
    duplicates = await store.insert_alerts([_alert(2, client_id="same"), _alert(3, client_id="fresh")])
    assert duplicates == {"same"}
    assert await store.count_alerts("s1") == 2


async def test_snapshots_are_kept_per_alert(store):
    await store.create_stream("s1", "alice")
    alert_id = new_alert_id()
    await store.save_snapshot(alert_id, "s1", b"\xff\xd8jpeg")
    assert await store.get_snapshot(alert_id) == ("s1", b"\xff\xd8jpeg")
    assert await store.get_snapshot(new_alert_id()) is None


async def _stored_alerts(store, stream="s1", count=6, owner="alice"):
    await store.create_stream(stream, owner)
    first = (await store.reserve_batch(stream, count, "", 0.0))[0]
    severities = ("low", "medium", "high", "critical")
    docs = [dict(_alert(first + i, stream=stream), severity=severities[i % 4], ownerId=owner) for i in range(count)]
    await store.insert_alerts(docs)
    await store.mark_stored(stream, first + count - 1)
    return docs


async def test_streams_are_listed_newest_first_by_owner_and_status_across_pages(store):
    for i in range(5):
        await store.create_stream(f"s{i}", "alice" if i != 2 else "bob", status="online" if i % 2 else "offline")
        await asyncio.sleep(0.002)  # distinct creation times (MongoDB keeps milliseconds)
    page = await store.list_streams("alice", None, 2)
    assert [s["streamId"] for s in page] == ["s4", "s3"]
    after = (page[-1]["createdAt"].isoformat(), page[-1]["streamId"])
    assert [s["streamId"] for s in await store.list_streams("alice", None, 10, after)] == ["s1", "s0"]
    assert [s["streamId"] for s in await store.list_streams(None, "online", 10)] == ["s3", "s1"]
    assert [s["streamId"] for s in await store.list_streams(None, None, 10, stream_ids=["s0", "s2"])] == ["s2", "s0"]


async def test_exclusive_create_refuses_an_existing_stream(store):
    assert await store.create_stream("s1", "alice", exclusive=True) is not None
    assert await store.create_stream("s1", "bob", exclusive=True) is None


async def test_history_is_bounded_by_the_stored_watermark_and_filters(store):
    from watchout.store import AlertFilter
    await _stored_alerts(store, count=6)
    stream = await store.get_stream("s1")
    assert (stream["alertSeq"], stream["lastSeq"]) == (6, 6)
    assert [a["seq"] for a in await store.stream_history("s1", 6, AlertFilter(), 10)] == [6, 5, 4, 3, 2, 1]
    assert [a["seq"] for a in await store.stream_history("s1", 4, AlertFilter(), 10)] == [4, 3, 2, 1]
    assert [a["seq"] for a in await store.stream_history("s1", 6, AlertFilter(), 2, before_seq=5)] == [4, 3]
    picked = await store.stream_history("s1", 6, AlertFilter(severities=("low", "critical")), 10)
    assert [a["seq"] for a in picked] == [5, 4, 1]
    assert [a["seq"] for a in await store.stream_history("s1", 6, AlertFilter(after_seq=4), 10)] == [6, 5]
    await store.mark_stored("s1", 3)  # $max: the watermark never goes back
    assert (await store.get_stream("s1"))["lastSeq"] == 6


async def test_alert_history_across_streams_pages_by_received_time(store):
    from watchout.store import AlertFilter
    await _stored_alerts(store, "s1", 3)
    await asyncio.sleep(0.002)
    await _stored_alerts(store, "s2", 3)
    await _stored_alerts(store, "s3", 2, owner="bob")
    everything = await store.alert_history(None, "alice", AlertFilter(), 10)
    assert [(a["streamId"], a["seq"]) for a in everything] == [("s2", 3), ("s2", 2), ("s2", 1),
                                                               ("s1", 3), ("s1", 2), ("s1", 1)]
    first = everything[1]
    before = (first["receivedAt"].isoformat(), first["alertId"])
    rest = await store.alert_history(None, "alice", AlertFilter(), 10, before=before)
    assert [(a["streamId"], a["seq"]) for a in rest] == [("s2", 1), ("s1", 3), ("s1", 2), ("s1", 1)]
    assert [a["streamId"] for a in await store.alert_history(["s3"], None, AlertFilter(), 10)] == ["s3", "s3"]


async def test_acknowledgement_keeps_the_first_and_replay_sees_it(store):
    docs = await _stored_alerts(store, count=2)
    first = await store.acknowledge_alert(docs[0]["alertId"], "alice")
    second = await store.acknowledge_alert(docs[0]["alertId"], "bob")
    assert first["acknowledged"]["by"] == "alice" == second["acknowledged"]["by"]
    assert await store.acknowledge_alert("0" * 24, "alice") is None
    assert await store.acknowledge_alert("not-an-id", "alice") is None
    replayed = await store.replay("s1", 0, 10)
    assert [a["acknowledged"] is not None for a in replayed] == [True, False]


async def test_deleting_a_stream_removes_its_alerts_and_snapshots(store):
    docs = await _stored_alerts(store, count=2)
    await store.save_snapshot(docs[0]["alertId"], "s1", b"jpeg")
    await _stored_alerts(store, "other", 1)
    assert await store.delete_stream("s1") is True
    assert await store.get_stream("s1") is None and await store.count_alerts("s1") == 0
    assert await store.get_snapshot(docs[0]["alertId"]) is None
    assert await store.count_alerts("other") == 1
    assert await store.delete_stream("s1") is False


async def test_the_alert_writer_lease_lets_one_writer_at_a_time(store):
    """reserve_batch with a lease: (first seq, lastSeq before it); another writer waits (WriterBusy) until
    release_writer or the lease's end; the same writer may go on; without a lease nobody waits."""
    from watchout.errors import StoreUnavailable, WriterBusy
    await store.create_stream("s1", "alice")
    assert await store.reserve_batch("s1", 2, "node-a", 10.0) == (1, 0)
    with pytest.raises(WriterBusy):
        await store.reserve_batch("s1", 1, "node-b", 10.0)
    assert await store.reserve_batch("s1", 1, "node-a", 10.0) == (3, 0)  # the holder goes on
    await store.mark_stored("s1", 3)
    await store.release_writer("s1", "node-a")
    assert await store.reserve_batch("s1", 1, "node-b", 0.2) == (4, 3)
    with pytest.raises(WriterBusy):
        await store.reserve_batch("s1", 1, "node-a", 10.0)
    await asyncio.sleep(0.3)  # node-b's lease ran out (say it stopped mid-batch)
    assert await store.reserve_batch("s1", 1, "node-a", 10.0) == (5, 3)
    await store.release_writer("s1", "node-b")  # not the holder: changes nothing
    with pytest.raises(WriterBusy):
        await store.reserve_batch("s1", 1, "node-b", 10.0)
    assert (await store.reserve_batch("s1", 1, "", 0.0))[0] == 6  # no lease asked: one node, nobody waits
    with pytest.raises(StoreUnavailable):
        await store.reserve_batch("missing", 1, "node-a", 10.0)


# ------------------------------------------------------------------ the jobs' data

async def test_a_job_lease_is_one_run_per_firing_and_one_holder_at_a_time(store):
    import datetime as dt
    t0 = utcnow().replace(microsecond=0)
    slot1, slot2 = t0, t0 + dt.timedelta(hours=1)
    assert await store.acquire_lease("prune", "node-a", slot1, t0, 60)
    assert not await store.acquire_lease("prune", "node-b", slot1, t0, 60)  # same firing: ran already
    assert not await store.acquire_lease("prune", "node-b", slot2, t0 + dt.timedelta(seconds=30), 60)  # held
    assert await store.renew_lease("prune", "node-a", t0 + dt.timedelta(seconds=30), 60)
    assert not await store.renew_lease("prune", "node-b", t0, 60)
    await store.release_lease("prune", "node-a", t0 + dt.timedelta(seconds=40))
    assert await store.acquire_lease("prune", "node-b", slot2, t0 + dt.timedelta(seconds=41), 60)
    (lease,) = await store.leases()
    assert (lease["job"], lease["owner"], lease["slot"]) == ("prune", "node-b", slot2)
    assert lease["until"] == t0 + dt.timedelta(seconds=101)
    # an expired lease of another owner is taken over for a later firing
    assert await store.acquire_lease("prune", "node-a", slot2 + dt.timedelta(hours=1), t0 + dt.timedelta(hours=3), 60)


async def test_usage_figures_add_up_per_hour_and_stream_and_are_pruned_by_hour(store):
    import datetime as dt
    hour = utcnow().replace(minute=0, second=0, microsecond=0)
    row = {"streamId": "s1", "ownerId": "alice", "hour": hour, "framesIn": 10, "framesRelayed": 20, "framesDropped": 1,
           "onlineS": 30.5}
    await store.add_usage([row, dict(row, streamId="s2")])
    await store.add_usage([dict(row, framesIn=5, onlineS=1.0), dict(row, hour=hour - dt.timedelta(hours=5))])
    figures = await store.usage_between(hour, hour + dt.timedelta(hours=1), stream_id="s1")
    assert [(f["hour"], f["framesIn"], f["framesRelayed"], f["onlineS"]) for f in figures] == [(hour, 15, 40, 31.5)]
    assert len(await store.usage_between(hour - dt.timedelta(hours=6), hour + dt.timedelta(hours=1),
                                         owner_id="alice")) == 3
    assert await store.prune_usage(hour - dt.timedelta(hours=1), dry_run=True) == 1
    assert await store.prune_usage(hour - dt.timedelta(hours=1)) == 1
    assert len(await store.usage_between(hour - dt.timedelta(hours=6), hour + dt.timedelta(hours=1))) == 2


async def test_a_report_replaces_its_period_and_keeps_row_order_and_times(store):
    import datetime as dt
    start = utcnow().replace(microsecond=0)
    end = start + dt.timedelta(days=1)
    rows = [{"scope": "stream", "id": "s2", "alerts": 3}, {"scope": "stream", "id": "s1", "alerts": 1},
            {"scope": "owner", "id": "alice", "alerts": 4}]
    await store.save_report(start, end, rows[:1])
    await store.save_report(start, end, rows)
    stored = await store.stored_report(start, end)
    assert stored == [{"from": start, "to": end, **r} for r in rows]
    assert await store.stored_report(start, end + dt.timedelta(hours=1)) == []


async def test_job_runs_keep_the_last_run_and_forget_stopped_nodes(store):
    import datetime as dt
    now = utcnow().replace(microsecond=0)
    old = now - dt.timedelta(hours=3)
    run = {"job": "check-producers", "scope": "node", "node": "a", "slot": None, "startedAt": old, "durationS": 0.1,
           "result": "ok", "error": None, "summary": {"offline": 0}}
    await store.record_job_run("check-producers@a", run)
    await store.record_job_run("check-producers@b", dict(run, node="b", startedAt=now))
    await store.record_job_run("prune", dict(run, job="prune", scope="cluster", slot=old, startedAt=old))
    await store.record_job_run("prune", dict(run, job="prune", scope="cluster", slot=now, startedAt=now))
    assert await store.prune_job_runs(now - dt.timedelta(hours=1)) == 1
    runs = {r["runId"]: r for r in await store.job_runs()}
    assert sorted(runs) == ["check-producers@b", "prune"]
    assert runs["prune"]["slot"] == now and runs["prune"]["summary"] == {"offline": 0}


async def test_offline_marking_moves_last_seen_forward_only(store):
    import datetime as dt
    await store.create_stream("s1", "alice", status="streaming")
    await store.create_stream("s2", "alice", status="online")
    await store.create_stream("s3", "alice")
    frame = utcnow().replace(microsecond=0)
    await store.set_stream_status("s1", "streaming", frame_at=frame)
    seen = (await store.get_stream("s1"))["lastSeenAt"]
    earlier, later = seen - dt.timedelta(minutes=5), seen + dt.timedelta(minutes=5)
    await store.record_heartbeats([("s1", earlier, frame - dt.timedelta(minutes=5)), ("s2", later, None)])
    assert (await store.get_stream("s1"))["lastSeenAt"] == seen  # never back
    assert (await store.get_stream("s1"))["lastFrameAt"] == frame
    s2 = await store.get_stream("s2")
    assert s2["lastSeenAt"] == later and s2["lastFrameAt"] is None
    await store.record_heartbeats([("s1", later, frame + dt.timedelta(minutes=1))])
    assert (await store.get_stream("s1"))["lastFrameAt"] == frame + dt.timedelta(minutes=1)
    assert await store.mark_streams_offline({"s1": earlier, "s3": later}) == ["s1"]
    assert (await store.get_stream("s1"))["status"] == "offline"
    assert await store.mark_unseen_streams_offline(later + dt.timedelta(seconds=1), exclude=set()) == ["s2"]
    assert (await store.get_stream("s2"))["lastSeenAt"] == later


async def test_retention_removes_old_alerts_raises_pruned_seq_and_prunes_streams(store):
    import datetime as dt
    docs = await _stored_alerts(store, count=4)
    cutoff = utcnow() + dt.timedelta(seconds=1)
    assert await store.old_alerts_by_stream(cutoff) == [{"streamId": "s1", "count": 4, "maxSeq": 4}]
    figures = await store.alert_figures(cutoff - dt.timedelta(hours=1), cutoff)
    assert sum(f["count"] for f in figures) == 4 and {f["severity"] for f in figures} == {"low", "medium", "high",
                                                                                          "critical"}
    await store.save_snapshot(docs[0]["alertId"], "s1", b"jpeg")
    await _stored_alerts(store, "s2", 2)
    assert await store.remove_alerts_before(cutoff, {"s1": 4, "s2": 2}) == 6
    assert (await store.get_stream("s1"))["prunedSeq"] == 4 and await store.get_snapshot(docs[0]["alertId"]) is None
    await store.create_stream("never", "alice")
    future = utcnow() + dt.timedelta(hours=1)
    assert [s["streamId"] for s in await store.prunable_streams(future, None)] == ["never", "s1", "s2"]
    assert await store.delete_stream_if_prunable("never", future, None) is True
    assert await store.delete_stream_if_prunable("never", future, None) is False


# -------------------------------------------------------------------- notifications
def _destination(owner="alice", channel="webhook", **extra):
    import datetime as dt
    now = utcnow()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # both stores keep milliseconds
    return {"destinationId": new_alert_id(), "ownerId": owner, "channel": channel, "createdAt": now,
            "streams": None, "minSeverity": "low", "cooldownS": 0,
            "config": {"url": "http://127.0.0.1:1/hook", "secrets": ["whsec_x"],
                       "rotatedAt": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)}, **extra}


def _delivery(alert, destination, purpose="notify", next_at=None):
    now = utcnow()
    return {"deliveryId": new_alert_id(), "alertId": alert["alertId"], "streamId": alert["streamId"],
            "destinationId": destination["destinationId"], "channel": destination["channel"], "purpose": purpose,
            "state": "pending", "attempts": 0, "nextAt": next_at or now, "createdAt": now}


async def test_destinations_round_trip_list_by_owner_update_and_delete(store):
    import datetime as dt
    first, second, other = _destination(), _destination(channel="webpush"), _destination(owner="bob")
    for doc in (first, second, other):
        await store.create_destination(doc)
    got = await store.get_destination(first["destinationId"])
    assert got == first and got["config"]["rotatedAt"] == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    listed = [d["destinationId"] for d in await store.list_destinations("alice")]
    assert listed == [first["destinationId"], second["destinationId"]]
    assert [d["destinationId"] for d in await store.list_destinations(None, "webhook")] == [
        first["destinationId"], other["destinationId"]]
    updated = await store.update_destination(first["destinationId"], {"config": {"url": "http://h/2"}})
    assert updated["config"] == {"url": "http://h/2"} and updated["ownerId"] == "alice"
    assert (await store.get_destination(first["destinationId"]))["config"] == {"url": "http://h/2"}
    assert await store.update_destination("nope", {"x": 1}) is None
    assert await store.delete_destination(first["destinationId"]) is True
    assert await store.delete_destination(first["destinationId"]) is False
    assert await store.get_destination(first["destinationId"]) is None


async def test_every_stored_alert_is_fanned_out_once_with_its_deliveries(store):
    docs = await _stored_alerts(store, count=3)
    assert "fanout" not in docs[0]
    pending = await store.alerts_to_fan_out(10)
    assert [a["alertId"] for a in pending] == [d["alertId"] for d in docs]  # oldest first
    assert "fanout" not in pending[0] and pending[0]["severity"] == docs[0]["severity"]
    destination = _destination()
    await store.create_destination(destination)
    made = [_delivery(a, destination) for a in pending[:2]]
    await store.add_deliveries(made, [a["alertId"] for a in pending[:2]])
    assert [a["alertId"] for a in await store.alerts_to_fan_out(10)] == [docs[2]["alertId"]]
    again = [_delivery(a, destination) for a in pending[:2]]  # a repeat (another node, a retry) adds nothing
    await store.add_deliveries(again, [])
    receipts = await store.deliveries_of_alert(docs[0]["alertId"])
    assert [r["deliveryId"] for r in receipts] == [made[0]["deliveryId"]]
    assert receipts[0]["state"] == "pending" and receipts[0]["attempts"] == 0
    assert (await store.delivery_backlog())[0] == 2


async def test_a_delivery_is_claimed_by_one_owner_at_a_time_and_finished_only_by_it(store):
    import datetime as dt
    (alert,) = await _stored_alerts(store, count=1)
    destination = _destination()
    await store.create_destination(destination)
    now = utcnow()
    due = _delivery(alert, destination)
    later = _delivery(alert, destination, "escalate", now + dt.timedelta(minutes=5))
    await store.add_deliveries([due, later], [alert["alertId"]])
    claimed = await store.claim_deliveries("node-a", now + dt.timedelta(seconds=1), 30, 10)
    assert [c["deliveryId"] for c in claimed] == [due["deliveryId"]]  # the escalation is not due yet
    assert claimed[0]["alert"]["alertId"] == alert["alertId"]
    assert await store.claim_deliveries("node-b", now + dt.timedelta(seconds=2), 30, 10) == []  # leased
    taken_over = await store.claim_deliveries("node-b", now + dt.timedelta(seconds=40), 30, 10)
    assert [c["deliveryId"] for c in taken_over] == [due["deliveryId"]]  # node-a's lease ran out
    assert await store.finish_attempt(due["deliveryId"], "node-a", {"attempts": 1}) is False
    delivered_at = now + dt.timedelta(seconds=41)
    assert await store.finish_attempt(due["deliveryId"], "node-b", {
        "state": "delivered", "attempts": 1, "deliveredAt": delivered_at, "lastStatus": 204}) is True
    (receipt, _) = await store.deliveries_of_alert(alert["alertId"])
    assert (receipt["state"], receipt["attempts"], receipt["lastStatus"]) == ("delivered", 1, 204)
    assert abs((receipt["deliveredAt"] - delivered_at).total_seconds()) < 0.002
    last = await store.last_delivered(destination["destinationId"], "s1")
    assert last is not None and abs((last - delivered_at).total_seconds()) < 0.002
    assert await store.last_delivered(destination["destinationId"], "s2") is None
    count, oldest = await store.delivery_backlog()
    assert count == 1 and oldest is not None
    assert await store.claim_deliveries("node-a", now + dt.timedelta(minutes=6), 30, 10) != []  # the escalation


async def test_deleting_a_destination_cancels_its_pending_deliveries_and_keeps_the_receipts(store):
    (alert,) = await _stored_alerts(store, count=1)
    destination = _destination()
    await store.create_destination(destination)
    await store.add_deliveries([_delivery(alert, destination)], [alert["alertId"]])
    await store.delete_destination(destination["destinationId"])
    (receipt,) = await store.deliveries_of_alert(alert["alertId"])
    assert receipt["state"] == "cancelled" and receipt["lastError"] == "destination deleted"
    assert await store.claim_deliveries("n", utcnow(), 30, 10) == []
    assert await store.delivery_backlog() == (0, None)


async def test_deliveries_go_with_their_alerts(store):
    import datetime as dt
    docs = await _stored_alerts(store, count=2)
    await _stored_alerts(store, "s2", 1)
    destination = _destination()
    await store.create_destination(destination)
    pending = await store.alerts_to_fan_out(10)
    await store.add_deliveries([_delivery(a, destination) for a in pending], [a["alertId"] for a in pending])
    await store.delete_stream("s2")
    assert (await store.delivery_backlog())[0] == 2
    await store.remove_alerts_before(utcnow() + dt.timedelta(seconds=1), {"s1": 2})
    assert await store.deliveries_of_alert(docs[0]["alertId"]) == []
    assert await store.delivery_backlog() == (0, None)


async def test_a_restarted_embedded_service_frees_the_leases_of_its_earlier_run(store):
    (alert,) = await _stored_alerts(store, count=1)
    destination = _destination()
    await store.create_destination(destination)
    await store.add_deliveries([_delivery(alert, destination)], [alert["alertId"]])
    assert len(await store.claim_deliveries("old-run", utcnow(), 60, 10)) == 1
    assert await store.claim_deliveries("new-run", utcnow(), 60, 10) == []
    assert await store.release_delivery_leases() == 1
    assert len(await store.claim_deliveries("new-run", utcnow(), 60, 10)) == 1


async def test_a_kept_value_is_the_first_one_put(store):
    assert await store.get_value("vapid-keys") is None
    assert await store.put_value_if_absent("vapid-keys", "first") == "first"
    assert await store.put_value_if_absent("vapid-keys", "second") == "first"
    assert await store.get_value("vapid-keys") == "first"
