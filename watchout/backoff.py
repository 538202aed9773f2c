"""The retry schedule: capped exponential backoff, with full jitter or without; used by server and SDK alike."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: attempt n (from 0) waits uniform(0, min(cap_s, base_s * 2**n)) ("full jitter").

    With `jitter=False` attempt n waits exactly min(cap_s, base_s * 2**n) (for a single waiter, such as
    the supervisor restarting one worker, where spreading retries out buys nothing). `random` (a float
    in [0, 1)) and `sleep` can be replaced, e.g. to check the schedule without waiting.
    """

    base_s: float = 0.2
    cap_s: float = 10.0
    random: Callable[[], float] = random.random
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: bool = True

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0 for the first retry), never more than `cap_s`."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32))
        return self.random() * ceiling if self.jitter else ceiling
