"""The admin commands on the SQLite database while `watchout serve` runs on it: report, cleanup, jobs, backup."""
from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import re
import signal
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import tornado.httpclient
import tornado.websocket

from conftest import JPEG, Client, alert_message
from watchout.auth import mint_token
from watchout.store.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
SECRET = "admin-sqlite-secret-0123456789abcdef0123"
STALE = {"WATCHOUT_STALE_AFTER_H": "0.0001"}  # for cleanup only: a stream registered 0.36 s ago and never seen


def _env(data_dir: Path | str, **extra: str) -> dict[str, str]:
    """No WATCHOUT_* from the caller's environment; this checkout's packages whatever the working directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WATCHOUT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update({"WATCHOUT_DATA_DIR": str(data_dir), "WATCHOUT_JWT_SECRET": SECRET, **extra})
    return env


async def _watchout(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`watchout ARGS` to its end, without blocking the loop (the test's clients keep going meanwhile)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _serve(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "watchout", "serve", "--port", "0", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    while not any("Stats:" in line for line in lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "watchout serve exited early:\n" + "".join(lines)
        lines.append(line)
    match = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", "".join(lines))
    assert match is not None
    return proc, int(match.group(1))


async def _stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class Rest:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = tornado.httpclient.AsyncHTTPClient()

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        response = await self.http.fetch(self.base + path, method=method, raise_error=False,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"},
                                         body=None if body is None else json.dumps(body))
        return response.code, json.loads(response.body) if response.body else None

    async def figures(self, token: str) -> tuple[list[str], int]:
        """(the stream ids, the alerts of cam) as a client sees them."""
        code, streams = await self.call("GET", "/api/streams", token)
        assert code == 200
        code, alerts = await self.call("GET", "/api/streams/cam/alerts?limit=500", token)
        assert code == 200
        return sorted(s["streamId"] for s in streams["items"]), len(alerts["items"])


def _snapshot(size: int = 200_000) -> str:
    """A snapshot big enough that the database grows by megabytes (random: nothing shrinks it)."""
    return base64.b64encode(JPEG[:-2] + os.urandom(size) + JPEG[-2:]).decode()


def _read_copy(path: Path) -> tuple[str, int, int]:
    """(integrity_check, streams, alerts) of a copy, opened read-only."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        check = connection.execute("PRAGMA integrity_check").fetchone()[0]
        streams = connection.execute("SELECT count(*) FROM streams").fetchone()[0]
        alerts = connection.execute("SELECT count(*) FROM alerts").fetchone()[0]
    finally:
        connection.close()
    return check, streams, alerts


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_admin_commands_and_backup_work_on_the_database_while_the_service_runs_on_it(tmp_path):
    env = _env(tmp_path / "data")
    alice, admin = mint_token(SECRET, "HS256", "alice", "user"), mint_token(SECRET, "HS256", "ops", "admin")
    service = mint_token(SECRET, "HS256", "detector", "service", streams="*")
    proc, port = await _serve(env)
    clients: list[Client] = []
    try:
        rest = Rest(port)
        for stream_id, name in (("cam", "Front door"), ("ghost", "Garage")):
            code, _ = await rest.call("POST", "/api/streams", alice, {"streamId": stream_id, "name": name})
            assert code == 201
        url = f"ws://127.0.0.1:{port}/ws"
        phone = Client(await tornado.websocket.websocket_connect(url))
        ml = Client(await tornado.websocket.websocket_connect(url, max_message_size=64 << 20))
        clients += [phone, ml]
        await phone.send({"type": "register", "clientType": "mobile", "streamId": "cam", "token": alice})
        await phone.recv_type("registered")
        await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": "cam", "token": service})
        await ml.recv_type("subscribed")
        for severity in ("high", "low", "high"):
            await ml.send(alert_message("cam", severity=severity))
            await ml.recv_type("ack")

        # report: read by another process from the file the service writes
        code, out, err = await _watchout(env, "report", "--since", "1h", "--format", "csv")
        assert code == 0, err
        rows = {(r["scope"], r["id"]): r for r in csv.DictReader(io.StringIO(out))}
        cam = rows[("stream", "cam")]
        assert (cam["ownerId"], cam["alerts"], cam["high"], cam["low"], cam["unacknowledged"]) == (
            "alice", "3", "2", "1", "3")
        assert rows[("owner", "alice")]["alerts"] == "3"

        # cleanup --dry-run: says what it would remove, and nothing changes
        await asyncio.sleep(0.4)  # ghost, registered and never seen, is now stale (for STALE)
        before = await rest.figures(admin)
        assert before == (["cam", "ghost"], 3)
        code, out, err = await _watchout({**env, **STALE}, "cleanup", "--dry-run")
        assert code == 0, err
        assert "Would remove 1 stream(s)" in out and "ghost" in out and "never seen" in out
        assert await rest.figures(admin) == before
        code, out, err = await _watchout(env, "jobs")
        assert code == 0 and "/cli:" not in out  # a dry run records no run

        # cleanup: removes it under the prune lease, and records its run
        code, out, err = await _watchout({**env, **STALE}, "cleanup")
        assert code == 0, err
        assert "Removed 1 stream(s)" in out and "ghost" in out
        assert await rest.figures(admin) == (["cam"], 3)
        assert (await rest.call("GET", "/api/streams/ghost", admin))[0] == 404

        # jobs: the schedule, and the run just made
        code, out, err = await _watchout(env, "jobs")
        assert code == 0, err
        lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and line[0] != " "}
        assert sorted(lines) == ["check-producers", "mark-offline", "prune", "report"]
        assert " ok " in lines["prune"] and "/cli:" in lines["prune"]

        # backup: a checked copy, 0600, written by rename, and never over an existing file without --force
        copy = tmp_path / "backups" / "watchout.db"
        copy.parent.mkdir()
        code, out, err = await _watchout(env, "backup", str(copy))
        assert code == 0, err
        assert f"Wrote {copy} (" in out and "1 stream(s), 3 alert(s)" in out
        assert _read_copy(copy) == ("ok", 1, 3)
        assert _mode(copy) == 0o600
        assert os.listdir(copy.parent) == ["watchout.db"]  # no temporary or journal file left
        first = copy.read_bytes()
        code, out, err = await _watchout(env, "backup", str(copy))
        assert code == 2 and "exists" in err and "--force" in err and "Traceback" not in err
        assert copy.read_bytes() == first
        code, out, err = await _watchout(env, "backup", "--force", str(copy))
        assert code == 0, err
        code, out, err = await _watchout(env, "backup", str(copy.parent))  # a directory: a dated file in it
        assert code == 0, err
        dated = [name for name in os.listdir(copy.parent) if name != "watchout.db"]
        assert len(dated) == 1 and re.fullmatch(r"watchout-\d{8}T\d{6}Z\.db", dated[0])
        assert _mode(copy.parent / dated[0]) == 0o600

        # backup while alerts with snapshots are being stored: the copy is one consistent moment
        for _ in range(20):
            await ml.send(alert_message("cam", snapshot=_snapshot()))
            await ml.recv_type("ack")
        stored = 23
        acked, stop = [0], asyncio.Event()

        async def keep_sending() -> None:
            while not stop.is_set():
                await ml.send(alert_message("cam", snapshot=_snapshot()))
                await ml.recv_type("ack", timeout=10)
                acked[0] += 1

        sender = asyncio.create_task(keep_sending())
        while acked[0] < 3:
            await asyncio.sleep(0.01)
        least = stored + acked[0]
        live = tmp_path / "backups" / "live.db"
        code, out, err = await _watchout(env, "backup", str(live))
        during = acked[0] - (least - stored)
        stop.set()
        await sender
        most = stored + acked[0]
        assert code == 0, err
        check, streams, alerts = _read_copy(live)
        assert check == "ok" and streams == 1 and least <= alerts <= most
        assert during > 0  # the service went on storing alerts while the copy was made
        assert (await rest.figures(admin))[1] == most
    finally:
        for client in clients:
            client.close()
        assert await _stop(proc) == 0

    # and with the service stopped, without a JWT key (the commands take no token)
    keyless = {k: v for k, v in env.items() if k != "WATCHOUT_JWT_SECRET"}
    code, out, err = await _watchout(keyless, "report", "--since", "1h", "--format", "csv")
    assert code == 0 and ",stream,cam,alice," in out, err
    code, out, err = await _watchout(keyless, "cleanup", "--dry-run")
    assert code == 0 and "Nothing to remove (dry run)." in out, err
    stopped = tmp_path / "stopped.db"
    code, out, err = await _watchout(keyless, "backup", str(stopped))
    assert code == 0, err
    assert _read_copy(stopped)[:2] == ("ok", 1)


async def test_backup_refuses_what_it_cannot_copy_or_where_it_must_not_write(tmp_path):
    target = str(tmp_path / "copy.db")
    code, _, err = await _watchout(_env(":memory:"), "backup", target)
    assert code == 2 and ":memory:" in err and "Traceback" not in err
    code, _, err = await _watchout(_env(tmp_path / "data", WATCHOUT_MONGO_URL="mongodb://127.0.0.1:9"),
                                   "backup", target)
    assert code == 2 and "mongodump" in err
    code, _, err = await _watchout(_env(tmp_path / "data"), "backup", target)  # nothing there yet
    assert code == 2 and f"no database at {tmp_path / 'data' / 'watchout.db'}" in err
    assert not (tmp_path / "data").exists() and not Path(target).exists()

    (tmp_path / "data").mkdir()
    store = SQLiteStore(str(tmp_path / "data" / "watchout.db"))
    await store.start()
    store.close()
    env = _env(tmp_path / "data")
    code, _, err = await _watchout(env, "backup", str(tmp_path / "data" / "watchout.db"), "--force")
    assert code == 2 and "live database" in err
    for target in (str(tmp_path / "missing" / "copy.db"), str(tmp_path / "missing") + os.sep):
        code, _, err = await _watchout(env, "backup", target)
        assert code == 2 and f"{tmp_path / 'missing'} does not exist" in err
        assert not (tmp_path / "missing").exists()


async def test_an_in_memory_store_backs_up_too(tmp_path):
    store = SQLiteStore(":memory:")
    await store.start()
    await store.create_stream("cam", "alice")
    target = tmp_path / "copy.db"
    # on the writer's connection, inside its transaction, the backup API answers "locked" for ever
    counts = await asyncio.wait_for(store.backup(str(target)), 10)
    store.close()
    assert counts == {"streams": 1, "alerts": 0, "snapshots": 0}
    assert _read_copy(target) == ("ok", 1, 0)
