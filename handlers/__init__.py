"""Tornado handlers; ROUTES is the URL table that watchout.cli passes to make_app()."""
from handlers.alerts import AlertAckHandler, AlertsHandler, SnapshotHandler, StreamAlertsHandler
from handlers.base import NotFoundHandler
from handlers.openapi import OpenApiHandler
from handlers.socket import RelaySocket
from handlers.status import HealthHandler, StatsHandler
from handlers.streams import StreamHandler, StreamsHandler

_ID = r"([^/]+)"
ROUTES = [
    (r"/ws", RelaySocket),
    (r"/health", HealthHandler),
    (r"/stats", StatsHandler),
    (r"/api/streams", StreamsHandler),
    (rf"/api/streams/{_ID}", StreamHandler),
    (rf"/api/streams/{_ID}/alerts", StreamAlertsHandler),
    (r"/api/alerts", AlertsHandler),
    (rf"/api/alerts/{_ID}/ack", AlertAckHandler),
    (rf"/api/alerts/{_ID}/snapshot\.jpg", SnapshotHandler),
    (r"/api/openapi\.json", OpenApiHandler),
]
DEFAULT_HANDLER = NotFoundHandler
