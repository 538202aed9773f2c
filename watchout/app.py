"""make_app(): the Tornado Application and HTTP server options, from Settings."""
from __future__ import annotations

from typing import Any

import tornado.web

from watchout.services import Services


def make_app(services: Services, routes: list[Any], default_handler: Any = None) -> tornado.web.Application:
    """The application for `routes` (handlers.ROUTES); handlers get `services` through initialize().

    `default_handler` answers unknown paths (handlers.DEFAULT_HANDLER: a JSON 404).
    """
    s = services.settings
    table = [(path, handler, {"services": services}) for path, handler in routes]
    return tornado.web.Application(
        table,
        default_handler_class=default_handler,
        default_handler_args={"services": services} if default_handler else None,
        websocket_ping_interval=s.ws_ping_interval_s or None,
        websocket_ping_timeout=s.ws_ping_timeout_s or None,
        websocket_max_message_size=s.max_message_bytes,
        trusted_origins=list(s.trusted_origins),
        compress_response=False,
        xheaders=False,
    )


def server_options(services: Services) -> dict[str, Any]:
    """Keyword arguments for tornado.httpserver.HTTPServer: handshake and idle limits."""
    s = services.settings
    return {
        "idle_connection_timeout": s.idle_connection_timeout_s,
        "body_timeout": s.idle_connection_timeout_s,
        "max_body_size": 1024 * 1024,
        "max_header_size": 64 * 1024,
    }
