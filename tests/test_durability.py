"""What the embedded database keeps: acknowledged alerts survive `kill -9`, each alert id is stored once across
restarts, a data_dir file that is not our database is refused untouched, and a full disk refuses alerts
(store-unavailable, resent later) while frames keep flowing."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient
import tornado.websocket

from conftest import JPEG, TEST_SECRET, Client, start_server
from watchout.auth import mint_token
from watchout.client import Ack, Backoff, Message, MLService, Producer
from watchout.store.sqlite import SCHEMA_VERSION, SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.churn import Server, serve_environment  # noqa: E402

ALERTS = 3000
KILL_AT = 1000  # acks before the first kill, mid-flow
IDLE_KILL_AT = 2000  # alerts sent, and acked, before the second kill
WINDOW = 400  # alerts in flight at most: most of them are still to be sent when the server dies
FAST = Backoff(base_s=0.05, cap_s=0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data_dir: Path) -> dict[str, str]:
    return serve_environment(data_dir, TEST_SECRET)


async def _history(port: int, stream_id: str, token: str) -> list[dict[str, Any]]:
    """Every page of GET /api/streams/{id}/alerts (limit 500), newest first."""
    client = tornado.httpclient.AsyncHTTPClient()
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = "limit=500" + (f"&cursor={cursor}" if cursor else "")
        response = await client.fetch(f"http://127.0.0.1:{port}/api/streams/{stream_id}/alerts?{query}",
                                      headers={"Authorization": f"Bearer {token}"})
        page = json.loads(response.body)
        items += page["items"]
        cursor = page["nextCursor"]
        if not cursor:
            return items


async def test_alerts_acked_before_kill_9_survive_it_and_every_alert_id_is_stored_once(tmp_path):
    data_dir = tmp_path / "data"
    server = Server(data_dir, _free_port(), TEST_SECRET)  # bench/churn.py's harness
    url = f"ws://127.0.0.1:{server.port}/ws"
    user = mint_token(TEST_SECRET, "HS256", "alice", "user")
    service = mint_token(TEST_SECRET, "HS256", "detector", "service", streams="*")
    admin = mint_token(TEST_SECRET, "HS256", "ops", "admin")
    await server.start()
    phone = Producer(url, user, "cam-1", backoff=FAST)
    ml = MLService(url, service, "cam-1", lambda jpeg: None, backoff=FAST)
    acks: dict[str, list[Ack]] = {}  # client id -> every ack it got, from whichever server
    # Two kills: one in the middle of the flow (alerts in flight, some stored but not yet acked), one once the
    # server has acked everything it was sent (nothing left to do: an ack given before COMMIT would be lost).
    kills = [asyncio.Event(), asyncio.Event()]
    acked_at_kill: list[int] = []

    def kill() -> None:
        assert server.proc is not None
        server.proc.kill()  # SIGKILL, at once
        acked_at_kill.append(len(acks))
        kills[len(acked_at_kill) - 1].set()

    def on_message(message: Message) -> None:
        if isinstance(message, Ack) and message.ref is not None:
            acks.setdefault(message.ref, []).append(message)
            if len(acks) == KILL_AT and not kills[0].is_set():
                kill()  # the acks behind this one are still on their way, the next alerts being stored

    ml.add_listener(on_message)
    window = asyncio.Semaphore(WINDOW)
    sent: dict[str, asyncio.Task[Ack]] = {}

    async def send_all() -> None:
        for i in range(ALERTS):
            if i == IDLE_KILL_AT:
                await asyncio.gather(*sent.values())
                kill()  # the next alerts wait in the SDK until it has reconnected
            await window.acquire()
            client_id = f"alert-{i:04d}"
            task = asyncio.ensure_future(ml.send_alert("cam-1", f"person {i}", "high", alert_id=client_id,
                                                       metadata={"objectType": "person", "n": i}))
            task.add_done_callback(lambda _: window.release())
            sent[client_id] = task

    started = time.monotonic()
    again: list[str] = []
    try:
        phone.start()
        await phone.wait_ready(10)  # the phone creates the stream
        ml.start()
        await ml.wait_ready(10)
        sender = asyncio.create_task(send_all())
        for killed in kills:
            await asyncio.wait_for(killed.wait(), 20)
            assert await server.stop(kill=True) == -9
            await server.start()  # the same data_dir and port: the SDK reconnects by itself
        await asyncio.wait_for(sender, 20)
        final = dict(zip(sent, await asyncio.wait_for(asyncio.gather(*sent.values()), 20)))
        assert ml.unacked_alerts == 0 and ml.connects >= 3
        resent_stored = sum(any(a.duplicate for a in got) for got in acks.values())

        # A sender that lost its acks and sends again: the restarted server has no memory of these ids but the
        # database's unique index, which must answer with the first copy.
        again = sorted(final)[:KILL_AT:50]
        for client_id in again:
            repeat = await ml.send_alert("cam-1", "person again", "high", alert_id=client_id)
            assert repeat.duplicate and (repeat.alert_id, repeat.seq) == (final[client_id].alert_id,
                                                                          final[client_id].seq)
        items = await _history(server.port, "cam-1", admin)
    finally:
        await ml.close(timeout_s=0)
        await phone.close(timeout_s=0)
        await asyncio.gather(*sent.values(), return_exceptions=True)  # failed by close() when the test failed
        if server.proc is not None and server.proc.returncode is None:
            assert await server.stop() == 0
    took_s = time.monotonic() - started

    stored = {item["alertId"]: item["seq"] for item in items}
    seqs = [item["seq"] for item in items]
    assert len(items) == len(stored) == ALERTS  # every alert, each once
    assert len(set(seqs)) == len(seqs)
    answers = {(a.alert_id, a.seq) for got in acks.values() for a in got}
    lost = {answer for answer in answers if stored.get(answer[0]) != answer[1]}
    assert not lost, f"{len(lost)} acknowledged alerts are missing after kill -9, e.g. {sorted(lost)[:3]}"
    assert len(answers) == ALERTS  # and every repeat of an id was answered with its first copy

    database = sqlite3.connect(data_dir / "watchout.db")
    try:
        rows = database.execute("SELECT client_id, count(*) FROM alerts WHERE stream_id = 'cam-1' "
                                "GROUP BY sender_id, client_id").fetchall()
    finally:
        database.close()
    duplicates = sum(count - 1 for _, count in rows)
    assert sorted(client_id for client_id, _ in rows) == sorted(sent) and duplicates == 0

    print(f"\n{ALERTS} alerts, kill -9 twice in {took_s:.1f} s: acked before the first kill {acked_at_kill[0]}, "
          f"before the second {acked_at_kill[1]}; sent again after a restart and found stored already "
          f"(duplicate ack) {resent_stored}; acked ids sent once more {len(again)}, all duplicate; "
          f"stored {len(items)}; duplicates {duplicates}; acked but lost {len(lost)}")


# ----------------------------------------------------------------------------- a data_dir that is not ours
# (a data_dir that is a regular file: tests/test_datadir.py::test_serve_refuses_a_data_dir_that_is_a_file)

def _not_a_database(path: Path) -> str:
    path.write_text("These are my holiday notes, not a database.\n" * 200)
    return "is not a SQLite database"


def _newer_database(path: Path) -> str:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE streams (stream_id TEXT PRIMARY KEY)")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    connection.commit()
    connection.close()
    return f"has schema version {SCHEMA_VERSION + 5}, written by a newer Watchout"


async def _serve_once(data_dir: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchout", "serve", "--port", "0", cwd=data_dir.parent, env=_env(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode(), time.monotonic() - started


@pytest.mark.parametrize("make", [_not_a_database, _newer_database], ids=["not-a-database", "newer-schema"])
async def test_serve_refuses_a_database_file_it_cannot_use_and_leaves_it_untouched(tmp_path, make):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "watchout.db"
    expected = make(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    code, output, took_s = await _serve_once(data_dir)
    assert code == 2 and took_s < 20  # 2: bad configuration, as for any other unusable setting
    assert f"data_dir: {path} {expected}" in output and "Traceback" not in output
    assert "Stats:" not in output  # it never listened
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in data_dir.iterdir()) == ["watchout.db"]  # no -wal or -shm beside it


# ----------------------------------------------------------------------------- a full disk

async def _connect(url: str, token: str) -> Client:
    request = tornado.httpclient.HTTPRequest(url, headers={"Authorization": f"Bearer {token}"})
    return Client(await tornado.websocket.websocket_connect(request, max_message_size=64 << 20))


async def _read_all(client: Client, into: list[tuple[float, Any]]) -> None:
    """Every message of `client`, with the time it arrived, until it closes."""
    loop = asyncio.get_running_loop()
    while (raw := await client.conn.read_message()) is not None:
        into.append((loop.time(), raw if isinstance(raw, bytes) else json.loads(raw)))


def _frames_since(messages: list[tuple[float, Any]], since: float) -> int:
    return sum(1 for at, m in messages if at >= since and (isinstance(m, bytes) or m.get("type") == "video-frame"))


async def _wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_full_disk_refuses_alerts_with_store_unavailable_while_frames_keep_flowing(tmp_path, settings):
    store = SQLiteStore(str(tmp_path / "w.db"))
    await store.start(0.0)
    srv, close = await start_server(settings, store)
    user = mint_token(TEST_SECRET, "HS256", "alice", "user")
    service = mint_token(TEST_SECRET, "HS256", "detector", "service", streams="*")
    phone, dashboard, ml = (await _connect(srv.ws_url, user), await _connect(srv.ws_url, user),
                            await _connect(srv.ws_url, service))
    seen: list[tuple[float, Any]] = []
    heard: list[tuple[float, Any]] = []
    readers: list[asyncio.Task[None]] = []
    pump: asyncio.Task[None] | None = None
    # Larger than a database page: storing it needs new pages whatever room the current pages have left.
    boxes = {"objectType": "person", "boxes": [[i, i + 1, i + 2, i + 3] for i in range(600)]}
    try:
        await phone.send({"type": "register", "clientType": "mobile", "streamId": "cam"})
        await phone.recv_type("registered")
        await dashboard.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam"})
        await dashboard.recv_type("subscribed")
        readers = [asyncio.create_task(_read_all(dashboard, seen)), asyncio.create_task(_read_all(ml, heard))]
        frame = base64.b64encode(JPEG).decode()

        async def stream_frames() -> None:
            n = 0
            while True:
                n += 1
                await phone.send({"type": "video-frame", "streamId": "cam", "data": frame, "timestamp": n})
                await asyncio.sleep(0.01)
        pump = asyncio.create_task(stream_frames())
        await ml.send({"type": "alert", "id": "before", "streamId": "cam", "severity": "high", "message": "m",
                       "metadata": boxes, "timestamp": 1})
        await _wait_for(lambda: any(m.get("type") == "ack" for _, m in heard if isinstance(m, dict)))

        # Private access, on purpose: max_page_count is per connection and only the store's writer thread holds
        # the connection that writes. Lowering it below the file's size keeps it at that size, so the next write
        # that needs a page fails with a real SQLITE_FULL, as on a full disk.
        await store._db.write(lambda c: c.execute("PRAGMA max_page_count = 1"))
        full_at = asyncio.get_running_loop().time()
        ids = [f"full-{i}" for i in range(5)]
        for alert_id in ids:
            await ml.send({"type": "alert", "id": alert_id, "streamId": "cam", "severity": "high",
                           "message": "person", "metadata": boxes, "timestamp": 2})

        def answered() -> dict[str, dict[str, Any]]:
            return {m["ref"]: m for _, m in heard if isinstance(m, dict) and m.get("ref") in ids}
        await _wait_for(lambda: len(answered()) == len(ids))
        await _wait_for(lambda: _frames_since(seen, full_at) >= 30)
        await asyncio.sleep(0.2)  # room for a late ack, which must not come
        replies = [m for _, m in heard if isinstance(m, dict) and m.get("ref") in ids]
        assert [(m["type"], m["code"]) for m in replies] == [("error", "store-unavailable")] * len(ids)
        assert await store.count_alerts("cam") == 1
        frames_while_full = _frames_since(seen, full_at)
        await ml.send({"type": "ping", "id": "still-there"})
        await _wait_for(lambda: any(m.get("ref") == "still-there" for _, m in heard if isinstance(m, dict)))
        assert all(c.conn.close_code is None for c in (phone, dashboard, ml))

        await store._db.write(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))  # space again
        for _ in range(2):
            await ml.send({"type": "alert", "id": "full-0", "streamId": "cam", "severity": "high",
                           "message": "person", "metadata": boxes, "timestamp": 2})
        await _wait_for(lambda: sum(m.get("type") == "ack" for _, m in heard if isinstance(m, dict)) == 3)
        first, repeat = [m for _, m in heard if isinstance(m, dict) and m.get("type") == "ack"][1:]
        assert first["ref"] == repeat["ref"] == "full-0" and "duplicate" not in first and repeat["duplicate"]
        assert (repeat["alertId"], repeat["seq"]) == (first["alertId"], first["seq"])
        assert await store.count_alerts("cam") == 2
        assert (await store.find_alert_by_client_id("cam", "detector", "full-0"))["alertId"] == first["alertId"]
        await _wait_for(lambda: any(isinstance(m, dict) and m.get("alertId") == first["alertId"] for _, m in seen))
        assert [m["seq"] for _, m in seen if isinstance(m, dict) and m.get("type") == "alert"] == \
            [1, first["seq"]]  # the dashboard got each stored alert once, and none of the refused ones
        print(f"\nwhile the disk was full: {len(ids)} alerts refused (store-unavailable), "
              f"{frames_while_full} frames relayed to the dashboard")
    finally:
        if pump is not None:
            pump.cancel()
        for client in (phone, dashboard, ml):
            client.close()
        await asyncio.gather(*readers, return_exceptions=True)
        await close()
        store.close()
