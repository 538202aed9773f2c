"""docs/grafana-dashboard.json: a well-formed dashboard whose every query names series a real /metrics serves."""
from __future__ import annotations

import json
import re
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import Client, Response, Server, alert_message, frame_message, producer, watcher

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"watchout_[a-z_]+")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL query: the panels' targets and the query variables."""
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len(panels) >= 9
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {ids}"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= grid.keys() and grid["w"] > 0 and grid["h"] > 0, panel["title"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells.get((x, y))} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no targets"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and METRIC.search(target["expr"]), panel["title"]


def test_queries_are_balanced_and_quantiles_read_buckets_by_le() -> None:
    exprs = expressions(load_dashboard())
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert len(quantiles) >= 4  # alert latency p50/p95/p99, store latency p99
    for expr in exprs:
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0 and expr.count("{") == expr.count("}") and expr.count("[") == expr.count("]"), expr
    for expr in quantiles:
        assert re.fullmatch(r"histogram_quantile\(0\.\d+, sum by \(le(, [a-z_]+)*\) \(rate\(watchout_[a-z_]+_bucket"
                            r"\{[^}]*\}\[5m\]\)\)\)", expr), expr


async def test_every_series_the_dashboard_queries_is_served(
        server: Server, ws_connect: Callable[..., Awaitable[Client]], token: Callable[..., str],
        api: Callable[..., Awaitable[Response]]) -> None:
    phone = await producer(ws_connect, token, "cam")
    dash = await watcher(ws_connect, token, "cam")
    ml = await watcher(ws_connect, token, "cam", client_type="ml-service", consumes=["video-frame"],
                       sub="detector", role="service", streams=["cam"])
    for i in range(3):
        await phone.send(frame_message("cam", timestamp=i))
    await dash.recv_type("video-frame")
    await ml.send(alert_message("cam"))
    alert_id = (await ml.recv_type("ack"))["alertId"]
    assert (await api("POST", f"/api/alerts/{alert_id}/ack", token=token("alice"))).status == 200
    refused = await ws_connect()
    await refused.send({"type": "subscribe", "clientType": "dashboard", "streamId": "cam", "token": "garbage"})
    await refused.closed()
    response = await api("GET", "/metrics")
    assert response.status == 200
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)

    exprs = expressions(load_dashboard())
    for expr in exprs:
        names = METRIC.findall(expr)
        for name in names:
            assert name in labels, f"{name} (in {expr}) is not in a /metrics scrape"
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert any(label in labels[name] for name in names), f"no series of {expr} has label {label}"
