"""Prometheus metrics of queued submission (README "Metrics reference"). Labels are bounded: channels and
clients come from the configuration, outcomes and reasons are fixed codes."""

from __future__ import annotations

import weakref

from prometheus_client import Counter, Gauge

from mediator.metrics import Metrics


class AsyncMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.accepted = Counter(
            "mediator_async_accepted", "Submissions accepted into the queue (202), by channel and client",
            ["channel", "client"], registry=registry)
        self.entries_accepted = Counter(
            "mediator_async_entries_accepted", "Claims queued for delivery (a batch counts its entries)",
            ["channel", "client"], registry=registry)
        self.outcomes = Counter(
            "mediator_async_outcomes", "Queued claims settled, by outcome (delivered, found_existing, refused, "
            "failed, unknown); rate() of it is the drain rate", ["channel", "client", "outcome"], registry=registry)
        self.retries = Counter(
            "mediator_async_retries", "Delivery attempts that will be retried, by reason",
            ["channel", "client", "reason"], registry=registry)
        self.reclaimed = Counter(
            "mediator_async_reclaimed", "Entries taken over from a consumer that stopped heart-beating",
            ["channel", "client"], registry=registry)
        self.depth = Gauge(
            "mediator_async_queue_depth", "Claims accepted and not yet settled (as last seen by this instance)",
            ["channel", "client"], registry=registry)
        self.oldest_age = Gauge(
            "mediator_async_oldest_entry_age_seconds", "Age of the oldest unsettled claim (0: none)",
            ["channel", "client"], registry=registry)
        self.in_flight = Gauge(
            "mediator_async_deliveries_in_flight", "Deliveries this instance is working on (incl. backoff)",
            ["channel"], registry=registry)
        self.store_errors = Counter(
            "mediator_async_store_errors", "Queue operations that failed because Redis did not answer",
            ["operation"], registry=registry)


_BY_METRICS: weakref.WeakKeyDictionary[Metrics, AsyncMetrics] = weakref.WeakKeyDictionary()


def async_metrics(metrics: Metrics) -> AsyncMetrics:
    """One set per Metrics (registry): a reload builds a new service but must not register twice."""
    found = _BY_METRICS.get(metrics)
    if found is None:
        found = _BY_METRICS[metrics] = AsyncMetrics(metrics)
    return found
