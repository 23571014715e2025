"""The latency probe: how slow openIMIS is for its web users now, measured by the mediator itself.

Every `interval_s` one cheap read (`adaptive.latency_probe`: by default `GET Patient?_count=1`, the
kind of insuree search the web app does, without side effects) goes to openIMIS as the mediator's own
user (`OpenImisUpstream.call`: the same login and re-login rule as forwarded requests), **outside the
bulkhead**: it must not wait in the mediator's queue, it measures openIMIS's — a free sync worker, the
host's CPU and the database, exactly what a web user's request meets. Its answer time feeds the
adaptive limit (`Bulkhead.record_latency_probe`, README "Load protection"), which compares it with a
learned baseline and lowers the limit of every kind of request when openIMIS is slow. The baseline is
learnt from the probes answered while no request of this instance was with openIMIS (`idle`: nothing in
flight when it was sent and no slot taken or freed until its answer).

One probe at a time: a probe still out when the next is due delays it (a queue at openIMIS is never
deepened by probes). A timeout counts as an answer of `timeout_s` (the strongest sign of a queue); a
connection error or an answer other than 200 is no latency sample (the breaker and readiness deal with
a failing openIMIS) and is counted under its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mediator.bulkhead import Bulkhead
from mediator.config.models import LatencyProbeConfig
from mediator.fhir import PLAIN_JSON
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.upstream import OpenImisUpstream, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("mediator.latency_probe")

OUTCOMES = ("answered", "timeout", "failed")


class LatencyProbe:
    """The probe of one upstream, feeding its bulkhead's limit. `start` in a running loop, `close` once."""

    def __init__(self, upstream: OpenImisUpstream, config: LatencyProbeConfig, bulkhead: Bulkhead,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.config = config
        self.bulkhead = bulkhead
        self.url = upstream.upstream_url(config.path, config.query)
        self.answered = 0
        """Probes answered 200 (a counter for tests)."""
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._outcomes: dict[str, Any] = {}
        self._seconds: Any = None
        self._baseline: Any = None
        if metrics is not None:
            self._outcomes = {o: metrics.latency_probes.labels(upstream.name, o) for o in OUTCOMES}
            self._seconds = metrics.latency_probe_seconds.labels(upstream.name)
            self._baseline = metrics.latency_probe_baseline.labels(upstream.name)
        self._failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            started = self._clock()
            await self.probe_once()
            await asyncio.sleep(max(0.0, self.config.interval_s - (self._clock() - started)))

    async def probe_once(self) -> float | None:
        """Send one probe; its answer time as fed to the limit (None: no sample)."""
        headers = {"Accept": PLAIN_JSON, "X-Request-ID": "latency-probe"}
        mark = self.bulkhead.idle_mark()
        started = self._clock()
        try:
            reply = await self.upstream.call("GET", self.url, headers, None, self.config.timeout_s)
        except UpstreamTimeout:
            return self._sample(self.config.timeout_s, "timeout", self.bulkhead.idle_since(mark))
        except UpstreamUnavailable as exc:
            self._failed(f"{type(exc).__name__}")
            return None
        if reply.status != 200:
            self._failed(f"status {reply.status}")
            return None
        self.answered += 1
        return self._sample(self._clock() - started, "answered", self.bulkhead.idle_since(mark))

    def _sample(self, rtt_s: float, outcome: str, idle: bool) -> float:
        self._failing = False
        self.bulkhead.record_latency_probe(rtt_s, idle)
        if self._outcomes:
            self._outcomes[outcome].inc()
            self._seconds.observe(rtt_s)
            baseline = self.bulkhead.limit.latency_baseline_s
            if baseline is not None:
                self._baseline.set(baseline)
        return rtt_s

    def _failed(self, why: str) -> None:
        if self._outcomes:
            self._outcomes["failed"].inc()
        if not self._failing:  # once per run of failures, not once per probe
            self._failing = True
            log.warning(JsonEvent.of("latency_probe.failed", upstream=self.upstream.name, path=self.config.path,
                                     detail=why))
