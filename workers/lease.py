"""Job leases in the store (`locks`): one node runs a given firing of a job; renewed while it runs."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging

from watchout.errors import StoreUnavailable
from watchout.store import Store

log = logging.getLogger("watchout.jobs.lease")


class Lease:
    """`job`'s lease for `owner` (a node id). Acquire it for a firing; keep() renews it until lost."""

    def __init__(self, store: Store, job: str, owner: str, lease_s: float) -> None:
        self.store = store
        self.job = job
        self.owner = owner
        self.lease_s = lease_s

    async def acquire(self, slot: dt.datetime, now: dt.datetime) -> bool:
        """False when another node holds it or already ran this firing (`slot`, to the millisecond)."""
        return await self.store.acquire_lease(self.job, self.owner, _ms(slot), now, self.lease_s)

    async def keep(self) -> None:
        """Renew every third of the lease until cancelled; returns when another owner has taken it over.

        A renewal the store refuses (unavailable) is retried at the next turn: if the store stays away
        past the lease, another node may take over, and the next renewal says so.
        """
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.store.renew_lease(self.job, self.owner, _utcnow(), self.lease_s):
                    log.warning("job %s: lease taken over by another node", self.job)
                    return
            except StoreUnavailable as exc:
                log.warning("job %s: could not renew the lease: %s", self.job, exc.message)

    async def release(self) -> None:
        try:
            await self.store.release_lease(self.job, self.owner, _utcnow())
        except StoreUnavailable as exc:  # it expires by itself
            log.warning("job %s: could not release the lease: %s", self.job, exc.message)


def _ms(moment: dt.datetime) -> dt.datetime:
    """BSON keeps milliseconds: compare slots at that precision."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
