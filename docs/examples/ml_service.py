"""An ML service for Watchout: watches streams, analyses frames off the event loop, and sends alerts until acked.

    pip install websockets
    ML_TOKEN=$(watchout token --sub detector --role service --streams porch,garage --ttl 7d)
    python ml_service.py --url ws://127.0.0.1:3000/ws --token "$ML_TOKEN" --stream porch --stream garage

Frames arrive in the binary form (no base64 to decode). Only the newest frame of each stream is
analysed: frames that arrive while the model is busy replace the waiting one. The model runs in a
process pool, so the event loop stays free to read frames and answer the server's pings. Each alert
carries an `id`; it is sent again with the same `id` until the server acks it (after a
`store-unavailable` error, an ack timeout or a reconnect), and a repeat is never stored twice.
See docs/guide-ml-service.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import random
import shlex
import struct
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

HEADER = struct.Struct("!2sBBQHH")  # "WO", layout 1, streamId length, timestamp ms, width, height
MAX_MESSAGE_BYTES = 17 * 2**20  # the server relays frames of up to 16 MiB
ACK_TIMEOUT_S = 10.0
GIVE_UP = {4403: "forbidden", 1008: "closed for sending invalid messages", 1009: "a message was too big"}


def analyse(jpeg: bytes) -> list[dict[str, Any]]:
    """Stand-in for a real detector: CPU-bound work, then one "person" with a made-up confidence.

    Replace the body with your model (decode the JPEG, run inference, return detections).
    It runs in another process, so it may take as long as it needs.
    """
    digest = hashlib.sha256(jpeg).digest()
    for _ in range(20_000):  # ~20 ms of CPU
        digest = hashlib.sha256(digest).digest()
    return [{"objectType": "person", "confidence": round(0.5 + digest[0] / 510, 3),
             "box": {"x": digest[1], "y": digest[2], "w": 64, "h": 128}}]


class TokenSource:
    """A fixed token, or a command that prints a fresh one (run again before each expiry)."""

    def __init__(self, token: str | None, command: str | None) -> None:
        self.command = shlex.split(command) if command else None
        self.token = token or ""

    @property
    def can_refresh(self) -> bool:
        return self.command is not None

    async def fresh(self) -> str:
        if self.command is not None:
            proc = await asyncio.create_subprocess_exec(*self.command, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"token command failed with exit code {proc.returncode}")
            self.token = out.decode().strip()
        return self.token

    def claims(self) -> dict[str, Any]:
        """The token's claims, read without checking the signature (only the server can, and does)."""
        part = self.token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    def refresh_delay_s(self) -> float:
        """Seconds until the token should be replaced: a third of its life, at most a minute, before exp."""
        c = self.claims()
        lifetime = c["exp"] - c.get("iat", c["exp"] - 3600)
        return max(0.0, c["exp"] - min(60.0, lifetime / 3) - time.time())


class Service:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokens = TokenSource(args.token, args.token_command)
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.closing = False
        self.latest: dict[str, tuple[int, bytes]] = {}  # newest unanalysed frame per stream
        self.frame_ready = asyncio.Event()
        self.waiting: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # alert id -> its ack or error
        self.sending: set[asyncio.Task[None]] = set()
        self.background: set[asyncio.Task[None]] = set()
        self.last_alert: dict[str, float] = {}
        self.stats = {"framesReceived": 0, "framesAnalysed": 0, "alertsSent": 0, "alertsAcked": 0,
                      "duplicates": 0, "retries": 0, "reconnects": 0}

    async def run(self) -> int:
        with ProcessPoolExecutor(max_workers=self.args.workers) as pool:
            await self.tokens.fresh()
            conn = asyncio.create_task(self.connection_loop())
            analyser = asyncio.create_task(self.analyse_loop(pool))
            try:
                done, _ = await asyncio.wait({conn}, timeout=self.args.seconds or None)
                if conn in done:
                    return self.finish(conn.result())
                analyser.cancel()
                if self.sending:  # let alerts in flight get their ack before leaving
                    await asyncio.wait(self.sending, timeout=2 * ACK_TIMEOUT_S)
                self.closing = True
                if self.ws is not None:
                    await self.ws.close()
                await asyncio.wait({conn}, timeout=5)
                return self.finish(0)
            finally:
                conn.cancel()
                analyser.cancel()

    def finish(self, code: int) -> int:
        print(json.dumps(self.stats), flush=True)
        return code

    # ------------------------------------------------------------------ connection
    async def connection_loop(self) -> int:
        """Stay connected and subscribed; reconnect with exponential backoff. Returns an exit code."""
        failures = 0
        while not self.closing:
            healthy = False
            code: int | None = None
            try:
                # A non-browser client may authenticate on the upgrade request itself.
                headers = {"Authorization": f"Bearer {self.tokens.token}"}
                async with connect(self.args.url, additional_headers=headers, max_size=MAX_MESSAGE_BYTES,
                                   open_timeout=10) as ws:
                    for stream in self.args.stream:
                        await self.subscribe(ws, stream)
                    self.ws = ws
                    self.connected.set()
                    refresher = asyncio.create_task(self.refresh(ws))
                    try:
                        async for raw in ws:
                            healthy = True
                            self.on_message(ws, raw)
                    finally:
                        self.disconnected()
                        refresher.cancel()
                code = ws.close_code
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
            except InvalidStatus as exc:
                if exc.response.status_code < 500:
                    print(f"giving up: {exc}", file=sys.stderr)
                    return 2
            except (OSError, TimeoutError) as exc:
                print(f"cannot connect: {exc}", file=sys.stderr)
            if self.closing:
                return 0
            if code in GIVE_UP:
                print(f"giving up: {GIVE_UP[code]} ({code})", file=sys.stderr)
                return 2
            if code == 4401:
                if not self.tokens.can_refresh:
                    print("giving up: token refused or expired (4401); pass --token-command", file=sys.stderr)
                    return 2
                await self.tokens.fresh()
            failures = 1 if healthy else failures + 1
            self.stats["reconnects"] += 1
            print(f"connection closed ({code}); reconnecting", file=sys.stderr)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.0))
        return 0

    def disconnected(self) -> None:
        self.connected.clear()
        self.ws = None
        for future in self.waiting.values():  # their alerts are sent again after reconnecting
            if not future.done():
                future.set_result(None)

    async def subscribe(self, ws: ClientConnection, stream: str) -> None:
        await ws.send(json.dumps({"type": "subscribe", "clientType": "ml-service", "streamId": stream,
                                  "consumes": ["video-frame"], "produces": ["alert"],
                                  "format": "json" if self.args.json else "binary", "id": f"subscribe:{stream}"}))

    async def resubscribe_later(self, ws: ClientConnection, stream: str) -> None:
        """The stream does not exist yet (its phone has not registered) or is not in the token's scope."""
        await asyncio.sleep(5.0)
        if self.ws is ws:
            await self.subscribe(ws, stream)

    async def refresh(self, ws: ClientConnection) -> None:
        """Send `auth` with a fresh token before the current one expires (the server closes 4401 after)."""
        if not self.tokens.can_refresh:
            return
        while True:
            await asyncio.sleep(self.tokens.refresh_delay_s())
            await ws.send(json.dumps({"type": "auth", "token": await self.tokens.fresh(), "id": "refresh"}))

    def on_message(self, ws: ClientConnection, raw: str | bytes) -> None:
        if isinstance(raw, bytes):  # a binary video frame: 16-byte header, streamId, JPEG
            _, _, sid_len, timestamp, _, _ = HEADER.unpack_from(raw)
            stream = raw[16:16 + sid_len].decode("ascii")
            self.keep_frame(stream, timestamp, raw[16 + sid_len:])
            return
        message = json.loads(raw)
        kind, ref = message["type"], message.get("ref")
        if kind == "video-frame":
            self.keep_frame(message["streamId"], int(message["timestamp"]), base64.b64decode(message["data"]))
        elif kind in ("ack", "error") and ref in self.waiting:
            self.waiting[ref].set_result(message)
        elif kind == "error" and message["code"] == "not-found" and str(ref).startswith("subscribe:"):
            print(f"stream {ref[10:]} not found (yet); subscribing again in 5 s", file=sys.stderr)
            task = asyncio.create_task(self.resubscribe_later(ws, ref[10:]))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        elif kind == "error":
            print(f"server error {message['code']}: {message['message']}", file=sys.stderr)
        elif kind == "subscribed":
            print(f"watching {message['streamId']} (status {message['status']})", flush=True)
        # status, authenticated, pong: nothing to do; unknown types are ignored, as the protocol asks

    def keep_frame(self, stream: str, timestamp: int, jpeg: bytes) -> None:
        self.stats["framesReceived"] += 1
        self.latest[stream] = (timestamp, jpeg)  # replaces a frame still waiting: the newest wins
        self.frame_ready.set()

    # ------------------------------------------------------------------ analysis and alerts
    async def analyse_loop(self, pool: ProcessPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.frame_ready.wait()
            self.frame_ready.clear()
            while self.latest:
                stream, (timestamp, jpeg) = self.latest.popitem()
                detections = await loop.run_in_executor(pool, analyse, jpeg)
                self.stats["framesAnalysed"] += 1
                for detection in detections:
                    self.maybe_alert(stream, timestamp, detection)

    def maybe_alert(self, stream: str, timestamp: int, detection: dict[str, Any]) -> None:
        now = time.monotonic()
        if detection["confidence"] < self.args.threshold:
            return
        if now - self.last_alert.get(stream, -1e9) < self.args.cooldown:  # one alert per cooldown per stream
            return
        self.last_alert[stream] = now
        severity = "high" if detection["confidence"] >= 0.9 else "medium"
        alert = {"type": "alert", "id": f"{self.tokens.claims()['sub']}-{uuid.uuid4().hex}", "streamId": stream,
                 "severity": severity, "message": f"{detection['objectType']} detected", "timestamp": timestamp,
                 "metadata": {**detection, "model": "example-detector-1"}}
        task = asyncio.create_task(self.send_alert(alert))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def send_alert(self, alert: dict[str, Any]) -> None:
        """Send until acked. The same `id` every time, so the server stores and relays it once."""
        loop = asyncio.get_running_loop()
        self.stats["alertsSent"] += 1
        for attempt in itertools.count():
            await self.connected.wait()
            ws = self.ws
            reply: dict[str, Any] | None = None
            future: asyncio.Future[dict[str, Any] | None] = loop.create_future()
            self.waiting[alert["id"]] = future
            try:
                if ws is not None:
                    await ws.send(json.dumps(alert))
                    reply = await asyncio.wait_for(future, ACK_TIMEOUT_S)
            except (ConnectionClosed, TimeoutError):
                pass
            finally:
                self.waiting.pop(alert["id"], None)
            if reply is not None and reply["type"] == "ack":
                self.stats["alertsAcked"] += 1
                self.stats["duplicates"] += 1 if reply.get("duplicate") else 0
                print(f"alert #{reply['seq']} on {alert['streamId']} stored: {alert['message']}", flush=True)
                return
            if reply is not None and reply["code"] != "store-unavailable":
                print(f"alert dropped: {reply['code']}: {reply['message']}", file=sys.stderr)
                return
            self.stats["retries"] += 1
            await asyncio.sleep(min(10.0, 0.25 * 2 ** attempt))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:3000/ws")
    parser.add_argument("--stream", action="append", required=True, help="stream id to watch (repeat for more)")
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="a service token whose streams claim covers the streams")
    auth.add_argument("--token-command", help="a command that prints a fresh service token")
    parser.add_argument("--json", action="store_true", help="receive frames as JSON with base64 instead of binary")
    parser.add_argument("--threshold", type=float, default=0.5, help="lowest confidence that raises an alert")
    parser.add_argument("--cooldown", type=float, default=2.0, help="seconds between two alerts on one stream")
    parser.add_argument("--workers", type=int, default=1, help="processes running the model")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: no limit)")
    return asyncio.run(Service(parser.parse_args()).run())


if __name__ == "__main__":
    sys.exit(main())
