"""Prometheus metrics: live figures read from the hub at scrape time, plus a few event counters.

Counting on the hot path stays plain integer arithmetic in the hub and outboxes; this module turns
those figures into metric families only when /metrics is scraped. Each Services has its own registry.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from watchout.looplag import INTERVAL_S, LoopLagMonitor
from watchout.protocol import StreamStatus

if TYPE_CHECKING:
    from watchout.hub import Hub
    from watchout.alerts import AlertIntake

ROLES = ("mobile", "dashboard", "ml-service", "unauthenticated")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The metric objects of one service instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.auth_failures = Counter("watchout_auth_failures", "Refused tokens and authentication timeouts",
                                     ["reason"], registry=self.registry)
        self.closes = Counter("watchout_connections_closed", "Closed WebSocket connections by close code",
                              ["code"], registry=self.registry)
        self.alerts_acknowledged = Counter("watchout_alerts_acknowledged", "Alerts acknowledged by operators",
                                           registry=self.registry)
        self.alert_latency = Histogram("watchout_alert_latency_seconds",
                                       "From an alert's arrival to its fan-out (stored and acknowledged first)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.store_latency = Histogram("watchout_store_latency_seconds", "Database operations by operation",
                                       ["operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.job_runs = Counter("watchout_job_runs", "Scheduled job runs by job and result (ok, failed, cancelled, "
                                "lease-lost, skipped: another node ran it)", ["job", "result"], registry=self.registry)
        self.job_failures = Counter("watchout_job_failures", "Scheduled job runs that raised", ["job"],
                                    registry=self.registry)
        self.job_duration = Histogram("watchout_job_duration_seconds", "Duration of scheduled job runs", ["job"],
                                      buckets=JOB_BUCKETS, registry=self.registry)
        self.loop_lag = Histogram("watchout_event_loop_lag_seconds",
                                  f"How late the event loop ran a timer due every {INTERVAL_S:g} s: how long something "
                                  f"(a slow query, a report) held the loop; a stall of d s shows as d - {INTERVAL_S:g} "
                                  "to d", buckets=LOOP_LAG_BUCKETS, registry=self.registry)
        self.deliveries = Counter("watchout_deliveries", "Notification delivery outcomes by channel and result "
                                  "(delivered, retry, failed: given up, gone: the destination is no more, test-ok, "
                                  "test-failed)", ["channel", "result"], registry=self.registry)
        self.deliveries_pending = Gauge("watchout_deliveries_pending", "Notification deliveries not yet delivered "
                                        "nor given up (all nodes; read every 5 s)", registry=self.registry)
        self.deliveries_oldest_pending = Gauge("watchout_deliveries_oldest_pending_seconds",
                                               "Age of the oldest pending notification delivery (0: none)",
                                               registry=self.registry)
        self.loop_lag_max = Gauge("watchout_event_loop_lag_max_seconds",
                                  "The largest watchout_event_loop_lag_seconds of the last 60 to 120 s "
                                  "(a scrape resets nothing)", registry=self.registry)

    def watch(self, hub: Hub, intake: AlertIntake) -> None:
        """Expose the hub's and the alert intake's live figures."""
        self.registry.register(_HubCollector(hub, intake))

    def start_loop_monitor(self) -> LoopLagMonitor:
        """Measure the running loop's lag into loop_lag and loop_lag_max until the monitor's stop()."""
        monitor = LoopLagMonitor(self.loop_lag.observe, INTERVAL_S)
        self.loop_lag_max.set_function(monitor.recent_max_lag)
        monitor.start()
        return monitor

    def observe_job(self, job: str, result: str, seconds: float | None) -> None:
        """A job run's result; its duration unless it did not run here (skipped)."""
        self.job_runs.labels(job, result).inc()
        if result == "failed":
            self.job_failures.labels(job).inc()
        if seconds is not None:
            self.job_duration.labels(job).observe(seconds)

    def observe_store(self, operation: str, seconds: float) -> None:
        self.store_latency.labels(operation).observe(seconds)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (OpenMetrics or the text format)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _HubCollector(Collector):
    def __init__(self, hub: Hub, intake: AlertIntake) -> None:
        self._hub = hub
        self._intake = intake

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = self._hub
        by_role = dict.fromkeys(ROLES, 0)
        for peer in hub.peers.values():
            role = peer.client_type if peer.principal is not None and peer.client_type else "unauthenticated"
            by_role[role] = by_role.get(role, 0) + 1
        connections = GaugeMetricFamily("watchout_connections", "Open WebSocket connections by role",
                                        labels=["role"])
        for role, count in by_role.items():
            connections.add_metric([role], count)
        yield connections
        streams = GaugeMetricFamily("watchout_streams", "Streams live on this node by status", labels=["status"])
        counts = {StreamStatus.ONLINE: 0, StreamStatus.STREAMING: 0}
        for state in hub.streams.values():
            if state.producer is not None and state.status in counts:
                counts[state.status] += 1
        for status, count in counts.items():
            streams.add_metric([status], count)
        yield streams
        figures = hub.figures()
        yield CounterMetricFamily("watchout_frames_received", "Video frames received from producers",
                                  value=hub.frames_in)
        yield CounterMetricFamily("watchout_frames_sent", "Video frames written to consumers",
                                  value=figures["framesRelayed"])
        yield CounterMetricFamily("watchout_frames_dropped", "Video frames dropped for slow consumers",
                                  value=figures["framesDropped"])
        yield CounterMetricFamily("watchout_received_bytes", "WebSocket message bytes received", value=hub.bytes_in)
        yield CounterMetricFamily("watchout_sent_bytes", "WebSocket message bytes queued to consumers",
                                  value=hub.bytes_out_closed + sum(p.outbox.bytes_sent for p in hub.peers.values()))
        yield CounterMetricFamily("watchout_alerts_stored", "Alerts stored (and fanned out)",
                                  value=self._intake.stored)
        yield CounterMetricFamily("watchout_alerts_filled", "Alerts this node read from the store because it "
                                  "missed them live from another node", value=self._intake.sequencer.filled)
        broker = hub.broker
        yield GaugeMetricFamily("watchout_broker_up", "1 while the broker answers (always 1 in-process)",
                                value=1 if broker.healthy else 0)
        yield CounterMetricFamily("watchout_broker_reconnects", "Times the Redis subscription was restored",
                                  value=getattr(broker, "reconnects", 0))
        yield CounterMetricFamily("watchout_broker_frames_dropped", "Frames not sent to other nodes: Redis "
                                  "was behind or away", value=getattr(broker, "frames_dropped", 0))
        yield GaugeMetricFamily("watchout_scrape_timestamp_seconds", "When these figures were read",
                                value=time.time())
