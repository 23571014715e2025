"""The replica's lifetime: its store, its syncer, its reader, the background schedule and its metrics.

Built with the Runtime (`Replica.from_config`), started (`start` + `start_schedule`) and closed by it
(`mediator.app.Runtime.start_new/close_retired`), used by the `replica` route step (`mediator.chain`) for channels with
`serve_from: replica`. A reload that leaves the replica policy, its upstream, server.redis and
public_base_url unchanged keeps the same Replica: its data and its sync task carry on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

from mediator.config import Config
from mediator.logs import JsonEvent
from mediator.metrics import Metrics
from mediator.replica.facilities import ReplicaFacilitySource
from mediator.replica.policy import ReplicaPolicy
from mediator.replica.records import SyncState
from mediator.replica.serve import ReplicaReader
from mediator.replica.store import MemoryReplicaStore, RedisReplicaStore, ReplicaStore
from mediator.replica.sync import Progress, ReplicaSyncer, SyncBusy, SyncFailed, SyncReport
from mediator.upstream import Guard, OpenImisUpstream

log = logging.getLogger("mediator.replica")

CLOSE_TIMEOUT_S = 5.0


def store_for(config: Config, policy: ReplicaPolicy) -> ReplicaStore:
    redis = config.channels.server.redis
    if policy.store == "redis":
        assert redis is not None  # load_config refuses store: redis without server.redis
        password = os.environ.get(redis.password_env) if redis.password_env else None
        return RedisReplicaStore(redis.url, redis.key_prefix, password=password)
    return MemoryReplicaStore()


class Replica:
    def __init__(self, policy: ReplicaPolicy, store: ReplicaStore, upstream: OpenImisUpstream, metrics: Metrics,
                 public_base_url: str, clock: Callable[[], float] = time.time, guard: Guard | None = None) -> None:
        self.policy = policy
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.syncer = ReplicaSyncer(policy, store, upstream, clock, guard)
        self.reader = ReplicaReader(policy, store, metrics, public_base_url, clock)
        self.facilities = ReplicaFacilitySource(policy, store, clock)
        """What the facility directory reads instead of openIMIS when the replica holds it."""
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: Config, upstreams: Mapping[str, OpenImisUpstream],
                    metrics: Metrics) -> Replica | None:
        """Unguarded: the Runtime gives its syncer the upstream's guard (`ReplicaSyncer.guard`)."""
        policy = config.policies.get("replica")
        if not isinstance(policy, ReplicaPolicy):
            return None
        return cls(policy, store_for(config, policy), upstreams[policy.upstream], metrics,
                   config.channels.server.public_base_url)

    def _lag(self) -> float:
        last = self.reader.last_success
        return max(0.0, self.clock() - last) if last is not None else float("nan")

    async def start(self) -> None:
        await self.store.start()
        self.metrics.replica_lag.set_function(self._lag)
        state = await self.store.state() if self.policy.store == "redis" else None
        if state is not None:  # another instance (or `openimis-mediator sync`) filled the shared store
            self.reader.last_success = state.last_success

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: a shutdown or a reload must never wait forever on a sync stuck in I/O.
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning(JsonEvent.of("replica.sync_stop_timeout", seconds=CLOSE_TIMEOUT_S,
                                          effect="closing its store anyway"))
            self._task = None
        await self.store.close()

    async def sync(self, full: bool | None = None, progress: Progress | None = None) -> SyncReport:
        """One sync now; metrics updated. Raises SyncFailed (last good data kept) or SyncBusy."""
        try:
            report = await self.syncer.run(full, progress)
        except SyncBusy:
            raise
        except SyncFailed:
            self.metrics.replica_sync_errors.labels({True: "full", False: "incremental", None: "auto"}[full]).inc()
            raise
        self.metrics.replica_syncs.labels(report.kind).inc()
        for rtype, count in report.counts.items():
            self.metrics.replica_items.labels(rtype).set(count)
        self.reader.last_success = self.clock()
        self.metrics.replica_last_sync.set(self.reader.last_success)
        return report

    def start_schedule(self) -> None:
        if self.policy.schedule and self._task is None:
            self._task = asyncio.create_task(self._run_schedule(), name="replica-sync")

    async def _run_schedule(self) -> None:
        full_next = False
        while True:
            delay = self.policy.incremental_every_s
            try:
                report = await self.sync(full=True if full_next else None)
                full_next = report.full_needed
                if full_next:
                    delay = 0
            except SyncBusy:
                state = await self._state_quietly()
                if state is not None:
                    self.reader.last_success = state.last_success
            except SyncFailed as exc:
                log.warning(JsonEvent.of("replica.sync_failed", detail=str(exc), effect="serving the last good data"))
                delay = self.policy.retry_after_failure_s
            except Exception:  # a bug must not end the schedule for the life of the process
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # redis-py may turn our cancellation into a connection error; we are being closed.
                    raise asyncio.CancelledError from None
                log.exception(JsonEvent.of("replica.sync_crashed"))
                self.metrics.replica_sync_errors.labels("auto").inc()
                delay = self.policy.retry_after_failure_s
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancellation swallowed inside a client library
            await asyncio.sleep(delay)

    async def _state_quietly(self) -> SyncState | None:
        try:
            return await self.store.state()
        except Exception:
            return None
