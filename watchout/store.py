"""MongoDB access: the only module that imports motor or mongomock-motor, and the only one that knows `_id`."""
from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import pymongo
from bson import ObjectId
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from watchout.errors import StoreUnavailable
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
        try:
            doc = await self._streams.find_one_and_update(
                {"_id": stream_id}, {"$inc": {"alertSeq": count}},
                projection={"alertSeq": True}, return_document=pymongo.ReturnDocument.AFTER)
        except PyMongoError as exc:
            raise StoreUnavailable("could not allocate alert numbers") from exc
        if doc is None:
            raise StoreUnavailable(f"stream {stream_id} disappeared")
        return int(doc["alertSeq"]) - count + 1

    @_measured
    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        """Store alerts (each with `alertId`); returns the clientIds that were already stored."""
        docs = [_alert_in(a) for a in alerts]
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
