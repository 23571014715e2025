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

    def record(self, stage: str, decision: Decision) -> None:
        self.decisions.labels(stage, "allow" if decision.allow else "deny", decision.reason).inc()
