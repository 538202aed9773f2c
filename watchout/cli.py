"""The `watchout` command: serve (one process, or --workers N), token, cleanup, report, jobs, backup, demo, simulate.
Argument parsing, and the composition root: the one core module importing handlers and workers (it plugs them
into watchout.serve, which owns the server's life cycle)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from watchout import __version__
from watchout.auth import mint_token, parse_ttl
from watchout.datadir import load_or_create_secret, prepare_data_dir, read_secret, secret_path
from watchout.errors import ConfigError
from watchout.logs import setup_logging
from watchout.notify import Notifier
from watchout.serve import Companion, MakeJobs, Routes, run_workers, serve, tune_malloc
from watchout.settings import IN_MEMORY, Settings, load_settings, unknown_variables, with_values

log = logging.getLogger("watchout")
EMBEDDED_ADMIN_TTL_S = 24 * 3600


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
        from workers.admin import run_command
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
    routes, make_jobs = _wiring()
    if workers > 1:
        return run_workers(settings, workers, admin_token, notifier, load, routes=routes, make_jobs=make_jobs)
    try:
        return asyncio.run(serve(settings, admin_token, notifier, load, companion, routes=routes,
                                 make_jobs=make_jobs))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch SIGINT first
        return 0


def _wiring() -> tuple[Routes, MakeJobs]:
    """What `watchout serve` plugs into the core's server: the handlers' URL tables and the scheduled jobs
    (imported here, only when serving)."""
    from handlers import DEFAULT_HANDLER, METRICS_ROUTES, ROUTES
    from workers.scheduler import JobScheduler

    return Routes(ROUTES, METRICS_ROUTES, DEFAULT_HANDLER), JobScheduler
