"""The adaptive concurrency limit in front of the REAL openIMIS: it measures openIMIS's own unloaded
answer time and never lets a burst put more than its ceiling in flight. A counting relay sits between the
mediator and openIMIS (it forwards every byte and records how many requests openIMIS has at once)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from mediator.app import METRICS
from tests.conftest import channels_yaml

FORWARDED_REQUEST_HEADERS = ("Authorization", "Content-Type", "Accept")

CHANNELS = """\
- name: eligibility
  path: ^/fhir/Patient/?$
  methods: [GET]
  upstream: openimis
  timeout_s: 30
  ip_allowlist: [local]
  authentication: none
"""

ADAPTIVE = ("    bulkhead: {mode: adaptive, min_concurrent: 1, initial_concurrent: 2, max_concurrent: 3,"
            " max_queue: 200, max_wait_s: 30,"
            " adaptive: {window_s: 0.3, min_samples: 3, probe_samples: 5}}\n")


class CountingRelay:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.in_flight = 0
        self.max_in_flight = 0
        self.answer_ms: list[float] = []
        self.session: aiohttp.ClientSession | None = None

    async def relay(self, request: web.Request) -> web.Response:
        assert self.session is not None
        counted = not request.path.endswith("/login/")
        if counted:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        started = time.perf_counter()
        try:
            headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := request.headers.get(k)) is not None}
            async with self.session.request(request.method, self.target + request.rel_url.path_qs,
                                            headers=headers, data=await request.read()) as answer:
                body = await answer.read()
                return web.Response(status=answer.status, body=body,
                                    content_type=answer.content_type or "application/json")
        finally:
            if counted:
                self.in_flight -= 1
                self.answer_ms.append((time.perf_counter() - started) * 1000)


@pytest.fixture
async def relay(openimis, aiohttp_server):
    origin = openimis["base_url"].rstrip("/")
    counting = CountingRelay(origin)
    counting.session = aiohttp.ClientSession()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counting.relay)
    server = await aiohttp_server(app)
    prefix = openimis["fhir_base_url"][len(origin):].rstrip("/") + "/"
    yield counting, f"http://127.0.0.1:{server.port}{prefix}"
    await counting.session.close()


async def test_a_burst_reaches_openimis_at_most_at_the_ceiling_and_the_unloaded_time_is_openimis_own(
        relay, make_mediator):
    counting, relay_base = relay
    channels = channels_yaml(relay_base, channels=CHANNELS).replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n" + ADAPTIVE)
    client = await make_mediator(channels)

    async def lookup() -> int:
        response = await client.get("/fhir/Patient/?identifier=070707070")
        await response.read()
        return response.status

    statuses = await asyncio.wait_for(asyncio.gather(*(lookup() for _ in range(40))), 120)
    assert statuses == [200] * 40  # all waited their turn in the queue; none was refused
    assert 1 <= counting.max_in_flight <= 3
    registry = client.server.app[METRICS].registry
    min_rtt_s = registry.get_sample_value("mediator_upstream_min_rtt_seconds", {"upstream": "openimis"})
    limit = registry.get_sample_value("mediator_concurrency_limit", {"upstream": "openimis"})
    assert min_rtt_s is not None and limit is not None and 1 <= limit <= 3
    # The probe ran at one request in flight: its answer times are openIMIS's own, as the relay saw them.
    assert min(counting.answer_ms) / 1000 <= min_rtt_s <= max(counting.answer_ms) / 1000 + 0.05
