"""The notification channels (`Channel`): each turns one notification into one attempt on its transport,
watchout.webhooks, watchout.mqtt or watchout.webpush, and its result into an `Outcome` (watchout.deliveries
decides what to attempt and what an outcome means)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from watchout import webhooks, webpush
from watchout.mqtt import MqttPublisher, MqttUnavailable
from watchout.settings import Settings
from watchout.store import Store, utcnow

VAPID_KEYS = "vapid-keys"  # the store value holding the Web Push key pair, made once for every node


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result. `gone`: the destination no longer exists at its end (a push subscription that
    answered 404 or 410): the delivery is cancelled and the destination removed."""

    ok: bool
    status: int | None = None
    error: str | None = None
    gone: bool = False


class Channel(Protocol):
    """How a notification reaches one kind of destination. `ordered`: a stream's notifications must arrive in
    order (one attempt at a time per stream)."""

    ordered: bool

    async def send(self, destination: dict[str, Any], message_id: str, body: dict[str, Any]) -> Outcome:
        """One attempt; never raises for the receiver's failures (they are an Outcome)."""

    async def start(self) -> None:
        """Connect, for a channel that keeps a connection."""

    async def close(self) -> None:
        """Disconnect; attempts after it fail."""

    def stream_status(self, stream_id: str, status: str) -> None:
        """A stream's status changed (a channel that shows statuses publishes it)."""


class _Stateless:
    """The Channel methods a channel without a connection or statuses has."""

    ordered = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def stream_status(self, stream_id: str, status: str) -> None:
        return None


class WebhookChannel(_Stateless):
    """POSTs the notification, signed per Standard Webhooks with the destination's secrets (the current one
    first; the previous one too while a rotation is recent)."""

    def __init__(self, settings: Settings) -> None:
        self._allow_private = settings.webhook_allow_private
        self._timeout_s = settings.webhook_timeout_s

    async def send(self, destination: dict[str, Any], message_id: str, body: dict[str, Any]) -> Outcome:
        config = destination["config"]
        secrets = config["secrets"]
        until = config.get("previousUntil")
        if until is None or utcnow() >= until:
            secrets = secrets[:1]
        attempt = await webhooks.post(config["url"], orjson.dumps(body), msg_id=message_id, secrets=secrets,
                                      allow_private=self._allow_private, timeout_s=self._timeout_s)
        return Outcome(attempt.ok, attempt.status, attempt.error)


class MqttChannel:
    """Publishes each alert on `<prefix>/alerts/<streamId>` (QoS 1: delivered once the broker acknowledged it);
    the publisher also keeps the streams' retained statuses and Home Assistant discovery documents."""

    ordered = True

    def __init__(self, settings: Settings) -> None:
        self.publisher = MqttPublisher(settings.mqtt_url, settings.mqtt_prefix, node=settings.node_name,
                                       discovery_prefix=settings.mqtt_discovery_prefix)
        self._timeout_s = settings.webhook_timeout_s * 2

    async def start(self) -> None:
        await self.publisher.start()

    async def close(self) -> None:
        await self.publisher.close()

    def stream_status(self, stream_id: str, status: str) -> None:
        self.publisher.set_status(stream_id, status)

    async def send(self, destination: dict[str, Any], message_id: str, body: dict[str, Any]) -> Outcome:
        try:
            await self.publisher.publish_alert(body["data"]["streamId"], orjson.dumps(body), self._timeout_s)
        except MqttUnavailable as exc:
            return Outcome(False, None, f"MQTT broker unavailable: {exc}")
        return Outcome(True)


class WebPushChannel(_Stateless):
    """Encrypts the notification for one browser's push subscription (RFC 8291) and posts it to its push service
    with a VAPID signature (RFC 8292); a subscription the push service answers 404 or 410 to is gone."""

    def __init__(self, settings: Settings, keys: webpush.VapidKeys) -> None:
        self.keys = keys
        self._subject = push_subject(settings)
        self._dashboard_url = settings.base_url + "/dashboard/"
        self._timeout_s = settings.webhook_timeout_s

    async def send(self, destination: dict[str, Any], message_id: str, body: dict[str, Any]) -> Outcome:
        # no image: the snapshot URL needs a bearer token, which a notification cannot carry
        payload = webpush.notification({**body["data"], "snapshotUrl": None}, self._dashboard_url)
        attempt = await webpush.send(destination["config"]["subscription"], payload, self.keys,
                                     subject=self._subject, timeout_s=self._timeout_s)
        return Outcome(attempt.ok, attempt.status, attempt.error, gone=attempt.gone)


def push_subject(settings: Settings) -> str:
    """The VAPID contact push services see: push_subject, else public_url when it is https, else a mailto:."""
    if settings.push_subject:
        return settings.push_subject
    if settings.base_url.startswith("https://"):
        return settings.base_url
    return "mailto:watchout@localhost"


def make_channels(settings: Settings) -> dict[str, Any]:
    """The channels this node delivers through (MQTT only with mqtt_url; Web Push once its keys are known, see
    watchout.deliveries.Deliveries.start)."""
    channels: dict[str, Any] = {"webhook": WebhookChannel(settings)}
    if settings.mqtt_url:
        channels["mqtt"] = MqttChannel(settings)
    return channels


async def web_push_channel(settings: Settings, store: Store) -> WebPushChannel:
    """The Web Push channel with the VAPID key pair every node shares: made by the first node that needs it and
    kept in the store (a browser's subscription is bound to the public key it was made with)."""
    kept = await store.get_value(VAPID_KEYS)
    if kept is None:
        kept = await store.put_value_if_absent(VAPID_KEYS, webpush.VapidKeys.generate().to_json())
    return WebPushChannel(settings, webpush.VapidKeys.from_json(kept))
