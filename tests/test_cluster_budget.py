"""`scope: cluster`: one in-flight budget toward openIMIS shared through real Redis leases — between two
bulkheads in this process (each with its own Redis client, as two instances have), between two real
`openimis-mediator serve` processes in front of a stand-in that counts what it has in flight, a dead
instance's leases expiring, and the declared fail modes with Redis gone."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mediator.bulkhead import Bulkhead, UpstreamRefused
from mediator.config.models import BulkheadConfig, ClusterBudgetConfig, RedisConfig
from mediator.metrics import Metrics
from mediator.redis_store import RedisStore
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, write_config
from tests.load_helpers import (
    SHARED_REDIS,
    free_port,
    mediator_process,
    minimum_rtt_measured,
    private_redis,
    redis_prefix,
    redis_server_section,
)

__all__ = ["redis_prefix"]  # the fixture, re-exported for pytest


def _cluster(limit: int, ttl_s: float = 10, on_store_error: str = "local", **extra: object) -> BulkheadConfig:
    return BulkheadConfig(max_concurrent=limit, scope="cluster", max_wait_s=5, **extra,  # type: ignore[arg-type]
                          cluster=ClusterBudgetConfig(lease_ttl_s=ttl_s, poll_interval_s=0.01,
                                                      on_store_error=on_store_error))  # type: ignore[arg-type]


def _instance(prefix: str, config: BulkheadConfig, url: str = SHARED_REDIS,
              metrics: Metrics | None = None) -> tuple[Bulkhead, RedisStore]:
    store = RedisStore(RedisConfig(url=url, key_prefix=prefix, timeout_s=0.3, connect_timeout_s=0.3))
    return Bulkhead("openimis", config, metrics, store), store


async def test_two_instances_share_one_budget(redis_prefix):
    (a, store_a), (b, store_b) = _instance(redis_prefix, _cluster(3)), _instance(redis_prefix, _cluster(3))
    try:
        held = [await a.acquire(50), await a.acquire(50), await b.acquire(50)]
        assert all(slot.lease is not None for slot in held)
        assert a.budget is not None and await a.budget.count() == 3
        waiting = asyncio.create_task(b.acquire(50))  # the budget is spent, though b has local room
        await asyncio.sleep(0.1)
        assert not waiting.done() and b.queued == 1
        await a.release(held.pop(0))  # freed by the other instance: b sees it within poll_interval_s
        slot = await asyncio.wait_for(waiting, 2)
        assert slot.lease is not None and await a.budget.count() == 3
        for s in [*held[:1], slot]:
            await (a if s is held[0] else b).release(s)
        await b.release(held[1])
        assert await a.budget.count() == 0
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()


async def test_waiters_of_an_instance_get_freed_slots_by_priority(redis_prefix):
    (a, store_a), (b, store_b) = _instance(redis_prefix, _cluster(1)), _instance(redis_prefix, _cluster(1))
    try:
        first = await a.acquire(50)
        order: list[str] = []

        async def wait(name: str, priority: int) -> None:
            slot = await b.acquire(priority)
            order.append(name)
            await b.release(slot)

        tasks = [asyncio.create_task(wait("bulk", 10))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(wait("claim", 50)))
        await asyncio.sleep(0.05)
        await a.release(first)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == ["claim", "bulk"]
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()


async def test_the_leases_of_a_dead_instance_expire(redis_prefix):
    (a, store_a), (b, store_b) = _instance(redis_prefix, _cluster(2, ttl_s=0.6)), \
        _instance(redis_prefix, _cluster(2, ttl_s=0.6))
    try:
        held = [await a.acquire(50), await a.acquire(50)]
        assert all(slot.lease for slot in held)
        await asyncio.sleep(1.0)  # longer than the ttl: a live instance keeps its leases by renewing them
        assert b.budget is not None and await b.budget.count() == 2
        await a.close()  # a "dies": no renewal, no release
        started = time.monotonic()
        slot = await asyncio.wait_for(b.acquire(50), 3)
        waited = time.monotonic() - started
        assert slot.lease is not None and 0.1 < waited < 1.5
        await b.release(slot)
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()


async def test_redis_down_applies_the_declared_fail_mode():
    metrics = Metrics()
    with private_redis() as (url, process):
        local, local_store = _instance("t:", _cluster(2, on_store_error="local"), url, metrics)
        deny, deny_store = _instance("t:", _cluster(2, on_store_error="deny"), url, metrics)
        try:
            held = await local.acquire(50)
            assert held.lease is not None
            process.kill()
            process.wait(timeout=10)
            # local: this instance's own limit of 2 (one already in flight), then it queues
            extra = await local.acquire(50)
            assert extra.lease is None and local.in_flight == 2
            queued = asyncio.create_task(local.acquire(50))
            await asyncio.sleep(0.05)
            assert local.queued == 1
            await local.release(extra)
            assert (await asyncio.wait_for(queued, 2)).lease is None
            with pytest.raises(UpstreamRefused) as refused:
                await deny.acquire(50)
            assert refused.value.reason == "upstream.budget_unavailable" and deny.in_flight == 0
            assert metrics.registry.get_sample_value(
                "mediator_store_errors_total", {"feature": "upstream_budget", "on_store_error": "deny"}) == 1
            assert metrics.registry.get_sample_value(
                "mediator_bulkhead_rejections_total", {"upstream": "openimis", "reason": "store_unavailable"}) == 1
        finally:
            for bulkhead, store in ((local, local_store), (deny, deny_store)):
                await bulkhead.close()
                await store.close()


class CountingOpenImis:
    """An openIMIS stand-in that records how many requests it has in flight at most."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrivals: list[float] = []
        self.gate: asyncio.Event | None = None

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "stand-in-token", "exp": int(time.time()) + 3600})

    async def search(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.arrivals.append(time.monotonic())
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(self.hold_s)
        finally:
            self.in_flight -= 1
        return web.json_response({"resourceType": "Bundle", "type": "searchset", "total": 0})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/api_fhir_r4/login/", self.login)
        app.router.add_get("/api/api_fhir_r4/{rtype}/", self.search)
        return app


def _two_instance_config(root: Path, upstream: str, prefix: str, bulkhead: str) -> Path:
    channels = channels_yaml(upstream, extra_server=redis_server_section(SHARED_REDIS, prefix)).replace(
        "    connect_timeout_s: 1\n", f"    connect_timeout_s: 1\n    bulkhead: {bulkhead}\n")
    return write_config(root, channels, DEFAULT_IP_POLICY)


async def test_two_serve_processes_never_send_more_than_the_budget(aiohttp_server, tmp_path, redis_prefix):
    stand_in = CountingOpenImis(hold_s=0.15)
    server = await aiohttp_server(stand_in.app())
    root = _two_instance_config(tmp_path, f"http://127.0.0.1:{server.port}/api/api_fhir_r4/", redis_prefix,
                                "{max_concurrent: 3, scope: cluster, max_queue: 100, max_wait_s: 20}")
    ports = [free_port(), free_port()]
    with mediator_process(root, ports[0]), mediator_process(root, ports[1]):
        async with aiohttp.ClientSession() as session:
            async def get(i: int) -> int:
                async with session.get(f"http://127.0.0.1:{ports[i % 2]}/fhir/Medication/") as response:
                    await response.read()
                    return response.status
            statuses = await asyncio.wait_for(asyncio.gather(*(get(i) for i in range(40))), 60)
    assert statuses == [200] * 40
    assert stand_in.max_in_flight == 3  # reached (each instance alone would allow 3: 6 together)


async def test_a_killed_serve_process_gives_its_budget_back_after_the_lease_ttl(aiohttp_server, tmp_path,
                                                                               redis_prefix):
    stand_in = CountingOpenImis(hold_s=0)
    stand_in.gate = asyncio.Event()
    server = await aiohttp_server(stand_in.app())
    root = _two_instance_config(tmp_path, f"http://127.0.0.1:{server.port}/api/api_fhir_r4/", redis_prefix,
                                "{max_concurrent: 2, scope: cluster, max_wait_s: 20, cluster: {lease_ttl_s: 1.5}}")
    ports = [free_port(), free_port()]
    with mediator_process(root, ports[0]) as doomed, mediator_process(root, ports[1]):
        async with aiohttp.ClientSession() as session:
            async def get(port: int) -> int:
                async with session.get(f"http://127.0.0.1:{port}/fhir/Medication/") as response:
                    await response.read()
                    return response.status
            held = [asyncio.create_task(get(ports[0])) for _ in range(2)]
            for _ in range(200):
                if stand_in.in_flight == 2:
                    break
                await asyncio.sleep(0.02)
            assert stand_in.in_flight == 2
            survivor = asyncio.create_task(get(ports[1]))
            await asyncio.sleep(0.5)
            assert len(stand_in.arrivals) == 2  # the budget is the dead-to-be instance's
            doomed.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.gather(*held, return_exceptions=True)
            for _ in range(300):
                if len(stand_in.arrivals) == 3:
                    break
                await asyncio.sleep(0.02)
            assert len(stand_in.arrivals) == 3
            assert stand_in.arrivals[2] - killed_at < 1.5 + 1.0  # within the ttl (plus polling)
            stand_in.gate.set()
            assert await asyncio.wait_for(survivor, 10) == 200


async def test_waiters_are_refused_when_the_store_dies_under_deny():
    with private_redis() as (url, process):
        bulkhead, store = _instance("t:", _cluster(1, on_store_error="deny"), url)
        try:
            held = await bulkhead.acquire(50)
            waiter = asyncio.create_task(bulkhead.acquire(50))
            await asyncio.sleep(0.05)
            assert bulkhead.queued == 1
            process.kill()
            process.wait(timeout=10)
            await bulkhead.release(held)  # the lease cannot be given back: it will expire by itself
            with pytest.raises(UpstreamRefused) as refused:
                await asyncio.wait_for(waiter, 5)
            assert refused.value.reason == "upstream.budget_unavailable"
            assert bulkhead.in_flight == 0 and bulkhead.queued == 0
        finally:
            await bulkhead.close()
            await store.close()


async def test_priorities_hold_across_instances(redis_prefix):
    instances = [_instance(redis_prefix, _cluster(1)) for _ in range(3)]
    (holder, _), (claims, _), (bulk, _) = instances
    try:
        held = await holder.acquire(50)
        order: list[str] = []

        async def wait(name: str, bulkhead: Bulkhead, priority: int) -> None:
            slot = await bulkhead.acquire(priority)
            order.append(name)
            await asyncio.sleep(0.05)
            await bulkhead.release(slot)

        tasks = [asyncio.create_task(wait("bulk", bulk, 10))]  # waits first, on its own instance
        await asyncio.sleep(0.1)
        tasks.append(asyncio.create_task(wait("claim", claims, 50)))
        await asyncio.sleep(0.1)  # both pumps poll; the claim's instance has announced its priority
        await holder.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert order == ["claim", "bulk"]
    finally:
        for bulkhead, store in instances:
            await bulkhead.close()
            await store.close()


async def test_a_duty_cycle_is_paced_for_the_whole_cluster(redis_prefix):
    """At 0.5 two instances leave openIMIS idle half the time together: after an answer that took 0.3 s
    the other instance, though it has nothing in flight, takes no lease for 0.3 s."""
    def paced() -> BulkheadConfig:
        return _cluster(1, mode="adaptive", min_concurrent=0.5, initial_concurrent=0.5)
    (a, store_a), (b, store_b) = _instance(redis_prefix, paced()), _instance(redis_prefix, paced())
    try:
        for bulkhead in (a, b):
            minimum_rtt_measured(bulkhead)
        assert a.limit.value == 0.5 and b.limit.value == 0.5
        held = await a.acquire(50)
        await a.release(held, busy_s=0.3)
        assert a.budget is not None and await a.budget.count() == 0
        started = time.monotonic()
        slot = await asyncio.wait_for(b.acquire(50), 3)  # b waits in its queue for the pause to end
        waited = time.monotonic() - started
        assert 0.2 < waited < 1.0 and slot.lease is not None
        await b.release(slot)  # busy ~0 s: no pause after it
        again = await asyncio.wait_for(a.acquire(50), 1)
        await a.release(again)
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()


async def test_a_full_queue_is_shed_early_though_this_instance_has_nothing_in_flight(redis_prefix):
    """The early check (stages/load_shed.py) of an instance whose waiters wait for the shared budget: a
    free local slot says nothing of the cluster's."""
    (a, store_a), (b, store_b) = _instance(redis_prefix, _cluster(1, max_queue=2)), \
        _instance(redis_prefix, _cluster(1, max_queue=2))
    try:
        held = await a.acquire(50)  # the whole budget, at the other instance
        assert not b.sheds(50)  # empty queue, a local slot: worth asking Redis
        waiters = [asyncio.create_task(b.acquire(10)) for _ in range(2)]
        # Both waiting; b's pump holds a local slot only while it asks Redis for a lease (then gives it
        # back, the budget being spent): wait for a moment between two asks.
        deadline = time.monotonic() + 3
        while not (b.queued == 2 and b.in_flight == 0):
            assert time.monotonic() < deadline, (b.queued, b.in_flight)
            await asyncio.sleep(0.001)
        assert b.sheds(10)  # full, and nobody of lower priority to evict
        assert not b.sheds(50)  # a claim would evict a bulk waiter
        await a.release(held)
        for next_slot in asyncio.as_completed(waiters, timeout=3):
            await b.release(await next_slot)
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()


async def test_the_budget_is_the_smallest_limit_of_the_live_instances(redis_prefix):
    """An instance whose limit is 3 sends one at a time while another's is 1; once that instance is gone
    (its announcement lapses after lease_ttl_s) its own 3 count again."""
    (a, store_a), (b, store_b) = _instance(redis_prefix, _cluster(3, ttl_s=0.6)), \
        _instance(redis_prefix, _cluster(1, ttl_s=0.6))
    try:
        await b.release(await b.acquire(50))  # b announces its limit, 1
        first = await a.acquire(50)
        assert first.cluster_limit == 1.0
        started = time.monotonic()
        second = await asyncio.wait_for(a.acquire(50), 3)  # waits: the cluster's budget is 1
        waited = time.monotonic() - started
        assert 0.3 < waited < 1.5 and second.cluster_limit == 3.0
        assert a.budget is not None and await a.budget.count() == 2
        await a.release(first)
        await a.release(second)
    finally:
        for bulkhead, store in ((a, store_a), (b, store_b)):
            await bulkhead.close()
            await store.close()
