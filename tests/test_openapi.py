"""The OpenAPI document at /api/openapi.json: served as written, valid 3.1, and true to the handlers.

Three checks: the document lists exactly the HTTP routes and methods of the main port; a real scenario
(REST, a phone and an ML service on /ws, a database that stops answering) produces every documented
status of every operation, each body valid against its schema; schemathesis fuzzes every operation.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import jsonschema
import referencing
import referencing.jsonschema
import schemathesis
import tornado.httpclient
import tornado.web
import tornado.websocket
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

import handlers
from conftest import JPEG, Client, Server, alert_message, start_server
from watchout.errors import StoreUnavailable
from watchout.settings import Settings
from watchout.store.sqlite import SQLiteStore

DOCUMENT_FILE = Path(handlers.__file__).with_name("openapi.json")
DOCUMENT: dict[str, Any] = json.loads(DOCUMENT_FILE.read_bytes())
DOCUMENT_URI = "urn:watchout:openapi"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
UNLISTED_METHOD = "PUT"  # listed by no path, so every path answers it with 405
STREAM = "porch"
MakeToken = Callable[..., str]  # conftest's token
Connect = Callable[..., Any]  # conftest's ws_connect
FUZZ_EXAMPLES = 25  # per operation and kind of data; the whole fuzz takes about 10 s
FUZZ_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]


# ----------------------------------------------------------------------------- the document and the routes

def route_template(pattern: str, handler: type[tornado.web.RequestHandler], methods: set[str]) -> str:
    """/api/streams/([^/]+)/alerts -> /api/streams/{streamId}/alerts, naming each group after the argument
    the handler's methods take (stream_id -> streamId)."""
    signatures = {tuple(inspect.signature(getattr(handler, m)).parameters)[1:] for m in methods}
    assert len(signatures) == 1, f"{handler.__name__}'s methods disagree on their path arguments"
    names = iter(re.sub(r"_(\w)", lambda m: m.group(1).upper(), arg) for arg in signatures.pop())
    template = re.sub(r"\(\[\^/\]\+\)", lambda _: "{" + next(names) + "}", pattern).replace(r"\.", ".")
    assert next(names, None) is None, f"{pattern}: more handler arguments than groups"
    concrete = re.sub(r"\{\w+\}", "x", template)
    assert re.fullmatch(pattern, concrete) and "\\" not in template, f"cannot map {pattern} to a template"
    return template


def routed_operations() -> dict[str, set[str]]:
    """Each HTTP route of the main port (handlers.ROUTES, and METRICS_ROUTES unless `metrics_port` moves them)
    as an OpenAPI path, with the methods its handler implements."""
    routes: dict[str, set[str]] = {}
    for pattern, handler in handlers.ROUTES + handlers.METRICS_ROUTES:
        if issubclass(handler, tornado.websocket.WebSocketHandler) or handler.__module__ == "handlers.dashboard":
            continue  # /ws is in docs/asyncapi.yaml; /dashboard/ is a web page, not part of the API
        methods = {m for m in METHODS if getattr(handler, m) is not getattr(tornado.web.RequestHandler, m)}
        routes[route_template(pattern, handler, methods)] = methods
    return routes


def resolve(node: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(JSON pointer, object) of a document node that may be a local $ref."""
    pointer = node["$ref"].removeprefix("#")
    target: Any = DOCUMENT
    for part in pointer.strip("/").split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return pointer, target


def documented_responses() -> set[tuple[str, str, int]]:
    return {(path, method, int(status)) for path, item in DOCUMENT["paths"].items()
            for method, operation in item.items() if method in METHODS for status in operation["responses"]}


def path_template(path: str) -> str | None:
    """The documented path a request path (as sent, before the query) falls under, as Tornado matches it."""
    templates: list[str] = list(DOCUMENT["paths"])
    for template in templates:
        if re.fullmatch(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)), path):
            return template
    return None


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


DIALECT = referencing.jsonschema.DRAFT202012  # OpenAPI 3.1's schemas are JSON Schema 2020-12
REGISTRY: referencing.Registry[Any] = referencing.Registry().with_resource(
    DOCUMENT_URI, referencing.Resource.from_contents(DOCUMENT, default_specification=DIALECT))


def check_against_schema(pointer: str, instance: Any) -> None:
    """Validate `instance` against the schema at `pointer` in the document (2020-12, as OpenAPI 3.1 says)."""
    validator = jsonschema.Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=REGISTRY,
                                                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{pointer}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def test_document_is_valid_openapi_31() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    validate(DOCUMENT, cls=OpenAPIV31SpecValidator)
    assert [server["url"] for server in DOCUMENT["servers"]] == ["/"]


async def test_served_document_is_the_file(server: Server) -> None:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(server.url("/api/openapi.json"))
    assert response.headers["Content-Type"] == "application/json"
    assert response.body == DOCUMENT_FILE.read_bytes()


def test_document_lists_exactly_the_routes_and_methods_of_the_handlers() -> None:
    documented = {path: {m for m in item if m in METHODS} for path, item in DOCUMENT["paths"].items()}
    assert documented == routed_operations()
    description = DOCUMENT["info"]["description"]
    assert "`/ws`" in description and "docs/protocol.md" in description and "docs/asyncapi.yaml" in description


def test_document_declares_each_path_parameter_of_its_template() -> None:
    for path, item in DOCUMENT["paths"].items():
        declared = [resolve(p)[1] if "$ref" in p else p for p in item.get("parameters", [])]
        assert [p["name"] for p in declared if p["in"] == "path"] == re.findall(r"\{(\w+)\}", path), path
        for method in (m for m in item if m in METHODS):
            operation_parameters = [resolve(p)[1] if "$ref" in p else p for p in item[method].get("parameters", [])]
            assert all(p["in"] == "query" for p in operation_parameters), (method, path)


def test_only_health_stats_metrics_and_this_document_skip_the_bearer_token() -> None:
    def is_open(operation: dict[str, Any]) -> bool:
        security = operation.get("security", DOCUMENT["security"])
        return security == [] or {} in security

    open_paths = {path for path, item in DOCUMENT["paths"].items()
                  for method, operation in item.items() if method in METHODS and is_open(operation)}
    assert open_paths == {"/health", "/stats", "/metrics", "/api/openapi.json"}
    assert DOCUMENT["security"] == [{"bearerAuth": []}]
    scheme = DOCUMENT["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")


# ----------------------------------------------------------------------------- conformance of a real scenario

@dataclass
class Conformance:
    """Calls the API and checks each response against the document; remembers (path, method, status) seen."""

    seen: set[tuple[str, str, int]] = field(default_factory=set)
    not_allowed: set[str] = field(default_factory=set)  # paths that answered an unlisted method with 405
    http: tornado.httpclient.AsyncHTTPClient = field(default_factory=tornado.httpclient.AsyncHTTPClient)

    async def call(self, server: Server, method: str, path: str, status: int, *, token: str | None = None,
                   body: Any = None, content_type: str = "application/json", accept: str | None = None) -> Any:
        """Send one request, expect `status`, check it against the document; returns the JSON body or bytes."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if accept:
            headers["Accept"] = accept
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        request = tornado.httpclient.HTTPRequest(server.url(path), method=method, headers=headers, body=data,
                                                 allow_nonstandard_methods=True)
        response = await self.http.fetch(request, raise_error=False)
        assert response.code == status, f"{method} {path}: {response.code} {(response.body or b'')[:300]!r}"
        return self.check(method, path.partition("?")[0], response)

    def check(self, method: str, path: str, response: tornado.httpclient.HTTPResponse) -> Any:
        template = path_template(path)
        operation = DOCUMENT["paths"][template].get(method.lower()) if template else None
        if template is None:
            assert response.code == 404, f"{method} {path}: an unknown path answered {response.code}"
            pointer = "/components/responses/NotFound"
        elif operation is None:
            assert response.code == 405, f"{method} {path}: an unlisted method answered {response.code}"
            self.not_allowed.add(template)
            pointer = "/components/responses/MethodNotAllowed"
        else:
            responses = operation["responses"]
            assert str(response.code) in responses, f"{method} {template}: undocumented status {response.code}"
            self.seen.add((template, method.lower(), response.code))
            pointer = f"/paths/{escape(template)}/{method.lower()}/responses/{response.code}"
            if "$ref" in responses[str(response.code)]:
                pointer = resolve(responses[str(response.code)])[0]
        _, documented = resolve({"$ref": "#" + pointer})
        content = documented.get("content", {})
        if not content:
            assert not response.body, f"{method} {path}: {response.code} is documented without a body"
            return None
        media_type = response.headers.get("Content-Type", "").partition(";")[0]
        assert media_type in content, f"{method} {path}: {response.code} came as {media_type!r}, not {list(content)}"
        if media_type != "application/json":
            return response.body
        body = json.loads(response.body)
        check_against_schema(f"{pointer}/content/{escape(media_type)}/schema", body)
        return body


class FailingStore(SQLiteStore):
    """A database that stopped answering: every read and write the REST API makes raises StoreUnavailable."""

    async def ping(self) -> None:
        raise StoreUnavailable("database did not answer")

    async def get_stream(self, stream_id: str) -> dict[str, Any] | None:
        raise StoreUnavailable("could not read stream")

    async def create_stream(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        raise StoreUnavailable("could not create stream")

    async def list_streams(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise StoreUnavailable("could not list streams")

    async def alert_history(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise StoreUnavailable("could not read alerts")

    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        raise StoreUnavailable("could not read alert")

    async def list_destinations(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise StoreUnavailable("could not list destinations")

    async def get_destination(self, destination_id: str) -> dict[str, Any] | None:
        raise StoreUnavailable("could not read destination")

    async def get_value(self, key: str) -> str | None:
        raise StoreUnavailable("could not read a kept value")


async def stream_with_alerts(ws_connect: Connect, token: MakeToken) -> tuple[Client, Client, list[dict[str, Any]]]:
    """A phone streaming STREAM (registered by alice) and an ML service that sent three alerts, the last with a
    snapshot; returns (phone, ml, acks)."""
    phone: Client = await ws_connect()
    await phone.send({"type": "register", "clientType": "mobile", "streamId": STREAM, "token": token("alice")})
    await phone.recv_type("registered")
    ml: Client = await ws_connect()
    await ml.send({"type": "subscribe", "clientType": "ml-service", "streamId": STREAM,
                   "token": token("detector", role="service", streams=[STREAM])})
    await ml.recv_type("subscribed")
    acks = []
    for i, extra in enumerate([{}, {"severity": "critical"}, {"snapshot": base64.b64encode(JPEG).decode()}]):
        await ml.send(alert_message(STREAM, id=f"a{i}", message=f"alert {i}", **extra))
        acks.append(await ml.recv_type("ack", ref=f"a{i}"))
    return phone, ml, acks


async def exercise_registration(api: Conformance, server: Server, token: MakeToken) -> None:
    alice, service, call = token("alice"), token("detector", role="service", streams=[STREAM]), api.call
    assert await call(server, "GET", "/api/streams", 200, token=alice) == {"items": [], "nextCursor": None}
    assert (await call(server, "GET", "/api/alerts", 200, token=alice))["lastSeq"] == {}
    await call(server, "GET", f"/api/streams/{STREAM}/alerts", 404, token=alice)
    created = await call(server, "POST", "/api/streams", 201, token=alice,
                         body={"name": " Porch ", "streamId": STREAM, "metadata": {"site": "home"}})
    assert (created["name"], created["ownerId"], created["metadata"]) == ("Porch", "alice", {"site": "home"})
    assert (await call(server, "POST", "/api/streams", 201, token=alice, body={"name": "Garden"}))["streamId"]
    await call(server, "POST", "/api/streams", 409, token=alice, body={"name": "Again", "streamId": STREAM})
    await call(server, "POST", "/api/streams", 403, token=service, body={"name": "Mine", "streamId": STREAM})
    await call(server, "POST", "/api/streams", 401, body={"name": "Anonymous"})
    for bad in ({"name": " "}, {"name": "x", "streamId": "-x"}, {"name": "x", "owner": "bob"}, [1], b"{",
                {"name": "x", "metadata": {"a\u0000b": 1}}, b'{"name": "\\ud800"}'):
        await call(server, "POST", "/api/streams", 400, token=alice, body=bad)
    await call(server, "POST", "/api/streams", 415, token=alice, body=b"name=x", content_type="text/plain")
    await call(server, "POST", "/api/streams", 413, token=alice, body={"name": "x" * 70_000})


async def exercise_stream_reads(api: Conformance, server: Server, token: MakeToken) -> None:
    alice, admin, call = token("alice"), token("root", role="admin"), api.call
    first = await call(server, "GET", "/api/streams?limit=1", 200, token=alice)
    assert first["nextCursor"] and len(first["items"]) == 1
    await call(server, "GET", f"/api/streams?limit=1&cursor={first['nextCursor']}", 200, token=alice)
    await call(server, "GET", "/api/streams?owner=alice&status=streaming", 200, token=admin)
    await call(server, "GET", "/api/streams?owner=bob", 403, token=alice)
    deep_cursor = base64.urlsafe_b64encode(b"[" * 5000).decode()
    for query in ("limit=0", "limit=501", "limit=%C2%B2", "status=gone", "owner%5B%24ne%5D=x", "limit=1&limit=2",
                  "cursor=nonsense", f"cursor={deep_cursor}"):
        await call(server, "GET", f"/api/streams?{query}", 400, token=alice)
    await call(server, "GET", "/api/streams", 401)
    await call(server, "GET", "/api/streams", 401, token="not-a-jwt")

    live = await call(server, "GET", f"/api/streams/{STREAM}", 200, token=alice)
    assert live["live"]["producerConnected"] is True and live["status"] != "offline"
    await call(server, "GET", f"/api/streams/{STREAM}", 404, token=token("bob"))
    await call(server, "GET", "/api/streams/nowhere", 404, token=alice)
    await call(server, "GET", "/api/streams/-bad", 400, token=alice)
    await call(server, "GET", f"/api/streams/{STREAM}", 401)


async def exercise_alerts(api: Conformance, server: Server, token: MakeToken, acks: list[dict[str, Any]]) -> None:
    alice, call = token("alice"), api.call
    history = f"/api/streams/{STREAM}/alerts"
    page = await call(server, "GET", f"{history}?limit=2", 200, token=alice)
    assert [a["seq"] for a in page["items"]] == [3, 2] and page["lastSeq"] == 3 and page["nextCursor"]
    rest = await call(server, "GET", f"{history}?limit=2&cursor={page['nextCursor']}", 200, token=alice)
    assert [a["seq"] for a in rest["items"]] == [1] and rest["nextCursor"] is None
    filtered = await call(server, "GET", f"{history}?severity=critical,low&severity=medium&acknowledged=false"
                                         "&afterSeq=1&since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00%2B01:00",
                          200, token=alice)
    assert [a["seq"] for a in filtered["items"]] == [2]
    for query in ("afterSeq=-1", "limit=x", "since=yesterday", "since=2000-01-01T00:00:00", "severity=urgent",
                  "since=0001-01-01T00:00:00%2B01:00", "acknowledged=yes", "sort=seq",
                  "since=2001-01-01T00:00:00Z&until=2000-01-01T00:00:00Z",
                  "cursor=" + base64.urlsafe_b64encode(b'{"k":"s","c":"x","i":"y"}').decode().rstrip("=")):
        await call(server, "GET", f"{history}?{query}", 400, token=alice)
    await call(server, "GET", "/api/streams/nowhere/alerts", 404, token=alice)
    await call(server, "GET", "/api/streams/-bad/alerts", 400, token=alice)
    await call(server, "GET", history, 401)

    everything = await call(server, "GET", "/api/alerts?limit=2", 200, token=alice)
    assert everything["lastSeq"] == {STREAM: 3} and everything["nextCursor"]
    await call(server, "GET", f"/api/alerts?limit=2&cursor={everything['nextCursor']}", 200, token=alice)
    await call(server, "GET", "/api/alerts?owner=alice&severity=high", 200, token=token("root", role="admin"))
    await call(server, "GET", "/api/alerts?owner=bob", 403, token=alice)
    for query in ("limit=501", "owner=", "severity=", "until=never", "afterSeq=1.5", "streamId=porch"):
        await call(server, "GET", f"/api/alerts?{query}", 400, token=alice)
    await call(server, "GET", "/api/alerts", 401)

    plain, snapped = acks[0]["alertId"], acks[2]["alertId"]
    acked = await call(server, "POST", f"/api/alerts/{plain}/ack", 200, token=alice, body=b"")
    assert acked["acknowledged"]["by"] == "alice" and acked["snapshotUrl"] is None
    again = await call(server, "POST", f"/api/alerts/{plain}/ack", 200, token=token("root", role="admin"), body={})
    assert again["acknowledged"] == acked["acknowledged"]
    await call(server, "POST", f"/api/alerts/{plain}/ack", 400, token=alice, body={"note": "seen"})
    await call(server, "POST", f"/api/alerts/{plain}/ack", 400, token=alice, body=b"{,}")
    await call(server, "POST", f"/api/alerts/{plain}/ack", 415, token=alice, body=b"{}", content_type="text/json")
    await call(server, "POST", f"/api/alerts/{plain}/ack", 413, token=alice, body={"x": "y" * 70_000})
    await call(server, "POST", f"/api/alerts/{plain}/ack", 404, token=token("bob"))
    await call(server, "POST", "/api/alerts/0123456789abcdef01234567/ack", 404, token=alice)
    await call(server, "POST", f"/api/alerts/{plain}/ack", 401)

    snapshot = f"/api/alerts/{snapped}/snapshot.jpg"
    assert (await call(server, "GET", snapshot, 200, token=alice)) == JPEG
    await call(server, "GET", f"/api/alerts/{plain}/snapshot.jpg", 404, token=alice)
    await call(server, "GET", snapshot, 404, token=token("bob"))
    await call(server, "GET", "/api/alerts/%FF/snapshot.jpg", 400, token=alice)
    await call(server, "GET", snapshot, 401)


async def exercise_notifications(api: Conformance, server: Server, token: MakeToken,
                                 acks: list[dict[str, Any]]) -> None:
    alice, bob, admin, call = token("alice"), token("bob"), token("root", role="admin"), api.call
    service = token("detector", role="service", streams=[STREAM])
    made = await call(server, "POST", "/api/webhooks", 201, token=alice,
                      body={"url": "https://example.com/hook", "streams": [STREAM], "minSeverity": "high",
                            "cooldownS": 30})
    assert made["secret"].startswith("whsec_") and made["allStreams"] is False
    hook = f"/api/webhooks/{made['id']}"
    assert "secret" not in await call(server, "GET", hook, 200, token=alice)
    assert (await call(server, "GET", "/api/webhooks", 200, token=alice))["items"][0]["id"] == made["id"]
    assert (await call(server, "GET", "/api/webhooks?owner=alice", 200, token=admin))["items"]
    await call(server, "GET", "/api/webhooks?owner=bob", 403, token=alice)
    await call(server, "GET", "/api/webhooks?limit=x", 400, token=alice)
    await call(server, "GET", "/api/webhooks", 403, token=service)
    await call(server, "GET", "/api/webhooks", 401)
    for bad in ({"url": "http://127.0.0.1:9/x"}, {"url": "ftp://example.com"}, {}, {"url": "https://e.com", "x": 1},
                {"url": "https://e.com", "minSeverity": "urgent"}, {"url": "https://e.com", "streams": []},
                {"url": "https://e.com", "cooldownS": -1}, {"url": "https://e.com", "escalateAfterS": 5}):
        await call(server, "POST", "/api/webhooks", 400, token=alice, body=bad)
    await call(server, "POST", "/api/webhooks", 403, token=service, body={"url": "https://example.com/h"})
    await call(server, "POST", "/api/webhooks", 401, body={"url": "https://example.com/h"})
    await call(server, "POST", "/api/webhooks", 413, token=alice, body={"url": "x" * 70_000})
    await call(server, "POST", "/api/webhooks", 415, token=alice, body=b"{}", content_type="text/plain")
    for method, suffix in (("GET", ""), ("POST", "/test"), ("POST", "/rotate-secret"), ("DELETE", "")):
        await call(server, method, hook + suffix, 404, token=bob)
        await call(server, method, hook + suffix, 403, token=service)
        await call(server, method, hook + suffix, 401)
    tested = await call(server, "POST", hook + "/test", 200, token=alice)
    assert tested["ok"] is False and tested["error"]  # example.com is out of reach here
    rotated = await call(server, "POST", hook + "/rotate-secret", 200, token=admin)
    assert rotated["secret"] != made["secret"] and rotated["previousSecretValidUntil"]
    receipts = await call(server, "GET", f"/api/alerts/{acks[1]['alertId']}/deliveries", 200, token=alice)
    assert receipts["nextCursor"] is None
    await call(server, "GET", f"/api/alerts/{acks[1]['alertId']}/deliveries", 404, token=bob)
    await call(server, "GET", f"/api/alerts/{acks[1]['alertId']}/deliveries", 401)
    await call(server, "DELETE", hook, 204, token=alice)
    await call(server, "DELETE", hook, 404, token=alice)

    key = await call(server, "GET", "/api/push/public-key", 200, token=alice)
    assert len(base64.urlsafe_b64decode(key["publicKey"] + "==")) == 65
    await call(server, "GET", "/api/push/public-key", 403, token=service)
    await call(server, "GET", "/api/push/public-key", 401)
    subscription = push_subscription()
    pushed = await call(server, "POST", "/api/push/subscriptions", 201, token=alice, body=subscription)
    assert pushed["endpoint"] == subscription["endpoint"] and pushed["ownerId"] == "alice"
    for bad in ({**subscription, "endpoint": "http://127.0.0.1/push"}, {"endpoint": subscription["endpoint"]}, [1]):
        await call(server, "POST", "/api/push/subscriptions", 400, token=alice, body=bad)
    await call(server, "POST", "/api/push/subscriptions", 403, token=service, body=subscription)
    await call(server, "POST", "/api/push/subscriptions", 401, body=subscription)
    await call(server, "POST", "/api/push/subscriptions", 413, token=alice, body={"endpoint": "x" * 70_000})
    await call(server, "POST", "/api/push/subscriptions", 415, token=alice, body=b"{}", content_type="text/plain")
    gone = {"endpoint": subscription["endpoint"]}
    await call(server, "DELETE", "/api/push/subscriptions", 404, token=bob, body=gone)
    await call(server, "DELETE", "/api/push/subscriptions", 400, token=alice, body={"url": "x"})
    await call(server, "DELETE", "/api/push/subscriptions", 403, token=service, body=gone)
    await call(server, "DELETE", "/api/push/subscriptions", 401, body=gone)
    await call(server, "DELETE", "/api/push/subscriptions", 204, token=alice, body=gone)


def push_subscription() -> dict[str, Any]:
    """A browser's PushSubscription JSON, with a real P-256 key, on a public push service's address."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    b64 = lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")  # noqa: E731
    return {"endpoint": "https://push.example.com/send/abc", "expirationTime": None,
            "keys": {"p256dh": b64(point), "auth": b64(os.urandom(16))}}


async def exercise_status_and_methods(api: Conformance, server: Server, token: MakeToken) -> None:
    call = api.call
    spec = await call(server, "GET", "/api/openapi.json", 200)
    assert spec == DOCUMENT
    health = await call(server, "GET", "/health", 200)
    assert health["status"] == "healthy" and "activeStreams" not in health["stats"]
    admin_health = await call(server, "GET", "/health", 200, token=token("root", role="admin"))
    assert admin_health["stats"]["activeStreams"] == [STREAM]
    await call(server, "GET", "/health", 401, token="not-a-jwt")
    assert (await call(server, "GET", "/stats", 200, token=token("alice")))["activeStreamCount"] == 1
    assert "alertsStored" in await call(server, "GET", "/stats", 200, token=token("root", role="admin"))
    await call(server, "GET", "/stats", 401, token=token("alice", ttl_s=-60))
    assert b"watchout_" in await call(server, "GET", "/metrics", 200)
    openmetrics = await call(server, "GET", "/metrics", 200, accept="application/openmetrics-text")
    assert openmetrics.endswith(b"# EOF\n")
    for path in DOCUMENT["paths"]:
        concrete = path.replace("{streamId}", STREAM).replace("{alertId}", "0123456789abcdef01234567")
        concrete = concrete.replace("{destinationId}", "0123456789abcdef01234567")
        await call(server, UNLISTED_METHOD, concrete, 405, token=token("alice"), body={})
    await call(server, "PATCH", f"/api/streams/{STREAM}", 405, token=token("alice"), body={})
    await call(server, "GET", "/api/nothing-here", 404, token=token("alice"))


async def exercise_deletion(api: Conformance, server: Server, token: MakeToken, phone: Client) -> None:
    call, service = api.call, token("detector", role="service", streams=[STREAM])
    await call(server, "DELETE", f"/api/streams/{STREAM}", 403, token=service)
    await call(server, "DELETE", f"/api/streams/{STREAM}", 404, token=token("bob"))
    await call(server, "DELETE", "/api/streams/-bad", 400, token=token("alice"))
    await call(server, "DELETE", f"/api/streams/{STREAM}", 401)
    await call(server, "DELETE", f"/api/streams/{STREAM}", 204, token=token("alice"))
    assert (await phone.closed())[0] == 4410
    await call(server, "GET", f"/api/streams/{STREAM}", 404, token=token("alice"))
    await call(server, "DELETE", f"/api/streams/{STREAM}", 404, token=token("alice"))


async def exercise_store_failure(api: Conformance, settings: Settings, token: MakeToken) -> None:
    store = FailingStore(":memory:")
    await store.start()
    server, close = await start_server(settings, store)
    alice, alert = token("alice"), "0123456789abcdef01234567"
    try:
        assert (await api.call(server, "GET", "/health", 503))["status"] == "degraded"
        await api.call(server, "POST", "/api/streams", 503, token=alice, body={"name": "x"})
        for path in ("/api/streams", f"/api/streams/{STREAM}", f"/api/streams/{STREAM}/alerts", "/api/alerts",
                     f"/api/alerts/{alert}/snapshot.jpg"):
            error = await api.call(server, "GET", path, 503, token=alice)
            assert error["error"]["code"] == "store-unavailable"
        await api.call(server, "DELETE", f"/api/streams/{STREAM}", 503, token=alice)
        await api.call(server, "POST", f"/api/alerts/{alert}/ack", 503, token=alice)
        await api.call(server, "GET", f"/api/alerts/{alert}/deliveries", 503, token=alice)
        await api.call(server, "POST", "/api/webhooks", 503, token=alice, body={"url": "https://example.com/h"})
        await api.call(server, "GET", "/api/webhooks", 503, token=alice)
        for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/test"), ("POST", "/rotate-secret")):
            await api.call(server, method, f"/api/webhooks/{alert}{suffix}", 503, token=alice)
        await api.call(server, "GET", "/api/push/public-key", 503, token=alice)
        await api.call(server, "POST", "/api/push/subscriptions", 503, token=alice, body=push_subscription())
        await api.call(server, "DELETE", "/api/push/subscriptions", 503, token=alice, body={"endpoint": "x"})
    finally:
        await close()


async def test_every_documented_response_occurs_and_matches_its_schema(
        server: Server, settings: Settings, ws_connect: Connect, token: MakeToken) -> None:
    api = Conformance()
    await exercise_registration(api, server, token)
    phone, _, acks = await stream_with_alerts(ws_connect, token)
    await exercise_stream_reads(api, server, token)
    await exercise_alerts(api, server, token, acks)
    await exercise_notifications(api, server, token, acks)
    await exercise_status_and_methods(api, server, token)
    await exercise_deletion(api, server, token, phone)
    await exercise_store_failure(api, settings, token)
    assert api.not_allowed == set(DOCUMENT["paths"])
    missing = documented_responses() - api.seen
    assert not missing, f"documented but never produced: {sorted(missing)}"


# ----------------------------------------------------------------------------- schemathesis

def fuzz(base_url: str, token: str, known: dict[str, str]) -> list[str]:
    """Run schemathesis on every operation (positive and negative data, and the `known` ids); the failures."""
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    headers = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), [result for result in results if isinstance(result, Err)]
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    for operation in sorted(operations, key=lambda op: op.method.lower() == "delete"):  # delete the known ids last
        strategies = [operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode]
        names = [p.name for p in operation.path_parameters]
        if names:
            strategies.append(operation.as_strategy(path_parameters={name: known[name] for name in names}))

        @hypothesis.given(case=st.one_of(strategies))
        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                             phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
        def run(case: schemathesis.Case[Any]) -> None:
            try:
                case.call_and_validate(base_url=base_url, headers=headers, checks=FUZZ_CHECKS, timeout=10)
            except FailureGroup as exc:
                failures.append(str(exc))

        run()
    return failures


async def test_schemathesis_finds_no_server_error_or_undocumented_response(
        server: Server, ws_connect: Connect, token: MakeToken) -> None:
    await Conformance().call(server, "POST", "/api/streams", 201, token=token("alice"),
                             body={"name": "Porch", "streamId": STREAM})
    _, _, acks = await stream_with_alerts(ws_connect, token)
    hook = await Conformance().call(server, "POST", "/api/webhooks", 201, token=token("alice"),
                                    body={"url": "https://example.com/hook"})
    known = {"streamId": STREAM, "alertId": acks[-1]["alertId"], "destinationId": hook["id"]}
    # schemathesis' HTTP client blocks: it runs in a thread while this loop serves the app
    failures = await asyncio.to_thread(fuzz, server.url(""), token("alice"), known)
    assert not failures, f"{len(failures)} failing requests; the first ones:\n\n" + "\n\n".join(failures[:5])
