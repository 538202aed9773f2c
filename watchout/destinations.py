"""The REST API's operations on notification destinations (webhooks) and delivery receipts, with their rules.

A user manages the destinations they made, which hear of their own streams' alerts; an admin manages
every destination, and one an admin makes hears of every stream's alerts. Services make none. What a
caller may not see is reported exactly like what does not exist (NotFound).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from watchout import webhooks, webpush
from watchout.auth import Principal, can_watch
from watchout.errors import Forbidden, InvalidMessage, NotFound
from watchout.protocol import SEVERITIES, check_stream_id
from watchout.queries import check_names, parse_owner
from watchout.resources import delivery_receipt, destination_resource
from watchout.services import Services
from watchout.store import utcnow
from watchout.store.base import is_alert_id, new_id

Args = Mapping[str, Sequence[str]]
MAX_DESTINATIONS_PER_OWNER = 50
MAX_FILTER_STREAMS = 100
MAX_COOLDOWN_S = 86400
MAX_ESCALATE_AFTER_S = 7 * 86400
ROTATION_OVERLAP = dt.timedelta(hours=24)  # the previous secret still signs this long after a rotation
_WEBHOOK_FIELDS = {"url", "streams", "minSeverity", "cooldownS", "escalate", "escalateAfterS"}


def _check_manager(p: Principal) -> None:
    if p.role == "service":
        raise Forbidden("service tokens cannot manage notification destinations")


async def _visible(services: Services, p: Principal, destination_id: str, channel: str) -> dict[str, Any]:
    doc = None if not is_alert_id(destination_id) else await services.store.get_destination(destination_id)
    if doc is None or doc["channel"] != channel or not (p.is_admin or doc["ownerId"] == p.sub):
        raise NotFound(f"{channel} {destination_id[:40]} not found")
    return doc


def _rules(body: Mapping[str, Any]) -> dict[str, Any]:
    """The rules a destination is created with: streams, minSeverity, cooldownS, escalate, escalateAfterS."""
    streams = body.get("streams")
    if streams is not None:
        if not isinstance(streams, list) or not 0 < len(streams) <= MAX_FILTER_STREAMS:
            raise InvalidMessage(f"streams must be a list of 1 to {MAX_FILTER_STREAMS} stream ids (or absent: all)",
                                 code="invalid-field")
        streams = sorted({check_stream_id(s, field="streams[]") for s in streams})
    severity = body.get("minSeverity", "low")
    if severity not in SEVERITIES:
        raise InvalidMessage(f"minSeverity must be one of {', '.join(SEVERITIES)}", code="invalid-field")
    cooldown = body.get("cooldownS", 0)
    if not _is_number(cooldown) or not 0 <= cooldown <= MAX_COOLDOWN_S:
        raise InvalidMessage(f"cooldownS must be a number of seconds from 0 to {MAX_COOLDOWN_S}", code="invalid-field")
    escalate = body.get("escalate", False)
    if not isinstance(escalate, bool):
        raise InvalidMessage("escalate must be true or false", code="invalid-field")
    after = body.get("escalateAfterS")
    if after is not None and (not escalate or not _is_number(after) or not 0 < after <= MAX_ESCALATE_AFTER_S):
        raise InvalidMessage(f"escalateAfterS goes with escalate: true, from 1 to {MAX_ESCALATE_AFTER_S} seconds",
                             code="invalid-field")
    return {"streams": streams, "minSeverity": severity, "cooldownS": cooldown, "escalate": escalate,
            "escalateAfterS": after}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


async def create_webhook(services: Services, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/webhooks: the endpoint and its rules; the answer carries the signing secret, shown only here."""
    _check_manager(p)
    unknown = sorted(set(body) - _WEBHOOK_FIELDS)
    if unknown:
        raise InvalidMessage(f"unknown field {unknown[0]!r}", code="unknown-field")
    url = body.get("url")
    if not isinstance(url, str):
        raise InvalidMessage("url is required: the http:// or https:// address to POST alerts to", code="invalid-url")
    url = webhooks.check_url(url, allow_private=services.settings.webhook_allow_private)
    rules = _rules(body)
    if len(await services.store.list_destinations(p.sub)) >= MAX_DESTINATIONS_PER_OWNER:
        raise InvalidMessage(f"at most {MAX_DESTINATIONS_PER_OWNER} destinations per user", code="too-many")
    secret = webhooks.new_secret()
    doc = {"destinationId": new_id(), "ownerId": p.sub, "channel": "webhook", "createdAt": utcnow(),
           "allStreams": p.is_admin, **rules, "config": {"url": url, "secrets": [secret], "previousUntil": None}}
    await services.store.create_destination(doc)
    services.deliveries.destinations_changed()
    return {**destination_resource(doc), "secret": secret}


async def list_webhooks(services: Services, p: Principal, args: Args) -> dict[str, Any]:
    """GET /api/webhooks: the caller's (an admin: everyone's, or `owner`'s)."""
    _check_manager(p)
    check_names(args, ("owner",))
    owner = parse_owner(args)
    if owner is not None and not p.is_admin:
        raise Forbidden("only admins may list other users' webhooks", code="forbidden")
    docs = await services.store.list_destinations(owner if p.is_admin else p.sub, "webhook")
    return {"items": [destination_resource(d) for d in docs], "nextCursor": None}


async def get_webhook(services: Services, p: Principal, destination_id: str) -> dict[str, Any]:
    _check_manager(p)
    return destination_resource(await _visible(services, p, destination_id, "webhook"))


async def delete_webhook(services: Services, p: Principal, destination_id: str) -> None:
    """DELETE /api/webhooks/{id}: its pending deliveries are cancelled; their receipts stay."""
    _check_manager(p)
    await _visible(services, p, destination_id, "webhook")
    await services.store.delete_destination(destination_id)
    services.deliveries.destinations_changed()


async def test_webhook(services: Services, p: Principal, destination_id: str) -> dict[str, Any]:
    """POST /api/webhooks/{id}/test: one signed test notification now; the receiver's answer."""
    _check_manager(p)
    doc = await _visible(services, p, destination_id, "webhook")
    outcome = await services.deliveries.send_test(doc)
    return {"ok": outcome.ok, "status": outcome.status, "error": outcome.error}


async def rotate_webhook_secret(services: Services, p: Principal, destination_id: str) -> dict[str, Any]:
    """POST /api/webhooks/{id}/rotate-secret: a new secret, shown only here; for 24 h deliveries carry a
    signature with the previous one too (Standard Webhooks' rotation), so receivers can switch in time."""
    _check_manager(p)
    doc = await _visible(services, p, destination_id, "webhook")
    secret = webhooks.new_secret()
    until = utcnow() + ROTATION_OVERLAP
    config = {**doc["config"], "secrets": [secret, doc["config"]["secrets"][0]], "previousUntil": until}
    updated = await services.store.update_destination(destination_id, {"config": config})
    if updated is None:  # pragma: no cover - deleted between the two calls
        raise NotFound(f"webhook {destination_id} not found")
    services.deliveries.destinations_changed()
    return {**destination_resource(updated), "secret": secret,
            "previousSecretValidUntil": until.isoformat(timespec="milliseconds").replace("+00:00", "Z")}


async def alert_deliveries(services: Services, p: Principal, alert_id: str) -> dict[str, Any]:
    """GET /api/alerts/{id}/deliveries: per destination, its state, attempts and when it was delivered."""
    doc = await services.store.get_alert(alert_id)
    if doc is None or not can_watch(p, doc["streamId"], doc["ownerId"]):
        raise NotFound(f"alert {alert_id[:40]} not found")
    receipts = await services.store.deliveries_of_alert(alert_id)
    return {"items": [delivery_receipt(r) for r in receipts], "nextCursor": None}


# ----------------------------------------------------------------------------- Web Push

async def push_public_key(services: Services, p: Principal) -> dict[str, Any]:
    """GET /api/push/public-key: the VAPID public key browsers subscribe with (applicationServerKey)."""
    _check_manager(p)
    channel = await services.deliveries.web_push()
    return {"publicKey": channel.keys.public_key_b64}


async def subscribe_push(services: Services, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/push/subscriptions: a browser's PushSubscription, for the caller's alerts (an admin's: every
    stream's). One destination per endpoint: a browser signed in again by someone else now notifies them."""
    _check_manager(p)
    subscription = webpush.check_subscription(body, allow_private=services.settings.webhook_allow_private)
    existing = await _push_destination(services, subscription["endpoint"])
    if existing is not None:
        await services.store.delete_destination(existing["destinationId"])
    elif len(await services.store.list_destinations(p.sub)) >= MAX_DESTINATIONS_PER_OWNER:
        raise InvalidMessage(f"at most {MAX_DESTINATIONS_PER_OWNER} destinations per user", code="too-many")
    doc = {"destinationId": new_id(), "ownerId": p.sub, "channel": "webpush", "createdAt": utcnow(),
           "allStreams": p.is_admin, "streams": None, "minSeverity": "low", "cooldownS": 0, "escalate": False,
           "escalateAfterS": None, "config": {"endpoint": subscription["endpoint"], "subscription": subscription}}
    await services.store.create_destination(doc)
    services.deliveries.destinations_changed()
    return destination_resource(doc)


async def unsubscribe_push(services: Services, p: Principal, body: dict[str, Any]) -> None:
    """DELETE /api/push/subscriptions {endpoint}: the caller's browser stops being notified."""
    _check_manager(p)
    unknown = sorted(set(body) - {"endpoint"})
    if unknown or not isinstance(body.get("endpoint"), str):
        raise InvalidMessage("send {\"endpoint\": <the subscription's endpoint>}", code="invalid-subscription")
    existing = await _push_destination(services, body["endpoint"])
    if existing is None or not (p.is_admin or existing["ownerId"] == p.sub):
        raise NotFound("no such push subscription")
    await services.store.delete_destination(existing["destinationId"])
    services.deliveries.destinations_changed()


async def _push_destination(services: Services, endpoint: str) -> dict[str, Any] | None:
    for doc in await services.store.list_destinations(None, "webpush"):
        if doc["config"]["endpoint"] == endpoint:
            return doc
    return None
