"""The webhook channel: endpoint secrets and URLs, and one signed POST (Standard Webhooks) per call.

`post` makes exactly one attempt and never retries; the delivery engine records each `Attempt` and retries
with backoff. The private-address rule is applied twice: `check_url` refuses literal private addresses when an
endpoint is registered (no DNS), and `post` refuses, at connection time, any host that resolves to one.
"""
from __future__ import annotations

import base64
import ipaddress
import math
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from secrets import token_bytes
from typing import Any, NoReturn
from urllib.parse import urlsplit

from standardwebhooks import Webhook
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPInputError
from tornado.iostream import StreamClosedError
from tornado.netutil import Resolver
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError, SimpleAsyncHTTPClient

from watchout.errors import InvalidMessage

__all__ = ["Attempt", "MAX_URL_CHARS", "USER_AGENT", "check_url", "new_secret", "post"]

MAX_URL_CHARS = 2048
USER_AGENT = "Watchout-Webhooks/1"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
# A receiver's status line and headers; anything longer is not a webhook receiver's answer.
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NETLOC_RE = re.compile(r"(?P<host>\[[^\[\]]*\]|[^\[\]:]*)(?::(?P<port>[^:]*))?")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt: `ok` only for a 2xx status; `error` a short text when not ok.

    `status` is the receiver's HTTP status (None when none arrived); `duration_s` the attempt's wall time.
    """

    ok: bool
    status: int | None
    error: str | None
    duration_s: float


def new_secret() -> str:
    """A new endpoint secret: "whsec_" and the base64 of 24 random bytes, as `standardwebhooks.Webhook` takes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


# ----------------------------------------------------------------------------- URLs

def check_url(url: str, *, allow_private: bool) -> str:
    """The endpoint URL normalised (scheme and host lower case, IDNA host, no default port, "/" for no path).

    Raises InvalidMessage: code "invalid-url" for a malformed or unsupported URL, "private-address" for a
    literal loopback, private, link-local or otherwise non-public address (or localhost) unless
    `allow_private`. Host names are not resolved here: `post` checks the addresses they resolve to.
    """
    if len(url) > MAX_URL_CHARS:
        _invalid(f"a webhook URL is at most {MAX_URL_CHARS} characters")
    if any(ch <= " " or ch == "\x7f" for ch in url):
        _invalid("a webhook URL may not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        _invalid(f"not a valid URL ({exc})")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        _invalid("a webhook URL must start with http:// or https://")
    if "#" in url:
        _invalid("a webhook URL may not have a fragment (#...)")
    if "@" in parts.netloc:
        _invalid("a webhook URL may not carry a user name or password")
    host, ip, port = _split_netloc(parts.netloc)
    if not allow_private and _is_local_name(host, ip):
        raise InvalidMessage(f"{host} is a loopback, private or otherwise non-public address",
                             code="private-address")
    if not (parts.path + parts.query).isascii():
        _invalid("the path and query of a webhook URL must be ASCII (percent-encode other characters)")
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{parts.path or '/'}{query}"


def _invalid(text: str) -> NoReturn:
    raise InvalidMessage(text, code="invalid-url")


def _split_netloc(netloc: str) -> tuple[str, IPAddress | None, int | None]:
    """(host as written in the normalised URL, its address if it is a literal one, port)."""
    match = _NETLOC_RE.fullmatch(netloc)
    if match is None:
        _invalid("a webhook URL's host is malformed")
    port_text = match["port"]
    port = None
    if port_text:
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            _invalid("a webhook URL's port must be a number from 1 to 65535")
        port = int(port_text)
    host = match["host"]
    if host.startswith("["):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            _invalid(f"{host} is not a valid IPv6 address")
        if ip6.scope_id:
            _invalid("a webhook URL's IPv6 address may not have a zone")
        return f"[{ip6.compressed}]", ip6, port
    name = _ascii_host(host)
    try:
        ip4 = ipaddress.IPv4Address(socket.inet_aton(name))  # also "127.1" and "2130706433", as resolvers read them
    except OSError:
        return name, None, port
    return str(ip4), ip4, port


def _ascii_host(host: str) -> str:
    if not host:
        _invalid("a webhook URL needs a host")
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        _invalid(f"{host[:80]} is not a valid host name")
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        _invalid(f"{host[:80]} is not a valid host name")
    return name


def _is_local_name(host: str, ip: IPAddress | None) -> bool:
    if ip is not None:
        return not _is_public(ip)
    name = host.removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


def _is_public(ip: IPAddress) -> bool:
    """Whether `ip` is globally routable; an IPv4 address embedded in IPv6 (mapped, NAT64, 6to4) is judged."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


# ----------------------------------------------------------------------------- one POST

class _PrivateAddressRefused(Exception):
    def __init__(self, address: str) -> None:
        super().__init__(f"refused: private address {address}")
        self.address = address


class _GuardedResolver(Resolver):
    """Resolves with `resolver`; refuses a host when any of its addresses is not public (unless `allow_private`).

    The addresses checked are the ones the client connects to, so a name that re-resolves to a private
    address after a check (DNS rebinding) is still refused.
    """

    def initialize(self, resolver: Resolver, allow_private: bool) -> None:
        self.resolver = resolver
        self.allow_private = allow_private

    def close(self) -> None:
        self.resolver.close()

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        addresses = await self.resolver.resolve(host, port, family)
        if not self.allow_private:
            for _, sockaddr in addresses:
                if not _is_public(ipaddress.ip_address(sockaddr[0])):
                    raise _PrivateAddressRefused(sockaddr[0])
        return addresses


class _StatusRecorder:
    """A header_callback that keeps the final (non-1xx) status code, known once the headers are complete."""

    def __init__(self) -> None:
        self.status: int | None = None
        self._at_start_line = True

    def __call__(self, line: str) -> None:
        if self._at_start_line:
            self._at_start_line = False
            code = int(line.split(" ", 2)[1])
            if code >= 200:
                self.status = code
        elif line == "\r\n":
            self._at_start_line = True


def _discard(chunk: bytes) -> None:
    """The response body is never kept: the status line decides."""


def _signature_header(body: bytes, *, msg_id: str, timestamp: int, secrets: Sequence[str]) -> str:
    """The `webhook-signature` value: "v1,<sig>" for each secret, space-separated (current first, then any
    previous one during rotation). Raises ValueError for no secrets, and the library's errors for a bad one."""
    if not secrets:
        raise ValueError("a webhook needs at least one secret")
    signed_at = datetime.fromtimestamp(timestamp, timezone.utc)
    return " ".join(Webhook(secret).sign(msg_id, signed_at, body) for secret in secrets)


async def post(url: str, body: bytes, *, msg_id: str, secrets: Sequence[str], allow_private: bool,
               timeout_s: float = 5.0, max_response_bytes: int = 64 * 1024,
               now: datetime | None = None) -> Attempt:
    """POST `body` (JSON) to `url` once, signed with each of `secrets`; never retries, never raises for a
    network or HTTP failure (a malformed `url` is a failed attempt too).

    The whole attempt (resolving, connecting, TLS, sending, reading the answer) ends within `timeout_s`.
    Redirects are not followed (a 3xx fails). At most `max_response_bytes` of the response body are read (plus
    one read chunk, 64 KiB) and none is kept: a 2xx status line delivers even when the body is cut off.
    Unless `allow_private`, a host resolving to any non-public address is refused before connecting.
    `now` (naive means UTC) is the signed timestamp, default the current time.

    Each call has its own client (its resolver guard and body cap are the call's), closed before returning.
    """
    started = time.monotonic()
    try:
        url = check_url(url, allow_private=True)  # private addresses are refused by the resolver below
    except InvalidMessage as exc:
        return Attempt(ok=False, status=None, error=f"invalid URL: {exc.message}",
                       duration_s=time.monotonic() - started)
    when = now if now is not None else datetime.now(timezone.utc)
    timestamp = math.floor((when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": _signature_header(body, msg_id=msg_id, timestamp=timestamp, secrets=secrets),
    }
    recorder = _StatusRecorder()
    request = HTTPRequest(url, method="POST", body=body, headers=headers, user_agent=USER_AGENT,
                          follow_redirects=False, connect_timeout=timeout_s, request_timeout=timeout_s,
                          decompress_response=False, header_callback=recorder, streaming_callback=_discard)
    resolver = _GuardedResolver(resolver=Resolver(), allow_private=allow_private)
    client = SimpleAsyncHTTPClient(force_instance=True, max_clients=1, resolver=resolver,
                                   max_header_size=MAX_RESPONSE_HEADER_BYTES, max_body_size=max_response_bytes,
                                   max_buffer_size=max(max_response_bytes, 1 << 20))
    status: int | None = None
    failure: BaseException | None = None
    try:
        response = await client.fetch(request, raise_error=False)
        status = recorder.status or response.code
    except (OSError, HTTPClientError, StreamClosedError, HTTPInputError, _PrivateAddressRefused) as exc:
        status, failure = recorder.status, exc
    finally:
        client.close()
        resolver.close()  # the client closes only a resolver it made itself
    duration_s = time.monotonic() - started
    if status is not None:
        return Attempt(ok=200 <= status < 300, status=status, error=_status_error(status), duration_s=duration_s)
    assert failure is not None
    return Attempt(ok=False, status=None, error=_failure_text(failure, timeout_s), duration_s=duration_s)


def _status_error(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"redirect (HTTP {status}) not followed"
    return f"HTTP {status}"


def _failure_text(exc: BaseException, timeout_s: float) -> str:
    """A short text for an attempt that got no status."""
    if isinstance(exc, (HTTPTimeoutError, TimeoutError)):
        return f"timeout after {float(timeout_s)} s"
    if isinstance(exc, _PrivateAddressRefused):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, (HTTPStreamClosedError, StreamClosedError, HTTPInputError)):
        return "connection closed without a complete HTTP response"
    if isinstance(exc, OSError) and exc.strerror:
        return f"network error: {exc.strerror}"
    return f"{type(exc).__name__}: {str(exc)[:120]}"
