"""Alerts: stored before the sender's ack, idempotent by client id, delivered to the owner and dashboards."""
from __future__ import annotations

import asyncio

import pytest

from conftest import alert_message, start_server
from watchout.errors import StoreUnavailable
from watchout.store.sqlite import SQLiteStore

STREAM = "porch"


async def _stream_with_watchers(ws_connect, token, dashboards=2):
    mobile = await ws_connect()
    await mobile.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "consumes": ["alert"],
                       "token": token("alice")})
    await mobile.recv_type("registered")
    watchers = []
    for _ in range(dashboards):
        dash = await ws_connect()
        await dash.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM, "token": token("alice")})
        await dash.recv_type("subscribed")
        watchers.append(dash)
    ml = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                   "token": token("detector", role="service", streams=[STREAM])})
    await ml.recv_type("subscribed")
    return mobile, watchers, ml


async def test_alert_is_stored_before_the_sender_gets_its_ack(server, ws_connect, token):
    _, _, ml = await _stream_with_watchers(ws_connect, token, dashboards=0)
    await ml.send(alert_message(STREAM, id="a-1"))
    ack = await ml.recv_type("ack")
    assert ack["ref"] == "a-1" and ack["seq"] == 1
    stored = await server.services.store.find_alert_by_client_id(STREAM, "detector", "a-1")
    assert stored is not None and stored["alertId"] == ack["alertId"]
    assert stored["ownerId"] == "alice" and stored["senderId"] == "detector" and stored["severity"] == "high"


async def test_every_alert_reaches_the_owner_and_every_dashboard_in_seq_order(server, ws_connect, token):
    mobile, dashboards, ml = await _stream_with_watchers(ws_connect, token)
    count = 60
    for i in range(count):
        await ml.send(alert_message(STREAM, message=f"alert {i}", id=f"id-{i}"))
    acks = [await ml.recv_type("ack") for _ in range(count)]
    assert [a["seq"] for a in acks] == list(range(1, count + 1))
    for client in (mobile, *dashboards):
        got = [await client.recv_type("alert") for _ in range(count)]
        assert [a["seq"] for a in got] == list(range(1, count + 1))
        assert [a["message"] for a in got] == [f"alert {i}" for i in range(count)]
        assert [a["alertId"] for a in got] == [a["alertId"] for a in acks]
    assert await server.services.store.count_alerts(STREAM) == count


async def test_live_alert_keeps_sender_fields_first_then_server_fields(ws_connect, token):
    _, (dash,), ml = await _stream_with_watchers(ws_connect, token, dashboards=1)
    await ml.send(alert_message(STREAM))
    alert = await dash.recv_type("alert")
    assert list(alert) == ["type", "streamId", "severity", "message", "metadata", "timestamp", "alertId", "seq",
                           "receivedAt"]


async def test_duplicate_alert_id_gives_one_row_one_fan_out_and_the_same_ack(server, ws_connect, token):
    _, (dash,), ml = await _stream_with_watchers(ws_connect, token, dashboards=1)
    await ml.send(alert_message(STREAM, id="retry-me"))
    first = await ml.recv_type("ack")
    await ml.send(alert_message(STREAM, id="retry-me"))
    second = await ml.recv_type("ack")
    assert (second["alertId"], second["seq"]) == (first["alertId"], first["seq"]) and second["duplicate"] is True
    await ml.send(alert_message(STREAM, id="next"))
    await ml.recv_type("ack")
    assert [(await dash.recv_type("alert"))["seq"] for _ in range(2)] == [1, 2]  # no second copy of seq 1
    assert await server.services.store.count_alerts(STREAM) == 2


async def test_duplicate_sent_while_the_first_is_being_stored_gets_the_same_ack(server, ws_connect, token):
    _, _, ml = await _stream_with_watchers(ws_connect, token, dashboards=0)
    for _ in range(3):  # back to back: the later ones arrive while the first is in flight
        await ml.send(alert_message(STREAM, id="burst"))
    acks = [await ml.recv_type("ack") for _ in range(3)]
    assert len({(a["alertId"], a["seq"]) for a in acks}) == 1
    assert await server.services.store.count_alerts(STREAM) == 1


async def test_alert_with_snapshot_is_stored_with_its_jpeg(server, ws_connect, token):
    import base64
    _, (dash,), ml = await _stream_with_watchers(ws_connect, token, dashboards=1)
    jpeg = b"\xff\xd8snapshot\xff\xd9"
    await ml.send(alert_message(STREAM, snapshot=base64.b64encode(jpeg).decode()))
    ack = await ml.recv_type("ack")
    assert (await dash.recv_type("alert"))["hasSnapshot"] is True
    assert await server.services.store.get_snapshot(ack["alertId"]) == (STREAM, jpeg)


class FailingAlertStore(SQLiteStore):
    """A store whose alert writes fail, as when MongoDB is unreachable."""

    fail = True

    async def insert_alerts(self, alerts):
        if self.fail:
            raise StoreUnavailable("database did not answer")
        return await super().insert_alerts(alerts)


async def test_store_failure_gets_a_retryable_error_and_no_fan_out_then_the_retry_lands(settings, token):
    import tornado.websocket
    from conftest import Client
    store = FailingAlertStore(":memory:")
    await store.start()
    server, close = await start_server(settings, store)
    try:
        async def connect():
            return Client(await tornado.websocket.websocket_connect(server.ws_url))
        mobile = await connect()
        await mobile.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
        await mobile.recv_type("registered")
        ml = await connect()
        await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                       "token": token("detector", role="service", streams="*")})
        await ml.recv_type("subscribed")
        await ml.send(alert_message(STREAM, id="x1"))
        error = await ml.recv_type("error")
        assert error["code"] == "store-unavailable" and error["ref"] == "x1"
        with pytest.raises(asyncio.TimeoutError):
            await mobile.recv_type("alert", timeout=0.3)
        store.fail = False
        await ml.send(alert_message(STREAM, id="x1"))  # the client's retry, same id
        ack = await ml.recv_type("ack")
        assert ack["ref"] == "x1" and "duplicate" not in ack
        assert (await mobile.recv_type("alert"))["alertId"] == ack["alertId"]
    finally:
        await close()


async def test_a_retry_after_a_restart_over_the_same_store_is_not_stored_twice(settings, token, tmp_path):
    """The SQLite store (its unique index) recognises a client id stored by an earlier run of the app, as MongoDB's
    unique index does, though the new app's in-memory memory of recent ids is empty."""
    import tornado.websocket
    from conftest import Client
    store = SQLiteStore(str(tmp_path / "watchout.db"))
    await store.start()
    acks = []
    for _ in range(2):  # the same alert, sent to two runs of the app that share one store
        server, close = await start_server(settings, store)
        try:
            phone = Client(await tornado.websocket.websocket_connect(server.ws_url))
            await phone.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
            await phone.recv_type("registered")
            ml = Client(await tornado.websocket.websocket_connect(server.ws_url))
            await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM, "consumes": [],
                           "token": token("detector", role="service", streams="*")})
            await ml.recv_type("subscribed")
            await ml.send(alert_message(STREAM, id="sent-before-the-restart"))
            acks.append(await ml.recv_type("ack"))
        finally:
            await close()
    assert acks[1]["duplicate"] is True and (acks[1]["alertId"], acks[1]["seq"]) == (acks[0]["alertId"], acks[0]["seq"])
    assert await store.count_alerts(STREAM) == 1
