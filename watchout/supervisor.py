"""Supervisor: the parent of `watchout serve --workers N`, which forks the worker processes and keeps them running.

The parent binds the listening sockets, then forks N children that each serve on them (the kernel
hands every new connection to one of them). Afterwards it only supervises, with no event loop:

- each child reports over its own datagram socketpair, in sd_notify's format (the child's Notifier
  talks to the parent, never to systemd): READY=1 once it listens, WATCHDOG=1 keep-alives, STATUS=;
- the parent tells systemd READY=1 once every child is ready, STOPPING=1 on shutdown, and sends the
  watchdog keep-alives itself; a child whose keep-alives stop for a whole watchdog interval (its
  event loop is stuck) gets SIGABRT and is replaced;
- SIGTERM and SIGINT are forwarded as SIGTERM, SIGHUP as SIGHUP (each child reloads; the parent says
  READY=1 again once every child has; a child still starting, or started later, gets it once ready);
- a child that exits while the service runs is started again after a backoff (0.5 s, doubling up to
  30 s; back to 0.5 s once a child had run 30 s); one that exits before the service was first ready
  stops the whole service with exit code 1 (a setting or a store that cannot work at start-up).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from watchout.backoff import Backoff
from watchout.notify import Notifier

log = logging.getLogger("watchout.supervisor")

# (worker index, the worker's end of its channel to the parent) -> exit code; runs in the forked child
ChildRunner = Callable[[int, socket.socket], int]
RESTART_BACKOFF = Backoff(base_s=0.5, cap_s=30.0, jitter=False)  # one supervisor, so no jitter: 0.5, 1, 2 … 30 s
STABLE_AFTER_S = 30.0  # a child that ran this long restarts with the shortest delay again
KILL_GRACE_S = 5.0  # on top of twice shutdown_timeout_s, before SIGKILL
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(slots=True)
class Child:
    index: int
    pid: int = 0  # 0: not running
    channel: socket.socket | None = None
    started_at: float = 0.0
    is_ready: bool = False
    last_ping: float = 0.0  # monotonic time of its last READY or WATCHDOG
    aborted: bool = False  # the parent sent it SIGABRT
    failures: int = 0  # quick exits in a row, for the backoff
    restart_at: float | None = None
    status: str = ""
    is_reloading: bool = False
    reloads: int = 0  # the parent's reloads this child has been told about


@dataclass(slots=True)
class _State:
    stopping: bool = False
    deadline: float = 0.0
    exit_code: int = 0
    ready_sent: bool = False
    reloading: bool = False
    reloads: int = 0  # SIGHUPs received
    restarting: bool = False  # a worker is being replaced (systemd's status line says so)
    next_keep_alive: float = 0.0
    signals: list[int] = field(default_factory=list)


class Supervisor:
    """Forks `count` children running `run_child` and supervises them until SIGTERM or SIGINT.

    `notifier` talks to systemd (the parent is the unit's main process). Children get keep-alive
    duty when the parent has a watchdog: they ping every `notifier.watchdog_interval_s`.
    `on_ready` runs once, when every child first reported READY=1.
    """

    def __init__(self, count: int, run_child: ChildRunner, notifier: Notifier, *, status: str,
                 shutdown_timeout_s: float, on_ready: Callable[[], None] | None = None) -> None:
        self.children = [Child(i) for i in range(count)]
        self._run_child = run_child
        self._notifier = notifier
        self._status = status
        self._stop_wait_s = 2 * shutdown_timeout_s + KILL_GRACE_S
        self._on_ready = on_ready
        self._state = _State()
        self._pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Start the children and supervise them; returns the parent's exit code (0 after a clean stop)."""
        previous = self._install_signals()
        try:
            for child in self.children:
                self._spawn(child)
            while not self._state.stopping or any(c.pid for c in self.children):
                for key, _ in self._selector.select(self._timeout()):
                    if key.fileobj is self._wake_r:
                        self._drain_wakeup()
                    else:
                        self._read(key.data)
                self._handle_signals()
                self._reap()
                self._tick()
        finally:
            self._restore_signals(previous)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
        log.info("every worker has stopped")
        return self._state.exit_code

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + 1.0]
        due += [c.restart_at for c in self.children if c.restart_at is not None]
        if self._notifier.watchdog_interval_s is not None:
            due.append(self._state.next_keep_alive)
        if self._state.stopping:
            due.append(self._state.deadline)
        return max(0.0, min(due) - now)

    # ------------------------------------------------------------------ children
    def _spawn(self, child: Child) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Signals wait until the child has dropped the parent's handlers: one caught in between would
        # be recorded in the child's copy of the parent's state and lost.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {*_FORWARDED, signal.SIGCHLD})
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later, like a worker that died
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            mine.close()
            theirs.close()
            self._schedule_restart(child, f"could not start worker {child.index}: {exc}")
            return
        if pid == 0:  # the child: from here on it never returns into the parent's loop
            code = 1
            try:
                mine.close()
                self._become_child()
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                theirs.setblocking(False)  # a parent that does not read must not stall the worker
                code = self._run_child(child.index, theirs)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        theirs.close()
        mine.setblocking(False)
        child.pid, child.channel = pid, mine
        child.started_at = child.last_ping = time.monotonic()
        child.is_ready = child.aborted = child.is_reloading = False
        child.restart_at = None
        child.reloads = 0  # it starts with the settings the parent started with
        self._selector.register(mine, selectors.EVENT_READ, child)
        log.info("worker %d started (pid %d)", child.index, pid)

    def _become_child(self) -> None:
        """Drop what belongs to the parent: its signal handling, its sockets, its line to systemd."""
        signal.set_wakeup_fd(-1)
        for sig in (*_FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        if os.getppid() != self._pid:  # the parent died before that took effect
            raise SystemExit(0)
        self._selector.close()  # the child's copy only; the parent's epoll set is not touched
        self._wake_r.close()
        self._wake_w.close()
        for other in self.children:
            if other.channel is not None:
                other.channel.close()
        self._notifier.close()

    def _read(self, child: Child) -> None:
        assert child.channel is not None
        while True:
            try:
                data = child.channel.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            self._on_message(child, dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines()
                                         if "=" in line))

    def _on_message(self, child: Child, message: dict[str, str]) -> None:
        now = time.monotonic()
        if "STATUS" in message:
            child.status = message["STATUS"]
        if "WATCHDOG" in message:
            child.last_ping = now
        if message.get("READY") == "1":
            child.last_ping = now
            child.is_reloading = False
            if not child.is_ready:
                child.is_ready = True
                log.info("worker %d ready (pid %d)", child.index, child.pid)
                if child.reloads < self._state.reloads:  # started before (or during) a reload: catch up
                    self._tell_reload(child)
            self._check_ready()

    def _check_ready(self) -> None:
        state = self._state
        if state.stopping:
            return
        if not state.ready_sent:
            if all(c.is_ready for c in self.children):
                state.ready_sent = True
                self._notifier.ready(self._status)
                if self._on_ready is not None:
                    self._on_ready()
        elif state.reloading and not any(c.is_reloading for c in self.children):
            state.reloading = False
            refused = [c.index for c in self.children if "refused" in c.status]
            self._notifier.ready(self._status if not refused else f"{self._status}; last reload refused, see the log")
        elif state.restarting and all(c.is_ready for c in self.children):
            state.restarting = False
            self._notifier.send(f"STATUS={self._status}")

    def _reap(self) -> None:
        for child in self.children:
            if not child.pid:
                continue
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid:
                self._exited(child, os.waitstatus_to_exitcode(status))

    def _exited(self, child: Child, code: int) -> None:
        now = time.monotonic()
        pid, lived_s, was_ready = child.pid, now - child.started_at, child.is_ready
        if child.channel is not None:  # what it still had to say no longer matters
            self._selector.unregister(child.channel)
            child.channel.close()
        child.pid, child.channel, child.is_ready, child.is_reloading = 0, None, False, False
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        state = self._state
        if state.stopping:
            log.info("worker %d stopped (pid %d, %s)", child.index, pid, how)
            return
        if not state.ready_sent and not was_ready:
            log.error("worker %d (pid %d) ended during start-up (%s): stopping the service", child.index, pid, how)
            self._stop(exit_code=1)
            return
        if lived_s >= STABLE_AFTER_S:
            child.failures = 0
        self._schedule_restart(child, f"worker {child.index} (pid {pid}) ended unexpectedly ({how}) after "
                                      f"{lived_s:.1f} s", level=logging.WARNING if code == 0 else logging.ERROR)
        self._check_ready()  # a reload no longer waits for it

    def _schedule_restart(self, child: Child, why: str, level: int = logging.ERROR) -> None:
        delay = RESTART_BACKOFF.delay_s(child.failures)
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        log.log(level, "%s: starting another in %.1f s", why, delay)
        self._state.restarting = True
        self._notifier.send(f"STATUS={self._status}; worker {child.index} restarting")

    def _tick(self) -> None:
        now = time.monotonic()
        state = self._state
        interval = self._notifier.watchdog_interval_s
        if interval is not None and now >= state.next_keep_alive:
            self._notifier.send("WATCHDOG=1")
            state.next_keep_alive = now + interval
        if state.stopping:
            if now >= state.deadline:
                for child in self.children:
                    if child.pid:
                        log.error("worker %d (pid %d) did not stop in %.0f s: killing it", child.index, child.pid,
                                  self._stop_wait_s)
                        _signal(child.pid, signal.SIGKILL)
                state.exit_code = 1
                state.deadline = now + 3600  # SIGKILL is not refused; wait for the exits
            return
        for child in self.children:
            if child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
            elif interval is not None and child.pid and child.is_ready and not child.aborted \
                    and now - child.last_ping > 2 * interval:
                log.error("worker %d (pid %d) sent no keep-alive for %.0f s (its event loop is stuck): "
                          "aborting it (SIGABRT) and starting another", child.index, child.pid, now - child.last_ping)
                child.aborted = True
                _signal(child.pid, signal.SIGABRT)

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> dict[int, object]:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        previous: dict[int, object] = {}
        for sig in (*_FORWARDED, signal.SIGCHLD):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, object]) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]  # what signal.signal returned before

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._state.signals.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        signals, self._state.signals = self._state.signals, []
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if not self._state.stopping:
                    log.info("%s: stopping every worker", signal.Signals(signum).name)
                    self._stop(exit_code=0)
            elif signum == signal.SIGHUP and not self._state.stopping:
                self._reload()

    def _stop(self, exit_code: int) -> None:
        state = self._state
        state.stopping = True
        state.exit_code = exit_code
        state.deadline = time.monotonic() + self._stop_wait_s
        self._notifier.stopping("shutting down")
        for child in self.children:
            child.restart_at = None
            if child.pid:
                _signal(child.pid, signal.SIGTERM)

    def _reload(self) -> None:
        """Forward SIGHUP to the ready children; one still starting gets it once it is ready (before
        that it has no SIGHUP handler, and the signal would end it)."""
        state = self._state
        log.info("SIGHUP: every worker reloads its settings")
        state.reloads += 1
        if state.ready_sent:
            self._notifier.reloading()
            state.reloading = True
        for child in self.children:
            if child.pid and child.is_ready:
                self._tell_reload(child)
        self._check_ready()

    def _tell_reload(self, child: Child) -> None:
        child.is_reloading = True
        child.reloads = self._state.reloads
        _signal(child.pid, signal.SIGHUP)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """Linux: SIGTERM this child when the parent dies, even by SIGKILL, so no worker is left serving alone."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    pr_set_pdeathsig = 1
    prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
