"""REST handlers for streams: register, list, read with live figures, delete."""
from __future__ import annotations

from handlers.base import ApiHandler
from watchout import rest


class StreamsHandler(ApiHandler):
    async def post(self) -> None:
        stream = await rest.register_stream(self.services, self.principal(), self.json_body())
        self.set_header("Location", f"/api/streams/{stream['streamId']}")
        self.write_json(stream, 201)

    async def get(self) -> None:
        self.write_json(await rest.list_streams(self.services, self.principal(), self.query_args()))


class StreamHandler(ApiHandler):
    async def get(self, stream_id: str) -> None:
        self.write_json(await rest.get_stream(self.services, self.principal(), stream_id))

    async def delete(self, stream_id: str) -> None:
        await rest.delete_stream(self.services, self.principal(), stream_id)
        self.set_status(204)
        self.finish()
