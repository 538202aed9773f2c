"""Alert history figures: REST query times over N stored alerts, and `watchout serve`'s start-up and memory on them.

    python bench/history.py [--alerts 1000000] [--streams 100] [--owners 10] [--requests 200] [--data-dir DIR]

Stores the alerts in a SQLite database (a temporary directory, or --data-dir to keep it: a second run
on the same directory skips the loading), through the store's own calls, in time order, as the alert
intake does (allocate the seqs, insert, mark stored), thousands per call. Then times four REST calls
(the issue's targets) and two more, over HTTP on loopback: first through the real app started in this
process, then through `watchout serve` started as a subprocess on the same data_dir, whose start-up
time (to the banner, to /health answering 200) and RSS (/proc/PID/status, after the same queries) it
reads. With WATCHOUT_MONGO_URL set the same runs against that MongoDB (database WATCHOUT_MONGO_DB,
default watchout_bench_<pid>, kept at the end like --data-dir).

Linux only (/proc), loopback only. bench/README.md explains every row.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tornado.httpclient
import tornado.httpserver
import tornado.testing

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from handlers import DEFAULT_HANDLER, ROUTES  # noqa: E402
from watchout.app import make_app, server_options  # noqa: E402
from watchout.auth import mint_token  # noqa: E402
from watchout.queries import encode_cursor  # noqa: E402
from watchout.services import open_services  # noqa: E402
from watchout.settings import Settings  # noqa: E402
from watchout.store import AlertFilter, Store  # noqa: E402
from watchout.resources import alert_resource  # noqa: E402

SECRET = "bench-history-0123456789abcdef0123456789abcdef"
SEVERITIES = ("low", "medium", "high", "critical")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
PAGE = 50
QUERY_TARGET_MS = 5.0
RSS_TARGET_MB = 150.0
STARTUP_TARGET_S = 2.0
# `watchout serve` here must not prune the data under measurement (the prune job runs hourly at minute 0)
NO_RETENTION = {"WATCHOUT_STALE_AFTER_H": "0", "WATCHOUT_STREAM_RETENTION_D": "0", "WATCHOUT_ALERT_RETENTION_D": "0"}


class BenchError(Exception):
    """The run cannot go on; the message says why."""


# ----------------------------------------------------------------------------- the data

@dataclass(frozen=True, slots=True)
class Shape:
    """What is stored: streams h0..h<streams-1>, stream hN owned by owner<N % owners>."""

    streams: int
    owners: int

    def stream_ids(self) -> list[str]:
        return [f"h{s}" for s in range(self.streams)]

    def owner_of(self, stream_id: str) -> str:
        return f"owner{int(stream_id[1:]) % self.owners}"


async def store_alerts(store: Store, shape: Shape, count: int, first: dt.datetime, last: dt.datetime, *,
                       chunk: int, rng: random.Random, report: TextIO | None = None) -> float:
    """Store `count` alerts received from `first` to `last` (evenly spaced, oldest first), each on a random
    stream, through the store's calls in chunks of `chunk`: one reserve_batch per stream of the chunk (one
    transaction), one insert_alerts, one mark_stored per stream. While one chunk is written the next is
    built. Alert ids rise with receivedAt, as live ones do. Returns the seconds taken."""
    started = time.perf_counter()
    first_ms = (first - EPOCH) // dt.timedelta(milliseconds=1)
    step_ms = ((last - first) // dt.timedelta(milliseconds=1)) / max(1, count - 1)
    ids = shape.stream_ids()
    writing: asyncio.Task[None] | None = None
    done = 0
    while done < count:
        size = min(chunk, count - done)
        picks = [rng.randrange(shape.streams) for _ in range(size)]
        per_stream: dict[int, int] = {}
        for s in picks:
            per_stream[s] = per_stream.get(s, 0) + 1
        firsts = await asyncio.gather(*(store.reserve_batch(ids[s], n, "", 0.0) for s, n in per_stream.items()))
        next_seq = {s: f for s, (f, _) in zip(per_stream, firsts)}
        docs = []
        for k, s in enumerate(picks):
            received_ms = int(first_ms + (done + k) * step_ms)
            seq = next_seq[s]
            next_seq[s] = seq + 1
            docs.append({"alertId": f"{received_ms // 1000:08x}{done + k:016x}", "streamId": ids[s], "seq": seq,
                         "ownerId": shape.owner_of(ids[s]), "senderId": "ml", "severity": rng.choice(SEVERITIES),
                         "message": "person at the door",
                         "metadata": {"confidence": round(rng.random(), 3), "objectType": "person"},
                         "timestamp": received_ms - 40, "receivedAt": EPOCH + dt.timedelta(milliseconds=received_ms),
                         "clientId": None, "acknowledged": None, "hasSnapshot": False})
        marks = {ids[s]: seq - 1 for s, seq in next_seq.items()}
        if writing is not None:
            await writing
        writing = asyncio.create_task(_insert_then_mark(store, docs, marks))
        done += size
        if report is not None and done % (chunk * 40) < chunk:
            report.write(f"[bench]   {done:,} / {count:,} alerts, {done / (time.perf_counter() - started):,.0f}/s\n")
            report.flush()
    if writing is not None:
        await writing
    return time.perf_counter() - started


async def _insert_then_mark(store: Store, docs: list[dict[str, Any]], marks: dict[str, int]) -> None:
    await store.insert_alerts(docs)
    await asyncio.gather(*(store.mark_stored(sid, seq) for sid, seq in marks.items()))


async def create_streams(store: Store, shape: Shape) -> None:
    await asyncio.gather(*(store.create_stream(sid, shape.owner_of(sid)) for sid in shape.stream_ids()))


async def stored_alerts(store: Store) -> tuple[int, int, int]:
    """(streams, owners, alerts) already in the store."""
    streams = await store.list_streams(None, None, 100_000)
    counts = await asyncio.gather(*(store.count_alerts(s["streamId"]) for s in streams))
    return len(streams), len({s["ownerId"] for s in streams}), sum(counts)


# ----------------------------------------------------------------------------- the queries

@dataclass(frozen=True, slots=True)
class Query:
    name: str
    target_ms: float | None  # None: shown, not an issue target
    request: Callable[[int], tuple[str, str]]  # request number -> (path and query, token)
    full_page: bool = True  # every answer must hold PAGE items


def make_queries(shape: Shape, last_seqs: dict[str, int], admin_deep: str) -> list[Query]:
    """The issue's four queries, two more, and the cost of a request without a store call. Request i of a
    stream query asks stream h<i % streams>, of a user query owner<i % owners>, each with its owner's token:
    every stream and owner gets asked."""
    owner_tokens = {f"owner{o}": mint_token(SECRET, "HS256", f"owner{o}", "user", ttl_s=24 * 3600)
                    for o in range(shape.owners)}
    admin = mint_token(SECRET, "HS256", "admin", "admin", ttl_s=24 * 3600)
    service = mint_token(SECRET, "HS256", "bench", "service", ttl_s=24 * 3600)  # no streams: answered empty
    ids = shape.stream_ids()

    def stream_page(i: int) -> tuple[str, str]:
        sid = ids[i % len(ids)]
        return f"/api/streams/{sid}/alerts?limit={PAGE}", owner_tokens[shape.owner_of(sid)]

    def stream_deep(i: int) -> tuple[str, str]:
        sid = ids[i % len(ids)]
        cursor = encode_cursor({"k": "sa", "p": last_seqs[sid], "s": last_seqs[sid] // 10, "i": sid})
        return f"/api/streams/{sid}/alerts?limit={PAGE}&cursor={cursor}", owner_tokens[shape.owner_of(sid)]

    def user_page(i: int) -> tuple[str, str]:
        return f"/api/alerts?limit={PAGE}", owner_tokens[f"owner{i % shape.owners}"]

    def filtered(i: int) -> tuple[str, str]:
        path, token = stream_page(i)
        return f"{path}&severity=critical&acknowledged=false", token

    return [
        Query(f"stream's first page ({PAGE})", QUERY_TARGET_MS, stream_page),
        Query("stream's deep page by cursor (seq < lastSeq/10)", QUERY_TARGET_MS, stream_deep),
        Query(f"user's page across their {shape.streams // shape.owners} streams", QUERY_TARGET_MS, user_page),
        Query(f"admin's page across all {shape.streams} streams", QUERY_TARGET_MS,
              lambda i: (f"/api/alerts?limit={PAGE}", admin)),
        Query("admin's deep page by cursor (oldest 10%)", None,
              lambda i: (f"/api/alerts?limit={PAGE}&cursor={admin_deep}", admin)),
        Query("stream's page, severity=critical&acknowledged=false", None, filtered, full_page=False),
        Query("reference: HTTP + token check, no store call", None,
              lambda i: (f"/api/alerts?limit={PAGE}", service), full_page=False),
    ]


async def deep_admin_cursor(store: Store, shape: Shape, last_seqs: dict[str, int]) -> str:
    """A cursor of GET /api/alerts placed at an alert of h0 about 10% from its oldest."""
    sid = shape.stream_ids()[0]
    older = await store.stream_history(sid, last_seqs[sid] // 10, AlertFilter(), 1)
    if not older:
        raise BenchError(f"stream {sid} has no alerts")
    resource = alert_resource(older[0])
    return encode_cursor({"k": "a", "r": resource["receivedAt"], "i": resource["alertId"]})


@dataclass(slots=True)
class Timing:
    median_ms: float
    p95_ms: float
    max_ms: float


async def time_queries(base: str, queries: list[Query], requests: int, warmup: int = 10) -> dict[str, Timing]:
    """Each query `requests` times, one request at a time (each on a new connection: Tornado's simple
    client), after `warmup` unmeasured ones; every answer must be 200 with a full page."""
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    results = {}
    try:
        for query in queries:
            times = []
            for i in range(-warmup, requests):
                path, token = query.request(i)
                started = time.perf_counter()
                response = await client.fetch(base + path, headers={"Authorization": f"Bearer {token}"},
                                              raise_error=False)
                elapsed = (time.perf_counter() - started) * 1000
                if response.code != 200:
                    raise BenchError(f"{query.name}: GET {path} answered {response.code}: {response.body[:300]!r}")
                items = len(json.loads(response.body)["items"])
                if items != PAGE and query.full_page:
                    raise BenchError(f"{query.name}: GET {path} gave {items} items, not {PAGE}")
                if i >= 0:
                    times.append(elapsed)
            times.sort()
            results[query.name] = Timing(statistics.median(times), times[max(0, round(0.95 * len(times)) - 1)],
                                         times[-1])
    finally:
        client.close()
    return results


# ----------------------------------------------------------------------------- `watchout serve`

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = {key: int(value) for key, value in re.findall(r"(VmRSS|VmHWM):\s+(\d+)\s+kB", text)}
    return found["VmRSS"], found["VmHWM"]


class Served:
    """`python -m watchout serve` on a free loopback port, its log in a file, stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.banner_s: float | None = None
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "watchout", "serve", "--host", "127.0.0.1",
                                         "--port", str(self.port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=self._log, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.banner_s is None and b"is running" in line:
                self.banner_s = time.perf_counter() - self.started

    def wait_healthy(self, timeout_s: float = 60.0) -> float:
        """Seconds from the process start to the first /health answered 200 (connections refused until the
        server binds its port are retried every 5 ms; one accepted before it serves waits for the answer)."""
        deadline = self.started + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"watchout serve exited with {self.process.returncode}:\n"
                                 f"{self.log_path.read_text(errors='replace')[-2000:]}")
            wait_s = max(0.1, deadline - time.perf_counter())
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=wait_s)
            try:
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except (ConnectionError, OSError):
                pass
            finally:
                connection.close()
            time.sleep(0.005)
        raise BenchError(f"watchout serve did not answer /health with 200 within {timeout_s:.0f} s")

    def wait_banner(self, timeout_s: float = 10.0) -> float | None:
        deadline = time.perf_counter() + timeout_s
        while self.banner_s is None and time.perf_counter() < deadline and self.process.poll() is None:
            time.sleep(0.005)
        return self.banner_s

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)
        self._log.close()
        return self.process.returncode

    def problems(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)]


@dataclass(slots=True)
class ServeFigures:
    banner_s: float | None
    healthy_s: float
    rss_start_kib: int
    rss_after_kib: int = 0
    hwm_kib: int = 0
    timings: dict[str, Timing] | None = None
    exit_code: int | None = None
    problems: list[str] | None = None


async def measure_serve(env: dict[str, str], log_path: Path, queries: list[Query] | None,
                        requests: int) -> ServeFigures:
    served = Served(env, log_path)
    try:
        healthy_s = served.wait_healthy()
        banner_s = served.wait_banner()
        figures = ServeFigures(banner_s, healthy_s, rss_kib(served.process.pid)[0])
        if queries:
            figures.timings = await time_queries(f"http://127.0.0.1:{served.port}", queries, requests)
        figures.rss_after_kib, figures.hwm_kib = rss_kib(served.process.pid)
    finally:
        code = served.stop()
    figures.exit_code, figures.problems = code, served.problems()
    return figures


# ----------------------------------------------------------------------------- the table

def verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "PASS" if value <= target else "FAIL"


def query_rows(timings: dict[str, Timing], queries: list[Query]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for q in queries:
        t = timings[q.name]
        rows.append((q.name, f"{t.median_ms:.2f}", f"{t.p95_ms:.2f}", f"{t.max_ms:.2f}",
                     f"median <= {q.target_ms:g} ms" if q.target_ms is not None else "-",
                     verdict(t.median_ms, q.target_ms)))
    return rows


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print(f"\n{title}")

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    return (f"{model or 'unknown CPU'}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"load average {os.getloadavg()[0]:.2f}")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--alerts", type=int, default=1_000_000, help="alerts to store")
    p.add_argument("--streams", type=int, default=100, help="streams h0..hN-1")
    p.add_argument("--owners", type=int, default=10, help="users owning the streams (stream hN: owner<N %% owners>)")
    p.add_argument("--days", type=float, default=30.0,
                   help="the alerts' receivedAt spans the last DAYS days (within the default 90-day retention)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per query")
    p.add_argument("--chunk", type=int, default=5000, help="alerts per insert_alerts call when loading")
    p.add_argument("--data-dir", help="keep the database here; a second run on it skips loading "
                                      "(default: a temporary directory, removed at the end)")
    p.add_argument("--skip-serve", action="store_true", help="only the in-process figures")
    args = p.parse_args(argv)
    if args.streams < 1 or not 1 <= args.owners <= args.streams or args.alerts < args.streams * PAGE * 12:
        p.error(f"need --streams >= 1, 1 <= --owners <= --streams and --alerts >= {PAGE * 12} x --streams "
                "(a deep page at lastSeq/10 must still be full)")
    if args.streams % args.owners:
        p.error("--streams must be a multiple of --owners (each owner gets as many streams)")
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = Shape(args.streams, args.owners)
    mongo_url = os.environ.get("WATCHOUT_MONGO_URL", "")
    mongo_db = os.environ.get("WATCHOUT_MONGO_DB") or f"watchout_bench_{os.getpid()}"
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="watchout-history-"))
    work = Path(tempfile.mkdtemp(prefix="watchout-history-logs-"))
    settings = Settings(jwt_secret=SECRET, data_dir=str(data_dir), mongo_url=mongo_url, mongo_db=mongo_db,
                        log_level="warning", stale_after_h=0, stream_retention_d=0, alert_retention_d=0)
    print(f"# {machine()}", flush=True)
    try:
        rows: list[tuple[str, ...]] = []
        data_dir.mkdir(parents=True, exist_ok=True)
        async with open_services(settings) as services:
            store = services.store
            print(f"# store: {store.description}", flush=True)
            have = await stored_alerts(store)
            if have[2]:
                if have != (args.streams, args.owners, args.alerts):
                    raise BenchError(f"the store holds {have[2]:,} alerts over {have[0]} streams of {have[1]} owners, "
                                     f"not {args.alerts:,} over {args.streams} of {args.owners}: use another "
                                     "--data-dir (or WATCHOUT_MONGO_DB), or the same --alerts/--streams/--owners")
                load = f"skipped: {have[2]:,} alerts already stored"
            else:
                print(f"[bench] storing {args.alerts:,} alerts over {args.streams} streams of {args.owners} owners "
                      f"through the store's API, {args.chunk:,} per insert_alerts call", file=sys.stderr, flush=True)
                await create_streams(store, shape)
                now = dt.datetime.now(dt.timezone.utc)
                seconds = await store_alerts(store, shape, args.alerts, now - dt.timedelta(days=args.days),
                                             now - dt.timedelta(minutes=1), chunk=args.chunk, rng=random.Random(1),
                                             report=sys.stderr)
                load = (f"{seconds:.1f} s, {args.alerts / seconds:,.0f} alerts/s (store API: reserve_batch, "
                        f"insert_alerts of {args.chunk:,}, mark_stored)")
            last_seqs = {s["streamId"]: int(s["lastSeq"]) for s in await store.list_streams(None, None, 100_000)}
            queries = make_queries(shape, last_seqs, await deep_admin_cursor(store, shape, last_seqs))
            http = tornado.httpserver.HTTPServer(make_app(services, ROUTES, DEFAULT_HANDLER),
                                                 **server_options(services))
            sock, port = tornado.testing.bind_unused_port()
            http.add_sockets([sock])
            try:
                in_process = await time_queries(f"http://127.0.0.1:{port}", queries, args.requests)
            finally:
                http.stop()
        size = sum(f.stat().st_size for f in data_dir.glob("watchout.db*")) if not mongo_url else 0
        print(f"# loading: {load}")
        print(f"# data: {args.alerts:,} alerts, {args.streams} streams, {args.owners} owners, receivedAt over the "
              f"last {args.days:g} days" + (f"; database files {size / 2**20:,.0f} MiB" if size else ""))
        header = ("query (GET, one at a time)", "median ms", "p95 ms", "max ms", "target", "result")
        print_table(f"In-process app ({args.requests} requests per query, the client in the same event loop)",
                    header, query_rows(in_process, queries))
        failed = any(verdict(in_process[q.name].median_ms, q.target_ms) == "FAIL" for q in queries)
        if args.skip_serve:
            return 1 if failed else 0

        env = {**os.environ, **NO_RETENTION, "WATCHOUT_JWT_SECRET": SECRET, "WATCHOUT_DATA_DIR": str(data_dir),
               "WATCHOUT_LOG_LEVEL": "info"}
        env.pop("WATCHOUT_CONFIG", None)
        if mongo_url:
            env["WATCHOUT_MONGO_DB"] = mongo_db
        print("[bench] starting watchout serve on this data", file=sys.stderr, flush=True)
        full = await measure_serve(env, work / "serve.log", queries, args.requests)
        assert full.timings is not None
        print_table(f"`watchout serve` subprocess on this data ({args.requests} requests per query)", header,
                    query_rows(full.timings, queries))
        failed = failed or any(verdict(full.timings[q.name].median_ms, q.target_ms) == "FAIL" for q in queries)

        empty_dir = work / "empty"
        print("[bench] starting watchout serve on an empty data_dir (reference)", file=sys.stderr, flush=True)
        empty = await measure_serve({**env, "WATCHOUT_DATA_DIR": str(empty_dir), "WATCHOUT_MONGO_URL": ""},
                                    work / "serve-empty.log", None, 0)
        rows = [
            ("start-up to the banner", _s(full.banner_s), _s(empty.banner_s), "-", ""),
            ("start-up to /health answering 200", _s(full.healthy_s), _s(empty.healthy_s),
             f"<= {STARTUP_TARGET_S:g} s", verdict(full.healthy_s, STARTUP_TARGET_S)),
            ("RSS once /health answers", _mb(full.rss_start_kib), _mb(empty.rss_start_kib), "-", ""),
            ("RSS after the query mix above", _mb(full.rss_after_kib), "-", f"<= {RSS_TARGET_MB:g} MB",
             verdict(full.rss_after_kib * 1024 / 1e6, RSS_TARGET_MB)),
            ("peak RSS (VmHWM)", _mb(full.hwm_kib), _mb(empty.hwm_kib), "-", ""),
        ]
        print_table("`watchout serve` footprint (time from process start; MB = 10^6 bytes)",
                    ("measure", "this data", "empty data_dir", "target", "result"), rows)
        failed = failed or any(r[4] == "FAIL" for r in rows)
        for name, figures in (("this data", full), ("empty data_dir", empty)):
            print(f"# watchout serve ({name}) exited with {figures.exit_code}; "
                  f"{len(figures.problems or [])} warning/error line(s) in its log")
            for line in (figures.problems or [])[:10]:
                print(f"#   {line}")
        print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
        return 1 if failed else 0
    except BenchError as exc:
        print(f"bench/history.py: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        if mongo_url:
            print(f"# MongoDB database {mongo_db} is kept: drop it, or set WATCHOUT_MONGO_DB={mongo_db} to reuse it")
        elif args.data_dir:
            print(f"# the database is kept in {data_dir}: a run with the same --data-dir skips loading")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _mb(kib: int) -> str:
    return f"{kib * 1024 / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
