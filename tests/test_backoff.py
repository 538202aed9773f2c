"""watchout.backoff: the one retry schedule (capped exponential, full jitter or none), shared by server and SDK."""
from __future__ import annotations

import pytest

from watchout.backoff import Backoff
from watchout.redisbroker import RECONNECT_BACKOFF
from watchout.supervisor import RESTART_BACKOFF


def test_full_jitter_delays_stay_between_zero_and_the_capped_ceiling():
    low, high = Backoff(random=lambda: 0.0), Backoff(random=lambda: 0.999)
    for attempt in range(40):
        ceiling = min(10.0, 0.2 * 2 ** attempt)
        assert low.delay_s(attempt) == 0.0
        assert 0.0 < high.delay_s(attempt) < ceiling


def test_the_ceiling_doubles_each_attempt_up_to_the_cap():
    top = Backoff(base_s=0.2, cap_s=10.0, random=lambda: 1.0)
    assert [top.delay_s(n) for n in range(8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0])
    assert top.delay_s(10_000) == 10.0  # no overflow however many attempts failed


def test_jitter_scales_the_ceiling_by_the_random_draw():
    draws = iter([0.5, 0.25])
    half = Backoff(base_s=1.0, cap_s=100.0, random=lambda: next(draws))
    assert half.delay_s(3) == 4.0 and half.delay_s(3) == 2.0


def test_without_jitter_the_delay_is_the_ceiling_and_random_is_not_called():
    def never() -> float:
        raise AssertionError("random called with jitter off")

    steady = Backoff(base_s=0.5, cap_s=30.0, jitter=False, random=never)
    assert [steady.delay_s(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_worker_restarts_wait_half_a_second_doubling_to_thirty_without_jitter():
    assert [RESTART_BACKOFF.delay_s(n) for n in (0, 1, 5, 6, 50)] == [0.5, 1.0, 16.0, 30.0, 30.0]


def test_redis_reconnects_are_jittered_up_to_five_seconds():
    assert RECONNECT_BACKOFF.jitter and RECONNECT_BACKOFF.cap_s == 5.0
    assert all(0.0 <= RECONNECT_BACKOFF.delay_s(n) <= min(5.0, 0.1 * 2 ** n) for n in range(20))


def test_the_sdk_exports_the_same_schedule():
    from watchout.client import Backoff as SdkBackoff

    assert SdkBackoff is Backoff
