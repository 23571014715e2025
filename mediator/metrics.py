"""Prometheus metrics, declared in one table. Labels are bounded: no user ids, ids or paths.

One registry per application (not the process-global default) so tests and reloads can build apps freely.
"""

from __future__ import annotations

import os
import platform
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mediator.pipeline import Decision


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class PooledUpstream(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def pool_limit(self) -> int: ...


class UpstreamPoolCollector(Collector):
    """Upstream pool state read at scrape time from whatever runtime is current (it changes on reload)."""

    def __init__(self, upstreams: Callable[[], Mapping[str, PooledUpstream]]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("mediator_upstream_in_flight",
                                      "Requests to the upstream in flight (each holds one pooled connection)",
                                      labels=["upstream"])
        limit = GaugeMetricFamily("mediator_upstream_pool_limit", "Connection pool size of the upstream",
                                  labels=["upstream"])
        for name, upstream in sorted(self._upstreams().items()):
            in_flight.add_metric([name], upstream.in_flight)
            limit.add_metric([name], upstream.pool_limit)
        yield in_flight
        yield limit


class LabelChildren:
    """`metric.labels(*values)` remembered per label tuple: the hot path (every request, every stage)
    then costs one dict lookup instead of prometheus-client's validation, lock and lookup. Same children,
    same bound: label values here are bounded by design (see module doc), and prometheus-client keeps
    every child it made anyway. Only for metrics that are never `clear()`ed or `remove()`d."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class DecisionCounts(Collector):
    """`mediator_stage_decisions_total` (and `_created`), counted in plain integers: every request records
    a decision per stage (a dozen), and prometheus-client's Counter.inc (validation, a lock) cost ~1 µs
    each (bench, issue 18). Exposed as the same counter family at scrape time. Counted and read on the
    event loop only (stages and the token endpoint record, the metrics listener reads)."""

    NAME = "mediator_stage_decisions"
    DOCUMENTATION = "Decisions per pipeline stage"
    LABELS = ("stage", "outcome", "reason")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], list[float]] = {}
        """labels → [count, created]"""

    def inc(self, stage: str, outcome: str, reason: str) -> None:
        entry = self._counts.get((stage, outcome, reason))
        if entry is None:
            entry = self._counts[(stage, outcome, reason)] = [0, time.time()]
        entry[0] += 1

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.NAME, self.DOCUMENTATION, labels=self.LABELS)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.DOCUMENTATION, labels=self.LABELS)
        for labels, (count, created) in list(self._counts.items()):
            family.add_metric(labels, float(count), created=created)
        yield family


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = DecisionCounts()
        self.registry.register(self.decisions)
        self.requests = Counter(
            "mediator_requests", "Requests answered, by channel, status code and final reason",
            ["channel", "status", "reason"], registry=self.registry)
        self.request_seconds = Histogram(
            "mediator_request_duration_seconds", "Time from request received to response ready",
            ["channel"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram(
            "mediator_upstream_duration_seconds", "Time spent waiting for openIMIS",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=self.registry)
        # Per-request children, looked up once per label tuple (LabelChildren).
        self.request_children = LabelChildren(self.requests)
        self.request_seconds_children = LabelChildren(self.request_seconds)
        self.upstream_seconds_children = LabelChildren(self.upstream_seconds)

        # Operations (README "Operations"): reloads, build, worker identity, process, upstream pools.
        self.config_reloads = Counter(
            "mediator_config_reloads", "Configuration reloads, by outcome (success/failure) and trigger",
            ["outcome", "trigger"], registry=self.registry)
        self.config_last_reload_success = Gauge(
            "mediator_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (start or last successful reload)", registry=self.registry)
        self.config_last_reload_success.set_to_current_time()
        self.build = Info("mediator_build", "Versions of the running mediator", registry=self.registry)
        self.build.info({"version": _package_version("openimis-mediator"),
                         "python": platform.python_version(), "aiohttp": _package_version("aiohttp")})
        self.worker_pid = Gauge("mediator_worker_pid", "Process id of this worker (serve --workers N)",
                                ["worker"], registry=self.registry)
        self.worker_pid.labels("0").set(os.getpid())
        ProcessCollector(registry=self.registry)
        # Load protection (README "Load protection").
        self.rate_limit_rejections = Counter(
            "mediator_rate_limit_rejections", "Requests refused with 429, by limit name and channel",
            ["limit", "channel"], registry=self.registry)
        self.store_errors = Counter(
            "mediator_store_errors", "Shared-store (Redis) errors, by feature and the declared fail mode applied",
            ["feature", "on_store_error"], registry=self.registry)
        self.bulkhead_in_flight = Gauge(
            "mediator_bulkhead_in_flight", "Requests in flight to the upstream", ["upstream"],
            registry=self.registry)
        self.bulkhead_queued = Gauge(
            "mediator_bulkhead_queued", "Requests waiting for an upstream slot", ["upstream"],
            registry=self.registry)
        self.bulkhead_rejections = Counter(
            "mediator_bulkhead_rejections", "Requests refused by the bulkhead (503), by reason",
            ["upstream", "reason"], registry=self.registry)
        self.concurrency_limit = Gauge(
            "mediator_concurrency_limit", "Requests that may be in flight to the upstream now (adaptive or static)",
            ["upstream"], registry=self.registry)
        self.upstream_min_rtt = Gauge(
            "mediator_upstream_min_rtt_seconds", "Unloaded answer time of the upstream, as last measured (adaptive)",
            ["upstream"], registry=self.registry)
        self.latency_probes = Counter(
            "mediator_latency_probes", "Latency probes sent to the upstream, by outcome (answered, timeout, failed)",
            ["upstream", "outcome"], registry=self.registry)
        self.latency_probe_seconds = Histogram(
            "mediator_latency_probe_duration_seconds", "Answer time of the latency probe (a timeout: its timeout_s)",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency_probe_baseline = Gauge(
            "mediator_latency_probe_baseline_seconds",
            "The latency probe's baseline: its answers' percentile with no API request in flight", ["upstream"],
            registry=self.registry)
        self.circuit_state = Gauge(
            "mediator_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["upstream"],
            registry=self.registry)
        self.circuit_transitions = Counter(
            "mediator_circuit_transitions", "Circuit breaker state changes, by new state",
            ["upstream", "state"], registry=self.registry)
        self.idempotent_replays = Counter(
            "mediator_idempotent_replays", "Repeated creates answered from the first answer", ["channel"],
            registry=self.registry)
        self.batch_entries = Counter(
            "mediator_batch_entries", "Batch Bundle entries, by channel and entry status code",
            ["channel", "status"], registry=self.registry)
        self.audit_records_dropped = Counter(
            "mediator_audit_records_dropped", "Request records (audit event + access line) dropped because "
            "server.audit.max_pending were already waiting for the writer", registry=self.registry)
        # Master-data replica (mediator/replica). `type` is a replicated resource type (bounded by the policy).
        self.replica_items = Gauge(
            "mediator_replica_items", "Resources in the master-data replica, per type",
            ["type"], registry=self.registry)
        self.replica_last_sync = Gauge(
            "mediator_replica_last_sync_timestamp_seconds", "End of the last successful replica sync (epoch)",
            registry=self.registry)
        self.replica_lag = Gauge(
            "mediator_replica_sync_lag_seconds", "Seconds since the last successful replica sync",
            registry=self.registry)
        self.replica_syncs = Counter(
            "mediator_replica_syncs", "Replica syncs completed, by kind (full/incremental)",
            ["kind"], registry=self.registry)
        self.replica_sync_errors = Counter(
            "mediator_replica_sync_errors", "Replica syncs that failed (the last good data is kept)",
            ["kind"], registry=self.registry)
        self.replica_requests = Counter(
            "mediator_replica_requests", "Requests answered from the replica, by type and outcome "
            "(hit, not_modified, not_found, invalid, fallback, unavailable)",
            ["type", "outcome"], registry=self.registry)

    def watch_upstreams(self, upstreams: Callable[[], Mapping[str, PooledUpstream]]) -> None:
        self.registry.register(UpstreamPoolCollector(upstreams))

    def set_worker(self, index: int) -> None:
        self.worker_pid.clear()
        self.worker_pid.labels(str(index)).set(os.getpid())

    def record(self, stage: str, decision: Decision) -> None:
        self.decisions.inc(stage, "allow" if decision.allow else "deny", decision.reason)


class AuthorizationMetrics:
    """The authorization stage's counters (STYLE rule 11; every metric is declared in this module). One per
    registry: reloads reuse it."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, AuthorizationMetrics] = \
        weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.shadow = Counter("mediator_authorization_shadow", "Shadow rules that decided a request "
                              "(evaluated and logged, not enforced)", ["rule", "outcome", "enforced"],
                              registry=registry)
        self.dropped = Counter("mediator_authorization_dropped_entries", "Search result entries "
                               "removed because they belong to another health facility",
                               ["resource_type", "shadow"], registry=registry)
        self.lookups = Counter("mediator_authorization_index_requests", "Claim-index (openIMIS GraphQL) "
                               "requests: owner lookups, page indexes, shadow owner batches",
                               ["kind", "outcome"], registry=registry)
        self.search_pages = Counter("mediator_authorization_search_pages", "Facility-scoped search pages "
                                    "served by the mediator", ["resource_type", "outcome"], registry=registry)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> AuthorizationMetrics:
        if registry is None:
            return cls(None)
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]
