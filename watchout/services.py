"""Services: everything the handlers and jobs need, opened and closed together."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from watchout.alerts import AlertIntake
from watchout.auth import TokenVerifier
from watchout.broker import Broker, MemoryBroker
from watchout.cluster import ClusterSink
from watchout.feed import AlertFeed
from watchout.hub import Hub
from watchout.jobboard import JobBoard
from watchout.metrics import Metrics
from watchout.protocol import Limits
from watchout.relay import Relay
from watchout.settings import Settings
from watchout.store import Store

log = logging.getLogger("watchout.services")


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    hub: Hub
    verifier: TokenVerifier
    relay: Relay
    limits: Limits
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    jobs: JobBoard = field(default_factory=JobBoard)  # the scheduled jobs' state, when a scheduler runs

    @property
    def intake(self) -> AlertIntake:
        return self.relay.intake

    @property
    def broker(self) -> Broker:
        return self.hub.broker

    def replace_verifier(self, settings: Settings) -> None:
        """Check new tokens with settings' JWT key and claims from now on (SIGHUP: key rotation).

        Connections already authenticated keep their principals. Raises ConfigError or OSError
        (an unreadable key file) before anything is replaced.
        """
        verifier = TokenVerifier(settings)
        self.settings = settings
        self.verifier = self.relay.verifier = verifier


def build_services(settings: Settings, store: Store) -> Services:
    """Wire the core around an open store (tests pass one store to several apps to simulate restarts)."""
    hub = Hub(make_broker(settings))
    metrics = Metrics()
    verifier = TokenVerifier(settings)
    feed = AlertFeed(store, hub)
    intake = AlertIntake(store, hub, feed, hub.broker, on_latency=metrics.alert_latency.observe)
    sink = ClusterSink(hub, feed, store)
    hub.broker.attach(sink)
    relay = Relay(store, hub, verifier, intake, sink, replay_pace_bytes=settings.outbox_soft_bytes // 2)
    limits = Limits(settings.max_control_message_bytes, settings.max_metadata_bytes, settings.max_snapshot_bytes)
    metrics.watch(hub, intake)
    store.observer = metrics.observe_store
    return Services(settings, store, hub, verifier, relay, limits, metrics)


def make_broker(settings: Settings) -> Broker:
    """RedisBroker when broker_url is set (several nodes), else the in-process MemoryBroker."""
    if not settings.broker_url:
        return MemoryBroker(settings.node_name)
    from watchout.redisbroker import RedisBroker  # redis is needed only with several nodes
    return RedisBroker(settings.broker_url, settings.broker_prefix, settings.node_name, settings.broker_heartbeat_s)


@asynccontextmanager
async def open_services(settings: Settings, store: Store | None = None) -> AsyncIterator[Services]:
    """Open the store (unless given), create indexes, yield Services; on exit finish pending writes.

    A store passed in is left open for its owner.
    """
    own_store = store is None
    if store is None:
        store = Store.open(settings)
        if store.is_embedded:
            log.warning("using the embedded in-process store: nothing is kept when the process stops "
                        "(set mongo_url to keep data in MongoDB)")
    await store.ensure_indexes()
    await store.ensure_job_indexes(settings.alert_retention_d)
    services = build_services(settings, store)
    await services.broker.start()
    try:
        yield services
    finally:
        await services.relay.drain()
        await services.broker.close()
        if own_store:
            store.close()
