"""The REST API's operations on streams and alert history, with their permission rules.

Visibility is the WebSocket's: a user sees their own streams, a service the streams in its scope,
an admin every stream; a token's `streams` claim narrows all three. What a caller may not see is
reported exactly like what does not exist (NotFound).
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from watchout.auth import Principal, can_watch, check_watch
from watchout.errors import Forbidden, InvalidMessage, NotFound, StreamBusy
from watchout.protocol import (MAX_NESTING, STREAM_STATUSES, CloseCode, check_stream_id, has_unstorable_key,
                               alert_acknowledged_message, is_stream_id, nesting_depth)
from watchout.queries import (check_names, decode_cursor, encode_cursor, is_alert_id, is_seq, is_time,
                              parse_alert_filter, parse_choice, parse_limit, parse_owner)
from watchout.services import Services
from watchout.resources import alert_resource, stream_resource

Args = Mapping[str, Sequence[str]]
MAX_NAME_CHARS = 200
MAX_STREAM_METADATA_BYTES = 4096
_ALERT_QUERY = ("severity", "since", "until", "afterSeq", "acknowledged", "limit", "cursor")


def _scope(p: Principal) -> list[str] | None:
    """The stream ids a token is limited to, None when it is not limited."""
    return None if p.streams is None or "*" in p.streams else list(p.streams)


def _is_encodable(value: Any) -> bool:
    """Whether responses can carry `value` back (protocol.py checks alert metadata the same way)."""
    try:
        orjson.dumps(value, option=orjson.OPT_STRICT_INTEGER)
    except orjson.JSONEncodeError:  # lone surrogates (\ud800), integers past 2**53, nesting past 254 levels
        return False
    return True


# ----------------------------------------------------------------------------- streams

async def register_stream(services: Services, p: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """POST /api/streams: the caller becomes the owner. Raises Forbidden, StreamBusy, InvalidMessage."""
    unknown = sorted(set(body) - {"name", "streamId", "metadata"})
    if unknown:
        raise InvalidMessage(f"unknown field {unknown[0]!r}", code="unknown-field")
    if p.role == "service":
        raise Forbidden("service tokens cannot register streams")
    metadata = body.get("metadata", {})
    if nesting_depth(metadata) > MAX_NESTING:  # the same rule as alert metadata; first: the checks below recurse
        raise InvalidMessage(f"metadata nests deeper than {MAX_NESTING} levels", code="invalid-field")
    if not _is_encodable(body):
        raise InvalidMessage("the body holds a lone surrogate, an integer past 2**53 or nesting past 254 levels",
                             code="invalid-field")
    if has_unstorable_key(body):
        raise InvalidMessage("metadata keys may not contain NUL (\\u0000) or start with $", code="invalid-field")
    name = body.get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_NAME_CHARS:
        raise InvalidMessage(f"name must be a string of 1 to {MAX_NAME_CHARS} characters", code="invalid-field")
    stream_id = body.get("streamId")
    if stream_id is None:
        stream_id = "s-" + secrets.token_hex(8)
    else:
        check_stream_id(stream_id)
    if not isinstance(metadata, dict) or len(repr(metadata)) > MAX_STREAM_METADATA_BYTES:
        raise InvalidMessage(f"metadata must be an object of at most {MAX_STREAM_METADATA_BYTES} bytes",
                             code="invalid-field")
    if not p.in_scope(stream_id):
        raise Forbidden("stream outside this token's scope")
    doc = await services.store.create_stream(stream_id, p.sub, name.strip(), metadata=metadata, exclusive=True)
    if doc is None:
        raise StreamBusy(f"stream {stream_id} already exists", code="stream-exists")
    return stream_resource(doc)


async def list_streams(services: Services, p: Principal, args: Args) -> dict[str, Any]:
    """GET /api/streams: the caller's streams (admin: all, or ?owner=), newest first."""
    check_names(args, ("status", "owner", "limit", "cursor"))
    status = parse_choice(args, "status", STREAM_STATUSES)
    owner = parse_owner(args)
    if owner is not None and not p.is_admin:
        raise Forbidden("only admins may list other users' streams", code="forbidden")
    limit = parse_limit(args)
    position = decode_cursor(args, "s", {"c": is_time, "i": is_stream_id})
    after = (position["c"], position["i"]) if position else None
    if p.role == "service":
        owner_filter, ids = None, _scope(p) if p.streams is not None else []
    else:
        owner_filter, ids = (owner if p.is_admin else p.sub), _scope(p)
    if ids is not None and not ids:
        return {"items": [], "nextCursor": None}
    docs = await services.store.list_streams(owner_filter, status, limit + 1, after, stream_ids=ids)
    now = time.time()
    items = [stream_resource(d, services.hub.streams.get(d["streamId"]), now) for d in docs[:limit]]
    cursor = None
    if len(docs) > limit:
        cursor = encode_cursor({"k": "s", "c": items[-1]["createdAt"], "i": items[-1]["streamId"]})
    return {"items": items, "nextCursor": cursor}


async def _visible_stream(services: Services, p: Principal, stream_id: str) -> dict[str, Any]:
    check_stream_id(stream_id, field="stream id")
    doc = await services.store.get_stream(stream_id)
    check_watch(p, stream_id, doc["ownerId"] if doc else None)
    assert doc is not None
    return doc


async def get_stream(services: Services, p: Principal, stream_id: str) -> dict[str, Any]:
    """GET /api/streams/{id}: the stream with this node's live figures."""
    doc = await _visible_stream(services, p, stream_id)
    return stream_resource(doc, services.hub.streams.get(stream_id), time.time())


async def delete_stream(services: Services, p: Principal, stream_id: str) -> None:
    """DELETE /api/streams/{id}: owner or admin; removes its alerts and closes its sockets (4410)."""
    doc = await _visible_stream(services, p, stream_id)
    if doc["ownerId"] != p.sub and not p.is_admin:
        raise Forbidden("only the owner or an admin may delete a stream")
    services.commands.close_stream(stream_id, CloseCode.STREAM_DELETED, "stream deleted")
    await services.store.delete_stream(stream_id)


# ----------------------------------------------------------------------------- alerts

async def stream_alerts(services: Services, p: Principal, stream_id: str, args: Args) -> dict[str, Any]:
    """GET /api/streams/{id}/alerts: newest first, up to a `lastSeq` pinned by the first page.

    Subscribing with sinceSeq=lastSeq then continues exactly where the history ends.
    """
    check_names(args, _ALERT_QUERY)
    doc = await _visible_stream(services, p, stream_id)
    flt, limit = parse_alert_filter(args), parse_limit(args)
    position = decode_cursor(args, "sa", {"p": is_seq, "s": is_seq, "i": is_stream_id})
    if position is not None and position["i"] != stream_id:
        raise InvalidMessage("query parameter cursor: not a cursor of this stream", code="invalid-query")
    last_seq = position["p"] if position else int(doc.get("lastSeq", 0))
    docs = await services.store.stream_history(stream_id, last_seq, flt, limit + 1,
                                               before_seq=position["s"] if position else None)
    items = [alert_resource(d) for d in docs[:limit]]
    cursor = None
    if len(docs) > limit:
        cursor = encode_cursor({"k": "sa", "p": last_seq, "s": items[-1]["seq"], "i": stream_id})
    return {"items": items, "nextCursor": cursor, "lastSeq": last_seq, "epoch": doc.get("epoch")}


async def all_alerts(services: Services, p: Principal, args: Args) -> dict[str, Any]:
    """GET /api/alerts: alerts of every visible stream, newest received first, with each stream's lastSeq."""
    check_names(args, (*_ALERT_QUERY, "owner"))
    owner = parse_owner(args)
    if owner is not None and not p.is_admin:
        raise Forbidden("only admins may read other users' alerts", code="forbidden")
    flt, limit = parse_alert_filter(args), parse_limit(args)
    position = decode_cursor(args, "a", {"r": is_time, "i": is_alert_id})
    ids = _scope(p)
    if p.role == "service":
        owner_filter = None
        if p.streams is None:
            ids = []
    else:
        owner_filter = owner if p.is_admin else p.sub
    if ids is not None and not ids:
        return {"items": [], "nextCursor": None, "lastSeq": {}, "epoch": {}}
    docs = await services.store.alert_history(ids, owner_filter, flt, limit + 1,
                                              before=(position["r"], position["i"]) if position else None)
    items = [alert_resource(d) for d in docs[:limit]]
    shown = list(dict.fromkeys(item["streamId"] for item in items))
    streams = await services.store.list_streams(None, None, len(shown), stream_ids=shown) if shown else []
    known = {stream["streamId"]: stream for stream in streams}
    last_seqs = {sid: int(known[sid].get("lastSeq", 0)) if sid in known else 0 for sid in shown}
    epochs = {sid: known[sid].get("epoch") for sid in shown if sid in known}
    cursor = None
    if len(docs) > limit:
        cursor = encode_cursor({"k": "a", "r": items[-1]["receivedAt"], "i": items[-1]["alertId"]})
    return {"items": items, "nextCursor": cursor, "lastSeq": last_seqs, "epoch": epochs}


async def _visible_alert(services: Services, p: Principal, alert_id: str) -> dict[str, Any]:
    doc = await services.store.get_alert(alert_id)
    if doc is None or not can_watch(p, doc["streamId"], doc["ownerId"]):
        raise NotFound(f"alert {alert_id[:40]} not found")
    return doc


async def acknowledge(services: Services, p: Principal, alert_id: str) -> dict[str, Any]:
    """POST /api/alerts/{id}/ack: the first acknowledgement is kept; the stream's watchers hear of it."""
    before = await _visible_alert(services, p, alert_id)
    doc = await services.store.acknowledge_alert(alert_id, p.sub)
    if doc is None:  # pragma: no cover - deleted between the two calls
        raise NotFound(f"alert {alert_id} not found")
    if before.get("acknowledged") is None:
        services.metrics.alerts_acknowledged.inc()
    services.hub.publish_to_watchers(doc["streamId"], alert_acknowledged_message(doc))
    return alert_resource(doc)


async def snapshot(services: Services, p: Principal, alert_id: str) -> bytes:
    """GET /api/alerts/{id}/snapshot.jpg: the JPEG stored with the alert."""
    await _visible_alert(services, p, alert_id)
    found = await services.store.get_snapshot(alert_id)
    if found is None:
        raise NotFound(f"alert {alert_id} has no snapshot")
    return found[1]
