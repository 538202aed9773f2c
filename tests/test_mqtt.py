"""The MQTT channel on a real Mosquitto: alert order and acks, retained status, availability and last will,
the broker going away and coming back, and Home Assistant discovery documents checked against HA's schema."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest
import tornado.httpclient
import tornado.testing

from conftest import OwnService, require_services
from watchout.backoff import Backoff
from watchout.errors import ConfigError
from watchout.mqtt import MqttPublisher, MqttUnavailable, MqttUrl, discovery_node_id, parse_url

BROKER_HOST, BROKER_PORT = "127.0.0.1", 1883
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
FAST = Backoff(base_s=0.05, cap_s=0.3)


def skip_or_fail(reason: str) -> None:
    if require_services():
        pytest.fail(f"{reason} (WATCHOUT_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


async def broker_answers(port: int = BROKER_PORT) -> bool:
    try:
        async with aiomqtt.Client(BROKER_HOST, port, timeout=2.0):
            return True
    except aiomqtt.MqttError:
        return False


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _payload(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, (bytes, bytearray)), message.payload
    return bytes(message.payload)


class Subscriber:
    """A real MQTT client subscribed at QoS 1, keeping every message it receives."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[aiomqtt.Message] = []
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            self.messages.append(message)

    def on(self, topic: str) -> list[aiomqtt.Message]:
        return [m for m in self.messages if m.topic.value == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [_payload(m) for m in self.on(topic)]

    async def wait_for(self, topic: str, payload: bytes, timeout: float = 5.0) -> aiomqtt.Message:
        await eventually(lambda: payload in self.payloads(topic), timeout, f"{payload!r} on {topic}")
        return [m for m in self.on(topic) if _payload(m) == payload][-1]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def subscriber(*topics: str, port: int = BROKER_PORT) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(BROKER_HOST, port) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        sub = Subscriber(client)
        try:
            yield sub
        finally:
            await sub.close()


async def retained(topic_filter: str, port: int = BROKER_PORT, quiet_s: float = 0.3) -> dict[str, bytes]:
    """What a client connecting now gets as retained messages under `topic_filter`."""
    async with subscriber(topic_filter, port=port) as sub:
        await asyncio.sleep(quiet_s)
        return {m.topic.value: _payload(m) for m in sub.messages if m.retain}


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A topic prefix of this test's own on the shared broker; its retained messages are cleared afterwards."""
    if not await broker_answers():
        skip_or_fail(f"no MQTT broker answers on {BROKER_HOST}:{BROKER_PORT}")
    name = f"wo-test-{uuid.uuid4().hex[:12]}"
    yield name
    leftovers = await retained(f"{name}/#", quiet_s=0.2)
    if leftovers:
        async with aiomqtt.Client(BROKER_HOST, BROKER_PORT) as client:
            for topic in leftovers:
                await client.publish(topic, b"", qos=1, retain=True)


@pytest.fixture
async def publisher(prefix: str) -> AsyncIterator[Callable[..., Any]]:
    """Make a started MqttPublisher under the test's prefix (discovery under `<prefix>/homeassistant`)."""
    made: list[MqttPublisher] = []

    async def make(url: str = f"mqtt://{BROKER_HOST}:{BROKER_PORT}", wait: bool = True) -> MqttPublisher:
        pub = MqttPublisher(url, prefix, node=f"test{len(made)}", discovery_prefix=f"{prefix}/homeassistant",
                            backoff=FAST)
        made.append(pub)
        await pub.start()
        if wait:
            await eventually(lambda: pub.connected, what="the publisher to connect")
        return pub

    yield make
    for pub in made:
        await pub.close()


class OwnMosquitto(OwnService):
    """A mosquitto of this test's own (no persistence), to stop and start again on the same port."""

    @property
    def url(self) -> str:
        return f"mqtt://{BROKER_HOST}:{self.port}"

    def command(self) -> list[str]:
        return [MOSQUITTO, "-p", str(self.port)]

    async def answers(self) -> bool:
        return await broker_answers(self.port)


@pytest.fixture
async def own_mosquitto(prefix: str) -> AsyncIterator[OwnMosquitto]:
    if not os.access(MOSQUITTO, os.X_OK):
        skip_or_fail(f"{MOSQUITTO} is not installed")
    broker = OwnMosquitto()
    await broker.start()
    yield broker
    broker.stop()


class CuttableProxy:
    """A TCP relay to the broker whose connections the test can kill at once (no MQTT DISCONNECT is sent)."""

    def __init__(self) -> None:
        self.transports: list[asyncio.WriteTransport] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, BROKER_HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(BROKER_HOST, BROKER_PORT)
        self.transports += [writer.transport, upstream_writer.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        for transport in self.transports:
            transport.abort()  # a reset, as when a node's network or process dies
        self.transports.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# ----------------------------------------------------------------------------- Home Assistant's schema
# Derived from Home Assistant's documentation of MQTT discovery for the two entity kinds published here
# (home-assistant.io source/_integrations/binary_sensor.mqtt.markdown and sensor.mqtt.markdown, 2025.10+, which
# document `default_entity_id` in place of the deprecated `object_id`) and from home-assistant/core
# homeassistant/components/mqtt: schemas.py (MQTT_AVAILABILITY_SCHEMA: `availability` and `availability_topic`
# are exclusive; MQTT_ENTITY_DEVICE_INFO_SCHEMA: the device keys, at least one identifier or connection;
# MQTT_ORIGIN_INFO_SCHEMA: `name` required) and discovery.py (TOPIC_MATCHER for the discovery topic).

STR, BOOL, INT, LIST, DICT = (str,), (bool,), (int,), (list,), (dict,)
COMMON_KEYS: dict[str, tuple[type, ...]] = {
    "availability": LIST, "availability_mode": STR, "availability_template": STR, "availability_topic": STR,
    "default_entity_id": STR, "device": DICT, "enabled_by_default": BOOL, "encoding": STR,
    "entity_category": STR, "entity_picture": STR, "expire_after": INT, "force_update": BOOL, "icon": STR,
    "json_attributes_template": STR, "json_attributes_topic": STR, "name": (str, type(None)),
    "object_id": STR, "origin": DICT, "payload_available": STR, "payload_not_available": STR, "qos": INT,
    "state_topic": STR, "unique_id": STR, "value_template": STR, "device_class": (str, type(None)),
}
ENTITY_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "binary_sensor": {**COMMON_KEYS, "off_delay": INT, "payload_off": STR, "payload_on": STR},
    "sensor": {**COMMON_KEYS, "last_reset_value_template": STR, "options": LIST, "state_class": STR,
               "suggested_display_precision": INT, "unit_of_measurement": (str, type(None))},
}
REQUIRED_KEYS = {"state_topic"}
DEVICE_KEYS: dict[str, tuple[type, ...]] = {
    "configuration_url": STR, "connections": LIST, "hw_version": STR, "identifiers": (str, list),
    "manufacturer": STR, "model": STR, "model_id": STR, "name": STR, "serial_number": STR,
    "suggested_area": STR, "sw_version": STR, "via_device": STR,
}
ORIGIN_KEYS: dict[str, tuple[type, ...]] = {"name": STR, "sw_version": STR, "support_url": STR}
AVAILABILITY_ITEM_KEYS: dict[str, tuple[type, ...]] = {
    "topic": STR, "payload_available": STR, "payload_not_available": STR, "value_template": STR}
BINARY_SENSOR_DEVICE_CLASSES = {
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas",
    "heat", "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence",
    "problem", "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window"}
DISCOVERY_TOPIC = re.compile(  # discovery.py TOPIC_MATCHER, after the discovery prefix
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")
ENTITY_ID = re.compile(r"(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)")  # cv.entity_id (valid_entity_id)


def _check_keys(where: str, doc: dict[str, Any], allowed: dict[str, tuple[type, ...]]) -> list[str]:
    problems = [f"{where}: unknown key {key!r}" for key in doc if key not in allowed]
    for key, value in doc.items():
        types = allowed.get(key)
        if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            problems.append(f"{where}: {key} is {type(value).__name__}, not {'/'.join(t.__name__ for t in types)}")
    return problems


def _is_topic(value: Any) -> bool:
    return isinstance(value, str) and value != "" and "\x00" not in value and all(
        level in ("+", "#") or ("+" not in level and "#" not in level) for level in value.split("/"))


def ha_discovery_problems(discovery_prefix: str, topic: str, doc: Any) -> list[str]:
    """Why Home Assistant would refuse (or misread) this discovery document; [] when it validates."""
    if not topic.startswith(discovery_prefix + "/") or not (
            match := DISCOVERY_TOPIC.fullmatch(topic[len(discovery_prefix) + 1:])):
        return [f"{topic}: not a discovery topic (<prefix>/<component>/[<node_id>/]<object_id>/config)"]
    component = match["component"]
    if component not in ENTITY_KEYS or not isinstance(doc, dict):
        return [f"{topic}: component {component!r} / document type not checked here"]
    problems = _check_keys(component, doc, ENTITY_KEYS[component])
    problems += [f"{component}: {key} is required" for key in REQUIRED_KEYS if key not in doc]
    for key in ("state_topic", "json_attributes_topic", "availability_topic"):
        if key in doc and not _is_topic(doc[key]):
            problems.append(f"{component}: {key} {doc[key]!r} is not a valid topic")
    if "availability" in doc and "availability_topic" in doc:
        problems.append(f"{component}: availability and availability_topic are exclusive")
    for item in doc.get("availability") or []:
        problems += _check_keys(f"{component}.availability[]", item, AVAILABILITY_ITEM_KEYS)
        if "topic" not in item:
            problems.append(f"{component}.availability[]: topic is required")
    if doc.get("availability_mode", "latest") not in ("all", "any", "latest"):
        problems.append(f"{component}: availability_mode must be all, any or latest")
    if not 0 <= doc.get("qos", 0) <= 2:
        problems.append(f"{component}: qos must be 0, 1 or 2")
    if "icon" in doc and ":" not in doc["icon"]:
        problems.append(f"{component}: icon must be like mdi:name")
    if "default_entity_id" in doc:
        entity_id = doc["default_entity_id"]
        if not ENTITY_ID.fullmatch(entity_id) or entity_id.split(".")[0] != component:
            problems.append(f"{component}: default_entity_id {entity_id!r} is not a {component}.<slug> entity id")
    if component == "binary_sensor" and doc.get("device_class") not in BINARY_SENSOR_DEVICE_CLASSES | {None}:
        problems.append(f"binary_sensor: unknown device_class {doc['device_class']!r}")
    if component == "sensor" and "options" in doc and doc.get("device_class") != "enum":
        problems.append("sensor: options need device_class enum")
    device = doc.get("device")
    if device is not None:
        problems += _check_keys(f"{component}.device", device, DEVICE_KEYS)
        if not device.get("identifiers") and not device.get("connections"):
            problems.append(f"{component}.device: needs identifiers or connections")
        if "unique_id" not in doc:
            problems.append(f"{component}: a device only works with a unique_id")
    origin = doc.get("origin")
    if origin is not None:
        problems += _check_keys(f"{component}.origin", origin, ORIGIN_KEYS)
        if "name" not in origin:
            problems.append(f"{component}.origin: name is required")
    return problems


def alert_payload(stream_id: str, n: int, message: str = "Suspicious person") -> bytes:
    return json.dumps({"type": "alert", "timestamp": "2026-01-01T00:00:00Z",
                       "data": {"alertId": f"a{n}", "streamId": stream_id, "severity": "high",
                                "message": message, "metadata": {"n": n}, "timestamp": 1764150000000 + n,
                                "receivedAt": 1764150000100 + n, "snapshotUrl": None}}).encode()


# ----------------------------------------------------------------------------- tests


def test_parse_url_accepts_mqtt_and_mqtts_and_names_the_key_when_bad() -> None:
    assert parse_url("mqtt://broker.lan") == MqttUrl("broker.lan", 1883, False)
    assert parse_url("mqtts://broker.lan") == MqttUrl("broker.lan", 8883, True)
    assert parse_url("MQTT://u%40x:p%3Aw@10.0.0.2:1884/") == MqttUrl("10.0.0.2", 1884, False, "u@x", "p:w")
    assert parse_url("mqtt://user@[::1]:1999") == MqttUrl("::1", 1999, False, "user", None)
    for bad in ("http://broker", "mqtt://", "mqtt://:1883", "mqtt://h:99999", "mqtt://h:x", "mqtt://h:0",
                "mqtt://h/topic", "mqtt://h?x=1", "mqtt://:secret@h", "broker:1883", ""):
        with pytest.raises(ConfigError) as info:
            parse_url(bad)
        assert info.value.key == "mqtt_url"
        assert "secret" not in str(info.value)
    with pytest.raises(ConfigError):
        MqttPublisher("mqtt://h", "bad/+/prefix", node="n")


async def test_publish_alert_raises_unavailable_when_not_connected() -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()  # nothing listens there
    pub = MqttPublisher(f"mqtt://127.0.0.1:{port}", "wo-test-none", node="n", backoff=FAST)
    with pytest.raises(MqttUnavailable):
        await pub.publish_alert("cam1", b"{}")  # not started
    await pub.start()
    await asyncio.sleep(0.2)
    assert not pub.connected
    with pytest.raises(MqttUnavailable):
        await pub.publish_alert("cam1", b"{}")
    pub.set_status("cam1", "online")  # never raises, never blocks
    pub.set_status("no/such+stream", "online")
    assert pub.results["unavailable"] == 2
    await pub.close()


async def test_alerts_arrive_acked_and_in_order(prefix: str, publisher: Callable[..., Any]) -> None:
    pub: MqttPublisher = await publisher()
    topic = pub.alert_topic("porch.cam:1")
    async with subscriber(topic) as sub:
        # 200 alerts started back to back (each returns on its PUBACK), then 20 awaited one after another
        await asyncio.gather(*(pub.publish_alert("porch.cam:1", alert_payload("porch.cam:1", n)) for n in range(200)))
        for n in range(200, 220):
            await pub.publish_alert("porch.cam:1", alert_payload("porch.cam:1", n))
        await eventually(lambda: len(sub.on(topic)) >= 220, what="220 alerts")
        received = [json.loads(p)["data"]["metadata"]["n"] for p in sub.payloads(topic)]
    assert received == list(range(220))
    assert not any(m.retain for m in sub.on(topic))
    assert pub.results["acked"] == 220
    assert topic == f"{prefix}/alerts/porch.cam:1"


async def test_status_is_retained_for_a_subscriber_that_comes_later(
        prefix: str, publisher: Callable[..., Any]) -> None:
    pub: MqttPublisher = await publisher()
    pub.set_status("cam1", "online")
    pub.set_status("cam1", "streaming")  # the latest wins
    topic = f"{prefix}/streams/cam1/status"
    assert pub.status_topic("cam1") == topic
    await eventually(lambda: _retained_equals(topic, b"streaming"), what="the retained status")
    async with subscriber(topic) as late:
        message = await late.wait_for(topic, b"streaming")
        assert message.retain
        pub.set_status("cam1", "offline")
        live = await late.wait_for(topic, b"offline")
    assert late.payloads(topic) == [b"streaming", b"offline"]
    assert not live.retain  # a live subscriber gets it as it happens; a later one as retained
    assert (await retained(topic))[topic] == b"offline"


async def _retained_equals(topic: str, payload: bytes) -> bool:
    return (await retained(topic, quiet_s=0.1)).get(topic) == payload


async def test_online_while_running_and_last_will_when_the_connection_dies(prefix: str,
                                                                           publisher: Callable[..., Any]) -> None:
    proxy = CuttableProxy()
    await proxy.start()
    try:
        async with subscriber(f"{prefix}/available", f"{prefix}/streams/#") as sub:
            pub: MqttPublisher = await publisher(f"mqtt://{BROKER_HOST}:{proxy.port}")
            pub.set_status("cam1", "streaming")
            await sub.wait_for(f"{prefix}/available", b"online")
            await sub.wait_for(f"{prefix}/streams/cam1/status", b"streaming")
            proxy.cut()  # no DISCONNECT reaches the broker: it publishes the last will
            await sub.wait_for(f"{prefix}/available", b"offline")
            # the proxy still listens: the publisher reconnects by itself and says so
            await eventually(lambda: sub.payloads(f"{prefix}/available") == [b"online", b"offline", b"online"],
                             what="online again after the reconnect")
            await eventually(lambda: sub.payloads(f"{prefix}/streams/cam1/status") == [b"streaming"] * 2,
                             what="the status published again after the reconnect")
            assert pub.connects == 2
            await pub.close()
            await sub.wait_for(f"{prefix}/available", b"offline")
        assert (await retained(f"{prefix}/available"))[f"{prefix}/available"] == b"offline"
    finally:
        await proxy.close()


async def test_clean_close_leaves_offline_retained(prefix: str, publisher: Callable[..., Any]) -> None:
    pub: MqttPublisher = await publisher()
    await eventually(lambda: _retained_equals(f"{prefix}/available", b"online"), what="online")
    await pub.close()
    assert not pub.connected
    assert (await retained(f"{prefix}/available"))[f"{prefix}/available"] == b"offline"


async def test_broker_restart_unavailable_then_reconnects_and_republishes(
        prefix: str, publisher: Callable[..., Any], own_mosquitto: OwnMosquitto) -> None:
    pub: MqttPublisher = await publisher(own_mosquitto.url)
    pub.set_status("yard.cam", "streaming", name="Yard")
    pub.set_status("gate", "offline")  # not changed while the broker is away
    everything = f"{prefix}/#"
    await eventually(lambda: _has_all(own_mosquitto.port, everything, 7), what="statuses, discovery, online")

    own_mosquitto.stop()
    await eventually(lambda: not pub.connected, what="the publisher to notice the broker is gone")
    with pytest.raises(MqttUnavailable):
        await pub.publish_alert("yard.cam", alert_payload("yard.cam", 1))
    pub.set_status("yard.cam", "online")  # while away: published at the next connect

    await own_mosquitto.start()  # the same port, nothing retained (no persistence)
    await eventually(lambda: pub.connected, timeout=5.0, what="the publisher to reconnect by itself")
    state = await eventually(lambda: _has_all(own_mosquitto.port, everything, 7), what="everything again")
    assert state[f"{prefix}/available"] == b"online"
    assert state[f"{prefix}/streams/yard.cam/status"] == b"online"
    assert state[f"{prefix}/streams/gate/status"] == b"offline"
    for stream_id, name in (("yard.cam", "Yard"), ("gate", "gate")):
        for topic in pub.discovery_topics(stream_id):
            doc = json.loads(state[topic])
            assert ha_discovery_problems(f"{prefix}/homeassistant", topic, doc) == []
            assert doc["device"]["name"] == name

    topic = pub.alert_topic("yard.cam")
    async with subscriber(topic, port=own_mosquitto.port) as sub:
        await pub.publish_alert("yard.cam", alert_payload("yard.cam", 2))
        await sub.wait_for(topic, alert_payload("yard.cam", 2))
    assert pub.connects == 2
    await pub.close()


async def _has_all(port: int, topic_filter: str, count: int) -> dict[str, bytes] | None:
    state = await retained(topic_filter, port=port, quiet_s=0.1)
    return state if len(state) >= count else None


async def test_discovery_documents_validate_against_home_assistant_schema(prefix: str,
                                                                          publisher: Callable[..., Any]) -> None:
    pub: MqttPublisher = await publisher()
    discovery = f"{prefix}/homeassistant"
    pub.set_status("front.door:1", "streaming", name="Front door")
    pub.set_status("garage", "online")
    state = await eventually(lambda: _has_all(BROKER_PORT, f"{discovery}/#", 4), what="4 discovery documents")
    assert set(state) == {*pub.discovery_topics("front.door:1"), *pub.discovery_topics("garage")}
    for topic, raw in state.items():
        assert ha_discovery_problems(discovery, topic, json.loads(raw)) == [], topic

    streaming_topic, last_alert_topic = pub.discovery_topics("front.door:1")
    node_id = discovery_node_id("front.door:1")
    assert re.fullmatch(r"watchout_front_door_1_[0-9a-f]{6}", node_id)  # `.`/`:` mapped, then a hash of the id
    assert streaming_topic == f"{discovery}/binary_sensor/{node_id}/streaming/config"
    assert last_alert_topic == f"{discovery}/sensor/{node_id}/last_alert/config"
    assert pub.discovery_topics("garage")[0] == f"{discovery}/binary_sensor/watchout_garage/streaming/config"
    assert discovery_node_id("front.door:1") != discovery_node_id("front_door_1")

    streaming, last_alert = json.loads(state[streaming_topic]), json.loads(state[last_alert_topic])
    device = {"identifiers": ["watchout_front.door:1"], "name": "Front door", "manufacturer": "Watchout",
              "model": "Camera stream"}
    assert streaming["device"] == last_alert["device"] == device
    assert json.loads(state[pub.discovery_topics("garage")[0]])["device"]["name"] == "garage"
    availability = {"availability_topic": f"{prefix}/available", "payload_available": "online",
                    "payload_not_available": "offline"}
    assert availability.items() <= streaming.items() and availability.items() <= last_alert.items()
    assert streaming["state_topic"] == f"{prefix}/streams/front.door:1/status"
    assert streaming["value_template"] == "{{ 'ON' if value == 'streaming' else 'OFF' }}"
    assert (streaming["payload_on"], streaming["payload_off"]) == ("ON", "OFF")
    assert streaming["unique_id"] == "watchout_front.door:1_streaming"
    assert streaming["default_entity_id"] == "binary_sensor.watchout_front_door_1_streaming"
    assert last_alert["state_topic"] == last_alert["json_attributes_topic"] == f"{prefix}/alerts/front.door:1"
    assert last_alert["value_template"] == "{{ value_json.data.message[:255] }}"
    assert last_alert["json_attributes_template"] == "{{ value_json.data | tojson }}"
    assert last_alert["icon"] == "mdi:alert"
    assert last_alert["default_entity_id"] == "sensor.watchout_front_door_1_last_alert"
    assert streaming["unique_id"] != last_alert["unique_id"]

    # the validator does refuse what Home Assistant refuses
    assert ha_discovery_problems(discovery, streaming_topic, {**streaming, "state_topci": "x"})
    assert ha_discovery_problems(discovery, streaming_topic, {k: v for k, v in streaming.items() if k != "state_topic"})
    assert ha_discovery_problems(discovery, streaming_topic, {**streaming, "device": {"name": "no identifiers"}})
    assert ha_discovery_problems(discovery, streaming_topic, {**streaming, "default_entity_id": "sensor.x"})
    assert ha_discovery_problems(discovery, streaming_topic, {**streaming, "availability": [{"topic": "a"}]})
    assert ha_discovery_problems(discovery, f"{discovery}/sensor/cam.1/last_alert/config", last_alert)

    pub.set_status("garage", "streaming", name="Garage")  # a new name: the documents are published again
    await eventually(lambda: _device_named(pub.discovery_topics("garage")[0], "Garage"), what="the new name")


async def _device_named(topic: str, name: str) -> bool:
    raw = (await retained(topic, quiet_s=0.1)).get(topic)
    return raw is not None and json.loads(raw)["device"]["name"] == name


async def test_remove_stream_clears_its_retained_status_and_discovery(
        prefix: str, publisher: Callable[..., Any]) -> None:
    pub: MqttPublisher = await publisher()
    pub.set_status("cam.a", "streaming")
    pub.set_status("cam.b", "online")
    await eventually(lambda: _has_all(BROKER_PORT, f"{prefix}/#", 7), what="2 statuses, 4 documents, online")
    await pub.remove_stream("cam.a")
    state = await retained(f"{prefix}/#")
    assert not any("cam.a" in topic or discovery_node_id("cam.a") in topic for topic in state)
    assert f"{prefix}/streams/cam.b/status" in state
    assert len(state) == 4
    # a removal the broker could not confirm is done at the next connect
    await pub.close()
    with pytest.raises(MqttUnavailable):
        await pub.remove_stream("cam.b")
    await pub.start()
    await eventually(lambda: pub.connected, what="the publisher to connect again")
    await eventually(lambda: _only_available(prefix), what="cam.b cleared at the reconnect")


async def _only_available(prefix: str) -> bool:
    return set(await retained(f"{prefix}/#", quiet_s=0.1)) == {f"{prefix}/available"}


# ----------------------------------------------------------------------------- through the service

@contextlib.asynccontextmanager
async def mqtt_service(settings: Any, url: str, prefix: str) -> AsyncIterator[Any]:
    """The real service with notifications over MQTT under the test's prefix."""
    from conftest import replace_settings, start_server
    server, close = await start_server(replace_settings(
        settings, mqtt_url=url, mqtt_prefix=prefix, mqtt_discovery_prefix=f"{prefix}/homeassistant",
        delivery_retry_base_s=0.05, delivery_retry_cap_s=0.3, webhook_timeout_s=1.0))
    try:
        yield server
    finally:
        await close()


async def _send_alerts(server: Any, token: Callable[..., str], stream: str, count: int, first: int = 0) -> list[Any]:
    import tornado.websocket

    from conftest import Client, alert_message
    ml = Client(await tornado.websocket.websocket_connect(server.ws_url))
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": stream,
                   "token": token("detector", role="service", streams=[stream])})
    await ml.recv_type("subscribed")
    acks = []
    for i in range(first, first + count):
        await ml.send(alert_message(stream, id=f"m{i}", message=f"alert {i}"))
        acks.append(await ml.recv_type("ack"))
    ml.close()
    return acks


async def _phone(server: Any, token: Callable[..., str], stream: str) -> Any:
    import tornado.websocket

    from conftest import Client
    phone = Client(await tornado.websocket.websocket_connect(server.ws_url))
    await phone.send({"type": "register", "clientType": "mobile", "streamId": stream, "token": token("alice")})
    await phone.recv_type("registered")
    return phone


async def test_the_service_publishes_alerts_in_order_the_retained_status_and_discovery(
        settings: Any, token: Callable[..., str], prefix: str) -> None:
    stream = "porch.cam:1"
    async with subscriber(f"{prefix}/#") as sub, \
            mqtt_service(settings, f"mqtt://{BROKER_HOST}:{BROKER_PORT}", prefix) as server:
        phone = await _phone(server, token, stream)
        acks = await _send_alerts(server, token, stream, 40)
        topic = f"{prefix}/alerts/{stream}"
        await eventually(lambda: len(sub.on(topic)) == 40, 10, "40 alerts over MQTT")
        received = [json.loads(_payload(m)) for m in sub.on(topic)]
        assert [r["data"]["seq"] for r in received] == [a["seq"] for a in acks]  # every alert, in order, once
        assert received[0]["type"] == "alert" and received[0]["data"]["alertId"] == acks[0]["alertId"]
        assert all(m.qos == 1 and not m.retain for m in sub.on(topic))
        retained_now = await retained(f"{prefix}/#")
        assert retained_now[f"{prefix}/streams/{stream}/status"] == b"online"
        assert retained_now[f"{prefix}/available"] == b"online"
        documents = {t: json.loads(p) for t, p in retained_now.items() if "/homeassistant/" in t}
        assert len(documents) == 2
        for topic_name, doc in documents.items():
            assert ha_discovery_problems(f"{prefix}/homeassistant", topic_name, doc) == []
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            server.url(f"/api/alerts/{acks[-1]['alertId']}/deliveries"),
            headers={"Authorization": f"Bearer {token('alice')}"})
        (receipt,) = json.loads(response.body)["items"]
        assert (receipt["channel"], receipt["state"], receipt["attempts"]) == ("mqtt", "delivered", 1)
        phone.close()
        await eventually(lambda: _retained_equals(f"{prefix}/streams/{stream}/status", b"offline"), 5,
                         "the status offline once the phone left")


async def test_alerts_stored_while_the_broker_is_away_arrive_in_order_when_it_is_back(
        settings: Any, token: Callable[..., str], prefix: str, own_mosquitto: OwnMosquitto) -> None:
    stream = "porch"
    async with mqtt_service(settings, own_mosquitto.url, prefix) as server:
        await eventually(lambda: _has_all(own_mosquitto.port, f"{prefix}/available", 1), 5, "the service online")
        phone = await _phone(server, token, stream)
        before = await _send_alerts(server, token, stream, 5)
        await eventually(lambda: _delivered(server, token, before[-1]["alertId"]), 5, "the first alerts delivered")
        own_mosquitto.stop()
        during = await _send_alerts(server, token, stream, 15, first=5)  # stored and acked: the broker is away
        await asyncio.sleep(0.5)
        await own_mosquitto.start()
        topic = f"{prefix}/alerts/{stream}"
        async with subscriber(topic, port=own_mosquitto.port) as sub:
            await eventually(lambda: len(sub.on(topic)) >= 15, 15, "the alerts stored while the broker was away")
            await asyncio.sleep(0.3)
            seqs = [json.loads(_payload(m))["data"]["seq"] for m in sub.on(topic)]
        assert seqs == [a["seq"] for a in during]  # none lost, none twice, in order
        assert all(a["seq"] < during[0]["seq"] for a in before)
        phone.close()


async def _delivered(server: Any, token: Callable[..., str], alert_id: str) -> bool:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        server.url(f"/api/alerts/{alert_id}/deliveries"), headers={"Authorization": f"Bearer {token('alice')}"})
    return [d["state"] for d in json.loads(response.body)["items"]] == ["delivered"]
