"""Event-loop lag: how late a repeating timer fires, i.e. how long something held the loop."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

log = logging.getLogger("watchout.looplag")

INTERVAL_S = 0.1
WINDOW_S = 60.0


class LoopLagMonitor:
    """Wakes every `interval_s` seconds on the running loop and measures how late it woke.

    Lag is the lateness in seconds, floored at 0. A stall of d seconds shows as a lag between
    d - interval_s and d (it depends on when the stall began), so to check a bound of a few
    milliseconds, run a monitor with an `interval_s` well below it (e.g. 0.001 s).

    Each lag is passed to `on_lag` (e.g. a histogram's observe); an `on_lag` that raises is logged
    once and dropped, while measuring goes on. The monitor is a timer, not a task: it never keeps
    a loop running, and a loop that closes while it is started just drops it.
    """

    def __init__(self, on_lag: Callable[[float], None] | None = None, interval_s: float = INTERVAL_S,
                 window_s: float = WINDOW_S) -> None:
        if interval_s <= 0 or window_s <= 0:
            raise ValueError("interval_s and window_s must be positive")
        self._on_lag = on_lag
        self._interval_s = interval_s
        self._window_s = window_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._max_since_reset = 0.0
        self._window_end = 0.0
        self._window_max = 0.0
        self._previous_window_max = 0.0

    @property
    def is_running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Start ticking on the running loop (RuntimeError without one); a no-op while started."""
        if self._handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        now = loop.time()
        self._window_end = now + self._window_s
        self._due = now + self._interval_s
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        """Stop ticking; the figures read so far stay readable. Safe to call twice."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.stop()

    def reset(self) -> None:
        """Start a new period for max_lag_since_reset()."""
        self._max_since_reset = 0.0

    def max_lag_since_reset(self) -> float:
        """The largest lag in seconds since start() or the last reset()."""
        return self._max_since_reset

    def recent_max_lag(self) -> float:
        """The largest lag in seconds over the last one to two windows (60 to 120 s by default).

        Reading changes nothing, so any number of scrapers see the same figure.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._rotate(self._loop.time())
        return max(self._window_max, self._previous_window_max)

    def _rotate(self, now: float) -> None:
        if now >= self._window_end:
            recent = now < self._window_end + self._window_s
            self._previous_window_max = self._window_max if recent else 0.0
            self._window_max = 0.0
            self._window_end = now + self._window_s

    def _tick(self) -> None:
        # Plain float arithmetic and one timer per tick: this runs every interval_s for the life of the process.
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lag = now - self._due
        if lag < 0.0:
            lag = 0.0  # asyncio runs timers up to its clock resolution early
        # Count from now, not from the missed deadline: after a stall, one late tick, not a burst.
        self._due = now + self._interval_s
        self._handle = loop.call_at(self._due, self._tick)
        if lag > self._max_since_reset:
            self._max_since_reset = lag
        self._rotate(now)
        if lag > self._window_max:
            self._window_max = lag
        if self._on_lag is not None:
            try:
                self._on_lag(lag)
            except Exception:
                log.exception("event-loop lag observer failed; lag is no longer reported to it")
                self._on_lag = None
