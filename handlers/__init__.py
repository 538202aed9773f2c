"""Tornado handlers; ROUTES is the URL table that watchout.cli plugs into watchout.serve (make_app())."""
from tornado.web import RequestHandler

from handlers.alerts import AlertAckHandler, AlertsHandler, SnapshotHandler, StreamAlertsHandler
from handlers.base import NotFoundHandler
from handlers.dashboard import DashboardHandler, DashboardRedirectHandler
from handlers.metrics import MetricsHandler
from handlers.notifications import (AlertDeliveriesHandler, PushKeyHandler, PushSubscriptionsHandler, WebhookHandler,
                                    WebhookRotateHandler, WebhooksHandler, WebhookTestHandler)
from handlers.openapi import OpenApiHandler
from handlers.socket import RelaySocket
from handlers.status import HealthHandler, StatsHandler
from handlers.streams import StreamHandler, StreamsHandler

_ID = r"([^/]+)"
Routes = list[tuple[str, type[RequestHandler]]]
ROUTES: Routes = [
    (r"/ws", RelaySocket),
    (r"/health", HealthHandler),
    (r"/stats", StatsHandler),
    (r"/api/streams", StreamsHandler),
    (rf"/api/streams/{_ID}", StreamHandler),
    (rf"/api/streams/{_ID}/alerts", StreamAlertsHandler),
    (r"/api/alerts", AlertsHandler),
    (rf"/api/alerts/{_ID}/ack", AlertAckHandler),
    (rf"/api/alerts/{_ID}/snapshot\.jpg", SnapshotHandler),
    (rf"/api/alerts/{_ID}/deliveries", AlertDeliveriesHandler),
    (r"/api/webhooks", WebhooksHandler),
    (rf"/api/webhooks/{_ID}", WebhookHandler),
    (rf"/api/webhooks/{_ID}/test", WebhookTestHandler),
    (rf"/api/webhooks/{_ID}/rotate-secret", WebhookRotateHandler),
    (r"/api/push/public-key", PushKeyHandler),
    (r"/api/push/subscriptions", PushSubscriptionsHandler),
    (r"/api/openapi\.json", OpenApiHandler),
    (r"/dashboard", DashboardRedirectHandler),
    (r"/dashboard/(.*)", DashboardHandler),
]
METRICS_ROUTES: Routes = [(r"/metrics", MetricsHandler)]  # on the main port, or alone on metrics_port
DEFAULT_HANDLER = NotFoundHandler
