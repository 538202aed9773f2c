"""`watchout cleanup`, `watchout report` and `watchout jobs`: what they print and change."""
from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import os
import subprocess
import sys

import pytest
import tornado.websocket

from conftest import Client, alert_message, producer, replace_settings, start_server, watcher
from workers.cleanup import cleanup
from workers.admin import UsageError, cleanup_command, jobs_command, report_command, report_period

UTC = dt.timezone.utc


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _watchout(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_")}
    return subprocess.run([sys.executable, "-m", "watchout", *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
async def short_lived(settings):
    """A server whose retention limits pass within a second: stale 0.36 s, offline streams and alerts 0.86 s."""
    server, close = await start_server(replace_settings(settings, stale_after_h=1e-4, stream_retention_d=1e-5,
                                                        alert_retention_d=1e-5))
    yield server
    await close()


async def _seed(server, token):
    """A registered stream never seen, and a stream with 3 alerts whose producer left; then let them age."""
    store = server.services.store
    await store.create_stream("never", "alice")
    clients = []

    async def connect():
        client = Client(await tornado.websocket.websocket_connect(server.ws_url))
        clients.append(client)
        return client

    phone = await producer(connect, token, "cam")
    ml = await watcher(connect, token, "cam", client_type="ml-service", sub="detector", role="service", streams="*")
    for _ in range(3):
        await ml.send(alert_message("cam"))
        await ml.recv_type("ack")
    phone.close()
    ml.close()
    while (await store.get_stream("cam"))["status"] != "offline":
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)


async def test_cleanup_dry_run_changes_nothing_and_cleanup_then_removes_and_records_its_run(short_lived, token):
    services, store = short_lived.services, short_lived.services.store
    await _seed(short_lived, token)

    out = io.StringIO()
    assert await cleanup_command(services, out, io.StringIO(), dry_run=True) == 0
    text = out.getvalue()
    assert "Would remove 2 stream(s)" in text and "never seen" in text and "offline, last seen" in text
    assert "Would remove 3 alert(s)" in text
    assert sorted(s["streamId"] for s in await store.list_streams(None, None, 10)) == ["cam", "never"]
    assert await store.count_alerts("cam") == 3
    assert await store.job_runs() == []

    out = io.StringIO()
    assert await cleanup_command(services, out, io.StringIO(), dry_run=False) == 0
    assert "Removed 2 stream(s)" in out.getvalue()
    assert await store.list_streams(None, None, 10) == []
    out = io.StringIO()
    await jobs_command(services, services.settings, out)
    prune = next(line for line in out.getvalue().splitlines() if line.startswith("prune"))
    assert " ok " in f"{prune} " and "/cli:" in prune


async def test_cleanup_shows_progress_on_a_terminal_only(short_lived, token):
    await _seed(short_lived, token)
    piped = io.StringIO()
    await cleanup_command(short_lived.services, io.StringIO(), piped, dry_run=True)
    assert piped.getvalue() == ""
    terminal = Terminal()
    await cleanup_command(short_lived.services, io.StringIO(), terminal, dry_run=False)
    assert "streams: 2/2" in terminal.getvalue() and terminal.getvalue().endswith("\r\x1b[K")


async def test_report_as_csv_parses_with_a_row_per_stream_and_owner(server, ws_connect, token):
    phone = await producer(ws_connect, token, "cam")
    ml = await watcher(ws_connect, token, "cam", client_type="ml-service", sub="detector", role="service",
                       streams="*")
    for severity in ("high", "low", "high"):
        await ml.send(alert_message("cam", severity=severity))
        await ml.recv_type("ack")
    phone.close()
    now = dt.datetime.now(UTC)
    out = io.StringIO()
    await report_command(server.services, out, (now - dt.timedelta(hours=1), now + dt.timedelta(seconds=1)),
                         fmt="csv")
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["scope"], r["id"], r["ownerId"], r["alerts"], r["high"], r["low"], r["unacknowledged"],
             r["topObjectTypes"]) for r in rows] == [("stream", "cam", "alice", "3", "2", "1", "3", "person:3"),
                                                     ("owner", "alice", "alice", "3", "2", "1", "3", "person:3")]
    out = io.StringIO()
    await report_command(server.services, out, (now - dt.timedelta(hours=1), now + dt.timedelta(seconds=1)),
                         owner_id="bob", fmt="csv")
    assert out.getvalue().count("\n") == 1  # the header only


def _period(**options):
    args = argparse.Namespace(since=None, start=None, end=None)
    for key, value in options.items():
        setattr(args, key, value)
    return report_period(args, dt.datetime(2026, 11, 26, 12, tzinfo=UTC))


def test_report_periods_from_since_or_from_and_to():
    noon = dt.datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert _period() == (noon - dt.timedelta(hours=24), noon)
    assert _period(since="90m") == (noon - dt.timedelta(minutes=90), noon)
    assert _period(start="2026-11-25", end="2026-11-26T06:00+01:00") == (
        dt.datetime(2026, 11, 25, tzinfo=UTC), dt.datetime(2026, 11, 26, 5, tzinfo=UTC))
    for bad in ({"since": "yesterday"}, {"end": "2026-11-25"}, {"start": "2026-11-27"}, {"start": "soon"},
                {"since": "1h", "start": "2026-11-25"}):
        with pytest.raises(UsageError):
            _period(**bad)


def test_without_a_database_cleanup_and_report_refuse_and_jobs_shows_the_schedule(tmp_path):
    env = {"WATCHOUT_DATA_DIR": str(tmp_path / "data")}
    for command in (["cleanup", "--dry-run"], ["report", "--format", "csv"]):
        result = _watchout(*command, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"no database at {tmp_path / 'data' / 'watchout.db'}" in result.stderr
        result = _watchout(*command, env={"WATCHOUT_DATA_DIR": ":memory:"})
        assert result.returncode == 2 and ":memory:" in result.stderr
    assert not (tmp_path / "data").exists()  # never an empty database made in the wrong place
    result = _watchout("jobs", env={**env, "WATCHOUT_REPORT_SCHEDULE": "06:30"})
    assert result.returncode == 0 and "showing the schedule only" in result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["check-producers", "mark-offline", "prune", "report"]
    assert "06:30 UTC" in result.stdout


MONGO = os.environ.get("WATCHOUT_TEST_MONGO_URI", "")


@pytest.mark.skipif(not MONGO, reason="set WATCHOUT_TEST_MONGO_URI=mongodb://... to run the commands on MongoDB")
def test_the_commands_against_mongodb():
    env = {"WATCHOUT_MONGO_URL": MONGO, "WATCHOUT_MONGO_DB": f"watchout_cli_{os.getpid()}"}
    dry = _watchout("cleanup", "--dry-run", env=env)
    assert dry.returncode == 0 and "Nothing to remove (dry run)." in dry.stdout
    report = _watchout("report", "--since", "1h", "--format", "csv", env=env)
    assert report.returncode == 0 and report.stdout.startswith("from,to,scope,id,")
    jobs = _watchout("jobs", env=env)
    assert jobs.returncode == 0 and "prune" in jobs.stdout


async def test_jobs_lists_schedules_next_and_last_runs_a_running_job_and_only_live_nodes(server):
    store, settings = server.services.store, server.services.settings
    now = dt.datetime(2026, 11, 26, 12, 0, 5, tzinfo=UTC)

    def run(job, scope, node, minutes_ago, result="ok", error=None):
        return {"job": job, "scope": scope, "node": node, "slot": now, "durationS": 0.25, "result": result,
                "error": error, "summary": {}, "startedAt": now - dt.timedelta(minutes=minutes_ago)}
    await store.record_job_run("check-producers@node-a", run("check-producers", "node", "node-a", 0.1))
    await store.record_job_run("check-producers@node-b", run("check-producers", "node", "node-b", 120))
    await store.record_job_run("prune", run("prune", "cluster", "node-b", 180, "failed", "store unavailable"))
    assert await store.acquire_lease("report", "node-a", now, now - dt.timedelta(seconds=3), 60)
    out = io.StringIO()
    await jobs_command(server.services, settings, out, now=now)
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert "2026-11-26 12:00:15 UTC" in lines["check-producers"] and "node-a" in lines["check-producers"]
    assert "node-b" not in out.getvalue().split("prune")[0]  # a node that stopped two hours ago
    assert "failed (store unavailable)" in lines["prune"] and "2026-11-26 09:00:05 UTC" in lines["prune"]
    assert "running since 2026-11-26 12:00:02 UTC" in lines["report"] and "node-a" in lines["report"]
    assert "2026-11-27 00:00:00 UTC" in lines["report"]  # its next run

    await cleanup(server.services, now + dt.timedelta(hours=23))  # forgets per-node runs a day old, not the others
    assert sorted(r["runId"] for r in await store.job_runs()) == ["check-producers@node-a", "prune"]
