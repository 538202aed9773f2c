"""Tornado handlers; ROUTES is the URL table that watchout.cli passes to make_app()."""
from handlers.socket import RelaySocket
from handlers.status import HealthHandler, StatsHandler

ROUTES = [
    (r"/ws", RelaySocket),
    (r"/health", HealthHandler),
    (r"/stats", StatsHandler),
]
