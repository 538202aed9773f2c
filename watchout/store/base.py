"""The store's interface: what the core may ask of a database, whichever holds the data.

Two implementations keep the same contract (tests/test_store.py runs it on both): `SQLiteStore`
(watchout.store.sqlite, the embedded default, one process) and `MongoStore` (watchout.store.mongo,
several nodes). Documents are plain dicts with camelCase keys and timezone-aware UTC datetimes;
an alert's id is a 24-hex-digit string (`new_alert_id`) whose order is its creation order.
Every method raises StoreUnavailable (never a driver error) when the database fails.
"""
from __future__ import annotations

import datetime as dt
import functools
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

from bson import ObjectId

from watchout.errors import StoreUnavailable
from watchout.protocol import StreamStatus

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="Measured")
Observer = Callable[[str, float], None]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_epoch() -> str:
    """A new identity for a stream's alert history (16 hex digits): given when the history starts."""
    return secrets.token_hex(8)


ALERT_ID_RE = re.compile(r"[0-9a-f]{24}")


def is_alert_id(value: object) -> bool:
    """Whether `value` has the form new_alert_id() gives: 24 lowercase hex digits."""
    return isinstance(value, str) and ALERT_ID_RE.fullmatch(value) is not None


def new_alert_id() -> str:
    """A new alert id: 24 hex digits, ordered by creation time (a BSON ObjectId, on either store)."""
    return str(ObjectId())


new_id = new_alert_id  # destinations and deliveries take ids of the same form


class DeliveryState:
    """A delivery's states: `pending` until it is delivered, given up (`failed`), carried by a later one
    (`summarised`, the cooldown) or no longer needed (`cancelled`: acknowledged before its escalation,
    or its destination was deleted)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SUMMARISED = "summarised"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """What a history query keeps: severities, receivedAt in [since, until), seq > after_seq, acknowledged or not."""

    severities: tuple[str, ...] | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    after_seq: int | None = None
    acknowledged: bool | None = None


class Measured:
    """Base of the implementations: `observer(operation, seconds)` hears each call's duration (the metrics)."""

    driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()  # translated to StoreUnavailable
    observer: Observer | None = None


def operation(failure: str) -> Callable[[Callable[Concatenate[S, P], Coroutine[Any, Any, R]]],
                                        Callable[Concatenate[S, P], Coroutine[Any, Any, R]]]:
    """Mark a store method: its duration goes to the observer, and a driver error becomes
    StoreUnavailable("could not <failure>"). The one place where either store translates errors."""
    def decorate(method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]]
                 ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        name = method.__name__

        async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            try:
                return await method(self, *args, **kwargs)
            except self.driver_errors as exc:
                raise StoreUnavailable(f"could not {failure}: {_brief(exc)}") from exc
            finally:
                observer = self.observer
                if observer is not None:
                    observer(name, time.perf_counter() - started)
        functools.update_wrapper(run, method)
        return run
    return decorate


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


class Store(Protocol):
    """The database, as the core uses it. Implementations: SQLiteStore, MongoStore."""

    observer: Observer | None

    async def start(self, alert_retention_d: float) -> None:
        """Connect; create or migrate the schema and the indexes every query needs. Raises StoreUnavailable,
        or ConfigError when the database cannot be used at all (not a database, written by a newer Watchout)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""

    def close(self) -> None:
        """Release the connections once every awaited call has finished."""

    @property
    def description(self) -> str:
        """Where the data lives, for the log and the banner (never a password)."""

    # ---------------------------------------------------------------- streams
    async def get_stream(self, stream_id: str) -> dict[str, Any] | None:
        """The stream document (streamId, ownerId, name, status, createdAt, lastSeenAt, lastFrameAt, alertSeq,
        lastSeq, prunedSeq, epoch, metadata), or None. `epoch` names the stream's alert history: a stream
        created again (after a deletion, or in a new database) starts a new history with a new epoch, so a
        position (epoch, seq) from the old one is never taken for one in the new."""

    async def create_stream(self, stream_id: str, owner_id: str, name: str | None = None, *,
                            status: str = StreamStatus.OFFLINE, metadata: dict[str, Any] | None = None,
                            exclusive: bool = False) -> dict[str, Any] | None:
        """Insert a stream; if it exists already, return the existing one (status unchanged), or None when
        `exclusive`. `alertSeq` allocates alert numbers; `lastSeq` is the highest one whose alert and every
        earlier one are stored (history is read up to it, replay continues after it)."""

    async def list_streams(self, owner_id: str | None, status: str | None, limit: int,
                           after: tuple[str, str] | None = None, *, stream_ids: list[str] | None = None
                           ) -> list[dict[str, Any]]:
        """Newest first (createdAt, then streamId, descending). `after` is (createdAt ISO, streamId) of the
        previous page's last item."""

    async def delete_stream(self, stream_id: str) -> bool:
        """Remove a stream with its alerts and snapshots; False if it did not exist."""

    async def set_stream_status(self, stream_id: str, status: str, *, frame_at: dt.datetime | None = None) -> None:
        """Set the status and lastSeenAt = now (and lastFrameAt, when given)."""

    async def record_heartbeats(self, beats: list[tuple[str, dt.datetime, dt.datetime | None]]) -> None:
        """(streamId, last heard, last frame or None): move lastSeenAt and lastFrameAt forward, never back."""

    async def mark_streams_offline(self, last_heard: dict[str, dt.datetime]) -> list[str]:
        """Streams online or streaming become offline, with lastSeenAt = when their producer was last heard
        (never moved back); returns the ids that changed."""

    async def mark_unseen_streams_offline(self, seen_before: dt.datetime, exclude: set[str]) -> list[str]:
        """Streams online or streaming whose lastSeenAt is before `seen_before` become offline (lastSeenAt
        unchanged), except `exclude`; returns their ids."""

    # ---------------------------------------------------------------- alerts
    async def reserve_batch(self, stream_id: str, count: int, writer: str, lease_s: float) -> tuple[int, int]:
        """Take `count` sequence numbers for `writer`'s next batch: (first seq, lastSeq before it). With
        `lease_s`, one writer at a time: WriterBusy while another writer's lease runs. StoreUnavailable when
        the stream is gone."""

    async def release_writer(self, stream_id: str, writer: str) -> None:
        """Let another writer take the stream's alerts now (its lease would also run out)."""

    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        """Store alerts (each with alertId, streamId, seq, ownerId, senderId, severity, message, metadata,
        timestamp, receivedAt, clientId or None, acknowledged None, hasSnapshot). Returns the clientIds already
        stored for the same (stream, sender): those alerts are not stored again. Durable when it returns."""

    async def mark_stored(self, stream_id: str, seq: int) -> None:
        """Every alert of the stream up to `seq` is stored: history may now show them (lastSeq only rises)."""

    async def stream_history(self, stream_id: str, max_seq: int, flt: AlertFilter, limit: int,
                             before_seq: int | None = None) -> list[dict[str, Any]]:
        """One stream's alerts with seq <= max_seq (and < before_seq), newest first."""

    async def alert_history(self, stream_ids: list[str] | None, owner_id: str | None, flt: AlertFilter,
                            limit: int, before: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Alerts across streams (those listed, of that owner; None: no such condition), newest received
        first (receivedAt, then alertId, descending). `before` is (receivedAt ISO, alertId) of the previous
        page's last item."""

    async def replay(self, stream_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Stored alerts of a stream with seq > after_seq, oldest first."""

    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        """The alert, or None (also for a malformed id)."""

    async def acknowledge_alert(self, alert_id: str, by: str) -> dict[str, Any] | None:
        """Record who acknowledged the alert and when (`acknowledged` {by, at}); the first acknowledgement
        stays. The alert after it, or None if missing."""

    async def find_alert_by_client_id(self, stream_id: str, sender_id: str, client_id: str) -> dict[str, Any] | None:
        """The alert that sender stored on that stream with that client id, or None."""

    async def count_alerts(self, stream_id: str) -> int:
        """How many alerts of the stream are stored."""

    async def save_snapshot(self, alert_id: str, stream_id: str, jpeg: bytes) -> None:
        """Keep the JPEG sent with an alert (saved before the alert itself)."""

    async def get_snapshot(self, alert_id: str) -> tuple[str, bytes] | None:
        """(streamId, JPEG bytes) of an alert's snapshot, None when it has none."""

    # ---------------------------------------------------------------- jobs (workers/)
    async def add_usage(self, rows: list[dict[str, Any]]) -> None:
        """Add per-hour figures: each row has streamId, ownerId, hour (a whole UTC hour) and the counts to add
        (framesIn, framesRelayed, framesDropped, onlineS)."""

    async def usage_between(self, first_hour: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        """Per-hour figures of the hours starting in [first_hour, end)."""

    async def prune_usage(self, before: dt.datetime, *, dry_run: bool = False) -> int:
        """Remove (or count) per-hour figures of hours before `before`."""

    async def prunable_streams(self, never_seen_before: dt.datetime | None, seen_before: dt.datetime | None
                               ) -> list[dict[str, Any]]:
        """Offline streams created before `never_seen_before` and never seen, or last seen before `seen_before`
        (None: that rule is off), by streamId."""

    async def delete_stream_if_prunable(self, stream_id: str, never_seen_before: dt.datetime | None,
                                        seen_before: dt.datetime | None) -> bool:
        """Delete the stream, with its alerts and snapshots, if it still matches prunable_streams()."""

    async def old_alerts_by_stream(self, before: dt.datetime) -> list[dict[str, Any]]:
        """For each stream with alerts received before `before`: streamId, count, maxSeq (of those alerts),
        by streamId."""

    async def remove_alerts_before(self, before: dt.datetime, max_seqs: dict[str, int]) -> int:
        """Remove every alert (and snapshot) received before `before`, first raising each listed stream's
        prunedSeq to its seq there (old_alerts_by_stream's maxSeq), so that a replay from an earlier seq
        says it is incomplete. Returns how many alerts went. May take long; other calls go on meanwhile."""

    async def alert_figures(self, start: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts received in [start, end) counted by streamId, ownerId, severity, acknowledged (bool) and
        objectType (metadata.objectType, None when absent): one dict per combination, with `count`."""

    async def save_report(self, start: dt.datetime, end: dt.datetime, rows: list[dict[str, Any]]) -> None:
        """Store a period's report rows (each with `scope` and `id`), replacing that period's earlier ones."""

    async def stored_report(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        """A stored report's rows (with `from` and `to`), in the order they were stored."""

    async def acquire_lease(self, job: str, owner: str, slot: dt.datetime, now: dt.datetime, lease_s: float) -> bool:
        """Take `job`'s lease for its firing at `slot` until now + lease_s. False when another owner holds an
        unexpired lease, or this slot (or a later one) has run already: one run per firing per cluster."""

    async def renew_lease(self, job: str, owner: str, now: dt.datetime, lease_s: float) -> bool:
        """Extend a lease we hold; False when another owner has taken it over."""

    async def release_lease(self, job: str, owner: str, now: dt.datetime) -> None:
        """End a lease we hold (it expires now); its slot stays, so the same firing does not run again."""

    async def leases(self) -> list[dict[str, Any]]:
        """Every job lease: job, owner, slot, takenAt, until."""

    async def record_job_run(self, run_id: str, run: dict[str, Any]) -> None:
        """Keep a job's last run (one per `run_id`: the job, or job@node for per-node jobs)."""

    async def prune_job_runs(self, before: dt.datetime) -> int:
        """Forget the runs of per-node jobs (scope "node") started before `before`: nodes that stopped."""

    async def job_runs(self) -> list[dict[str, Any]]:
        """Every kept run, with its `runId`."""

    # ---------------------------------------------------------------- notifications (watchout.deliveries)
    async def create_destination(self, doc: dict[str, Any]) -> None:
        """Keep a destination: destinationId, ownerId, channel, createdAt and its rules and settings (any
        JSON-ready values; datetimes come back as datetimes)."""

    async def get_destination(self, destination_id: str) -> dict[str, Any] | None:
        """The destination, or None."""

    async def list_destinations(self, owner_id: str | None = None, channel: str | None = None
                                ) -> list[dict[str, Any]]:
        """Destinations (of that owner, on that channel; None: any), oldest first."""

    async def update_destination(self, destination_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Set these top-level fields; the destination after it, or None if missing."""

    async def delete_destination(self, destination_id: str) -> bool:
        """Remove a destination; its pending deliveries become `cancelled`. False if it did not exist."""

    async def alerts_to_fan_out(self, limit: int) -> list[dict[str, Any]]:
        """Stored alerts not yet handed to the destinations (every alert is, once, after insert_alerts),
        oldest first."""

    async def add_deliveries(self, deliveries: list[dict[str, Any]], fanned_out: list[str]) -> None:
        """Keep new deliveries (deliveryId, alertId, streamId, destinationId, channel, purpose, state pending,
        attempts 0, nextAt, createdAt), one per (alertId, destinationId, purpose) (a repeat is ignored), and
        mark the alerts `fanned_out` as handed over: together, so an alert is never handed over without its
        deliveries."""

    async def claim_deliveries(self, owner: str, now: dt.datetime, lease_s: float, limit: int
                               ) -> list[dict[str, Any]]:
        """Up to `limit` pending deliveries due by `now` (nextAt <= now) whose lease is free or expired, earliest
        due first (then oldest alert first), leased to `owner` until now + lease_s: with several nodes each is
        attempted by one node at a time. Each comes with its `alert` (the stored alert, or None when it is gone)."""

    async def release_delivery_leases(self) -> int:
        """Free every delivery lease (the embedded store's one process starting again: its earlier run's leases
        are stale); returns how many were held."""

    async def finish_attempt(self, delivery_id: str, owner: str, fields: dict[str, Any]) -> bool:
        """Record an attempt's outcome (state, attempts, nextAt, lastError, lastStatus, deliveredAt,
        summarisedIn: those given) and release the lease, if `owner` still holds it; False when it does not
        (the lease ran out and another node took the delivery over)."""

    async def last_delivered(self, destination_id: str, stream_id: str) -> dt.datetime | None:
        """When that destination was last delivered an alert of that stream (the cooldown), or None."""

    async def deliveries_of_alert(self, alert_id: str) -> list[dict[str, Any]]:
        """Every delivery of an alert, oldest first (the receipts)."""

    async def get_value(self, key: str) -> str | None:
        """A value kept for the whole service (e.g. the Web Push key pair), or None."""

    async def put_value_if_absent(self, key: str, value: str) -> str:
        """Keep `value` under `key` unless a value is there already; returns the value kept (the first one:
        several nodes making one at once agree on it)."""

    async def delivery_backlog(self) -> tuple[int, dt.datetime | None]:
        """(how many deliveries are pending, when the oldest of them was created)."""
