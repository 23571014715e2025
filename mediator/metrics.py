"""Prometheus metrics, declared in one table. Labels are bounded: no user ids, ids or paths.

One registry per application (not the process-global default) so tests and reloads can build apps freely.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mediator.pipeline import Decision


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class PooledUpstream(Protocol):
    name: str
    in_flight: int
    pool_limit: int


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

    def watch_upstreams(self, upstreams: Callable[[], Mapping[str, PooledUpstream]]) -> None:
        self.registry.register(UpstreamPoolCollector(upstreams))

    def set_worker(self, index: int) -> None:
        self.worker_pid.clear()
        self.worker_pid.labels(str(index)).set(os.getpid())

    def record(self, stage: str, decision: Decision) -> None:
        self.decisions.labels(stage, "allow" if decision.allow else "deny", decision.reason).inc()
