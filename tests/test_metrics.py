"""/metrics: Prometheus exposition that parses, and counters that move with traffic."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import alert_message, frame_message, producer, replace_settings, watcher


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def _scrape(api):
    response = await api("GET", "/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    return _samples(response.body)


async def test_metrics_parse_and_move_with_traffic(server, ws_connect, token, api):
    before = await _scrape(api)
    assert before[("watchout_frames_sent_total", ())] == 0
    phone = await producer(ws_connect, token, "cam")
    dash = await watcher(ws_connect, token, "cam")
    ml = await watcher(ws_connect, token, "cam", client_type="ml-service", consumes=["video-frame"],
                       sub="detector", role="service", streams=["cam"])
    for i in range(5):
        await phone.send(frame_message("cam", timestamp=i))
    for _ in range(5):
        await dash.recv_type("video-frame")
        await ml.recv_type("video-frame")
    await ml.send(alert_message("cam"))
    alert_id = (await ml.recv_type("ack"))["alertId"]
    await api("POST", f"/api/alerts/{alert_id}/ack", token=token("alice"))
    bad = await ws_connect()
    await bad.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": "garbage"})
    await bad.closed()
    await api("GET", "/api/streams", token="expired-or-garbage")
    after = await _scrape(api)
    assert after[("watchout_frames_received_total", ())] == 5
    assert after[("watchout_frames_sent_total", ())] == 10
    assert after[("watchout_alerts_stored_total", ())] == 1
    assert after[("watchout_alerts_acknowledged_total", ())] == 1
    assert after[("watchout_connections", (("role", "mobile"),))] == 1
    assert after[("watchout_connections", (("role", "dashboard"),))] == 1
    assert after[("watchout_connections", (("role", "ml-service"),))] == 1
    assert after[("watchout_streams", (("status", "streaming"),))] == 1
    assert after[("watchout_auth_failures_total", (("reason", "token-invalid"),))] == 2  # WebSocket + REST
    assert after[("watchout_connections_closed_total", (("code", "4401"),))] == 1
    assert after[("watchout_alert_latency_seconds_count", ())] == 1
    assert after[("watchout_store_latency_seconds_count", (("operation", "insert_alerts"),))] >= 1
    assert after[("watchout_received_bytes_total", ())] > 5 * len(frame_message("cam")["data"])
    assert after[("watchout_sent_bytes_total", ())] > after[("watchout_received_bytes_total", ())]


async def test_openmetrics_is_served_when_asked_for(server, api):
    response = await api("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.body.rstrip().endswith(b"# EOF")


async def test_slow_consumer_drops_show_in_metrics(settings, ws_connect, token, api, server):
    from rawws import RawClient
    stalled = await asyncio.to_thread(RawClient, server.port)
    phone = await producer(ws_connect, token, "cam")
    stalled.send_json({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": token("alice")})
    await asyncio.to_thread(stalled.recv_frame)
    for i in range(200):
        await phone.send(frame_message("cam", b"\xff" * 60000, timestamp=i))
    for _ in range(100):
        samples = await _scrape(api)
        if samples[("watchout_frames_dropped_total", ())] > 0:
            break
        await asyncio.sleep(0.02)
    assert samples[("watchout_frames_dropped_total", ())] > 0
    stalled.close()


@pytest.fixture
def settings(settings):
    return replace_settings(settings, outbox_soft_bytes=256 * 1024, outbox_hard_bytes=64 * 1024 * 1024)
