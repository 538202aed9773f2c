"""Notifications: every stored alert reaches the destinations chosen for it, durably and at least once.

Each step is a store call, so that a restart, or another node, goes on where this one stopped:

1. Fan-out: the alerts stored since the last turn get one delivery per matching destination
   (`matches`), made together with the mark that they were handed over (`Store.add_deliveries`). An
   escalation destination gets a delivery due `escalateAfterS` later instead.
2. Claim: due deliveries are leased to this node (`Store.claim_deliveries`), so each is attempted by
   one node at a time.
3. Attempt, through the destination's channel (`Channel`), then record the outcome
   (`Store.finish_attempt`): delivered; tried again after a backoff with jitter; given up (`failed`)
   past `delivery_max_age_s`; carried by a later notification (`summarised`, the cooldown); or
   `cancelled` (acknowledged before its escalation, its alert or destination gone).

The payload's shape is watchout.resources.notification; the channels are watchout.channels.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from watchout.backoff import Backoff
from watchout.channels import Channel, Outcome, WebPushChannel, make_channels, web_push_channel
from watchout.errors import StoreUnavailable
from watchout.metrics import Metrics
from watchout.protocol import SEVERITIES
from watchout.resources import notification, test_notification
from watchout.settings import Settings
from watchout.store import Store, utcnow
from watchout.store.base import DeliveryState, new_id

log = logging.getLogger("watchout.deliveries")
SEVERITY_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
FAN_OUT_BATCH = 500
TICK_S = 1.0  # deliveries due later (retries, escalations) are looked for at least this often
# After a wake-up, what else arrives this long is handled in the same turn: at 1,000 alerts/s one store
# round trip per 20 ms for the fan-out and one for the claims, instead of one per alert.
GATHER_S = 0.02
DESTINATIONS_TTL_S = 5.0  # how stale this node's copy of the destinations may be (others change them)
BACKLOG_EVERY_S = 5.0
STORE_RETRY = Backoff(base_s=0.5, cap_s=30.0)
CLOSE_WAIT_S = 2.0  # attempts under way at shutdown get this long; others are tried again after their lease
MQTT_DESTINATION = "mqtt"  # the one MQTT destination, present while mqtt_url is set


def matches(destination: dict[str, Any], alert: dict[str, Any]) -> bool:
    """Whether an alert is for this destination: its owner's streams (all streams when an admin made it for
    all), the streams it lists (None: any), at least its minimum severity."""
    if not destination.get("allStreams") and alert["ownerId"] != destination["ownerId"]:
        return False
    streams = destination.get("streams")
    if streams is not None and alert["streamId"] not in streams:
        return False
    return SEVERITY_RANK.get(alert["severity"], 0) >= SEVERITY_RANK.get(destination.get("minSeverity", "low"), 0)


class Deliveries:
    """The notification engine of one node: `start()` it, `wake()` it when alerts were stored."""

    def __init__(self, store: Store, settings: Settings, metrics: Metrics, node: str,
                 channels: Mapping[str, Channel] | None = None, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self.channels: dict[str, Channel] = dict(make_channels(settings) if channels is None else channels)
        self._node = node
        self._clock = clock
        self._retry = Backoff(base_s=settings.delivery_retry_base_s, cap_s=settings.delivery_retry_cap_s)
        self._lease_s = settings.webhook_timeout_s + 30.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._destinations: dict[str, dict[str, Any]] = {}
        self._destinations_at = -DESTINATIONS_TTL_S
        self._backlog_at = -BACKLOG_EVERY_S
        self._order_locks: dict[tuple[str, str], asyncio.Lock] = {}  # ordered channels: one attempt per stream
        self._blocked_until: dict[tuple[str, str], dt.datetime] = {}  # ordered: after a failure, until its retry

    async def start(self) -> None:
        """Start the channels that keep a connection (MQTT) and the loop (its first turn prepares the store)."""
        for channel in self.channels.values():
            await channel.start()
        self._task = asyncio.create_task(self._run(), name="deliveries")

    def stream_status(self, stream_id: str, status: str) -> None:
        """A stream's status changed on this node (watchout.hub): channels that show statuses hear it."""
        for channel in self.channels.values():
            channel.stream_status(stream_id, status)

    def wake(self) -> None:
        """Alerts were stored, or a destination changed: look now rather than at the next tick."""
        self._wake.set()

    def destinations_changed(self) -> None:
        self._destinations_at = -DESTINATIONS_TTL_S
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._attempts:
            await asyncio.wait(self._attempts, timeout=CLOSE_WAIT_S)
            for task in self._attempts:
                task.cancel()  # its lease runs out and the delivery is tried again: at least once
        for channel in self.channels.values():
            await channel.close()

    async def web_push(self) -> WebPushChannel:
        """The Web Push channel (its keys made and kept by the first node that needs them)."""
        channel = self.channels.get("webpush")
        if not isinstance(channel, WebPushChannel):
            channel = self.channels["webpush"] = await web_push_channel(self._settings, self._store)
        return channel

    async def send_test(self, destination: dict[str, Any]) -> Outcome:
        """`POST /api/webhooks/{id}/test`: one test notification now, outside the delivery records."""
        body = test_notification(destination["destinationId"], self._clock())
        outcome = await self.channels[destination["channel"]].send(destination, new_id(), body)
        self._metrics.deliveries.labels(destination["channel"], "test-ok" if outcome.ok else "test-failed").inc()
        return outcome

    # ---------------------------------------------------------------- the loop
    async def _run(self) -> None:
        failures, prepared = 0, False
        while True:
            self._wake.clear()
            try:
                if not prepared:
                    await self._prepare()
                    prepared = True
                await self._step()
                failures = 0
            except StoreUnavailable as exc:
                log.warning("deliveries: %s", exc.message)
                await asyncio.sleep(STORE_RETRY.delay_s(failures))
                failures += 1
                continue
            except Exception:
                log.exception("deliveries: unexpected error")
                await asyncio.sleep(TICK_S)
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
                await asyncio.sleep(GATHER_S)

    async def _prepare(self) -> None:
        if self._settings.is_embedded_store:  # one process: leases left by an earlier run are stale
            await self._store.release_delivery_leases()
        await self._keep_mqtt_destination()
        await self.web_push()

    async def _step(self) -> None:
        await self._refresh_destinations()
        while await self._fan_out() == FAN_OUT_BATCH:
            pass
        free = self._settings.delivery_concurrency - len(self._attempts)
        if free > 0:
            claimed = await self._store.claim_deliveries(self._node, self._clock(), self._lease_s, free)
            for group in _groups(claimed, self._destinations, self.channels):
                task = asyncio.create_task(self._attempt(group))
                self._attempts.add(task)
                task.add_done_callback(self._attempt_done)
        if time.monotonic() - self._backlog_at >= BACKLOG_EVERY_S:
            self._backlog_at = time.monotonic()
            count, oldest = await self._store.delivery_backlog()
            self._metrics.deliveries_pending.set(count)
            self._metrics.deliveries_oldest_pending.set(
                0.0 if oldest is None else max(0.0, (self._clock() - oldest).total_seconds()))

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("deliveries: an attempt failed", exc_info=task.exception())
        self._wake.set()  # a slot is free

    async def _refresh_destinations(self) -> None:
        if time.monotonic() - self._destinations_at < DESTINATIONS_TTL_S:
            return
        destinations = await self._store.list_destinations()
        self._destinations = {d["destinationId"]: d for d in destinations}
        self._destinations_at = time.monotonic()

    async def _keep_mqtt_destination(self) -> None:
        """The MQTT destination exists while mqtt_url is set: all streams, every severity."""
        existing = await self._store.get_destination(MQTT_DESTINATION)
        if self._settings.mqtt_url and existing is None:
            await self._store.create_destination({
                "destinationId": MQTT_DESTINATION, "ownerId": "", "channel": "mqtt", "createdAt": self._clock(),
                "allStreams": True, "streams": None, "minSeverity": "low", "cooldownS": 0, "escalate": False,
                "config": {}})
        elif not self._settings.mqtt_url and existing is not None:
            await self._store.delete_destination(MQTT_DESTINATION)

    # ---------------------------------------------------------------- fan-out
    async def _fan_out(self) -> int:
        """Hand up to FAN_OUT_BATCH stored alerts to their destinations; returns how many alerts."""
        alerts = await self._store.alerts_to_fan_out(FAN_OUT_BATCH)
        if not alerts:
            return 0
        now = self._clock()
        records = []
        for alert in alerts:
            for destination in self._destinations.values():
                if destination["channel"] in self.channels and matches(destination, alert):
                    records.append(self._delivery(alert, destination, now))
        await self._store.add_deliveries(records, [a["alertId"] for a in alerts])
        return len(alerts)

    def _delivery(self, alert: dict[str, Any], destination: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        purpose, due = "notify", now
        if destination.get("escalate"):
            purpose = "escalate"
            after = destination.get("escalateAfterS") or self._settings.escalate_after_s
            due = alert["receivedAt"] + dt.timedelta(seconds=after)
        return {"deliveryId": new_id(), "alertId": alert["alertId"], "streamId": alert["streamId"],
                "destinationId": destination["destinationId"], "channel": destination["channel"],
                "purpose": purpose, "state": DeliveryState.PENDING, "attempts": 0, "nextAt": due, "createdAt": now}

    # ---------------------------------------------------------------- attempts
    async def _attempt(self, group: list[dict[str, Any]]) -> None:
        """Attempt a group: one delivery; the due deliveries of one (destination, stream) with a cooldown, sent as
        one notification (the newest alert, with a summary of the others); or, on an ordered channel (MQTT), a
        stream's deliveries one after another in seq order."""
        destination = await self._destination(group[0]["destinationId"])
        if destination is None:
            await self._finish_all(group, DeliveryState.CANCELLED, "destination deleted")
            return
        live = []
        for d in group:
            alert = d["alert"]
            if alert is None:
                await self._finish(d, {"state": DeliveryState.CANCELLED, "lastError": "alert removed"})
            elif d["purpose"] == "escalate" and alert.get("acknowledged"):
                await self._finish(d, {"state": DeliveryState.CANCELLED, "lastError": "acknowledged"})
            else:
                live.append(d)
        live.sort(key=lambda d: int(d["alert"]["seq"]))
        if not live:
            return
        if self.channels[destination["channel"]].ordered:
            await self._attempt_in_order(destination, live)
        elif not await self._cooling_down(destination, live):
            await self._send(destination, live)

    async def _attempt_in_order(self, destination: dict[str, Any], live: list[dict[str, Any]]) -> None:
        """One at a time per (destination, stream), in seq order: after a failure the later ones wait for the
        retry of the failed one, so a subscriber sees the stream's alerts in order (on one node)."""
        key = (destination["destinationId"], live[0]["streamId"])
        async with self._order_locks.setdefault(key, asyncio.Lock()):  # FIFO: claimed earlier, sent earlier
            for index, d in enumerate(live):
                blocked = self._blocked_until.get(key)
                if blocked is not None and self._clock() < blocked:
                    for rest in live[index:]:
                        await self._finish(rest, {"nextAt": blocked})
                    return
                retry_at = await self._send(destination, [d])
                if retry_at is not None:
                    self._blocked_until[key] = retry_at
                else:
                    self._blocked_until.pop(key, None)

    async def _send(self, destination: dict[str, Any], live: list[dict[str, Any]]) -> dt.datetime | None:
        """Send the newest of `live` carrying the others (a summary), record the outcome; the retry time when it
        failed and will be tried again, else None."""
        now = self._clock()
        carrier, carried = live[-1], live[:-1]
        kind = "alert.escalated" if carrier["purpose"] == "escalate" else "alert"
        body = notification(kind, carrier["alert"], self._settings.base_url, now, _summary(carried))
        channel = destination["channel"]
        outcome = await self.channels[channel].send(destination, carrier["deliveryId"], body)
        attempts = int(carrier["attempts"]) + 1
        if outcome.ok:
            await self._finish(carrier, {"state": DeliveryState.DELIVERED, "attempts": attempts, "deliveredAt": now,
                                         "lastStatus": outcome.status, "lastError": None})
            for d in carried:
                await self._finish(d, {"state": DeliveryState.SUMMARISED, "summarisedIn": carrier["deliveryId"]})
            self._count(channel, "delivered", len(live))
            return None
        log.info("delivery attempt failed", extra={"delivery": carrier["deliveryId"], "channel": channel,
                                                   "destination": destination["destinationId"],
                                                   "error": outcome.error, "attempt": attempts})
        if outcome.gone:
            await self._finish_all(live, DeliveryState.CANCELLED, f"gone: {outcome.error}")
            await self._store.delete_destination(destination["destinationId"])
            self.destinations_changed()
            self._count(channel, "gone", len(live))
            return None
        if (now - carrier["createdAt"]).total_seconds() >= self._settings.delivery_max_age_s:
            await self._finish_all(live, DeliveryState.FAILED, outcome.error, attempts=attempts,
                                   status=outcome.status)
            self._count(channel, "failed", len(live))
            return None
        retry_at = now + dt.timedelta(seconds=self._retry.delay_s(attempts - 1))
        await self._finish(carrier, {"attempts": attempts, "nextAt": retry_at, "lastError": outcome.error,
                                     "lastStatus": outcome.status})
        for d in carried:
            await self._finish(d, {"nextAt": retry_at})
        self._count(channel, "retry", 1)
        return retry_at

    async def _cooling_down(self, destination: dict[str, Any], group: list[dict[str, Any]]) -> bool:
        """With a cooldown, a stream's notification waits until cooldownS after the last one (True: deferred)."""
        cooldown = float(destination.get("cooldownS") or 0)
        if not cooldown or group[0]["purpose"] != "notify":
            return False
        last = await self._store.last_delivered(destination["destinationId"], group[0]["streamId"])
        if last is None or self._clock() >= last + dt.timedelta(seconds=cooldown):
            return False
        for d in group:
            await self._finish(d, {"nextAt": last + dt.timedelta(seconds=cooldown)})
        return True

    async def _destination(self, destination_id: str) -> dict[str, Any] | None:
        known = self._destinations.get(destination_id)
        if known is not None:
            return known
        return await self._store.get_destination(destination_id)  # made on another node moments ago

    async def _finish(self, delivery: dict[str, Any], fields: dict[str, Any]) -> None:
        if not await self._store.finish_attempt(delivery["deliveryId"], self._node, fields):
            log.warning("delivery lease lost", extra={"delivery": delivery["deliveryId"]})

    async def _finish_all(self, group: list[dict[str, Any]], state: str, error: str | None, *,
                          attempts: int | None = None, status: int | None = None) -> None:
        for d in group:
            fields: dict[str, Any] = {"state": state, "lastError": error}
            if attempts is not None and d is group[-1]:
                fields.update(attempts=attempts, lastStatus=status)
            await self._finish(d, fields)

    def _count(self, channel: str, result: str, n: int) -> None:
        self._metrics.deliveries.labels(channel, result).inc(n)


def _groups(claimed: list[dict[str, Any]], destinations: Mapping[str, dict[str, Any]],
            channels: Mapping[str, Channel]) -> list[list[dict[str, Any]]]:
    """Claimed deliveries as attempts: those of a destination with a cooldown, or on an ordered channel, together
    per stream."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    single: list[list[dict[str, Any]]] = []
    for d in claimed:
        destination = destinations.get(d["destinationId"])
        channel = channels.get(d["channel"])
        together = destination is not None and (destination.get("cooldownS") or channel is not None and channel.ordered)
        if d["purpose"] == "notify" and together:
            groups.setdefault((d["destinationId"], d["streamId"], d["purpose"]), []).append(d)
        else:
            single.append([d])
    return single + list(groups.values())


def _summary(carried: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a notification says of the alerts a cooldown held back (None: none)."""
    if not carried:
        return None
    alerts = [d["alert"] for d in carried]
    return {"count": len(alerts), "firstSeq": min(a["seq"] for a in alerts), "lastSeq": max(a["seq"] for a in alerts),
            "highestSeverity": max((a["severity"] for a in alerts), key=lambda s: SEVERITY_RANK.get(s, 0)),
            "alertIds": [a["alertId"] for a in alerts][:100]}
