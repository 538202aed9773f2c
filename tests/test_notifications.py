"""Notifications end to end: a real server, real WebSocket clients sending alerts, real webhook receivers on
loopback that verify Standard Webhooks signatures with the `standardwebhooks` package, and the receipts."""
from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import standardwebhooks
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

from conftest import Server, alert_message, producer, replace_settings, start_server, watcher
from watchout.settings import Settings
from watchout.store.sqlite import SQLiteStore

STREAM = "porch"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace_settings(settings, webhook_allow_private=True, webhook_timeout_s=0.5, delivery_retry_base_s=0.05,
                            delivery_retry_cap_s=0.2, public_url="https://watchout.example.com")


class Receiver:
    """A webhook receiver on loopback: verifies each request with the secret it is given, answers as scripted
    ("ok", "500", "timeout"; then "ok"), and can stop listening (connection refused) and listen again."""

    def __init__(self) -> None:
        self.secret: str | None = None
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []  # every request that arrived: headers, body, verified
        self.received: list[dict[str, Any]] = []  # verified payloads answered 2xx
        self.port = 0
        self.http: tornado.httpserver.HTTPServer | None = None
        self.arrived = asyncio.Event()

    def start(self) -> None:
        receiver = self

        class Hook(tornado.web.RequestHandler):
            async def post(self) -> None:
                headers = {k: v for k, v in self.request.headers.get_all()}
                try:
                    payload = standardwebhooks.Webhook(receiver.secret).verify(self.request.body, headers)
                    verified = True
                except standardwebhooks.webhooks.WebhookVerificationError:
                    payload, verified = None, False
                receiver.requests.append({"headers": headers, "body": self.request.body, "verified": verified})
                receiver.arrived.set()
                action = receiver.script.pop(0) if receiver.script else "ok"
                if action == "timeout":
                    await asyncio.sleep(1.5)  # the sender has given up by now: this answer reaches nobody
                    self.set_status(504)
                elif action == "500":
                    self.set_status(500)
                elif verified:
                    receiver.received.append(payload)
                    self.set_status(204)
                else:
                    self.set_status(401)

        sockets = tornado.netutil.bind_sockets(self.port, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self.http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/hook", Hook)]))
        self.http.add_sockets(sockets)

    def stop(self) -> None:
        assert self.http is not None
        self.http.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


async def rest(server: Server, method: str, path: str, token: str, body: Any = None,
               expect: int = 200) -> Any:
    request = tornado.httpclient.HTTPRequest(
        server.url(path), method=method, headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"},
        body=None if body is None else json.dumps(body), allow_nonstandard_methods=True)
    response = await tornado.httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == expect, (response.code, response.body)
    return json.loads(response.body) if response.body else None


async def register(server: Server, token: str, receiver: Receiver, **rules: Any) -> dict[str, Any]:
    made = await rest(server, "POST", "/api/webhooks", token, {"url": receiver.url, **rules}, expect=201)
    receiver.secret = made["secret"]
    return made


async def until(check: Any, timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def send_alerts(ml: Any, count: int, **extra: Any) -> list[dict[str, Any]]:
    acks = []
    for i in range(count):
        await ml.send(alert_message(STREAM, id=f"n{i}-{extra.get('severity', 'high')}", message=f"alert {i}",
                                    **extra))
        acks.append(await ml.recv_type("ack"))
    return acks


async def test_a_webhook_gets_each_alert_signed_after_failures_once_more_per_failure(
        server, ws_connect, token, receiver):
    """500, a timeout and a refused connection, then accepted: four signed attempts with one webhook-id,
    one payload received, and the receipts say delivered after 4 attempts."""
    await producer(ws_connect, token, STREAM)
    made = await register(server, token("alice"), receiver)
    assert made["url"] == receiver.url and made["allStreams"] is False
    receiver.script = ["500", "timeout"]
    ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
    (ack,) = await send_alerts(ml, 1)
    receipts = f"/api/alerts/{ack['alertId']}/deliveries"

    async def two_failed() -> bool:
        return len(receiver.requests) >= 2 and receiver.requests[-1]["verified"]
    await until(two_failed)
    receiver.stop()  # the third attempt finds nobody listening

    async def refused() -> Any:
        (d,) = (await rest(server, "GET", receipts, token("alice")))["items"]
        return d["attempts"] >= 3 and d
    third = await until(refused)
    assert third["state"] == "pending" and "refused" in third["lastError"] and third["nextAttemptAt"]
    receiver.start()

    async def delivered() -> Any:
        (d,) = (await rest(server, "GET", receipts, token("alice")))["items"]
        return d["state"] == "delivered" and d
    receipt = await until(delivered)
    assert receipt["attempts"] == 4 and receipt["lastError"] is None and receipt["deliveredAt"]
    assert receipt["destinationId"] == made["id"] and receipt["channel"] == "webhook"
    assert len(receiver.requests) == 3 and all(r["verified"] for r in receiver.requests)  # + the refused one
    assert {r["headers"]["Webhook-Id"] for r in receiver.requests} == {receipt["deliveryId"]}
    (payload,) = receiver.received
    assert payload["type"] == "alert" and payload["data"]["alertId"] == ack["alertId"]
    assert payload["data"]["streamId"] == STREAM and payload["data"]["seq"] == ack["seq"]


async def test_payload_is_the_alert_resource_with_an_absolute_snapshot_url(server, ws_connect, token, receiver):
    import base64

    from conftest import JPEG
    await producer(ws_connect, token, STREAM)
    await register(server, token("alice"), receiver)
    ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
    await ml.send(alert_message(STREAM, id="snap", snapshot=base64.b64encode(JPEG).decode()))
    ack = await ml.recv_type("ack")
    await until(lambda: asyncio.sleep(0, len(receiver.received) == 1))
    data = receiver.received[0]["data"]
    resource = await rest(server, "GET", f"/api/streams/{STREAM}/alerts", token("alice"))
    expected = dict(resource["items"][0])
    expected["snapshotUrl"] = f"https://watchout.example.com/api/alerts/{ack['alertId']}/snapshot.jpg"
    assert data == expected


async def test_rules_keep_to_the_owners_streams_listed_streams_and_minimum_severity(
        server, ws_connect, token, receiver):
    second = Receiver()
    second.start()
    try:
        await producer(ws_connect, token, STREAM)
        await producer(ws_connect, token, "garden")
        await producer(ws_connect, token, "bobs-door", sub="bob")
        await register(server, token("alice"), receiver, minSeverity="high", streams=[STREAM, "bobs-door"])
        admin_hook = await register(server, token("root", role="admin"), second)
        assert admin_hook["allStreams"] is True
        ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", "*")
        for stream, severity in ((STREAM, "low"), (STREAM, "critical"), ("garden", "critical"),
                                 ("bobs-door", "critical")):
            await ml.send(alert_message(stream, severity=severity, message=f"{stream} {severity}"))
            await ml.recv_type("ack")
        await until(lambda: asyncio.sleep(0, len(second.received) == 4))
        await asyncio.sleep(0.3)  # nothing more is coming to the user's webhook
        assert [p["data"]["message"] for p in receiver.received] == ["porch critical"]
        assert sorted(p["data"]["message"] for p in second.received) == sorted(
            ["porch low", "porch critical", "garden critical", "bobs-door critical"])
    finally:
        second.stop()


async def test_a_cooldown_sends_one_per_stream_and_summarises_the_rest_in_the_next(
        server, ws_connect, token, receiver):
    await producer(ws_connect, token, STREAM)
    await register(server, token("alice"), receiver, cooldownS=1)
    ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
    (first,) = await send_alerts(ml, 1)
    await until(lambda: asyncio.sleep(0, len(receiver.received) == 1))
    held = []
    for i in range(4):
        await ml.send(alert_message(STREAM, id=f"burst{i}", severity="critical" if i == 1 else "medium"))
        held.append(await ml.recv_type("ack"))
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 1  # within the cooldown: nothing yet
    await until(lambda: asyncio.sleep(0, len(receiver.received) == 2), timeout=5)
    data = receiver.received[1]["data"]
    assert data["alertId"] == held[-1]["alertId"]  # the newest carries the others
    assert data["summary"]["count"] == 3 and data["summary"]["highestSeverity"] == "critical"
    assert (data["summary"]["firstSeq"], data["summary"]["lastSeq"]) == (held[0]["seq"], held[2]["seq"])
    receipts = (await rest(server, "GET", f"/api/alerts/{held[0]['alertId']}/deliveries", token("alice")))["items"]
    carrier = (await rest(server, "GET", f"/api/alerts/{held[-1]['alertId']}/deliveries", token("alice")))["items"]
    assert receipts[0]["state"] == "summarised" and receipts[0]["summarisedIn"] == carrier[0]["deliveryId"]
    assert first["seq"] < held[0]["seq"]


async def test_an_unacknowledged_alert_escalates_and_an_acknowledged_one_does_not(
        server, ws_connect, token, receiver):
    await producer(ws_connect, token, STREAM)
    await register(server, token("alice"), receiver, escalate=True, escalateAfterS=0.5, minSeverity="high")
    ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
    acked, ignored, low = (await send_alerts(ml, 1, severity="critical"))[0], \
        (await send_alerts(ml, 1, severity="high"))[0], (await send_alerts(ml, 1, severity="low"))[0]
    await rest(server, "POST", f"/api/alerts/{acked['alertId']}/ack", token("alice"))
    await asyncio.sleep(0.2)
    assert receiver.received == []  # not before escalateAfterS
    await until(lambda: asyncio.sleep(0, len(receiver.received) == 1), timeout=5)
    await asyncio.sleep(0.3)
    (payload,) = receiver.received
    assert payload["type"] == "alert.escalated" and payload["data"]["alertId"] == ignored["alertId"]
    (receipt,) = (await rest(server, "GET", f"/api/alerts/{acked['alertId']}/deliveries", token("alice")))["items"]
    assert (receipt["purpose"], receipt["state"], receipt["lastError"]) == ("escalate", "cancelled", "acknowledged")
    assert (await rest(server, "GET", f"/api/alerts/{low['alertId']}/deliveries", token("alice")))["items"] == []


async def test_a_restart_with_deliveries_pending_loses_none(settings, tmp_path, ws_connect, token, receiver):
    """The receiver is down; the server stops with deliveries pending and starts again on the same database:
    every alert arrives, each once."""
    settings = replace_settings(settings, delivery_retry_base_s=0.2, delivery_retry_cap_s=0.5)
    store = SQLiteStore(str(tmp_path / "watchout.db"))
    await store.start()
    try:
        server, close = await start_server(settings, store)
        try:
            await register(server, token("alice"), receiver)
            receiver.stop()
            phone = await connect_and_register(server, token)
            ml = await connect_ml(server, token)
            acks = await send_alerts(ml, 5)
            await asyncio.sleep(0.3)
            phone.close()
            ml.close()
        finally:
            await close()
        receiver.start()
        server, close = await start_server(settings, store)
        try:
            await until(lambda: asyncio.sleep(0, len(receiver.received) == 5))
            await asyncio.sleep(0.5)
            assert sorted(p["data"]["seq"] for p in receiver.received) == [a["seq"] for a in acks]
            for ack in acks:
                (d,) = (await rest(server, "GET", f"/api/alerts/{ack['alertId']}/deliveries", token("alice")))["items"]
                assert d["state"] == "delivered"
        finally:
            await close()
    finally:
        store.close()


async def connect_and_register(server: Server, token: Any) -> Any:
    from conftest import Client
    client = Client(await tornado.websocket.websocket_connect(server.ws_url))
    await client.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
    await client.recv_type("registered")
    return client


async def connect_ml(server: Server, token: Any) -> Any:
    from conftest import Client
    client = Client(await tornado.websocket.websocket_connect(server.ws_url))
    await client.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                       "token": token("detector", role="service", streams=[STREAM])})
    await client.recv_type("subscribed")
    return client


async def test_deleting_a_webhook_cancels_what_is_pending_and_the_test_and_rotation_work(
        server, ws_connect, token, receiver):
    await producer(ws_connect, token, STREAM)
    made = await register(server, token("alice"), receiver)
    tested = await rest(server, "POST", f"/api/webhooks/{made['id']}/test", token("alice"))
    assert tested == {"ok": True, "status": 204, "error": None}
    assert receiver.received[-1]["type"] == "test"
    old_secret = receiver.secret
    rotated = await rest(server, "POST", f"/api/webhooks/{made['id']}/rotate-secret", token("alice"))
    receiver.secret = old_secret  # a receiver that has not switched yet still verifies
    assert (await rest(server, "POST", f"/api/webhooks/{made['id']}/test", token("alice")))["ok"] is True
    receiver.secret = rotated["secret"]
    assert (await rest(server, "POST", f"/api/webhooks/{made['id']}/test", token("alice")))["ok"] is True
    assert len(receiver.requests[-1]["headers"]["Webhook-Signature"].split(" ")) == 2
    receiver.stop()
    ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
    (ack,) = await send_alerts(ml, 1)
    receipts = f"/api/alerts/{ack['alertId']}/deliveries"

    async def tried() -> bool:
        items = (await rest(server, "GET", receipts, token("alice")))["items"]
        return bool(items) and items[0]["attempts"] >= 1
    await until(tried)
    await rest(server, "DELETE", f"/api/webhooks/{made['id']}", token("alice"), expect=204)
    (receipt,) = (await rest(server, "GET", receipts, token("alice")))["items"]
    assert (receipt["state"], receipt["lastError"]) == ("cancelled", "destination deleted")


async def test_a_never_answering_or_huge_receiver_stalls_nothing(settings, server, ws_connect, token):
    """Endpoints that accept and never answer, or answer 200 with an endless body, take their timeout (0.5 s)
    while alerts keep reaching their watchers at once (each well within that timeout)."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        try:
            for _ in range(50 * 16):
                writer.write(b"x" * 65536)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in (silent, endless)]
    try:
        for s in servers:
            port = s.sockets[0].getsockname()[1]
            await rest(server, "POST", "/api/webhooks", token("alice"), {"url": f"http://127.0.0.1:{port}/h"},
                       expect=201)
        await producer(ws_connect, token, STREAM)
        dashboard = await watcher(ws_connect, token, STREAM)
        ml = await watcher(ws_connect, token, STREAM, "ml-service", "detector", "service", [STREAM])
        loop = asyncio.get_running_loop()
        for i in range(20):
            started = loop.time()
            await ml.send(alert_message(STREAM, id=f"s{i}"))
            await ml.recv_type("ack")
            await dashboard.recv_type("alert")
            assert loop.time() - started < 0.4
    finally:
        for s in servers:
            s.close()


async def test_a_delivery_failing_past_its_max_age_is_given_up_and_counted(settings, ws_connect, token, receiver):
    server, close = await start_server(replace_settings(settings, delivery_max_age_s=0.4))
    try:
        phone = await connect_and_register(server, token)
        await register(server, token("alice"), receiver)
        receiver.script = ["500"] * 100
        ml = await connect_ml(server, token)
        (ack,) = await send_alerts(ml, 1)
        receipts = f"/api/alerts/{ack['alertId']}/deliveries"

        async def given_up() -> Any:
            items = (await rest(server, "GET", receipts, token("alice")))["items"]
            return items and items[0]["state"] == "failed" and items[0]
        failed = await until(given_up)
        assert failed["attempts"] >= 2 and failed["lastError"] == "HTTP 500" and failed["lastStatus"] == 500
        assert failed["nextAttemptAt"] is None and receiver.received == []
        response = await tornado.httpclient.AsyncHTTPClient().fetch(server.url("/metrics"))
        metrics = response.body.decode()
        assert 'watchout_deliveries_total{channel="webhook",result="failed"} 1.0' in metrics
        assert 'watchout_deliveries_total{channel="webhook",result="retry"}' in metrics
        assert "watchout_deliveries_pending" in metrics and "watchout_deliveries_oldest_pending_seconds" in metrics
        phone.close()
        ml.close()
    finally:
        await close()
