"""Reports against a known data set: per stream and per owner, the period's bounds, and the three formats."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

from watchout.store import new_alert_id
from workers.reports import as_csv, as_json, as_table, build_report, store_report

UTC = dt.timezone.utc
DAY = dt.datetime(2026, 11, 25, tzinfo=UTC)
START, END = DAY, DAY + dt.timedelta(days=1)


def _t(hours: float) -> dt.datetime:
    return DAY + dt.timedelta(hours=hours)


ALERTS = [  # streamId, ownerId, severity, objectType, receivedAt, acknowledged
    ("cam1", "alice", "high", "person", _t(1), True),
    ("cam1", "alice", "high", "person", _t(2), False),
    ("cam1", "alice", "critical", "car", _t(3), False),
    ("cam1", "alice", "low", None, _t(23.99), False),
    ("cam1", "alice", "high", "person", _t(-0.0001), False),  # just before the period
    ("cam1", "alice", "high", "person", END, False),  # at its end: the next period's
    ("cam2", "alice", "medium", "dog", _t(5), True),
    ("cam2", "alice", "medium", "dog", _t(6), False),
    ("cam3", "bob", "low", "person", _t(12), False),
]
USAGE = [  # streamId, ownerId, hour, framesIn, framesRelayed, framesDropped, onlineS
    ("cam1", "alice", _t(-1), 999, 999, 999, 3600.0),  # the hour before the period
    ("cam1", "alice", _t(0), 100, 200, 5, 3600.0),
    ("cam1", "alice", _t(23), 50, 100, 0, 1800.0),
    ("cam3", "bob", _t(10), 10, 0, 0, 600.0),
    ("cam3", "bob", _t(24), 7, 7, 7, 60.0),  # the hour after
]


@pytest.fixture
async def store(server):
    store = server.services.store
    for sid, owner in (("cam1", "alice"), ("cam2", "alice"), ("cam3", "bob")):
        await store.create_stream(sid, owner)
    for sid, owner, severity, object_type, received, acked in ALERTS:
        seq = (await store.reserve_batch(sid, 1, "", 0.0))[0]
        alert_id = new_alert_id()
        await store.insert_alerts([{
            "alertId": alert_id, "streamId": sid, "seq": seq, "ownerId": owner, "senderId": "detector",
            "severity": severity, "message": "seen", "metadata": {"objectType": object_type} if object_type else {},
            "timestamp": 1, "receivedAt": received, "clientId": None, "acknowledged": None, "hasSnapshot": False}])
        if acked:
            await store.acknowledge_alert(alert_id, "operator")
    await store.add_usage([{"streamId": sid, "ownerId": owner, "hour": hour, "framesIn": fin, "framesRelayed": rel,
                            "framesDropped": drop, "onlineS": online}
                           for sid, owner, hour, fin, rel, drop, online in USAGE])
    return store


def _row(scope, id_, owner, alerts, low, medium, high, critical, acked, unacked, online, fin, rel, drop, top):
    return {"scope": scope, "id": id_, "ownerId": owner, "alerts": alerts, "low": low, "medium": medium, "high": high,
            "critical": critical, "acknowledged": acked, "unacknowledged": unacked, "onlineS": online,
            "framesReceived": fin, "framesRelayed": rel, "framesDropped": drop,
            "topObjectTypes": [{"objectType": t, "count": n} for t, n in top]}


EXPECTED = [
    _row("stream", "cam1", "alice", 4, 1, 0, 2, 1, 1, 3, 5400.0, 150, 300, 5, [("person", 2), ("car", 1)]),
    _row("stream", "cam2", "alice", 2, 0, 2, 0, 0, 1, 1, 0.0, 0, 0, 0, [("dog", 2)]),
    _row("stream", "cam3", "bob", 1, 1, 0, 0, 0, 0, 1, 600.0, 10, 0, 0, [("person", 1)]),
    _row("owner", "alice", "alice", 6, 1, 2, 2, 1, 2, 4, 5400.0, 150, 300, 5, [("dog", 2), ("person", 2), ("car", 1)]),
    _row("owner", "bob", "bob", 1, 1, 0, 0, 0, 0, 1, 600.0, 10, 0, 0, [("person", 1)]),
]


async def test_report_counts_each_stream_and_owner_within_the_period_only(store):
    report = await build_report(store, START, END)
    assert report.rows() == EXPECTED


async def test_report_of_one_stream_or_one_owner(store):
    only_cam1 = (await build_report(store, START, END, stream_id="cam1")).rows()
    assert [r["id"] for r in only_cam1] == ["cam1", "alice"]
    assert only_cam1[1]["alerts"] == 4 and only_cam1[1]["framesReceived"] == 150
    assert (await build_report(store, START, END, owner_id="bob")).rows() == [EXPECTED[2], EXPECTED[4]]


async def test_hourly_figures_count_when_their_hour_starts_within_the_period(store):
    report = await build_report(store, _t(10.5), _t(23.5))  # hours 11:00 to 23:00
    figures = {f.id: f for f in report.streams}
    assert figures["cam1"].online_s == 1800.0 and figures["cam1"].frames_received == 50
    assert figures["cam3"].online_s == 0.0 and figures["cam3"].alerts == 1


async def test_the_report_job_stores_the_period_and_a_rerun_replaces_it(server, store):
    await store_report(server.services, START, END)
    await store_report(server.services, START, END)
    stored = await store.stored_report(START, END)
    assert [{k: v for k, v in r.items() if k not in ("from", "to")} for r in stored] == EXPECTED
    assert all(r["from"] == START and r["to"] == END for r in stored)


async def test_csv_parses_with_one_row_per_stream_and_owner(store):
    rows = list(csv.DictReader(io.StringIO(as_csv(await build_report(store, START, END)))))
    assert [(r["scope"], r["id"]) for r in rows] == [
        ("stream", "cam1"), ("stream", "cam2"), ("stream", "cam3"), ("owner", "alice"), ("owner", "bob")]
    assert rows[0] == {"from": START.isoformat(), "to": END.isoformat(), "scope": "stream", "id": "cam1",
                       "ownerId": "alice", "alerts": "4", "low": "1", "medium": "0", "high": "2", "critical": "1",
                       "acknowledged": "1", "unacknowledged": "3", "onlineS": "5400.0", "framesReceived": "150",
                       "framesRelayed": "300", "framesDropped": "5", "topObjectTypes": "person:2;car:1"}


async def test_json_and_table_carry_the_same_figures(store):
    report = await build_report(store, START, END)
    document = json.loads(as_json(report))
    assert document["streams"] + document["owners"] == EXPECTED
    table = as_table(report).splitlines()
    assert table[0] == "Report 2026-11-25 00:00 to 2026-11-26 00:00 UTC"
    cam1 = next(line for line in table if line.startswith("cam1 "))
    assert cam1.split() == ["cam1", "4", "1", "0", "2", "1", "1", "3", "1h30m", "150", "300", "5", "person", "2,",
                            "car", "1"]
    empty = await build_report(store, END + dt.timedelta(days=1), END + dt.timedelta(days=2))
    assert "No alerts and no producer" in as_table(empty)
