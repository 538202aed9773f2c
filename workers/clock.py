"""Instant: the two clocks a job reads, passed in so that tests can move time without sleeping."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Instant:
    """A moment on the wall clock (UTC, for the store) and on the monotonic clock (for live connections,
    whose Peer.last_heard is monotonic, so that a wall-clock step never makes a live producer look silent)."""

    wall: dt.datetime
    mono: float

    @classmethod
    def now(cls) -> Instant:
        return cls(dt.datetime.now(dt.timezone.utc), time.monotonic())

    def later(self, seconds: float) -> Instant:
        return Instant(self.wall + dt.timedelta(seconds=seconds), self.mono + seconds)

    def wall_at(self, mono: float) -> dt.datetime:
        """The wall time of an earlier monotonic reading."""
        return self.wall - dt.timedelta(seconds=self.mono - mono)


def utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)
