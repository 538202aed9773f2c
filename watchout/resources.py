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
