"""A camera producer for Watchout: registers a stream, sends JPEG frames, and prints the alerts it gets.

    pip install websockets
    python producer.py --url ws://127.0.0.1:3000/ws --token "$USER_TOKEN" --stream porch --jpeg frame.jpg
    python producer.py --token-command "watchout token --sub alice --ttl 15m" --stream porch --binary

It reconnects with backoff when the connection drops, refreshes its token with `auth` before it
expires (when it can get a new one: --token-command), and stops for good when a newer producer
takes the stream over (close 4409). See docs/guide-mobile.md.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import random
import shlex
import struct
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

HEADER = struct.Struct("!2sBBQHH")  # "WO", layout 1, streamId length, timestamp ms, width, height
# An 8x8 grey JPEG, so the example runs without a camera; pass --jpeg to send real pictures.
GREY_JPEG = base64.b64decode(
    "/9j/2wBDAAEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQH/"
    "wAALCAAIAAgBAREA/8QAFAABAAAAAAAAAAAAAAAAAAAAAP/EABQQAQAAAAAAAAAAAAAAAAAAAAD/2gAIAQEAAD8AP//Z")
REPLACED, FORBIDDEN, UNAUTHENTICATED = 4409, 4403, 4401
GIVE_UP = {FORBIDDEN: "forbidden: this token may not produce this stream", 4410: "the stream was deleted",
           1008: "closed for sending invalid messages", 1009: "a message was too big"}


class Replaced(Exception):
    """A newer producer registered this stream: the server closed us with 4409."""


class Fatal(Exception):
    """Reconnecting cannot help (forbidden, refused token that cannot be renewed, bad messages)."""


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
                raise Fatal(f"token command failed with exit code {proc.returncode}")
            self.token = out.decode().strip()
        return self.token


def claims(token: str) -> dict[str, Any]:
    """The token's claims, read without checking the signature (only the server can, and does)."""
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def refresh_delay_s(token: str) -> float:
    """Seconds until the token should be replaced: a third of its life, at most a minute, before exp."""
    c = claims(token)
    lifetime = c["exp"] - c.get("iat", c["exp"] - 3600)
    return max(0.0, c["exp"] - min(60.0, lifetime / 3) - time.time())


class Producer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokens = TokenSource(args.token, args.token_command)
        self.jpegs = [Path(p).read_bytes() for p in args.jpeg] or [GREY_JPEG]
        self.sid = args.stream.encode("ascii")
        self.stats = {"framesSent": 0, "alertsReceived": 0, "reconnects": 0, "tokenRefreshes": 0}
        self.deadline = time.monotonic() + args.seconds if args.seconds else None

    def done(self) -> bool:
        if self.args.frames and self.stats["framesSent"] >= self.args.frames:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    async def run(self) -> int:
        """Connect, stream, and reconnect with exponential backoff and jitter until done."""
        failures = 0
        token = await self.tokens.fresh()
        while not self.done():
            registered = False
            try:
                async with connect(self.args.url, max_size=2**20, open_timeout=10) as ws:
                    registered = await self.register(ws, token)
                    await self.stream(ws)
                    return self.finish(0)
            except Replaced:
                print("another device took over this stream (4409); not reconnecting", file=sys.stderr)
                return self.finish(3)
            except Fatal as exc:
                print(f"giving up: {exc}", file=sys.stderr)
                return self.finish(2)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                if code == REPLACED:
                    print("another device took over this stream (4409); not reconnecting", file=sys.stderr)
                    return self.finish(3)
                if code in GIVE_UP:
                    print(f"giving up: {GIVE_UP[code]}", file=sys.stderr)
                    return self.finish(2)
                if code == UNAUTHENTICATED:
                    if not self.tokens.can_refresh:
                        print("giving up: token refused or expired (4401); pass --token-command", file=sys.stderr)
                        return self.finish(2)
                    token = await self.tokens.fresh()
                print(f"connection closed ({code}); reconnecting", file=sys.stderr)
            except InvalidStatus as exc:  # the HTTP upgrade was refused
                if exc.response.status_code < 500:  # e.g. 403: an Origin not in trusted_origins
                    print(f"giving up: {exc}", file=sys.stderr)
                    return self.finish(2)
                print(f"{exc}; retrying", file=sys.stderr)
            except (OSError, TimeoutError) as exc:
                print(f"cannot connect: {exc}; retrying", file=sys.stderr)
            failures = 1 if registered else failures + 1
            self.stats["reconnects"] += 1
            await asyncio.sleep(min(30.0, 0.5 * 2 ** failures) * random.uniform(0.5, 1.0))
        return self.finish(0)

    def finish(self, code: int) -> int:
        print(json.dumps(self.stats), flush=True)
        return code

    async def register(self, ws: ClientConnection, token: str) -> bool:
        await ws.send(json.dumps({"type": "register", "clientType": "mobile", "streamId": self.args.stream,
                                  "produces": ["video-frame"], "consumes": ["alert"], "token": token,
                                  "id": "register"}))
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "registered":
                return True
            if message["type"] == "error":
                raise Fatal(f"register refused: {message['code']}: {message['message']}")

    async def stream(self, ws: ClientConnection) -> None:
        """Send frames, read what the server says, and refresh the token, until done or closed."""
        tasks = [asyncio.create_task(self.read(ws)), asyncio.create_task(self.refresh(ws))]
        try:
            interval = 1.0 / self.args.fps
            for jpeg in itertools.cycle(self.jpegs):
                if self.done():
                    break
                await ws.send(self.frame(jpeg))
                self.stats["framesSent"] += 1
                await asyncio.sleep(interval)
                for task in tasks:  # a reader that saw 4409 or a refused refresh ends the stream
                    if task.done():
                        task.result()
            await ws.close()
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, (Replaced, Fatal)):
                    raise result

    def frame(self, jpeg: bytes) -> str | bytes:
        ts = int(time.time() * 1000)
        if self.args.binary:
            return HEADER.pack(b"WO", 1, len(self.sid), ts, self.args.width, self.args.height) + self.sid + jpeg
        message: dict[str, Any] = {"type": "video-frame", "streamId": self.args.stream,
                                   "data": base64.b64encode(jpeg).decode(), "timestamp": ts}
        if self.args.width and self.args.height:
            message.update(width=self.args.width, height=self.args.height)
        return json.dumps(message, separators=(",", ":"))

    async def read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            message = json.loads(raw)
            kind = message["type"]
            if kind == "alert":
                self.stats["alertsReceived"] += 1
                meta = message.get("metadata", {})
                print(f"alert #{message['seq']} {message['severity']}: {message['message']} "
                      f"({meta.get('objectType', '?')} {meta.get('confidence', '?')})", flush=True)
            elif kind == "error" and message["code"] == "producer-replaced":
                raise Replaced()
            elif kind == "error":
                print(f"server error {message['code']}: {message['message']}", file=sys.stderr)
            elif kind == "authenticated":
                self.stats["tokenRefreshes"] += 1
            # registered, status, pong: nothing to do; unknown types are ignored, as the protocol asks

    async def refresh(self, ws: ClientConnection) -> None:
        """Send `auth` with a fresh token before the current one expires (the server closes 4401 after)."""
        if not self.tokens.can_refresh:
            return
        while True:
            await asyncio.sleep(refresh_delay_s(self.tokens.token))
            await ws.send(json.dumps({"type": "auth", "token": await self.tokens.fresh(), "id": "refresh"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:3000/ws")
    parser.add_argument("--stream", required=True, help="stream id, e.g. porch-cam")
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="a user token (cannot be refreshed)")
    auth.add_argument("--token-command", help="a command that prints a fresh token, e.g. 'watchout token --sub alice'")
    parser.add_argument("--jpeg", action="append", default=[], help="JPEG file to send (repeat to cycle)")
    parser.add_argument("--binary", action="store_true", help="send binary frames instead of JSON with base64")
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: no limit)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: no limit)")
    return asyncio.run(Producer(parser.parse_args()).run())


if __name__ == "__main__":
    sys.exit(main())
