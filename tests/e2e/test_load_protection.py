"""The adaptive concurrency limit in front of the REAL openIMIS: it measures openIMIS's own unloaded
answer time and never lets a burst put more than its ceiling in flight. A counting relay sits between the
mediator and openIMIS (it forwards every byte and records how many requests openIMIS has at once). The
shipped latency probe is a cheap request openIMIS answers, and it sees openIMIS's workers get busy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from mediator.app import METRICS, RUNTIME
from mediator.concurrency_limit import GradientLimit
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


SHIPPED = yaml.safe_load((Path(__file__).resolve().parents[2] / "channels.yaml").read_text())


async def test_the_shipped_latency_probe_is_answered_and_sees_openimis_workers_get_busy(openimis, make_mediator):
    """No API request goes through the mediator here: the web app's kind of load (GraphQL insuree
    searches, straight to openIMIS, 4 at once: both sync workers busy) makes the shipped probe slower
    than its tolerance over its baseline, and the limit goes down to the floor by itself."""
    probe = dict(SHIPPED["upstreams"]["openimis"]["bulkhead"]["adaptive"]["latency_probe"])
    probe["interval_s"] = 0.2
    bulkhead = {"mode": "adaptive", "min_concurrent": 0.2, "initial_concurrent": 2, "max_concurrent": 4,
                "adaptive": {"window_s": 0.5, "probe_samples": 1, "latency_probe": probe}}
    flow = yaml.safe_dump(bulkhead, default_flow_style=True, width=10_000).strip()
    channels = channels_yaml(openimis["fhir_base_url"].rstrip("/") + "/", channels=CHANNELS).replace(
        "    connect_timeout_s: 1\n", f"    connect_timeout_s: 1\n    bulkhead: {flow}\n")
    client = await make_mediator(channels)
    limit = client.server.app[RUNTIME].current.protection.guards["openimis"].bulkhead.limit
    assert isinstance(limit, GradientLimit)
    limit.record(0.05)  # end the minimum-RTT measurement (probe_samples 1): the probe's verdicts count
    registry = client.server.app[METRICS].registry
    labels = {"upstream": "openimis"}

    def answered() -> float:
        return registry.get_sample_value("mediator_latency_probes_total", {**labels, "outcome": "answered"}) or 0

    async with asyncio.timeout(30):
        while answered() < 10:
            await asyncio.sleep(0.1)
    assert registry.get_sample_value("mediator_latency_probes_total", {**labels, "outcome": "failed"}) is None \
        or registry.get_sample_value("mediator_latency_probes_total", {**labels, "outcome": "failed"}) == 0
    baseline = registry.get_sample_value("mediator_latency_probe_baseline_seconds", labels)
    assert baseline is not None and 0 < baseline < 1.0  # openIMIS answers the shipped probe, and quickly
    assert limit.value >= 1  # idle openIMIS: no cut

    login = await asyncio.to_thread(openimis_graphql_token, openimis)
    stop = asyncio.Event()

    async def web_user(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(openimis["graphql_url"], json={"query": INSUREES_QUERY},
                                    headers={"Authorization": f"Bearer {login}"}) as answer:
                await answer.read()

    async with aiohttp.ClientSession() as session:
        users = [asyncio.create_task(web_user(session)) for _ in range(4)]
        try:
            async with asyncio.timeout(60):
                while limit.value > 0.2:
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*users, return_exceptions=True)
    assert registry.get_sample_value("mediator_concurrency_limit", labels) == 0.2


INSUREES_QUERY = "{ insurees(first: 10, orderBy: [\"chfId\"]) { totalCount edges { node { id uuid chfId } } } }"


def openimis_graphql_token(openimis: dict[str, str]) -> str:
    import json
    import urllib.request
    body = json.dumps({"query": "mutation($u:String!,$p:String!){tokenAuth(username:$u,password:$p){token}}",
                       "variables": {"u": "Admin", "p": "admin123"}}).encode()
    request = urllib.request.Request(openimis["graphql_url"], data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(json.loads(answer.read())["data"]["tokenAuth"]["token"])
