"""The MongoDB store (motor), for several nodes sharing one database: the only module that imports motor,
and the only one that knows `_id`. The contract is watchout.store.base.Store."""
from __future__ import annotations

import datetime as dt
from typing import Any

import pymongo
from bson import ObjectId
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from watchout.errors import StoreUnavailable, WriterBusy
from watchout.protocol import StreamStatus
from watchout.store.base import AlertFilter, Measured, new_epoch, operation, utcnow

ASC, DESC = pymongo.ASCENDING, pymongo.DESCENDING
DUPLICATE_KEY = {11000, 11001}
_LIVE = [StreamStatus.ONLINE, StreamStatus.STREAMING]  # the statuses of a stream with a producer


class MongoStore(Measured):
    """Streams, alerts, snapshots and the jobs' collections in one MongoDB database.

    `client` is a motor client (AsyncIOMotorClient); the tests pass mongomock-motor's. connect() makes every
    write wait for a majority of the replica set, so an acknowledged alert survives a failover.
    """

    driver_errors = (PyMongoError,)

    def __init__(self, client: Any, db_name: str) -> None:
        self._client = client
        self._db_name = db_name
        db = client[db_name]
        self._streams = db["streams"]
        self._alerts = db["alerts"]
        self._snapshots = db["snapshots"]
        self._usage = db["usage"]
        self._reports = db["reports"]
        self._locks = db["locks"]
        self._job_runs = db["job_runs"]
        self._destinations = db["destinations"]
        self._deliveries = db["deliveries"]
        self._kv = db["kv"]

    @classmethod
    def connect(cls, mongo_url: str, db_name: str) -> MongoStore:
        """A store on the MongoDB at `mongo_url`; call inside the running event loop."""
        from motor.motor_asyncio import AsyncIOMotorClient
        client: Any = AsyncIOMotorClient(mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000, w="majority")
        return cls(client, db_name)

    @property
    def description(self) -> str:
        return f"MongoDB database {self._db_name}"

    @operation("create indexes")
    async def start(self, alert_retention_d: float = 0.0) -> None:
        """Indexes for every query; TTL indexes that remove alerts and snapshots one day after
        `alert_retention_d` (0: none), a backstop for the prune job, which removes them first and
        records the stream's prunedSeq."""
        await self._alerts.create_index([("streamId", ASC), ("seq", ASC)], unique=True, name="stream_seq")
        await self._alerts.create_index(
            [("streamId", ASC), ("senderId", ASC), ("clientId", ASC)], unique=True, name="stream_client_id",
            partialFilterExpression={"clientId": {"$type": "string"}})
        await self._alerts.create_index([("ownerId", ASC), ("receivedAt", DESC)], name="owner_time")
        await self._alerts.create_index([("streamId", ASC), ("receivedAt", DESC)], name="stream_time")
        await self._alerts.create_index([("receivedAt", DESC)], name="received")
        await self._streams.create_index([("ownerId", ASC), ("createdAt", DESC)], name="owner_created")
        await self._streams.create_index([("status", ASC), ("lastSeenAt", ASC)], name="status_seen")
        await self._snapshots.create_index([("streamId", ASC), ("createdAt", ASC)], name="stream_created")
        await self._snapshots.create_index([("createdAt", ASC)], name="created")
        await self._usage.create_index([("hour", ASC), ("streamId", ASC)], name="hour_stream")
        await self._reports.create_index([("from", ASC), ("to", ASC)], name="period")
        await self._alerts.create_index([("fanout", ASC)], name="fanout", partialFilterExpression={"fanout": True})
        await self._destinations.create_index([("ownerId", ASC), ("createdAt", ASC)], name="owner_created")
        await self._deliveries.create_index([("alertId", ASC), ("destinationId", ASC), ("purpose", ASC)],
                                            unique=True, name="alert_destination")
        await self._deliveries.create_index([("state", ASC), ("nextAt", ASC)], name="state_due")
        await self._deliveries.create_index([("destinationId", ASC), ("streamId", ASC), ("deliveredAt", DESC)],
                                            name="cooldown")
        ttl_s = int((alert_retention_d + 1) * 86400) if alert_retention_d else None
        await _ensure_ttl(self._alerts, "receivedAt", ttl_s)
        await _ensure_ttl(self._snapshots, "createdAt", ttl_s)

    async def ping(self) -> None:
        try:
            await self._client.admin.command("ping")
        except PyMongoError as exc:
            raise StoreUnavailable("database did not answer") from exc

    def close(self) -> None:
        self._client.close()

    async def drop(self) -> None:
        """Remove the whole database (tests)."""
        await self._client.drop_database(self._db_name)

    # ------------------------------------------------------------------ streams
    @operation("read stream")
    async def get_stream(self, stream_id: str) -> dict[str, Any] | None:
        doc = await self._streams.find_one({"_id": stream_id})
        return _stream_out(doc) if doc else None

    @operation("create stream")
    async def create_stream(self, stream_id: str, owner_id: str, name: str | None = None, *,
                            status: str = StreamStatus.OFFLINE, metadata: dict[str, Any] | None = None,
                            exclusive: bool = False) -> dict[str, Any] | None:
        now = utcnow()
        doc = {"_id": stream_id, "ownerId": owner_id, "name": name or stream_id, "status": status,
               "createdAt": now, "lastSeenAt": now if status != StreamStatus.OFFLINE else None, "lastFrameAt": None,
               "alertSeq": 0, "lastSeq": 0, "prunedSeq": 0, "epoch": new_epoch(), "metadata": metadata or {}}
        try:
            await self._streams.insert_one(doc)
        except DuplicateKeyError:
            if exclusive:
                return None
            existing = await self._streams.find_one({"_id": stream_id})
            if existing is None:  # pragma: no cover - deleted between the two calls
                raise StoreUnavailable("stream vanished while being created") from None
            return _stream_out(existing)
        return _stream_out(doc)

    @operation("list streams")
    async def list_streams(self, owner_id: str | None, status: str | None, limit: int,
                           after: tuple[str, str] | None = None, *, stream_ids: list[str] | None = None
                           ) -> list[dict[str, Any]]:
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
        cursor = self._streams.find(query).sort([("createdAt", DESC), ("_id", DESC)]).limit(limit)
        return [_stream_out(d) async for d in cursor]

    @operation("delete stream")
    async def delete_stream(self, stream_id: str) -> bool:
        result = await self._streams.delete_one({"_id": stream_id})
        await self._alerts.delete_many({"streamId": stream_id})
        await self._snapshots.delete_many({"streamId": stream_id})
        await self._deliveries.delete_many({"streamId": stream_id})
        return bool(result.deleted_count)

    @operation("update stream status")
    async def set_stream_status(self, stream_id: str, status: str, *, frame_at: dt.datetime | None = None) -> None:
        update: dict[str, Any] = {"status": status, "lastSeenAt": utcnow()}
        if frame_at is not None:
            update["lastFrameAt"] = frame_at
        await self._streams.update_one({"_id": stream_id}, {"$set": update})

    @operation("save stream heartbeats")
    async def record_heartbeats(self, beats: list[tuple[str, dt.datetime, dt.datetime | None]]) -> None:
        updates = []
        for stream_id, seen, frame in beats:
            latest = {"lastSeenAt": seen, **({"lastFrameAt": frame} if frame is not None else {})}
            updates.append(pymongo.UpdateOne({"_id": stream_id}, {"$max": latest}))
        if updates:
            await self._streams.bulk_write(updates, ordered=False)

    @operation("mark streams offline")
    async def mark_streams_offline(self, last_heard: dict[str, dt.datetime]) -> list[str]:
        changed = []
        for stream_id, heard in last_heard.items():
            result = await self._streams.update_one(
                {"_id": stream_id, "status": {"$in": _LIVE}},
                {"$set": {"status": StreamStatus.OFFLINE}, "$max": {"lastSeenAt": heard}})
            if result.modified_count:
                changed.append(stream_id)
        return changed

    @operation("mark unseen streams offline")
    async def mark_unseen_streams_offline(self, seen_before: dt.datetime, exclude: set[str]) -> list[str]:
        query = {"status": {"$in": _LIVE}, "lastSeenAt": {"$lt": seen_before}}
        changed = []
        candidates = [d["_id"] async for d in self._streams.find(query, projection={"_id": True})]
        for stream_id in candidates:
            if stream_id in exclude:
                continue
            result = await self._streams.update_one({"_id": stream_id, **query},
                                                    {"$set": {"status": StreamStatus.OFFLINE}})
            if result.modified_count:
                changed.append(stream_id)
        return changed

    # ------------------------------------------------------------------ alerts
    @operation("allocate alert numbers")
    async def reserve_batch(self, stream_id: str, count: int, writer: str, lease_s: float) -> tuple[int, int]:
        query: dict[str, Any] = {"_id": stream_id}
        change: dict[str, Any] = {"$inc": {"alertSeq": count}}
        now = utcnow()
        if lease_s:
            query["$or"] = [{"writer": {"$in": [None, writer]}}, {"writerUntil": {"$lt": now}}]
            change["$set"] = {"writer": writer, "writerUntil": now + dt.timedelta(seconds=lease_s)}
        doc = await self._streams.find_one_and_update(
            query, change, projection={"alertSeq": True, "lastSeq": True},
            return_document=pymongo.ReturnDocument.AFTER)
        if doc is None and lease_s and await self._streams.find_one({"_id": stream_id}, {"_id": True}):
            raise WriterBusy(f"another node is writing alerts of {stream_id}")
        if doc is None:
            raise StoreUnavailable(f"stream {stream_id} disappeared")
        return int(doc["alertSeq"]) - count + 1, int(doc.get("lastSeq", 0))

    @operation("release the stream's alert writer lease")
    async def release_writer(self, stream_id: str, writer: str) -> None:
        await self._streams.update_one({"_id": stream_id, "writer": writer}, {"$set": {"writer": None}})

    @operation("store alerts")
    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        docs = [_alert_in(a) for a in alerts]
        try:
            await self._alerts.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") not in DUPLICATE_KEY for e in errors):
                raise
            return {docs[e["index"]].get("clientId") for e in errors if docs[e["index"]].get("clientId")}
        return set()

    @operation("update the stream's last alert number")
    async def mark_stored(self, stream_id: str, seq: int) -> None:
        await self._streams.update_one({"_id": stream_id}, {"$max": {"lastSeq": seq}})

    @operation("read alerts")
    async def stream_history(self, stream_id: str, max_seq: int, flt: AlertFilter, limit: int,
                             before_seq: int | None = None) -> list[dict[str, Any]]:
        query = _alert_query(flt)
        query["streamId"] = stream_id
        bound = max_seq if before_seq is None else min(max_seq, before_seq - 1)
        query["seq"] = {"$lte": bound, **({"$gt": flt.after_seq} if flt.after_seq is not None else {})}
        return await self._find_alerts(query, [("seq", DESC)], limit)

    @operation("read alerts")
    async def alert_history(self, stream_ids: list[str] | None, owner_id: str | None, flt: AlertFilter,
                            limit: int, before: tuple[str, str] | None = None) -> list[dict[str, Any]]:
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

    @operation("read alerts")
    async def replay(self, stream_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        return await self._find_alerts({"streamId": stream_id, "seq": {"$gt": after_seq}}, [("seq", ASC)], limit)

    async def _find_alerts(self, query: dict[str, Any], order: list[tuple[str, int]], limit: int
                           ) -> list[dict[str, Any]]:
        cursor = self._alerts.find(query).sort(order).limit(limit)
        return [_alert_out(d) async for d in cursor]

    @operation("read alert")
    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        if not ObjectId.is_valid(alert_id):
            return None
        doc = await self._alerts.find_one({"_id": ObjectId(alert_id)})
        return _alert_out(doc) if doc else None

    @operation("acknowledge alert")
    async def acknowledge_alert(self, alert_id: str, by: str) -> dict[str, Any] | None:
        if not ObjectId.is_valid(alert_id):
            return None
        doc = await self._alerts.find_one_and_update(
            {"_id": ObjectId(alert_id), "acknowledged": None},
            {"$set": {"acknowledged": {"by": by, "at": utcnow()}}},
            return_document=pymongo.ReturnDocument.AFTER)
        if doc is None:
            doc = await self._alerts.find_one({"_id": ObjectId(alert_id)})
        return _alert_out(doc) if doc else None

    @operation("read alert")
    async def find_alert_by_client_id(self, stream_id: str, sender_id: str, client_id: str) -> dict[str, Any] | None:
        doc = await self._alerts.find_one({"streamId": stream_id, "senderId": sender_id, "clientId": client_id})
        return _alert_out(doc) if doc else None

    @operation("count alerts")
    async def count_alerts(self, stream_id: str) -> int:
        return int(await self._alerts.count_documents({"streamId": stream_id}))

    @operation("store snapshot")
    async def save_snapshot(self, alert_id: str, stream_id: str, jpeg: bytes) -> None:
        await self._snapshots.insert_one({"_id": alert_id, "streamId": stream_id, "jpeg": jpeg, "createdAt": utcnow()})

    @operation("read snapshot")
    async def get_snapshot(self, alert_id: str) -> tuple[str, bytes] | None:
        doc = await self._snapshots.find_one({"_id": alert_id})
        return (doc["streamId"], bytes(doc["jpeg"])) if doc else None

    # ------------------------------------------------------------------ notifications
    @operation("store destination")
    async def create_destination(self, doc: dict[str, Any]) -> None:
        await self._destinations.insert_one({"_id": doc["destinationId"], **doc})

    @operation("read destination")
    async def get_destination(self, destination_id: str) -> dict[str, Any] | None:
        return _without_id(await self._destinations.find_one({"_id": destination_id}))

    @operation("list destinations")
    async def list_destinations(self, owner_id: str | None = None, channel: str | None = None
                                ) -> list[dict[str, Any]]:
        query = {k: v for k, v in (("ownerId", owner_id), ("channel", channel)) if v is not None}
        cursor = self._destinations.find(query).sort([("createdAt", ASC), ("_id", ASC)])
        return [{k: v for k, v in d.items() if k != "_id"} async for d in cursor]

    @operation("update destination")
    async def update_destination(self, destination_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        doc = await self._destinations.find_one_and_update(
            {"_id": destination_id}, {"$set": fields}, return_document=pymongo.ReturnDocument.AFTER)
        return _without_id(doc)

    @operation("delete destination")
    async def delete_destination(self, destination_id: str) -> bool:
        await self._deliveries.update_many(
            {"destinationId": destination_id, "state": "pending"},
            {"$set": {"state": "cancelled", "lastError": "destination deleted"},
             "$unset": {"leaseOwner": "", "leaseUntil": ""}})
        result = await self._destinations.delete_one({"_id": destination_id})
        return bool(result.deleted_count)

    @operation("read alerts to notify")
    async def alerts_to_fan_out(self, limit: int) -> list[dict[str, Any]]:
        cursor = self._alerts.find({"fanout": True}).sort([("_id", ASC)]).limit(limit)
        return [_alert_out(d) async for d in cursor]

    @operation("store deliveries")
    async def add_deliveries(self, deliveries: list[dict[str, Any]], fanned_out: list[str]) -> None:
        # not one transaction: a repeat after a failure between the two steps inserts nothing twice
        if deliveries:
            try:
                await self._deliveries.insert_many([{"_id": d["deliveryId"], **d} for d in deliveries],
                                                   ordered=False)
            except BulkWriteError as exc:
                if any(e.get("code") not in DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                    raise
        if fanned_out:
            await self._alerts.update_many({"_id": {"$in": [ObjectId(a) for a in fanned_out]}},
                                           {"$unset": {"fanout": ""}})

    @operation("claim deliveries")
    async def claim_deliveries(self, owner: str, now: dt.datetime, lease_s: float, limit: int
                               ) -> list[dict[str, Any]]:
        free = {"state": "pending", "nextAt": {"$lte": now},
                "$or": [{"leaseUntil": None}, {"leaseUntil": {"$lt": now}}]}
        lease = {"$set": {"leaseOwner": owner, "leaseUntil": now + dt.timedelta(seconds=lease_s)}}
        claimed = []
        for _ in range(limit):
            doc = await self._deliveries.find_one_and_update(free, lease, sort=[("nextAt", ASC), ("alertId", ASC)],
                                                             return_document=pymongo.ReturnDocument.AFTER)
            if doc is None:
                break
            claimed.append(_delivery_out(doc))
        alerts = {a["alertId"]: a for a in [_alert_out(d) async for d in self._alerts.find(
            {"_id": {"$in": [ObjectId(d["alertId"]) for d in claimed]}})]} if claimed else {}
        for d in claimed:
            d["alert"] = alerts.get(d["alertId"])
        return claimed

    @operation("release delivery leases")
    async def release_delivery_leases(self) -> int:
        result = await self._deliveries.update_many({"leaseOwner": {"$ne": None}},
                                                    {"$unset": {"leaseOwner": "", "leaseUntil": ""}})
        return int(result.modified_count)

    @operation("record a delivery attempt")
    async def finish_attempt(self, delivery_id: str, owner: str, fields: dict[str, Any]) -> bool:
        result = await self._deliveries.update_one(
            {"_id": delivery_id, "leaseOwner": owner},
            {"$set": fields, "$unset": {"leaseOwner": "", "leaseUntil": ""}})
        return bool(result.matched_count)

    @operation("read deliveries")
    async def last_delivered(self, destination_id: str, stream_id: str) -> dt.datetime | None:
        doc = await self._deliveries.find_one(
            {"destinationId": destination_id, "streamId": stream_id, "deliveredAt": {"$ne": None}},
            sort=[("deliveredAt", DESC)])
        return None if doc is None else doc["deliveredAt"]

    @operation("read deliveries")
    async def deliveries_of_alert(self, alert_id: str) -> list[dict[str, Any]]:
        cursor = self._deliveries.find({"alertId": alert_id}).sort([("createdAt", ASC), ("_id", ASC)])
        return [_delivery_out(d) async for d in cursor]

    @operation("read a kept value")
    async def get_value(self, key: str) -> str | None:
        doc = await self._kv.find_one({"_id": key})
        return None if doc is None else str(doc["value"])

    @operation("keep a value")
    async def put_value_if_absent(self, key: str, value: str) -> str:
        doc = await self._kv.find_one_and_update({"_id": key}, {"$setOnInsert": {"value": value}}, upsert=True,
                                                 return_document=pymongo.ReturnDocument.AFTER)
        return str(doc["value"])

    @operation("count deliveries")
    async def delivery_backlog(self) -> tuple[int, dt.datetime | None]:
        count = await self._deliveries.count_documents({"state": "pending"})
        oldest = await self._deliveries.find_one({"state": "pending"}, sort=[("createdAt", ASC)])
        return int(count), None if oldest is None else oldest["createdAt"]

    # ------------------------------------------------------------------ jobs (workers/)
    @operation("save usage figures")
    async def add_usage(self, rows: list[dict[str, Any]]) -> None:
        updates = []
        for row in rows:
            counts = {k: v for k, v in row.items() if k not in ("streamId", "ownerId", "hour")}
            key = f"{row['hour']:%Y-%m-%dT%H}/{row['streamId']}"
            updates.append(pymongo.UpdateOne({"_id": key}, {"$inc": counts, "$setOnInsert": {
                "streamId": row["streamId"], "ownerId": row["ownerId"], "hour": row["hour"]}}, upsert=True))
        if updates:
            await self._usage.bulk_write(updates, ordered=False)

    @operation("read usage figures")
    async def usage_between(self, first_hour: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"hour": {"$gte": first_hour, "$lt": end}}
        if stream_id is not None:
            query["streamId"] = stream_id
        if owner_id is not None:
            query["ownerId"] = owner_id
        return [d async for d in self._usage.find(query, projection={"_id": False})]

    @operation("prune usage figures")
    async def prune_usage(self, before: dt.datetime, *, dry_run: bool = False) -> int:
        query = {"hour": {"$lt": before}}
        if dry_run:
            return int(await self._usage.count_documents(query))
        return int((await self._usage.delete_many(query)).deleted_count)

    @operation("list prunable streams")
    async def prunable_streams(self, never_seen_before: dt.datetime | None, seen_before: dt.datetime | None
                               ) -> list[dict[str, Any]]:
        query = _prunable_query(never_seen_before, seen_before)
        if query is None:
            return []
        return [_stream_out(d) async for d in self._streams.find(query).sort([("_id", ASC)])]

    @operation("delete a stream")
    async def delete_stream_if_prunable(self, stream_id: str, never_seen_before: dt.datetime | None,
                                        seen_before: dt.datetime | None) -> bool:
        query = _prunable_query(never_seen_before, seen_before)
        if query is None:
            return False
        result = await self._streams.delete_one({"_id": stream_id, **query})
        if not result.deleted_count:
            return False
        await self._alerts.delete_many({"streamId": stream_id})
        await self._snapshots.delete_many({"streamId": stream_id})
        return True

    @operation("count old alerts")
    async def old_alerts_by_stream(self, before: dt.datetime) -> list[dict[str, Any]]:
        pipeline = [{"$match": {"receivedAt": {"$lt": before}}},
                    {"$group": {"_id": "$streamId", "count": {"$sum": 1}, "maxSeq": {"$max": "$seq"}}},
                    {"$sort": {"_id": 1}}]
        return [{"streamId": d["_id"], "count": int(d["count"]), "maxSeq": int(d.get("maxSeq") or 0)}
                async for d in self._alerts.aggregate(pipeline)]

    @operation("remove old alerts")
    async def remove_alerts_before(self, before: dt.datetime, max_seqs: dict[str, int]) -> int:
        raises = [pymongo.UpdateOne({"_id": sid}, {"$max": {"prunedSeq": seq}}) for sid, seq in max_seqs.items()]
        if raises:
            await self._streams.bulk_write(raises, ordered=False)
        result = await self._alerts.delete_many({"receivedAt": {"$lt": before}})
        await self._snapshots.delete_many({"createdAt": {"$lt": before}})
        # an alert id is an ObjectId made when the alert was received: the deliveries of those alerts
        await self._deliveries.delete_many({"alertId": {"$lt": str(ObjectId.from_datetime(before))}})
        return int(result.deleted_count)

    @operation("count alerts")
    async def alert_figures(self, start: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        match: dict[str, Any] = {"receivedAt": {"$gte": start, "$lt": end}}
        if stream_id is not None:
            match["streamId"] = stream_id
        if owner_id is not None:
            match["ownerId"] = owner_id
        group = {"streamId": "$streamId", "ownerId": "$ownerId", "severity": "$severity",
                 "acknowledged": {"$ne": [{"$ifNull": ["$acknowledged", None]}, None]},
                 "objectType": "$metadata.objectType"}
        pipeline = [{"$match": match}, {"$group": {"_id": group, "count": {"$sum": 1}}}]
        return [{**{k: d["_id"].get(k) for k in group}, "count": int(d["count"])}
                async for d in self._alerts.aggregate(pipeline)]

    @operation("store the report")
    async def save_report(self, start: dt.datetime, end: dt.datetime, rows: list[dict[str, Any]]) -> None:
        docs = [{"_id": f"{start.isoformat()}/{end.isoformat()}/{r['scope']}/{r['id']}", "from": start, "to": end,
                 "position": i, **r} for i, r in enumerate(rows)]
        await self._reports.delete_many({"from": start, "to": end})
        if docs:
            await self._reports.insert_many(docs, ordered=False)

    @operation("read the report")
    async def stored_report(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        cursor = self._reports.find({"from": start, "to": end}, projection={"_id": False}).sort([("position", ASC)])
        return [{k: v for k, v in d.items() if k != "position"} async for d in cursor]

    @operation("take a job lease")
    async def acquire_lease(self, job: str, owner: str, slot: dt.datetime, now: dt.datetime, lease_s: float) -> bool:
        query = {"_id": job, "slot": {"$lt": slot}, "$or": [{"until": {"$lte": now}}, {"owner": owner}]}
        update = {"$set": {"owner": owner, "slot": slot, "takenAt": now,
                           "until": now + dt.timedelta(seconds=lease_s)}}
        try:
            doc = await self._locks.find_one_and_update(query, update, upsert=True,
                                                        return_document=pymongo.ReturnDocument.AFTER)
        except DuplicateKeyError:  # the lease exists and is not ours to take
            return False
        return doc is not None

    @operation("renew a job lease")
    async def renew_lease(self, job: str, owner: str, now: dt.datetime, lease_s: float) -> bool:
        result = await self._locks.update_one(
            {"_id": job, "owner": owner}, {"$set": {"until": now + dt.timedelta(seconds=lease_s)}})
        return bool(result.matched_count)

    @operation("release a job lease")
    async def release_lease(self, job: str, owner: str, now: dt.datetime) -> None:
        await self._locks.update_one({"_id": job, "owner": owner}, {"$set": {"until": now}})

    @operation("read job leases")
    async def leases(self) -> list[dict[str, Any]]:
        return [{"job": d.pop("_id"), **d} async for d in self._locks.find({}).sort([("_id", ASC)])]

    @operation("record a job run")
    async def record_job_run(self, run_id: str, run: dict[str, Any]) -> None:
        await self._job_runs.replace_one({"_id": run_id}, run, upsert=True)

    @operation("prune job runs")
    async def prune_job_runs(self, before: dt.datetime) -> int:
        result = await self._job_runs.delete_many({"scope": "node", "startedAt": {"$lt": before}})
        return int(result.deleted_count)

    @operation("read job runs")
    async def job_runs(self) -> list[dict[str, Any]]:
        return [{"runId": d.pop("_id"), **d} async for d in self._job_runs.find({}).sort([("_id", ASC)])]


def _prunable_query(never_seen_before: dt.datetime | None, seen_before: dt.datetime | None) -> dict[str, Any] | None:
    rules: list[dict[str, Any]] = []
    if never_seen_before is not None:
        rules.append({"lastSeenAt": None, "createdAt": {"$lt": never_seen_before}})
    if seen_before is not None:
        rules.append({"lastSeenAt": {"$lt": seen_before}})
    return {"status": StreamStatus.OFFLINE, "$or": rules} if rules else None


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
    if "epoch" not in out:  # created before histories had an identity: one derived from its creation, stable
        out["epoch"] = f"c{int(out['createdAt'].timestamp() * 1000):015x}"
    out.pop("writer", None)
    out.pop("writerUntil", None)
    return out


def _alert_in(alert: dict[str, Any]) -> dict[str, Any]:
    doc = dict(alert)
    doc["_id"] = ObjectId(doc.pop("alertId"))
    doc["fanout"] = True  # not yet handed to the notification destinations
    if doc.get("clientId") is None:
        doc.pop("clientId", None)
    return doc


def _alert_out(doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["alertId"] = str(out.pop("_id"))
    out.pop("fanout", None)
    return out


def _without_id(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    out = dict(doc)
    out.pop("_id", None)
    return out


_DELIVERY_KEYS = ("deliveryId", "alertId", "streamId", "destinationId", "channel", "purpose", "state", "attempts",
                  "nextAt", "createdAt", "deliveredAt", "lastError", "lastStatus", "summarisedIn")


def _delivery_out(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: doc.get(key) for key in _DELIVERY_KEYS}
