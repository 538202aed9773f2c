"""The jobs' schedule inside `watchout serve` (APScheduler's AsyncIOScheduler), and how one run goes:
lease, run, renew, record. A run that raises is logged with the job's name; the scheduler goes on."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from watchout.errors import StoreUnavailable
from watchout.jobboard import JobEntry, JobRun
from watchout.services import Services
from watchout.settings import Settings, schedule_fields
from workers.cleanup import cleanup
from workers.clock import Instant
from workers.lease import Lease
from workers.offline import check_producers, mark_unseen_offline, save_figures
from workers.reports import store_report

log = logging.getLogger("watchout.jobs")
UTC = dt.timezone.utc
# interval jobs fire at multiples of their interval since this instant, so every node fires together
EPOCH = dt.datetime(2000, 1, 1, tzinfo=UTC)
CLUSTER, NODE = "cluster", "node"


@dataclass(frozen=True, slots=True)
class Firing:
    at: Instant  # when the run starts
    slot: dt.datetime  # the scheduled time it runs for (the lease's firing)
    previous: dt.datetime | None  # the schedule's time before `slot`


JobFunction = Callable[[Services, Firing], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class JobSpec:
    name: str
    trigger: Any  # an APScheduler trigger
    run: JobFunction
    scope: str  # CLUSTER: one node per firing, under a lease; NODE: every node, for its own connections
    schedule: str  # for people


def node_name(settings: Settings) -> str:
    return settings.node_name


def every(seconds: float) -> IntervalTrigger:
    return IntervalTrigger(seconds=seconds, start_date=EPOCH, timezone=UTC)


def job_specs(settings: Settings) -> list[JobSpec]:
    """The service's jobs and when they run (UTC)."""
    check = f"every {settings.offline_check_s:g} s"
    return [
        JobSpec("check-producers", every(settings.offline_check_s), _check_producers, NODE, check),
        JobSpec("mark-offline", every(settings.offline_check_s), _mark_offline, CLUSTER, check),
        JobSpec("prune", CronTrigger(minute=0, timezone=UTC), _prune, CLUSTER, "hourly, at minute 0"),
        JobSpec("report", CronTrigger(**schedule_fields(settings.report_schedule), timezone=UTC), _report, CLUSTER,
                f"{settings.report_schedule} UTC"),
    ]


async def _check_producers(services: Services, firing: Firing) -> dict[str, Any]:
    return (await check_producers(services, firing.at)).summary()


async def _mark_offline(services: Services, firing: Firing) -> dict[str, Any]:
    marked = await mark_unseen_offline(services, firing.at.wall)
    return {"marked": len(marked), "streamIds": marked[:50]}


async def _prune(services: Services, firing: Firing) -> dict[str, Any]:
    return (await cleanup(services, firing.at.wall)).summary()


async def _report(services: Services, firing: Firing) -> dict[str, Any]:
    """The period since the schedule's previous time, up to this one."""
    start = firing.previous or firing.slot - dt.timedelta(days=1)
    return (await store_report(services, start, firing.slot)).summary()


def latest_fire_time(trigger: Any, now: dt.datetime) -> dt.datetime | None:
    """The trigger's last fire time at or before `now` (None if there is none within ~30 years)."""
    lookback = dt.timedelta(seconds=1)
    for _ in range(30):
        moment = trigger.get_next_fire_time(None, now - lookback)
        if moment is not None and moment <= now:
            while True:
                after = trigger.get_next_fire_time(moment, moment + dt.timedelta(microseconds=1))
                if after is None or after > now:
                    return moment  # type: ignore[no-any-return]
                moment = after
        lookback *= 2
    return None


def firing_at(trigger: Any, at: Instant) -> Firing:
    """The firing a run starting at `at` belongs to: the trigger's latest time (else now) and the one before."""
    slot = latest_fire_time(trigger, at.wall) or at.wall
    return Firing(at, slot, latest_fire_time(trigger, slot - dt.timedelta(microseconds=1)))


async def run_job(services: Services, name: str, scope: str, node: str, firing: Firing,
                  body: Callable[[], Awaitable[dict[str, Any]]]) -> JobRun | None:
    """Run `body` once for `firing`: under the job's lease when scope is CLUSTER (None, without running,
    when another node holds it or ran this firing), renewed while it runs; then record the run in the
    store (`job_runs`), in services.jobs and in the metrics.

    An exception in body is logged with the job's name and recorded as failed, never raised. If this
    coroutine is cancelled, body is cancelled, the run is recorded as cancelled, and CancelledError is
    raised again.
    """
    store, metrics = services.store, services.metrics
    lease = Lease(store, name, node, services.settings.job_lease_s) if scope == CLUSTER else None
    try:
        if lease is not None and not await lease.acquire(firing.slot, firing.at.wall):
            metrics.observe_job(name, "skipped", None)
            return None
    except StoreUnavailable as exc:
        log.error("job %s did not start: %s", name, exc.message)
        metrics.observe_job(name, "failed", None)
        return None
    entry = services.jobs.jobs.get(name)
    if entry is not None:
        entry.running_since = firing.at.wall
    started = time.perf_counter()
    result, error, summary = "ok", None, {}
    work = asyncio.ensure_future(body())
    keeper = asyncio.ensure_future(lease.keep()) if lease is not None else None
    cancelled = False
    try:
        await asyncio.wait([work] if keeper is None else [work, keeper], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the lease was taken over: this node must stop
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            result, error = "lease-lost", "another node took the lease over"
        else:
            summary = work.result()
    except asyncio.CancelledError:
        cancelled = True
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        result, error = "cancelled", "stopped before it finished"
    except StoreUnavailable as exc:
        log.error("job %s failed: %s", name, exc.message)
        result, error = "failed", exc.message
    except Exception as exc:
        log.exception("job %s failed", name)
        result, error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if keeper is not None:
            keeper.cancel()
    duration_s = time.perf_counter() - started
    if lease is not None:
        await lease.release()
    run = JobRun(firing.at.wall, duration_s, result, node, error, summary)
    await _record(services, name, scope, node, firing, run)
    if cancelled:
        raise asyncio.CancelledError
    return run


async def _record(services: Services, name: str, scope: str, node: str, firing: Firing, run: JobRun) -> None:
    services.metrics.observe_job(name, run.result, run.duration_s)
    entry = services.jobs.jobs.get(name)
    if entry is not None:
        entry.running_since = None
        entry.last_run = run
    run_id = name if scope == CLUSTER else f"{name}@{node}"
    try:
        await services.store.record_job_run(run_id, {
            "job": name, "scope": scope, "node": node, "slot": firing.slot, "startedAt": run.started_at,
            "durationS": run.duration_s, "result": run.result, "error": run.error, "summary": run.summary})
    except StoreUnavailable as exc:
        log.warning("job %s: could not record its run: %s", name, exc.message)


class JobScheduler:
    """The jobs of one node: start() in the running loop; stop() at shutdown."""

    def __init__(self, services: Services, specs: list[JobSpec] | None = None, node: str | None = None) -> None:
        self.services = services
        self.specs = specs if specs is not None else job_specs(services.settings)
        self.node = node or node_name(services.settings)
        self._scheduler: Any = None
        self._running: set[asyncio.Task[Any]] = set()
        for spec in self.specs:
            services.jobs.jobs[spec.name] = JobEntry(spec.name, spec.schedule, spec.scope)

    def start(self) -> None:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # not two lines per run
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        for spec in self.specs:
            # one run at a time per job on a node: a firing while it still runs is skipped, missed ones
            # (a busy loop) coalesce into one late run
            scheduler.add_job(self._fire, spec.trigger, args=(spec,), id=spec.name, name=spec.name,
                              coalesce=True, max_instances=1, misfire_grace_time=None)
        scheduler.start()
        self._scheduler = scheduler
        self._update_next_runs()
        log.info("jobs scheduled on node %s: %s", self.node,
                 "; ".join(f"{s.name} {s.schedule}" for s in self.specs))

    async def _fire(self, spec: JobSpec) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            firing = firing_at(spec.trigger, Instant.now())
            await run_job(self.services, spec.name, spec.scope, self.node, firing,
                          lambda: spec.run(self.services, firing))
        except asyncio.CancelledError:
            pass  # stop(): recorded as cancelled; the executor's task ends quietly
        finally:
            self._running.discard(task)
            self._update_next_runs()

    def _update_next_runs(self) -> None:
        if self._scheduler is None:
            return
        for spec in self.specs:
            job = self._scheduler.get_job(spec.name)
            entry = self.services.jobs.jobs.get(spec.name)
            if entry is not None:
                entry.next_run = job.next_run_time if job is not None else None

    async def stop(self, timeout_s: float) -> None:
        """No new runs; running ones get `timeout_s` to finish, then are cancelled (and recorded so)."""
        if self._scheduler is None:
            return
        scheduler, self._scheduler = self._scheduler, None
        scheduler.pause()
        running = set(self._running)
        if running:
            log.info("waiting up to %.1f s for running jobs to finish", timeout_s)
            _, late = await asyncio.wait(running, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        scheduler.shutdown(wait=False)
        for entry in self.services.jobs.jobs.values():
            entry.next_run = None

    async def save_figures(self) -> None:
        """The frame counters and online time since the last check (at shutdown, after the last close)."""
        try:
            await save_figures(self.services, dt.datetime.now(UTC))
        except StoreUnavailable as exc:
            log.warning("could not save the last frame counters: %s", exc.message)
