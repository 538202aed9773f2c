"""Web Push: the VAPID key pair, browsers' subscriptions checked, alert notifications built, encrypted and sent.

A message is encrypted for one subscription (RFC 8291, `aes128gcm`, with pywebpush's `WebPusher.encode`),
authenticated with a VAPID JWT (RFC 8292, ES256, with py_vapid), and POSTed to the subscription's endpoint with
Tornado's non-blocking HTTP client: pywebpush's own `send` would block the event loop on `requests`.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
import tornado.httpclient
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02, VapidException  # type: ignore[import-untyped]
from pywebpush import WebPusher  # type: ignore[import-untyped]

from watchout.errors import InvalidMessage

MAX_ENDPOINT_CHARS = 2048
# A push service must take 4096 bytes of encrypted body (RFC 8030 7.2); aes128gcm adds 86 bytes of header,
# 1 of padding delimiter and 16 of tag, so a payload may have 3993 bytes. notification() stays well under.
MAX_PAYLOAD_BYTES = 4096 - 103
NOTIFICATION_MAX_BYTES = 3072
URGENCIES = ("very-low", "low", "normal", "high")
# RFC 8292 2: a JWT valid for at most 24 hours; 12 leaves room for the push service's clock.
VAPID_LIFETIME_S = 12 * 3600
_ERROR_BODY_CHARS = 200
_SUBJECT_SCHEMES = ("mailto", "https")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """The bytes of URL-safe base64, padded or not; raises ValueError for anything else."""
    if not text or text.strip("=").strip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
        raise ValueError("not URL-safe base64")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except binascii.Error as exc:
        raise ValueError("not URL-safe base64") from exc


def _public_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _load_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM (PKCS#8 or SEC1) or from its raw 32-byte scalar in URL-safe base64 (what the
    `vapid` and `web-push generate-vapid-keys` tools print); raises ValueError."""
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (TypeError, UnsupportedAlgorithm) as exc:  # TypeError: an encrypted key
            raise ValueError(f"cannot read the VAPID private key: {exc}") from None
    else:
        raw = _unb64url(text.strip())
        if len(raw) != 32:
            raise ValueError("a raw VAPID private key is 32 bytes of URL-safe base64")
        key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("a VAPID private key is a P-256 (prime256v1) key")
    return key


@dataclass(frozen=True, slots=True)
class VapidKeys:
    """The application server's VAPID key pair (RFC 8292): one per deployment, kept in the store.

    `public_key_b64` is what browsers take as `applicationServerKey`: the uncompressed P-256 point (65 bytes,
    0x04 first) in unpadded URL-safe base64. A subscription is bound to it: a new pair makes every existing
    subscription fail (403), so generate it once. The private key never appears in repr().
    """

    private_pem: str = field(repr=False)
    public_key_b64: str
    _key: ec.EllipticCurvePrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Raises ValueError when the private key is not a P-256 key or the public key is not its own."""
        key = _load_private_key(self.private_pem)
        if self.public_key_b64 != _b64url(_public_point(key)):
            raise ValueError("the VAPID public key does not belong to the private key")
        object.__setattr__(self, "_key", key)

    @classmethod
    def generate(cls) -> Self:
        return cls.from_private_key(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_private_key(cls, key: ec.EllipticCurvePrivateKey | str) -> Self:
        """From a key object, or its PEM or raw URL-safe base64 text; raises ValueError."""
        if isinstance(key, str):
            key = _load_private_key(key)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
        return cls(pem, _b64url(_public_point(key)))

    @property
    def public_key(self) -> bytes:
        """The uncompressed point: 65 bytes."""
        return _public_point(self._key)

    def to_json(self) -> str:
        """`{"privateKey": PEM, "publicKey": base64url}`: a secret, to keep as the signing key is kept."""
        return json.dumps({"privateKey": self.private_pem, "publicKey": self.public_key_b64})

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """What to_json() wrote ("privateKey" may also be the raw key in base64url); raises ValueError."""
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"VAPID keys: not JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("privateKey"), str):
            raise ValueError('VAPID keys: expected {"privateKey": ..., "publicKey": ...}')
        keys = cls.from_private_key(obj["privateKey"])
        if obj.get("publicKey") not in (None, keys.public_key_b64):
            raise ValueError("VAPID keys: the public key does not belong to the private key")
        return keys

    def authorization(self, audience: str, subject: str, now_s: float | None = None) -> str:
        """The `Authorization: vapid t=<JWT>, k=<public key>` value for one push service origin (`audience`),
        valid VAPID_LIFETIME_S; raises ValueError for a `subject` that is not a mailto: or https: URI."""
        check_subject(subject)
        claims = {"aud": audience, "sub": subject, "exp": int(now_s if now_s is not None else time.time())
                  + VAPID_LIFETIME_S}
        # no-strict: py_vapid's own check refuses https subjects with a path, which RFC 8292 allows
        vapid = Vapid02(private_key=self._key, conf={"no-strict": True})
        try:
            header: str = vapid.sign(claims)["Authorization"]
        except VapidException as exc:
            raise ValueError(f"cannot sign a VAPID token for {audience!r}: {exc}") from None
        return header


def check_subject(subject: str) -> str:
    """`subject` if it is a VAPID contact: a mailto: URI with an address, or an https: URL; raises ValueError."""
    parts = urllib.parse.urlsplit(subject) if isinstance(subject, str) else None
    if parts is None or parts.scheme not in _SUBJECT_SCHEMES or (parts.scheme == "mailto" and "@" not in parts.path) \
            or (parts.scheme == "https" and not parts.hostname):
        raise ValueError(f"a VAPID subject is a mailto: or https: URI (e.g. mailto:admin@example.com), not {subject!r}")
    return subject


# ----------------------------------------------------------------------------- subscriptions

def _invalid(text: str) -> InvalidMessage:
    return InvalidMessage(text, code="invalid-subscription")


def _is_private_host(host: str) -> bool:
    """A host a browser's push service never is: this machine or a private, link-local or reserved address."""
    host = host.rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the legacy IPv4 forms resolvers still take: 127.1, 2130706433, 0x7f000001
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False
    return not address.is_global


def _check_endpoint(endpoint: Any, allow_private: bool) -> str:
    if not isinstance(endpoint, str) or not endpoint:
        raise _invalid("endpoint must be the push service's https URL (a string)")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise _invalid(f"endpoint must be at most {MAX_ENDPOINT_CHARS} characters")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in endpoint):
        raise _invalid("endpoint must be printable ASCII, without spaces")
    try:
        parts = urllib.parse.urlsplit(endpoint)
        host, _ = parts.hostname, parts.port  # .port raises ValueError when out of range
    except ValueError:
        raise _invalid("endpoint is not a valid URL") from None
    if not host or parts.scheme != "https" and not (allow_private and parts.scheme == "http"):
        raise _invalid("endpoint must be an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise _invalid("endpoint must not carry a user name or password")
    if _is_private_host(host) and not allow_private:
        raise _invalid("endpoint must be a public push service, not a local or private address")
    return endpoint


def _check_key(keys: dict[str, Any], name: str) -> bytes:
    value = keys.get(name)
    if not isinstance(value, str) or len(value) > 200:
        raise _invalid(f"keys.{name} must be a URL-safe base64 string")
    try:
        return _unb64url(value)
    except ValueError:
        raise _invalid(f"keys.{name} must be URL-safe base64") from None


def _check_keys(obj: dict[str, Any]) -> dict[str, str]:
    """`obj["keys"]`, checked: a P-256 point and a 16-byte secret; raises InvalidMessage."""
    keys = obj.get("keys")
    if not isinstance(keys, dict):
        raise _invalid("keys must be an object {p256dh, auth}")
    p256dh = _check_key(keys, "p256dh")
    if len(p256dh) != 65 or p256dh[0] != 4:
        raise _invalid("keys.p256dh must be an uncompressed P-256 public key (65 bytes, 0x04 first)")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError:
        raise _invalid("keys.p256dh is not a point on the P-256 curve") from None
    if len(_check_key(keys, "auth")) != 16:
        raise _invalid("keys.auth must be 16 bytes")
    return {"p256dh": keys["p256dh"], "auth": keys["auth"]}


def check_subscription(obj: Any, *, allow_private: bool = False) -> dict[str, Any]:
    """A browser's PushSubscription JSON (`subscription.toJSON()`), checked and copied with only the fields
    Web Push uses: `{"endpoint", "expirationTime", "keys": {"p256dh", "auth"}}` (other fields are dropped).

    Raises InvalidMessage (`invalid-subscription`) naming the first field at fault. The endpoint must be an
    https URL of at most MAX_ENDPOINT_CHARS, not on this machine or a private network (a literal address or
    `localhost`: the server must not be made to POST inside its own network); host names are not resolved.
    `allow_private` (the setting webhook_allow_private; the tests' own push endpoint) lets both through.
    """
    if not isinstance(obj, dict):
        raise _invalid("a push subscription is a JSON object {endpoint, keys: {p256dh, auth}, expirationTime}")
    endpoint = _check_endpoint(obj.get("endpoint"), allow_private)
    keys = _check_keys(obj)
    expiration = obj.get("expirationTime")
    if expiration is not None and (isinstance(expiration, bool) or not isinstance(expiration, int | float)
                                   or not math.isfinite(expiration) or expiration < 0):
        raise _invalid("expirationTime must be null or a time in milliseconds since the epoch")
    return {"endpoint": endpoint, "expirationTime": expiration,
            "keys": keys}


# ----------------------------------------------------------------------------- sending

@dataclass(frozen=True, slots=True)
class PushAttempt:
    """What one push did. `ok`: the push service took the message (200, 201, 202). `gone`: the subscription
    will never work again (404, 410, or it cannot be used at all): remove it. `status` is None when no HTTP
    answer came (then `error` says why: a timeout, a refused connection, TLS). `retry_after_s`: the push
    service's Retry-After in seconds (429, 503), when it gave one as a number."""

    ok: bool
    status: int | None
    gone: bool
    error: str | None = None
    retry_after_s: float | None = None


def _origin(endpoint: str) -> str:
    parts = urllib.parse.urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from push services, left to the caller's own schedule
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _check_options(payload: bytes, ttl_s: int, urgency: str, timeout_s: float) -> None:
    if not payload or len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a push payload has 1 to {MAX_PAYLOAD_BYTES} bytes, not {len(payload)}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 0:
        raise ValueError(f"ttl_s must be a whole number of seconds >= 0, not {ttl_s!r}")
    if urgency not in URGENCIES:
        raise ValueError(f"urgency must be one of {', '.join(URGENCIES)}, not {urgency!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, not {timeout_s!r}")


async def send(subscription: dict[str, Any], payload: bytes, keys: VapidKeys, *, subject: str, ttl_s: int = 3600,
               timeout_s: float = 5.0, urgency: str = "high") -> PushAttempt:
    """Encrypt `payload` for `subscription` (as check_subscription returned it) and POST it to its push service.

    `ttl_s`: how long the push service keeps it for an offline browser (0: deliver now or drop). `timeout_s`
    bounds the connection and the whole request. Never raises for what the network or push service does, nor
    for a subscription that cannot be used (gone); raises ValueError for the caller's own mistakes: a payload
    empty or over MAX_PAYLOAD_BYTES, a bad `subject`, `ttl_s`, `urgency` or `timeout_s`.
    """
    _check_options(payload, ttl_s, urgency, timeout_s)
    check_subject(subject)
    # Checked again, but for the endpoint policy (https, public host), which is check_subscription's at intake.
    endpoint = subscription.get("endpoint") if isinstance(subscription, dict) else None
    if not isinstance(endpoint, str) or urllib.parse.urlsplit(endpoint).scheme not in ("https", "http"):
        return PushAttempt(False, None, True, "invalid subscription: no http(s) endpoint")
    try:
        pusher = WebPusher({"endpoint": endpoint, "keys": _check_keys(subscription)})
        authorization = keys.authorization(_origin(endpoint), subject)
    except (InvalidMessage, ValueError) as exc:
        return PushAttempt(False, None, True, f"invalid subscription: {exc}")
    body = pusher.encode(payload, "aes128gcm")["body"]
    head = bytearray()  # the answer's first bytes, for the error text: the endpoint is the browser's to choose

    def keep_head(chunk: bytes) -> None:
        head.extend(chunk[:max(0, _ERROR_BODY_CHARS - len(head))])

    request = tornado.httpclient.HTTPRequest(
        endpoint, method="POST", body=body, follow_redirects=False, connect_timeout=timeout_s,
        request_timeout=timeout_s, decompress_response=False, streaming_callback=keep_head,
        headers={"Authorization": authorization, "Content-Encoding": "aes128gcm",
                 "Content-Type": "application/octet-stream", "TTL": str(ttl_s), "Urgency": urgency})
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(request, raise_error=False)
    except tornado.httpclient.HTTPClientError as exc:  # 599: a timeout or a connection closed early
        return PushAttempt(False, None, False, f"push service: {exc.message or exc}")
    except OSError as exc:  # refused, unreachable, DNS, TLS
        return PushAttempt(False, None, False, f"push service unreachable: {exc.strerror or exc}")
    finally:
        client.close()
    status = response.code
    if status in (200, 201, 202):
        return PushAttempt(True, status, False)
    text = bytes(head).decode("utf-8", "replace").strip()
    error = f"push service answered {status} {response.reason}" + (f": {text}" if text else "")
    return PushAttempt(False, status, status in (404, 410), error,
                       _retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None)


# ----------------------------------------------------------------------------- the notification

def notification(alert: dict[str, Any], dashboard_url: str) -> bytes:
    """The push payload for one alert (JSON, at most NOTIFICATION_MAX_BYTES; the message is cut to fit), as the
    dashboard's service worker (watchout/dashboard/sw.js) shows it:

    `{"title": "<severity> alert on <streamId>", "body": message, "tag": streamId, "url": dashboard_url +
    "#stream=..&alert=..", "image": snapshotUrl (when the alert has one), "timestamp": ms, "streamId",
    "alertId", "severity"}`. `alert` is an alert as the WebSocket `alert` message spells it, with
    `snapshotUrl` absolute when present.
    """
    stream_id, alert_id = str(alert["streamId"]), str(alert["alertId"])
    fragment = urllib.parse.urlencode({"stream": stream_id, "alert": alert_id})
    content: dict[str, Any] = {
        "title": f"{alert.get('severity', 'new')} alert on {stream_id}", "body": "",
        "tag": stream_id, "url": f"{dashboard_url.split('#', 1)[0]}#{fragment}",
        "streamId": stream_id, "alertId": alert_id, "severity": alert.get("severity")}
    snapshot = alert.get("snapshotUrl")
    if isinstance(snapshot, str) and snapshot and len(snapshot) <= MAX_ENDPOINT_CHARS:
        content["image"] = snapshot
    if isinstance(alert.get("timestamp"), int | float) and not isinstance(alert.get("timestamp"), bool):
        content["timestamp"] = alert["timestamp"]
    message = str(alert.get("message") or "")
    content["body"] = message
    encoded = orjson.dumps(content)
    if len(encoded) > NOTIFICATION_MAX_BYTES:
        # the longest prefix that fits with its mark (a character takes 1 to 6 bytes in JSON): a binary search
        fits, over = 0, len(message)
        while over - fits > 1:
            middle = (fits + over) // 2
            content["body"] = message[:middle] + "…"
            if len(orjson.dumps(content)) <= NOTIFICATION_MAX_BYTES:
                fits = middle
            else:
                over = middle
        content["body"] = message[:fits] + "…"
        encoded = orjson.dumps(content)
    if len(encoded) > NOTIFICATION_MAX_BYTES:
        raise ValueError("an alert's ids and URLs alone exceed the push payload limit")
    return encoded
