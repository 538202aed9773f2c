"""ApiHandler: services, optional bearer authentication, and errors as {"error": {"code", "message"}}."""
from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import orjson
import tornado.web

from watchout.auth import Principal
from watchout.errors import InvalidMessage, ReplyError, StoreUnavailable, TooLarge, Unauthenticated, WatchoutError
from watchout.protocol import loads_object
from watchout.services import Services

log = logging.getLogger("watchout.api")
MAX_BODY_BYTES = 64 * 1024


class UnsupportedMediaType(ReplyError):
    code = "unsupported-media-type"
    http_status = 415


@tornado.web.stream_request_body
class ApiHandler(tornado.web.RequestHandler):
    """Bodies are read as they arrive, so an oversized one gets 413 before it is read (a body past the
    server's max_body_size would otherwise get Tornado's bare 400 and a closed connection)."""

    services: Services
    _log_user: str | None = None  # the verified caller, for log lines

    def initialize(self, services: Services) -> None:
        self.services = services
        self._body = bytearray()
        self._body_too_large = False

    def prepare(self) -> None:
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise TooLarge(f"the body may be at most {MAX_BODY_BYTES} bytes", code="too-large")

    def data_received(self, chunk: bytes) -> None:
        if len(self._body) + len(chunk) > MAX_BODY_BYTES:
            self._body_too_large = True  # keep reading, keep nothing; json_body() answers 413
            return
        self._body += chunk

    def principal(self) -> Principal:
        """The caller's verified identity; raises Unauthenticated (401) without a valid bearer token."""
        token = self.bearer_token()
        try:
            if token is None:
                raise Unauthenticated("send Authorization: Bearer <token>", code="token-missing")
            principal = self.services.verifier.verify(token)
        except Unauthenticated as exc:
            self.services.metrics.auth_failures.labels(exc.code).inc()
            raise
        self._log_user = principal.sub
        return principal

    def json_body(self, *, optional: bool = False) -> dict[str, Any]:
        """The request's JSON object: 415 for another media type, 413 past 64 KiB, 400 when invalid."""
        if self._body_too_large:
            raise TooLarge(f"the body may be at most {MAX_BODY_BYTES} bytes", code="too-large")
        body = bytes(self._body)
        if not body and optional:
            return {}
        media_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise UnsupportedMediaType("send the body as application/json")
        try:
            return loads_object(body)
        except InvalidMessage as exc:
            raise InvalidMessage(f"invalid JSON body: {exc.message}", code="invalid-json") from None

    def query_args(self) -> dict[str, list[str]]:
        return {name: [v.decode("utf-8", "replace") for v in values]
                for name, values in self.request.query_arguments.items()}

    def bearer_token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def optional_principal(self) -> Principal | None:
        """The caller's verified identity, None without a token; a bad token raises Unauthenticated."""
        token = self.bearer_token()
        principal = self.services.verifier.verify(token) if token else None
        self._log_user = principal.sub if principal is not None else None
        return principal

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, WatchoutError):
            code, message = exc.code, exc.message
        elif isinstance(exc, tornado.web.HTTPError):
            code = {404: "not-found", 405: "method-not-allowed"}.get(status_code, "http-error")
            message = exc.log_message or self._reason
        else:
            code, message = "internal", "internal error"
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"error": {"code": code, "message": message}}))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, WatchoutError) and (e.http_status < 500 or isinstance(e, StoreUnavailable)):
            self.send_error(e.http_status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """An unexpected exception: one record with its traceback (Tornado's own adds a line with the request)."""
        if isinstance(value, tornado.web.HTTPError) or value is None:
            super().log_exception(typ, value, tb)
            return
        extra = {"user": self._log_user} if self._log_user is not None else {}
        log.error("unexpected error: %s", self._request_summary(), exc_info=value, extra=extra)


class NotFoundHandler(ApiHandler):
    """Every unknown path: a JSON 404 in the API's error shape."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, "no such resource")
