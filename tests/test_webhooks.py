"""The webhook channel against real loopback receivers: signatures a receiver verifies, failures as attempts
(status, timeout, refused, redirect), the response-body cap, slow receivers, the private-address guard, URLs."""
from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from watchout.errors import InvalidMessage
from watchout.webhooks import MAX_URL_CHARS, Attempt, check_url, new_secret, post

BODY = b'{"type":"alert","streamId":"cam-1","seq":7,"message":"caf\xc3\xa9"}'
SECRET = new_secret()
OLD_SECRET = new_secret()
FIFTY_MB = 50 * 1024 * 1024


class Receiver:
    """A Tornado webhook receiver on 127.0.0.1: records each request, answers `status` (and `headers`)."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers or {}
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        receiver = self

        class Handler(tornado.web.RequestHandler):
            def post(self) -> None:
                receiver.requests.append((self.request.body, dict(self.request.headers)))
                self.set_status(receiver.status)
                for name, value in receiver.headers.items():
                    self.set_header(name, value)

        sock, self.port = tornado.testing.bind_unused_port()
        self.http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/.*", Handler)]))
        self.http.add_sockets([sock])

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def close(self) -> None:
        self.http.stop()
        await self.http.close_all_connections()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    yield rec
    await rec.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio server on 127.0.0.1 running `handler` for each connection, counting connections."""

    def __init__(self, server: asyncio.Server, connections: list[int]) -> None:
        self.port = server.sockets[0].getsockname()[1]
        self._connections = connections

    @property
    def connections(self) -> int:
        return self._connections[0]

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/hook"


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    connections = [0]
    tasks: set[asyncio.Task[Any]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield RawServer(server, connections)
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> None:
    """Read one request (the webhook's POST, which has a Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    [length] = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    await reader.readexactly(length)


async def send(url: str, *, secrets: list[str] | None = None, allow_private: bool = True, timeout_s: float = 5.0,
               now: datetime | None = None) -> Attempt:
    return await post(url, BODY, msg_id="msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", secrets=secrets or [SECRET],
                      allow_private=allow_private, timeout_s=timeout_s, now=now)


# ----------------------------------------------------------------------------- signatures

async def test_receiver_verifies_the_signature_and_gets_the_exact_body(receiver: Receiver) -> None:
    attempt = await send(receiver.url())

    assert attempt == Attempt(ok=True, status=200, error=None, duration_s=attempt.duration_s)
    assert 0 < attempt.duration_s < 5
    [(body, headers)] = receiver.requests
    assert body == BODY
    payload = Webhook(SECRET).verify(body, headers)
    assert payload == {"type": "alert", "streamId": "cam-1", "seq": 7, "message": "café"}
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Watchout-Webhooks/1"
    assert headers["Webhook-Id"] == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    assert abs(int(headers["Webhook-Timestamp"]) - time.time()) < 5
    assert headers["Webhook-Signature"].startswith("v1,") and " " not in headers["Webhook-Signature"]


async def test_now_is_the_signed_timestamp(receiver: Receiver) -> None:
    signed_at = datetime.now(timezone.utc).replace(microsecond=900_000) - timedelta(seconds=90)

    assert (await send(receiver.url(), now=signed_at)).ok

    [(body, headers)] = receiver.requests
    assert headers["Webhook-Timestamp"] == str(int(signed_at.timestamp()))
    Webhook(SECRET).verify(body, headers)


async def test_during_rotation_a_receiver_knowing_either_secret_verifies(receiver: Receiver) -> None:
    assert (await send(receiver.url(), secrets=[SECRET, OLD_SECRET])).ok

    [(body, headers)] = receiver.requests
    assert len(headers["Webhook-Signature"].split(" ")) == 2
    Webhook(SECRET).verify(body, headers)
    Webhook(OLD_SECRET).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


async def test_a_tampered_body_fails_verification(receiver: Receiver) -> None:
    assert (await send(receiver.url())).ok

    [(body, headers)] = receiver.requests
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b'"seq":7', b'"seq":8'), headers)


def test_new_secret_round_trips_through_standardwebhooks() -> None:
    secret = new_secret()

    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 24
    assert secret != new_secret()
    signed_at = datetime.now(timezone.utc)
    signature = Webhook(secret).sign("msg_1", signed_at, BODY)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(signed_at.timestamp())),
               "webhook-signature": signature}
    assert Webhook(secret).verify(BODY, headers, json_parse=False) is None
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


# ----------------------------------------------------------------------------- statuses and failures

@pytest.mark.parametrize("status", [200, 202, 204])
async def test_a_2xx_status_delivers(receiver: Receiver, status: int) -> None:
    receiver.status = status

    attempt = await send(receiver.url())

    assert (attempt.ok, attempt.status, attempt.error) == (True, status, None)


@pytest.mark.parametrize("status", [400, 404, 410, 500, 503])
async def test_an_error_status_fails_with_its_code(receiver: Receiver, status: int) -> None:
    receiver.status = status

    attempt = await send(receiver.url())

    assert (attempt.ok, attempt.status, attempt.error) == (False, status, f"HTTP {status}")
    assert len(receiver.requests) == 1


async def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    target = Receiver()
    try:
        receiver.status, receiver.headers = 302, {"Location": target.url()}

        attempt = await send(receiver.url())

        assert (attempt.ok, attempt.status, attempt.error) == (False, 302, "redirect (HTTP 302) not followed")
        assert len(receiver.requests) == 1
        await asyncio.sleep(0.1)
        assert target.requests == []
    finally:
        await target.close()


async def test_a_receiver_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with raw_server(silent) as server:
        started = time.monotonic()
        attempt = await send(server.url(), timeout_s=0.5)

        assert time.monotonic() - started < 1.5
        assert (attempt.ok, attempt.status, attempt.error) == (False, None, "timeout after 0.5 s")
        assert server.connections == 1


async def test_a_closed_port_is_connection_refused() -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()

    attempt = await send(f"http://127.0.0.1:{port}/hook")

    assert (attempt.ok, attempt.status, attempt.error) == (False, None, "connection refused")


async def test_a_connection_closed_before_an_answer_fails() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with raw_server(hang_up) as server:
        attempt = await send(server.url())

    assert (attempt.ok, attempt.status) == (False, None)
    assert attempt.error == "connection closed without a complete HTTP response"


async def test_https_to_a_plain_http_receiver_fails_in_tls() -> None:
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the TLS client hello
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with raw_server(plain_http) as server:
        attempt = await send(server.url().replace("http://", "https://"))

    assert (attempt.ok, attempt.status) == (False, None)
    assert attempt.error is not None and attempt.error.startswith("TLS failed")


def streamed(status_line: bytes, framing: str, counter: list[int]) -> Handler:
    """A receiver answering `status_line` with a 50 MB body, counting the bytes it manages to write."""
    chunk = b"x" * 65536

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        header = {"length": f"Content-Length: {FIFTY_MB}\r\n", "chunked": "Transfer-Encoding: chunked\r\n",
                  "close": ""}[framing]
        writer.write(status_line + b"\r\n" + header.encode() + b"\r\n")
        while counter[0] < FIFTY_MB:
            writer.write(b"10000\r\n" + chunk + b"\r\n" if framing == "chunked" else chunk)
            await writer.drain()
            counter[0] += len(chunk)
    return handler


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_a_2xx_with_a_50_mb_body_delivers_without_reading_it(framing: str) -> None:
    written = [0]
    async with raw_server(streamed(b"HTTP/1.1 200 OK", framing, written)) as server:
        started = time.monotonic()
        attempt = await send(server.url())
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # the receiver's writes fail once the client has closed

    assert (attempt.ok, attempt.status, attempt.error) == (True, 200, None)
    assert elapsed < 2
    # what the receiver wrote is what the loopback socket buffers took (a few MB), not the 50 MB
    assert written[0] < 16 * 1024 * 1024


@pytest.mark.parametrize("max_response_bytes", [1024, 64 * 1024, 512 * 1024])
async def test_the_body_is_read_no_further_than_max_response_bytes(max_response_bytes: int) -> None:
    # paced writes do not pile up in socket buffers: what the receiver wrote is about what the client read
    written = [0]

    async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        while True:
            writer.write(b"x" * 16384)
            await writer.drain()
            written[0] += 16384
            await asyncio.sleep(0.005)

    async with raw_server(paced) as server:
        attempt = await post(server.url(), BODY, msg_id="msg_1", secrets=[SECRET], allow_private=True,
                             max_response_bytes=max_response_bytes)
        await asyncio.sleep(0.1)

    assert (attempt.ok, attempt.status, attempt.error) == (True, 200, None)
    assert max_response_bytes <= written[0] < max_response_bytes + 64 * 1024


async def test_an_error_status_with_a_50_mb_body_fails_with_its_code() -> None:
    async with raw_server(streamed(b"HTTP/1.1 503 Service Unavailable", "length", [0])) as server:
        attempt = await send(server.url())

    assert (attempt.ok, attempt.status, attempt.error) == (False, 503, "HTTP 503")


async def test_a_slow_loris_dribbling_its_headers_ends_within_the_timeout() -> None:
    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    async with raw_server(dribble) as server:
        started = time.monotonic()
        attempt = await send(server.url(), timeout_s=0.5)

        assert time.monotonic() - started < 0.5 + 1
        assert (attempt.ok, attempt.status, attempt.error) == (False, None, "timeout after 0.5 s")


async def test_a_2xx_whose_body_dribbles_delivers_within_the_timeout() -> None:
    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.2)

    async with raw_server(dribble) as server:
        started = time.monotonic()
        attempt = await send(server.url(), timeout_s=0.5)

        assert time.monotonic() - started < 0.5 + 1
        assert (attempt.ok, attempt.status, attempt.error) == (True, 200, None)


# ----------------------------------------------------------------------------- the private-address guard

async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize("host, address", [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
    ("[::1]", "::1"),
])
async def test_a_private_address_is_refused_without_connecting(host: str, address: str) -> None:
    async with raw_server(answer_ok) as server:
        attempt = await send(server.url(host), allow_private=False)

        assert (attempt.ok, attempt.status) == (False, None)
        assert attempt.error == f"refused: private address {address}"
        assert attempt.duration_s < 1
        await asyncio.sleep(0.1)
        assert server.connections == 0


async def test_a_host_name_resolving_to_loopback_is_refused_without_connecting() -> None:
    async with raw_server(answer_ok) as server:
        attempt = await send(server.url("localhost"), allow_private=False)

        assert (attempt.ok, attempt.status) == (False, None)
        assert attempt.error in {"refused: private address 127.0.0.1", "refused: private address ::1"}
        await asyncio.sleep(0.1)
        assert server.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_allow_private_reaches_a_loopback_receiver(host: str) -> None:
    async with raw_server(answer_ok) as server:
        attempt = await send(server.url(host), allow_private=True)

        assert (attempt.ok, attempt.status, attempt.error) == (True, 200, None)
        assert server.connections == 1


async def test_an_invalid_url_is_a_failed_attempt_not_an_exception() -> None:
    attempt = await send("ftp://example.com/hook")

    assert (attempt.ok, attempt.status) == (False, None)
    assert attempt.error == "invalid URL: a webhook URL must start with http:// or https://"


# ----------------------------------------------------------------------------- check_url

@pytest.mark.parametrize("url, normalised", [
    ("https://example.com/hook", "https://example.com/hook"),
    ("HTTPS://Example.COM:443/hook?a=1&b=2", "https://example.com/hook?a=1&b=2"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com:8080/x", "http://example.com:8080/x"),
    ("https://bücher.example/hook", "https://xn--bcher-kva.example/hook"),
    ("https://8.8.8.8/hook", "https://8.8.8.8/hook"),
    ("https://[2001:4860:4860::8888]:8443/hook", "https://[2001:4860:4860::8888]:8443/hook"),
    ("http://hooks.localhost.example.com/", "http://hooks.localhost.example.com/"),
])
def test_check_url_accepts_and_normalises_public_urls(url: str, normalised: str) -> None:
    assert check_url(url, allow_private=False) == normalised


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook",
    "example.com/hook",
    "javascript:alert(1)",
    "http:///hook",
    "https://:443/hook",
    "https://user:pass@example.com/hook",
    "https://user@example.com/hook",
    "https://example.com/" + "a" * MAX_URL_CHARS,
    "https://example.com/hook#frag",
    "https://example.com/hook#",
    "https://example.com:0/hook",
    "https://example.com:65536/hook",
    "https://example.com:http/hook",
    "https://example.com:-1/hook",
    "https://[::1/hook",
    "https://[example.com]/hook",
    "https://exa mple.com/hook",
    "https://example.com/ho\nok",
    "https://exa_mple..com/hook",
    "https://-example.com/hook",
    "https://example.com/hööк",
])
def test_check_url_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        check_url(url, allow_private=True)
    assert caught.value.code == "invalid-url"
    assert caught.value.http_status == 400


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/hook",
    "http://192.168.1.1/hook",
    "http://172.16.0.1/hook",
    "http://100.64.0.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://127.0.0.1:8080/hook",
    "http://127.1/hook",
    "http://2130706433/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fe80::1]/hook",
    "http://[fc00::1]/hook",
    "http://[64:ff9b::a00:1]/hook",
    "http://[2002:a00:1::1]/hook",
    "http://0.0.0.0/hook",
    "http://[::]/hook",
    "http://224.0.0.1/hook",
    "http://255.255.255.255/hook",
    "http://localhost/hook",
    "http://LOCALHOST./hook",
    "http://a.localhost/hook",
])
def test_check_url_refuses_private_addresses_unless_allowed(url: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        check_url(url, allow_private=False)
    assert caught.value.code == "private-address"
    assert check_url(url, allow_private=True).startswith("http://")


def test_check_url_does_no_dns_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("check_url looked a name up")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)

    assert check_url("https://hooks.example.org/in", allow_private=False) == "https://hooks.example.org/in"
