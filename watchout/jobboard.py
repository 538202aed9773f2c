"""JobBoard: what this node knows about its scheduled jobs (schedule, next and last run), for /stats."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class JobRun:
    """One finished run. `result`: ok, failed, cancelled, lease-lost, or skipped (another node ran it)."""

    started_at: dt.datetime
    duration_s: float
    result: str
    node: str
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"startedAt": self.started_at.isoformat(), "durationS": round(self.duration_s, 3),
                "result": self.result, "node": self.node, "error": self.error, "summary": self.summary}


@dataclass(slots=True)
class JobEntry:
    name: str
    schedule: str
    scope: str  # "cluster" (one node per firing, under a lease) or "node" (every node, its own connections)
    next_run: dt.datetime | None = None
    running_since: dt.datetime | None = None
    last_run: JobRun | None = None


class JobBoard:
    """Filled by the scheduler (workers.scheduler) and read by /stats; empty when no scheduler runs."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobEntry] = {}

    def view(self) -> list[dict[str, Any]]:
        return [{"name": job.name, "schedule": job.schedule, "scope": job.scope,
                 "nextRun": job.next_run.isoformat() if job.next_run else None,
                 "runningSince": job.running_since.isoformat() if job.running_since else None,
                 "lastRun": job.last_run.as_json() if job.last_run else None}
                for job in self.jobs.values()]
