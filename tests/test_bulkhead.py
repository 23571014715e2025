"""Upstream bulkhead and circuit breaker: pure transitions, queue order, and over real sockets."""

from __future__ import annotations

import asyncio

import pytest

from mediator.app import METRICS, RUNTIME
from mediator.bulkhead import Bulkhead, CircuitBreaker, Slot, UpstreamRefused
from mediator.config.models import BulkheadConfig, CircuitBreakerConfig
from tests.conftest import channels_yaml
from tests.fault_injection import Faults, faulty_sandbox_app


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# (event, clock advance before it, expected state after, expected refusal reason or None)
BREAKER_SCRIPT = [
    ("call", 0, "closed", None), ("failure", 0, "closed", None),
    ("call", 0, "closed", None), ("success", 0, "closed", None),          # success resets the count
    ("call", 0, "closed", None), ("failure", 0, "closed", None),
    ("call", 0, "closed", None), ("failure", 0, "closed", None),
    ("call", 0, "closed", None), ("failure", 0, "open", None),            # 3 in a row: open
    ("call", 10, "open", "upstream.circuit_open"),                         # open_s is 30
    ("call", 20, "half_open", None),                                       # 30 s later: one trial
    ("call", 0, "half_open", "upstream.circuit_open"),                     # only one trial at a time
    ("failure", 0, "open", None),                                          # the trial failed
    ("call", 29, "open", "upstream.circuit_open"),
    ("call", 1, "half_open", None), ("success", 0, "closed", None),
    ("call", 0, "closed", None),
]


def test_breaker_transitions():
    clock = Clock()
    breaker = CircuitBreaker("openimis", CircuitBreakerConfig(failure_threshold=3, open_s=30), clock=clock)
    for step, (event, advance, state, refusal) in enumerate(BREAKER_SCRIPT):
        clock.now += advance
        refused = None
        if event == "call":
            try:
                breaker.before_call()
            except UpstreamRefused as exc:
                refused = exc.reason
        elif event == "failure":
            breaker.record_failure()
        else:
            breaker.record_success()
        assert (breaker.state, refused) == (state, refusal), step


def test_open_breaker_says_when_to_come_back():
    clock = Clock()
    breaker = CircuitBreaker("openimis", CircuitBreakerConfig(failure_threshold=1, open_s=30), clock=clock)
    breaker.record_failure()
    clock.now += 12.5
    with pytest.raises(UpstreamRefused) as info:
        breaker.before_call()
    assert info.value.retry_after_s == 18


async def test_waiters_get_slots_by_priority_then_arrival():
    bulkhead = Bulkhead("openimis", BulkheadConfig(max_concurrent=1, max_queue=3))
    await bulkhead.acquire(50)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await bulkhead.acquire(priority)
        order.append(name)

    tasks = []
    for name, priority in [("bulk-1", 10), ("claim", 50), ("bulk-2", 10)]:
        tasks.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0)
    assert bulkhead.queued == 3
    for _ in range(3):
        await bulkhead.release(Slot())
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["claim", "bulk-1", "bulk-2"]
    assert bulkhead.in_flight == 1 and bulkhead.queued == 0


async def test_a_full_queue_refuses_unless_the_newcomer_outranks_a_waiter():
    bulkhead = Bulkhead("openimis", BulkheadConfig(max_concurrent=1, max_queue=1))
    await bulkhead.acquire(50)
    bulk = asyncio.create_task(bulkhead.acquire(10))
    await asyncio.sleep(0)
    with pytest.raises(UpstreamRefused) as same_rank:
        await bulkhead.acquire(10)
    assert same_rank.value.reason == "upstream.overloaded"
    claim = asyncio.create_task(bulkhead.acquire(50))   # outranks the queued bulk pull: evicts it
    await asyncio.sleep(0)
    with pytest.raises(UpstreamRefused):
        await bulk
    await bulkhead.release(Slot())
    await claim
    assert bulkhead.in_flight == 1 and bulkhead.queued == 0


LIMITED = """\
  - name: master-data
    path: ^/fhir/(Medication|Organization)(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    priority: bulk
    ip_allowlist: [local]
    authentication: none
"""


def _upstream_yaml(url: str, extra: str) -> str:
    return channels_yaml(url, channels=LIMITED).replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n" + extra)


@pytest.fixture
async def faults_server(sandbox, aiohttp_server):
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    yield faults, f"http://{server.host}:{server.port}/api/api_fhir_r4/"
    faults.gate.set()


async def test_queue_overflow_is_503_with_retry_after(faults_server, make_mediator):
    faults, url = faults_server
    client = await make_mediator(_upstream_yaml(
        url, "    bulkhead:\n      max_concurrent: 1\n      max_queue: 1\n      retry_after_s: 7\n"))
    faults.mode = "hold"
    first = asyncio.create_task(client.get("/fhir/Medication/"))
    await asyncio.wait_for(faults.arrived.wait(), 10)  # one request is with openIMIS
    second = asyncio.create_task(client.get("/fhir/Medication/"))
    runtime = client.server.app[RUNTIME].current
    bulkhead = runtime.protection.guards["openimis"].bulkhead
    while bulkhead.queued < 1:                        # the second is queued
        await asyncio.sleep(0.01)
    third = await client.get("/fhir/Medication/")
    assert third.status == 503
    assert third.headers["Retry-After"] == "7"
    assert (await third.json())["issue"][0]["details"]["coding"][0]["code"] == "upstream.overloaded"
    faults.gate.set()
    assert [(await first).status, (await second).status] == [200, 200]
    metrics = client.server.app[METRICS]
    assert metrics.registry.get_sample_value("mediator_bulkhead_rejections_total",
                                             {"upstream": "openimis", "reason": "queue_full"}) == 1
    assert metrics.registry.get_sample_value("mediator_bulkhead_in_flight", {"upstream": "openimis"}) == 0


async def test_breaker_opens_answers_fast_without_openimis_and_recovers(faults_server, make_mediator):
    faults, url = faults_server
    client = await make_mediator(_upstream_yaml(
        url, "    circuit_breaker:\n      failure_threshold: 2\n      open_s: 30\n"))
    runtime = client.server.app[RUNTIME].current
    breaker = runtime.protection.guards["openimis"].breaker
    clock = Clock()
    breaker._clock = clock
    assert (await client.get("/fhir/Medication/")).status == 200
    faults.mode = "fail502"
    assert [(await client.get("/fhir/Medication/")).status for _ in range(2)] == [502, 502]
    forwarded = len(faults.forwarded)
    faults.mode = "ok"
    refused = await client.get("/fhir/Medication/")
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "30"
    assert (await refused.json())["issue"][0]["details"]["coding"][0]["code"] == "upstream.circuit_open"
    assert len(faults.forwarded) == forwarded         # openIMIS was not contacted
    metrics = client.server.app[METRICS]
    assert metrics.registry.get_sample_value("mediator_circuit_state", {"upstream": "openimis"}) == 2
    clock.now += 30
    assert (await client.get("/fhir/Medication/")).status == 200   # the half-open trial succeeds
    assert breaker.state == "closed"
    assert metrics.registry.get_sample_value("mediator_circuit_state", {"upstream": "openimis"}) == 0


async def test_unreachable_openimis_opens_the_breaker(make_mediator, unused_tcp_port):
    client = await make_mediator(_upstream_yaml(
        f"http://127.0.0.1:{unused_tcp_port}/api/api_fhir_r4/",
        "    circuit_breaker:\n      failure_threshold: 2\n"))
    statuses = [(await client.get("/fhir/Medication/")).status for _ in range(3)]
    assert statuses == [502, 502, 503]
