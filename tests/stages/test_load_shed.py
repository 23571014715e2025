"""The early refusal: what the bulkhead or breaker would refuse is refused before authentication."""

from __future__ import annotations

import asyncio

import pytest

from mediator.app import METRICS, RUNTIME
from tests.conftest import channels_yaml
from tests.fault_injection import Faults, faulty_sandbox_app

CHANNELS = """\
- name: bulk-open
  path: ^/fhir/Medication/?$
  methods: [GET]
  upstream: openimis
  priority: bulk
  ip_allowlist: [local]
  authentication: none
- name: bulk-closed
  path: ^/fhir/Organization/?$
  methods: [GET]
  upstream: openimis
  priority: bulk
  ip_allowlist: [local]
- name: claims
  path: ^/fhir/Claim/?$
  methods: [GET]
  upstream: openimis
  ip_allowlist: [local]
"""


@pytest.fixture
async def held(sandbox, aiohttp_server, make_mediator):
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    url = f"http://{server.host}:{server.port}/api/api_fhir_r4/"
    client = await make_mediator(channels_yaml(url, channels=CHANNELS).replace(
        "    connect_timeout_s: 1\n",
        "    connect_timeout_s: 1\n    bulkhead: {max_concurrent: 1, max_queue: 1, retry_after_s: 4}\n"))
    faults.mode = "hold"
    first = asyncio.create_task(client.get("/fhir/Medication/"))
    await asyncio.wait_for(faults.arrived.wait(), 10)
    second = asyncio.create_task(client.get("/fhir/Medication/"))
    bulkhead = client.server.app[RUNTIME].current.protection.guards["openimis"].bulkhead
    while bulkhead.queued < 1:
        await asyncio.sleep(0.01)
    yield client, faults
    faults.gate.set()
    assert [(await first).status, (await second).status] == [200, 200]


def _decisions(client, stage: str, outcome: str, reason: str) -> float | None:
    return client.server.app[METRICS].registry.get_sample_value(
        "mediator_stage_decisions_total", {"stage": stage, "outcome": outcome, "reason": reason})


async def test_a_full_queue_refuses_before_authentication(held):
    client, faults = held
    refused = await client.get("/fhir/Organization/")  # no credentials at all: busy wins over 401
    assert refused.status == 503 and refused.headers["Retry-After"] == "4"
    assert (await refused.json())["issue"][0]["details"]["coding"][0]["code"] == "upstream.overloaded"
    assert _decisions(client, "load_shed", "deny", "upstream.overloaded") == 1
    assert _decisions(client, "authentication", "deny", "authentication.missing") is None
    assert client.server.app[METRICS].registry.get_sample_value(
        "mediator_bulkhead_rejections_total", {"upstream": "openimis", "reason": "queue_full"}) == 1


async def test_a_request_that_could_evict_a_waiter_is_not_shed(held):
    client, _ = held
    answer = await client.get("/fhir/Claim/")  # interactive outranks the queued bulk pull
    assert answer.status == 401  # so it went on to authentication (and was refused there)


async def test_an_open_breaker_refuses_before_authentication(sandbox_server, make_mediator):
    url = f"http://{sandbox_server.host}:{sandbox_server.port}/api/api_fhir_r4/"
    client = await make_mediator(channels_yaml(url, channels=CHANNELS))
    breaker = client.server.app[RUNTIME].current.protection.guards["openimis"].breaker
    assert (await client.get("/fhir/Organization/")).status == 401  # closed: authentication decides
    for _ in range(5):
        breaker.record_failure()
    refused = await client.get("/fhir/Organization/")
    assert refused.status == 503 and 1 <= int(refused.headers["Retry-After"]) <= 30
    assert (await refused.json())["issue"][0]["details"]["coding"][0]["code"] == "upstream.circuit_open"
    assert breaker.state == "open"  # the early check changed nothing
