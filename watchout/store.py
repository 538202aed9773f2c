"""MongoDB access: the only module that imports motor or mongomock-motor, and the only one that knows `_id`."""
from __future__ import annotations

import collections
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import pymongo
from bson import ObjectId
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from watchout.errors import StoreUnavailable, WriterBusy
from watchout.queries import AlertFilter
from watchout.settings import Settings

log = logging.getLogger("watchout.store")
ASC, DESC = pymongo.ASCENDING, pymongo.DESCENDING


P = ParamSpec("P")
R = TypeVar("R")


Operation = Callable[Concatenate["Store", P], Coroutine[Any, Any, R]]


def _measured(method: Operation[P, R]) -> Operation[P, R]:
    """Report the operation's duration to the store's observer (the metrics), if it has one."""
    name = method.__name__

    async def measured(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        observer = self.observer
        if observer is None:
            return await method(self, *args, **kwargs)
        started = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        finally:
            observer(name, time.perf_counter() - started)
    functools.update_wrapper(measured, method)
    return measured


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_alert_id() -> str:
    return str(ObjectId())


class Store:
    """Streams, alerts and snapshots. Every method raises StoreUnavailable when the database fails.

    On the embedded store (mongomock-motor) unique indexes are not created: mongomock checks them by
    scanning the whole collection on every insert. The embedded store has one writer (this process),
    which allocates `seq` atomically; alert ids are de-duplicated by the caller.
    """

    def __init__(self, client: Any, db_name: str, *, is_embedded: bool) -> None:
        self._client = client
        self.is_embedded = is_embedded
        self.observer: Callable[[str, float], None] | None = None  # (operation, seconds) after each call
        self._client_ids: set[tuple[str, str, str]] = set()  # embedded only: (stream, sender, clientId) stored
        db = client[db_name]
        self._streams = db["streams"]
        self._alerts = db["alerts"]
        self._snapshots = db["snapshots"]
        if not is_embedded:
            self._alerts = self._alerts.with_options(write_concern=WriteConcern("majority"))

    @classmethod
    def open(cls, settings: Settings) -> Store:
        """Create the client; call inside the running event loop."""
        if settings.is_embedded_store:
            from mongomock_motor import AsyncMongoMockClient
            _install_mongomock_id_lookup()
            return cls(AsyncMongoMockClient(tz_aware=True), settings.mongo_db, is_embedded=True)
        from motor.motor_asyncio import AsyncIOMotorClient
        client: Any = AsyncIOMotorClient(settings.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
        return cls(client, settings.mongo_db, is_embedded=False)

    async def ensure_indexes(self) -> None:
        unique = not self.is_embedded
        try:
            await self._alerts.create_index([("streamId", ASC), ("seq", ASC)], unique=unique, name="stream_seq")
            await self._alerts.create_index(
                [("streamId", ASC), ("senderId", ASC), ("clientId", ASC)], unique=unique, name="stream_client_id",
                partialFilterExpression={"clientId": {"$type": "string"}})
            await self._alerts.create_index([("ownerId", ASC), ("receivedAt", DESC)], name="owner_time")
            await self._alerts.create_index([("streamId", ASC), ("receivedAt", DESC)], name="stream_time")
            await self._streams.create_index([("ownerId", ASC), ("createdAt", DESC)], name="owner_created")
            await self._streams.create_index([("status", ASC), ("lastSeenAt", ASC)], name="status_seen")
        except PyMongoError as exc:
            raise StoreUnavailable(f"could not create indexes: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._client.admin.command("ping")
        except PyMongoError as exc:
            raise StoreUnavailable("database did not answer") from exc

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ streams
    @_measured
    async def get_stream(self, stream_id: str) -> dict[str, Any] | None:
        try:
            doc = await self._streams.find_one({"_id": stream_id})
        except PyMongoError as exc:
            raise StoreUnavailable("could not read stream") from exc
        return _stream_out(doc) if doc else None

    @_measured
    async def create_stream(self, stream_id: str, owner_id: str, name: str | None = None, *,
                            status: str = "offline", metadata: dict[str, Any] | None = None,
                            exclusive: bool = False) -> dict[str, Any] | None:
        """Insert a stream; if it exists already, return the existing one (status unchanged), or
        None when `exclusive`.

        `alertSeq` allocates alert numbers; `lastSeq` is the highest one whose alert and every
        earlier one are stored (history is read up to it, replay continues after it).
        """
        now = utcnow()
        doc = {"_id": stream_id, "ownerId": owner_id, "name": name or stream_id, "status": status,
               "createdAt": now, "lastSeenAt": now if status != "offline" else None, "lastFrameAt": None,
               "alertSeq": 0, "lastSeq": 0, "prunedSeq": 0, "metadata": metadata or {}}
        try:
            await self._streams.insert_one(doc)
        except DuplicateKeyError:
            if exclusive:
                return None
            existing = await self.get_stream(stream_id)
            if existing is None:  # pragma: no cover - deleted between the two calls
                raise StoreUnavailable("stream vanished while being created") from None
            return existing
        except PyMongoError as exc:
            raise StoreUnavailable("could not create stream") from exc
        return _stream_out(doc)

    @_measured
    async def list_streams(self, owner_id: str | None, status: str | None, limit: int,
                           after: tuple[str, str] | None = None, *, stream_ids: list[str] | None = None
                           ) -> list[dict[str, Any]]:
        """Newest first. `after` is (createdAt ISO, streamId) of the previous page's last item."""
        query: dict[str, Any] = {}
        if owner_id is not None:
            query["ownerId"] = owner_id
        if stream_ids is not None:
            query["_id"] = {"$in": stream_ids}
        if status is not None:
            query["status"] = status
        if after is not None:
            created = dt.datetime.fromisoformat(after[0])
            query["$and"] = [{"$or": [{"createdAt": {"$lt": created}},
                                      {"createdAt": created, "_id": {"$lt": after[1]}}]}]
        try:
            cursor = self._streams.find(query).sort([("createdAt", DESC), ("_id", DESC)]).limit(limit)
            return [_stream_out(d) async for d in cursor]
        except PyMongoError as exc:
            raise StoreUnavailable("could not list streams") from exc

    @_measured
    async def delete_stream(self, stream_id: str) -> bool:
        """Remove a stream with its alerts and snapshots; False if it did not exist."""
        try:
            result = await self._streams.delete_one({"_id": stream_id})
            await self._alerts.delete_many({"streamId": stream_id})
            await self._snapshots.delete_many({"streamId": stream_id})
        except PyMongoError as exc:
            raise StoreUnavailable("could not delete stream") from exc
        self._forget_client_ids(stream_id)
        return bool(result.deleted_count)

    @_measured
    async def set_stream_status(self, stream_id: str, status: str, *, frame_at: dt.datetime | None = None) -> None:
        update: dict[str, Any] = {"status": status, "lastSeenAt": utcnow()}
        if frame_at is not None:
            update["lastFrameAt"] = frame_at
        try:
            await self._streams.update_one({"_id": stream_id}, {"$set": update})
        except PyMongoError as exc:
            raise StoreUnavailable("could not update stream status") from exc

    # ------------------------------------------------------------------ alerts
    @_measured
    async def reserve_seqs(self, stream_id: str, count: int) -> int:
        """Atomically take `count` sequence numbers; returns the first."""
        first, _ = await self.reserve_batch(stream_id, count, "", 0.0)
        return first

    async def reserve_batch(self, stream_id: str, count: int, writer: str, lease_s: float) -> tuple[int, int]:
        """Take `count` sequence numbers for `writer`'s next batch: returns (first seq, lastSeq before it).

        With `lease_s`, the stream's alerts are written by one node at a time (its committed lastSeq
        depends on it): the batch is refused with WriterBusy while another writer's lease runs.
        """
        query: dict[str, Any] = {"_id": stream_id}
        change: dict[str, Any] = {"$inc": {"alertSeq": count}}
        now = utcnow()
        if lease_s:
            query["$or"] = [{"writer": {"$in": [None, writer]}}, {"writerUntil": {"$lt": now}}]
            change["$set"] = {"writer": writer, "writerUntil": now + dt.timedelta(seconds=lease_s)}
        try:
            doc = await self._streams.find_one_and_update(
                query, change, projection={"alertSeq": True, "lastSeq": True},
                return_document=pymongo.ReturnDocument.AFTER)
            if doc is None and lease_s and await self._streams.find_one({"_id": stream_id}, {"_id": True}):
                raise WriterBusy(f"another node is writing alerts of {stream_id}")
        except PyMongoError as exc:
            raise StoreUnavailable("could not allocate alert numbers") from exc
        if doc is None:
            raise StoreUnavailable(f"stream {stream_id} disappeared")
        return int(doc["alertSeq"]) - count + 1, int(doc.get("lastSeq", 0))

    async def release_writer(self, stream_id: str, writer: str) -> None:
        """Let another node write the stream's alerts now (its lease would also run out)."""
        try:
            await self._streams.update_one({"_id": stream_id, "writer": writer}, {"$set": {"writer": None}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not release the stream's alert writer lease") from exc

    @_measured
    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        """Store alerts (each with `alertId`); returns the clientIds that were already stored."""
        docs = [_alert_in(a) for a in alerts]
        if self.is_embedded:
            return await self._insert_alerts_embedded(docs)
        try:
            await self._alerts.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            dup_codes = {11000, 11001}
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") not in dup_codes for e in errors):
                raise StoreUnavailable("could not store alerts") from exc
            return {docs[e["index"]].get("clientId") for e in errors if docs[e["index"]].get("clientId")}
        except PyMongoError as exc:
            raise StoreUnavailable("could not store alerts") from exc
        return set()

    def _forget_client_ids(self, stream_id: str) -> None:
        if self._client_ids:
            self._client_ids = {key for key in self._client_ids if key[0] != stream_id}

    async def _insert_alerts_embedded(self, docs: list[dict[str, Any]]) -> set[str]:
        """What MongoDB's unique (stream, sender, clientId) index does, kept beside the embedded data:
        a retry stored by an earlier run of the app over this store is still recognised."""
        duplicates: set[str] = set()
        fresh: list[dict[str, Any]] = []
        added: list[tuple[str, str, str]] = []
        for doc in docs:
            client_id = doc.get("clientId")
            if client_id is not None:
                key = (doc["streamId"], doc["senderId"], client_id)
                if key in self._client_ids:
                    duplicates.add(client_id)
                    continue
                self._client_ids.add(key)
                added.append(key)
            fresh.append(doc)
        try:
            if fresh:
                await self._alerts.insert_many(fresh, ordered=False)
        except PyMongoError as exc:
            self._client_ids.difference_update(added)
            raise StoreUnavailable("could not store alerts") from exc
        return duplicates

    @_measured
    async def mark_stored(self, stream_id: str, seq: int) -> None:
        """Every alert of the stream up to `seq` is stored: history may now show them."""
        try:
            await self._streams.update_one({"_id": stream_id}, {"$max": {"lastSeq": seq}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not update the stream's last alert number") from exc

    @_measured
    async def stream_history(self, stream_id: str, max_seq: int, flt: AlertFilter, limit: int,
                             before_seq: int | None = None) -> list[dict[str, Any]]:
        """One stream's alerts with seq <= max_seq (and < before_seq), newest first."""
        query = _alert_query(flt)
        query["streamId"] = stream_id
        bound = max_seq if before_seq is None else min(max_seq, before_seq - 1)
        query["seq"] = {"$lte": bound, **({"$gt": flt.after_seq} if flt.after_seq is not None else {})}
        return await self._find_alerts(query, [("seq", DESC)], limit)

    @_measured
    async def alert_history(self, stream_ids: list[str] | None, owner_id: str | None, flt: AlertFilter,
                            limit: int, before: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Alerts across streams, newest received first. `before` is (receivedAt ISO, alertId)."""
        query = _alert_query(flt)
        if stream_ids is not None:
            query["streamId"] = {"$in": stream_ids}
        if owner_id is not None:
            query["ownerId"] = owner_id
        if flt.after_seq is not None:
            query["seq"] = {"$gt": flt.after_seq}
        if before is not None:
            received, alert_id = dt.datetime.fromisoformat(before[0]), ObjectId(before[1])
            query["$or"] = [{"receivedAt": {"$lt": received}}, {"receivedAt": received, "_id": {"$lt": alert_id}}]
        return await self._find_alerts(query, [("receivedAt", DESC), ("_id", DESC)], limit)

    @_measured
    async def replay(self, stream_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        """Stored alerts of a stream with seq > after_seq, oldest first."""
        return await self._find_alerts({"streamId": stream_id, "seq": {"$gt": after_seq}}, [("seq", ASC)], limit)

    async def _find_alerts(self, query: dict[str, Any], order: list[tuple[str, int]], limit: int
                           ) -> list[dict[str, Any]]:
        try:
            cursor = self._alerts.find(query).sort(order).limit(limit)
            return [_alert_out(d) async for d in cursor]
        except PyMongoError as exc:
            raise StoreUnavailable("could not read alerts") from exc

    @_measured
    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        if not ObjectId.is_valid(alert_id):
            return None
        try:
            doc = await self._alerts.find_one({"_id": ObjectId(alert_id)})
        except PyMongoError as exc:
            raise StoreUnavailable("could not read alert") from exc
        return _alert_out(doc) if doc else None

    @_measured
    async def acknowledge_alert(self, alert_id: str, by: str) -> dict[str, Any] | None:
        """Record who acknowledged the alert and when; the first acknowledgement stays. None if missing."""
        if not ObjectId.is_valid(alert_id):
            return None
        try:
            doc = await self._alerts.find_one_and_update(
                {"_id": ObjectId(alert_id), "acknowledged": None},
                {"$set": {"acknowledged": {"by": by, "at": utcnow()}}},
                return_document=pymongo.ReturnDocument.AFTER)
        except PyMongoError as exc:
            raise StoreUnavailable("could not acknowledge alert") from exc
        return _alert_out(doc) if doc else await self.get_alert(alert_id)

    @_measured
    async def find_alert_by_client_id(self, stream_id: str, sender_id: str, client_id: str) -> dict[str, Any] | None:
        try:
            doc = await self._alerts.find_one({"streamId": stream_id, "senderId": sender_id, "clientId": client_id})
        except PyMongoError as exc:
            raise StoreUnavailable("could not read alert") from exc
        return _alert_out(doc) if doc else None

    async def count_alerts(self, stream_id: str) -> int:
        try:
            return int(await self._alerts.count_documents({"streamId": stream_id}))
        except PyMongoError as exc:
            raise StoreUnavailable("could not count alerts") from exc

    @_measured
    async def save_snapshot(self, alert_id: str, stream_id: str, jpeg: bytes) -> None:
        try:
            await self._snapshots.insert_one({"_id": alert_id, "streamId": stream_id, "jpeg": jpeg,
                                              "createdAt": utcnow()})
        except PyMongoError as exc:
            raise StoreUnavailable("could not store snapshot") from exc

    @_measured
    async def get_snapshot(self, alert_id: str) -> tuple[str, bytes] | None:
        """(streamId, JPEG bytes) of an alert's snapshot, None when it has none."""
        try:
            doc = await self._snapshots.find_one({"_id": alert_id})
        except PyMongoError as exc:
            raise StoreUnavailable("could not read snapshot") from exc
        return (doc["streamId"], bytes(doc["jpeg"])) if doc else None

    # ------------------------------------------------------------------ jobs (workers/)
    def _collection(self, name: str) -> Any:
        """A collection the jobs use: reports, usage, locks, job_runs."""
        return self._streams.database[name]

    @property
    def _locks(self) -> Any:
        locks = self._collection("locks")
        return locks if self.is_embedded else locks.with_options(write_concern=WriteConcern("majority"))

    async def ensure_job_indexes(self, alert_retention_d: float) -> None:
        """Indexes for the jobs' queries; with MongoDB, TTL indexes that remove alerts and snapshots one
        day after `alert_retention_d` (0: none), a backstop for the prune job, which removes them first
        and records the stream's prunedSeq."""
        try:
            await self._alerts.create_index([("receivedAt", DESC)], name="received")
            await self._snapshots.create_index([("streamId", ASC), ("createdAt", ASC)], name="stream_created")
            await self._collection("usage").create_index([("hour", ASC), ("streamId", ASC)], name="hour_stream")
            await self._collection("reports").create_index([("from", ASC), ("to", ASC)], name="period")
            if not self.is_embedded:
                ttl_s = int((alert_retention_d + 1) * 86400) if alert_retention_d else None
                await _ensure_ttl(self._alerts, "receivedAt", ttl_s)
                await _ensure_ttl(self._snapshots, "createdAt", ttl_s)
        except PyMongoError as exc:
            raise StoreUnavailable(f"could not create the jobs' indexes: {exc}") from exc

    @_measured
    async def acquire_lease(self, job: str, owner: str, slot: dt.datetime, now: dt.datetime, lease_s: float) -> bool:
        """Take `job`'s lease for its firing at `slot` until now + lease_s. False when another owner holds
        an unexpired lease, or this slot (or a later one) has run already: one run per firing per cluster."""
        query = {"_id": job, "slot": {"$lt": slot}, "$or": [{"until": {"$lte": now}}, {"owner": owner}]}
        update = {"$set": {"owner": owner, "slot": slot, "takenAt": now,
                           "until": now + dt.timedelta(seconds=lease_s)}}
        try:
            doc = await self._locks.find_one_and_update(query, update, upsert=True,
                                                        return_document=pymongo.ReturnDocument.AFTER)
        except DuplicateKeyError:  # the lease exists and is not ours to take
            return False
        except PyMongoError as exc:
            raise StoreUnavailable("could not take a job lease") from exc
        return doc is not None

    @_measured
    async def renew_lease(self, job: str, owner: str, now: dt.datetime, lease_s: float) -> bool:
        """Extend a lease we hold; False when another owner has taken it over."""
        try:
            result = await self._locks.update_one(
                {"_id": job, "owner": owner}, {"$set": {"until": now + dt.timedelta(seconds=lease_s)}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not renew a job lease") from exc
        return bool(result.matched_count)

    @_measured
    async def release_lease(self, job: str, owner: str, now: dt.datetime) -> None:
        """End a lease we hold (it expires now); its slot stays, so the same firing does not run again."""
        try:
            await self._locks.update_one({"_id": job, "owner": owner}, {"$set": {"until": now}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not release a job lease") from exc

    async def leases(self) -> list[dict[str, Any]]:
        """Every job lease: job, owner, slot, until."""
        try:
            return [{"job": d.pop("_id"), **d} async for d in self._locks.find({})]
        except PyMongoError as exc:
            raise StoreUnavailable("could not read job leases") from exc

    @_measured
    async def record_job_run(self, run_id: str, run: dict[str, Any]) -> None:
        """Keep a job's last run (one document per `run_id`: the job, or job@node for per-node jobs)."""
        try:
            await self._collection("job_runs").replace_one({"_id": run_id}, run, upsert=True)
        except PyMongoError as exc:
            raise StoreUnavailable("could not record a job run") from exc

    @_measured
    async def prune_job_runs(self, before: dt.datetime) -> int:
        """Forget the runs of per-node jobs (scope "node") started before `before`: nodes that stopped."""
        try:
            result = await self._collection("job_runs").delete_many({"scope": "node", "startedAt": {"$lt": before}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not prune job runs") from exc
        return int(result.deleted_count)

    async def job_runs(self) -> list[dict[str, Any]]:
        try:
            return [{"runId": d.pop("_id"), **d} async for d in self._collection("job_runs").find({})]
        except PyMongoError as exc:
            raise StoreUnavailable("could not read job runs") from exc

    @_measured
    async def mark_streams_offline(self, last_heard: dict[str, dt.datetime]) -> list[str]:
        """Set streams that are online or streaming to offline, with lastSeenAt = when their producer was
        last heard (never moved back); returns the ids that changed."""
        changed = []
        try:
            for stream_id, heard in last_heard.items():
                result = await self._streams.update_one(
                    {"_id": stream_id, "status": {"$in": ["online", "streaming"]}},
                    {"$set": {"status": "offline"}, "$max": {"lastSeenAt": heard}})
                if result.modified_count:
                    changed.append(stream_id)
        except PyMongoError as exc:
            raise StoreUnavailable("could not mark streams offline") from exc
        return changed

    @_measured
    async def mark_unseen_streams_offline(self, seen_before: dt.datetime, exclude: set[str]) -> list[str]:
        """Streams online or streaming whose lastSeenAt is before `seen_before` become offline (lastSeenAt
        unchanged), except `exclude`; returns their ids."""
        query = {"status": {"$in": ["online", "streaming"]}, "lastSeenAt": {"$lt": seen_before}}
        changed = []
        try:
            candidates = [d["_id"] async for d in self._streams.find(query, projection={"_id": True})]
            for stream_id in candidates:
                if stream_id in exclude:
                    continue
                result = await self._streams.update_one({"_id": stream_id, **query}, {"$set": {"status": "offline"}})
                if result.modified_count:
                    changed.append(stream_id)
        except PyMongoError as exc:
            raise StoreUnavailable("could not mark unseen streams offline") from exc
        return changed

    @_measured
    async def record_heartbeats(self, beats: list[tuple[str, dt.datetime, dt.datetime | None]]) -> None:
        """(streamId, last heard, last frame or None): move lastSeenAt and lastFrameAt forward, never back."""
        updates = []
        for stream_id, seen, frame in beats:
            latest = {"lastSeenAt": seen, **({"lastFrameAt": frame} if frame is not None else {})}
            updates.append(({"_id": stream_id}, {"$max": latest}))
        await self._update_each(self._streams, updates, upsert=False, what="stream heartbeats")

    @_measured
    async def add_usage(self, rows: list[dict[str, Any]]) -> None:
        """Add per-hour figures: each row has streamId, ownerId, hour (a whole UTC hour) and the counts to add
        (framesIn, framesRelayed, framesDropped, onlineS)."""
        updates = []
        for row in rows:
            counts = {k: v for k, v in row.items() if k not in ("streamId", "ownerId", "hour")}
            key = f"{row['hour']:%Y-%m-%dT%H}/{row['streamId']}"
            updates.append(({"_id": key}, {"$inc": counts, "$setOnInsert": {
                "streamId": row["streamId"], "ownerId": row["ownerId"], "hour": row["hour"]}}))
        await self._update_each(self._collection("usage"), updates, upsert=True, what="usage figures")

    async def _update_each(self, collection: Any, updates: list[tuple[dict[str, Any], dict[str, Any]]], *,
                           upsert: bool, what: str) -> None:
        if not updates:
            return
        try:
            if self.is_embedded:  # mongomock's bulk_write does not take pymongo 4's operations
                for query, update in updates:
                    await collection.update_one(query, update, upsert=upsert)
            else:
                await collection.bulk_write([pymongo.UpdateOne(q, u, upsert=upsert) for q, u in updates],
                                            ordered=False)
        except PyMongoError as exc:
            raise StoreUnavailable(f"could not save {what}") from exc

    @_measured
    async def usage_between(self, first_hour: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        """Per-hour figures of the hours starting in [first_hour, end)."""
        query: dict[str, Any] = {"hour": {"$gte": first_hour, "$lt": end}}
        if stream_id is not None:
            query["streamId"] = stream_id
        if owner_id is not None:
            query["ownerId"] = owner_id
        try:
            return [d async for d in self._collection("usage").find(query, projection={"_id": False})]
        except PyMongoError as exc:
            raise StoreUnavailable("could not read usage figures") from exc

    @_measured
    async def prune_usage(self, before: dt.datetime, *, dry_run: bool = False) -> int:
        """Remove (or count) per-hour figures of hours before `before`."""
        query = {"hour": {"$lt": before}}
        try:
            usage = self._collection("usage")
            if dry_run:
                return int(await usage.count_documents(query))
            return int((await usage.delete_many(query)).deleted_count)
        except PyMongoError as exc:
            raise StoreUnavailable("could not prune usage figures") from exc

    @_measured
    async def prunable_streams(self, never_seen_before: dt.datetime | None, seen_before: dt.datetime | None
                               ) -> list[dict[str, Any]]:
        """Offline streams created before `never_seen_before` and never seen, or last seen before `seen_before`
        (None: that rule is off)."""
        query = _prunable_query(never_seen_before, seen_before)
        if query is None:
            return []
        try:
            return [_stream_out(d) async for d in self._streams.find(query).sort([("_id", ASC)])]
        except PyMongoError as exc:
            raise StoreUnavailable("could not list prunable streams") from exc

    @_measured
    async def delete_stream_if_prunable(self, stream_id: str, never_seen_before: dt.datetime | None,
                                        seen_before: dt.datetime | None) -> bool:
        """Delete the stream, with its alerts and snapshots, if it still matches prunable_streams()."""
        query = _prunable_query(never_seen_before, seen_before)
        if query is None:
            return False
        try:
            result = await self._streams.delete_one({"_id": stream_id, **query})
            if not result.deleted_count:
                return False
            await self._alerts.delete_many({"streamId": stream_id})
            await self._snapshots.delete_many({"streamId": stream_id})
        except PyMongoError as exc:
            raise StoreUnavailable("could not delete a stream") from exc
        self._forget_client_ids(stream_id)
        return True

    @_measured
    async def old_alerts_by_stream(self, before: dt.datetime) -> list[dict[str, Any]]:
        """For each stream with alerts received before `before`: streamId, count, maxSeq (of those alerts)."""
        if self.is_embedded:
            return _old_embedded_alerts(self._alerts, before)
        pipeline = [{"$match": {"receivedAt": {"$lt": before}}},
                    {"$group": {"_id": "$streamId", "count": {"$sum": 1}, "maxSeq": {"$max": "$seq"}}},
                    {"$sort": {"_id": 1}}]
        try:
            return [{"streamId": d["_id"], "count": int(d["count"]), "maxSeq": int(d.get("maxSeq") or 0)}
                    async for d in self._alerts.aggregate(pipeline)]
        except PyMongoError as exc:
            raise StoreUnavailable("could not count old alerts") from exc

    @_measured
    async def remove_alerts_before(self, stream_id: str, before: dt.datetime, max_seq: int) -> int:
        """Remove a stream's alerts (and snapshots) from before `before`, first raising its prunedSeq to
        `max_seq` so that a replay from an earlier seq says it is incomplete. Returns how many alerts went."""
        try:
            await self._streams.update_one({"_id": stream_id}, {"$max": {"prunedSeq": max_seq}})
            result = await self._alerts.delete_many({"streamId": stream_id, "receivedAt": {"$lt": before}})
            await self._snapshots.delete_many({"streamId": stream_id, "createdAt": {"$lt": before}})
        except PyMongoError as exc:
            raise StoreUnavailable("could not remove old alerts") from exc
        return int(result.deleted_count)

    @_measured
    async def alert_figures(self, start: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        """Alerts received in [start, end) counted by streamId, ownerId, severity, acknowledged (bool) and
        objectType (metadata.objectType, None when absent): one dict per combination, with `count`."""
        if self.is_embedded:
            return _embedded_alert_figures(self._alerts, start, end, stream_id, owner_id)
        match: dict[str, Any] = {"receivedAt": {"$gte": start, "$lt": end}}
        if stream_id is not None:
            match["streamId"] = stream_id
        if owner_id is not None:
            match["ownerId"] = owner_id
        group = {"streamId": "$streamId", "ownerId": "$ownerId", "severity": "$severity",
                 "acknowledged": {"$ne": [{"$ifNull": ["$acknowledged", None]}, None]},
                 "objectType": "$metadata.objectType"}
        pipeline = [{"$match": match}, {"$group": {"_id": group, "count": {"$sum": 1}}}]
        try:
            return [{**{k: d["_id"].get(k) for k in group}, "count": int(d["count"])}
                    async for d in self._alerts.aggregate(pipeline)]
        except PyMongoError as exc:
            raise StoreUnavailable("could not count alerts") from exc

    @_measured
    async def save_report(self, start: dt.datetime, end: dt.datetime, rows: list[dict[str, Any]]) -> None:
        """Store a period's report rows (each with `scope` and `id`), replacing that period's earlier ones."""
        docs = [{"_id": f"{start.isoformat()}/{end.isoformat()}/{r['scope']}/{r['id']}", "from": start, "to": end,
                 **r} for r in rows]
        reports = self._collection("reports")
        try:
            await reports.delete_many({"from": start, "to": end})
            if docs:
                await reports.insert_many(docs, ordered=False)
        except PyMongoError as exc:
            raise StoreUnavailable("could not store the report") from exc

    async def stored_report(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        """A stored report's rows, in the order they were stored."""
        try:
            cursor = self._collection("reports").find({"from": start, "to": end}, projection={"_id": False})
            return [d async for d in cursor]
        except PyMongoError as exc:
            raise StoreUnavailable("could not read the report") from exc


def _old_embedded_alerts(alerts: Any, before: dt.datetime) -> list[dict[str, Any]]:
    """old_alerts_by_stream() on the embedded store, without a scan of every alert.

    mongomock's aggregation copies and patches every document (37 s for 150,000 alerts, on the event
    loop); one plain pass over the documents in place takes well under a second.
    """
    groups: dict[str, dict[str, Any]] = {}
    for received, doc in _embedded_alerts(alerts):
        if received >= before:
            continue
        group = groups.setdefault(doc["streamId"], {"streamId": doc["streamId"], "count": 0, "maxSeq": 0})
        group["count"] += 1
        group["maxSeq"] = max(group["maxSeq"], int(doc.get("seq") or 0))
    return [groups[k] for k in sorted(groups)]


def _embedded_alert_figures(alerts: Any, start: dt.datetime, end: dt.datetime, stream_id: str | None,
                            owner_id: str | None) -> list[dict[str, Any]]:
    """alert_figures() on the embedded store: one plain pass instead of mongomock's aggregation."""
    counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for received, doc in _embedded_alerts(alerts):
        if received < start or received >= end or (stream_id is not None and doc["streamId"] != stream_id) \
                or (owner_id is not None and doc.get("ownerId") != owner_id):
            continue
        metadata = doc.get("metadata")
        counts[(doc["streamId"], doc.get("ownerId"), doc.get("severity"), doc.get("acknowledged") is not None,
                metadata.get("objectType") if isinstance(metadata, dict) else None)] += 1
    keys = ("streamId", "ownerId", "severity", "acknowledged", "objectType")
    return [{**dict(zip(keys, key)), "count": count} for key, count in counts.items()]


def _embedded_alerts(alerts: Any) -> Iterator[tuple[dt.datetime, dict[str, Any]]]:
    """The embedded store's alert documents, read in place (not copied), with their receivedAt as an
    aware datetime."""
    collection: Any = getattr(alerts, "_AsyncMongoMockCollection__collection")
    for doc in collection._store.documents:
        received = doc.get("receivedAt")
        if not isinstance(received, dt.datetime):
            continue
        yield (received.replace(tzinfo=dt.timezone.utc) if received.tzinfo is None else received), doc


def _install_mongomock_id_lookup() -> None:
    """Give mongomock an O(1) path for exact `{"_id": value}` filters (same result, no scan).

    mongomock applies every filter to every document: with a thousand streams, each status update
    or seq allocation cost ~10 ms. Only string and ObjectId ids take the shortcut; MongoDB matches
    those by equality alone, so the result is exactly the scan's.
    """
    import mongomock.collection

    collection_cls: Any = mongomock.collection.Collection
    if getattr(collection_cls, "_watchout_id_lookup", False):
        return
    scan = collection_cls._iter_documents

    def iter_documents(self: Any, filter: Any) -> Any:
        if type(filter) is dict and len(filter) == 1:
            key = filter.get("_id")
            if type(key) is str or type(key) is ObjectId:
                store = self._store
                return iter([store[key]]) if key in store else iter(())
        return scan(self, filter)

    collection_cls._iter_documents = iter_documents
    collection_cls._watchout_id_lookup = True


def _prunable_query(never_seen_before: dt.datetime | None, seen_before: dt.datetime | None) -> dict[str, Any] | None:
    rules: list[dict[str, Any]] = []
    if never_seen_before is not None:
        rules.append({"lastSeenAt": None, "createdAt": {"$lt": never_seen_before}})
    if seen_before is not None:
        rules.append({"lastSeenAt": {"$lt": seen_before}})
    return {"status": "offline", "$or": rules} if rules else None


async def _ensure_ttl(collection: Any, field: str, ttl_s: int | None) -> None:
    """A TTL index on `field` expiring after ttl_s, changed in place when the retention changes; None drops it."""
    name = f"{field}_ttl"
    indexes = await collection.index_information()
    current = indexes.get(name)
    if ttl_s is None:
        if current is not None:
            await collection.drop_index(name)
    elif current is None:
        await collection.create_index([(field, ASC)], name=name, expireAfterSeconds=ttl_s)
    elif current.get("expireAfterSeconds") != ttl_s:
        await collection.database.command("collMod", collection.name,
                                          index={"name": name, "expireAfterSeconds": ttl_s})


def _alert_query(flt: AlertFilter) -> dict[str, Any]:
    query: dict[str, Any] = {}
    if flt.severities is not None:
        query["severity"] = {"$in": list(flt.severities)}
    if flt.since is not None or flt.until is not None:
        query["receivedAt"] = {**({"$gte": flt.since} if flt.since else {}),
                               **({"$lt": flt.until} if flt.until else {})}
    if flt.acknowledged is not None:
        query["acknowledged"] = {"$ne": None} if flt.acknowledged else None
    return query


def _stream_out(doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["streamId"] = out.pop("_id")
    return out


def _alert_in(alert: dict[str, Any]) -> dict[str, Any]:
    doc = dict(alert)
    doc["_id"] = ObjectId(doc.pop("alertId"))
    if doc.get("clientId") is None:
        doc.pop("clientId", None)
    return doc


def _alert_out(doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["alertId"] = str(out.pop("_id"))
    return out
