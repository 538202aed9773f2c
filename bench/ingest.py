"""Alert ingest through the embedded SQLite store alone (no sockets): alerts/s and CPU per alert for each
`sqlite_synchronous` setting, with one alert per batch (the worst case: three commits per alert) and with
batches of 32 (an ML service sending faster than one commit round).

    python bench/ingest.py [--alerts 3000] [--dir /tmp/watchout-ingest]

Each batch goes as the server's alert intake sends it: reserve the seqs, insert the alerts, mark them stored.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watchout.store import new_alert_id, utcnow  # noqa: E402
from watchout.store.sqlite import SQLiteStore  # noqa: E402


async def measure(directory: Path, synchronous: str, batch: int, alerts: int) -> tuple[float, float]:
    """(alerts per second, process CPU microseconds per alert) for one setting and batch size."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    store = SQLiteStore(str(directory / "watchout.db"), synchronous=synchronous)
    await store.start()
    await store.create_stream("bench", "owner")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(alerts // batch):
        first, _ = await store.reserve_batch("bench", batch, "", 0.0)
        docs = [{"alertId": new_alert_id(), "streamId": "bench", "seq": first + k, "ownerId": "owner",
                 "senderId": "ml", "severity": "high", "message": "person", "metadata": {"confidence": 0.9},
                 "timestamp": 1, "receivedAt": utcnow(), "clientId": f"c{first + k}", "acknowledged": None,
                 "hasSnapshot": False} for k in range(batch)]
        await store.insert_alerts(docs)
        await store.mark_stored("bench", first + batch - 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store.close()
    count = alerts // batch * batch
    return count / wall, cpu / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=3000)
    parser.add_argument("--dir", help="where to put the databases (default: a temporary directory; its disk counts)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="watchout-ingest-"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, databases in {base}")
    print(f"{'synchronous':<12} {'batch':>5} {'alerts/s':>10} {'CPU us/alert':>13}")
    try:
        for batch in (1, 32):
            for synchronous in ("normal", "full"):
                rate, cpu_us = await measure(base / f"{synchronous}-{batch}", synchronous, batch, args.alerts)
                print(f"{synchronous:<12} {batch:>5} {rate:>10,.0f} {cpu_us:>13,.0f}")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
