"""The alert promise under churn (issue 12): 5,000 alerts with ids while three watchers lose their connection
every 1-3 s, a REST reader pages the history, the stream is deleted and registered again half-way and the
server is killed with SIGKILL; every id is acked once, stored once, and every watcher ends with the stored list.
The harness is bench/churn.py, which runs it with 100,000 alerts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.churn import run_churn  # noqa: E402


@pytest.mark.timeout(120)
async def test_every_alert_is_acked_once_stored_once_and_seen_by_every_watcher_through_churn(tmp_path):
    figures = await run_churn(tmp_path / "data", alerts=5000, rate_per_s=250.0, watchers=3)
    print("\n" + figures.report())
    assert not figures.problems
    assert figures.alerts_sent == figures.acked_ids == 5000
    assert figures.stored == 2500  # the second half: the first went with the deleted history
    assert all(resets >= 1 for resets in figures.watcher_resets)  # each watcher crossed into the new history
    assert all(reconnects >= 3 for reconnects in figures.watcher_reconnects)
    assert figures.rest_passes > 0 and figures.ml_connects >= 2  # and the ML service lived through the kill
