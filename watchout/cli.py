"""The `watchout` command: serve (one process, or --workers N), token, cleanup, report, jobs, backup, demo, simulate.
The composition root: the one core module importing handlers and workers."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from watchout import __version__
from watchout.auth import mint_token, parse_ttl
from watchout.datadir import load_or_create_secret, prepare_data_dir, read_secret, secret_path
from watchout.errors import ConfigError, StoreUnavailable
from watchout.logs import name_node, setup_logging
from watchout.notify import Notifier
from watchout.settings import IN_MEMORY, Settings, load_settings, unknown_variables, with_values

if TYPE_CHECKING:
    import socket

    from watchout.services import Services

log = logging.getLogger("watchout")
Companion = Callable[[Settings, str], contextlib.AbstractAsyncContextManager[None]]
EMBEDDED_ADMIN_TTL_S = 24 * 3600


def tune_malloc() -> None:
    """Keep freed frame buffers in glibc's heap instead of returning them to the kernel after each frame.

    A fresh process otherwise takes ~30 page faults per 90 KB frame and runs twice as slow as a warm
    one. No effect (and no error) where glibc's mallopt is missing.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 256 * 1024 * 1024)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchout", description="Real-time relay for camera frames and ML alerts.")
    parser.add_argument("--version", action="version", version=f"watchout {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="address to listen on (setting host)")
    serve.add_argument("--port", type=int, help="port to listen on (setting port; 0 picks a free one)")
    serve.add_argument("--log-format", choices=("text", "json"), help="setting log_format")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="setting log_level")
    serve.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                       help="serve from N processes sharing the port (0: one per CPU); N > 1 needs broker_url "
                            "and mongo_url (default 1)")
    token = commands.add_parser("token", help="print a token signed with the configured key")
    token.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG)")
    token.add_argument("--sub", required=True, help="user or service id (the token's sub)")
    token.add_argument("--role", default="user", choices=("user", "service", "admin"))
    token.add_argument("--streams", help="comma-separated stream ids, or * for all")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    token.add_argument("--private-key", help="PEM private key, when the service verifies with a public key")
    cleanup = commands.add_parser("cleanup", help="run the prune jobs now and print what they removed")
    cleanup.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG)")
    cleanup.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    report = commands.add_parser("report", help="print the report of a period (alerts, time online, frames)")
    report.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG)")
    report.add_argument("--since", help="the period up to now: 90m, 24h, 7d (default 24h)")
    report.add_argument("--from", dest="start", help="start of the period: ISO date or time, UTC unless it says")
    report.add_argument("--to", dest="end", help="end of the period (default now; needs --from)")
    report.add_argument("--stream", help="only this stream")
    report.add_argument("--owner", help="only this owner's streams")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    jobs = commands.add_parser("jobs", help="list the scheduled jobs, their next and last runs")
    jobs.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG)")
    backup = commands.add_parser("backup", help="write a consistent copy of the SQLite database, also while "
                                 "the service runs")
    backup.add_argument("--config", help="TOML file (default: $WATCHOUT_CONFIG)")
    backup.add_argument("path", metavar="PATH", help="the copy's file (mode 0600), or a directory to write "
                        "watchout-<UTC time>.db in")
    backup.add_argument("--force", action="store_true", help="replace PATH if it exists")
    simulate = commands.add_parser("simulate", help="run a simulated camera or motion detector (needs watchout[sim])")
    simulate.add_argument("role", choices=("camera", "ml"), help="camera: a phone streaming frames; ml: a detector")
    simulate.add_argument("--url", default="ws://127.0.0.1:3000/ws", help="the WebSocket URL")
    simulate.add_argument("--token", required=True, help="a user token (camera) or service token (ml)")
    simulate.add_argument("--stream", required=True, help="the stream id")
    simulate.add_argument("--fps", type=float, default=5.0, help="camera frames a second (default 5)")
    simulate.add_argument("--size", default="640x480", help="camera frame size (default 640x480)")
    simulate.add_argument("--cooldown", type=float, default=5.0, help="ml: seconds between alerts (default 5)")
    simulate.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl+C)")
    demo = commands.add_parser("demo", help="run the embedded server with a simulated camera and detector")
    demo.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000)")
    demo.add_argument("--fps", type=float, default=5.0, help="camera frames a second (default 5)")
    demo.add_argument("--data-dir", metavar="PATH",
                      help="keep the demo's database and key here (default: a temporary directory, removed at exit)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("simulate", "demo"):
        return _simulation(args)
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "log_format", "log_level")}
    try:
        settings = load_settings(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"watchout: {exc}", file=sys.stderr)
        return 2
    unknown = unknown_variables(os.environ)
    if args.command != "serve":
        for message in unknown:
            print(f"watchout: warning: {message}", file=sys.stderr)
    if args.command == "token":
        return _token(settings, args)
    if args.command in ("cleanup", "report", "jobs", "backup"):
        from workers.commands import run_command
        return run_command(settings, args)
    workers = args.workers or os.cpu_count() or 1
    refusal = _workers_refusal(settings, workers)
    if refusal:
        print(f"watchout: {refusal}", file=sys.stderr)
        return 2
    return _serve(settings, lambda: load_settings(args.config, os.environ, overrides), workers=workers,
                  warnings=unknown)


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (0 or more)")
    return count


def _workers_refusal(settings: Settings, workers: int) -> str | None:
    """Why `--workers N` cannot run with these settings (None: it can). Each worker is a node of its own."""
    if workers <= 1:
        return None
    reasons = []
    if not settings.broker_url:
        reasons.append("broker_url is empty: frames, alerts and status cross between processes only "
                       "through the Redis broker")
    if not settings.mongo_url:
        reasons.append("mongo_url is empty: the embedded SQLite store serves one process only, so the workers "
                       "would not share streams and alerts")
    if not reasons:
        return None
    return (f"--workers {workers} runs {workers} separate processes, and several workers need MongoDB (mongo_url) "
            "and Redis (broker_url), but " + "; and ".join(reasons)
            + ". Set WATCHOUT_BROKER_URL (redis://...) and WATCHOUT_MONGO_URL (mongodb://...), or use --workers 1")


def _token(settings: Settings, args: argparse.Namespace) -> int:
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError:
        print(f"watchout: --ttl {args.ttl!r} is not a duration like 90s, 15m, 1h or 7d", file=sys.stderr)
        return 2
    streams: list[str] | str | None = None
    if args.streams:
        streams = "*" if args.streams.strip() == "*" else [s.strip() for s in args.streams.split(",") if s.strip()]
    if args.private_key:
        key: str | bytes = Path(args.private_key).read_bytes()
    elif settings.jwt_secret:
        key = settings.jwt_secret
    elif settings.jwt_public_key_file or settings.data_dir == IN_MEMORY:
        print("watchout: no signing key: set WATCHOUT_JWT_SECRET (HS256), or pass --private-key "
              "when the service verifies with jwt_public_key_file", file=sys.stderr)
        return 2
    else:  # the key `watchout serve` generated and keeps in data_dir, when no key is configured
        data_dir = Path(settings.data_dir).absolute()
        try:
            kept = read_secret(data_dir)
        except ConfigError as exc:
            print(f"watchout: {exc}", file=sys.stderr)
            return 2
        if kept is None:
            print(f"watchout: no signing key: no jwt_secret is configured and {secret_path(data_dir)} does not "
                  "exist. Run `watchout serve` once with this data_dir (it generates the key there), or set "
                  "WATCHOUT_JWT_SECRET (HS256)", file=sys.stderr)
            return 2
        key = kept
    print(mint_token(key, settings.algorithms[0], args.sub, args.role, streams=streams, ttl_s=ttl,
                     issuer=settings.jwt_issuer, audience=settings.jwt_audience))
    return 0


def _simulation(args: argparse.Namespace) -> int:
    """`watchout simulate` and `watchout demo` (built-in settings: the embedded store and a generated key, in
    --data-dir or a temporary directory removed at exit)."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        print("watchout: the simulators need Pillow: pip install 'watchout[sim]'", file=sys.stderr)
        return 2
    from watchout import simulators

    if args.command == "simulate":
        return simulators.simulate(args.role, args.url, args.token, args.stream, fps=args.fps, size=args.size,
                                   cooldown_s=args.cooldown, seconds=args.seconds)
    if not 0 < args.fps <= 60:
        print("watchout: --fps must be in (0, 60]", file=sys.stderr)
        return 2
    # A demo keeps nothing in the working directory: without --data-dir its data lives and dies with it.
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="watchout-demo-")
    try:
        settings = load_settings(None, {}, {"port": args.port, "data_dir": data_dir})
        return _serve(settings, None, simulators.demo_companion(args.fps))
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


def _serve(settings: Settings, load: Callable[[], Settings] | None, companion: Companion | None = None,
           workers: int = 1, warnings: Sequence[str] = ()) -> int:
    """`watchout serve`: one process, or `workers` processes under a supervising parent (run_workers).
    `warnings` (unknown WATCHOUT_* variables) are logged once logging is set up."""
    setup_logging(settings.log_format, settings.log_level)
    for message in warnings:
        log.warning("%s", message)
    tune_malloc()
    admin_token = None
    has_key = bool(settings.jwt_secret or settings.jwt_public_key_file)
    data_dir: Path | None = None
    if settings.is_embedded_store or not has_key:  # the database, or the generated key, lives in data_dir
        try:
            data_dir = prepare_data_dir(settings)
            if not has_key and data_dir is not None:
                settings = with_values(settings, jwt_secret=load_or_create_secret(data_dir))
        except ConfigError as exc:
            print(f"watchout: {exc}", file=sys.stderr)
            return 2
    if not has_key:
        if data_dir is None:
            settings = with_values(settings, jwt_secret=secrets.token_urlsafe(48))
            log.warning("no jwt_secret configured: generated a signing key for this run only")
        else:
            log.info("no jwt_secret configured: signing with the key kept in %s, reused at the next start "
                     "(tokens survive restarts)", secret_path(data_dir))
        admin_token = mint_token(settings.jwt_secret, "HS256", "admin", "admin", ttl_s=EMBEDDED_ADMIN_TTL_S)
    if settings.broker_url and not settings.mongo_url:
        log.warning("broker_url is set but mongo_url is not: this node keeps its own embedded store, so "
                    "streams, alerts and their history are not shared with the other nodes (live frames, "
                    "alerts and status still cross); set mongo_url to share them")
    notifier = Notifier(os.environ)
    if workers > 1:
        return run_workers(settings, workers, admin_token, notifier, load)
    try:
        return asyncio.run(serve(settings, admin_token, notifier, load, companion))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch SIGINT first
        return 0


@dataclass(frozen=True, slots=True)
class Listeners:
    """The bound listening sockets: the service's, and the metrics port's (empty without metrics_port)."""

    main: list[socket.socket]
    metrics: list[socket.socket]


def bind_listeners(settings: Settings) -> Listeners:
    """Listen on host:port (and metrics_port); raises OSError (its filename: the port that failed)."""
    import tornado.netutil

    main = tornado.netutil.bind_sockets(settings.port, settings.host)
    try:
        metrics = _bind_metrics(settings, settings.metrics_port) if settings.metrics_port else []
    except OSError:
        for sock in main:
            sock.close()
        raise
    return Listeners(main, metrics)


def _bind_metrics(settings: Settings, port: int) -> list[socket.socket]:
    import tornado.netutil

    try:
        return tornado.netutil.bind_sockets(port, settings.host)
    except OSError as exc:
        exc.filename = exc.filename or str(port)
        raise


def run_workers(settings: Settings, count: int, admin_token: str | None, notifier: Notifier,
                load: Callable[[], Settings] | None) -> int:
    """`watchout serve --workers N`: bind here, fork `count` workers serving on those sockets, supervise them.

    Each worker is a node of its own, `<node_name>/<index>` (so its figures show apart in /stats);
    it needs the broker and MongoDB to reach the others' clients and data (main() refuses without).
    With metrics_port, worker i serves its own /metrics on metrics_port + i (a scrape of the shared
    port would get whichever worker accepted it). Returns the parent's exit code (watchout.supervisor).
    """
    from watchout.supervisor import Supervisor

    try:
        listeners = [bind_listeners(settings)]
        if settings.metrics_port:
            listeners += [Listeners(listeners[0].main, _bind_metrics(settings, settings.metrics_port + i))
                          for i in range(1, count)]
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, exc.filename or settings.port, exc.strerror)
        return 1
    base = settings.node_name  # the parent's: the same names for every restart of a worker
    port = listeners[0].main[0].getsockname()[1]
    metrics_port = listeners[0].metrics[0].getsockname()[1] if listeners[0].metrics else 0

    def run_worker(index: int, channel: socket.socket) -> int:
        # systemd hears from the parent only; the worker reports to it over `channel`
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        node_id = f"{base}/{index}"
        name_node(node_id)
        worker_load = None if load is None else _keeping_node_id(load, node_id)
        worker_notifier = Notifier.to_supervisor(channel, notifier.watchdog_interval_s)
        mine = listeners[index] if settings.metrics_port else listeners[0]
        log.info("worker %d serving as node %s%s", index, node_id,
                 f", its /metrics on port {mine.metrics[0].getsockname()[1]}" if mine.metrics else "")
        return asyncio.run(serve(with_values(settings, node_id=node_id), admin_token, worker_notifier, worker_load,
                                 listeners=mine, announce=False))

    def announce() -> None:
        _announce(settings, port, admin_token, metrics_port)
        log.info("%d worker processes serve on %s:%d%s", count, settings.host, port,
                 f"; worker i serves its /metrics on port {metrics_port} + i" if metrics_port else "")

    supervisor = Supervisor(count, run_worker, notifier, status=f"listening on {settings.host}:{port}, {count} workers",
                            shutdown_timeout_s=settings.shutdown_timeout_s, on_ready=announce)
    return supervisor.run()


def _keeping_node_id(load: Callable[[], Settings], node_id: str) -> Callable[[], Settings]:
    """`load` for a worker's SIGHUP: the file and environment again, under the worker's own node id."""
    def reload() -> Settings:
        return with_values(load(), node_id=node_id)
    return reload


async def serve(settings: Settings, admin_token: str | None = None, notifier: Notifier | None = None,
                load: Callable[[], Settings] | None = None, companion: Companion | None = None, *,
                listeners: Listeners | None = None, announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT, then close sockets with 1001 and finish pending writes; returns the exit code.

    `companion(settings, ws_url)` is entered once the server listens and exited first on shutdown
    (`watchout demo` runs its simulators in it).

    `notifier` tells systemd when the service is ready and stopping and sends its watchdog
    keep-alives; on SIGHUP the settings from `load()` are applied where that is safe (watchout.reload).
    `listeners`: sockets bound already (a worker of `--workers N`), else it binds host:port itself;
    `announce` prints the URLs once listening.
    """
    import tornado.httpserver

    from handlers import DEFAULT_HANDLER, METRICS_ROUTES, ROUTES
    from watchout.app import make_app, server_options
    from watchout.services import open_services
    from workers.scheduler import JobScheduler

    if listeners is None:
        try:
            listeners = bind_listeners(settings)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", settings.host, exc.filename or settings.port, exc.strerror)
            return 1
    sockets, metrics_sockets = listeners.main, listeners.metrics
    notifier = notifier or Notifier({})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_services(settings) as services:
            routes = ROUTES if settings.metrics_port else ROUTES + METRICS_ROUTES
            app = make_app(services, routes, DEFAULT_HANDLER)
            server = tornado.httpserver.HTTPServer(app, **server_options(services))
            server.add_sockets(sockets)
            admin = None
            if metrics_sockets:  # /metrics alone on its own port, e.g. reachable only from the scraper
                admin = tornado.httpserver.HTTPServer(make_app(services, METRICS_ROUTES, DEFAULT_HANDLER))
                admin.add_sockets(metrics_sockets)
            # Everything alive now (modules, settings, the app) lives as long as the process: keep it
            # out of every later full collection, whose pauses would otherwise show up as latency.
            gc.collect()
            gc.freeze()
            port = sockets[0].getsockname()[1]
            if announce:
                _announce(settings, port, admin_token,
                          metrics_sockets[0].getsockname()[1] if metrics_sockets else 0)
            status = f"listening on {settings.host}:{port}"
            if load is not None:
                loop.add_signal_handler(signal.SIGHUP, _reload, services, load, notifier, status)
            jobs = JobScheduler(services)
            jobs.start()
            notifier.ready(status)
            keep_alive = asyncio.create_task(notifier.keep_alive())
            async with contextlib.AsyncExitStack() as extras:
                if companion is not None:
                    await extras.enter_async_context(companion(settings, f"ws://{_local(settings.host)}:{port}/ws"))
                await stop.wait()
            notifier.stopping("shutting down")
            log.info("shutting down: finishing pending alert writes, then closing connections with 1001")
            server.stop()
            if admin is not None:
                admin.stop()
            stopping_jobs = asyncio.create_task(jobs.stop(settings.shutdown_timeout_s))  # alongside the drain
            await _close_when_drained(services, settings.shutdown_timeout_s, stopping_jobs)
            await _wait_closed(services.hub.peers, settings.shutdown_timeout_s)
            await jobs.save_figures()
            keep_alive.cancel()
    except StoreUnavailable as exc:
        log.error("store unavailable: %s", exc.message)
        return 1
    except ConfigError as exc:  # a database that cannot be used at all: not SQLite, or from a newer Watchout
        log.error("%s", exc)
        return 2
    log.info("stopped")
    return 0


def _reload(services: Services, load: Callable[[], Settings], notifier: Notifier, status: str) -> None:
    from watchout.reload import reload_settings

    notifier.reloading()
    reloaded = reload_settings(services, load)
    notifier.ready(status if reloaded else f"{status}; last reload refused, see the log")


async def _close_when_drained(services: Services, timeout_s: float, stopping_jobs: asyncio.Task[None]) -> None:
    """Close every connection with 1001 once no alert write is pending (at most `timeout_s`): an alert read
    while the writes drained starts another write, so the check that nothing is pending and the closes
    happen in one step, and every alert read before the close is acknowledged before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await asyncio.wait_for(services.relay.drain(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            log.error("pending writes did not finish within %.1f s", timeout_s)
            break
        if not stopping_jobs.done():
            await stopping_jobs
            continue
        if services.relay.is_idle:
            break
    for peer in list(services.hub.peers.values()):
        peer.close(1001, "server shutting down")


async def _wait_closed(peers: Mapping[str, object], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while peers and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def _announce(settings: Settings, port: int, admin_token: str | None, metrics_port: int = 0) -> None:
    host = _local(settings.host)
    base = f"{host}:{port}"
    log.info("listening on %s:%d", settings.host, port)
    lines = [f"Watchout {__version__} is running.",
             f"  Data:      {_data_location(settings)}",
             # With this run's admin token in the #fragment, which browsers never send to the server.
             f"  Dashboard: http://{base}/dashboard/" + (f"#token={admin_token}" if admin_token else ""),
             f"  WebSocket: ws://{base}/ws",
             f"  Health:    http://{base}/health",
             f"  Metrics:   http://{host}:{metrics_port or port}/metrics",
             f"  Stats:     http://{base}/stats"]
    if admin_token and settings.data_dir == IN_MEMORY:
        lines += ["  Admin token for this run (valid 24 h; a new key is generated at each start):",
                  f"    {admin_token}"]
    elif admin_token:
        key = secret_path(Path(settings.data_dir).absolute())
        lines += [f"  Admin token (valid 24 h; signed with the key kept in {key}, reused at the next start):",
                  f"    {admin_token}"]
    print("\n".join(lines), flush=True)


def _data_location(settings: Settings) -> str:
    """Where streams and alerts are kept, for the banner (never the MongoDB URL: it may hold a password)."""
    if settings.mongo_url:
        return f"MongoDB, database {settings.mongo_db}"
    if settings.data_dir == IN_MEMORY:
        return "(in memory: nothing is kept)"
    return f"{Path(settings.data_dir).absolute()} (SQLite)"


def _local(host: str) -> str:
    """An address to reach a server listening on `host` from this machine."""
    return host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
