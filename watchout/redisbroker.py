"""RedisBroker: nodes share frames, alerts and events over Redis pub/sub (redis-py asyncio).

Per stream two channels: `<prefix>s:<id>` (alerts, status, acknowledgements, producer claims,
closes) which a node listens to while it has any participant of the stream, and `<prefix>v:<id>`
(binary frames) while it has video watchers. A node publishes frames only while another node
listens (PUBLISH answers how many do; when none does it asks again once a second).

Nothing here awaits on a client's path: publishing appends to a queue that one task writes in
pipelines. With Redis unreachable, local delivery goes on, frames for other nodes are dropped,
and the node retries with backoff; once back it re-subscribes, tells the other nodes which alert
batches and status they missed (they read the alerts from the store), and catches up itself.

Keys: `<prefix>producer:<id>` = "<claimed at ms>|<node>|<connection>" (the producer lease, renewed each heartbeat),
`<prefix>node:<node>` (a node's figures, expiring after 3 heartbeats) and the set `<prefix>nodes`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from watchout.backoff import Backoff
from watchout.broker import (ALERTS, CLOSE, FRAME, INTEREST, PRODUCER, STATUS, WATCHERS, AlertItems, Sink,
                             envelope, open_envelope, pack_alerts, pack_close, unpack_alerts, unpack_close)
from watchout.frames import Frame

log = logging.getLogger("watchout.broker")
MAX_QUEUED_FRAMES = 64  # while this many frames wait for Redis, further frames are not sent to other nodes
QUIET_RECHECK_S = 1.0  # how long a stream's frames stay unpublished after PUBLISH found no other node
PIPELINE = 256
RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)  # full jitter: the nodes of a cluster do not retry in step

# A producer lease is "<claimed at, ms>|<node>|<connection>". Renewing keeps it, takes it when it lapsed
# or holds an older claim (2: tell its node), and gives up (0) to a newer claim: newer wins, also when
# two nodes accepted a producer each while Redis was away.
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
local theirs = tonumber(string.match(v, '^(%d+)|')) or 0
local mine = tonumber(string.match(ARGV[1], '^(%d+)|')) or 0
if mine > theirs then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisBroker:
    is_shared = True

    def __init__(self, url: str, prefix: str, node_id: str, heartbeat_s: float) -> None:
        self.node_id = node_id
        self._url = url
        self._prefix = prefix
        self._node = node_id.encode()
        self._heartbeat_s = heartbeat_s
        self._ttl_ms = int(heartbeat_s * 3000)
        self._sink: Sink | None = None
        self._redis: redis.Redis | None = None
        self._events: set[str] = set()  # streams this node wants events of
        self._video: set[str] = set()  # ... and frames of
        self._subscribed: set[str] = set()  # channels subscribed on the current pub/sub connection
        self._confirmed: set[str] = set()  # ... and confirmed by Redis
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._subs_changed = asyncio.Event()
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._queued_frames = 0
        self._wake = asyncio.Event()
        self._quiet_until: dict[str, float] = {}
        self._interest_at: dict[str, float] = {}  # when another node last said it started listening to frames
        self._missed_alerts: dict[str, int] = {}  # stream -> last seq of batches other nodes did not get
        self._missed_status: dict[str, bytes] = {}
        self._claims: dict[str, str] = {}  # stream -> the lease of its producer on this node
        self._link_ok = False
        self._last_pong = 0.0
        self._commands_ok = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.frames_dropped = 0
        self.reconnects = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def healthy(self) -> bool:
        return self._link_ok and self._commands_ok

    def attach(self, sink: Sink) -> None:
        self._sink = sink

    async def start(self) -> None:
        # one immediate retry: after Redis restarts, the first command on each pooled connection fails
        self._redis = redis.Redis.from_url(self._url, socket_connect_timeout=2.0, socket_timeout=5.0,
                                           socket_keepalive=True, health_check_interval=self._heartbeat_s,
                                           retry=Retry(NoBackoff(), 1),
                                           retry_on_error=[RedisConnectionError, RedisTimeoutError])
        try:
            await self._redis.ping()
            self._commands_ok = True
        except (RedisError, OSError) as exc:
            log.warning("Redis at %s does not answer (%s): serving local clients, retrying", _safe(self._url), exc)
        self._tasks = [asyncio.create_task(self._link()), asyncio.create_task(self._publisher()),
                       asyncio.create_task(self._heartbeat())]

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._flush(), timeout=2.0)
        except (asyncio.TimeoutError, RedisError, OSError):
            pass
        # a cancellation can be lost when the awaited call finishes at that moment (asyncio.wait_for in
        # Python 3.11, which redis-py uses): cancel until every task has ended
        while not all(task.done() for task in self._tasks):
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(self._tasks, timeout=0.1)
        if self._redis is not None:
            try:
                await self._redis.srem(self._key("nodes"), self.node_id)
                await self._redis.delete(self._key(f"node:{self.node_id}"))
            except (RedisError, OSError):
                pass
            await self._redis.aclose()

    async def _flush(self) -> None:
        """Publish what is queued (shutdown: the last status and alerts reach the other nodes)."""
        while self._queue and self._commands_ok:
            await self._write_batch()

    def _key(self, name: str) -> str:
        return self._prefix + name

    # ------------------------------------------------------------------ interest
    def watch(self, stream_id: str, video: bool) -> None:
        self._events.add(stream_id)
        (self._video.add if video else self._video.discard)(stream_id)
        self._subs_changed.set()

    def unwatch(self, stream_id: str) -> None:
        self._events.discard(stream_id)
        self._video.discard(stream_id)
        self._subs_changed.set()

    async def ready(self, stream_id: str) -> None:
        """Wait (up to a second; not at all while Redis is away) until Redis confirmed this node's
        subscription to the stream's channels: from then on, nothing another node publishes misses it."""
        channels = [self._key(f"s:{stream_id}")] + ([self._key(f"v:{stream_id}")] if stream_id in self._video else [])
        missing = [c for c in channels if c not in self._confirmed]
        if not missing or not self._link_ok:
            return
        loop = asyncio.get_running_loop()
        futures = []
        for channel in missing:
            future: asyncio.Future[None] = loop.create_future()
            self._waiting.setdefault(channel, []).append(future)
            futures.append(future)
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=1.0)
        except asyncio.TimeoutError:
            log.warning("Redis did not confirm the subscription within 1 s", extra={"stream": stream_id})

    def _confirm(self, channel: str) -> None:
        self._confirmed.add(channel)
        for future in self._waiting.pop(channel, []):
            if not future.done():
                future.set_result(None)

    def _wanted(self) -> set[str]:
        return {self._key(f"s:{s}") for s in self._events} | {self._key(f"v:{s}") for s in self._video}

    # ------------------------------------------------------------------ publishing (never awaits)
    def frame(self, frame: Frame) -> None:
        sid = frame.stream_id
        if not self._commands_ok:
            self.frames_dropped += 1
            return
        if time.monotonic() < self._quiet_until.get(sid, 0.0):
            return
        if self._queued_frames >= MAX_QUEUED_FRAMES:
            self.frames_dropped += 1
            return
        self._queued_frames += 1
        data = envelope(FRAME, self._node, frame.as_binary().payload)
        self._push(("frame", self._key(f"v:{sid}"), data, sid))

    def alerts(self, stream_id: str, prev: int, items: AlertItems) -> None:
        data = envelope(ALERTS, self._node, pack_alerts(prev, items))
        last = items[-1][0] if items else prev
        self._push(("alerts", self._key(f"s:{stream_id}"), data, stream_id, last))

    def status(self, stream_id: str, message: bytes) -> None:
        self._push(("status", self._key(f"s:{stream_id}"), envelope(STATUS, self._node, message), stream_id))

    def to_watchers(self, stream_id: str, message: bytes) -> None:
        self._push(("publish", self._key(f"s:{stream_id}"), envelope(WATCHERS, self._node, message)))

    def claim_producer(self, stream_id: str, connection_id: str) -> None:
        lease = self._claims[stream_id] = self._new_lease(connection_id)
        self._push(("claim", stream_id, lease))

    def release_producer(self, stream_id: str, connection_id: str) -> None:
        lease = self._claims.get(stream_id)
        if lease is not None and lease.endswith(f"|{connection_id}"):
            del self._claims[stream_id]
            self._push(("release", stream_id, lease))

    def close_stream(self, stream_id: str, code: int, reason: str) -> None:
        self._push(("publish", self._key(f"s:{stream_id}"), envelope(CLOSE, self._node, pack_close(code, reason))))

    def _push(self, entry: tuple[Any, ...]) -> None:
        if not self._commands_ok:  # alerts and status are announced again once Redis is back; the rest lapses
            self._remember_missed(entry)
            return
        self._queue.append(entry)
        self._wake.set()

    def _remember_missed(self, entry: tuple[Any, ...]) -> None:
        if entry[0] == "alerts":
            self._missed_alerts[entry[3]] = max(entry[4], self._missed_alerts.get(entry[3], 0))
        elif entry[0] == "status":
            self._missed_status[entry[3]] = open_envelope(entry[2])[2].tobytes()

    async def _publisher(self) -> None:
        attempt = 0
        assert self._redis is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                if self._commands_ok and (self._missed_alerts or self._missed_status):
                    self._announce_missed()
                if not self._queue:
                    break
                try:
                    await self._write_batch()
                    attempt = 0
                except (RedisError, OSError) as exc:
                    self._set_commands_ok(False, exc)
                    while not self._commands_ok:  # the heartbeat also notices when Redis is back
                        await asyncio.sleep(RECONNECT_BACKOFF.delay_s(attempt))
                        attempt += 1
                        try:
                            await self._redis.ping()
                            self._set_commands_ok(True)
                        except (RedisError, OSError):
                            pass

    async def _write_batch(self) -> None:
        assert self._redis is not None
        batch = [self._queue.popleft() for _ in range(min(PIPELINE, len(self._queue)))]
        pipe = self._redis.pipeline(transaction=False)
        for entry in batch:
            kind = entry[0]
            if kind == "frame":
                self._queued_frames -= 1
            if kind in ("frame", "alerts", "status", "publish"):
                pipe.publish(entry[1], entry[2])
            elif kind == "claim":
                sid, lease = entry[1], entry[2]
                pipe.set(self._key(f"producer:{sid}"), lease, px=self._ttl_ms)
                pipe.publish(self._key(f"s:{sid}"), envelope(PRODUCER, self._node, lease.encode()))
            elif kind == "release":
                pipe.eval(_RELEASE, 1, self._key(f"producer:{entry[1]}"), entry[2])
        sent_at = time.monotonic()
        try:
            results = await pipe.execute(raise_on_error=True)
        except (RedisError, OSError):
            for entry in batch:  # frames are gone; other nodes will read the alerts from the store
                if entry[0] in ("alerts", "status"):
                    self._remember_missed(entry)
            raise
        self._set_commands_ok(True)
        now = time.monotonic()
        index = 0
        for entry in batch:
            if entry[0] == "frame":
                listeners = int(results[index]) - (1 if entry[1] in self._subscribed else 0)
                if listeners <= 0 and self._interest_at.get(entry[3], 0.0) < sent_at:
                    self._quiet_until[entry[3]] = now + QUIET_RECHECK_S
                else:
                    self._quiet_until.pop(entry[3], None)
            index += 2 if entry[0] == "claim" else 1

    def _announce_missed(self) -> None:
        """Redis answers again: tell the other nodes what they missed (they read the alerts from the store)."""
        missed_alerts, self._missed_alerts = self._missed_alerts, {}
        missed_status, self._missed_status = self._missed_status, {}
        for sid, last in missed_alerts.items():
            data = envelope(ALERTS, self._node, pack_alerts(last, []))
            self._queue.appendleft(("alerts", self._key(f"s:{sid}"), data, sid, last))
        for sid, message in missed_status.items():
            self._queue.appendleft(("status", self._key(f"s:{sid}"), envelope(STATUS, self._node, message), sid))

    def _set_commands_ok(self, ok: bool, exc: BaseException | None = None) -> None:
        if ok and not self._commands_ok:
            self._commands_ok = True
            log.info("Redis answers again: cross-node delivery resumes")
            self._wake.set()  # producer leases: the next heartbeat renews them, newer claims winning
        elif not ok and self._commands_ok:
            self._commands_ok = False
            log.error("Redis unavailable (%s): local delivery goes on, cross-node delivery paused", exc)
            for entry in self._queue:
                self._remember_missed(entry)
            self._queue.clear()
            self.frames_dropped += self._queued_frames
            self._queued_frames = 0

    # ------------------------------------------------------------------ receiving
    async def _link(self) -> None:
        """Keep one pub/sub connection subscribed to the wanted channels; hand messages to the sink.

        The reader task alone reads the connection; this task only writes to it (subscribe, unsubscribe
        and a PING each heartbeat, whose `pong` the reader notes): a connection that stops answering
        for three heartbeats is replaced. (redis-py's own health check reads the connection too, so the
        pub/sub client has it off.)
        """
        attempt = 0
        client = redis.Redis.from_url(self._url, socket_connect_timeout=2.0, socket_keepalive=True)
        while not self._closing:
            pubsub: Any = client.pubsub(push_handler_func=_pass_through)
            self._subscribed = set()
            self._confirmed = set()
            reader: asyncio.Task[None] | None = None
            try:
                await pubsub.ping()
                self._link_ok = True
                if attempt:
                    self.reconnects += 1
                    log.info("Redis subscription restored")
                attempt = 0
                self._last_pong = time.monotonic()
                reader = asyncio.create_task(self._read(pubsub))
                while not self._closing:
                    await self._apply_subscriptions(pubsub)
                    changed = asyncio.create_task(self._subs_changed.wait())
                    done, _ = await asyncio.wait({reader, changed}, timeout=self._heartbeat_s,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if reader in done:
                        changed.cancel()
                        reader.result()  # raises the connection error
                        raise ConnectionError("Redis subscription ended")
                    if changed in done:
                        self._subs_changed.clear()
                    else:
                        changed.cancel()
                        if time.monotonic() - self._last_pong > 3 * self._heartbeat_s:
                            raise ConnectionError("Redis stopped answering on the subscription")
                        await pubsub.ping()
            except (RedisError, OSError) as exc:
                if self._link_ok:
                    log.error("Redis subscription lost (%s): retrying", exc)
                self._link_ok = False
            finally:
                if reader is not None:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            if not self._closing:
                await asyncio.sleep(RECONNECT_BACKOFF.delay_s(attempt))
                attempt += 1
        await client.aclose()

    async def _apply_subscriptions(self, pubsub: Any) -> None:
        wanted = self._wanted()
        add, drop = wanted - self._subscribed, self._subscribed - wanted
        if add:
            await pubsub.subscribe(*add)
        if drop:
            await pubsub.unsubscribe(*drop)
            self._confirmed -= drop
        self._subscribed = wanted

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind == "pong":
                self._last_pong = time.monotonic()
                continue
            if message.get("channel") is None:
                continue
            channel = message["channel"].decode()
            if kind == "message":
                self._dispatch(channel, message["data"])
            elif kind == "subscribe":
                self._confirm(channel)
                if channel.startswith(self._key("v:")):  # the producer's node may be holding frames back
                    sid = channel[len(self._key("v:")):]
                    self._push(("publish", self._key(f"s:{sid}"), envelope(INTEREST, self._node, b"")))
                if channel.startswith(self._key("s:")) and self._sink is not None:
                    # subscribed (again): catch up on what happened before, from the store
                    self._sink.on_resync([channel[len(self._key("s:")):]])

    def _dispatch(self, channel: str, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            kind, node, payload = open_envelope(data)
            if node == self._node:
                return  # this node's own message: delivered locally already
            stream_id = channel[len(self._prefix) + 2:]
            if kind == FRAME:
                sink.on_frame(stream_id, payload.tobytes())
            elif kind == ALERTS:
                prev, items = unpack_alerts(payload)
                sink.on_alerts(stream_id, prev, items)
            elif kind == STATUS:
                sink.on_status(stream_id, payload.tobytes())
            elif kind == WATCHERS:
                sink.on_watchers(stream_id, payload.tobytes())
            elif kind == PRODUCER:
                claimed_at, _, connection = payload.tobytes().decode().partition("|")
                if self._newer_than_ours(stream_id, int(claimed_at)):
                    sink.on_producer(stream_id, connection.rpartition("|")[2])
            elif kind == CLOSE:
                code, reason = unpack_close(payload)
                sink.on_close(stream_id, code, reason)
            elif kind == INTEREST:
                self._quiet_until.pop(stream_id, None)
                self._interest_at[stream_id] = time.monotonic()
        except (ValueError, IndexError) as exc:
            log.warning("malformed message on %s: %s", channel, exc)
        except Exception:
            log.exception("could not deliver a message from %s", channel)

    # ------------------------------------------------------------------ heartbeat: figures and leases
    async def _heartbeat(self) -> None:
        while not self._closing:
            try:
                await self._beat()
                self._set_commands_ok(True)
            except (RedisError, OSError) as exc:
                self._set_commands_ok(False, exc)
            await asyncio.sleep(self._heartbeat_s)

    async def _beat(self) -> None:
        assert self._redis is not None and self._sink is not None
        now = time.monotonic()  # forget frame-interest marks that no longer matter (streams come and go)
        self._quiet_until = {sid: t for sid, t in self._quiet_until.items() if t > now}
        self._interest_at = {sid: t for sid, t in self._interest_at.items() if now - t < 10.0}
        producers = [(sid, conn, self._lease(sid, conn)) for sid, conn in self._sink.local_producers()]
        self._claims = {sid: lease for sid, _, lease in producers}
        figures = {"node": self.node_id, "at": time.time(), "figures": self._sink.figures()}
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._key(f"node:{self.node_id}"), orjson.dumps(figures), px=self._ttl_ms)
        pipe.sadd(self._key("nodes"), self.node_id)
        for sid, _, lease in producers:
            pipe.eval(_RENEW, 1, self._key(f"producer:{sid}"), lease, self._ttl_ms)
        results = await pipe.execute()
        for (sid, conn, lease), kept in zip(producers, results[2:]):
            if kept == 0:  # a newer producer on another node holds the lease (we could not hear it claim)
                self._sink.on_producer_lost(sid, conn)
            elif kept == 2:  # ours is newer than the one holding it: its node must close that one
                self._push(("publish", self._key(f"s:{sid}"), envelope(PRODUCER, self._node, lease.encode())))

    def _newer_than_ours(self, stream_id: str, claimed_at: int) -> bool:
        """Whether a claim made at `claimed_at` (ms) beats this node's producer of the stream, if any: a
        claim that was on its way while a newer producer registered here must not close that one."""
        ours = self._claims.get(stream_id)
        return ours is None or int(ours.split("|", 1)[0]) < claimed_at

    def _lease(self, stream_id: str, connection_id: str) -> str:
        lease = self._claims.get(stream_id)
        if lease is None or not lease.endswith(f"|{connection_id}"):
            lease = self._new_lease(connection_id)
        return lease

    def _new_lease(self, connection_id: str) -> str:
        """A producer lease as claimed now: "<ms>|<node>|<connection>" (newer claims win)."""
        return f"{int(time.time() * 1000)}|{self.node_id}|{connection_id}"

    async def other_nodes(self) -> list[dict[str, Any]] | None:
        """The latest figures of the other live nodes; None when Redis does not answer."""
        assert self._redis is not None
        try:
            names = sorted(_text(n) for n in await self._redis.smembers(self._key("nodes")))
            others = [n for n in names if n != self.node_id]
            if not others:
                return []
            values = await self._redis.mget([self._key(f"node:{n}") for n in others])
            gone = [n for n, v in zip(others, values) if v is None]
            if gone:
                await self._redis.srem(self._key("nodes"), *gone)
        except (RedisError, OSError):
            return None
        return [orjson.loads(v) for v in values if v is not None]


async def _pass_through(response: Any) -> Any:
    """redis-py's default handler of pub/sub messages formats each one into a debug log line
    (`str()` of a 32 KB frame: ~0.2 ms) even when debug logging is off; this one only returns it."""
    return response


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
