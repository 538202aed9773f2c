"""Event-loop lag: a stalled loop shows in the monitor and in /metrics; an idle one does not."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Response, Server
from watchout.looplag import LoopLagMonitor
from watchout.metrics import Metrics


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


async def _hold_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a long synchronous query does to every connection


async def test_a_blocked_loop_shows_as_lag_in_the_monitor_and_the_histogram() -> None:
    metrics = Metrics()
    # A short interval: a stall of d s shows as d - interval_s to d.
    async with LoopLagMonitor(metrics.loop_lag.observe, interval_s=0.01) as monitor:
        await asyncio.sleep(0.05)
        count = _sample(metrics, "watchout_event_loop_lag_seconds_count")
        total = _sample(metrics, "watchout_event_loop_lag_seconds_sum")
        short = _sample(metrics, "watchout_event_loop_lag_seconds_bucket", le="0.1")
        monitor.reset()
        await _hold_loop(0.2)
        await asyncio.sleep(0.05)
        lag = monitor.max_lag_since_reset()
    assert 0.15 <= lag < 1.0, lag
    assert monitor.recent_max_lag() >= lag
    assert _sample(metrics, "watchout_event_loop_lag_seconds_count") > count
    assert _sample(metrics, "watchout_event_loop_lag_seconds_sum") - total >= 0.15
    long_ones = _sample(metrics, "watchout_event_loop_lag_seconds_count") - _sample(
        metrics, "watchout_event_loop_lag_seconds_bucket", le="0.1")
    assert long_ones - (count - short) == 1  # the one late tick, in a bucket above 0.1 s


async def test_an_idle_loop_shows_little_lag() -> None:
    metrics = Metrics()
    monitor = metrics.start_loop_monitor()
    try:
        await asyncio.sleep(0.5)
    finally:
        monitor.stop()
    assert monitor.max_lag_since_reset() < 0.1
    assert _sample(metrics, "watchout_event_loop_lag_max_seconds") < 0.1
    assert _sample(metrics, "watchout_event_loop_lag_seconds_count") >= 3  # ticks at 0.1, 0.2, 0.3, 0.4 s


async def test_the_recent_maximum_forgets_a_stall_after_two_windows() -> None:
    async with LoopLagMonitor(interval_s=0.01, window_s=0.05) as monitor:
        await _hold_loop(0.1)
        await asyncio.sleep(0.02)
        assert monitor.recent_max_lag() >= 0.05
        await asyncio.sleep(0.2)
        assert monitor.recent_max_lag() < 0.05
        assert monitor.max_lag_since_reset() >= 0.05  # kept until reset()
        monitor.reset()
        assert monitor.max_lag_since_reset() == 0.0


async def test_a_stopped_monitor_stops_ticking() -> None:
    ticks: list[float] = []
    monitor = LoopLagMonitor(ticks.append, interval_s=0.01)
    monitor.start()
    monitor.start()  # already started: one timer, not two
    await asyncio.sleep(0.1)
    monitor.stop()
    monitor.stop()
    assert not monitor.is_running and 3 <= len(ticks) <= 11
    seen = len(ticks)
    await asyncio.sleep(0.05)
    assert len(ticks) == seen


async def test_a_failing_observer_is_logged_once_and_lag_is_still_measured(caplog: pytest.LogCaptureFixture) -> None:
    def broken(lag: float) -> None:
        raise ZeroDivisionError("observer bug")

    with caplog.at_level(logging.ERROR, logger="watchout.looplag"):
        async with LoopLagMonitor(broken, interval_s=0.01) as monitor:
            await asyncio.sleep(0.05)
            await _hold_loop(0.1)
            await asyncio.sleep(0.02)
            assert monitor.is_running and monitor.max_lag_since_reset() >= 0.05
    failures = [r for r in caplog.records if r.name == "watchout.looplag"]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_a_started_monitor_does_not_keep_its_loop_alive() -> None:
    async def main() -> LoopLagMonitor:
        monitor = LoopLagMonitor(interval_s=0.01)
        monitor.start()
        await asyncio.sleep(0.03)
        return monitor  # never stopped

    began = time.monotonic()
    monitor = asyncio.run(main())
    assert time.monotonic() - began < 1.0
    assert monitor.max_lag_since_reset() < 1.0


async def test_metrics_show_the_event_loop_lag(server: Server, api: Callable[..., Awaitable[Response]]) -> None:
    async def scrape() -> dict[str, float]:
        response = await api("GET", "/metrics")
        assert response.status == 200
        return {sample.name: sample.value for family in text_string_to_metric_families(response.body.decode())
                for sample in family.samples if not sample.labels}

    before = await scrape()
    assert "watchout_event_loop_lag_seconds_count" in before and "watchout_event_loop_lag_max_seconds" in before
    await _hold_loop(0.3)
    for _ in range(50):
        after = await scrape()
        if after["watchout_event_loop_lag_seconds_count"] > before["watchout_event_loop_lag_seconds_count"]:
            break
        await asyncio.sleep(0.02)
    # The server's monitor wakes every 0.1 s, so a 0.3 s stall shows as 0.2 s at least.
    assert after["watchout_event_loop_lag_max_seconds"] >= 0.2
    assert after["watchout_event_loop_lag_seconds_sum"] - before["watchout_event_loop_lag_seconds_sum"] >= 0.2
