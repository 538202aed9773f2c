"""A real `watchout serve` with short intervals: a frozen producer (SIGSTOP) is marked offline in time."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time

import tornado.httpclient
import tornado.websocket

from conftest import Client
from test_service import _start_serve
from watchout.auth import mint_token

SECRET = "jobs-secret-0123456789abcdef0123456789abcdef"
PING_INTERVAL_S, PING_TIMEOUT_S, OFFLINE_AFTER_S, OFFLINE_CHECK_S = 1.0, 1.0, 2.0, 0.5
BOUND_S = PING_INTERVAL_S + PING_TIMEOUT_S + OFFLINE_CHECK_S
SLACK_S = 0.75  # scheduling and loopback; Tornado's own ping timeout would take 5 s more (its close wait)

PHONE = """
import asyncio, json, sys, tornado.websocket
async def main():
    conn = await tornado.websocket.websocket_connect(sys.argv[1])
    await conn.write_message(json.dumps({"type": "register", "clientType": "mobile", "streamId": "cam",
                                         "token": sys.argv[2]}))
    print(json.loads(await conn.read_message())["type"], flush=True)
    while await conn.read_message() is not None:  # answers the server's pings while it runs
        pass
asyncio.run(main())
"""


async def test_a_frozen_producer_is_marked_offline_and_its_dashboard_told_within_the_bound():
    proc, port, _ = await _start_serve({
        "WATCHOUT_JWT_SECRET": SECRET, "WATCHOUT_WS_PING_INTERVAL_S": str(PING_INTERVAL_S),
        "WATCHOUT_WS_PING_TIMEOUT_S": str(PING_TIMEOUT_S), "WATCHOUT_OFFLINE_AFTER_S": str(OFFLINE_AFTER_S),
        "WATCHOUT_OFFLINE_CHECK_S": str(OFFLINE_CHECK_S)})
    user = mint_token(SECRET, "HS256", "alice", "user")
    phone = await asyncio.create_subprocess_exec(sys.executable, "-c", PHONE, f"ws://127.0.0.1:{port}/ws", user,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        assert phone.stdout is not None
        assert (await asyncio.wait_for(phone.stdout.readline(), 20)).strip() == b"registered"
        dash = Client(await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/ws"))
        await dash.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": user})
        assert (await dash.recv_type("subscribed"))["status"] == "online"

        # idle but answering pings: still online well past offline_after_s
        try:
            message = await dash.recv_type("status", timeout=OFFLINE_AFTER_S + 2 * OFFLINE_CHECK_S)
            raise AssertionError(f"a live idle producer got {message}")
        except TimeoutError:
            pass

        os.kill(phone.pid, signal.SIGSTOP)
        frozen_at, frozen_wall = time.monotonic(), dt.datetime.now(dt.timezone.utc)
        status = await dash.recv_type("status", timeout=BOUND_S + 5)
        elapsed = time.monotonic() - frozen_at
        assert status["status"] == "offline"
        assert elapsed <= BOUND_S + SLACK_S, f"offline after {elapsed:.2f} s"

        request = tornado.httpclient.HTTPRequest(f"http://127.0.0.1:{port}/api/streams/cam",
                                                 headers={"Authorization": f"Bearer {user}"})
        stream = json.loads((await tornado.httpclient.AsyncHTTPClient().fetch(request)).body)
        assert stream["status"] == "offline"
        last_seen = dt.datetime.fromisoformat(stream["lastSeenAt"])
        # lastSeenAt is the producer's last monotonic reading turned into wall time by the server: allow the
        # few milliseconds that conversion and another process's clock reading may differ by
        assert frozen_wall - dt.timedelta(seconds=PING_INTERVAL_S + 0.5) <= last_seen \
            <= frozen_wall + dt.timedelta(milliseconds=5)
        dash.close()
    finally:
        phone.kill()
        await phone.wait()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
