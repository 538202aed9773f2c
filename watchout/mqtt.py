"""The MQTT channel of notifications: alerts, stream status and Home Assistant discovery over one broker connection.

Topics (Home Assistant / Frigate convention), `<prefix>` defaulting to `watchout`:

- `<prefix>/available`: `online` (retained) once connected; `offline` (retained) on `close()`, and as the
  connection's last will when it dies without a clean disconnect.
- `<prefix>/alerts/<streamId>`: each alert's JSON, QoS 1, not retained.
- `<prefix>/streams/<streamId>/status`: the stream's latest status, retained.
- `<discovery_prefix>/binary_sensor/<node_id>/streaming/config` and `.../sensor/<node_id>/last_alert/config`:
  Home Assistant MQTT discovery documents (retained), one device per stream.

One background task keeps one connection up and reconnects with `Backoff` after the broker goes away; on
every (re)connect it publishes `online`, then every stream's latest status and discovery documents again, so
that a broker restarted without persistence has them back. Delivery is at least once: an alert whose PUBACK
did not arrive in time raises `MqttUnavailable` and may still reach the broker, so a retry can duplicate it.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import math
import re
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

from watchout import __version__
from watchout.backoff import Backoff
from watchout.errors import ConfigError
from watchout.protocol import is_stream_id

__all__ = ["MqttPublisher", "MqttUnavailable", "MqttUrl", "parse_url"]

log = logging.getLogger("watchout.mqtt")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
ONLINE, OFFLINE = b"online", b"offline"
RECONNECT_BACKOFF = Backoff(base_s=0.5, cap_s=30.0)
HA_STATE_MAX_CHARS = 255  # Home Assistant refuses a longer state
_TOPIC_PREFIX_RE = re.compile(r"[^/+#\x00]+(/[^/+#\x00]+)*")
_NOT_DISCOVERY_ID = re.compile(r"[^A-Za-z0-9_-]")  # Home Assistant's discovery topic allows [a-zA-Z0-9_-]
_NOT_SLUG = re.compile(r"[^a-z0-9]+")
_NOT_ANNOUNCED = object()


class MqttUnavailable(Exception):
    """The broker did not take the message: not connected, the connection was lost, or no PUBACK in time.

    Nothing was dropped silently: the caller still owns the message and may retry it (it may have reached
    the broker anyway when the ack was late, so a retry can deliver it twice).
    """


@dataclass(frozen=True, slots=True)
class MqttUrl:
    """A parsed `mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS) URL."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_url(url: str) -> MqttUrl:
    """Parse a broker URL; default ports 1883 (mqtt) and 8883 (mqtts). Raises ConfigError("mqtt_url", ...).

    User and password may be percent-encoded. The messages never repeat the URL, which may hold a password.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError("mqtt_url", "is not a valid URL (is the port a number from 1 to 65535?)") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError("mqtt_url", "must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError("mqtt_url", "names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("mqtt_url", "takes no path, query or fragment (topics start with the MQTT prefix)")
    if port == 0:
        raise ConfigError("mqtt_url", "port must be from 1 to 65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise ConfigError("mqtt_url", "has a password but no user name")
    return MqttUrl(parts.hostname, port or DEFAULT_PORTS[scheme], scheme == "mqtts", username or None, password)


def _check_topic_prefix(key: str, value: str) -> str:
    if not _TOPIC_PREFIX_RE.fullmatch(value):
        raise ConfigError(key, "must be topic levels separated by '/', without '+', '#' or an empty level")
    return value


def discovery_node_id(stream_id: str) -> str:
    """The `<node_id>` of a stream's discovery topics: `watchout_<streamId>`, in Home Assistant's [a-zA-Z0-9_-].

    Other characters (`.`, `:`) become `_`, and then a short hash of the real id is appended, so that `cam.1`
    and `cam_1` still get distinct discovery topics (one would otherwise replace the other's entities).
    """
    mapped = _NOT_DISCOVERY_ID.sub("_", stream_id)
    if mapped != stream_id:
        mapped += "_" + hashlib.sha1(stream_id.encode()).hexdigest()[:6]
    return f"watchout_{mapped}"


def entity_slug(stream_id: str) -> str:
    """`watchout_<streamId>` as the object part of an entity id (lowercase letters, digits, single `_`)."""
    return "watchout_" + _NOT_SLUG.sub("_", stream_id.lower()).strip("_")


@dataclass(slots=True)
class _Stream:
    status: str
    name: str | None


class MqttPublisher:
    """Publishes alerts and stream status to one MQTT broker; see the module docstring for the topics.

    `start()` starts the connection task; `close()` stops it. `publish_alert` waits for the broker's PUBACK
    and raises `MqttUnavailable` otherwise; `set_status` never blocks nor raises (the status is published
    when connected, and again at every connect). Use from the event loop's thread only.

    `node` names this node in the default client id (`watchout-<node>-<random>`). `backoff` is the reconnect
    schedule; `tls_context` (mqtts only) defaults to `ssl.create_default_context()`.
    """

    def __init__(self, url: str, prefix: str = "watchout", *, node: str, client_id: str | None = None,
                 discovery_prefix: str = "homeassistant", backoff: Backoff = RECONNECT_BACKOFF,
                 keepalive_s: int = 30, tls_context: ssl.SSLContext | None = None) -> None:
        self.url = parse_url(url)
        self.prefix = _check_topic_prefix("mqtt_prefix", prefix)
        self.discovery_prefix = _check_topic_prefix("mqtt_discovery_prefix", discovery_prefix)
        self.node = node
        self.client_id = client_id or f"watchout-{node}-{uuid.uuid4().hex[:8]}"
        self.availability_topic = f"{prefix}/available"
        self.results: collections.Counter[str] = collections.Counter()  # publishes by result: acked, unavailable
        self.connects = 0
        self._backoff = backoff
        self._keepalive_s = keepalive_s
        self._tls_context = tls_context
        self._streams: dict[str, _Stream] = {}
        self._dirty: set[str] = set()  # streams whose status (and maybe discovery) this connection still owes
        self._announced: dict[str, str | None] = {}  # stream -> the name in the discovery documents published
        self._removed: set[str] = set()  # streams whose retained topics still need clearing
        self._wake = asyncio.Event()  # set_status or remove_stream has something for the connection
        self._stop = asyncio.Event()  # close() was called
        self._client: aiomqtt.Client | None = None  # set while connected
        self._lost: asyncio.Future[None] | None = None  # the connection's watcher: done once it is lost
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------------------------------ topics

    def alert_topic(self, stream_id: str) -> str:
        return f"{self.prefix}/alerts/{stream_id}"

    def status_topic(self, stream_id: str) -> str:
        return f"{self.prefix}/streams/{stream_id}/status"

    def discovery_topics(self, stream_id: str) -> tuple[str, str]:
        """The stream's binary_sensor ("streaming") and sensor ("last alert") discovery topics."""
        node_id = discovery_node_id(stream_id)
        return (f"{self.discovery_prefix}/binary_sensor/{node_id}/streaming/config",
                f"{self.discovery_prefix}/sensor/{node_id}/last_alert/config")

    def discovery_documents(self, stream_id: str, name: str | None = None) -> dict[str, dict[str, Any]]:
        """Home Assistant MQTT discovery documents of a stream, by topic (one device, two entities)."""
        unique, slug = f"watchout_{stream_id}", entity_slug(stream_id)
        common: dict[str, Any] = {
            "availability_topic": self.availability_topic,
            "payload_available": ONLINE.decode(),
            "payload_not_available": OFFLINE.decode(),
            "qos": 1,
            "device": {"identifiers": [unique], "name": name or stream_id, "manufacturer": "Watchout",
                       "model": "Camera stream"},
            "origin": {"name": "Watchout", "sw_version": __version__},
        }
        streaming_topic, last_alert_topic = self.discovery_topics(stream_id)
        alert_topic = self.alert_topic(stream_id)
        return {
            streaming_topic: {
                "name": "Streaming",
                "unique_id": f"{unique}_streaming",
                "default_entity_id": f"binary_sensor.{slug}_streaming",
                "state_topic": self.status_topic(stream_id),
                # statuses are online, offline and streaming: only streaming is ON
                "value_template": "{{ 'ON' if value == 'streaming' else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "running",
                "icon": "mdi:cctv",
                **common,
            },
            last_alert_topic: {
                "name": "Last alert",
                "unique_id": f"{unique}_last_alert",
                "default_entity_id": f"sensor.{slug}_last_alert",
                "state_topic": alert_topic,
                "value_template": f"{{{{ value_json.data.message[:{HA_STATE_MAX_CHARS}] }}}}",
                "json_attributes_topic": alert_topic,
                "json_attributes_template": "{{ value_json.data | tojson }}",
                "icon": "mdi:alert",
                **common,
            },
        }

    # ------------------------------------------------------------------------------------------ API

    @property
    def connected(self) -> bool:
        return self._client is not None and self._lost is not None and not self._lost.done()

    async def start(self) -> None:
        """Start the connection task (it connects in the background; `connected` says when it is up)."""
        if self._task is None:
            self._closing = False
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="watchout.mqtt")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Publish `offline` (retained), disconnect cleanly (so no last will) and stop the task."""
        self._closing = True
        self._stop.set()
        client, lost = self._client, self._lost
        if client is not None and lost is not None and not lost.done():
            try:
                await self._publish(client, lost, [(self.availability_topic, OFFLINE)], retain=True,
                                    timeout_s=timeout_s)
            except MqttUnavailable as exc:
                log.warning("mqtt: could not publish offline before closing: %s", exc)
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def publish_alert(self, stream_id: str, payload: bytes, timeout_s: float = 10.0) -> None:
        """Publish an alert's JSON on `<prefix>/alerts/<streamId>` (QoS 1, not retained); return on PUBACK.

        Raises MqttUnavailable when not connected, when the connection is lost first, or when no PUBACK
        arrives within `timeout_s`; ValueError for an invalid stream id. Alerts published one after another
        (or started in that order) reach subscribers in that order.
        """
        if not is_stream_id(stream_id):
            raise ValueError(f"not a stream id: {stream_id!r}")
        client, lost = self._client, self._lost
        try:
            if client is None or lost is None or lost.done():
                raise MqttUnavailable("not connected to the MQTT broker")
            await self._publish(client, lost, [(self.alert_topic(stream_id), payload)], retain=False,
                                timeout_s=timeout_s)
        except MqttUnavailable:
            self.results["unavailable"] += 1
            raise
        self.results["acked"] += 1

    def set_status(self, stream_id: str, status: str, name: str | None = None) -> None:
        """Remember a stream's latest status (and its display name when given) and publish it, retained.

        Published at once when connected, otherwise at the next connect; the first time a stream is seen (or
        its name changes) its discovery documents go first. Never blocks; never raises (a stream id that is
        not one is logged and ignored).
        """
        if not is_stream_id(stream_id) or not isinstance(status, str):
            log.warning("mqtt: status ignored for %r: not a stream id and status", stream_id)
            return
        entry = self._streams.get(stream_id)
        if entry is None:
            self._streams[stream_id] = _Stream(str(status), name)
        else:
            entry.status = str(status)
            if name is not None:
                entry.name = name  # a new name is announced again (see _announce)
        self._removed.discard(stream_id)
        self._dirty.add(stream_id)
        self._wake.set()

    async def remove_stream(self, stream_id: str, timeout_s: float = 10.0) -> None:
        """Forget a stream and clear its retained status and discovery documents (empty retained payloads).

        Raises MqttUnavailable when that could not be confirmed now; the clearing is then retried at each
        connect until the broker acknowledges it (or the stream is seen again).
        """
        if not is_stream_id(stream_id):
            raise ValueError(f"not a stream id: {stream_id!r}")
        self._streams.pop(stream_id, None)
        self._dirty.discard(stream_id)
        self._announced.pop(stream_id, None)
        self._removed.add(stream_id)
        client, lost = self._client, self._lost
        if client is None or lost is None or lost.done():
            raise MqttUnavailable("not connected to the MQTT broker: the stream is cleared at the next connect")
        await self._publish(client, lost, self._clearing(stream_id), retain=True, timeout_s=timeout_s)
        if stream_id not in self._streams:
            self._removed.discard(stream_id)

    # ------------------------------------------------------------------------------------------ internals

    def _clearing(self, stream_id: str) -> list[tuple[str, bytes]]:
        return [(topic, b"") for topic in (self.status_topic(stream_id), *self.discovery_topics(stream_id))]

    async def _publish(self, client: aiomqtt.Client, lost: asyncio.Future[None], messages: list[tuple[str, bytes]],
                       *, retain: bool, timeout_s: float) -> None:
        """Publish at QoS 1, in this order, and wait for every PUBACK; MqttUnavailable if the connection is
        lost first or the acks take longer than `timeout_s`."""
        # Each task calls paho's publish on its first step; tasks start in creation order, so the broker
        # gets the messages in this order, after any publish started before this call.
        tasks = [asyncio.ensure_future(client.publish(topic, payload, qos=1, retain=retain, timeout=math.inf))
                 for topic, payload in messages]
        acked = asyncio.gather(*tasks)
        waiting: set[asyncio.Future[Any]] = {acked, lost}
        try:
            done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            acked.cancel()
            raise
        if acked in done:
            try:
                acked.result()
            except aiomqtt.MqttError as exc:
                raise MqttUnavailable(f"the broker did not take the message: {exc}") from None
            return
        acked.cancel()
        await asyncio.gather(acked, return_exceptions=True)
        if lost.done():
            raise MqttUnavailable("the connection to the MQTT broker was lost before the PUBACK")
        raise MqttUnavailable(f"no PUBACK from the MQTT broker within {timeout_s:g} s")

    def _new_client(self) -> aiomqtt.Client:
        tls_context = None
        if self.url.tls:
            tls_context = self._tls_context or ssl.create_default_context()
        client = aiomqtt.Client(
            self.url.host, self.url.port, username=self.url.username, password=self.url.password,
            identifier=self.client_id, keepalive=self._keepalive_s, timeout=5.0, tls_context=tls_context,
            will=aiomqtt.Will(self.availability_topic, OFFLINE, qos=1, retain=True))
        client.pending_calls_threshold = 10_000  # a burst of alerts in flight is normal, not worth a warning
        return client

    async def _run(self) -> None:
        """Keep one connection up until close(): connect, serve, and after a failure wait per the backoff."""
        attempt = 0
        was_up = True  # so that the first failure is logged as a warning
        while not self._closing:
            try:
                async with self._new_client() as client:
                    attempt, was_up = 0, True
                    self.connects += 1
                    log.info("mqtt: connected to %s:%d as %s", self.url.host, self.url.port, self.client_id)
                    await self._serve(client)
            except (aiomqtt.MqttError, MqttUnavailable) as exc:
                if not self._closing:
                    (log.warning if was_up else log.debug)(
                        "mqtt: broker %s:%d unreachable or lost (%s); retrying", self.url.host, self.url.port, exc)
                    was_up = False
            finally:
                self._client = None
            if self._closing:
                break
            pause = asyncio.ensure_future(self._backoff.sleep(self._backoff.delay_s(attempt)))
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({pause, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                pause.cancel()
                stop.cancel()
            attempt += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: `online`, then every stream's status and discovery, then changes as they come."""
        lost = asyncio.ensure_future(self._until_lost(client))
        self._client, self._lost = client, lost
        self._announced.clear()
        self._dirty = set(self._streams)
        try:
            # close() came while this connection was being made: leave as close() would have
            await self._publish(client, lost, [(self.availability_topic, OFFLINE if self._closing else ONLINE)],
                                retain=True, timeout_s=10.0)
            while not self._closing and not lost.done():
                self._wake.clear()
                await self._flush(client, lost)
                if self._dirty or self._removed or self._closing:
                    continue
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({wake, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
            if lost.done():
                lost.result()  # raises the MqttError that ended the connection
        finally:
            self._client = None
            lost.cancel()
            await asyncio.gather(lost, return_exceptions=True)

    @staticmethod
    async def _until_lost(client: aiomqtt.Client) -> None:
        """Returns (by raising MqttError) when the connection is lost; nothing is subscribed, so no message comes."""
        async for _ in client.messages:
            pass

    async def _flush(self, client: aiomqtt.Client, lost: asyncio.Future[None]) -> None:
        """Publish what this connection owes: clearings of removed streams, discovery and status.

        A failure ends the connection (raised on): the next one publishes every stream again.
        """
        jobs = [self._clear(client, lost, stream_id) for stream_id in list(self._removed)]
        jobs += [self._announce(client, lost, stream_id) for stream_id in list(self._dirty)]
        self._dirty.clear()
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _clear(self, client: aiomqtt.Client, lost: asyncio.Future[None], stream_id: str) -> None:
        if stream_id in self._streams:
            return
        await self._publish(client, lost, self._clearing(stream_id), retain=True, timeout_s=10.0)
        if stream_id not in self._streams:
            self._removed.discard(stream_id)

    async def _announce(self, client: aiomqtt.Client, lost: asyncio.Future[None], stream_id: str) -> None:
        entry = self._streams.get(stream_id)
        if entry is None:
            return
        name = entry.name
        messages: list[tuple[str, bytes]] = []
        if self._announced.get(stream_id, _NOT_ANNOUNCED) != name:
            documents = self.discovery_documents(stream_id, name)
            messages += [(topic, json.dumps(doc).encode()) for topic, doc in documents.items()]
        messages.append((self.status_topic(stream_id), entry.status.encode()))
        await self._publish(client, lost, messages, retain=True, timeout_s=10.0)
        if len(messages) > 1 and stream_id in self._streams:
            self._announced[stream_id] = name
