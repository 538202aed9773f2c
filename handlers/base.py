"""ApiHandler: services, optional bearer authentication, and errors as {"error": {"code", "message"}}."""
from __future__ import annotations

from typing import Any

import orjson
import tornado.web

from watchout.auth import Principal
from watchout.errors import WatchoutError
from watchout.services import Services


class ApiHandler(tornado.web.RequestHandler):
    services: Services

    def initialize(self, services: Services) -> None:
        self.services = services

    def bearer_token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def optional_principal(self) -> Principal | None:
        """The caller's verified identity, None without a token; a bad token raises Unauthenticated."""
        token = self.bearer_token()
        return self.services.verifier.verify(token) if token else None

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
            code, message = "http-error", exc.log_message or self._reason
        else:
            code, message = "internal", "internal error"
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({"error": {"code": code, "message": message}}))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, WatchoutError) and e.http_status < 500:
            self.send_error(e.http_status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)
