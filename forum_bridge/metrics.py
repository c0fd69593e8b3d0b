"""Prometheus metrics of one bridge process, on a registry of its own.

Gauges that describe the licence state (licences, subscribers by state, unmanaged endpoints) are read
at scrape time with count queries (:meth:`BridgeService.counts`, the same rules as the status
document), so they can never drift from what the page and the CLI show, they include changes made by
other processes sharing the database, and a scrape costs about the same with 10 or 10,000
subscribers. Counters and the event-lag histogram are fed as things happen: decisions through the
service's listener hook, the PBX connection state and event lag by the adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forum_bridge.core.rules import Reason
from forum_bridge.dropped_events import REASON_QUEUE_FULL
from forum_bridge.errors import ForumBridgeError
from forum_bridge.service import BridgeService, CallRecord

log = logging.getLogger(__name__)

SUBSCRIBER_STATES = ("logged_on", "logged_off", "logon_failed")
# Which reasons each result can carry (core.rules.decide_call); pre-created so a rate() over a series
# that has not happened yet reads 0 instead of "no data".
ALLOWED_REASONS = (Reason.EMERGENCY, Reason.LICENSED, Reason.LICENCE_ACQUIRED, Reason.UNMANAGED)
DENIED_REASONS = (Reason.LOGON_FAILED, Reason.NOT_LOGGED_ON, Reason.EMERGENCY_ONLY)
# Event lag is the time from the PBX stamping an event to the service applying it: normally
# milliseconds, seconds under load or after a reconnect resync.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    """Reads the licence state at scrape time."""

    def __init__(self, service: BridgeService) -> None:
        self.service = service

    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` yields, without reading the database (used at registration)."""
        for name in (
            "forum_bridge_database_up",
            "forum_bridge_licences_total",
            "forum_bridge_licences_used",
            "forum_bridge_licences_reserved",
            "forum_bridge_licences_free",
            "forum_bridge_subscribers",
            "forum_bridge_unmanaged_endpoints",
        ):
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "forum_bridge_database_up", "1 when the licence state could be read at this scrape, else 0"
        )
        try:
            counts = self.service.counts()
        except ForumBridgeError as exc:
            # A scrape must not fail as a whole when the database is away: the other series
            # (connection state, counters) are what the operator needs to see then.
            log.warning("metrics: cannot read the licence state: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        licences = counts["licences"]
        yield GaugeMetricFamily(
            "forum_bridge_licences_total", "Licences purchased (licences.count)", value=licences["total"]
        )
        yield GaugeMetricFamily(
            "forum_bridge_licences_used", "Licences held by a log-on now", value=licences["used"]
        )
        yield GaugeMetricFamily(
            "forum_bridge_licences_reserved",
            "Log-ons with a reserved licence (the floating pool is total minus these)",
            value=licences["reserved"],
        )
        yield GaugeMetricFamily(
            "forum_bridge_licences_free",
            "Licences a log-on without a reservation can take now",
            value=licences["free"],
        )
        states = GaugeMetricFamily(
            "forum_bridge_subscribers", "Provisioned log-ons by state", labels=["state"]
        )
        for state in SUBSCRIBER_STATES:
            states.add_metric([state], counts["subscribers"].get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "forum_bridge_unmanaged_endpoints",
            "Registered endpoints that are not provisioned log-ons (trunks, other devices)",
            value=counts["unmanaged"],
        )


class _BacklogCollector(Collector):
    """Counts contacts past their keepalive deadline at scrape time (normally none)."""

    def __init__(self, service: BridgeService) -> None:
        self.service = service

    def describe(self) -> Iterator[Metric]:
        """The family :meth:`collect` yields, without reading the database."""
        yield GaugeMetricFamily("forum_bridge_keepalive_overdue", "")

    def collect(self) -> Iterator[Metric]:
        try:
            overdue = self.service.keepalive_backlog()
        except ForumBridgeError:
            return  # forum_bridge_database_up already says so
        yield GaugeMetricFamily(
            "forum_bridge_keepalive_overdue",
            "Contacts of this node past their keepalive deadline that the keepalive clock has not "
            "logged off yet; stays above 0 only when that clock is stuck",
            value=overdue,
        )


class Metrics:
    """The bridge's metrics; registers itself as a decision listener of ``service``."""

    def __init__(self, service: BridgeService, pbx: str) -> None:
        self.pbx = pbx
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(service))
        self.registry.register(_BacklogCollector(service))
        self.decisions = Counter(
            "forum_bridge_decisions",
            "Call decisions by result and reason",
            ["result", "reason"],
            registry=self.registry,
        )
        for reason in ALLOWED_REASONS:
            self.decisions.labels(result="allowed", reason=reason.value)
        for reason in DENIED_REASONS:
            self.decisions.labels(result="denied", reason=reason.value)
        self.connected = Gauge(
            "forum_bridge_pbx_connected",
            "1 while the event connection to the PBX is up, else 0",
            ["pbx"],
            registry=self.registry,
        )
        self.connected.labels(pbx=pbx).set(0)
        self.module_missing = Gauge(
            "forum_bridge_pbx_module_missing",
            "1 when the PBX lacks a module the bridge's dialplan needs, else 0 (checked at each connect)",
            ["pbx", "module"],
            registry=self.registry,
        )
        self.event_lag = Histogram(
            "forum_bridge_event_lag_seconds",
            "Delay between the PBX emitting an event and the bridge applying it",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.decision_errors = Counter(
            "forum_bridge_decision_errors",
            "Calls that could not be decided because the database failed (the fail mode applied)",
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "forum_bridge_events_dropped",
            "PBX events read but dropped before they were applied, by reason (queue_full: more "
            "waiting than the bridge holds; a resync from the PBX's tables follows each time)",
            ["pbx", "reason"],
            registry=self.registry,
        )
        self.events_dropped.labels(pbx=pbx, reason=REASON_QUEUE_FULL)
        service.add_listener(self.record_decision)
        service.add_failure_listener(self.decision_errors.inc)

    def record_decision(self, record: CallRecord) -> None:
        """Count one call decision (the service calls this after every decision)."""
        result = "allowed" if record.decision.allowed else "denied"
        self.decisions.labels(result=result, reason=record.decision.reason.value).inc()

    def count_dropped_events(self, reason: str, count: int) -> None:
        """Count ``count`` PBX events dropped for ``reason`` (the adapters call this)."""
        self.events_dropped.labels(pbx=self.pbx, reason=reason).inc(count)

    def set_connected(self, up: bool) -> None:
        """Note whether the PBX event connection is up."""
        self.connected.labels(pbx=self.pbx).set(1 if up else 0)

    def set_module_missing(self, module: str, missing: bool) -> None:
        """Note whether the PBX lacks ``module`` (the PBX adapter checks after every connect)."""
        self.module_missing.labels(pbx=self.pbx, module=module).set(1 if missing else 0)

    def observe_event_lag(self, seconds: float) -> None:
        """Record how late one event was applied; negative values (clock skew) count as zero."""
        self.event_lag.observe(max(0.0, seconds))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
