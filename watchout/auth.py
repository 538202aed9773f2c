"""Token verification (PyJWT) into a Principal, permission checks, and token minting for admins."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from watchout.errors import ConfigError, Forbidden, NotFound, Unauthenticated
from watchout.settings import Settings

ROLES = ("user", "service", "admin")
_MAX_STREAMS_CLAIM = 1000
_VERIFIED_CACHE_SIZE = 4096
# `exp`, `iat` and `nbf` are NumericDates (RFC 7519 §2): JSON numbers of seconds since 1970. PyJWT also takes
# numeric strings and any magnitude; Watchout takes a number from 0 to the last second of year 9999, which
# every date type the relay and its clients use can hold (10**20 s, say, cannot be sent as `expiresAt` ms).
DATE_CLAIMS = ("exp", "iat", "nbf")
MAX_NUMERIC_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for. `streams` None means no scope claim; ("*",) means all."""

    sub: str
    role: str
    streams: tuple[str, ...] | None
    expires_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def in_scope(self, stream_id: str) -> bool:
        return self.streams is None or "*" in self.streams or stream_id in self.streams


class TokenVerifier:
    """Verifies tokens with the configured key; the algorithms come from Settings, never the token."""

    def __init__(self, settings: Settings) -> None:
        self._algorithms = list(settings.algorithms)
        self._key: Any = settings.jwt_secret
        if settings.jwt_public_key_file:
            self._key = Path(settings.jwt_public_key_file).read_bytes()
        if not self._key:
            raise ConfigError("jwt_secret", "no signing key configured")
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        self._leeway = settings.jwt_leeway_s
        # Tokens whose signature and claims already passed: a reconnecting fleet presents the same
        # tokens again, and only the expiry can change its verdict.
        self._verified: OrderedDict[str, Principal] = OrderedDict()

    def verify(self, token: str | None) -> Principal:
        """Raise Unauthenticated with a reason code (never the token) unless the token is valid."""
        if not token:
            raise Unauthenticated("a token is required", code="token-missing")
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at + self._leeway <= time.time():
                del self._verified[token]
                raise Unauthenticated("token expired", code="token-expired")
            self._verified.move_to_end(token)
            return known
        principal = self._decode(token)
        self._verified[token] = principal
        if len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str) -> Principal:
        try:
            # PyJWT checks the signature, iss, aud and that the claims are present; the dates are checked
            # below, after their type, so that a string or absurd date is `token-invalid` whatever its value.
            claims = jwt.decode(
                token, self._key, algorithms=self._algorithms, issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iat", "sub", "role"],
                         "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise Unauthenticated("token issuer or audience rejected", code="token-rejected") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim} claim", code="token-invalid") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("token invalid", code="token-invalid") from None
        _check_dates(claims, time.time(), self._leeway)
        return _principal(claims)


def _check_dates(claims: dict[str, Any], now: float, leeway: float) -> None:
    """Raise Unauthenticated: token-invalid for a date that is not a NumericDate within 0..MAX_NUMERIC_DATE,
    token-not-yet-valid before `nbf` or `iat`, token-expired from `exp` on (each with `leeway` seconds)."""
    for name in DATE_CLAIMS:
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)
                               or not 0 <= value <= MAX_NUMERIC_DATE):
            raise Unauthenticated(f"token {name} must be a number of seconds from 1970 to 9999",
                                  code="token-invalid")
    if claims["iat"] > now + leeway or claims.get("nbf", 0) > now + leeway:
        raise Unauthenticated("token not valid yet", code="token-not-yet-valid")
    if claims["exp"] <= now - leeway:
        raise Unauthenticated("token expired", code="token-expired")


def _principal(claims: dict[str, Any]) -> Principal:
    sub, role, streams = claims.get("sub"), claims.get("role"), claims.get("streams")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise Unauthenticated("token sub must be a non-empty string", code="token-invalid")
    if role not in ROLES:
        raise Unauthenticated("token role must be user, service or admin", code="token-invalid")
    scope: tuple[str, ...] | None = None
    if streams is not None:
        if streams == "*":
            scope = ("*",)
        elif (isinstance(streams, list) and len(streams) <= _MAX_STREAMS_CLAIM
              and all(isinstance(s, str) for s in streams)):
            scope = tuple(streams)
        else:
            raise Unauthenticated("token streams must be a list of ids or '*'", code="token-invalid")
    return Principal(sub, role, scope, float(claims["exp"]))


# ----------------------------------------------------------------------------- permissions
# `owner_id` is the stream's owner from the store, None when the stream does not exist.

def check_produce(p: Principal, stream_id: str, owner_id: str | None) -> None:
    """May p stream video into this stream (creating it if owner_id is None)? Raises Forbidden."""
    if p.role == "service":
        raise Forbidden("service tokens cannot produce video", code="forbidden")
    if not p.in_scope(stream_id):
        raise Forbidden("stream outside this token's scope", code="forbidden")
    if owner_id is not None and owner_id != p.sub and not p.is_admin:
        raise Forbidden("stream belongs to another user", code="forbidden")


def can_watch(p: Principal, stream_id: str, owner_id: str) -> bool:
    """May p watch frames/alerts of, or send alerts to, this existing stream?"""
    if not p.in_scope(stream_id):
        return False
    if p.is_admin:
        return True
    if p.role == "service":
        return p.streams is not None and p.in_scope(stream_id)
    return owner_id == p.sub and p.in_scope(stream_id)


def check_watch(p: Principal, stream_id: str, owner_id: str | None) -> None:
    """Raise NotFound (the same for a missing and a hidden stream) unless p may watch it."""
    if owner_id is None or not can_watch(p, stream_id, owner_id):
        raise NotFound(f"stream {stream_id} not found", code="not-found")


# ----------------------------------------------------------------------------- minting

def parse_ttl(text: str) -> int:
    """'90', '90s', '15m', '1h', '7d' -> seconds. Raises ValueError."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:], None)
    number = text[:-1] if factor else text
    seconds = int(float(number) * (factor or 1))
    if seconds <= 0:
        raise ValueError("ttl must be positive")
    return seconds


def mint_token(key: str | bytes, algorithm: str, sub: str, role: str, *, streams: list[str] | str | None = None,
               ttl_s: int = 3600, issuer: str = "", audience: str = "", now: float | None = None) -> str:
    """A signed token with exp/iat/sub/role (and streams, iss, aud when given)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": sub, "role": role, "iat": issued, "exp": issued + ttl_s}
    if streams is not None:
        claims["streams"] = streams
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key, algorithm=algorithm)
