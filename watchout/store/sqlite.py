"""The embedded store: one SQLite database file under data_dir, written off the event loop (store.dbthread).

Durability: WAL journal; `synchronous` NORMAL by default, so a committed transaction survives the
process being killed (the WAL is in the operating system's hands once COMMIT returns) and a power
cut can lose the transactions of the last moments before it, never corrupt the file; FULL also keeps
those, at the cost of one fsync per commit (docs/configuration.md, `sqlite_synchronous`).
Times are stored as integer milliseconds since the epoch (UTC), as MongoDB keeps them, so cursors
made from either store's ISO times compare the same way.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from watchout import __version__
from watchout.errors import ConfigError, StoreUnavailable, WriterBusy
from watchout.protocol import StreamStatus
from watchout.settings import SQLITE_SYNCHRONOUS
from watchout.store.base import AlertFilter, Measured, is_alert_id, new_epoch, operation
from watchout.store.dbthread import Database

T = TypeVar("T")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
ONE_MS = dt.timedelta(milliseconds=1)
BUSY_TIMEOUT_S = 10.0  # another process (the admin CLI) holding the write lock
DELETE_CHUNK = 2000  # rows per transaction when removing many: other writes go in between
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL kept on disk once checkpointed (it grows during big writes)

# Each entry takes the schema from the version before it (its index) to the next; user_version says
# which ran. Append, never edit: a database in the field went through the old ones.
MIGRATIONS: tuple[str, ...] = ("""
CREATE TABLE streams (
    stream_id     TEXT PRIMARY KEY,
    owner_id      TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER,
    last_frame_at INTEGER,
    alert_seq     INTEGER NOT NULL DEFAULT 0,  -- alert numbers handed out
    last_seq      INTEGER NOT NULL DEFAULT 0,  -- every alert up to it is stored
    pruned_seq    INTEGER NOT NULL DEFAULT 0,  -- alerts up to it may have been removed by retention
    writer        TEXT,
    writer_until  INTEGER
) WITHOUT ROWID;
CREATE INDEX streams_created ON streams (created_at, stream_id);
CREATE INDEX streams_owner_created ON streams (owner_id, created_at, stream_id);
CREATE INDEX streams_status_seen ON streams (status, last_seen_at);

CREATE TABLE alerts (
    alert_id        TEXT NOT NULL UNIQUE,
    stream_id       TEXT NOT NULL REFERENCES streams (stream_id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    owner_id        TEXT NOT NULL,
    sender_id       TEXT NOT NULL,
    severity        TEXT NOT NULL,
    message         TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    timestamp,                                   -- the sender's number, integer or real as sent
    received_at     INTEGER NOT NULL,
    client_id       TEXT,
    acknowledged_by TEXT,
    acknowledged_at INTEGER,
    has_snapshot    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (stream_id, seq)
);
CREATE UNIQUE INDEX alerts_client_id ON alerts (stream_id, sender_id, client_id) WHERE client_id IS NOT NULL;
CREATE INDEX alerts_owner_time ON alerts (owner_id, received_at, alert_id);
CREATE INDEX alerts_time ON alerts (received_at, alert_id);

CREATE TABLE snapshots (
    alert_id   TEXT PRIMARY KEY,
    stream_id  TEXT NOT NULL REFERENCES streams (stream_id) ON DELETE CASCADE,
    jpeg       BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX snapshots_stream_created ON snapshots (stream_id, created_at);

CREATE TABLE usage (
    hour           INTEGER NOT NULL,
    stream_id      TEXT NOT NULL,
    owner_id       TEXT NOT NULL,
    frames_in      INTEGER NOT NULL DEFAULT 0,
    frames_relayed INTEGER NOT NULL DEFAULT 0,
    frames_dropped INTEGER NOT NULL DEFAULT 0,
    online_s       REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, stream_id)
);

CREATE TABLE reports (
    period_from INTEGER NOT NULL,
    period_to   INTEGER NOT NULL,
    position    INTEGER NOT NULL,
    row         TEXT NOT NULL,
    PRIMARY KEY (period_from, period_to, position)
) WITHOUT ROWID;

CREATE TABLE locks (
    job      TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    slot     INTEGER NOT NULL,
    taken_at INTEGER NOT NULL,
    until    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE job_runs (
    run_id     TEXT PRIMARY KEY,
    scope      TEXT,
    started_at INTEGER,
    run        TEXT NOT NULL
) WITHOUT ROWID;
""", """
-- 2: retention deletes by time, in the order rows were written (a few pages per chunk, not thousands):
-- the time index also covers old_alerts_by_stream, and snapshots get one of their own.
DROP INDEX alerts_time;
CREATE INDEX alerts_time ON alerts (received_at, alert_id, stream_id, seq);
CREATE INDEX snapshots_created ON snapshots (created_at);
""", """
-- 3: each stream's alert history has an identity, new when the history starts again
ALTER TABLE streams ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
UPDATE streams SET epoch = lower(hex(randomblob(8))) WHERE epoch = '';
""", """
-- 4: notifications. An alert is stored with fanout = 1 and handed to the destinations once (its
-- deliveries made, fanout = 0, in one transaction); alerts stored before this version are not.
ALTER TABLE alerts ADD COLUMN fanout INTEGER NOT NULL DEFAULT 0;
CREATE INDEX alerts_fanout ON alerts (alert_id) WHERE fanout = 1;

CREATE TABLE destinations (
    destination_id TEXT PRIMARY KEY,
    owner_id       TEXT NOT NULL,
    channel        TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    doc            TEXT NOT NULL               -- rules and the channel's settings, JSON
) WITHOUT ROWID;
CREATE INDEX destinations_owner ON destinations (owner_id, created_at);

CREATE TABLE deliveries (
    delivery_id    TEXT PRIMARY KEY,
    alert_id       TEXT NOT NULL REFERENCES alerts (alert_id) ON DELETE CASCADE,
    stream_id      TEXT NOT NULL,
    destination_id TEXT NOT NULL,              -- kept (cancelled) when the destination goes: the receipts stay
    channel        TEXT NOT NULL,
    purpose        TEXT NOT NULL,              -- notify, escalate
    state          TEXT NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_at        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    delivered_at   INTEGER,
    last_error     TEXT,
    last_status    INTEGER,
    summarised_in  TEXT,
    lease_owner    TEXT,
    lease_until    INTEGER,
    UNIQUE (alert_id, destination_id, purpose)
) WITHOUT ROWID;
CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';

CREATE TABLE kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX deliveries_pending_destination ON deliveries (destination_id) WHERE state = 'pending';
CREATE INDEX deliveries_cooldown ON deliveries (destination_id, stream_id, delivered_at)
    WHERE delivered_at IS NOT NULL;
""")
SCHEMA_VERSION = len(MIGRATIONS)

_STREAM_COLUMNS = ("stream_id, owner_id, name, status, metadata, created_at, last_seen_at, last_frame_at, "
                   "alert_seq, last_seq, pruned_seq, epoch")
_ALERT_COLUMNS = ("alert_id, stream_id, seq, owner_id, sender_id, severity, message, metadata, timestamp, "
                  "received_at, client_id, acknowledged_by, acknowledged_at, has_snapshot")
_INSERT_ALERT = (f"INSERT INTO alerts ({_ALERT_COLUMNS}, fanout) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, 1) "
                 "ON CONFLICT (stream_id, sender_id, client_id) WHERE client_id IS NOT NULL DO NOTHING")
_DELIVERY_COLUMNS = ("delivery_id, alert_id, stream_id, destination_id, channel, purpose, state, attempts, next_at, "
                     "created_at, delivered_at, last_error, last_status, summarised_in")
_DELIVERY_FIELDS = {"state": "state", "attempts": "attempts", "nextAt": "next_at", "deliveredAt": "delivered_at",
                    "lastError": "last_error", "lastStatus": "last_status", "summarisedIn": "summarised_in"}
_USAGE_COUNTS = {"framesIn": "frames_in", "framesRelayed": "frames_relayed", "framesDropped": "frames_dropped",
                 "onlineS": "online_s"}


class SQLiteStore(Measured):
    """Every Store method on one SQLite database (see watchout.store.base for the contract).

    Writes go through the writer thread, grouped per loop turn into one transaction; reads through the
    reader thread. Removing many rows (retention, deleting a stream) goes in chunks of DELETE_CHUNK,
    so alerts keep being stored meanwhile.
    """

    driver_errors = (sqlite3.Error,)

    def __init__(self, path: str, *, synchronous: str = "normal") -> None:
        if synchronous not in SQLITE_SYNCHRONOUS:
            raise ConfigError("sqlite_synchronous", f"must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
        self.path = path
        self._synchronous = synchronous.upper()
        self._memory = path == ":memory:"
        self._db = Database(self._connect_writer, None if self._memory else self._connect_reader,
                            None if self._memory else self._open)

    @property
    def description(self) -> str:
        return "SQLite in memory (nothing is kept)" if self._memory else f"SQLite {Path(self.path).resolve()}"

    # ---------------------------------------------------------------- life cycle
    async def start(self, alert_retention_d: float = 0.0) -> None:
        """Open (creating or migrating) the database. ConfigError when it cannot be used at all."""
        try:
            await self._db.start()
        except sqlite3.Error as exc:
            raise ConfigError("data_dir", self._open_problem(exc)) from exc

    def _open_problem(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if "not a database" in text:
            return (f"{self.path} is not a SQLite database (is data_dir pointing at the right directory?); "
                    "move the file away or set data_dir elsewhere")
        if "unable to open" in text or "readonly" in text:
            return (f"cannot open {self.path} for writing ({text}): check that data_dir exists and that this "
                    "user may write to it")
        return f"cannot open {self.path}: {text}"

    def _open(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S,
                                     check_same_thread=False)
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            connection.execute("PRAGMA foreign_keys = ON")
            connection.execute("PRAGMA temp_store = MEMORY")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_writer(self) -> sqlite3.Connection:
        is_new = not self._memory and not os.path.exists(self.path)
        connection = self._open()
        if is_new:  # alerts and snapshots are private: 0600 (SQLite gives its -wal and -shm files the same)
            os.chmod(self.path, 0o600)
        try:
            version = int(connection.execute("PRAGMA user_version").fetchone()[0])  # fails on a non-database
            if version > SCHEMA_VERSION:  # refuse before changing anything in the file
                raise ConfigError(
                    "data_dir", f"{self.path} has schema version {version}, written by a newer Watchout; this Watchout "
                    f"({__version__}) knows schema versions up to {SCHEMA_VERSION}. Upgrade Watchout, or restore "
                    "a backup made by this version")
            if not self._memory:
                connection.execute("PRAGMA journal_mode = WAL")
                connection.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer thread does it (dbthread)
                connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            _migrate(connection, version)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_reader(self) -> sqlite3.Connection:
        connection = self._open()
        connection.execute("PRAGMA query_only = ON")
        return connection

    async def ping(self) -> None:
        try:
            await self._db.read(lambda c: c.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"database did not answer: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    @operation("back up the database")
    async def backup(self, target: str) -> dict[str, int]:
        """Copy the database into `target`, a new or empty file, as it is at one moment; writes go on meanwhile.

        SQLite's backup API in one step, on the reader's connection (WAL: the writer is never held up).
        The copy is left in rollback-journal mode, one self-contained file, and checked (quick_check).
        Returns its {"streams", "alerts", "snapshots"} counts. Raises StoreUnavailable when the copy
        cannot be written or fails its check; `target` may then hold part of a copy.
        """
        def copy(connection: sqlite3.Connection) -> dict[str, int]:
            source = connection
            if self._memory:
                # read() runs on the writer here, inside its transaction, where the backup API answers
                # SQLITE_LOCKED for ever (Python retries it): copy this transaction's view instead
                source = sqlite3.connect(":memory:")
                source.deserialize(connection.serialize())
            destination = sqlite3.connect(target, isolation_level=None)
            try:
                source.backup(destination)
                destination.execute("PRAGMA journal_mode = DELETE")
                problems = [row[0] for row in destination.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise StoreUnavailable(f"the copy failed its check: {'; '.join(problems[:3])}")
                return {table: int(destination.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                        for table in ("streams", "alerts", "snapshots")}
            finally:
                destination.close()
                if source is not connection:
                    source.close()
        return await self._db.read(copy)

    # ---------------------------------------------------------------- streams
    @operation("read stream")
    async def get_stream(self, stream_id: str) -> dict[str, Any] | None:
        return await self._db.read(lambda c: _get_stream(c, stream_id))

    @operation("create stream")
    async def create_stream(self, stream_id: str, owner_id: str, name: str | None = None, *,
                            status: str = StreamStatus.OFFLINE, metadata: dict[str, Any] | None = None,
                            exclusive: bool = False) -> dict[str, Any] | None:
        now = _ms(dt.datetime.now(dt.timezone.utc))
        row = (stream_id, owner_id, name or stream_id, status, _json(metadata or {}), now,
               now if status != StreamStatus.OFFLINE else None, new_epoch())

        def create(c: sqlite3.Connection) -> dict[str, Any] | None:
            inserted = c.execute("INSERT INTO streams (stream_id, owner_id, name, status, metadata, created_at, "
                                 "last_seen_at, epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                 row).rowcount
            if not inserted and exclusive:
                return None
            return _get_stream(c, stream_id)
        return await self._db.write(create)

    @operation("list streams")
    async def list_streams(self, owner_id: str | None, status: str | None, limit: int,
                           after: tuple[str, str] | None = None, *, stream_ids: list[str] | None = None
                           ) -> list[dict[str, Any]]:
        where = _Where()
        where.equal("owner_id", owner_id)
        where.among("stream_id", stream_ids)
        where.equal("status", status)
        if after is not None:
            where.add("(created_at, stream_id) < (?, ?)", _ms(dt.datetime.fromisoformat(after[0])), after[1])
        sql = f"SELECT {_STREAM_COLUMNS} FROM streams{where} ORDER BY created_at DESC, stream_id DESC LIMIT ?"
        return await self._db.read(lambda c: [_stream_out(r) for r in c.execute(sql, (*where.values, limit))])

    @operation("delete stream")
    async def delete_stream(self, stream_id: str) -> bool:
        await self._delete_chunks("alerts", "stream_id = ?", (stream_id,))
        await self._delete_chunks("snapshots", "stream_id = ?", (stream_id,))
        return bool(await self._db.write(
            lambda c: c.execute("DELETE FROM streams WHERE stream_id = ?", (stream_id,)).rowcount))

    async def _delete_chunks(self, table: str, condition: str, values: tuple[Any, ...]) -> int:
        """DELETE in transactions of DELETE_CHUNK rows; returns how many went."""
        sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {condition} LIMIT {DELETE_CHUNK})"
        total = 0
        while True:
            gone = int(await self._db.write(lambda c: c.execute(sql, values).rowcount))
            total += gone
            if gone < DELETE_CHUNK:
                return total

    @operation("update stream status")
    async def set_stream_status(self, stream_id: str, status: str, *, frame_at: dt.datetime | None = None) -> None:
        now = _ms(dt.datetime.now(dt.timezone.utc))
        values: tuple[Any, ...]
        if frame_at is None:
            sql = "UPDATE streams SET status = ?, last_seen_at = ? WHERE stream_id = ?"
            values = (status, now, stream_id)
        else:
            sql = "UPDATE streams SET status = ?, last_seen_at = ?, last_frame_at = ? WHERE stream_id = ?"
            values = (status, now, _ms(frame_at), stream_id)
        await self._db.write(lambda c: c.execute(sql, values))

    @operation("save stream heartbeats")
    async def record_heartbeats(self, beats: list[tuple[str, dt.datetime, dt.datetime | None]]) -> None:
        if not beats:
            return
        rows = [(_ms(seen), None if frame is None else _ms(frame), stream_id) for stream_id, seen, frame in beats]
        await self._db.write(lambda c: c.executemany(
            "UPDATE streams SET last_seen_at = max(coalesce(last_seen_at, ?1), ?1), "
            "last_frame_at = CASE WHEN ?2 IS NULL THEN last_frame_at ELSE max(coalesce(last_frame_at, ?2), ?2) END "
            "WHERE stream_id = ?3", rows))

    @operation("mark streams offline")
    async def mark_streams_offline(self, last_heard: dict[str, dt.datetime]) -> list[str]:
        rows = [(_ms(heard), stream_id) for stream_id, heard in last_heard.items()]

        def mark(c: sqlite3.Connection) -> list[str]:
            return [stream_id for heard, stream_id in rows if c.execute(
                "UPDATE streams SET status = 'offline', last_seen_at = max(coalesce(last_seen_at, ?1), ?1) "
                "WHERE stream_id = ?2 AND status IN ('online', 'streaming')", (heard, stream_id)).rowcount]
        return await self._db.write(mark)

    @operation("mark unseen streams offline")
    async def mark_unseen_streams_offline(self, seen_before: dt.datetime, exclude: set[str]) -> list[str]:
        before = _ms(seen_before)

        def mark(c: sqlite3.Connection) -> list[str]:
            condition = "status IN ('online', 'streaming') AND last_seen_at < ?"
            found = [r[0] for r in c.execute(f"SELECT stream_id FROM streams WHERE {condition}", (before,))]
            changed = [sid for sid in found if sid not in exclude]
            c.executemany(f"UPDATE streams SET status = 'offline' WHERE stream_id = ? AND {condition}",
                          [(sid, before) for sid in changed])
            return changed
        return await self._db.write(mark)

    # ---------------------------------------------------------------- alerts
    @operation("allocate alert numbers")
    async def reserve_batch(self, stream_id: str, count: int, writer: str, lease_s: float) -> tuple[int, int]:
        def reserve(c: sqlite3.Connection) -> tuple[int, int]:
            row = c.execute("SELECT alert_seq, last_seq, writer, writer_until FROM streams WHERE stream_id = ?",
                            (stream_id,)).fetchone()
            if row is None:
                raise StoreUnavailable(f"stream {stream_id} disappeared")
            alert_seq, last_seq, holder, until = row
            now = _ms(dt.datetime.now(dt.timezone.utc))
            if lease_s:
                if holder not in (None, writer) and until is not None and until >= now:
                    raise WriterBusy(f"another node is writing alerts of {stream_id}")
                c.execute("UPDATE streams SET alert_seq = alert_seq + ?, writer = ?, writer_until = ? "
                          "WHERE stream_id = ?", (count, writer, now + int(lease_s * 1000), stream_id))
            else:
                c.execute("UPDATE streams SET alert_seq = alert_seq + ? WHERE stream_id = ?", (count, stream_id))
            return int(alert_seq) + 1, int(last_seq)
        return await self._db.write(reserve)

    @operation("release the stream's alert writer lease")
    async def release_writer(self, stream_id: str, writer: str) -> None:
        await self._db.write(lambda c: c.execute(
            "UPDATE streams SET writer = NULL WHERE stream_id = ? AND writer = ?", (stream_id, writer)))

    @operation("store alerts")
    async def insert_alerts(self, alerts: list[dict[str, Any]]) -> set[str]:
        rows = [(a["alertId"], a["streamId"], a["seq"], a["ownerId"], a["senderId"], a["severity"], a["message"],
                 _json(a["metadata"]), a["timestamp"], _ms(a["receivedAt"]), a.get("clientId"),
                 1 if a.get("hasSnapshot") else 0) for a in alerts]

        def insert(c: sqlite3.Connection) -> set[str]:
            duplicates = set()
            for row in rows:
                if not c.execute(_INSERT_ALERT, row).rowcount:
                    duplicates.add(str(row[10]))
            return duplicates
        return await self._db.write(insert)

    @operation("update the stream's last alert number")
    async def mark_stored(self, stream_id: str, seq: int) -> None:
        await self._db.write(lambda c: c.execute(
            "UPDATE streams SET last_seq = max(last_seq, ?) WHERE stream_id = ?", (seq, stream_id)))

    @operation("read alerts")
    async def stream_history(self, stream_id: str, max_seq: int, flt: AlertFilter, limit: int,
                             before_seq: int | None = None) -> list[dict[str, Any]]:
        where = _alert_where(flt)
        where.equal("stream_id", stream_id)
        where.add("seq <= ?", max_seq if before_seq is None else min(max_seq, before_seq - 1))
        return await self._alerts(where, "seq DESC", limit)

    @operation("read alerts")
    async def alert_history(self, stream_ids: list[str] | None, owner_id: str | None, flt: AlertFilter,
                            limit: int, before: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        where = _alert_where(flt)
        where.among("stream_id", stream_ids)
        where.equal("owner_id", owner_id)
        if before is not None:
            where.add("(received_at, alert_id) < (?, ?)", _ms(dt.datetime.fromisoformat(before[0])), before[1])
        return await self._alerts(where, "received_at DESC, alert_id DESC", limit)

    @operation("read alerts")
    async def replay(self, stream_id: str, after_seq: int, limit: int) -> list[dict[str, Any]]:
        where = _Where()
        where.equal("stream_id", stream_id)
        where.add("seq > ?", after_seq)
        return await self._alerts(where, "seq", limit)

    def _alerts(self, where: _Where, order: str, limit: int) -> asyncio.Future[list[dict[str, Any]]]:
        sql = f"SELECT {_ALERT_COLUMNS} FROM alerts{where} ORDER BY {order} LIMIT ?"
        return self._db.read(lambda c: [_alert_out(r) for r in c.execute(sql, (*where.values, limit))])

    @operation("read alert")
    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        if not is_alert_id(alert_id):
            return None
        return await self._db.read(lambda c: _get_alert(c, alert_id))

    @operation("acknowledge alert")
    async def acknowledge_alert(self, alert_id: str, by: str) -> dict[str, Any] | None:
        if not is_alert_id(alert_id):
            return None
        now = _ms(dt.datetime.now(dt.timezone.utc))

        def acknowledge(c: sqlite3.Connection) -> dict[str, Any] | None:
            c.execute("UPDATE alerts SET acknowledged_by = ?, acknowledged_at = ? "
                      "WHERE alert_id = ? AND acknowledged_at IS NULL", (by, now, alert_id))
            return _get_alert(c, alert_id)
        return await self._db.write(acknowledge)

    @operation("read alert")
    async def find_alert_by_client_id(self, stream_id: str, sender_id: str, client_id: str) -> dict[str, Any] | None:
        sql = f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE stream_id = ? AND sender_id = ? AND client_id = ?"
        return await self._db.read(lambda c: _first(c.execute(sql, (stream_id, sender_id, client_id)), _alert_out))

    @operation("count alerts")
    async def count_alerts(self, stream_id: str) -> int:
        return int(await self._db.read(lambda c: c.execute(
            "SELECT count(*) FROM alerts WHERE stream_id = ?", (stream_id,)).fetchone()[0]))

    @operation("store snapshot")
    async def save_snapshot(self, alert_id: str, stream_id: str, jpeg: bytes) -> None:
        row = (alert_id, stream_id, jpeg, _ms(dt.datetime.now(dt.timezone.utc)))
        await self._db.write(lambda c: c.execute(
            "INSERT INTO snapshots (alert_id, stream_id, jpeg, created_at) VALUES (?, ?, ?, ?)", row))

    @operation("read snapshot")
    async def get_snapshot(self, alert_id: str) -> tuple[str, bytes] | None:
        row = await self._db.read(lambda c: c.execute(
            "SELECT stream_id, jpeg FROM snapshots WHERE alert_id = ?", (alert_id,)).fetchone())
        return (str(row[0]), bytes(row[1])) if row else None

    # ---------------------------------------------------------------- notifications
    @operation("store destination")
    async def create_destination(self, doc: dict[str, Any]) -> None:
        row = (doc["destinationId"], doc["ownerId"], doc["channel"], _ms(doc["createdAt"]), _json(_tagged(doc)))
        await self._db.write(lambda c: c.execute(
            "INSERT INTO destinations (destination_id, owner_id, channel, created_at, doc) VALUES (?, ?, ?, ?, ?)",
            row))

    @operation("read destination")
    async def get_destination(self, destination_id: str) -> dict[str, Any] | None:
        return await self._db.read(lambda c: _first(c.execute(
            "SELECT doc FROM destinations WHERE destination_id = ?", (destination_id,)), _destination_out))

    @operation("list destinations")
    async def list_destinations(self, owner_id: str | None = None, channel: str | None = None
                                ) -> list[dict[str, Any]]:
        where = _Where()
        where.equal("owner_id", owner_id)
        where.equal("channel", channel)
        sql = f"SELECT doc FROM destinations{where} ORDER BY created_at, destination_id"
        return await self._db.read(lambda c: [_destination_out(r) for r in c.execute(sql, where.values)])

    @operation("update destination")
    async def update_destination(self, destination_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        def update(c: sqlite3.Connection) -> dict[str, Any] | None:
            doc = _first(c.execute("SELECT doc FROM destinations WHERE destination_id = ?", (destination_id,)),
                         _destination_out)
            if doc is None:
                return None
            doc.update(fields)
            c.execute("UPDATE destinations SET doc = ? WHERE destination_id = ?",
                      (_json(_tagged(doc)), destination_id))
            return doc
        return await self._db.write(update)

    @operation("delete destination")
    async def delete_destination(self, destination_id: str) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            c.execute("UPDATE deliveries SET state = 'cancelled', last_error = 'destination deleted', "
                      "lease_owner = NULL WHERE destination_id = ? AND state = 'pending'", (destination_id,))
            return bool(c.execute("DELETE FROM destinations WHERE destination_id = ?", (destination_id,)).rowcount)
        return await self._db.write(delete)

    @operation("read alerts to notify")
    async def alerts_to_fan_out(self, limit: int) -> list[dict[str, Any]]:
        sql = f"SELECT {_ALERT_COLUMNS} FROM alerts INDEXED BY alerts_fanout WHERE fanout = 1 ORDER BY alert_id LIMIT ?"
        return await self._db.read(lambda c: [_alert_out(r) for r in c.execute(sql, (limit,))])

    @operation("store deliveries")
    async def add_deliveries(self, deliveries: list[dict[str, Any]], fanned_out: list[str]) -> None:
        rows = [(d["deliveryId"], d["alertId"], d["streamId"], d["destinationId"], d["channel"], d["purpose"],
                 d["state"], d["attempts"], _ms(d["nextAt"]), _ms(d["createdAt"])) for d in deliveries]
        done = [(alert_id,) for alert_id in fanned_out]

        def add(c: sqlite3.Connection) -> None:
            c.executemany("INSERT INTO deliveries (delivery_id, alert_id, stream_id, destination_id, channel, "
                          "purpose, state, attempts, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT DO NOTHING", rows)
            c.executemany("UPDATE alerts SET fanout = 0 WHERE alert_id = ?", done)
        await self._db.write(add)

    @operation("claim deliveries")
    async def claim_deliveries(self, owner: str, now: dt.datetime, lease_s: float, limit: int
                               ) -> list[dict[str, Any]]:
        at = _ms(now)
        until = at + int(lease_s * 1000)

        def claim(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = c.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries INDEXED BY deliveries_due WHERE state = 'pending' "
                "AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_at, alert_id LIMIT ?",
                (at, at, limit)).fetchall()
            c.executemany("UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE delivery_id = ?",
                          [(owner, until, r[0]) for r in rows])
            claimed = [_delivery_out(r) for r in rows]
            for d in claimed:
                d["alert"] = _get_alert(c, d["alertId"])
            return claimed
        return await self._db.write(claim)

    @operation("release delivery leases")
    async def release_delivery_leases(self) -> int:
        return int(await self._db.write(lambda c: c.execute(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL").rowcount))

    @operation("record a delivery attempt")
    async def finish_attempt(self, delivery_id: str, owner: str, fields: dict[str, Any]) -> bool:
        sets, values = ["lease_owner = NULL", "lease_until = NULL"], []
        for key, value in fields.items():
            sets.append(f"{_DELIVERY_FIELDS[key]} = ?")
            values.append(_ms(value) if isinstance(value, dt.datetime) else value)
        sql = f"UPDATE deliveries SET {', '.join(sets)} WHERE delivery_id = ? AND lease_owner = ?"
        return bool(await self._db.write(lambda c: c.execute(sql, (*values, delivery_id, owner)).rowcount))

    @operation("read deliveries")
    async def last_delivered(self, destination_id: str, stream_id: str) -> dt.datetime | None:
        row = await self._db.read(lambda c: c.execute(
            "SELECT max(delivered_at) FROM deliveries WHERE destination_id = ? AND stream_id = ? "
            "AND delivered_at IS NOT NULL", (destination_id, stream_id)).fetchone())
        return _dt_or_none(row[0])

    @operation("read deliveries")
    async def deliveries_of_alert(self, alert_id: str) -> list[dict[str, Any]]:
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE alert_id = ? ORDER BY created_at, delivery_id"
        return await self._db.read(lambda c: [_delivery_out(r) for r in c.execute(sql, (alert_id,))])

    @operation("read a kept value")
    async def get_value(self, key: str) -> str | None:
        row = await self._db.read(lambda c: c.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone())
        return None if row is None else str(row[0])

    @operation("keep a value")
    async def put_value_if_absent(self, key: str, value: str) -> str:
        def put(c: sqlite3.Connection) -> str:
            c.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value))
            return str(c.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0])
        return await self._db.write(put)

    @operation("count deliveries")
    async def delivery_backlog(self) -> tuple[int, dt.datetime | None]:
        row = await self._db.read(lambda c: c.execute(
            "SELECT count(*), min(created_at) FROM deliveries INDEXED BY deliveries_due WHERE state = 'pending'"
        ).fetchone())
        return int(row[0]), _dt_or_none(row[1])

    # ---------------------------------------------------------------- jobs (workers/)
    @operation("save usage figures")
    async def add_usage(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        values = []
        for row in rows:
            unknown = set(row) - {"streamId", "ownerId", "hour", *_USAGE_COUNTS}
            if unknown:
                raise ValueError(f"unknown usage figures: {sorted(unknown)}")
            values.append((_ms(row["hour"]), row["streamId"], row["ownerId"],
                           *(row.get(key, 0) for key in _USAGE_COUNTS)))
        columns = ", ".join(_USAGE_COUNTS.values())
        adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in _USAGE_COUNTS.values())
        sql = (f"INSERT INTO usage (hour, stream_id, owner_id, {columns}) VALUES (?, ?, ?, ?, ?, ?, ?) "
               f"ON CONFLICT (hour, stream_id) DO UPDATE SET {adds}")
        await self._db.write(lambda c: c.executemany(sql, values))

    @operation("read usage figures")
    async def usage_between(self, first_hour: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        where = _Where()
        where.add("hour >= ?", _ms(first_hour))
        where.add("hour < ?", _ms(end))
        where.equal("stream_id", stream_id)
        where.equal("owner_id", owner_id)
        sql = f"SELECT stream_id, owner_id, hour, {', '.join(_USAGE_COUNTS.values())} FROM usage{where}"

        def read(c: sqlite3.Connection) -> list[dict[str, Any]]:
            return [{"streamId": r[0], "ownerId": r[1], "hour": _dt(r[2]), **dict(zip(_USAGE_COUNTS, r[3:]))}
                    for r in c.execute(sql, where.values)]
        return await self._db.read(read)

    @operation("prune usage figures")
    async def prune_usage(self, before: dt.datetime, *, dry_run: bool = False) -> int:
        if dry_run:
            return int(await self._db.read(lambda c: c.execute(
                "SELECT count(*) FROM usage WHERE hour < ?", (_ms(before),)).fetchone()[0]))
        return await self._delete_chunks("usage", "hour < ?", (_ms(before),))

    @operation("list prunable streams")
    async def prunable_streams(self, never_seen_before: dt.datetime | None, seen_before: dt.datetime | None
                               ) -> list[dict[str, Any]]:
        rule = _prunable(never_seen_before, seen_before)
        if rule is None:
            return []
        sql = f"SELECT {_STREAM_COLUMNS} FROM streams WHERE {rule[0]} ORDER BY stream_id"
        return await self._db.read(lambda c: [_stream_out(r) for r in c.execute(sql, rule[1])])

    @operation("delete a stream")
    async def delete_stream_if_prunable(self, stream_id: str, never_seen_before: dt.datetime | None,
                                        seen_before: dt.datetime | None) -> bool:
        rule = _prunable(never_seen_before, seen_before)
        if rule is None:
            return False
        # one statement, so that a stream coming back meanwhile keeps everything (its alerts go by cascade)
        sql = f"DELETE FROM streams WHERE stream_id = ? AND {rule[0]}"
        return bool(await self._db.write(lambda c: c.execute(sql, (stream_id, *rule[1])).rowcount))

    @operation("count old alerts")
    async def old_alerts_by_stream(self, before: dt.datetime) -> list[dict[str, Any]]:
        # along the time index, which covers it: an hourly run reads only the hour's few old alerts
        sql = ("SELECT stream_id, count(*), max(seq) FROM alerts INDEXED BY alerts_time WHERE received_at < ? "
               "GROUP BY stream_id ORDER BY stream_id")
        return await self._db.read(lambda c: [{"streamId": r[0], "count": int(r[1]), "maxSeq": int(r[2] or 0)}
                                              for r in c.execute(sql, (_ms(before),))])

    @operation("remove old alerts")
    async def remove_alerts_before(self, before: dt.datetime, max_seqs: dict[str, int]) -> int:
        await self._db.write(lambda c: c.executemany(
            "UPDATE streams SET pruned_seq = max(pruned_seq, ?) WHERE stream_id = ?",
            [(seq, stream_id) for stream_id, seq in max_seqs.items()]))
        cutoff = _ms(before)
        # in time order, along the time index: each chunk touches a few pages, so each commit is short
        removed = await self._delete_chunks("alerts", "received_at < ?", (cutoff,))
        await self._delete_chunks("snapshots", "created_at < ?", (cutoff,))
        return removed

    @operation("count alerts")
    async def alert_figures(self, start: dt.datetime, end: dt.datetime, stream_id: str | None = None,
                            owner_id: str | None = None) -> list[dict[str, Any]]:
        where = _Where()
        where.add("received_at >= ?", _ms(start))
        where.add("received_at < ?", _ms(end))
        where.equal("stream_id", stream_id)
        where.equal("owner_id", owner_id)
        sql = ("SELECT stream_id, owner_id, severity, acknowledged_at IS NOT NULL, "
               f"json_extract(metadata, '$.objectType'), count(*) FROM alerts{where} GROUP BY 1, 2, 3, 4, 5")
        keys = ("streamId", "ownerId", "severity", "acknowledged", "objectType")

        def read(c: sqlite3.Connection) -> list[dict[str, Any]]:
            return [{**dict(zip(keys, (r[0], r[1], r[2], bool(r[3]), r[4]))), "count": int(r[5])}
                    for r in c.execute(sql, where.values)]
        return await self._db.read(read)

    @operation("store the report")
    async def save_report(self, start: dt.datetime, end: dt.datetime, rows: list[dict[str, Any]]) -> None:
        period = (_ms(start), _ms(end))
        values = [(*period, i, _json(_tagged(row))) for i, row in enumerate(rows)]

        def save(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM reports WHERE period_from = ? AND period_to = ?", period)
            c.executemany("INSERT INTO reports (period_from, period_to, position, row) VALUES (?, ?, ?, ?)", values)
        await self._db.write(save)

    @operation("read the report")
    async def stored_report(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        sql = "SELECT row FROM reports WHERE period_from = ? AND period_to = ? ORDER BY position"
        rows = await self._db.read(lambda c: [r[0] for r in c.execute(sql, (_ms(start), _ms(end)))])
        return [{"from": start, "to": end, **_untagged(orjson.loads(row))} for row in rows]

    @operation("take a job lease")
    async def acquire_lease(self, job: str, owner: str, slot: dt.datetime, now: dt.datetime, lease_s: float) -> bool:
        taken = _ms(now)
        row = (job, owner, _ms(slot), taken, taken + int(lease_s * 1000))
        sql = ("INSERT INTO locks (job, owner, slot, taken_at, until) VALUES (?, ?, ?, ?, ?) "
               "ON CONFLICT (job) DO UPDATE SET owner = excluded.owner, slot = excluded.slot, "
               "taken_at = excluded.taken_at, until = excluded.until "
               "WHERE locks.slot < excluded.slot "
               "AND (locks.until <= excluded.taken_at OR locks.owner = excluded.owner)")
        return bool(await self._db.write(lambda c: c.execute(sql, row).rowcount))

    @operation("renew a job lease")
    async def renew_lease(self, job: str, owner: str, now: dt.datetime, lease_s: float) -> bool:
        until = _ms(now) + int(lease_s * 1000)
        return bool(await self._db.write(lambda c: c.execute(
            "UPDATE locks SET until = ? WHERE job = ? AND owner = ?", (until, job, owner)).rowcount))

    @operation("release a job lease")
    async def release_lease(self, job: str, owner: str, now: dt.datetime) -> None:
        await self._db.write(lambda c: c.execute(
            "UPDATE locks SET until = ? WHERE job = ? AND owner = ?", (_ms(now), job, owner)))

    @operation("read job leases")
    async def leases(self) -> list[dict[str, Any]]:
        return await self._db.read(lambda c: [
            {"job": r[0], "owner": r[1], "slot": _dt(r[2]), "takenAt": _dt(r[3]), "until": _dt(r[4])}
            for r in c.execute("SELECT job, owner, slot, taken_at, until FROM locks ORDER BY job")])

    @operation("record a job run")
    async def record_job_run(self, run_id: str, run: dict[str, Any]) -> None:
        started = run.get("startedAt")
        row = (run_id, run.get("scope"), _ms(started) if isinstance(started, dt.datetime) else None,
               _json(_tagged(run)))
        await self._db.write(lambda c: c.execute(
            "INSERT OR REPLACE INTO job_runs (run_id, scope, started_at, run) VALUES (?, ?, ?, ?)", row))

    @operation("prune job runs")
    async def prune_job_runs(self, before: dt.datetime) -> int:
        return int(await self._db.write(lambda c: c.execute(
            "DELETE FROM job_runs WHERE scope = 'node' AND started_at < ?", (_ms(before),)).rowcount))

    @operation("read job runs")
    async def job_runs(self) -> list[dict[str, Any]]:
        rows = await self._db.read(lambda c: list(c.execute("SELECT run_id, run FROM job_runs ORDER BY run_id")))
        return [{"runId": run_id, **_untagged(orjson.loads(run))} for run_id, run in rows]


# -------------------------------------------------------------------- schema
def _migrate(connection: sqlite3.Connection, version: int) -> None:
    """Run the migrations after `version`, each in its own transaction with its new user_version."""
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            connection.execute("BEGIN IMMEDIATE")
            for statement in _statements(MIGRATIONS[target - 1]):
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {target}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise


def _statements(script: str) -> Iterable[str]:
    """A migration's statements, as written (their comments stay in the schema's SQL)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not all(part.strip().startswith("--") for part in current.strip().splitlines()):
        raise ValueError(f"an incomplete statement at the end of a migration: {current.strip()[:80]}")
    return statements


# -------------------------------------------------------------------- queries
class _Where:
    """A WHERE clause built from typed values only: every value is a bound parameter."""

    def __init__(self) -> None:
        self.terms: list[str] = []
        self.values: list[Any] = []

    def add(self, term: str, *values: Any) -> None:
        self.terms.append(term)
        self.values.extend(values)

    def equal(self, column: str, value: Any) -> None:
        if value is not None:
            self.add(f"{column} = ?", value)

    def among(self, column: str, values: Sequence[Any] | None) -> None:
        if values is not None:
            self.add(f"{column} IN ({', '.join('?' * len(values))})" if values else "0", *values)

    def __str__(self) -> str:
        return f" WHERE {' AND '.join(self.terms)}" if self.terms else ""


def _alert_where(flt: AlertFilter) -> _Where:
    where = _Where()
    if flt.severities is not None:
        where.among("severity", flt.severities)
    if flt.since is not None:
        where.add("received_at >= ?", _ms(flt.since))
    if flt.until is not None:
        where.add("received_at < ?", _ms(flt.until))
    if flt.acknowledged is not None:
        where.add("acknowledged_at IS NOT NULL" if flt.acknowledged else "acknowledged_at IS NULL")
    if flt.after_seq is not None:
        where.add("seq > ?", flt.after_seq)
    return where


def _prunable(never_seen_before: dt.datetime | None, seen_before: dt.datetime | None
              ) -> tuple[str, tuple[int, ...]] | None:
    rules, values = [], []
    if never_seen_before is not None:
        rules.append("(last_seen_at IS NULL AND created_at < ?)")
        values.append(_ms(never_seen_before))
    if seen_before is not None:
        rules.append("last_seen_at < ?")
        values.append(_ms(seen_before))
    if not rules:
        return None
    return f"status = 'offline' AND ({' OR '.join(rules)})", tuple(values)


def _get_stream(c: sqlite3.Connection, stream_id: str) -> dict[str, Any] | None:
    return _first(c.execute(f"SELECT {_STREAM_COLUMNS} FROM streams WHERE stream_id = ?", (stream_id,)), _stream_out)


def _get_alert(c: sqlite3.Connection, alert_id: str) -> dict[str, Any] | None:
    return _first(c.execute(f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE alert_id = ?", (alert_id,)), _alert_out)


def _first(cursor: sqlite3.Cursor, convert: Callable[[Any], T]) -> T | None:
    row = cursor.fetchone()
    return None if row is None else convert(row)


def _stream_out(r: Any) -> dict[str, Any]:
    return {"streamId": r[0], "ownerId": r[1], "name": r[2], "status": r[3], "metadata": orjson.loads(r[4]),
            "createdAt": _dt(r[5]), "lastSeenAt": _dt_or_none(r[6]), "lastFrameAt": _dt_or_none(r[7]),
            "alertSeq": r[8], "lastSeq": r[9], "prunedSeq": r[10], "epoch": r[11]}


def _alert_out(r: Any) -> dict[str, Any]:
    doc = {"alertId": r[0], "streamId": r[1], "seq": r[2], "ownerId": r[3], "senderId": r[4], "severity": r[5],
           "message": r[6], "metadata": orjson.loads(r[7]), "timestamp": r[8], "receivedAt": _dt(r[9]),
           "acknowledged": {"by": r[11], "at": _dt(r[12])} if r[12] is not None else None,
           "hasSnapshot": bool(r[13])}
    if r[10] is not None:
        doc["clientId"] = r[10]
    return doc


def _destination_out(r: Any) -> dict[str, Any]:
    doc: dict[str, Any] = _untagged(orjson.loads(r[0]))
    return doc


def _delivery_out(r: Any) -> dict[str, Any]:
    return {"deliveryId": r[0], "alertId": r[1], "streamId": r[2], "destinationId": r[3], "channel": r[4],
            "purpose": r[5], "state": r[6], "attempts": r[7], "nextAt": _dt(r[8]), "createdAt": _dt(r[9]),
            "deliveredAt": _dt_or_none(r[10]), "lastError": r[11], "lastStatus": r[12], "summarisedIn": r[13]}


# -------------------------------------------------------------------- values
def _ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return (value - EPOCH) // ONE_MS


def _dt(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms)


def _dt_or_none(ms: int | None) -> dt.datetime | None:
    return None if ms is None else _dt(ms)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _tagged(value: Any) -> Any:
    """JSON-ready, with datetimes as {"$ms": ...} so that they come back as datetimes (_untagged)."""
    if isinstance(value, dt.datetime):
        return {"$ms": _ms(value)}
    if isinstance(value, dict):
        return {k: _tagged(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tagged(v) for v in value]
    return value


def _untagged(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "$ms" in value:
            return _dt(value["$ms"])
        return {k: _untagged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untagged(v) for v in value]
    return value
