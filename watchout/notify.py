"""sd_notify by hand: READY, RELOADING, STOPPING, STATUS and WATCHDOG datagrams to systemd's NOTIFY_SOCKET
(or, in a worker of `watchout serve --workers N`, to the parent that supervises it)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("watchout.notify")


class Notifier:
    """Tells the service manager named by NOTIFY_SOCKET in `environ` how the service is doing.

    Without NOTIFY_SOCKET (not under systemd, or Type= is not notify) every method does nothing.
    Sends never raise: the first failure is logged as a warning, later ones are dropped silently,
    so the service runs the same whether or not anybody listens.
    """

    def __init__(self, environ: Mapping[str, str], pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _keep_alive_interval_s(environ, self.pid) if self._address else None
        self._sock: socket.socket | None = None
        self._is_connected = False
        self._failed = False

    @classmethod
    def to_supervisor(cls, channel: socket.socket, watchdog_interval_s: float | None) -> Notifier:
        """A worker's notifier: the same datagrams go over `channel` (a connected datagram socket) to the
        parent process, which speaks to systemd for every worker (watchout.supervisor). With
        `watchdog_interval_s`, keep_alive() pings the parent that often."""
        notifier = cls({})
        notifier._sock = channel
        notifier._is_connected = True
        notifier.watchdog_interval_s = watchdog_interval_s
        return notifier

    @property
    def is_enabled(self) -> bool:
        return self._address is not None or self._is_connected

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True if it went out. Newlines inside a value become spaces."""
        if not self.is_enabled:
            return False
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._is_connected:
                assert self._sock is not None
                self._sock.send(payload)
                return True
            assert self._address is not None
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a full manager queue must not stall the event loop
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify the service manager (NOTIFY_SOCKET): %s; further failures are not logged",
                            exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up is complete (systemd then reports the unit active), or a reload has finished."""
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={self.pid}")

    def reloading(self) -> bool:
        """A reload has started; ready() ends it."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    async def keep_alive(self) -> None:
        """Send WATCHDOG=1 every half watchdog interval until cancelled; returns at once without a watchdog.

        The pings come from the event loop on purpose: a loop that is stuck stops them, and systemd
        (WatchdogSec=) then kills and restarts the service.
        """
        if self.watchdog_interval_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | None:
    """A filesystem path, or '@name' for Linux's abstract namespace; None when unset or of another kind."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket (@name): not notifying", value)
    return None


def _keep_alive_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, in seconds, when the watchdog is meant for this process (WATCHDOG_PID)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        watchdog_pid = int(environ.get("WATCHDOG_PID", str(pid)))
    except ValueError:
        log.warning("WATCHDOG_USEC or WATCHDOG_PID is not a number: not sending watchdog keep-alives")
        return None
    if usec <= 0 or watchdog_pid != pid:
        return None
    return usec / 2 / 1_000_000
