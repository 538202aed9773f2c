"""Shared fixtures: the real app on a loopback port, real JWTs, and a small WebSocket client."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.util
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.netutil
import tornado.testing
import tornado.websocket

from handlers import DEFAULT_HANDLER, METRICS_ROUTES, ROUTES
from watchout.app import make_app, server_options
from watchout.auth import mint_token
from watchout.serve import stop_serving
from watchout.services import Services, open_services
from watchout.settings import Settings
from watchout.store import Store
from watchout.store.mongo import MongoStore
from watchout.store.sqlite import SQLiteStore

TEST_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


def require_services() -> bool:
    """In CI (WATCHOUT_REQUIRE_SERVICES=1) a missing service fails instead of skipping."""
    return os.environ.get("WATCHOUT_REQUIRE_SERVICES") == "1"


# Browser tests: Debian's chromium driven by Playwright (which cannot download its own browser here).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def need_chromium() -> None:
    """Skip (or in CI fail) a browser test when Playwright or /usr/bin/chromium is missing."""
    missing = chromium_missing()
    if missing is not None:
        if require_services():
            pytest.fail(f"WATCHOUT_REQUIRE_SERVICES=1 but {missing}")
        pytest.skip(missing)


async def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium from Playwright's async API: it shares the test's loop with the server under test."""
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def artifacts_dir() -> Path:
    """Where tests keep screenshots: $WATCHOUT_TEST_ARTIFACTS, default test-artifacts/ in the repository."""
    path = Path(os.environ.get("WATCHOUT_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def mongomock_store(db_name: str = "watchout") -> MongoStore:
    """The MongoDB store on mongomock-motor, the tests' stand-in for a MongoDB server (start() it in a loop)."""
    import mongomock.collection
    from mongomock_motor import AsyncMongoMockClient

    builder: Any = mongomock.collection.BulkOperationBuilder
    if not getattr(builder, "_takes_sort", False):  # pymongo >= 4.9 passes sort=, which mongomock does not take
        add_update = builder.add_update

        def add_update_with_sort(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
            return add_update(self, *args, **kwargs)
        builder.add_update, builder._takes_sort = add_update_with_sort, True
    return MongoStore(AsyncMongoMockClient(tz_aware=True), db_name)


async def started(store: SQLiteStore | MongoStore) -> Any:
    await store.start(0.0)
    return store


@pytest.fixture
def settings() -> Settings:
    return Settings(jwt_secret=TEST_SECRET, data_dir=":memory:", auth_timeout_s=2.0, ws_ping_interval_s=5.0,
                    ws_ping_timeout_s=5.0,
                    token_expiry_grace_s=0.5, jwt_leeway_s=0.0, shutdown_timeout_s=2.0,
                    mongo_url=os.environ.get("WATCHOUT_TEST_MONGO_URI", ""),
                    mongo_db=f"watchout_test_{os.getpid()}")


@dataclass
class Server:
    services: Services
    port: int
    http: tornado.httpserver.HTTPServer

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def start_server(settings: Settings, store: Store | None = None, port: int = 0) -> tuple[Server, Any]:
    """Start the real app on an already-listening loopback socket; returns (server, closer).

    `port` 0 picks a free port; another value listens there again, e.g. to restart a server that a browser
    page will reconnect to (the same `store` keeps the data, as a real restart with MongoDB would).
    """
    context = open_services(settings, store)
    services = await context.__aenter__()
    await services.deliveries.start()
    app = make_app(services, ROUTES + METRICS_ROUTES, DEFAULT_HANDLER)
    http = tornado.httpserver.HTTPServer(app, **server_options(services))
    if port:
        http.add_sockets(tornado.netutil.bind_sockets(port, "127.0.0.1"))
    else:
        sock, port = tornado.testing.bind_unused_port()
        http.add_sockets([sock])

    async def close() -> None:
        """As SIGTERM on `watchout serve`: stop accepting, finish alert writes, close sockets with 1001."""
        await stop_serving(services, [http], services.settings.shutdown_timeout_s)
        await context.__aexit__(None, None, None)

    return Server(services, port, http), close


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Server]:
    srv, close = await start_server(settings)
    yield srv
    await close()


@pytest.fixture
def token(settings: Settings) -> Callable[..., str]:
    def make(sub: str = "alice", role: str = "user", streams: list[str] | str | None = None,
             ttl_s: int = 3600) -> str:
        return mint_token(settings.jwt_secret or TEST_SECRET, "HS256", sub, role, streams=streams, ttl_s=ttl_s)
    return make


class Client:
    """A real WebSocket client (tornado's) with JSON helpers and close-code access."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        await self.conn.write_message(message, binary=isinstance(message, bytes))

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes | None:
        return await asyncio.wait_for(self.conn.read_message(), timeout)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await self.recv_raw(timeout)
        if raw is None:
            raise ConnectionError(f"closed: {self.conn.close_code} {self.conn.close_reason}")
        assert isinstance(raw, str), "expected a text message"
        result: dict[str, Any] = json.loads(raw)
        return result

    async def recv_type(self, kind: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """Skip messages until one of this type (and these field values) arrives."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {kind} message {match}")
            raw = await self.recv_raw(left)
            if raw is None:
                raise ConnectionError(f"closed: {self.conn.close_code} {self.conn.close_reason}")
            if isinstance(raw, bytes):
                continue
            message: dict[str, Any] = json.loads(raw)
            if message.get("type") == kind and all(message.get(k) == v for k, v in match.items()):
                return message

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (code, reason)."""
        deadline = asyncio.get_running_loop().time() + timeout
        loop = asyncio.get_running_loop()
        while await asyncio.wait_for(self.conn.read_message(), max(0.01, deadline - loop.time())) is not None:
            pass
        return self.conn.close_code, self.conn.close_reason

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
async def ws_connect(server: Server) -> AsyncIterator[Callable[..., Any]]:
    clients: list[Client] = []

    async def connect(url: str | None = None, headers: dict[str, str] | None = None) -> Client:
        request = tornado.httpclient.HTTPRequest(url or server.ws_url, headers=headers or {})
        client = Client(await tornado.websocket.websocket_connect(request, max_message_size=64 << 20))
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def frame_message(stream_id: str, jpeg: bytes = JPEG, timestamp: int = 1, **extra: Any) -> dict[str, Any]:
    return {"type": "video-frame", "streamId": stream_id, "data": base64.b64encode(jpeg).decode(),
            "timestamp": timestamp, **extra}


def alert_message(stream_id: str, **extra: Any) -> dict[str, Any]:
    message = {"type": "alert", "streamId": stream_id, "severity": "high", "message": "Suspicious person",
               "metadata": {"confidence": 0.95, "objectType": "person", "location": {"x": 120, "y": 350}},
               "timestamp": 1764150000000}
    message.update(extra)
    return message


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)


async def producer(ws_connect: Callable[..., Any], token: Callable[..., str], stream_id: str,
                   sub: str = "alice", **extra: Any) -> Client:
    """A phone that has registered `stream_id` (and received `registered`)."""
    client: Client = await ws_connect()
    await client.send({"type": "register", "clientType": "mobile", "streamId": stream_id, "token": token(sub),
                       **extra})
    await client.recv_type("registered")
    return client


async def watcher(ws_connect: Callable[..., Any], token: Callable[..., str], stream_id: str,
                  client_type: str = "dashboard", sub: str = "alice", role: str = "user",
                  streams: list[str] | str | None = None, **extra: Any) -> Client:
    """A consumer subscribed to `stream_id` (and past its `subscribed`), with a token for sub/role/streams."""
    client: Client = await ws_connect()
    message = {"type": "subscribe", "clientType": client_type, "streamId": stream_id,
               "token": token(sub, role=role, streams=streams), **extra}
    await client.send(message)
    await client.recv_type("subscribed")
    return client


@dataclass
class Response:
    status: int
    body: bytes
    headers: Any

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@pytest.fixture
def api(server: Server) -> Callable[..., Any]:
    """Call the REST API: `await api("GET", "/api/streams", token=...)` -> Response (never raises on status)."""
    client = tornado.httpclient.AsyncHTTPClient()

    async def call(method: str, path: str, token: str | None = None, body: Any = None,
                   content_type: str = "application/json", headers: dict[str, str] | None = None) -> Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else
                                                         json.dumps(body).encode())
            all_headers.setdefault("Content-Type", content_type)
        request = tornado.httpclient.HTTPRequest(server.url(path), method=method, headers=all_headers, body=data,
                                                 allow_nonstandard_methods=True)
        response = await client.fetch(request, raise_error=False)
        return Response(response.code, response.body or b"", response.headers)

    return call


class OwnService:
    """A server program of a test's own (a Redis, a Mosquitto) on a free loopback port, to stop and start again
    on the same port without disturbing anyone else. Subclasses give `command()` and `answers()`."""

    def __init__(self) -> None:
        sock, self.port = tornado.testing.bind_unused_port()
        sock.close()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def answers(self) -> bool:
        raise NotImplementedError

    async def start(self, timeout: float = 5.0) -> None:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.answers():
            assert asyncio.get_running_loop().time() < deadline, f"{self.command()[0]} did not answer"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(5)
            self.process = None
