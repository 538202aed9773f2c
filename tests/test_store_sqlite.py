"""The embedded SQLite store beyond the shared contract: transactions per loop turn, reads after writes, the file
left by close(), WAL and foreign keys, schema migrations and the refusal of a newer schema."""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import JPEG
from watchout.errors import ConfigError, StoreUnavailable
from watchout.store import AlertFilter, new_alert_id, utcnow
from watchout.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore

EVERYTHING = AlertFilter()


def _alert(seq: int, client_id: str | None = None, stream: str = "s1") -> dict[str, Any]:
    return {"alertId": new_alert_id(), "streamId": stream, "seq": seq, "ownerId": "alice", "senderId": "ml",
            "severity": "high", "message": f"alert {seq}", "metadata": {"confidence": 0.9},
            "timestamp": 1764150000000, "receivedAt": utcnow(), "clientId": client_id, "acknowledged": None,
            "hasSnapshot": False}


async def _started(path: Path, **options: str) -> SQLiteStore:
    store = SQLiteStore(str(path), **options)
    await store.start(0.0)
    return store


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _schema(path: Path) -> list[tuple[str, str, str]]:
    connection = sqlite3.connect(path)
    try:
        return sorted(connection.execute("SELECT type, name, coalesce(sql, '') FROM sqlite_master"))
    finally:
        connection.close()


def _user_version(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])
    finally:
        connection.close()


def _pragmas(connection: sqlite3.Connection) -> tuple[str, int, int]:
    """journal_mode, foreign_keys and synchronous of a connection."""
    return tuple(connection.execute(f"PRAGMA {name}").fetchone()[0]  # type: ignore[return-value]
                 for name in ("journal_mode", "foreign_keys", "synchronous"))


class _Commits:
    """Counts the COMMITs run on the store's writer connection, through SQLite's statement trace."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, statement: str) -> None:  # runs on the writer thread
        if statement.strip().upper() == "COMMIT":
            with self._lock:
                self.count += 1

    async def attach(self, store: SQLiteStore) -> None:
        # Private access, on purpose: the transactions are the writer thread's business, and its own connection is
        # the only place where they can be observed; the trace callback only watches, it changes nothing.
        await store._db.write(lambda c: c.set_trace_callback(self))
        self.count = 0  # the COMMIT of the write that attached it does not count


# ----------------------------------------------------------------------------- transactions

async def test_a_write_that_fails_leaves_the_other_writes_of_its_transaction_committed(tmp_path):
    store = await _started(tmp_path / "w.db")
    commits = _Commits()
    try:
        await store.create_stream("s1", "alice")
        taken = new_alert_id()
        await store.save_snapshot(taken, "s1", JPEG)
        await commits.attach(store)
        created, refused = await asyncio.gather(store.create_stream("s2", "bob", name="Porch"),
                                                store.save_snapshot(taken, "s1", JPEG),  # the id is taken
                                                return_exceptions=True)
        assert commits.count == 1  # one loop turn: one transaction for both
        assert isinstance(refused, StoreUnavailable) and "could not store snapshot" in refused.message
        assert isinstance(created, dict) and created["ownerId"] == "bob"
        assert (await store.get_stream("s2"))["name"] == "Porch"
        assert await store.get_snapshot(taken) == ("s1", JPEG)  # the first snapshot is kept
    finally:
        store.close()
    reopened = await _started(tmp_path / "w.db")
    try:
        assert (await reopened.get_stream("s2"))["ownerId"] == "bob"  # committed, not just visible
    finally:
        reopened.close()


async def test_the_writes_of_one_loop_turn_share_one_commit(tmp_path):
    store = await _started(tmp_path / "w.db")
    commits = _Commits()
    try:
        await commits.attach(store)
        created = await asyncio.gather(*(store.create_stream(f"cam-{i}", "alice") for i in range(50)))
        print(f"50 create_stream in one loop turn: {commits.count} COMMIT(s)")
        assert 1 <= commits.count <= 2
        assert [doc["streamId"] for doc in created] == [f"cam-{i}" for i in range(50)]
        assert len(await store.list_streams("alice", None, 100)) == 50
        commits.count = 0
        for i in range(5):  # awaited one by one: each in its own turn, each committed before the next starts
            await store.set_stream_status(f"cam-{i}", "online")
        assert commits.count == 5
    finally:
        store.close()


async def test_a_read_issued_after_a_write_returns_sees_that_write(tmp_path):
    store = await _started(tmp_path / "w.db")
    try:
        assert store._db._reader is not None  # a file store reads on a connection of its own: the case at stake
        await store.create_stream("s1", "alice")
        for seq in range(1, 201):
            await store.create_stream(f"cam-{seq}", "alice")
            assert await store.get_stream(f"cam-{seq}") is not None
            await store.insert_alerts([_alert(seq, client_id=f"c{seq}")])
            await store.mark_stored("s1", seq)
            assert await store.count_alerts("s1") == seq
            newest = await store.stream_history("s1", seq, EVERYTHING, 1)
            assert [a["seq"] for a in newest] == [seq]
    finally:
        store.close()


async def test_close_after_awaited_writes_leaves_everything_to_a_fresh_store(tmp_path):
    path = tmp_path / "w.db"
    store = await _started(path)
    await store.create_stream("s1", "alice", status="online", metadata={"site": "porch"})
    first = (await store.reserve_batch("s1", 100, "", 0.0))[0]
    alerts = [_alert(first + i, client_id=f"c{i}") for i in range(100)]
    await store.insert_alerts(alerts)
    await store.mark_stored("s1", alerts[-1]["seq"])
    await store.save_snapshot(alerts[0]["alertId"], "s1", JPEG)
    store.close()

    reopened = await _started(path)
    try:
        stream = await reopened.get_stream("s1")
        assert (stream["status"], stream["metadata"], stream["alertSeq"], stream["lastSeq"]) == \
            ("online", {"site": "porch"}, 100, 100)
        history = await reopened.stream_history("s1", 100, EVERYTHING, 500)
        assert [a["alertId"] for a in reversed(history)] == [a["alertId"] for a in alerts]
        assert await reopened.get_snapshot(alerts[0]["alertId"]) == ("s1", JPEG)
        assert (await reopened.find_alert_by_client_id("s1", "ml", "c99"))["seq"] == 100
    finally:
        reopened.close()


async def test_a_file_store_uses_wal_and_enforces_foreign_keys(tmp_path):
    path = tmp_path / "w.db"
    store = await _started(path)
    try:
        # Private access, on purpose: the settings at stake are per connection, on the store's own two connections.
        assert await store._db.write(_pragmas) == ("wal", 1, 1)  # synchronous 1: NORMAL
        assert (await store._db.read(_pragmas))[:2] == ("wal", 1)  # the reader's connection too
        with pytest.raises(StoreUnavailable, match="FOREIGN KEY"):  # no alert without its stream
            await store.insert_alerts([_alert(1, stream="ghost")])
        await store.create_stream("s1", "alice")
        await store.insert_alerts([_alert(1)])
        await store.save_snapshot(new_alert_id(), "s1", JPEG)
        # one DELETE of the stream; its alerts and snapshots go by cascade
        assert await store.delete_stream_if_prunable("s1", utcnow() + dt.timedelta(days=1), None)
        assert await store._db.read(lambda c: c.execute(
            "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM snapshots)").fetchone()) == (0, 0)
    finally:
        store.close()
    header = path.read_bytes()[18:20]
    assert header == b"\x02\x02"  # WAL is recorded in the file itself: every later connection uses it too
    full = await _started(tmp_path / "full.db", synchronous="full")
    try:
        assert (await full._db.write(_pragmas))[2] == 2  # FULL
    finally:
        full.close()


# ----------------------------------------------------------------------------- schema versions

def _database_at(path: Path, version: int) -> None:
    """A database as a Watchout of schema `version` left it: MIGRATIONS[:version] applied, user_version set."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for script in MIGRATIONS[:version]:
            connection.executescript(script)
        connection.execute(f"PRAGMA user_version = {version}")
    finally:
        connection.close()


@pytest.mark.parametrize("version", range(SCHEMA_VERSION))  # every older version; 0 is a new, empty file
async def test_an_older_database_is_migrated_to_the_current_schema_and_works(tmp_path, version):
    path = tmp_path / "old.db"
    _database_at(path, version)
    assert _user_version(path) == version
    store = await _started(path)
    try:
        assert await store._db.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
        await store.create_stream("s1", "alice")
        seq = (await store.reserve_batch("s1", 1, "", 0.0))[0]
        alert = _alert(seq, client_id="c1")
        assert await store.insert_alerts([alert]) == set()
        await store.mark_stored("s1", seq)
        history = await store.stream_history("s1", seq, EVERYTHING, 10)
        assert [(a["alertId"], a["seq"], a["clientId"]) for a in history] == [(alert["alertId"], seq, "c1")]
        assert await store.insert_alerts([_alert(seq + 1, client_id="c1")]) == {"c1"}  # the indexes are there
    finally:
        store.close()
    assert _user_version(path) == SCHEMA_VERSION
    fresh = await _started(tmp_path / "fresh.db")
    fresh.close()
    assert _schema(path) == _schema(tmp_path / "fresh.db")  # migrated = created at this version


async def test_a_database_of_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "watchout.db"
    newer = SCHEMA_VERSION + 5
    _database_at(path, SCHEMA_VERSION)  # a rollback-journal file: setting WAL would change its header
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("INSERT INTO streams (stream_id, owner_id, name, status, created_at) "
                       "VALUES ('s1', 'alice', 's1', 'offline', 0)")
    connection.execute(f"PRAGMA user_version = {newer}")
    connection.close()
    before = _digest(path)
    store = SQLiteStore(str(path))
    with pytest.raises(ConfigError) as refused:
        await store.start(0.0)
    message = str(refused.value)
    assert refused.value.key == "data_dir" and str(path) in message
    assert f"schema version {newer}" in message and f"up to {SCHEMA_VERSION}" in message
    store.close()
    assert _digest(path) == before
    assert path.read_bytes()[18:20] == b"\x01\x01"  # still a rollback-journal database: WAL was never set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watchout.db"]  # no -wal, -shm or -journal left
    assert _user_version(path) == newer


# ----------------------------------------------------------------------------- a full disk

async def test_a_write_reported_as_failed_after_a_full_disk_left_nothing_behind(tmp_path):
    store = await _started(tmp_path / "w.db")
    try:
        await store.create_stream("s1", "alice")
        # Private access, on purpose: max_page_count is per connection, and only the writer thread holds the one
        # that writes. Lowering it below the current size makes SQLite keep the current size: a real SQLITE_FULL.
        await store._db.write(lambda c: c.execute("PRAGMA max_page_count = 1"))
        snapshot, status = await asyncio.gather(store.save_snapshot(new_alert_id(), "s1", JPEG * 20),
                                                store.set_stream_status("s1", "streaming"),  # fits: updates a row
                                                return_exceptions=True)
        assert isinstance(snapshot, StoreUnavailable) and "full" in snapshot.message  # the cause, not a symptom
        assert not isinstance(status, StoreUnavailable) or "full" in status.message
        stored_status = (await store.get_stream("s1"))["status"]
        assert stored_status == ("offline" if isinstance(status, StoreUnavailable) else "streaming")
    finally:
        store.close()
