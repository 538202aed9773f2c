"""The seed document's three client examples, message for message, against the real server (real tokens)."""
from __future__ import annotations

import base64

from conftest import JPEG

STREAM = "my-stream-123"


async def seed_mobile(ws_connect, token):
    ws = await ws_connect()
    await ws.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "produces": ["video-frame"],
                   "consumes": ["alert"], "userId": "user123", "token": token("user123")})
    return ws


async def seed_dashboard(ws_connect, token):
    ws = await ws_connect()
    await ws.send({"type": "subscribe", "clientType": "dashboard", "streamId": STREAM,
                   "consumes": ["video-frame", "alert"], "userId": "user123", "token": token("user123")})
    return ws


async def test_seed_examples_frames_reach_dashboard_and_ml_and_alerts_reach_mobile_and_dashboard(ws_connect, token):
    mobile = await seed_mobile(ws_connect, token)
    assert (await mobile.recv_type("registered"))["streamId"] == STREAM
    dashboard = await seed_dashboard(ws_connect, token)
    assert (await dashboard.recv_type("subscribed"))["status"] == "online"
    # The seed's ML example carries no token; a real deployment gives it a service token.
    ml = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM, "consumes": ["video-frame"],
                   "produces": ["alert"], "token": token("detector", role="service", streams=[STREAM])})
    await ml.recv_type("subscribed")

    frame_data = base64.b64encode(JPEG).decode()
    await mobile.send({"type": "video-frame", "streamId": STREAM, "data": frame_data, "timestamp": 1764150000000})
    for consumer in (dashboard, ml):
        frame = await consumer.recv_type("video-frame")
        assert frame["data"] == frame_data and frame["streamId"] == STREAM

    analysed = frame  # the ML example answers the frame it analysed
    await ml.send({"type": "alert", "streamId": analysed["streamId"], "severity": "high",
                   "message": "Suspicious activity detected",
                   "metadata": {"confidence": 0.95, "objectType": "person"}, "timestamp": 1764150000001})
    ack = await ml.recv_type("ack")
    for consumer in (mobile, dashboard):
        alert = await consumer.recv_type("alert")
        assert alert["message"] == "Suspicious activity detected"
        assert alert["severity"] == "high" and alert["alertId"] == ack["alertId"] and alert["seq"] == ack["seq"] == 1


async def test_seed_tokenless_ml_subscribe_is_refused_with_4401(server, ws_connect, token):
    mobile = await seed_mobile(ws_connect, token)
    await mobile.recv_type("registered")
    ml = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                   "consumes": ["video-frame"], "produces": ["alert"]})
    error = await ml.recv_type("error")
    assert error["code"] == "token-missing"
    code, _ = await ml.closed()
    assert code == 4401
    assert server.services.hub.figures()["totalVideoConsumers"] == 0
