"""Keeping openIMIS responsive: a bulkhead (a concurrency limit + a bounded priority queue) and a circuit
breaker per upstream, combined in `UpstreamGuard.call` around every request sent to openIMIS.

The limit is static or adaptive (`mediator.concurrency_limit`) and is held per instance, or cluster-wide
through Redis leases (`mediator.cluster_budget`, `scope: cluster`). The breaker is per instance.
Nothing here retries: a refused request was never sent, and a request that failed is reported to the
caller, never repeated (a repeated POST could submit a claim twice).

Refusals are cheap on purpose (README "Load protection"): a refusal is one small exception raised
`from None` and one counter increment (children resolved once here, not per request); nothing is
logged per refusal, so a refused flood costs the mediator less than a forwarded one.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from mediator.cluster_budget import ClusterBudget
from mediator.concurrency_limit import ConcurrencyLimit, build_limit
from mediator.config.models import BulkheadConfig, CircuitBreakerConfig
from mediator.decision import Decision
from mediator.errors import MediatorError
from mediator.metrics import Metrics
from mediator.redis_store import STORE_ERRORS, RedisStore
from mediator.upstream import UpstreamTimeout, UpstreamUnavailable


class UpstreamRefused(MediatorError):
    """The mediator refused to send the request to openIMIS (so nothing was sent): 503 + Retry-After."""

    status = 503
    log_level = logging.DEBUG

    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s

    def decision(self) -> Decision:
        return Decision.denied(self.reason, self.status, self.message, {"Retry-After": str(self.retry_after_s)})


@dataclass(slots=True)
class Slot:
    """One request's place with openIMIS: its cluster lease (None: counted in this instance only)."""

    lease: str | None = None
    cluster_limit: float | None = None
    """With a lease: the smallest limit of the live instances when it was taken."""


@dataclass(order=True, slots=True)
class _Waiter:
    rank: int                 # -priority: heapq pops the smallest, i.e. the highest priority
    seq: int                  # first come, first served within a priority
    future: asyncio.Future[Slot] = field(compare=False)


REFUSAL_MESSAGES = {
    "queue_full": ("upstream.overloaded", "openIMIS is busy; the mediator's queue is full"),
    "evicted": ("upstream.overloaded", "openIMIS is busy; more urgent requests came"),
    "queue_timeout": ("upstream.overloaded", "openIMIS is busy; waited too long for a slot"),
    "store_unavailable": ("upstream.budget_unavailable",
                          "the shared openIMIS budget cannot be reached; nothing was sent"),
}


class Bulkhead:
    """At most `limit.current` calls at once (cluster-wide with a `budget`); up to `max_queue` wait,
    highest priority first.

    A full queue refuses the newcomer, unless the newcomer outranks the lowest-priority waiter: then that
    waiter is refused instead (interactive users are not stuck behind a bulk pull). Used from one event
    loop; not thread-safe.
    """

    def __init__(self, name: str, config: BulkheadConfig, metrics: Metrics | None = None,
                 redis: RedisStore | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.config = config
        self.limit: ConcurrencyLimit = build_limit(config, clock)
        self.budget = ClusterBudget(name, config.cluster, redis) \
            if config.scope == "cluster" and redis is not None and redis.configured else None
        self._in_flight = 0
        self.activity = 0
        """Counts every change of `in_flight`: unchanged across a span with nothing in flight at its start
        means no request of this instance was with openIMIS during it (the latency probe's idle answers)."""
        self.queued = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._metrics = metrics
        self._pump: asyncio.Task[None] | None = None
        self._clock = clock
        self._not_before = 0.0
        """A limit below 1 (a duty cycle): no request starts before this (clock time)."""
        self._timer: asyncio.TimerHandle | None = None
        self._freed = asyncio.Event()
        if metrics is not None:
            self._in_flight_gauge = metrics.bulkhead_in_flight.labels(name)
            self._queued_gauge = metrics.bulkhead_queued.labels(name)
            self._limit_gauge = metrics.concurrency_limit.labels(name)
            self._min_rtt_gauge: Any = None  # created at the first measurement: absent until then
            self._rejection_counters = {why: metrics.bulkhead_rejections.labels(name, why)
                                        for why in REFUSAL_MESSAGES}
            self._store_errors = metrics.store_errors.labels("upstream_budget", config.cluster.on_store_error)
            self._limit_gauge.set(self.limit.value)

    @property
    def in_flight(self) -> int:
        """This instance's requests with openIMIS now (forwarded and the mediator's own)."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._in_flight = value
        self.activity += 1

    def idle_mark(self) -> int:
        """For `idle_since`: the activity now if nothing is in flight, else a mark that is never idle."""
        return self.activity if self._in_flight == 0 else -1

    def idle_since(self, mark: int) -> bool:
        """No request of this instance was with openIMIS since `idle_mark()` gave `mark`."""
        return self._in_flight == 0 and self.activity == mark

    def _observe(self) -> None:
        if self._metrics is not None:
            self._in_flight_gauge.set(self.in_flight)
            self._queued_gauge.set(self.queued)

    def count_refusal(self, why: str) -> None:
        if self._metrics is not None:
            self._rejection_counters[why].inc()

    def sheds(self, priority: int) -> bool:
        """A request of `priority` arriving now would be refused for a full queue (no slot, the queue at
        max_queue, and no waiter of lower priority to evict). For the early check (stages/load_shed.py).
        A free local slot counts only with an empty queue (`acquire` queues behind waiters): with scope
        cluster the waiters of a full queue wait for the shared budget, which a local slot says nothing of."""
        if self.queued < self.config.max_queue or (self.queued == 0 and self._room()):
            return False
        return not any(w.rank > -priority and not w.future.done() for w in self._queue)

    def _refuse(self, why: str) -> UpstreamRefused:
        self.count_refusal(why)
        reason, message = REFUSAL_MESSAGES[why]
        return UpstreamRefused(reason, message, self.config.retry_after_s)

    def _room(self) -> bool:
        return self.in_flight < self.limit.current and (self._not_before == 0.0 or self._clock() >= self._not_before)

    def _dispatch(self) -> None:
        """scope instance: let waiters in while there is room; if only the duty cycle keeps them out,
        come back when it allows the next one."""
        while self._room() and (waiter := self._next_waiter()) is not None:
            heapq.heappop(self._queue)
            self.in_flight += 1
            waiter.future.set_result(Slot())
        if self._timer is None and self.in_flight < self.limit.current and self._next_waiter() is not None:
            delay = max(0.0, self._not_before - self._clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
        self._observe()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    async def acquire(self, priority: int) -> Slot:
        if self.queued == 0 and self._room():
            self.in_flight += 1
            if self.in_flight >= self.limit.current:
                self.limit.saturated()
            if self.budget is None:
                self._observe()
                return Slot()
            try:
                slot = await self._take_lease(priority)
            except BaseException:
                self.in_flight -= 1
                raise
            if slot is not None:
                self._observe()
                return slot
            self.in_flight -= 1  # another instance holds the budget: wait in line
        else:
            self.limit.saturated()
        return await self._wait(priority)

    async def _take_lease(self, priority: int, waiting: int = -1) -> Slot | None:
        """With one local slot reserved: a cluster lease, None if the budget is full (or a more urgent
        request waits elsewhere), or the fail mode."""
        assert self.budget is not None
        try:
            lease = await self.budget.take(self.limit.value, priority, waiting)
        except STORE_ERRORS:
            if self._metrics is not None:
                self._store_errors.inc()
            if self.budget.config.on_store_error == "deny":
                raise self._refuse("store_unavailable") from None
            return Slot()  # local: counted by this instance only, as with scope instance
        return Slot(lease.member, lease.cluster_limit) if lease is not None else None

    async def _wait(self, priority: int) -> Slot:
        if self.queued >= self.config.max_queue:
            live = [w for w in self._queue if not w.future.done()]
            lowest = max(live, default=None)
            if lowest is None or lowest.rank <= -priority:
                raise self._refuse("queue_full")
            lowest.future.set_exception(self._refuse("evicted"))
        waiter = _Waiter(-priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._queue, waiter)
        self.queued += 1
        self._observe()
        if self.budget is None:
            self._dispatch()  # a slot may be free and only the duty cycle kept us out: arm its timer
        elif self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._pump_cluster())
        try:
            async with asyncio.timeout(self.config.max_wait_s):
                return await waiter.future
        except TimeoutError:
            raise self._refuse("queue_timeout") from None
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                await self.release(future.result())  # the slot was handed over as we were cancelled
            raise
        finally:
            self.queued -= 1
            self._observe()

    def _next_waiter(self) -> _Waiter | None:
        while self._queue:
            if not self._queue[0].future.done():
                return self._queue[0]
            heapq.heappop(self._queue)
        return None

    async def _pump_cluster(self) -> None:
        """scope cluster: hand slots to waiters, highest priority first, as the shared budget allows.
        A slot freed here wakes it at once; one freed by another instance is seen within poll_interval_s."""
        assert self.budget is not None
        poll = self.budget.config.poll_interval_s
        while (head := self._next_waiter()) is not None:
            if self._room():
                self.in_flight += 1
                try:
                    slot = await self._take_lease(-head.rank, -head.rank)
                except UpstreamRefused:  # store down, deny: the waiters are refused too (one refusal each)
                    self.in_flight -= 1
                    while self._next_waiter() is not None:
                        heapq.heappop(self._queue).future.set_exception(self._refuse("store_unavailable"))
                    return
                except BaseException:
                    self.in_flight -= 1
                    raise
                waiter = self._next_waiter()
                if slot is not None and waiter is not None:
                    heapq.heappop(self._queue)
                    waiter.future.set_result(slot)
                    self._observe()
                    continue
                self.in_flight -= 1
                if slot is not None:  # the waiter left while we asked Redis
                    await self._give_back(slot)
                    continue
            self._freed.clear()
            try:
                async with asyncio.timeout(poll):
                    await self._freed.wait()
            except TimeoutError:
                pass

    async def _give_back(self, slot: Slot, pause_s: float = 0.0) -> None:
        if slot.lease is not None and self.budget is not None:
            try:
                await self.budget.give_back(slot.lease, pause_s)
            except STORE_ERRORS:
                if self._metrics is not None:
                    self._store_errors.inc()  # the lease expires after lease_ttl_s by itself

    async def release(self, slot: Slot, busy_s: float = 0.0) -> None:
        """`slot` is free again; `busy_s`: how long it was with openIMIS (paces a limit below 1)."""
        if self.queued or self.in_flight >= self.limit.current:
            self.limit.saturated()  # this window used the whole limit (growth is earned only then)
        value = self.limit.value if slot.cluster_limit is None else min(self.limit.value, slot.cluster_limit)
        pause_s = busy_s * (1 / value - 1) if value < 1 else 0.0
        if pause_s:
            self._not_before = self._clock() + pause_s
        elif self._not_before:
            self._not_before = 0.0
        self.in_flight -= 1
        if self.budget is not None:
            self._observe()
            await self._give_back(slot, pause_s)  # the pause holds for every instance
            self._freed.set()
            return
        self._dispatch()

    def record(self, rtt_s: float, kind: str | None = "") -> None:
        """openIMIS answered a request of `kind` after `rtt_s`: feeds the adaptive limit; a raised limit
        lets waiters in. `kind` None: not an answer time to learn from (it held a slot, that is all)."""
        if kind is None:
            return
        before = self.limit.current
        self.limit.record(rtt_s, kind)
        self._limit_recorded(before)

    def record_latency_probe(self, rtt_s: float, idle: bool = False) -> None:
        """The latency probe was answered after `rtt_s` (mediator/latency_probe.py), `idle`: with no request
        of this instance with openIMIS meanwhile. Feeds the adaptive limit's second signal; a raised limit
        lets waiters in."""
        before = self.limit.current
        self.limit.record_latency_probe(rtt_s, idle)
        self._limit_recorded(before)

    def _limit_recorded(self, before: int) -> None:
        """After the limit took a sample: its gauges, and waiters let in if it rose from `before`."""
        if self._metrics is not None:
            self._limit_gauge.set(self.limit.value)
            min_rtt = self.limit.min_rtt_s
            if min_rtt is not None:
                if self._min_rtt_gauge is None:
                    self._min_rtt_gauge = self._metrics.upstream_min_rtt.labels(self.name)
                self._min_rtt_gauge.set(min_rtt)
        if self.limit.current > before and self.budget is None:
            self._dispatch()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        if self.budget is not None:
            await self.budget.close()


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

    def open_for(self) -> int | None:
        """Seconds the breaker stays open (it refuses every call now), or None. Changes no state."""
        if self.state != "open":
            return None
        remaining = self.opened_at + self.config.open_s - self._clock()
        return max(1, math.ceil(remaining)) if remaining > 0 else None

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
    """Breaker check, then a bulkhead slot, then the call; the outcome feeds the breaker and the
    answer time feeds the concurrency limit."""

    def __init__(self, name: str, bulkhead: Bulkhead, breaker: CircuitBreaker | None) -> None:
        self.name = name
        self.bulkhead = bulkhead
        self.breaker = breaker

    @classmethod
    def build(cls, name: str, bulkhead: BulkheadConfig, breaker: CircuitBreakerConfig | None,
              metrics: Metrics | None = None, redis: RedisStore | None = None) -> UpstreamGuard:
        return cls(name, Bulkhead(name, bulkhead, metrics, redis),
                   CircuitBreaker(name, breaker, metrics) if breaker is not None else None)

    async def _admit(self, priority: int) -> Slot:
        """Ask the breaker, then wait for a bulkhead place; a wait that ends without one (refused,
        cancelled) is reported to the breaker as abandoned, so a half-open trial is not held."""
        breaker = self.breaker
        if breaker is not None:
            breaker.before_call()
        try:
            return await self.bulkhead.acquire(priority)
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()
            raise

    @asynccontextmanager
    async def slot(self, priority: int, kind: str | None = "") -> AsyncIterator[None]:
        """`async with guard.slot(priority):` — one place with openIMIS, for callers that send by other
        means than `call` (a queue drain). Raises UpstreamRefused (nothing may be sent). The time inside
        feeds the adaptive limit; the breaker is asked before, but its outcome is the caller's to report
        (`breaker.record_success/record_failure`), as only the caller knows what openIMIS answered."""
        slot = await self._admit(priority)
        started = time.monotonic()
        try:
            yield
            self.bulkhead.record(time.monotonic() - started, kind)
        finally:
            await self.bulkhead.release(slot, time.monotonic() - started)

    async def call(self, priority: int, send: Callable[[], Awaitable[AnswerT]], kind: str | None = "") -> AnswerT:
        """`send` is any request to openIMIS: a forwarded request, an ownership lookup, a search window, a
        replica page. `kind`: what sort of request (channel:interaction, or the lookup's name), so the
        adaptive limit compares its answer time with the same kind's unloaded time; None: its time is not
        learnt from (a replica page, whose size varies a hundredfold)."""
        breaker = self.breaker
        slot = await self._admit(priority)
        started = time.monotonic()
        try:
            response = await send()
        except UpstreamTimeout:
            self.bulkhead.record(time.monotonic() - started, kind)  # the strongest sign of a queue at openIMIS
            if breaker is not None:
                breaker.record_failure()
            raise
        except UpstreamUnavailable:
            if breaker is not None:
                breaker.record_failure()
            raise
        except BaseException:
            if breaker is not None:
                breaker.record_abandoned()
            raise
        finally:
            await self.bulkhead.release(slot, time.monotonic() - started)
        self.bulkhead.record(time.monotonic() - started, kind)
        if breaker is not None:
            if response.status in breaker.config.failure_statuses:
                breaker.record_failure()
            else:
                breaker.record_success()
        return response
