"""Typed, validated query values for listing streams and alerts, and opaque pagination cursors.

Every value a client sends is converted here to a Python type before any store call, so an operator
object, a bracketed key or a string where a number belongs can never reach a MongoDB query.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from watchout.errors import InvalidMessage
from watchout.protocol import SEVERITIES
from watchout.store import AlertFilter
from watchout.store.base import is_alert_id as is_alert_id  # noqa: F401 (cursors and paths check ids with it)

MAX_SEQ = 2**53 - 1
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def bad(name: str, problem: str) -> InvalidMessage:
    return InvalidMessage(f"query parameter {name}: {problem}", code="invalid-query")


def single(args: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise bad(name, "give it once")
    return values[0]


def check_names(args: Mapping[str, Sequence[str]], allowed: Sequence[str]) -> None:
    """Refuse unknown and bracketed keys (`owner[$ne]=x`) instead of ignoring them."""
    for name in args:
        if name not in allowed:
            raise bad(name, "unknown parameter" if "[" not in name else "operators are not accepted")


def _is_whole(raw: str) -> bool:
    """At most 15 ASCII digits: str.isdigit() alone passes '²' and 5000-digit numbers, which int() refuses."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 15


def parse_limit(args: Mapping[str, Sequence[str]]) -> int:
    raw = single(args, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not _is_whole(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad("limit", f"a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def parse_int(args: Mapping[str, Sequence[str]], name: str) -> int | None:
    raw = single(args, name)
    if raw is None:
        return None
    if not _is_whole(raw):
        raise bad(name, "a whole number of at least 0")
    return int(raw)


def parse_time(args: Mapping[str, Sequence[str]], name: str) -> dt.datetime | None:
    raw = single(args, name)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        raise bad(name, "an ISO 8601 time such as 2026-11-26T12:00:00Z") from None
    if value.tzinfo is None:
        raise bad(name, "the time needs a zone (Z or +hh:mm)")
    try:
        return value.astimezone(dt.timezone.utc)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past datetime.max in UTC
        raise bad(name, "a time between years 1 and 9999 in UTC") from None


def parse_bool(args: Mapping[str, Sequence[str]], name: str) -> bool | None:
    raw = single(args, name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise bad(name, "true or false")
    return raw == "true"


def parse_choice(args: Mapping[str, Sequence[str]], name: str, choices: Sequence[str]) -> str | None:
    raw = single(args, name)
    if raw is not None and raw not in choices:
        raise bad(name, f"one of {', '.join(choices)}")
    return raw


def parse_alert_filter(args: Mapping[str, Sequence[str]]) -> AlertFilter:
    severities: tuple[str, ...] | None = None
    if args.get("severity"):
        values = tuple(dict.fromkeys(v for raw in args["severity"] for v in raw.split(",")))
        if not all(v in SEVERITIES for v in values):
            raise bad("severity", f"one or several of {', '.join(SEVERITIES)}")
        severities = values
    since, until = parse_time(args, "since"), parse_time(args, "until")
    if since and until and since >= until:
        raise bad("until", "must be later than since")
    return AlertFilter(severities, since, until, parse_int(args, "afterSeq"), parse_bool(args, "acknowledged"))


def parse_owner(args: Mapping[str, Sequence[str]]) -> str | None:
    raw = single(args, "owner")
    if raw is not None and not (0 < len(raw) <= 128):
        raise bad("owner", "a user id of 1 to 128 characters")
    return raw


# ----------------------------------------------------------------------------- cursors

def encode_cursor(position: dict[str, Any]) -> str:
    """An opaque cursor: the position after the last item of a page (clients must not build them)."""
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def is_time(value: Any) -> bool:
    """An ISO 8601 time with a zone, as cursors carry them."""
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        return dt.datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def is_seq(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_SEQ


def decode_cursor(args: Mapping[str, Sequence[str]], kind: str,
                  fields: Mapping[str, Callable[[Any], bool]]) -> dict[str, Any] | None:
    """The position in `cursor`, each field checked by value; a cursor of another listing is refused.

    Cursors are opaque but not secret: a hand-made one is checked like any other input, so none of
    its values reaches the store unless it is of the right kind and range.
    """
    raw = single(args, "cursor")
    if raw is None:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise bad("cursor", "not a cursor this API gave out") from None
    if not isinstance(position, dict) or position.get("k") != kind:
        raise bad("cursor", "not a cursor of this listing")
    for name, valid in fields.items():
        if not valid(position.get(name)):
            raise bad("cursor", "not a cursor this API gave out")
    return position
