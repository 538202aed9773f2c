"""Auth on /ws: every JWT failure closes 4401, scopes hide streams, refresh, expiry, no token in logs."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import TEST_SECRET, Client, Server, alert_message, frame_message, replace_settings, start_server
from watchout.auth import MAX_NUMERIC_DATE
from watchout.logs import JsonFormatter, RedactingFilter, TextFormatter, redact, setup_logging
from watchout.settings import Settings

Connect = Callable[..., Awaitable[Client]]
Token = Callable[..., str]
OTHER_SECRET = "another-secret-that-is-long-enough-0123456789"
ISSUER, AUDIENCE = "https://issuer.example", "watchout-tests"


def new_stream_id() -> str:
    """Unique per test, so tests can share one real MongoDB database."""
    return f"cam-{uuid.uuid4().hex[:12]}"


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims for alice; a change to None removes that claim."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": "alice", "role": "user", "iat": now, "exp": now + 3600}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def signed(key: str | bytes = TEST_SECRET, algorithm: str = "HS256", **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token() -> str:
    """`alg: none`, crafted by hand: header.payload. with an empty signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims()).encode())}."


def hmac_token(secret: bytes) -> str:
    """HS256 by hand (PyJWT refuses a PEM key as an HMAC secret, an attacker's script does not)."""
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}." \
                    f"{b64url(json.dumps(claims()).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def register(stream_id: str, token: str | None = None, **extra: Any) -> dict[str, Any]:
    message = {"type": "register", "clientType": "mobile", "streamId": stream_id, "produces": ["video-frame"],
               "consumes": ["alert"], **extra}
    if token is not None:
        message["token"] = token
    return message


def subscribe(stream_id: str, token: str | None = None, client_type: str = "dashboard",
              **extra: Any) -> dict[str, Any]:
    message = {"type": "subscribe", "clientType": client_type, "streamId": stream_id,
               "consumes": ["video-frame", "alert"], **extra}
    if token is not None:
        message["token"] = token
    return message


async def assert_closed_with(client: Client, close_code: int, error_code: str) -> dict[str, Any]:
    """The server first explains (an `error` with the code), then closes with close_code."""
    error = await client.recv_type("error")
    assert error["code"] == error_code, error
    code, _ = await client.closed()
    assert code == close_code
    return error


async def assert_open(client: Client) -> None:
    """The next message after a ping is the pong: the connection is open and nothing else was queued."""
    await client.send({"type": "ping", "id": "still-open"})
    assert await client.recv() == {"type": "pong", "ref": "still-open"}


async def producer(ws_connect: Connect, token: Token, stream_id: str, sub: str = "alice") -> Client:
    mobile = await ws_connect()
    await mobile.send(register(stream_id, token(sub)))
    await mobile.recv_type("registered", streamId=stream_id)
    return mobile


@pytest.fixture
async def start(ws_connect: Connect) -> AsyncIterator[Callable[[Settings], Awaitable[Server]]]:
    """Start extra servers with other settings; each is stopped after the test."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def run(settings: Settings) -> Server:
        srv, close = await start_server(settings)
        closers.append(close)
        return srv

    yield run
    for close in closers:
        await close()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ----------------------------------------------------------------------------- every JWT failure is 4401

BAD_TOKENS: list[tuple[str, Callable[[], str | None], str]] = [
    ("expired", lambda: signed(iat=int(time.time()) - 120, exp=int(time.time()) - 60), "token-expired"),
    ("wrong-key", lambda: signed(OTHER_SECRET), "token-invalid"),
    ("alg-none", unsigned_token, "token-invalid"),
    ("hs384-not-configured", lambda: signed(algorithm="HS384"), "token-invalid"),
    ("missing-exp", lambda: signed(exp=None), "token-invalid"),
    ("missing-sub", lambda: signed(sub=None), "token-invalid"),
    ("missing-iat", lambda: signed(iat=None), "token-invalid"),
    ("nbf-in-future", lambda: signed(nbf=int(time.time()) + 600), "token-not-yet-valid"),
    ("garbage", lambda: "not-a-jwt-at-all", "token-invalid"),
    ("jwt-shaped-garbage", lambda: "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "token-invalid"),
    ("unknown-role", lambda: signed(role="superuser"), "token-invalid"),
    ("missing", lambda: None, "token-missing"),
]
# NumericDate claims that are not a number of seconds from 1970 to 9999 (issue 12): PyJWT alone takes a
# numeric string, and exp 10**20 used to pass and then break the `authenticated` reply (close 1011).
BAD_DATES: list[tuple[str, Callable[[], str], str]] = [
    ("exp-numeric-string", lambda: signed(exp=str(int(time.time()) + 3600)), "token-invalid"),
    ("exp-numeric-string-in-the-past", lambda: signed(exp=str(int(time.time()) - 60)), "token-invalid"),
    ("exp-10e20", lambda: signed(exp=10**20), "token-invalid"),
    ("exp-past-9999", lambda: signed(exp=MAX_NUMERIC_DATE + 1), "token-invalid"),
    ("exp-infinity", lambda: signed(exp=float("inf")), "token-invalid"),
    ("exp-true", lambda: signed(exp=True), "token-invalid"),
    ("exp-a-list", lambda: signed(exp=[int(time.time()) + 3600]), "token-invalid"),
    ("iat-numeric-string", lambda: signed(iat=str(int(time.time()))), "token-invalid"),
    ("iat-negative", lambda: signed(iat=-1), "token-invalid"),
    ("iat-10e20", lambda: signed(iat=10**20), "token-invalid"),
    ("nbf-numeric-string", lambda: signed(nbf=str(int(time.time()))), "token-invalid"),
    ("nbf-10e20", lambda: signed(nbf=10**20), "token-invalid"),
    ("nbf-null", lambda: jwt.encode({**claims(), "nbf": None}, TEST_SECRET, algorithm="HS256"), "token-invalid"),
]
BAD_TOKENS += BAD_DATES


@pytest.mark.parametrize("make_token, error_code", [(m, c) for _, m, c in BAD_TOKENS],
                         ids=[name for name, _, _ in BAD_TOKENS])
async def test_bad_token_on_register_closes_4401_and_creates_nothing(
        server: Server, ws_connect: Connect, make_token: Callable[[], str | None], error_code: str) -> None:
    stream_id = new_stream_id()
    ws = await ws_connect()
    await ws.send(register(stream_id, make_token(), id="r1"))
    error = await assert_closed_with(ws, 4401, error_code)
    assert error["ref"] == "r1"
    assert await server.services.store.get_stream(stream_id) is None


@pytest.mark.parametrize("make_token, error_code", [(m, c) for _, m, c in BAD_TOKENS if c != "token-missing"],
                         ids=[name for name, _, c in BAD_TOKENS if c != "token-missing"])
async def test_bad_token_on_subscribe_and_auth_closes_4401(
        ws_connect: Connect, token: Token, make_token: Callable[[], str], error_code: str) -> None:
    stream_id = new_stream_id()
    await producer(ws_connect, token, stream_id)
    dashboard = await ws_connect()
    await dashboard.send(subscribe(stream_id, make_token()))
    await assert_closed_with(dashboard, 4401, error_code)
    fresh = await ws_connect()
    await fresh.send({"type": "auth", "token": make_token()})
    await assert_closed_with(fresh, 4401, error_code)


async def test_audience_and_issuer_are_checked_when_configured(
        settings: Settings, start: Callable[[Settings], Awaitable[Server]], ws_connect: Connect) -> None:
    srv = await start(replace_settings(settings, jwt_issuer=ISSUER, jwt_audience=AUDIENCE))
    refused = {
        "wrong audience": (signed(iss=ISSUER, aud="someone-else"), "token-rejected"),
        "wrong issuer": (signed(iss="https://evil.example", aud=AUDIENCE), "token-rejected"),
        "no audience": (signed(iss=ISSUER), "token-invalid"),
        "no issuer": (signed(aud=AUDIENCE), "token-invalid"),
    }
    for why, (bad, error_code) in refused.items():
        ws = await ws_connect(srv.ws_url)
        await ws.send(register(new_stream_id(), bad))
        error = await ws.recv_type("error")
        assert error["code"] == error_code, why
        assert (await ws.closed())[0] == 4401, why
    good = await ws_connect(srv.ws_url)
    stream_id = new_stream_id()
    await good.send(register(stream_id, signed(iss=ISSUER, aud=AUDIENCE)))
    assert (await good.recv_type("registered"))["streamId"] == stream_id


async def test_rs256_server_refuses_hs256_token_keyed_with_its_public_key(
        settings: Settings, start: Callable[[Settings], Awaitable[Server]], ws_connect: Connect,
        tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    pub = tmp_path / "jwt.pub"
    pub.write_bytes(public_pem)
    srv = await start(replace_settings(settings, jwt_secret="", jwt_public_key_file=str(pub)))

    confused = await ws_connect(srv.ws_url)
    await confused.send(register(new_stream_id(), hmac_token(public_pem)))
    await assert_closed_with(confused, 4401, "token-invalid")

    # the same key file, read the way an attacker would fetch it (trailing newline stripped)
    stripped = await ws_connect(srv.ws_url)
    await stripped.send(register(new_stream_id(), hmac_token(public_pem.strip())))
    await assert_closed_with(stripped, 4401, "token-invalid")

    private_pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    genuine = await ws_connect(srv.ws_url)
    stream_id = new_stream_id()
    await genuine.send(register(stream_id, signed(private_pem, "RS256")))
    assert (await genuine.recv_type("registered"))["streamId"] == stream_id
    assert (await srv.services.store.get_stream(stream_id) or {}).get("ownerId") == "alice"


# ----------------------------------------------------------------------------- cross-user access

async def test_registering_another_users_stream_closes_4403(
        server: Server, ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    bob = await ws_connect()
    await bob.send(register(stream_id, token("bob"), userId="alice"))
    await assert_closed_with(bob, 4403, "forbidden")
    await assert_open(alice)
    assert (await server.services.store.get_stream(stream_id) or {}).get("ownerId") == "alice"


async def test_subscribing_to_another_users_stream_looks_exactly_like_a_missing_stream(
        ws_connect: Connect, token: Token) -> None:
    stream_id, missing_id = new_stream_id(), new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    own = await ws_connect()
    await own.send(subscribe(stream_id, token("alice")))
    await own.recv_type("subscribed")
    bob = await ws_connect()
    await bob.send(subscribe(stream_id, token("bob"), id="hidden"))
    hidden = await bob.recv_type("error")
    await bob.send(subscribe(missing_id, id="missing"))
    missing = await bob.recv_type("error")

    assert hidden["code"] == missing["code"] == "not-found"
    assert hidden["message"].replace(stream_id, "<id>") == missing["message"].replace(missing_id, "<id>")
    assert set(hidden) == set(missing) and (hidden["ref"], missing["ref"]) == ("hidden", "missing")
    # bob stays connected, and alice's frames do not reach him
    await alice.send(frame_message(stream_id))
    await own.recv_type("video-frame")
    await assert_open(bob)


@pytest.mark.parametrize("scope", [["some-other-stream"], None], ids=["other-scope", "no-scope"])
async def test_service_token_outside_its_scope_gets_not_found(
        ws_connect: Connect, token: Token, scope: list[str] | None) -> None:
    stream_id = new_stream_id()
    await producer(ws_connect, token, stream_id)
    ml = await ws_connect()
    service = token("detector", role="service", streams=scope)
    await ml.send(subscribe(stream_id, service, client_type="ml-service"))
    error = await ml.recv_type("error")
    assert error["code"] == "not-found"
    assert stream_id in error["message"]
    await assert_open(ml)


@pytest.mark.parametrize("existing", [False, True], ids=["new-stream", "existing-stream"])
async def test_service_token_cannot_register_even_with_full_scope(
        server: Server, ws_connect: Connect, token: Token, existing: bool) -> None:
    stream_id = new_stream_id()
    if existing:  # owned by the service's own sub: refused for the role, not for the owner
        await producer(ws_connect, token, stream_id, sub="detector")
    ml = await ws_connect()
    await ml.send(register(stream_id, token("detector", role="service", streams="*")))
    await assert_closed_with(ml, 4403, "forbidden")
    doc = await server.services.store.get_stream(stream_id)
    assert (doc or {}).get("ownerId") == ("detector" if existing else None)


async def test_admin_may_watch_any_stream(ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    admin = await ws_connect()
    await admin.send(subscribe(stream_id, token("root", role="admin")))
    assert (await admin.recv_type("subscribed"))["streamId"] == stream_id
    await alice.send(frame_message(stream_id))
    assert (await admin.recv_type("video-frame"))["streamId"] == stream_id


async def test_service_in_scope_alerts_and_gets_ack(ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    ml = await ws_connect()
    await ml.send({"type": "auth", "token": token("detector", role="service", streams=[stream_id])})
    assert (await ml.recv_type("authenticated"))["sub"] == "detector"
    await ml.send(alert_message(stream_id, id="a1"))
    ack = await ml.recv_type("ack")
    assert ack["ref"] == "a1"
    alert = await alice.recv_type("alert")
    assert alert["alertId"] == ack["alertId"] and alert["streamId"] == stream_id


async def test_service_out_of_scope_alert_gets_not_found_and_is_not_stored(
        server: Server, ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    intruder = await ws_connect()
    await intruder.send({"type": "auth", "token": token("detector", role="service", streams=["elsewhere"])})
    await intruder.recv_type("authenticated")
    await intruder.send(alert_message(stream_id, id="a1", message="from outside the scope"))
    error = await intruder.recv_type("error")
    assert (error["code"], error["ref"]) == ("not-found", "a1")
    await assert_open(intruder)
    # a legitimate alert afterwards is the first one alice sees, with seq 1
    ml = await ws_connect()
    await ml.send({"type": "auth", "token": token("detector", role="service", streams=[stream_id])})
    await ml.send(alert_message(stream_id, message="in scope"))
    await ml.recv_type("ack")
    alert = await alice.recv_type("alert")
    assert (alert["message"], alert["seq"]) == ("in scope", 1)
    assert await server.services.store.count_alerts(stream_id) == 1


async def test_user_id_in_messages_is_never_trusted(
        server: Server, ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    mobile = await ws_connect()
    await mobile.send(register(stream_id, token("alice"), userId="mallory"))
    await mobile.recv_type("registered")
    assert (await server.services.store.get_stream(stream_id) or {}).get("ownerId") == "alice"
    mallory = await ws_connect()
    await mallory.send(subscribe(stream_id, token("mallory"), userId="alice"))
    assert (await mallory.recv_type("error"))["code"] == "not-found"


# ----------------------------------------------------------------------------- refresh and expiry

def short_token(sub: str = "alice", ttl_s: int = 2) -> tuple[str, int]:
    """A token that expires in (ttl_s - 1, ttl_s] seconds, and its exp."""
    exp = int(time.time()) + ttl_s
    return signed(sub=sub, exp=exp), exp


async def sleep_until(wall_time: float) -> None:
    await asyncio.sleep(max(0.0, wall_time - time.time()))


async def test_auth_refresh_keeps_connection_open_past_first_expiry(
        settings: Settings, ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    alice = await producer(ws_connect, token, stream_id)
    short, exp = short_token()
    dashboard = await ws_connect()
    await dashboard.send(subscribe(stream_id, short))
    await dashboard.recv_type("subscribed")
    await dashboard.send({"type": "auth", "token": token("alice"), "id": "refresh"})
    authenticated = await dashboard.recv_type("authenticated")
    assert authenticated["ref"] == "refresh" and authenticated["expiresAt"] > (exp + 60) * 1000

    await sleep_until(exp + settings.token_expiry_grace_s + 0.3)
    await alice.send(frame_message(stream_id, timestamp=42))
    assert (await dashboard.recv_type("video-frame"))["timestamp"] == 42
    await assert_open(dashboard)


@pytest.mark.parametrize("make_token, error_code", [(m, c) for _, m, c in BAD_DATES],
                         ids=[name for name, _, _ in BAD_DATES])
async def test_auth_with_an_absurd_date_on_a_live_connection_closes_4401_not_1011(
        ws_connect: Connect, token: Token, make_token: Callable[[], str], error_code: str) -> None:
    mobile = await producer(ws_connect, token, new_stream_id())
    await mobile.send({"type": "auth", "token": make_token(), "id": "refresh"})
    error = await assert_closed_with(mobile, 4401, error_code)
    assert error["ref"] == "refresh"


async def test_dates_up_to_the_end_of_9999_and_fractional_dates_are_accepted(ws_connect: Connect) -> None:
    now = time.time()
    for exp, iat, expires_at in ((MAX_NUMERIC_DATE, int(now), MAX_NUMERIC_DATE * 1000),
                                 (now + 600.25, now - 0.5, int((now + 600.25) * 1000))):
        ws = await ws_connect()
        await ws.send({"type": "auth", "token": signed(exp=exp, iat=iat, nbf=iat)})
        assert (await ws.recv_type("authenticated"))["expiresAt"] == expires_at


async def test_auth_with_another_users_token_closes_4401(ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    await producer(ws_connect, token, stream_id)
    dashboard = await ws_connect()
    await dashboard.send(subscribe(stream_id, token("alice")))
    await dashboard.recv_type("subscribed")
    await dashboard.send({"type": "auth", "token": token("bob")})
    await assert_closed_with(dashboard, 4401, "token-user-changed")


async def test_unrefreshed_token_closes_4401_just_after_expiry_and_grace(
        settings: Settings, ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    await producer(ws_connect, token, stream_id)
    short, exp = short_token()
    dashboard = await ws_connect()
    await dashboard.send(subscribe(stream_id, short))
    await dashboard.recv_type("subscribed")
    deadline = exp + settings.token_expiry_grace_s
    await assert_closed_with(dashboard, 4401, "token-expired")
    closed_at = time.time()
    assert deadline - 0.05 <= closed_at <= deadline + 0.75, (closed_at - deadline)
    # the token was accepted once; presented again after its expiry it is refused
    again = await ws_connect()
    await again.send(subscribe(stream_id, short))
    await assert_closed_with(again, 4401, "token-expired")


# ----------------------------------------------------------------------------- bearer on the upgrade

async def test_bearer_header_authenticates_the_connection(ws_connect: Connect, token: Token) -> None:
    stream_id = new_stream_id()
    mobile = await ws_connect(headers={"Authorization": f"Bearer {token('alice')}"})
    await mobile.send(register(stream_id))
    await mobile.recv_type("registered", streamId=stream_id)
    dashboard = await ws_connect(headers={"Authorization": f"bearer {token('alice')}"})
    await dashboard.send(subscribe(stream_id))
    await dashboard.recv_type("subscribed", streamId=stream_id)
    await mobile.send(frame_message(stream_id))
    await dashboard.recv_type("video-frame")
    # the header's identity is the one used: bob's bearer does not open alice's stream
    bob = await ws_connect(headers={"Authorization": f"Bearer {token('bob')}"})
    await bob.send(subscribe(stream_id))
    assert (await bob.recv_type("error"))["code"] == "not-found"


@pytest.mark.parametrize("make_token, error_code", [
    (lambda: "not-a-jwt", "token-invalid"),
    (lambda: signed(OTHER_SECRET), "token-invalid"),
    (lambda: signed(iat=int(time.time()) - 120, exp=int(time.time()) - 60), "token-expired"),
], ids=["garbage", "wrong-key", "expired"])
async def test_bad_bearer_header_closes_4401(
        ws_connect: Connect, make_token: Callable[[], str], error_code: str) -> None:
    ws = await ws_connect(headers={"Authorization": f"Bearer {make_token()}"})
    await assert_closed_with(ws, 4401, error_code)


# ----------------------------------------------------------------------------- tokens never logged

def token_parts(tokens: list[str]) -> list[str]:
    """Each token and its signature (the secret-bearing part), when it has one worth searching for."""
    parts = list(tokens)
    parts += [t.rsplit(".", 1)[1] for t in tokens if t.count(".") == 2 and len(t.rsplit(".", 1)[1]) >= 8]
    return parts


def record_texts(record: logging.LogRecord) -> list[str]:
    texts = [record.getMessage(), record.exc_text or ""]
    if record.exc_info:
        texts.append(logging.Formatter().formatException(record.exc_info))
    texts += [str(v) for k, v in vars(record).items() if k not in ("msg", "args", "exc_info")]
    return texts


async def test_tokens_never_reach_a_log_record(
        caplog: pytest.LogCaptureFixture, ws_connect: Connect, token: Token) -> None:
    """The product's own log calls never carry a token, before any redaction."""
    caplog.set_level(logging.DEBUG)
    stream_id = new_stream_id()
    # distinct strings for one user (same second, so vary the lifetime)
    good, bearer, refresh = token("alice"), token("alice", ttl_s=3601), token("alice", ttl_s=3602)
    service = token("detector", role="service", streams=[stream_id])
    bad_key, bad_bearer, changed = signed(OTHER_SECRET), signed(OTHER_SECRET, sub="eve"), token("bob")
    mobile = await ws_connect(headers={"Authorization": f"Bearer {bearer}"})
    await mobile.send(register(stream_id, good))
    await mobile.recv_type("registered")
    ml = await ws_connect()
    await ml.send(subscribe(stream_id, service, client_type="ml-service"))
    await ml.recv_type("subscribed")
    await ml.send(alert_message(stream_id))
    await ml.recv_type("ack")
    await ml.send({"type": "auth", "token": refresh})
    assert (await ml.recv_type("error"))["code"] == "token-user-changed"
    for bad in (bad_key, "garbage-token-value-123"):
        ws = await ws_connect()
        await ws.send(subscribe(stream_id, bad))
        await ws.closed()
    ws = await ws_connect(headers={"Authorization": f"Bearer {bad_bearer}"})
    await ws.closed()
    ws = await ws_connect()
    await ws.send(subscribe(stream_id, good))
    await ws.recv_type("subscribed")
    await ws.send({"type": "auth", "token": changed})
    await ws.closed()

    secrets = token_parts([good, bearer, refresh, service, bad_key, bad_bearer, changed,
                           "garbage-token-value-123"])
    assert any(r.name.startswith("watchout") for r in caplog.records), "the session logged nothing"
    for record in caplog.records:
        for text in record_texts(record):
            for secret in secrets:
                assert secret not in text, f"{record.name}: {record.getMessage()}"


def test_redact_removes_jwts_bearer_credentials_and_token_fields(token: Token) -> None:
    jwt_ = token("alice")
    signature = jwt_.rsplit(".", 1)[1]
    lines = [
        f"verifying {jwt_}",
        f"Authorization: Bearer {jwt_}",
        "Authorization: bearer opaque-credential-42",
        f"GET /ws?token={jwt_}&x=1 (127.0.0.1)",
        "GET /ws?access_token=opaque-credential-42",
        json.dumps({"type": "subscribe", "token": jwt_}),
        json.dumps({"type": "auth", "token": "opaque-credential-42"}),
    ]
    for line in lines:
        cleaned = redact(line)
        assert "[redacted]" in cleaned, line
        for secret in (jwt_, signature, "opaque-credential-42"):
            assert secret not in cleaned, line
    assert redact("stream cam-1 registered by alice") == "stream cam-1 registered by alice"


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_redacting_handler_prints_no_token_even_when_a_record_carries_one(
        token: Token, formatter: logging.Formatter) -> None:
    """The installed handler (as setup_logging builds it) redacts messages, arguments and tracebacks."""
    jwt_ = token("alice")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("watchout.test_auth.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.debug("subscribe %s", json.dumps({"token": jwt_}))
        logger.info("GET /ws?token=%s (127.0.0.1)", jwt_)
        logger.warning("Authorization: Bearer %s", jwt_)
        try:
            raise ValueError(f"cannot decode {jwt_}")
        except ValueError:
            logger.exception("verification failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = out.getvalue()
    assert text.count("[redacted]") >= 4 and "verification failed" in text and "ValueError" in text
    assert jwt_ not in text and jwt_.rsplit(".", 1)[1] not in text
    assert not re.search(r"eyJ[A-Za-z0-9_-]{5,}\.", text)


async def test_service_log_output_redacts_a_token_sent_in_the_query_string(
        server: Server, ws_connect: Connect, token: Token) -> None:
    """The protocol takes no `?token=`, but tornado's access log records the URL a client sent, token and all.

    The raw record does carry it; what setup_logging's handler writes must not.
    """
    root, access = logging.getLogger(), logging.getLogger("tornado.access")
    saved = (root.handlers[:], root.level, access.level)
    out = io.StringIO()
    setup_logging("text", "debug")
    try:
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(out)
        in_url, in_body, bad = token("alice"), token("alice"), signed(OTHER_SECRET)
        stream_id = new_stream_id()
        ws = await ws_connect(f"{server.ws_url}?token={in_url}")
        await ws.send(register(stream_id, in_body))
        await ws.recv_type("registered")
        refused = await ws_connect(headers={"Authorization": f"Bearer {bad}"})
        await refused.closed()
    finally:
        handlers, root_level, access_level = saved
        root.handlers[:] = handlers
        root.setLevel(root_level)
        access.setLevel(access_level)
    text = out.getvalue()
    assert "GET /ws?token=[redacted]" in text and "producer registered" in text, text
    for secret in token_parts([in_url, in_body, bad]):
        assert secret not in text
