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
from watchout.deliveries import Deliveries
from watchout.hub import Hub
from watchout.jobboard import JobBoard
from watchout.metrics import Metrics
from watchout.protocol import Limits
from watchout.commands import Commands
from watchout.sequencer import Sequencer
from watchout.settings import Settings
from watchout.store import Store, open_store

log = logging.getLogger("watchout.services")


@dataclass(slots=True)
class Services:
    settings: Settings
    store: Store
    hub: Hub
    verifier: TokenVerifier
    commands: Commands
    limits: Limits
    metrics: Metrics
    deliveries: Deliveries  # started by watchout.serve (not by the admin commands)
    started_at: float = field(default_factory=time.time)
    jobs: JobBoard = field(default_factory=JobBoard)  # the scheduled jobs' state, when a scheduler runs

    @property
    def intake(self) -> AlertIntake:
        return self.commands.intake

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
        self.verifier = self.commands.verifier = verifier


def build_services(settings: Settings, store: Store) -> Services:
    """Wire the core around an open store (tests pass one store to several apps to simulate restarts)."""
    hub = Hub(make_broker(settings))
    metrics = Metrics()
    verifier = TokenVerifier(settings)
    sequencer = Sequencer(store, hub, replay_pace_bytes=settings.outbox_soft_bytes // 2)
    intake = AlertIntake(store, hub, sequencer, hub.broker, on_latency=metrics.alert_latency.observe)
    sink = ClusterSink(hub, sequencer, store)
    hub.broker.attach(sink)
    commands = Commands(store, hub, verifier, intake, sink, sequencer)
    limits = Limits(settings.max_control_message_bytes, settings.max_metadata_bytes, settings.max_snapshot_bytes)
    metrics.watch(hub, intake)
    store.observer = metrics.observe_store
    deliveries = Deliveries(store, settings, metrics, settings.node_name)
    intake.on_stored = deliveries.wake
    hub.on_status = deliveries.stream_status
    return Services(settings, store, hub, verifier, commands, limits, metrics, deliveries)


def make_broker(settings: Settings) -> Broker:
    """RedisBroker when broker_url is set (several nodes), else the in-process MemoryBroker."""
    if not settings.broker_url:
        return MemoryBroker(settings.node_name)
    from watchout.redisbroker import RedisBroker  # redis is needed only with several nodes
    return RedisBroker(settings.broker_url, settings.broker_prefix, settings.node_name, settings.broker_heartbeat_s)


@asynccontextmanager
async def open_services(settings: Settings, store: Store | None = None) -> AsyncIterator[Services]:
    """Open and start the store (unless given), yield Services; on exit finish pending writes.

    A store passed in must be started already, and is left open for its owner.
    """
    own_store = store is None
    if store is None:
        store = open_store(settings)
        await store.start(settings.alert_retention_d)
        log.info("store: %s", store.description)
    services = build_services(settings, store)
    await services.broker.start()
    loop_lag = services.metrics.start_loop_monitor()
    try:
        yield services
    finally:
        await services.deliveries.close()
        loop_lag.stop()
        await services.commands.drain()
        await services.broker.close()
        if own_store:
            store.close()
