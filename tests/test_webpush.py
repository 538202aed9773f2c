"""Web Push (watchout/webpush.py) end to end: a push service of the test's own on loopback checks the VAPID JWT
and decrypts the body with the subscription's private key, as a browser would; its answers map to PushAttempt.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import http_ece  # type: ignore[import-untyped]
import jwt
import pytest
import pytest_asyncio
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from watchout.errors import InvalidMessage
from watchout.webpush import (MAX_PAYLOAD_BYTES, NOTIFICATION_MAX_BYTES, PushAttempt, VapidKeys, check_subscription,
                              notification, send)

SUBJECT = "mailto:admin@example.com"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Browser:
    """A browser's side of a subscription: its P-256 key pair and auth secret."""

    private_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: os.urandom(16))

    def subscription(self, endpoint: str) -> dict[str, Any]:
        point = self.private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                           serialization.PublicFormat.UncompressedPoint)
        keys = {"p256dh": b64url(point), "auth": b64url(self.auth)}
        return {"endpoint": endpoint, "expirationTime": None, "keys": keys}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class PushService:
    """A push service on 127.0.0.1: /push/<status> answers that status (`silent`: never answers)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.release = asyncio.Event()
        service = self

        class Endpoint(tornado.web.RequestHandler):
            async def post(self, answer: str) -> None:
                service.received.append(Received(self.request.path, dict(self.request.headers), self.request.body))
                if answer == "silent":
                    await service.release.wait()
                    return
                self.set_status(int(answer))
                if answer == "429":
                    self.set_header("Retry-After", "30")
                if int(answer) >= 400:
                    self.write("push service says no")

        sock, self.port = tornado.testing.bind_unused_port()
        self.http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/push/(\w+)", Endpoint)]))
        self.http.add_sockets([sock])

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, answer: str | int) -> str:
        return f"{self.origin}/push/{answer}"

    async def close(self) -> None:
        self.release.set()
        self.http.stop()
        await self.http.close_all_connections()


@pytest_asyncio.fixture
async def push_service() -> AsyncIterator[PushService]:
    service = PushService()
    yield service
    await service.close()


@pytest.fixture(scope="module")
def vapid() -> VapidKeys:
    return VapidKeys.generate()


def vapid_claims(authorization: str, keys: VapidKeys, audience: str) -> dict[str, Any]:
    """The claims of an `Authorization: vapid t=<JWT>, k=<key>` header, its ES256 signature checked with k."""
    match = re.fullmatch(r"vapid t=([\w.-]+),\s*k=([\w-]+)", authorization)
    assert match, authorization
    token, k = match.groups()
    assert k == keys.public_key_b64
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(k))
    claims: dict[str, Any] = jwt.decode(token, public_key, algorithms=["ES256"], audience=audience,
                                        options={"require": ["aud", "exp", "sub"]})
    return claims


# ----------------------------------------------------------------------------- sending

async def test_a_push_arrives_encrypted_for_the_browser_and_signed_with_vapid(
        push_service: PushService, vapid: VapidKeys) -> None:
    browser = Browser()
    payload = notification({"streamId": "cam-1", "alertId": "a-1", "severity": "high", "message": "person at the door",
                            "timestamp": 1_764_150_000_000}, "https://watch.example.com/dashboard/")
    attempt = await send(browser.subscription(push_service.url(201)), payload, vapid, subject=SUBJECT, ttl_s=600,
                         urgency="high")
    assert attempt == PushAttempt(ok=True, status=201, gone=False, error=None)
    [received] = push_service.received
    headers = received.headers
    assert headers["Ttl"] == "600" and headers["Urgency"] == "high"
    assert headers["Content-Encoding"] == "aes128gcm" and headers["Content-Type"] == "application/octet-stream"
    claims = vapid_claims(headers["Authorization"], vapid, push_service.origin)
    assert claims["sub"] == SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    assert payload not in received.body and len(received.body) > len(payload)
    plain = http_ece.decrypt(received.body, private_key=browser.private_key, auth_secret=browser.auth,
                             version="aes128gcm")
    assert plain == payload
    assert json.loads(plain)["title"] == "high alert on cam-1"


async def test_each_push_is_encrypted_afresh_and_ttl_and_urgency_are_sent_as_given(
        push_service: PushService, vapid: VapidKeys) -> None:
    browser = Browser()
    subscription = browser.subscription(push_service.url(202))
    for _ in range(2):
        attempt = await send(subscription, b"same words", vapid, subject="https://watch.example.com/contact", ttl_s=0,
                             urgency="low")
        assert attempt.ok and attempt.status == 202
    first, second = push_service.received
    assert first.body != second.body, "a new salt and ephemeral key each time"
    assert first.headers["Ttl"] == "0" and first.headers["Urgency"] == "low"
    assert vapid_claims(first.headers["Authorization"], vapid, push_service.origin)["sub"] == \
        "https://watch.example.com/contact"
    for received in (first, second):
        assert http_ece.decrypt(received.body, private_key=browser.private_key, auth_secret=browser.auth,
                                version="aes128gcm") == b"same words"


@pytest.mark.parametrize("answer, gone", [(410, True), (404, True), (500, False), (400, False), (403, False),
                                          (413, False)])
async def test_a_refusal_is_an_attempt_not_an_exception(push_service: PushService, vapid: VapidKeys, answer: int,
                                                        gone: bool) -> None:
    attempt = await send(Browser().subscription(push_service.url(answer)), b"x", vapid, subject=SUBJECT)
    assert (attempt.ok, attempt.status, attempt.gone) == (False, answer, gone)
    assert attempt.error is not None and str(answer) in attempt.error and "push service says no" in attempt.error


async def test_rate_limited_gives_retry_after(push_service: PushService, vapid: VapidKeys) -> None:
    attempt = await send(Browser().subscription(push_service.url(429)), b"x", vapid, subject=SUBJECT)
    assert (attempt.ok, attempt.status, attempt.gone, attempt.retry_after_s) == (False, 429, False, 30.0)


async def test_a_silent_push_service_times_out(push_service: PushService, vapid: VapidKeys) -> None:
    started = time.monotonic()
    attempt = await send(Browser().subscription(push_service.url("silent")), b"x", vapid, subject=SUBJECT,
                         timeout_s=0.3)
    assert time.monotonic() - started < 3
    assert (attempt.ok, attempt.status, attempt.gone) == (False, None, False)
    assert attempt.error is not None and "timeout" in attempt.error.lower()
    assert len(push_service.received) == 1


async def test_an_unreachable_push_service_is_an_attempt_not_an_exception(vapid: VapidKeys) -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()  # nothing listens there now
    attempt = await send(Browser().subscription(f"http://127.0.0.1:{port}/push"), b"x", vapid, subject=SUBJECT)
    assert (attempt.ok, attempt.status, attempt.gone) == (False, None, False) and attempt.error


async def test_a_redirect_is_not_followed(push_service: PushService, vapid: VapidKeys) -> None:
    attempt = await send(Browser().subscription(push_service.url(307)), b"x", vapid, subject=SUBJECT)
    assert (attempt.ok, attempt.status, attempt.gone) == (False, 307, False)
    assert len(push_service.received) == 1


async def test_an_unusable_stored_subscription_is_gone_without_a_request(
        push_service: PushService, vapid: VapidKeys) -> None:
    good = Browser().subscription(push_service.url(201))
    for broken in ({**good, "keys": {}}, {**good, "keys": {**good["keys"], "p256dh": "AAAA"}},
                   {**good, "endpoint": "ftp://push.example.com/x"}, {"keys": good["keys"]}):
        attempt = await send(broken, b"x", vapid, subject=SUBJECT)
        assert (attempt.ok, attempt.status, attempt.gone) == (False, None, True), broken
        assert attempt.error is not None and attempt.error.startswith("invalid subscription")
    assert push_service.received == []


@pytest.mark.parametrize("kwargs", [{"payload": b""}, {"payload": b"x" * (MAX_PAYLOAD_BYTES + 1)},
                                    {"subject": "admin@example.com"}, {"subject": "mailto:nobody"},
                                    {"subject": "http://example.com"}, {"urgency": "urgent"}, {"ttl_s": -1},
                                    {"timeout_s": 0}])
async def test_the_callers_mistakes_raise_value_error(push_service: PushService, vapid: VapidKeys,
                                                      kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"payload": b"x", "subject": SUBJECT, **kwargs}
    with pytest.raises(ValueError):
        await send(Browser().subscription(push_service.url(201)), arguments.pop("payload"), vapid, **arguments)
    assert push_service.received == []


async def test_the_largest_payload_fits_a_push_services_4096_bytes(push_service: PushService, vapid: VapidKeys) -> None:
    browser = Browser()
    payload = os.urandom(MAX_PAYLOAD_BYTES)
    assert (await send(browser.subscription(push_service.url(201)), payload, vapid, subject=SUBJECT)).ok
    [received] = push_service.received
    assert len(received.body) == 4096
    assert http_ece.decrypt(received.body, private_key=browser.private_key, auth_secret=browser.auth,
                            version="aes128gcm") == payload


# ----------------------------------------------------------------------------- keys

def test_vapid_keys_round_trip_through_json() -> None:
    keys = VapidKeys.generate()
    again = VapidKeys.from_json(keys.to_json())
    assert again == keys and again.public_key_b64 == keys.public_key_b64
    point = unb64url(keys.public_key_b64)
    assert len(point) == 65 and point[0] == 0x04 and keys.public_key == point
    assert "=" not in keys.public_key_b64
    assert "PRIVATE" not in repr(keys) and keys.private_pem not in repr(keys)
    assert VapidKeys.generate() != keys


def test_vapid_keys_take_a_raw_private_key_and_refuse_a_mismatched_pair() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    raw = b64url(key.private_numbers().private_value.to_bytes(32, "big"))
    keys = VapidKeys.from_json(json.dumps({"privateKey": raw}))
    assert keys == VapidKeys.from_private_key(key)
    other = VapidKeys.generate()
    with pytest.raises(ValueError, match="does not belong"):
        VapidKeys.from_json(json.dumps({"privateKey": keys.private_pem, "publicKey": other.public_key_b64}))
    with pytest.raises(ValueError, match="does not belong"):
        VapidKeys(keys.private_pem, other.public_key_b64)
    for bad in ("not json", "[]", '{"privateKey": "AAAA"}', '{"privateKey": 5}'):
        with pytest.raises(ValueError):
            VapidKeys.from_json(bad)
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(ValueError, match="P-256"):
        VapidKeys.from_private_key(p384)


# ----------------------------------------------------------------------------- subscriptions

def browser_json() -> dict[str, Any]:
    return Browser().subscription("https://fcm.googleapis.com/fcm/send/dG9rZW4:APA91b-example")


def test_a_browsers_subscription_is_accepted_and_copied_with_its_known_fields() -> None:
    raw = {**browser_json(), "expirationTime": 1_800_000_000_000, "extra": {"x": 1}}
    checked = check_subscription(raw)
    assert checked == {"endpoint": raw["endpoint"], "expirationTime": 1_800_000_000_000, "keys": raw["keys"]}
    padded = {**raw, "keys": {"p256dh": raw["keys"]["p256dh"] + "=", "auth": raw["keys"]["auth"] + "=="}}
    assert check_subscription(padded)["keys"] == padded["keys"]
    without_expiry = {"endpoint": raw["endpoint"], "keys": raw["keys"]}
    assert check_subscription(without_expiry)["expirationTime"] is None


def _with(path: str, value: Any) -> dict[str, Any]:
    obj = browser_json()
    if path.startswith("keys."):
        obj["keys"][path[5:]] = value
    else:
        obj[path] = value
    return obj


def _without(path: str) -> dict[str, Any]:
    obj = browser_json()
    if path.startswith("keys."):
        del obj["keys"][path[5:]]
    else:
        del obj[path]
    return obj


_OFF_CURVE = b64url(b"\x04" + b"\x00" * 64)
_COMPRESSED = b64url(b"\x02" + b"\x11" * 32)
BAD_SUBSCRIPTIONS: dict[str, tuple[Any, str]] = {
    "not-an-object": ([], "JSON object"),
    "no-endpoint": (_without("endpoint"), "endpoint"),
    "endpoint-not-a-string": (_with("endpoint", 5), "endpoint"),
    "endpoint-http": (_with("endpoint", "http://push.example.com/x"), "https"),
    "endpoint-not-a-url": (_with("endpoint", "fcm.googleapis.com/fcm/send/x"), "https"),
    "endpoint-too-long": (_with("endpoint", "https://push.example.com/" + "a" * 2030), "2048"),
    "endpoint-with-space": (_with("endpoint", "https://push.example.com/a b"), "ASCII"),
    "endpoint-with-password": (_with("endpoint", "https://u:p@push.example.com/x"), "password"),
    "endpoint-bad-port": (_with("endpoint", "https://push.example.com:99999/x"), "valid URL"),
    "endpoint-localhost": (_with("endpoint", "https://localhost/x"), "private"),
    "endpoint-loopback": (_with("endpoint", "https://127.0.0.1:8443/x"), "private"),
    "endpoint-private": (_with("endpoint", "https://10.1.2.3/x"), "private"),
    "endpoint-link-local": (_with("endpoint", "https://169.254.169.254/latest"), "private"),
    "endpoint-ipv6-loopback": (_with("endpoint", "https://[::1]/x"), "private"),
    "endpoint-mapped-loopback": (_with("endpoint", "https://[::ffff:127.0.0.1]/x"), "private"),
    "endpoint-decimal-loopback": (_with("endpoint", "https://2130706433/x"), "private"),
    "endpoint-short-loopback": (_with("endpoint", "https://127.1/x"), "private"),
    "endpoint-localhost-dot": (_with("endpoint", "https://LocalHost./x"), "private"),
    "no-keys": (_without("keys"), "keys"),
    "keys-not-an-object": (_with("keys", "abc"), "keys"),
    "no-p256dh": (_without("keys.p256dh"), "p256dh"),
    "p256dh-not-base64": (_with("keys.p256dh", "not base64!"), "p256dh"),
    "p256dh-standard-base64": (_with("keys.p256dh", "ab+/" * 22), "p256dh"),
    "p256dh-short": (_with("keys.p256dh", b64url(b"\x04" + b"\x01" * 63)), "65 bytes"),
    "p256dh-compressed": (_with("keys.p256dh", _COMPRESSED), "65 bytes"),
    "p256dh-off-the-curve": (_with("keys.p256dh", _OFF_CURVE), "curve"),
    "p256dh-a-number": (_with("keys.p256dh", 4), "p256dh"),
    "no-auth": (_without("keys.auth"), "auth"),
    "auth-15-bytes": (_with("keys.auth", b64url(b"\x01" * 15)), "16 bytes"),
    "auth-not-base64": (_with("keys.auth", "%%%%"), "auth"),
    "expiration-a-string": (_with("expirationTime", "tomorrow"), "expirationTime"),
    "expiration-a-boolean": (_with("expirationTime", True), "expirationTime"),
    "expiration-negative": (_with("expirationTime", -1), "expirationTime"),
    "expiration-infinite": (_with("expirationTime", float("inf")), "expirationTime"),
}


@pytest.mark.parametrize("obj, names", BAD_SUBSCRIPTIONS.values(), ids=BAD_SUBSCRIPTIONS.keys())
def test_a_bad_subscription_is_refused_naming_the_fault(obj: Any, names: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        check_subscription(obj)
    assert caught.value.code == "invalid-subscription" and caught.value.http_status == 400
    assert names in caught.value.message


# ----------------------------------------------------------------------------- the notification

def test_the_notification_names_the_alert_and_links_to_it_on_the_dashboard() -> None:
    alert = {"type": "alert", "streamId": "porch:cam-1", "alertId": "a/1", "seq": 7, "severity": "critical",
             "message": "person at the door", "metadata": {}, "timestamp": 1_764_150_000_123,
             "snapshotUrl": "https://watch.example.com/api/alerts/a1/snapshot.jpg"}
    content = json.loads(notification(alert, "https://watch.example.com/dashboard/"))
    assert content["title"] == "critical alert on porch:cam-1" and content["body"] == "person at the door"
    assert content["tag"] == "porch:cam-1" and content["timestamp"] == 1_764_150_000_123
    assert content["image"] == alert["snapshotUrl"]
    url = urllib.parse.urlsplit(content["url"])
    assert url._replace(fragment="").geturl() == "https://watch.example.com/dashboard/"
    assert urllib.parse.parse_qs(url.fragment) == {"stream": ["porch:cam-1"], "alert": ["a/1"]}
    assert (content["streamId"], content["alertId"], content["severity"]) == ("porch:cam-1", "a/1", "critical")
    without = json.loads(notification({**alert, "snapshotUrl": None}, "https://watch.example.com/dashboard/#old"))
    assert "image" not in without and without["url"].count("#") == 1


@pytest.mark.parametrize("message", ["x" * 5000, "é\"" * 2000, "\U0001F600" * 2000, "\n" * 2000])
def test_a_long_message_is_cut_to_fit_a_push(message: str) -> None:
    alert = {"streamId": "cam-1", "alertId": "a1", "severity": "high", "message": message, "timestamp": 1}
    payload = notification(alert, "https://watch.example.com/dashboard/")
    assert NOTIFICATION_MAX_BYTES - 16 <= len(payload) <= NOTIFICATION_MAX_BYTES
    body = json.loads(payload)["body"]
    assert body.endswith("…") and message.startswith(body[:-1]) and len(body) > 100


# ----------------------------------------------------------------------------- through the service

async def _rest(server: Any, method: str, path: str, token: str, body: Any = None) -> Any:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        server.url(path), method=method, raise_error=False, allow_nonstandard_methods=True,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=None if body is None else json.dumps(body))
    return response.code, json.loads(response.body) if response.body else None


async def test_the_service_pushes_each_alert_to_a_subscribed_browser_and_drops_it_when_gone(
        settings: Any, token: Any, push_service: PushService) -> None:
    """Subscribe over REST with the service's public key; an alert arrives encrypted for the browser, signed
    with the key the service handed out; once the push service answers 410 the subscription is removed."""
    import tornado.websocket

    from conftest import Client, alert_message, replace_settings, start_server
    server, close = await start_server(replace_settings(settings, webhook_allow_private=True,
                                                        public_url="https://watch.example.com"))
    try:
        alice = token("alice")
        code, key = await _rest(server, "GET", "/api/push/public-key", alice)
        assert code == 200
        browser = Browser()
        code, made = await _rest(server, "POST", "/api/push/subscriptions", alice,
                                 browser.subscription(push_service.url(201)))
        assert code == 201 and made["channel"] == "webpush"
        phone = Client(await tornado.websocket.websocket_connect(server.ws_url))
        await phone.send({"type": "register", "clientType": "mobile", "streamId": "porch", "token": alice})
        await phone.recv_type("registered")
        ml = Client(await tornado.websocket.websocket_connect(server.ws_url))
        await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": "porch",
                       "token": token("detector", role="service", streams=["porch"])})
        await ml.recv_type("subscribed")
        await ml.send(alert_message("porch", message="person at the door", severity="critical"))
        ack = await ml.recv_type("ack")
        for _ in range(100):
            if push_service.received:
                break
            await asyncio.sleep(0.05)
        [received] = push_service.received
        from types import SimpleNamespace
        public: Any = SimpleNamespace(public_key_b64=key["publicKey"])  # the key the service handed out
        claims = vapid_claims(received.headers["Authorization"], public, push_service.origin)
        assert claims["sub"] == "https://watch.example.com"
        shown = json.loads(http_ece.decrypt(received.body, private_key=browser.private_key, auth_secret=browser.auth,
                                            version="aes128gcm"))
        assert shown["title"] == "critical alert on porch" and shown["body"] == "person at the door"
        assert shown["url"].startswith("https://watch.example.com/dashboard/#") and ack["alertId"] in shown["url"]

        gone = Browser()  # the push service says this browser's subscription is no more
        code, _ = await _rest(server, "POST", "/api/push/subscriptions", alice,
                              gone.subscription(push_service.url(410)))
        assert code == 201
        await ml.send(alert_message("porch", message="again"))
        second = await ml.recv_type("ack")
        for _ in range(100):
            code, receipts = await _rest(server, "GET", f"/api/alerts/{second['alertId']}/deliveries", alice)
            if {r["state"] for r in receipts["items"]} == {"delivered", "cancelled"}:
                break
            await asyncio.sleep(0.05)
        states = sorted((r["state"], r["lastError"] or "") for r in receipts["items"])
        assert states[0][0] == "cancelled" and "410" in states[0][1] and states[1][0] == "delivered"
        remaining = await server.services.store.list_destinations("alice", "webpush")
        assert [d["config"]["endpoint"] for d in remaining] == [push_service.url(201)]
        phone.close()
        ml.close()
    finally:
        await close()
