"""The [jobs] settings: defaults, environment overrides, and refusals that name the key."""
from __future__ import annotations

import pytest

from watchout.errors import ConfigError
from watchout.settings import Settings, load_settings, schedule_fields


def test_job_settings_come_from_the_environment():
    s = load_settings(None, {"WATCHOUT_OFFLINE_AFTER_S": "45", "WATCHOUT_OFFLINE_CHECK_S": "5",
                             "WATCHOUT_REPORT_SCHEDULE": "0 6 * * 1", "WATCHOUT_NODE_ID": "edge-1",
                             "WATCHOUT_ALERT_RETENTION_D": "0"})
    assert (s.offline_after_s, s.offline_check_s, s.report_schedule, s.node_id, s.alert_retention_d) == (
        45.0, 5.0, "0 6 * * 1", "edge-1", 0.0)
    assert Settings().offline_after_s > Settings().ws_ping_interval_s


@pytest.mark.parametrize("environ, key", [
    ({"WATCHOUT_OFFLINE_AFTER_S": "20"}, "offline_after_s"),  # not more than the 20 s ping interval
    ({"WATCHOUT_OFFLINE_AFTER_S": "5", "WATCHOUT_WS_PING_INTERVAL_S": "10", "WATCHOUT_WS_PING_TIMEOUT_S": "5"},
     "offline_after_s"),
    ({"WATCHOUT_OFFLINE_CHECK_S": "0"}, "offline_check_s"),
    ({"WATCHOUT_JOB_LEASE_S": "-1"}, "job_lease_s"),
    ({"WATCHOUT_STALE_AFTER_H": "-1"}, "stale_after_h"),
    ({"WATCHOUT_STREAM_RETENTION_D": "-0.5"}, "stream_retention_d"),
    ({"WATCHOUT_ALERT_RETENTION_D": "soon"}, "alert_retention_d"),
    ({"WATCHOUT_REPORT_SCHEDULE": "24:00"}, "report_schedule"),
    ({"WATCHOUT_REPORT_SCHEDULE": "daily"}, "report_schedule"),
    ({"WATCHOUT_REPORT_SCHEDULE": "0 6 * * 9"}, "report_schedule"),
    ({"WATCHOUT_REPORT_SCHEDULE": "61 * * * *"}, "report_schedule"),
])
def test_bad_job_settings_name_the_key(environ, key):
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    assert info.value.key == key


def test_offline_after_s_may_be_anything_positive_when_pings_are_off():
    assert load_settings(None, {"WATCHOUT_WS_PING_INTERVAL_S": "0", "WATCHOUT_WS_PING_TIMEOUT_S": "0",
                                "WATCHOUT_OFFLINE_AFTER_S": "1"}).offline_after_s == 1.0


def test_report_schedule_is_a_daily_time_or_crontab_with_sunday_as_0_or_7():
    assert schedule_fields("06:30") == {"minute": "30", "hour": "6", "day": "*", "month": "*", "day_of_week": "*"}
    assert schedule_fields("0 6 * * 0")["day_of_week"] == schedule_fields("0 6 * * 7")["day_of_week"] == "sun"
    assert schedule_fields("0 6 * * 1-5")["day_of_week"] == "mon-fri"
    assert schedule_fields("*/15 * * * *")["minute"] == "*/15"
