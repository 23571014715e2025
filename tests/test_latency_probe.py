"""The latency probe over real HTTP: the openIMIS stand-in (mediator/sandbox) behind a timing injector
that a test can slow down or make fail (openIMIS's slowness cannot be produced on demand), the probe
sent as the mediator's own logged-in user, outside the bulkhead, and its answer times moving the limit."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from mediator.app import METRICS, RUNTIME
from mediator.bulkhead import Bulkhead
from mediator.concurrency_limit import GradientLimit
from mediator.config.models import AdaptiveLimitConfig, BulkheadConfig, LatencyProbeConfig, UpstreamConfig
from mediator.latency_probe import LatencyProbe
from mediator.metrics import Metrics
from mediator.sandbox import OpenImisSandbox, build_sandbox_app
from mediator.upstream import OpenImisUpstream
from tests.conftest import channels_yaml, upstream_url


@dataclass
class Timing:
    delay_s: float = 0.0
    status: int | None = None
    """Answer this status instead of the sandbox's (None: the sandbox answers)."""
    probes: list[str | None] = field(default_factory=list)
    """The Authorization header of every probe that reached the stand-in."""


@pytest.fixture
async def timed_upstream(aiohttp_server):
    timing = Timing()

    @web.middleware
    async def inject(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path.endswith("/login/"):
            return await handler(request)
        if request.headers.get("X-Request-ID") == "latency-probe":
            timing.probes.append(request.headers.get("Authorization"))
        await asyncio.sleep(timing.delay_s)
        if timing.status is not None:
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=timing.status)
        return await handler(request)

    app = build_sandbox_app(OpenImisSandbox())
    app.middlewares.append(inject)
    server = await aiohttp_server(app)
    return timing, upstream_url(server)


def _bulkhead(probe: LatencyProbeConfig, **overrides: object) -> BulkheadConfig:
    return BulkheadConfig(**{"mode": "adaptive", "min_concurrent": 0.25, "initial_concurrent": 2,
                             "max_concurrent": 4, "max_queue": 4,
                             "adaptive": AdaptiveLimitConfig(window_s=0.2, min_samples=3, probe_samples=1,
                                                             latency_probe=probe),
                             **overrides})  # type: ignore[arg-type]


async def _started_upstream(base: str, bulkhead_config: BulkheadConfig) -> OpenImisUpstream:
    upstream = OpenImisUpstream("openimis", UpstreamConfig.model_validate(
        {"base_url": base, "login": {"username_env": "OPENIMIS_USERNAME", "password_env": "OPENIMIS_PASSWORD"},
         "bulkhead": bulkhead_config.model_dump()}), "https://mediator.example.org/fhir/")
    await upstream.start()
    return upstream


async def test_the_probe_goes_outside_the_queue_as_the_logged_in_user_and_feeds_the_baseline(timed_upstream):
    timing, base = timed_upstream
    probe_config = LatencyProbeConfig(interval_s=0.05, timeout_s=1)
    bulkhead_config = _bulkhead(probe_config, max_concurrent=1, initial_concurrent=1, max_queue=0)
    upstream = await _started_upstream(base, bulkhead_config)
    metrics = Metrics()
    bulkhead = Bulkhead("openimis", bulkhead_config, metrics)
    probe = LatencyProbe(upstream, probe_config, bulkhead, metrics)
    try:
        held = await bulkhead.acquire(50)  # the only slot: API requests would be refused now ...
        timing.delay_s = 0.03
        assert await probe.probe_once() is not None  # ... the probe is not one of them
        await bulkhead.release(held)
        assert timing.probes == [timing.probes[0]] and (timing.probes[0] or "").startswith("Bearer ")
        labels = {"upstream": "openimis"}
        baseline = metrics.registry.get_sample_value("mediator_latency_probe_baseline_seconds", labels)
        assert baseline is not None and 0.03 <= baseline < 1
        assert metrics.registry.get_sample_value("mediator_latency_probes_total",
                                                 {**labels, "outcome": "answered"}) == 1
        assert metrics.registry.get_sample_value("mediator_latency_probe_duration_seconds_count", labels) == 1
        assert bulkhead.limit.latency_baseline_s == baseline
    finally:
        await probe.close()
        await bulkhead.close()
        await upstream.close()


async def test_only_answers_with_nothing_of_ours_in_flight_join_the_idle_reference(timed_upstream):
    timing, base = timed_upstream
    probe_config = LatencyProbeConfig(interval_s=0.05, timeout_s=1)
    bulkhead_config = _bulkhead(probe_config, max_concurrent=1, initial_concurrent=1, max_queue=2)
    upstream = await _started_upstream(base, bulkhead_config)
    bulkhead = Bulkhead("openimis", bulkhead_config)
    probe = LatencyProbe(upstream, probe_config, bulkhead)
    limit = bulkhead.limit
    assert isinstance(limit, GradientLimit)
    try:
        timing.delay_s = 0.05
        held = await bulkhead.acquire(50)   # an API request with openIMIS for the whole probe
        await probe.probe_once()
        await bulkhead.release(held)
        assert limit.idle_probe_answers == 0

        async def request_during_the_probe() -> None:   # one taken and given back while the probe is out
            await asyncio.sleep(0.01)
            await bulkhead.release(await bulkhead.acquire(50))

        during = asyncio.create_task(request_during_the_probe())
        await probe.probe_once()
        await during
        assert limit.idle_probe_answers == 0
        await probe.probe_once()   # nothing of ours with openIMIS
        assert limit.idle_probe_answers == 1
    finally:
        await probe.close()
        await bulkhead.close()
        await upstream.close()


async def test_a_timeout_counts_as_timeout_s_and_a_failure_as_no_sample(timed_upstream, caplog):
    timing, base = timed_upstream
    probe_config = LatencyProbeConfig(interval_s=0.05, timeout_s=0.2)
    bulkhead_config = _bulkhead(probe_config)
    upstream = await _started_upstream(base, bulkhead_config)
    metrics = Metrics()
    bulkhead = Bulkhead("openimis", bulkhead_config, metrics)
    probe = LatencyProbe(upstream, probe_config, bulkhead, metrics)
    labels = {"upstream": "openimis"}
    try:
        timing.delay_s = 1.0
        assert await probe.probe_once() == 0.2
        assert metrics.registry.get_sample_value("mediator_latency_probes_total",
                                                 {**labels, "outcome": "timeout"}) == 1
        timing.delay_s, timing.status = 0.0, 500
        with caplog.at_level(logging.WARNING, logger="mediator.latency_probe"):
            assert await probe.probe_once() is None
            assert await probe.probe_once() is None
        assert metrics.registry.get_sample_value("mediator_latency_probes_total",
                                                 {**labels, "outcome": "failed"}) == 2
        failures = [r for r in caplog.records if "latency_probe.failed" in r.getMessage()]
        assert len(failures) == 1 and "status 500" in failures[0].getMessage()  # once per run of failures
        assert metrics.registry.get_sample_value("mediator_latency_probe_duration_seconds_count", labels) == 1
    finally:
        await probe.close()
        await bulkhead.close()
        await upstream.close()


PROBED_BULKHEAD = ("    bulkhead: {mode: adaptive, min_concurrent: 0.25, initial_concurrent: 2, max_concurrent: 4,"
                   " max_queue: 4, adaptive: {window_s: 0.2, min_samples: 3, probe_samples: 1,"
                   " latency_probe: {path: Patient, query: _count=1, interval_s: 0.05, timeout_s: 1,"
                   " tolerance: 1.5}}}\n")


async def test_the_running_mediator_probes_and_a_slow_openimis_lowers_the_limit_without_api_traffic(
        timed_upstream, make_mediator):
    timing, base = timed_upstream
    timing.delay_s = 0.02
    client = await make_mediator(channels_yaml(base).replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n" + PROBED_BULKHEAD))
    runtime = client.server.app[RUNTIME].current
    limit = runtime.protection.guards["openimis"].bulkhead.limit
    assert isinstance(limit, GradientLimit)
    limit.record(0.02, "")  # the minimum-RTT measurement (probe_samples 1) of an API request
    registry = client.server.app[METRICS].registry
    labels = {"upstream": "openimis"}

    async def until(check, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout_s):
            while not check():
                await asyncio.sleep(0.02)

    # No request was sent by anyone: the probe runs by itself, its answers the idle reference (20 of them).
    await until(lambda: len(timing.probes) >= 20)
    assert limit.value == 2  # quick answers, but the limit was never used: no growth
    timing.delay_s = 0.2  # openIMIS is ten times slower (someone else loads it): slower than its reference
    await until(lambda: limit.value == 0.25)
    assert registry.get_sample_value("mediator_concurrency_limit", labels) == 0.25
    baseline = registry.get_sample_value("mediator_latency_probe_baseline_seconds", labels)
    assert baseline is not None and 0.02 <= baseline < 0.2
    await client.close()
    sent = len(timing.probes)
    await asyncio.sleep(0.2)
    assert len(timing.probes) == sent  # stopped with the app
