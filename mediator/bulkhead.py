"""Keeping openIMIS responsive: a bulkhead (bounded concurrency + bounded priority queue) and a circuit
breaker per upstream, combined in `UpstreamGuard.call` around every request sent to openIMIS.

Both are per mediator instance (each instance protects its own share of openIMIS; the bulkhead caps
what one instance sends). Nothing here retries: a refused request was never sent, and a request that
failed is reported to the caller, never repeated (a repeated POST could submit a claim twice).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from mediator.config.models import BulkheadConfig, CircuitBreakerConfig
from mediator.metrics import Metrics
from mediator.upstream import UpstreamTimeout, UpstreamUnavailable


class UpstreamRefused(Exception):
    """The mediator refused to send the request to openIMIS (so nothing was sent): 503 + Retry-After."""

    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(order=True, slots=True)
class _Waiter:
    rank: int                 # -priority: heapq pops the smallest, i.e. the highest priority
    seq: int                  # first come, first served within a priority
    future: asyncio.Future[None] = field(compare=False)


class Bulkhead:
    """At most `max_concurrent` calls at once; up to `max_queue` wait, highest priority first.

    A full queue refuses the newcomer, unless the newcomer outranks the lowest-priority waiter: then that
    waiter is refused instead (interactive users are not stuck behind a bulk pull). Used from one event
    loop; not thread-safe.
    """

    def __init__(self, name: str, config: BulkheadConfig, metrics: Metrics | None = None) -> None:
        self.name = name
        self.config = config
        self.in_flight = 0
        self.queued = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._metrics = metrics

    def _observe(self) -> None:
        if self._metrics is not None:
            self._metrics.bulkhead_in_flight.labels(self.name).set(self.in_flight)
            self._metrics.bulkhead_queued.labels(self.name).set(self.queued)

    def _refuse(self, reason: str, message: str) -> UpstreamRefused:
        if self._metrics is not None:
            self._metrics.bulkhead_rejections.labels(self.name, reason).inc()
        return UpstreamRefused("upstream.overloaded", message, self.config.retry_after_s)

    async def acquire(self, priority: int) -> None:
        if self.in_flight < self.config.max_concurrent and self.queued == 0:
            self.in_flight += 1
            self._observe()
            return
        if self.queued >= self.config.max_queue:
            live = [w for w in self._queue if not w.future.done()]
            lowest = max(live, default=None)
            if lowest is None or lowest.rank <= -priority:
                raise self._refuse("queue_full", "openIMIS is busy; the mediator's queue is full")
            lowest.future.set_exception(self._refuse("evicted", "openIMIS is busy; more urgent requests came"))
        waiter = _Waiter(-priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, waiter)
        self.queued += 1
        self._observe()
        try:
            async with asyncio.timeout(self.config.max_wait_s):
                await waiter.future
        except TimeoutError:
            raise self._refuse("queue_timeout", "openIMIS is busy; waited too long for a slot") from None
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # the slot was handed over just as we were cancelled: give it back
            raise
        finally:
            self.queued -= 1
            self._observe()

    def release(self) -> None:
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes straight to the waiter
                return
        self.in_flight -= 1
        self._observe()


STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """closed → open after `failure_threshold` consecutive failures; open → half-open after `open_s`;
    half-open admits `half_open_max_calls` trials: a success closes, a failure opens again.

    `clock` is injectable so transitions are tested without sleeping.
    """

    def __init__(self, name: str, config: CircuitBreakerConfig, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self.state = "closed"
        self.failures = 0
        self.trials = 0
        self.opened_at = 0.0
        self._clock = clock
        self._metrics = metrics
        self._set("closed")

    def _set(self, state: str) -> None:
        changed = state != self.state
        self.state = state
        if self._metrics is not None:
            self._metrics.circuit_state.labels(self.name).set(STATE_VALUES[state])
            if changed:
                self._metrics.circuit_transitions.labels(self.name, state).inc()

    def before_call(self) -> None:
        """Raise UpstreamRefused (upstream.circuit_open) if no call may go to openIMIS now."""
        if self.state == "open":
            remaining = self.opened_at + self.config.open_s - self._clock()
            if remaining > 0:
                raise UpstreamRefused("upstream.circuit_open", "openIMIS is failing; not contacting it for now",
                                      max(1, math.ceil(remaining)))
            self.trials = 0
            self._set("half_open")
        if self.state == "half_open":
            if self.trials >= self.config.half_open_max_calls:
                raise UpstreamRefused("upstream.circuit_open", "openIMIS is being probed; try again shortly", 1)
            self.trials += 1

    def record_success(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self._set("closed")

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.config.failure_threshold:
            self.opened_at = self._clock()
            self._set("open")

    def record_abandoned(self) -> None:
        """A call that ended without an answer either way (cancelled): it frees its trial slot."""
        if self.state == "half_open" and self.trials > 0:
            self.trials -= 1


class _Answer(Protocol):
    @property
    def status(self) -> int: ...


AnswerT = TypeVar("AnswerT", bound=_Answer)


class UpstreamGuard:
    """Breaker check, then a bulkhead slot, then the call; the outcome feeds the breaker."""

    def __init__(self, name: str, bulkhead: Bulkhead, breaker: CircuitBreaker | None) -> None:
        self.name = name
        self.bulkhead = bulkhead
        self.breaker = breaker

    @classmethod
    def build(cls, name: str, bulkhead: BulkheadConfig, breaker: CircuitBreakerConfig | None,
              metrics: Metrics | None = None) -> UpstreamGuard:
        return cls(name, Bulkhead(name, bulkhead, metrics),
                   CircuitBreaker(name, breaker, metrics) if breaker is not None else None)

    async def call(self, priority: int, send: Callable[[], Awaitable[AnswerT]]) -> AnswerT:
        """`send` is any request to openIMIS: a forwarded request, an ownership lookup, a search window."""
        breaker = self.breaker
        if breaker is not None:
            breaker.before_call()
        try:
            await self.bulkhead.acquire(priority)
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()
            raise
        try:
            response = await send()
        except (UpstreamTimeout, UpstreamUnavailable):
            if breaker is not None:
                breaker.record_failure()
            raise
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()
            raise
        finally:
            self.bulkhead.release()
        if breaker is not None:
            if response.status in breaker.config.failure_statuses:
                breaker.record_failure()
            else:
                breaker.record_success()
        return response
