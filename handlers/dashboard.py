"""The web dashboard: the static files of watchout/dashboard/ at /dashboard/, under a strict Content-Security-Policy."""
from __future__ import annotations

import re
from pathlib import Path

import tornado.web

import watchout
from watchout.services import Services

DASHBOARD_DIR = Path(watchout.__file__).resolve().with_name("dashboard")
# A Host header that may go into the policy as it is: a name or IP address, an optional port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
# The dashboard is one flat directory of plainly named files. Any other path (a NUL byte, `..`, a slash,
# an absolute path, a very long name) is answered 404 before it reaches the file system, which would
# otherwise raise on some of them (a NUL byte: ValueError, a 500 with a traceback).
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
_MAX_FILE_NAME = 100


def content_security_policy(host: str) -> str:
    """Scripts, styles and fonts from the page's origin only (so no inline script can run), WebSocket and
    REST to that host, images from it and from blob:/data: URLs (frames and snapshots), no framing."""
    connect = "'self'"
    if _HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join(["default-src 'none'", "script-src 'self'", "style-src 'self'", f"connect-src {connect}",
                      "img-src 'self' blob: data:", "font-src 'self'", "manifest-src 'self'", "base-uri 'none'",
                      "form-action 'self'", "frame-ancestors 'none'"])


def _set_security_headers(handler: tornado.web.RequestHandler) -> None:
    handler.set_header("Content-Security-Policy", content_security_policy(handler.request.host))
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header("X-Frame-Options", "DENY")


class DashboardHandler(tornado.web.StaticFileHandler):
    """GET /dashboard/{file}: index.html, app.js, watchout-client.js, style.css.

    The page holds no data and needs no token: it signs in from the browser with REST and the WebSocket.
    Files are revalidated on each load (ETag), so an upgrade is picked up at once.
    """

    def initialize(self, path: str = str(DASHBOARD_DIR), default_filename: str | None = "index.html",
                   allowed_symlink_directory: str | list[str] | None = None, *,
                   services: Services | None = None) -> None:
        super().initialize(path, default_filename, allowed_symlink_directory)

    def set_default_headers(self) -> None:
        _set_security_headers(self)  # on every answer, 304 and 404 included

    def parse_url_path(self, url_path: str) -> str:
        """The file name of a request ("" for the index page); raises HTTPError 404 for any other path.

        Tornado has already decoded the path (%2f is a slash here; invalid UTF-8 was answered 400).
        """
        if url_path and (len(url_path) > _MAX_FILE_NAME or not _FILE_NAME.fullmatch(url_path)):
            raise tornado.web.HTTPError(404)
        return url_path

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


class DashboardRedirectHandler(tornado.web.RequestHandler):
    """GET /dashboard -> /dashboard/ (the page's relative links need the slash; a #fragment is kept by browsers)."""

    def initialize(self, services: Services) -> None:
        self.services = services

    def set_default_headers(self) -> None:
        _set_security_headers(self)

    def get(self) -> None:
        self.redirect("/dashboard/", permanent=True)

    def head(self) -> None:
        self.redirect("/dashboard/", permanent=True)
