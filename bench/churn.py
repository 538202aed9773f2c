"""Churn: alerts keep their promise while everything around them breaks (issue 12).

    python bench/churn.py [--alerts 100000] [--rate 1000] [--watchers 3] [--seed N] [--data-dir DIR]

Starts `watchout serve` as a child process on a SQLite data_dir and a fixed loopback port, then runs, at once:
an ML service (a bare SDK `Connection`) sending `--alerts` alerts with ids at `--rate` per second; `--watchers`
SDK Watchers (alerts only, since_seq=0) whose connection is cut every 1-3 s at random; a REST reader paging
GET /api/streams/{id}/alerts (limit 500) in a loop. Half-way the stream is deleted and registered again;
at three quarters the server is killed with SIGKILL and restarted on the same data_dir and port.

What "exactly once" means across the deletion: the first half's alerts (ids `a-*`) are all acked before the
stream is deleted, and go with the deleted history; the second half is sent with new ids (`b-*`) to the new
history. Every id gets exactly one distinct answer (alertId, seq): a resend after the kill may be answered
`duplicate`, with the first copy's. Every `b-*` id is stored exactly once in the current history and nothing
else is. Each watcher, keeping (epoch, seq, alertId) and dropping its list when the epoch changes (docs/sdk.md),
ends with exactly the stored list. Prints the figures; exits 1 when a promise was broken.
tests/test_churn.py runs the same harness with 5,000 alerts.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tornado.httpclient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from watchout.auth import mint_token  # noqa: E402
from watchout.client import (Ack, Alert, Backoff, Connection, Message, Producer, StreamDeleted,  # noqa: E402
                             Watcher)

SECRET = "bench-churn-0123456789abcdef0123456789abcdef"
STREAM = "cam-churn"
OWNER = "alice"
PAGE = 500
WINDOW = 200  # alerts in flight at most
FAST = Backoff(base_s=0.05, cap_s=0.5)
Entry = tuple[str, int, str]  # (epoch, seq, alertId)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_environment(data_dir: Path, secret: str) -> dict[str, str]:
    """For a `watchout serve` child: no WATCHOUT_* from the caller's environment; this checkout's packages
    whatever the working directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHOUT_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update({"WATCHOUT_DATA_DIR": str(data_dir), "WATCHOUT_JWT_SECRET": secret, "WATCHOUT_LOG_LEVEL": "warning"})
    return env


class Server:
    """`watchout serve` as a child process on a fixed port, killable with SIGKILL; its output kept in `lines`."""

    def __init__(self, data_dir: Path, port: int, secret: str = SECRET) -> None:
        self.data_dir = data_dir
        self.port = port
        self.secret = secret
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    def _env(self) -> dict[str, str]:
        return serve_environment(self.data_dir, self.secret)

    async def start(self) -> None:
        """Start it and wait for the banner's last line (it listens by then)."""
        started = len(self.lines)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchout", "serve", "--port", str(self.port), cwd=self.data_dir.parent,
            env=self._env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert self.proc.stdout is not None
        while not any("Stats:" in line for line in self.lines[started:]):
            line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
            if not line:
                raise RuntimeError("watchout serve exited early:\n" + "".join(self.lines[started:]))
            self.lines.append(line)
        self._reader = asyncio.create_task(self._keep_reading())  # a full pipe would block the server

    async def _keep_reading(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode())

    async def stop(self, kill: bool = False) -> int:
        """SIGKILL (`kill`) or SIGTERM; returns the exit code (-9 after a kill)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
        try:
            code = await asyncio.wait_for(self.proc.wait(), 15)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass
class Figures:
    """What happened, and the promises broken (`problems`: empty when all were kept)."""

    alerts_sent: int = 0
    first_half: int = 0
    acked_ids: int = 0
    duplicate_acks: int = 0
    stored: int = 0
    store_seq_gaps: int = 0
    ml_connects: int = 0
    unacked_at_kill: int = 0
    watcher_drops: list[int] = field(default_factory=list)
    watcher_reconnects: list[int] = field(default_factory=list)
    watcher_resets: list[int] = field(default_factory=list)
    watcher_repeats: list[int] = field(default_factory=list)
    rest_passes: int = 0
    rest_pages: int = 0
    rest_errors: int = 0
    rest_passes_abandoned: int = 0
    took_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (f"alerts sent {self.alerts_sent} ({self.first_half} before the deletion, "
                f"{self.alerts_sent - self.first_half} after), ids acked {self.acked_ids}, "
                f"duplicate acks {self.duplicate_acks}, stored in the current history {self.stored} "
                f"(seq gaps {self.store_seq_gaps}), ML connects {self.ml_connects}, "
                f"alerts in flight at the kill {self.unacked_at_kill}\n"
                f"watchers: drops {self.watcher_drops}, reconnects {self.watcher_reconnects}, "
                f"history_resets {self.watcher_resets}, alert_repeats {self.watcher_repeats}\n"
                f"REST: full passes {self.rest_passes}, pages {self.rest_pages}, failed requests "
                f"{self.rest_errors}, passes abandoned (history changed) {self.rest_passes_abandoned}\n"
                f"took {self.took_s:.1f} s; problems: {self.problems or 'none'}")


class _Rest:
    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}/api/streams/{STREAM}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = tornado.httpclient.AsyncHTTPClient()

    async def page(self, cursor: str | None) -> dict[str, Any]:
        query = f"limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
        response = await self.client.fetch(f"{self.base}/alerts?{query}", headers=self.headers, request_timeout=30)
        page: dict[str, Any] = json.loads(response.body)
        return page

    async def history(self) -> tuple[str, list[Entry]]:
        """The stored list, oldest first, with its epoch (every page pinned to the first's lastSeq)."""
        cursor: str | None = None
        items: list[Entry] = []
        epoch = ""
        while True:
            page = await self.page(cursor)
            epoch = epoch or page["epoch"]
            if page["epoch"] != epoch:
                raise RuntimeError("the history changed while it was read")
            items += [(epoch, item["seq"], item["alertId"]) for item in page["items"]]
            cursor = page["nextCursor"]
            if not cursor:
                return epoch, items[::-1]

    async def delete(self) -> None:
        await self.client.fetch(self.base, method="DELETE", headers=self.headers, request_timeout=30)


class _Slot:
    """One watcher position kept across Watcher objects (a new one after the stream was deleted)."""

    def __init__(self) -> None:
        self.watcher: Watcher | None = None
        self.kept: list[Entry] = []  # the current epoch's alerts, in order
        self.drops = 0
        self.reconnects = 0
        self.resets = 0
        self.repeats = 0

    def take(self, alert: Alert) -> None:
        assert alert.epoch is not None
        if self.kept and self.kept[-1][0] != alert.epoch:
            self.kept = []  # a new history: what we kept of the old one is gone from the store
        self.kept.append((alert.epoch, alert.seq, alert.alert_id))

    def retire(self) -> None:
        if self.watcher is not None:
            self.reconnects += max(0, self.watcher.connects - 1)
            self.resets += self.watcher.history_resets
            self.repeats += self.watcher.alert_repeats


async def run_churn(data_dir: Path, *, alerts: int = 5000, rate_per_s: float = 250.0, watchers: int = 3,
                    seed: int | None = None, settle_s: float = 60.0) -> Figures:
    """The whole scenario on `data_dir`; returns the figures, with every broken promise in `problems`."""
    rng = random.Random(seed)
    figures = Figures()
    server = Server(data_dir, free_port())
    url = f"ws://127.0.0.1:{server.port}/ws"
    user = mint_token(SECRET, "HS256", OWNER, "user", ttl_s=24 * 3600)
    service = mint_token(SECRET, "HS256", "detector", "service", streams="*", ttl_s=24 * 3600)
    rest = _Rest(server.port, user)
    half, kill_at = alerts // 2, alerts * 3 // 4
    recreated = asyncio.Event()
    stopping = asyncio.Event()
    slots = [_Slot() for _ in range(watchers)]
    answers: dict[str, set[tuple[str, int]]] = {}  # id -> every distinct (alertId, seq) it was acked with
    results: dict[str, asyncio.Future[Ack]] = {}
    tasks: list[asyncio.Task[Any]] = []
    producer: Producer | None = None
    ml = Connection(url, service, backoff=FAST)

    def on_ml_message(message: Message) -> None:
        if isinstance(message, Ack) and message.ref is not None:
            answers.setdefault(message.ref, set()).add((message.alert_id, message.seq))
            figures.duplicate_acks += message.duplicate

    async def follow(slot: _Slot) -> None:
        """Iterate the watcher's alerts; after StreamDeleted, continue from its saved position on a new one."""
        since: int | None = 0
        epoch: str | None = None
        while True:
            slot.watcher = Watcher(url, user, STREAM, video=False, since_seq=since, epoch=epoch, backoff=FAST)
            slot.watcher.resubscribe_s = 0.5  # not-found while the stream is being created again
            slot.watcher.start()
            try:
                async for alert in slot.watcher.alerts():
                    slot.take(alert)
                return
            except StreamDeleted:
                since, epoch = slot.watcher.last_seq, slot.watcher.epoch
                slot.retire()
                await recreated.wait()

    async def cut(slot: _Slot) -> None:
        """Cut the watcher's connection every 1-3 s: half the time cleanly, half as a dead network."""
        while not stopping.is_set():
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            ws = slot.watcher._ws if slot.watcher is not None else None  # the SDK has no public way to cut it
            if ws is None or stopping.is_set():
                continue
            slot.drops += 1
            if rng.random() < 0.5:
                ws.close(1000, "churn")
            else:
                ws.protocol.stream.close()  # type: ignore[union-attr]

    async def read_rest() -> None:
        """Full pinned passes over the history: no seq twice, newest first, none above lastSeq."""
        while not stopping.is_set():
            cursor: str | None = None
            seen: set[int] = set()
            epoch = None
            previous: int | None = None
            try:
                while True:
                    page = await rest.page(cursor)
                    figures.rest_pages += 1
                    if epoch is None:
                        epoch = page["epoch"]
                    elif page["epoch"] != epoch:
                        figures.rest_passes_abandoned += 1
                        break
                    for item in page["items"]:
                        seq = item["seq"]
                        if seq in seen or seq > page["lastSeq"] or (previous is not None and seq >= previous):
                            figures.problems.append(f"REST pass: seq {seq} after {previous}, twice or out of order")
                        seen.add(seq)
                        previous = seq
                    cursor = page["nextCursor"]
                    if not cursor:
                        figures.rest_passes += 1
                        break
            except (OSError, tornado.httpclient.HTTPClientError):
                figures.rest_errors += 1  # killed, or deleted: read again shortly
                await asyncio.sleep(0.2)

    async def restart_killed() -> None:
        figures.unacked_at_kill = ml.unacked_alerts
        assert await server.stop(kill=True) == -9
        await server.start()

    async def send_all() -> None:
        nonlocal producer
        window = asyncio.Semaphore(WINDOW)
        started = time.monotonic()
        for i in range(alerts):
            if i == half:  # the first half all acked, then the deletion and a new history
                await asyncio.gather(*results.values(), return_exceptions=True)
                figures.first_half = i
                await rest.delete()
                assert producer is not None
                if not isinstance(await asyncio.wait_for(producer.wait_closed(), 10), StreamDeleted):
                    figures.problems.append("the producer did not stop with StreamDeleted")
                producer = Producer(url, user, STREAM, alerts=False, backoff=FAST)
                producer.start()
                await producer.wait_ready(10)
                recreated.set()
            if i == kill_at:
                tasks.append(asyncio.create_task(restart_killed()))
            delay = started + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await window.acquire()
            alert_id = f"{'a' if i < half else 'b'}-{i:07d}"
            future = asyncio.ensure_future(ml.send_alert(STREAM, f"person {i}", "high", alert_id=alert_id,
                                                         metadata={"n": i}))
            future.add_done_callback(lambda _: window.release())
            results[alert_id] = future
            figures.alerts_sent += 1

    started = time.monotonic()
    await server.start()
    try:
        producer = Producer(url, user, STREAM, alerts=False, backoff=FAST)
        producer.start()
        await producer.wait_ready(10)  # creates the stream
        ml.add_listener(on_ml_message)
        ml.start()
        await ml.wait_ready(10)
        tasks += [asyncio.create_task(follow(slot)) for slot in slots]
        cutters = [asyncio.create_task(cut(slot)) for slot in slots] + [asyncio.create_task(read_rest())]
        await send_all()
        await asyncio.wait_for(asyncio.gather(*results.values(), *tasks[watchers:], return_exceptions=True),
                               settle_s)
        stopping.set()
        await asyncio.gather(*cutters)
        epoch, stored = await rest.history()
        await _settle(slots, stored, settle_s)
        _check(figures, slots, stored, epoch, results, answers, half)
    finally:
        stopping.set()
        for slot in slots:
            if slot.watcher is not None:
                await slot.watcher.close(timeout_s=0)
            slot.retire()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        figures.ml_connects = ml.connects
        await ml.close(timeout_s=0)
        if producer is not None:
            await producer.close(timeout_s=0)
        await asyncio.gather(*results.values(), return_exceptions=True)
        if server.is_running and await server.stop() != 0:
            figures.problems.append("watchout serve did not stop cleanly:\n" + "".join(server.lines[-20:]))
    _check_database(figures, data_dir, half, alerts)
    figures.watcher_drops = [s.drops for s in slots]
    figures.watcher_reconnects = [s.reconnects for s in slots]
    figures.watcher_resets = [s.resets for s in slots]
    figures.watcher_repeats = [s.repeats for s in slots]
    figures.took_s = time.monotonic() - started
    return figures


async def _settle(slots: list[_Slot], stored: list[Entry], timeout_s: float) -> None:
    """Wait until every watcher has the store's last alert (they may be reconnecting after a cut)."""
    deadline = time.monotonic() + timeout_s
    last = stored[-1] if stored else None
    while any((slot.kept[-1] if slot.kept else None) != last for slot in slots) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _check(figures: Figures, slots: list[_Slot], stored: list[Entry], epoch: str,
           results: dict[str, asyncio.Future[Ack]], answers: dict[str, set[tuple[str, int]]], half: int) -> None:
    figures.stored = len(stored)
    seqs = [seq for _, seq, _ in stored]
    figures.store_seq_gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:])) + (seqs[0] - 1 if seqs else 0)
    failed = [i for i, f in results.items() if f.exception() is not None]
    if failed:
        figures.problems.append(f"{len(failed)} alerts never acked, e.g. {failed[:3]}")
    figures.acked_ids = sum(1 for f in results.values() if f.exception() is None)
    twice = [i for i in results if len(answers.get(i, ())) != 1]
    if twice:
        figures.problems.append(f"{len(twice)} ids without exactly one distinct answer, e.g. {twice[:3]}")
    by_id = {alert_id: seq for _, seq, alert_id in stored}
    if len(by_id) != len(stored) or len(set(seqs)) != len(seqs):
        figures.problems.append("the stored list repeats an alert or a seq")
    current = {i: f.result() for i, f in results.items() if i.startswith("b-") and f.exception() is None}
    if sorted(by_id) != sorted(a.alert_id for a in current.values()):
        figures.problems.append(f"stored {len(by_id)} alerts, acked {len(current)} in the current history: "
                                "not the same alerts")
    wrong = [i for i, a in current.items() if by_id.get(a.alert_id) != a.seq]
    if wrong:
        figures.problems.append(f"{len(wrong)} acks name another seq than the stored one, e.g. {wrong[:3]}")
    for n, slot in enumerate(slots):
        if slot.kept != stored:
            missing = len(set(stored) - set(slot.kept))
            extra = len(slot.kept) - len(set(slot.kept) & set(stored))
            figures.problems.append(f"watcher {n}: {len(slot.kept)} alerts kept, {missing} of the stored "
                                    f"{len(stored)} missing, {extra} not stored (epoch {epoch})")


def _check_database(figures: Figures, data_dir: Path, half: int, alerts: int) -> None:
    """Straight from the file once the server has stopped: each id of the current history stored once."""
    database = sqlite3.connect(data_dir / "watchout.db")
    try:
        rows = database.execute("SELECT client_id, count(*) FROM alerts WHERE stream_id = ? "
                                "GROUP BY sender_id, client_id", (STREAM,)).fetchall()
    finally:
        database.close()
    expected = {f"b-{i:07d}" for i in range(half, alerts)}
    if {client_id for client_id, _ in rows} != expected or any(count != 1 for _, count in rows):
        figures.problems.append(f"the database holds {sum(c for _, c in rows)} rows for {len(rows)} ids; "
                                f"expected each of {len(expected)} ids once")


async def _main(args: argparse.Namespace) -> int:
    async def run(data_dir: Path) -> Figures:
        work: Awaitable[Figures] = run_churn(data_dir, alerts=args.alerts, rate_per_s=args.rate,
                                             watchers=args.watchers, seed=args.seed)
        return await asyncio.wait_for(work, args.timeout)
    if args.data_dir:
        figures = await run(Path(args.data_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="watchout-churn-") as tmp:
            figures = await run(Path(tmp) / "data")
    print(figures.report())
    return 1 if figures.problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="alerts sent per second")
    parser.add_argument("--watchers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    parser.add_argument("--data-dir", default="", help="a new directory to keep (default: a temporary one)")
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
