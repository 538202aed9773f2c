"""Reports: per stream and per owner over a period — alerts by severity, acknowledged or not, time online,
frames received, relayed and dropped, top object types; stored, and printed as a table, CSV or JSON."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from watchout.services import Services
from watchout.store import Store
from workers.clock import floor_hour
from workers.progress import Progress
from workers.tables import render

SEVERITIES = ("low", "medium", "high", "critical")
TOP_OBJECT_TYPES = 3
CSV_COLUMNS = ("from", "to", "scope", "id", "ownerId", "alerts", *SEVERITIES, "acknowledged", "unacknowledged",
               "onlineS", "framesReceived", "framesRelayed", "framesDropped", "topObjectTypes")


@dataclass(slots=True)
class Figures:
    """One row: a stream (scope "stream", id = streamId) or an owner (scope "owner", id = ownerId)."""

    scope: str
    id: str
    owner_id: str
    severities: Counter[str] = field(default_factory=Counter)
    acknowledged: int = 0
    unacknowledged: int = 0
    online_s: float = 0.0
    frames_received: int = 0
    frames_relayed: int = 0
    frames_dropped: int = 0
    object_types: Counter[str] = field(default_factory=Counter)

    @property
    def alerts(self) -> int:
        return self.acknowledged + self.unacknowledged

    def add(self, other: Figures) -> None:
        self.severities.update(other.severities)
        self.object_types.update(other.object_types)
        self.acknowledged += other.acknowledged
        self.unacknowledged += other.unacknowledged
        self.online_s += other.online_s
        self.frames_received += other.frames_received
        self.frames_relayed += other.frames_relayed
        self.frames_dropped += other.frames_dropped

    def top_object_types(self) -> list[tuple[str, int]]:
        """The most frequent, ties by name."""
        return sorted(self.object_types.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_OBJECT_TYPES]

    def as_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "id": self.id, "ownerId": self.owner_id, "alerts": self.alerts,
                **{s: self.severities.get(s, 0) for s in SEVERITIES},
                "acknowledged": self.acknowledged, "unacknowledged": self.unacknowledged,
                "onlineS": round(self.online_s, 1), "framesReceived": self.frames_received,
                "framesRelayed": self.frames_relayed, "framesDropped": self.frames_dropped,
                "topObjectTypes": [{"objectType": t, "count": n} for t, n in self.top_object_types()]}


@dataclass(slots=True)
class Report:
    start: dt.datetime
    end: dt.datetime
    streams: list[Figures]
    owners: list[Figures]

    def rows(self) -> list[dict[str, Any]]:
        return [f.as_json() for f in (*self.streams, *self.owners)]

    def summary(self) -> dict[str, Any]:
        return {"from": self.start.isoformat(), "to": self.end.isoformat(), "streams": len(self.streams),
                "owners": len(self.owners), "alerts": sum(f.alerts for f in self.streams)}


async def build_report(store: Store, start: dt.datetime, end: dt.datetime, *, stream_id: str | None = None,
                       owner_id: str | None = None, progress: Progress | None = None) -> Report:
    """The figures of [start, end), of one stream or owner if given.

    Alerts count by `receivedAt`. Time online and frame counts come from the hourly figures that
    check_producers saves per UTC hour: an hour counts when it starts within the period (10:30 to 18:30
    counts the hours from 11:00 to 18:00), and a node that stops loses at most its last offline_check_s.
    """
    streams: dict[str, Figures] = {}

    def row(sid: str, owner: str) -> Figures:
        if sid not in streams:
            streams[sid] = Figures("stream", sid, owner)
        return streams[sid]

    for group in await store.alert_figures(start, end, stream_id, owner_id):
        figures = row(str(group["streamId"]), str(group["ownerId"]))
        count = group["count"]
        figures.severities[str(group["severity"])] += count
        if group["acknowledged"]:
            figures.acknowledged += count
        else:
            figures.unacknowledged += count
        if group["objectType"] is not None:
            figures.object_types[str(group["objectType"])] += count
    if progress is not None:
        progress.step("report: alerts counted, reading hourly figures", 1, 2)
    first_hour = floor_hour(start)
    first_hour = first_hour if first_hour == start else first_hour + dt.timedelta(hours=1)
    for usage in await store.usage_between(first_hour, end, stream_id, owner_id):
        figures = row(str(usage["streamId"]), str(usage["ownerId"]))
        figures.online_s += float(usage.get("onlineS", 0))
        figures.frames_received += int(usage.get("framesIn", 0))
        figures.frames_relayed += int(usage.get("framesRelayed", 0))
        figures.frames_dropped += int(usage.get("framesDropped", 0))
    if progress is not None:
        progress.end()
    owners: dict[str, Figures] = {}
    for figures in streams.values():
        owner = owners.setdefault(figures.owner_id, Figures("owner", figures.owner_id, figures.owner_id))
        owner.add(figures)
    return Report(start, end, sorted(streams.values(), key=lambda f: f.id), sorted(owners.values(), key=lambda f: f.id))


async def store_report(services: Services, start: dt.datetime, end: dt.datetime) -> Report:
    """Build the report of [start, end) and keep it in `reports` (replacing an earlier one of that period)."""
    report = await build_report(services.store, start, end)
    await services.store.save_report(start, end, report.rows())
    return report


# ---------------------------------------------------------------------- formats
def as_json(report: Report) -> str:
    return json.dumps({"from": report.start.isoformat(), "to": report.end.isoformat(),
                       "streams": [f.as_json() for f in report.streams],
                       "owners": [f.as_json() for f in report.owners]}, indent=2)


def as_csv(report: Report) -> str:
    """One row per stream, then one per owner; topObjectTypes as "person:3;car:1"."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows():
        row["topObjectTypes"] = ";".join(f"{t['objectType']}:{t['count']}" for t in row["topObjectTypes"])
        writer.writerow({"from": report.start.isoformat(), "to": report.end.isoformat(), **row})
    return out.getvalue()


def as_table(report: Report) -> str:
    period = f"Report {report.start:%Y-%m-%d %H:%M} to {report.end:%Y-%m-%d %H:%M} UTC"
    if not report.streams:
        return f"{period}\nNo alerts and no producer in this period.\n"
    parts = [period, "", _table("STREAM", report.streams), "", _table("OWNER", report.owners)]
    return "\n".join(parts) + "\n"


def _table(title: str, rows: list[Figures]) -> str:
    header = (title, "ALERTS", "LOW", "MED", "HIGH", "CRIT", "ACKED", "OPEN", "ONLINE", "FRAMES IN", "RELAYED",
              "DROPPED", "TOP OBJECTS")
    lines: list[tuple[str, ...]] = []
    for f in rows:
        top = ", ".join(f"{t} {n}" for t, n in f.top_object_types()) or "-"
        lines.append((f.id, str(f.alerts), *(str(f.severities.get(s, 0)) for s in SEVERITIES), str(f.acknowledged),
                      str(f.unacknowledged), _duration(f.online_s), str(f.frames_received), str(f.frames_relayed),
                      str(f.frames_dropped), top))
    return render(header, lines, align="<" + ">" * (len(header) - 2) + "<")


def _duration(seconds: float) -> str:
    minutes = int(seconds + 30) // 60
    return f"{minutes // 60}h{minutes % 60:02d}m"
