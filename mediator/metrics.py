"""Prometheus metrics, declared in one table. Labels are bounded: no user ids, ids or paths.

One registry per application (not the process-global default) so tests and reloads can build apps freely.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mediator.pipeline import Decision

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "mediator_stage_decisions", "Decisions per pipeline stage",
            ["stage", "outcome", "reason"], registry=self.registry)
        self.requests = Counter(
            "mediator_requests", "Requests answered, by channel, status code and final reason",
            ["channel", "status", "reason"], registry=self.registry)
        self.request_seconds = Histogram(
            "mediator_request_duration_seconds", "Time from request received to response ready",
            ["channel"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram(
            "mediator_upstream_duration_seconds", "Time spent waiting for openIMIS",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=self.registry)

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

    def record(self, stage: str, decision: Decision) -> None:
        self.decisions.labels(stage, "allow" if decision.allow else "deny", decision.reason).inc()
