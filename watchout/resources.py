"""How stored alerts and streams look to clients: WebSocket events and REST resources."""
from __future__ import annotations

import datetime as dt
from typing import Any

from watchout.hub import StreamState
from watchout.protocol import StreamStatus


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # a naive time is UTC (both stores hand back aware ones)
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """An alert in REST responses."""
    ack = doc.get("acknowledged")
    return {"alertId": doc["alertId"], "streamId": doc["streamId"], "seq": doc["seq"], "severity": doc["severity"],
            "message": doc["message"], "metadata": doc["metadata"], "timestamp": doc["timestamp"],
            "receivedAt": _iso(doc["receivedAt"]), "senderId": doc.get("senderId"),
            "acknowledged": {"by": ack["by"], "at": _iso(ack["at"])} if ack else None,
            "snapshotUrl": f"/api/alerts/{doc['alertId']}/snapshot.jpg" if doc.get("hasSnapshot") else None}


def stream_resource(doc: dict[str, Any], live: StreamState | None = None, now: float | None = None
                    ) -> dict[str, Any]:
    """A stream in REST responses; with `live`, this node's live figures for it."""
    resource: dict[str, Any] = {
        "streamId": doc["streamId"], "name": doc.get("name", doc["streamId"]), "ownerId": doc["ownerId"],
        "status": (live.status if live is not None and live.producer is not None
                   else doc.get("status", StreamStatus.OFFLINE)),
        "metadata": doc.get("metadata", {}), "createdAt": _iso(doc.get("createdAt")),
        "lastSeenAt": _iso(doc.get("lastSeenAt")), "lastFrameAt": _iso(doc.get("lastFrameAt")),
        "lastSeq": doc.get("lastSeq", 0), "epoch": doc.get("epoch")}
    if now is not None:
        resource["live"] = live_figures(live, now)
    return resource


def live_figures(live: StreamState | None, now: float) -> dict[str, Any]:
    if live is None:
        return {"producerConnected": False, "consumers": 0, "fps": 0.0, "lastFrameAgeMs": None,
                "framesRelayed": 0, "framesDropped": 0}
    return {"producerConnected": live.producer is not None, "consumers": len(live.watchers),
            "fps": round(live.current_fps(now), 1),
            "lastFrameAgeMs": int((now - live.last_frame_at) * 1000) if live.last_frame_at else None,
            "framesRelayed": live.frames_relayed, "framesDropped": live.frames_dropped}


SUMMED = ("totalProducers", "totalVideoConsumers", "totalAlertConsumers", "totalConnections",
          "framesRelayed", "framesDropped")


def cluster_figures(node_id: str, local: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed's /stats figures summed over this node (`local`, live) and the other nodes' latest
    reports (`{"node", "at", "figures"}`), with the union of active streams and one entry per node."""
    nodes = [{"node": node_id, "self": True, **local}]
    nodes += [{"node": o["node"], "reportedAt": o["at"], **o["figures"]} for o in others]
    total: dict[str, Any] = {key: sum(int(n.get(key, 0)) for n in nodes) for key in SUMMED}
    total["activeStreams"] = sorted({s for n in nodes for s in n.get("activeStreams", [])})
    total["node"] = node_id
    total["nodeCount"] = len(nodes)
    total["nodes"] = nodes
    return total


def notification(kind: str, doc: dict[str, Any], base_url: str, now: dt.datetime,
                 summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a webhook receives (the Standard Webhooks payload shape: type, timestamp, data) and what MQTT and
    Web Push carry: `data` is the alert resource with an absolute snapshotUrl, and with `summary` when a
    cooldown held back earlier alerts of the stream (count, firstSeq, lastSeq, highest severity)."""
    data = alert_resource(doc)
    if data["snapshotUrl"] is not None:
        data["snapshotUrl"] = base_url + data["snapshotUrl"]
    if summary is not None:
        data["summary"] = summary
    return {"type": kind, "timestamp": _iso(now), "data": data}


def test_notification(destination_id: str, now: dt.datetime) -> dict[str, Any]:
    """What "send a test notification" sends (type `test`)."""
    return {"type": "test", "timestamp": _iso(now),
            "data": {"message": "A test notification from Watchout", "destinationId": destination_id}}


def delivery_receipt(doc: dict[str, Any]) -> dict[str, Any]:
    """One delivery of an alert, in GET /api/alerts/{id}/deliveries."""
    return {"deliveryId": doc["deliveryId"], "destinationId": doc["destinationId"], "channel": doc["channel"],
            "purpose": doc["purpose"], "state": doc["state"], "attempts": doc["attempts"],
            "createdAt": _iso(doc["createdAt"]), "deliveredAt": _iso(doc.get("deliveredAt")),
            "nextAttemptAt": _iso(doc["nextAt"]) if doc["state"] == "pending" else None,
            "lastError": doc.get("lastError"), "lastStatus": doc.get("lastStatus"),
            "summarisedIn": doc.get("summarisedIn")}


def destination_resource(doc: dict[str, Any]) -> dict[str, Any]:
    """A destination in REST responses: its rules and public settings, never its secrets."""
    config = doc.get("config", {})
    resource = {"id": doc["destinationId"], "channel": doc["channel"], "ownerId": doc["ownerId"],
                "allStreams": doc.get("allStreams", False), "streams": doc.get("streams"),
                "minSeverity": doc.get("minSeverity", "low"), "cooldownS": doc.get("cooldownS", 0),
                "escalate": doc.get("escalate", False), "escalateAfterS": doc.get("escalateAfterS"),
                "createdAt": _iso(doc["createdAt"])}
    if "url" in config:
        resource["url"] = config["url"]
    if "endpoint" in config:
        resource["endpoint"] = config["endpoint"]
    return resource
