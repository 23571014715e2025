"""The drain: every instance reads the queue's streams round robin (one entry per vendor per round) and
delivers entries inside the upstream's budget, retrying transient failures with backoff and jitter.

Consumer-group mechanics: an entry read by this instance is pending under its consumer name until its
outcome is recorded (`QueueStore.settle` acknowledges and deletes it). While an entry is being worked on
(including its backoff sleeps) a heartbeat resets its idle time; an entry idle longer than
`reclaim_idle_s` belongs to a consumer that died and is taken over (XAUTOCLAIM) by whoever looks next.
A taken-over entry whose last send may have reached openIMIS is looked up in openIMIS before it is sent
again: a claim is never created twice by the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from mediator.async_claims import delivery
from mediator.async_claims.metrics import AsyncMetrics
from mediator.async_claims.store import QueuedEntry, QueueStore, Result, StreamRef
from mediator.config.models import AsyncSubmissionConfig, ChannelConfig
from mediator.logs import JsonEvent
from mediator.redis_store import STORE_ERRORS
from mediator.upstream import OpenImisUpstream

log = logging.getLogger("mediator.async_claims")

T = TypeVar("T")
METRICS_REFRESH_S = 2.0
STOP_BOUND_S = 5.0


@dataclass(frozen=True, slots=True)
class DrainChannel:
    """What the drain needs to know about one async channel."""

    config: ChannelConfig
    settings: AsyncSubmissionConfig
    upstream: OpenImisUpstream
    slot: delivery.SlotCall


Settled = Callable[[StreamRef, QueuedEntry, Result, str, bool], None]
"""(stream, entry, result, outcome, job_finished): audit + metrics hook of the service."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Drainer:
    def __init__(self, store: QueueStore, channels: Mapping[str, DrainChannel], metrics: AsyncMetrics,
                 on_settled: Settled, rand: Callable[[], float] = random.random) -> None:
        self.store = store
        self.channels = dict(channels)
        self.metrics = metrics
        self.on_settled = on_settled
        self.consumer = consumer_name()
        self._rand = rand
        self._busy = dict.fromkeys(self.channels, 0)
        self._held: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._cursor = 0
        self._last_reclaim: dict[str, float] = {}
        self._last_metrics = 0.0

    def wake(self) -> None:
        """A local accept: look for work now instead of at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._loops = [asyncio.create_task(self._run(), name="async-claims-drain"),
                       asyncio.create_task(self._heartbeats(), name="async-claims-heartbeat")]

    async def close(self) -> None:
        """Stop reading; let deliveries in flight finish for a bounded time, then cancel them (their entries
        stay pending and are taken over by another instance, after a look-up in openIMIS)."""
        self._stopping.set()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=STOP_BOUND_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the drainer is stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))
            return False
        except TimeoutError:
            return True

    async def _store(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """A queue operation that must eventually happen (recording an outcome): retried while Redis is
        down, with backoff; None only when the drainer is stopping."""
        delay = 0.1
        while not self._stopping.is_set():
            try:
                return await call()
            except STORE_ERRORS as exc:
                self.metrics.store_errors.labels(operation).inc()
                log.warning(JsonEvent.of("async_claims.store_failed", operation=operation, error=type(exc).__name__))
                if not await self._sleep(delay):
                    return None
                delay = min(delay * 2, 2.0)
        return None

    # -- the reading loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            self._wake.clear()  # before the round: a delivery ending during it wakes the wait below
            try:
                found = await self._round()
                delay = 0.1
            except STORE_ERRORS as exc:
                self.metrics.store_errors.labels("read").inc()
                self.store.forget_groups()
                log.warning(JsonEvent.of("async_claims.store_failed", operation="read", error=type(exc).__name__))
                await self._sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            except Exception:
                log.exception(JsonEvent.of("async_claims.drain_round_failed"))
                await self._sleep(1.0)
                continue
            if not found:
                poll = min(c.settings.poll_interval_s for c in self.channels.values())
                try:
                    await asyncio.wait_for(self._wake.wait(), poll)
                except TimeoutError:
                    pass

    def _free(self, channel: str) -> int:
        return self.channels[channel].settings.drain_concurrency - self._busy[channel]

    async def _round(self) -> bool:
        refs = [r for r in await self.store.streams() if r.channel in self.channels]
        now = time.monotonic()
        if now - self._last_metrics >= METRICS_REFRESH_S:
            self._last_metrics = now
            await self._refresh_metrics(refs)
        started = False
        for ref in refs:
            settings = self.channels[ref.channel].settings
            due = now - self._last_reclaim.get(ref.key, 0.0) >= settings.reclaim_idle_s / 2
            if self._free(ref.channel) > 0 and due:
                self._last_reclaim[ref.key] = now
                for got in await self.store.reclaim(self.consumer, ref, settings.reclaim_idle_s,
                                                    self._free(ref.channel)):
                    self.metrics.reclaimed.labels(ref.channel, ref.client).inc()
                    self._spawn(*got)
                    started = True
        if not refs:
            return started
        # One entry from each vendor's stream per round, starting where the last round stopped.
        self._cursor %= len(refs)
        rotated = refs[self._cursor:] + refs[:self._cursor]
        budget = {name: self._free(name) for name in self.channels}
        chosen = []
        for ref in rotated:
            if budget[ref.channel] > 0:
                budget[ref.channel] -= 1
                chosen.append(ref)
        if not chosen:
            return started  # every channel is busy: a delivery ending wakes the loop
        self._cursor += len(chosen)
        for got in await self.store.read_new(self.consumer, chosen):
            self._spawn(*got)
            started = True
        return started

    async def _refresh_metrics(self, refs: list[StreamRef]) -> None:
        now = time.time()
        for ref in refs:
            depth, oldest = await self.store.depth(ref)
            self.metrics.depth.labels(ref.channel, ref.client).set(depth)
            self.metrics.oldest_age.labels(ref.channel, ref.client).set(max(0.0, now - oldest) if oldest else 0)

    async def _heartbeats(self) -> None:
        interval = min(c.settings.reclaim_idle_s for c in self.channels.values()) / 3
        while await self._sleep(interval):
            held = {stream: sorted(ids) for stream, ids in self._held.items() if ids}
            if held:
                try:
                    await self.store.heartbeat(self.consumer, held)
                except STORE_ERRORS:
                    self.metrics.store_errors.labels("heartbeat").inc()

    def _spawn(self, ref: StreamRef, entry_id: str, entry: QueuedEntry) -> None:
        self._busy[ref.channel] += 1
        self.metrics.in_flight.labels(ref.channel).set(self._busy[ref.channel])
        self._held.setdefault(ref.key, set()).add(entry_id)
        task = asyncio.create_task(self._deliver(ref, entry_id, entry))
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            self._busy[ref.channel] -= 1
            self.metrics.in_flight.labels(ref.channel).set(self._busy[ref.channel])
            self._held.get(ref.key, set()).discard(entry_id)
            self._wake.set()
        task.add_done_callback(done)

    # -- one entry --------------------------------------------------------------------------------

    async def _deliver(self, ref: StreamRef, entry_id: str, entry: QueuedEntry) -> None:
        try:
            await self._deliver_entry(ref, entry_id, entry)
        except asyncio.CancelledError:
            raise
        except Exception:  # the entry stays pending: another round (or instance) takes it over
            log.exception(JsonEvent.of("async_claims.delivery_failed", entry_id=entry_id))

    async def _settle(self, ref: StreamRef, entry_id: str, entry: QueuedEntry, result: Result,
                      outcome: str) -> None:
        channel = self.channels[ref.channel]
        finished = await self._store("settle", lambda: self.store.settle(
            ref, entry_id, entry, result, channel.settings.result_retention_s))
        if finished is None:
            return  # stopping before Redis came back: the entry is still pending, a look-up will find it
        self.metrics.outcomes.labels(ref.channel, ref.client, outcome).inc()
        self.on_settled(ref, entry, result, outcome, finished)

    async def _deliver_entry(self, ref: StreamRef, entry_id: str, entry: QueuedEntry) -> None:
        channel = self.channels[ref.channel]
        settings, timeout_s = channel.settings, channel.config.timeout_s
        job = await self._store("read_job", lambda: self.store.job(entry.job_id))
        if job is None:
            if not self._stopping.is_set():  # expired or never fully written: nothing to deliver
                await self._store("settle", lambda: self.store.settle(ref, entry_id, entry, Result(0, "", ""), 60))
            return
        if entry.index in job.results:  # settled by an instance that died before acknowledging
            await self._settle(ref, entry_id, entry, job.results[entry.index], "duplicate_read")
            return
        attempts = job.attempts.get(entry.index, 0)
        maybe_sent = entry.index in job.sent_at  # a send started and its outcome was never recorded
        ever_unknown = maybe_sent
        last_send = job.sent_at.get(entry.index, 0.0)
        while not self._stopping.is_set():
            if time.time() - entry.accepted_at > settings.give_up_after_s:
                await self._give_up(ref, entry_id, entry, channel, maybe_sent)
                return
            if maybe_sent:
                # Let the earlier request end at openIMIS before looking (it may still be saving the claim).
                if not await self._sleep(last_send + timeout_s - time.time()):
                    return
                found = await delivery.find_claim(channel.upstream, channel.slot, entry, timeout_s)
                if found.kind == "found" and found.result is not None:
                    await self._settle(ref, entry_id, entry, found.result, "found_existing")
                    return
                if found.kind == "failed":
                    self.metrics.retries.labels(ref.channel, ref.client, "lookup_failed").inc()
                    if not await self._sleep(self._until_give_up(entry, settings, self._backoff(attempts, settings))):
                        return
                    attempts += 1
                    continue
                maybe_sent = False
            marked = await self._store("mark_sending", lambda: self.store.mark_sending(entry.job_id, entry.index))
            if marked is None:
                return
            if not marked:
                await self._store("settle", lambda: self.store.settle(ref, entry_id, entry, Result(0, "", ""), 60))
                return
            attempts += 1
            last_send = time.time()
            outcome = await delivery.attempt(channel.upstream, channel.slot, entry, timeout_s)
            if outcome.kind == "delivered" and outcome.result is not None:
                await self._settle(ref, entry_id, entry, outcome.result, "delivered")
                return
            if outcome.kind == "refused" and outcome.result is not None:
                if ever_unknown:  # e.g. openIMIS refusing the claim code it already has from the lost attempt
                    found = await delivery.find_claim(channel.upstream, channel.slot, entry, timeout_s)
                    if found.kind == "found" and found.result is not None:
                        await self._settle(ref, entry_id, entry, found.result, "found_existing")
                        return
                await self._settle(ref, entry_id, entry, outcome.result, "refused")
                return
            self.metrics.retries.labels(ref.channel, ref.client, outcome.reason).inc()
            if outcome.kind == "retry":
                await self._store("clear_sent", lambda: self.store.clear_sent(entry.job_id, entry.index))
            else:
                maybe_sent = ever_unknown = True
            wait = max(outcome.retry_after_s, self._backoff(attempts, settings))
            if not await self._sleep(self._until_give_up(entry, settings, wait)):
                return

    @staticmethod
    def _until_give_up(entry: QueuedEntry, settings: AsyncSubmissionConfig, wait: float) -> float:
        """A backoff (or an open breaker's Retry-After) never carries an entry past its give-up time."""
        return min(wait, max(0.0, entry.accepted_at + settings.give_up_after_s - time.time()) + 0.01)

    def _backoff(self, attempts: int, settings: AsyncSubmissionConfig) -> float:
        return delivery.backoff_s(max(0, attempts - 1), settings.retry_initial_s, settings.retry_max_s, self._rand)

    async def _give_up(self, ref: StreamRef, entry_id: str, entry: QueuedEntry, channel: DrainChannel,
                       maybe_sent: bool) -> None:
        if maybe_sent:
            found = await delivery.find_claim(channel.upstream, channel.slot, entry, channel.config.timeout_s)
            if found.kind == "found" and found.result is not None:
                await self._settle(ref, entry_id, entry, found.result, "found_existing")
                return
            if found.kind == "failed":
                await self._settle(ref, entry_id, entry, delivery.refusal(
                    409, "async.outcome_unknown", "openIMIS may have this claim from an attempt whose answer was "
                    "lost, and cannot be asked now: search for it (Claim?identifier=) before resubmitting"), "unknown")
                return
        await self._settle(ref, entry_id, entry, delivery.refusal(
            503, "async.delivery_failed", "openIMIS could not take this claim within the channel's "
            "give_up_after_s; it was not submitted: submit it again"), "failed")
