"""Retention prune figures: how long the event loop is held, and how long alert writes wait, while old alerts go.

    python bench/prune.py [--old 500000] [--recent 50000] [--streams 100] [--owners 10] [--data-dir DIR]

Stores --old alerts received before alert_retention_d (between retention + 1 and retention + 31 days ago)
and --recent ones within it, over --streams streams, in a new SQLite database (the loading of
bench/history.py: the store's own calls, in time order). Then runs the real prune job,
workers.cleanup.cleanup(services, now) (what the hourly job and `watchout cleanup` run), inside
open_services, while a LoopLagMonitor(interval_s=0.001) measures how late the event loop runs a timer
and a task stores one alert every 10 ms on a stream of its own the way the alert intake stores a batch
(reserve_batch, insert_alerts, mark_stored: what an `ack` waits for). The same two run for --baseline
seconds before the prune, for comparison. Target: the loop is never held more than 10 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from history import Shape, create_streams, machine, print_table, store_alerts  # noqa: E402
from watchout.looplag import LoopLagMonitor  # noqa: E402
from watchout.services import open_services  # noqa: E402
from watchout.settings import Settings  # noqa: E402
from watchout.store import Store, new_alert_id, utcnow  # noqa: E402
from workers.cleanup import cleanup  # noqa: E402

SECRET = "bench-prune-0123456789abcdef0123456789abcdef0123"
LAG_TARGET_MS = 10.0
WRITE_EVERY_S = 0.010
LIVE = "live"


class Writer:
    """Stores one alert on stream `live` every WRITE_EVERY_S, each write in a task of its own (a slow write
    does not delay the next one); `latencies` gets each write's seconds, from its start to its last commit."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._writes)

    def take(self) -> list[float]:
        """The latencies of the writes finished since the last take()."""
        taken, self.latencies = self.latencies, []
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += WRITE_EVERY_S
            await asyncio.sleep(max(0.0, due - loop.time()))
            task = asyncio.create_task(self._write())
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self) -> None:
        started = time.perf_counter()
        try:
            seq, _ = await self._store.reserve_batch(LIVE, 1, "", 0.0)
            await self._store.insert_alerts([{
                "alertId": new_alert_id(), "streamId": LIVE, "seq": seq, "ownerId": "owner0", "senderId": "ml",
                "severity": "high", "message": "person at the door", "metadata": {"confidence": 0.9},
                "timestamp": 1, "receivedAt": utcnow(), "clientId": None, "acknowledged": None,
                "hasSnapshot": False}])
            await self._store.mark_stored(LIVE, seq)
        except Exception as exc:  # reported in the output; the run goes on
            self.failures.append(repr(exc))
            return
        self.latencies.append(time.perf_counter() - started)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(fraction * len(ordered)) - 1)] if ordered else 0.0


async def run(args: argparse.Namespace, data_dir: Path) -> int:
    settings = Settings(jwt_secret=SECRET, data_dir=str(data_dir), log_level="warning",
                        alert_retention_d=args.retention_days)
    shape = Shape(args.streams, args.owners)
    now = dt.datetime.now(dt.timezone.utc)
    retention = dt.timedelta(days=args.retention_days)
    async with open_services(settings) as services:
        store = services.store
        print(f"# store: {store.description}", flush=True)
        print(f"[bench] storing {args.old:,} old and {args.recent:,} recent alerts over {args.streams} streams "
              "through the store's API", file=sys.stderr, flush=True)
        await create_streams(store, shape)
        await store.create_stream(LIVE, "owner0")
        rng = random.Random(1)
        load_s = await store_alerts(store, shape, args.old, now - retention - dt.timedelta(days=31),
                                    now - retention - dt.timedelta(days=1), chunk=args.chunk, rng=rng,
                                    report=sys.stderr)
        load_s += await store_alerts(store, shape, args.recent, now - dt.timedelta(days=30),
                                     now - dt.timedelta(minutes=1), chunk=args.chunk, rng=rng, report=sys.stderr)
        size = sum(f.stat().st_size for f in data_dir.glob("watchout.db*"))
        print(f"# loading: {load_s:.1f} s, {(args.old + args.recent) / load_s:,.0f} alerts/s; database files "
              f"{size / 2**20:,.0f} MiB", flush=True)

        lags: list[float] = []
        writer = Writer(store)
        async with LoopLagMonitor(lags.append, interval_s=0.001) as monitor:
            writer.start()
            await asyncio.sleep(args.baseline)
            base_lag, base_lags, base_writes = monitor.max_lag_since_reset(), lags[:], writer.take()
            monitor.reset()
            lags.clear()
            started = time.perf_counter()
            result = await cleanup(services, dt.datetime.now(dt.timezone.utc))
            prune_s = time.perf_counter() - started
            prune_lag, prune_lags, prune_writes = monitor.max_lag_since_reset(), lags[:], writer.take()
            await writer.stop()
        prune_writes += writer.take()  # those still in flight when the prune ended
        removed = sum(result.alerts.values())
        counts = await asyncio.gather(*(store.count_alerts(sid) for sid in shape.stream_ids()))
        live = await store.count_alerts(LIVE)

    ms = 1000.0
    rows: list[tuple[str, ...]] = [
        ("alerts removed", f"{removed:,}", "-", f"{args.old:,} expected", "PASS" if removed == args.old else "FAIL"),
        ("alerts kept (recent)", f"{sum(counts):,}", "-", f"{args.recent:,} expected",
         "PASS" if sum(counts) == args.recent else "FAIL"),
        ("prune duration", f"{prune_s:.2f} s", "-", "-", ""),
        ("event-loop lag, max", f"{prune_lag * ms:.2f} ms", f"{base_lag * ms:.2f} ms",
         f"<= {LAG_TARGET_MS:g} ms", "PASS" if prune_lag * ms <= LAG_TARGET_MS else "FAIL"),
        ("event-loop lag, p99", f"{percentile(prune_lags, 0.99) * ms:.2f} ms",
         f"{percentile(base_lags, 0.99) * ms:.2f} ms", "-", ""),
        ("event-loop lag, ticks measured", f"{len(prune_lags):,}", f"{len(base_lags):,}", "-", ""),
        ("alert writes done (one per 10 ms)", f"{len(prune_writes):,}", f"{len(base_writes):,}", "-", ""),
        ("alert write latency, median", f"{percentile(prune_writes, 0.5) * ms:.2f} ms",
         f"{percentile(base_writes, 0.5) * ms:.2f} ms", "-", ""),
        ("alert write latency, p99", f"{percentile(prune_writes, 0.99) * ms:.2f} ms",
         f"{percentile(base_writes, 0.99) * ms:.2f} ms", "-", ""),
        ("alert write latency, max", f"{max(prune_writes, default=0) * ms:.2f} ms",
         f"{max(base_writes, default=0) * ms:.2f} ms", "-", ""),
    ]
    print_table(f"Prune of {args.old:,} alerts older than {args.retention_days:g} days over {args.streams} streams "
                f"(baseline: the {args.baseline:g} s before it, same monitor and writes)",
                ("measure", "during the prune", "baseline", "target", "result"), rows)
    print(f"# alerts stored on stream {LIVE} meanwhile: {live:,}; write failures: {len(writer.failures)}"
          + (f" (first: {writer.failures[0]})" if writer.failures else ""))
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    return 1 if any(r[4] == "FAIL" for r in rows) or writer.failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", type=int, default=500_000, help="alerts older than the retention (removed)")
    p.add_argument("--recent", type=int, default=50_000, help="alerts within the retention (kept)")
    p.add_argument("--streams", type=int, default=100, help="streams h0..hN-1 holding them")
    p.add_argument("--owners", type=int, default=10, help="users owning the streams")
    p.add_argument("--retention-days", type=float, default=90.0, help="alert_retention_d")
    p.add_argument("--baseline", type=float, default=2.0, help="seconds measured before the prune")
    p.add_argument("--chunk", type=int, default=5000, help="alerts per insert_alerts call when loading")
    p.add_argument("--data-dir", help="an empty or new directory for the database, kept at the end "
                                      "(default: a temporary directory, removed at the end)")
    args = p.parse_args(argv)
    if args.old < 1 or args.recent < 0 or args.streams < 1 or not 1 <= args.owners <= args.streams:
        p.error("need --old >= 1, --recent >= 0, --streams >= 1 and 1 <= --owners <= --streams")
    if args.retention_days <= 0:
        p.error("--retention-days must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data_dir and any(Path(args.data_dir).glob("watchout.db*")):
        print(f"bench/prune.py: {args.data_dir} holds a database already; the prune would change it: "
              "give an empty or new directory", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="watchout-prune-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"# {machine()}", flush=True)
    try:
        return asyncio.run(run(args, data_dir))
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
