"""The server's life cycle: bind, start up, serve until SIGTERM/SIGINT, shut down; one process or `--workers N`.

Start-up and shutdown each read as a checklist (`serve`). The URL tables and the scheduled jobs are plugged in by
the composition root (watchout.cli): the core imports neither handlers nor workers.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from watchout import __version__
from watchout.datadir import secret_path
from watchout.errors import ConfigError, StoreUnavailable
from watchout.logs import name_node
from watchout.notify import Notifier
from watchout.protocol import CloseCode
from watchout.settings import IN_MEMORY, Settings, with_values

if TYPE_CHECKING:
    import socket

    import tornado.httpserver

    from watchout.services import Services

log = logging.getLogger("watchout")
Companion = Callable[[Settings, str], contextlib.AbstractAsyncContextManager[None]]


@dataclass(frozen=True, slots=True)
class Routes:
    """The URL tables served (handlers' ROUTES, METRICS_ROUTES and DEFAULT_HANDLER, from the composition root)."""

    main: list[Any]
    metrics: list[Any]
    default_handler: Any = None


class Jobs(Protocol):
    """The scheduled jobs (workers.scheduler.JobScheduler, from the composition root)."""

    def start(self) -> None: ...

    async def stop(self, timeout_s: float) -> None: ...

    async def save_figures(self) -> None: ...


MakeJobs = Callable[["Services"], Jobs]


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
                load: Callable[[], Settings] | None, *, routes: Routes, make_jobs: MakeJobs) -> int:
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
                                 routes=routes, make_jobs=make_jobs, listeners=mine, announce=False))

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
                routes: Routes, make_jobs: MakeJobs, listeners: Listeners | None = None,
                announce: bool = True) -> int:
    """Run until SIGTERM/SIGINT, then close sockets with 1001 and finish pending writes; returns the exit code.

    `routes` are served (with `routes.metrics` alone on metrics_port when it is set); `make_jobs(services)`
    gives the scheduled jobs, started once the server listens.

    `companion(settings, ws_url)` is entered once the server listens and exited first on shutdown
    (`watchout demo` runs its simulators in it).

    `notifier` tells systemd when the service is ready and stopping and sends its watchdog
    keep-alives; on SIGHUP the settings from `load()` are applied where that is safe (watchout.reload).
    `listeners`: sockets bound already (a worker of `--workers N`), else it binds host:port itself;
    `announce` prints the URLs once listening.
    """
    import tornado.httpserver

    from watchout.app import make_app, server_options
    from watchout.services import open_services

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
        # 1. open the services (the store, the broker, the hub)
        async with open_services(settings) as services:
            # 2. start HTTP: the service's routes, and /metrics alone on its own port when it has one
            #    (e.g. reachable only from the scraper)
            served = routes.main if settings.metrics_port else routes.main + routes.metrics
            servers = [tornado.httpserver.HTTPServer(make_app(services, served, routes.default_handler),
                                                     **server_options(services))]
            servers[0].add_sockets(sockets)
            if metrics_sockets:
                servers.append(tornado.httpserver.HTTPServer(
                    make_app(services, routes.metrics, routes.default_handler)))
                servers[1].add_sockets(metrics_sockets)
            # 3. freeze GC: everything alive now (modules, settings, the app) lives as long as the process;
            #    keep it out of every later full collection, whose pauses would otherwise show up as latency
            gc.collect()
            gc.freeze()
            # 4. announce the URLs
            port = sockets[0].getsockname()[1]
            if announce:
                _announce(settings, port, admin_token,
                          metrics_sockets[0].getsockname()[1] if metrics_sockets else 0)
            status = f"listening on {settings.host}:{port}"
            if load is not None:
                loop.add_signal_handler(signal.SIGHUP, _reload, services, load, notifier, status)
            # 5. start the jobs and the notifications
            jobs = make_jobs(services)
            jobs.start()
            await services.deliveries.start()
            # 6. ready
            notifier.ready(status)
            keep_alive = asyncio.create_task(notifier.keep_alive())
            async with contextlib.AsyncExitStack() as extras:
                if companion is not None:
                    await extras.enter_async_context(companion(settings, f"ws://{_local(settings.host)}:{port}/ws"))
                await stop.wait()
            # on stop: 1. stopping
            notifier.stopping("shutting down")
            log.info("shutting down: finishing pending alert writes, then closing connections with 1001")
            # 2.-5. stop accepting; stop the jobs alongside the drain; close connections when drained; wait closed
            stopping_jobs = asyncio.create_task(jobs.stop(settings.shutdown_timeout_s))
            await stop_serving(services, servers, settings.shutdown_timeout_s, stopping_jobs)
            # 6. save the figures (after the last close)
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


async def stop_serving(services: Services, servers: Sequence[tornado.httpserver.HTTPServer], timeout_s: float,
                       stopping_jobs: asyncio.Task[None] | None = None) -> None:
    """The connections' shutdown (SIGTERM; the tests' servers too): stop accepting on `servers`, finish the
    pending alert writes (alongside `stopping_jobs`, which may start more), close every connection with 1001
    once none is pending, and wait until they are closed; each wait at most `timeout_s`."""
    for server in servers:
        server.stop()
    await _close_when_drained(services, timeout_s, stopping_jobs)
    await wait_closed(services.hub.peers, timeout_s)


async def _close_when_drained(services: Services, timeout_s: float,
                              stopping_jobs: asyncio.Task[None] | None = None) -> None:
    """Close every connection with 1001 once no alert write is pending (at most `timeout_s`): an alert read
    while the writes drained starts another write, so the check that nothing is pending and the closes
    happen in one step, and every alert read before the close is acknowledged before it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await asyncio.wait_for(services.commands.drain(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            log.error("pending writes did not finish within %.1f s", timeout_s)
            break
        if stopping_jobs is not None and not stopping_jobs.done():
            await stopping_jobs
            continue
        if services.commands.is_idle:
            break
    for peer in list(services.hub.peers.values()):
        peer.close(CloseCode.GOING_AWAY, "server shutting down")


async def wait_closed(peers: Mapping[str, object], timeout_s: float) -> None:
    """Until `peers` (the hub's connections) is empty, at most `timeout_s`."""
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
