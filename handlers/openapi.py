"""GET /api/openapi.json: the OpenAPI 3.1 description of the REST API (handlers/openapi.json)."""
from __future__ import annotations

from pathlib import Path

from handlers.base import ApiHandler

DOCUMENT = Path(__file__).with_name("openapi.json").read_bytes()


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(DOCUMENT)
