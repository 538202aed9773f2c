"""Alert history and ingest figures: REST query times over N stored alerts, and alerts stored per second.

    python bench/history.py [--alerts 100000] [--streams 10] [--repeat 5]

Starts the real app in this process on a loopback port (embedded store, or MongoDB when
WATCHOUT_MONGO_URL is set), stores the alerts through the store (bulk, as the alert intake does),
then times REST calls: the first page of one stream's history, a deep page by cursor, the first
and a deep page across streams, and a filtered query. (The deep cursors are built here rather than
walked to; the query they cause is the one a client following cursors would cause.)

The alert ingest rate (stored + acknowledged + fanned out) is scenario C of bench/relay.py, where
the clients run in their own processes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import tornado.httpclient
import tornado.httpserver
import tornado.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handlers import DEFAULT_HANDLER, ROUTES  # noqa: E402
from watchout.app import make_app, server_options  # noqa: E402
from watchout.auth import mint_token  # noqa: E402
from watchout.queries import AlertFilter, encode_cursor  # noqa: E402
from watchout.services import open_services  # noqa: E402
from watchout.settings import Settings  # noqa: E402
from watchout.store import new_alert_id, utcnow  # noqa: E402
from watchout.views import alert_resource  # noqa: E402

SECRET = "bench-history-0123456789abcdef0123456789abcdef"
SEVERITIES = ("low", "medium", "high", "critical")


async def fill(services: Any, alerts: int, streams: int) -> float:
    """Store `alerts` alerts spread over `streams` streams of one owner; returns seconds taken."""
    started = time.perf_counter()
    per_stream = alerts // streams
    for s in range(streams):
        sid = f"h{s}"
        await services.store.create_stream(sid, "owner")
        for first in range(1, per_stream + 1, 1000):
            count = min(1000, per_stream - first + 1)
            now = utcnow()
            docs = [{"alertId": new_alert_id(), "streamId": sid, "seq": first + i, "ownerId": "owner",
                     "senderId": "ml", "severity": SEVERITIES[(first + i) % 4], "message": "person at the door",
                     "metadata": {"confidence": 0.9, "objectType": "person"}, "timestamp": 1764150000000,
                     "receivedAt": now, "clientId": None, "acknowledged": None, "hasSnapshot": False}
                    for i in range(count)]
            await services.store.insert_alerts(docs)
            await services.store.reserve_seqs(sid, count)
            await services.store.mark_stored(sid, first + count - 1)
    return time.perf_counter() - started


async def timed(client: Any, url: str, token: str, repeat: int) -> tuple[float, dict[str, Any]]:
    """Median milliseconds of `repeat` GETs, and the last body."""
    times, body = [], {}
    for _ in range(repeat):
        t = time.perf_counter()
        response = await client.fetch(url, headers={"Authorization": f"Bearer {token}"})
        times.append((time.perf_counter() - t) * 1000)
        body = json.loads(response.body)
    return statistics.median(times), body


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    settings = Settings(jwt_secret=SECRET, mongo_url=os.environ.get("WATCHOUT_MONGO_URL", ""),
                        mongo_db=f"watchout_bench_{os.getpid()}", log_level="warning")
    token = mint_token(SECRET, "HS256", "owner", "user", ttl_s=3600)
    async with open_services(settings) as services:
        http = tornado.httpserver.HTTPServer(make_app(services, ROUTES, DEFAULT_HANDLER), **server_options(services))
        sock, port = tornado.testing.bind_unused_port()
        http.add_sockets([sock])
        base = f"http://127.0.0.1:{port}"
        client = tornado.httpclient.AsyncHTTPClient()
        fill_s = await fill(services, args.alerts, args.streams)
        store_kind = "embedded (mongomock)" if services.store.is_embedded else "MongoDB"
        rows = [("store", store_kind), ("alerts stored", f"{args.alerts:,} over {args.streams} streams"),
                ("bulk fill", f"{args.alerts / fill_s:,.0f} alerts/s")]
        per_stream = args.alerts // args.streams
        one = f"{base}/api/streams/h0/alerts?limit=50"
        ms, first_page = await timed(client, one, token, args.repeat)
        rows.append(("stream history, first page (50)", f"{ms:.1f} ms"))
        deep_seq = per_stream // 10
        deep = encode_cursor({"k": "sa", "p": first_page["lastSeq"], "s": deep_seq, "i": "h0"})
        ms, _ = await timed(client, f"{one}&cursor={deep}", token, args.repeat)
        rows.append((f"stream history, deep page by cursor (seq < {deep_seq:,} of {per_stream:,})", f"{ms:.1f} ms"))
        every = f"{base}/api/alerts?limit=50"
        ms, first_all = await timed(client, every, token, args.repeat)
        rows.append(("all streams, first page (50)", f"{ms:.1f} ms"))
        oldest = (await services.store.stream_history("h0", deep_seq, AlertFilter(), 1))[0]
        deep = encode_cursor({"k": "a", "r": alert_resource(oldest)["receivedAt"], "i": oldest["alertId"]})
        ms, _ = await timed(client, f"{every}&cursor={deep}", token, args.repeat)
        rows.append(("all streams, deep page by cursor", f"{ms:.1f} ms"))
        ms, _ = await timed(client, f"{one}&severity=critical&acknowledged=false", token, args.repeat)
        rows.append(("stream history, severity + unacknowledged", f"{ms:.1f} ms"))
        http.stop()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    asyncio.run(main())
