"""The scheduler: one run per firing across nodes (leases), failures logged and survived, overlapping runs
coalesced, clean shutdown, and what /stats and /metrics show."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from pathlib import Path

import jsonschema
import tornado.httpclient
from apscheduler.triggers.cron import CronTrigger

import handlers
from conftest import replace_settings
from watchout.services import build_services
from workers.clock import Instant
from workers.scheduler import (CLUSTER, NODE, Firing, JobScheduler, JobSpec, every, firing_at, job_specs,
                               latest_fire_time, run_job)

UTC = dt.timezone.utc


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _counting(name: str, calls: list, seconds: float = 0.25, scope: str = CLUSTER, work_s: float = 0.0) -> JobSpec:
    async def run(services, firing):
        calls.append((services.settings.node_id, firing.slot))
        if work_s:
            await asyncio.sleep(work_s)
        return {"slot": firing.slot.isoformat()}
    return JobSpec(name, every(seconds), run, scope, f"every {seconds} s")


async def _two_nodes(settings, server):
    """Two services on one store, as two nodes of a cluster would be."""
    return [build_services(replace_settings(settings, node_id=f"node-{i}"), server.services.store) for i in (1, 2)]


async def test_two_schedulers_sharing_one_store_run_each_firing_once(settings, server):
    calls, local = [], []
    nodes = await _two_nodes(settings, server)
    schedulers = [JobScheduler(s, [_counting("shared", calls), _counting("local", local, scope=NODE)],
                               node=s.settings.node_id) for s in nodes]
    for scheduler in schedulers:
        scheduler.start()
    await asyncio.sleep(1.4)
    for scheduler in schedulers:
        await scheduler.stop(1.0)
    slots = [slot for _, slot in calls]
    assert len(slots) >= 4
    assert len(set(slots)) == len(slots)  # no firing ran twice
    assert {node for node, _ in local} == {"node-1", "node-2"}  # per-node jobs run on every node
    for slot in {slot for _, slot in local}:
        assert sorted(node for node, s in local if s == slot) in (["node-1"], ["node-2"], ["node-1", "node-2"])


async def test_a_node_firing_late_does_not_run_a_firing_another_node_finished(settings, server):
    calls = []

    async def body():
        calls.append(1)
        return {}

    first, late = await _two_nodes(settings, server)
    firing = firing_at(every(15), Instant.now())
    assert (await run_job(first, "sweep", CLUSTER, "node-1", firing, body)).result == "ok"
    late_start = Firing(Instant.now(), firing.slot, firing.previous)  # node-2 starts after node-1 finished
    assert await run_job(late, "sweep", CLUSTER, "node-2", late_start, body) is None  # the lease is free; it ran
    assert calls == [1]
    assert late.metrics.job_runs.labels("sweep", "skipped")._value.get() == 1
    next_firing = firing_at(every(15), firing.at.later(15))
    assert (await run_job(late, "sweep", CLUSTER, "node-2", next_firing, body)).node == "node-2"
    assert calls == [1, 1]


async def test_a_lease_is_held_until_it_expires_or_is_released_and_one_slot_runs_once(server):
    store = server.services.store
    now = dt.datetime(2026, 11, 25, 12, tzinfo=UTC)

    def t(seconds):
        return now + dt.timedelta(seconds=seconds)

    assert await store.acquire_lease("prune", "a", now, now, 60)
    assert not await store.acquire_lease("prune", "b", t(1), t(59), 60)  # held
    assert await store.renew_lease("prune", "a", t(50), 60)  # held until t(110)
    assert not await store.acquire_lease("prune", "b", t(1), t(61), 60)
    assert await store.acquire_lease("prune", "b", t(1), t(111), 60)  # expired: taken over
    assert not await store.renew_lease("prune", "a", t(111), 60)
    await store.release_lease("prune", "b", t(111))
    assert not await store.acquire_lease("prune", "a", t(1), t(111), 60)  # that slot ran already
    assert await store.acquire_lease("prune", "a", t(2), t(111), 60)


async def test_a_job_that_raises_is_logged_with_its_name_and_the_scheduler_goes_on(server, caplog):
    calls = []

    async def flaky(services, firing):
        calls.append(firing.slot)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return {}

    scheduler = JobScheduler(server.services, [JobSpec("flaky", every(0.2), flaky, CLUSTER, "every 0.2 s")])
    with caplog.at_level(logging.ERROR, logger="watchout.jobs"):
        scheduler.start()
        for _ in range(100):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.05)
        await scheduler.stop(1.0)
    assert len(calls) >= 3
    failure = next(r for r in caplog.records if "failed" in r.getMessage())
    assert "flaky" in failure.getMessage() and "disk on fire" in (failure.exc_text or str(failure.exc_info))
    assert server.services.jobs.jobs["flaky"].last_run.result == "ok"
    runs = {r["runId"]: r for r in await server.services.store.job_runs()}
    assert runs["flaky"]["result"] == "ok"
    metrics = server.services.metrics
    assert metrics.job_failures.labels("flaky")._value.get() == 1
    assert metrics.job_runs.labels("flaky", "ok")._value.get() >= 2


async def test_a_run_still_going_at_the_next_firing_is_not_started_twice(server):
    running, most = [0], [0]

    async def slow(services, firing):
        running[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.5)
        running[0] -= 1
        return {}

    scheduler = JobScheduler(server.services, [JobSpec("slow", every(0.1), slow, NODE, "every 0.1 s")])
    scheduler.start()
    await asyncio.sleep(1.2)
    await scheduler.stop(1.0)
    assert most[0] == 1


async def test_shutdown_lets_a_short_run_finish_and_cancels_a_long_one_cleanly(server):
    finished, cancelled = [], []

    def job(name, seconds):
        async def run(services, firing):
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
            finished.append(name)
            return {}
        return JobSpec(name, every(0.1), run, CLUSTER, "every 0.1 s")

    services = server.services
    scheduler = JobScheduler(services, [job("short", 0.3), job("long", 30)])
    scheduler.start()
    await _until(lambda: all(services.jobs.jobs[n].running_since for n in ("short", "long")))
    await scheduler.stop(0.6)
    assert finished == ["short"] and cancelled == ["long"]
    assert services.jobs.jobs["short"].last_run.result == "ok"
    assert services.jobs.jobs["long"].last_run.result == "cancelled"
    now = dt.datetime.now(UTC)
    # the lease was released: another node may take the next firing at once
    assert await services.store.acquire_lease("long", "other", now, now, 60)
    await asyncio.sleep(0.3)
    assert finished == ["short"]  # nothing runs after stop()


async def test_a_node_that_loses_its_lease_stops_the_run(settings, server):
    services = server.services
    started = asyncio.Event()

    async def long(services, firing):
        started.set()
        await asyncio.sleep(30)
        return {}

    nodes = await _two_nodes(replace_settings(settings, job_lease_s=0.3), server)
    scheduler = JobScheduler(nodes[0], [JobSpec("long", every(0.2), long, CLUSTER, "every 0.2 s")], node="node-1")
    scheduler.start()
    await asyncio.wait_for(started.wait(), 5)
    future = dt.datetime.now(UTC) + dt.timedelta(seconds=10)  # another node, once the lease looks expired
    assert await services.store.acquire_lease("long", "node-2", future, future, 60)
    for _ in range(100):
        if nodes[0].jobs.jobs["long"].last_run is not None:
            break
        await asyncio.sleep(0.02)
    await scheduler.stop(1.0)
    assert nodes[0].jobs.jobs["long"].last_run.result == "lease-lost"


def test_a_firing_is_the_latest_scheduled_time_and_the_report_covers_the_time_since_the_one_before():
    daily = CronTrigger(hour=0, minute=0, timezone=UTC)
    at = Instant(dt.datetime(2026, 11, 26, 0, 0, 0, 400000, tzinfo=UTC), 0.0)
    firing = firing_at(daily, at)
    assert firing.slot == dt.datetime(2026, 11, 26, tzinfo=UTC)
    assert firing.previous == dt.datetime(2026, 11, 25, tzinfo=UTC)
    assert latest_fire_time(every(15), dt.datetime(2026, 11, 26, 10, 0, 29, tzinfo=UTC)) == \
        dt.datetime(2026, 11, 26, 10, 0, 15, tzinfo=UTC)
    weekly = CronTrigger(day_of_week="mon", hour=6, timezone=UTC)
    assert latest_fire_time(weekly, dt.datetime(2026, 11, 26, tzinfo=UTC)) == dt.datetime(2026, 11, 23, 6, tzinfo=UTC)


def test_the_service_schedules_its_four_jobs_from_the_settings(settings):
    specs = {s.name: s for s in job_specs(replace_settings(settings, report_schedule="0 6 * * 1", offline_check_s=5.0))}
    assert {n: s.scope for n, s in specs.items()} == {"check-producers": NODE, "mark-offline": CLUSTER,
                                                      "prune": CLUSTER, "report": CLUSTER}
    monday = dt.datetime(2026, 11, 23, tzinfo=UTC)  # a Monday: crontab's weekday 1
    assert specs["report"].trigger.get_next_fire_time(None, monday) == monday.replace(hour=6)
    assert specs["check-producers"].trigger.get_next_fire_time(None, monday.replace(second=1)) == \
        monday.replace(second=5)


async def test_admin_stats_and_metrics_show_each_jobs_last_run(server, token):
    calls = []
    scheduler = JobScheduler(server.services, [_counting("tidy", calls, seconds=0.1)])
    scheduler.start()
    await _until(lambda: calls and server.services.jobs.jobs["tidy"].last_run is not None)
    client = tornado.httpclient.AsyncHTTPClient()
    admin = await client.fetch(server.url("/stats"), headers={"Authorization": f"Bearer {token('root', 'admin')}"})
    user = await client.fetch(server.url("/stats"), headers={"Authorization": f"Bearer {token()}"})
    metrics = (await client.fetch(server.url("/metrics"))).body.decode()
    await scheduler.stop(1.0)
    jobs = json.loads(admin.body)["jobs"]
    assert [j["name"] for j in jobs] == ["tidy"]
    last = jobs[0]["lastRun"]
    assert last["result"] == "ok" and last["durationS"] >= 0 and last["startedAt"]
    assert jobs[0]["nextRun"] and jobs[0]["scope"] == "cluster"
    assert "jobs" not in json.loads(user.body)
    document = json.loads((Path(handlers.__file__).with_name("openapi.json")).read_text())
    for job in jobs:  # as the OpenAPI document describes them
        jsonschema.validate(job, document["components"]["schemas"]["JobStatus"])
    assert 'watchout_job_runs_total{job="tidy",result="ok"}' in metrics
    assert 'watchout_job_duration_seconds_count{job="tidy"}' in metrics
