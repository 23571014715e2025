"""Queued submission under real faults: two `openimis-mediator serve` processes, a redis-server started
here with AOF (appendfsync always, its own port and directory), the REAL openIMIS behind a TCP relay this
test controls (refusing connections is openIMIS being unreachable: a real network fault, not a mock).
Every test ends by counting, in openIMIS's own database, that each claim answered 202 exists once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from joserfc.jwk import ECKey

from tests.conftest import DEFAULT_IP_POLICY, write_config
from tests.e2e.async_kit import CHANNELS, POLICIES, PREFER_ASYNC, claims_in_openimis
from tests.e2e.conftest import e2e_channels, harness
from tests.e2e.vendors import Vendor, _claim_for, _client
from tests.operations.support import eventually, free_port, mediator_process, port_open

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(120)]

# The fault tests send dozens of claims: under a facility no other e2e test pages through (their walks
# over one facility's claims are bounded), by a vendor of that facility.
FACILITY = "UPHOS001"
VENDOR = "vendor-up"
FAULT_POLICIES = {**POLICIES, "clients.yaml": "version: 1\ntoken_service:\n  signing_key_file: "
                  "keys/mediator-signing.key\nclients:\n" + _client(VENDOR, FACILITY)}

FAST_ASYNC = "{reclaim_idle_s: 2, retry_initial_s: 0.2, retry_max_s: 1, poll_interval_s: 0.1, drain_concurrency: 2}"


class Relay:
    """TCP relay between the mediators and openIMIS. open(): forwards; refuse(): nothing listens on the
    port (connections are refused) and open connections are cut; hold_answers(): requests still reach
    openIMIS but its answers are held back until release() (an answer lost in the network)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._answers = asyncio.Event()
        self._answers.set()

    def hold_answers(self) -> None:
        self._answers.clear()

    def release(self) -> None:
        self._answers.set()

    async def open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await src.read(65536):
                    if answers:
                        await self._answers.wait()
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        self._writers.difference_update((writer, up_writer))


class RedisServer:
    """redis-server with AOF fsync'ed on every write, on its own port and directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


class FacilityVendor(Vendor):
    """tests/e2e/vendors.py's Vendor, for a vendor of FACILITY (its claim administrator as the user)."""

    def __init__(self, client: Any, key: ECKey) -> None:
        self.client, self.name, self.key = client, VENDOR, key
        self.facility = FACILITY
        self.access_token = ""

    def user_token(self, user: str | None = None, facility: str | None = None) -> str:
        return super().user_token(user or harness.HEALTH_FACILITIES[FACILITY][1], facility or FACILITY)


class Instance:
    """One serve process seen over HTTP, with its own vendor login (access tokens are per instance)."""

    def __init__(self, session: aiohttp.ClientSession, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.session, self.port, self.proc = session, port, proc
        self.vendor: FacilityVendor | None = None

    async def request(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        response = await self.session.request(method, f"http://127.0.0.1:{self.port}{path}", **kwargs)
        await response.read()
        return response

    async def post(self, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.request("POST", path, **kwargs)

    async def submit(self, claim: dict[str, Any]) -> tuple[aiohttp.ClientResponse, float]:
        assert self.vendor is not None
        started = time.monotonic()
        response = await self.vendor.request("POST", "/fhir/Claim", json=claim, headers=PREFER_ASYNC)
        return response, time.monotonic() - started

    async def status(self, location: str) -> aiohttp.ClientResponse:
        assert self.vendor is not None
        return await self.vendor.request("GET", location.removeprefix("https://mediator.example.org"))


@pytest.fixture
async def cluster(openimis: dict[str, Any], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Two serve instances sharing one config and one AOF Redis, openIMIS behind the relay (open)."""
    target = (openimis["base_url"].split("//")[1].split(":")[0], int(openimis["port"]))
    relay = Relay(target)
    await relay.open()
    (tmp_path / "redis").mkdir()
    key = ECKey.generate_key("P-256")
    with redis_server(tmp_path / "redis") as redis:
        await eventually(lambda: port_open(redis.port), what="redis-server to listen")
        fhir = f"http://127.0.0.1:{relay.port}/api/api_fhir_r4/"
        ports = [free_port(), free_port()]
        processes = []
        with contextlib.ExitStack() as stack:
            for n, port in enumerate(ports):
                server = (f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                          f"redis: {{url: \"{redis.url}\", key_prefix: \"faults:\", timeout_s: 2}}\n"
                          "shutdown: {drain_timeout_s: 2}\n")
                channels = e2e_channels(fhir, CHANNELS.replace("{reclaim_idle_s: 3, retry_initial_s: 0.2, "
                                                               "retry_max_s: 1, poll_interval_s: 0.1}", FAST_ASYNC),
                                        extra_server=server).replace("timeout_s: 30", "timeout_s: 5")
                channels = channels.replace("    connect_timeout_s: 1\n",
                                            "    connect_timeout_s: 1\n    circuit_breaker: {open_s: 1}\n")
                root = write_config(tmp_path / f"config{n}", channels, DEFAULT_IP_POLICY, FAULT_POLICIES)
                (root / "keys").mkdir()
                (root / "keys" / f"{VENDOR}.pem").write_bytes(key.as_pem(private=False))
                processes.append(stack.enter_context(mediator_process(root, log_file=tmp_path / f"mediator{n}.log")))
            async with aiohttp.ClientSession() as session:
                instances = [Instance(session, port, proc) for port, proc in zip(ports, processes, strict=True)]
                for instance in instances:
                    await eventually(lambda i=instance: port_open(i.port), 20, "a mediator to listen")
                    instance.vendor = FacilityVendor(instance, key)
                    await instance.vendor.login()
                # Each instance reaches openIMIS once (its facility directory loads; authorization serves it
                # stale while openIMIS is away): one queued claim each, delivered.
                warm = [_claim_for(FACILITY) for _ in instances]
                for instance, claim in zip(instances, warm, strict=True):
                    response, _ = await instance.submit(claim)
                    assert response.status == 202, await response.text()
                    await settled(instance, response.headers["Content-Location"], 30)
                yield {"relay": relay, "redis": redis, "instances": instances, "openimis": openimis}
    await relay.refuse()


async def settled(instance: Instance, location: str, timeout: float) -> aiohttp.ClientResponse:
    deadline = time.monotonic() + timeout
    while True:
        response = await instance.status(location)
        store_down = response.status == 503 and "async.store_unavailable" in await response.text()
        if response.status != 202 and not store_down:  # 503 + Retry-After: a client asks again
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{location} not settled after {timeout}s")
        await asyncio.sleep(0.2)


def code(claim: dict[str, Any]) -> str:
    return str(claim["identifier"][0]["value"])


async def submit_all(instances: list[Instance], claims: list[dict[str, Any]]) -> list[str]:
    """Submit alternately to the instances; each must be accepted (202) within 2 s."""
    locations = []
    for n, claim in enumerate(claims):
        response, elapsed = await instances[n % len(instances)].submit(claim)
        assert response.status == 202, await response.text()
        assert elapsed < 2.0, f"accepting took {elapsed:.2f}s"
        locations.append(response.headers["Content-Location"])
    return locations


async def all_delivered(instances: list[Instance], locations: list[str], timeout: float) -> None:
    for location in locations:
        final = await settled(instances[-1], location, timeout)
        assert final.status in (200, 201), await final.text()  # 200: found in openIMIS after a lost answer
        assert (await final.json())["resourceType"] == "ClaimResponse"


async def test_openimis_unreachable_claims_are_accepted_then_all_delivered(cluster):
    relay, instances = cluster["relay"], cluster["instances"]
    await relay.refuse()
    claims = [_claim_for(FACILITY) for _ in range(8)]
    locations = await submit_all(instances, claims)
    await asyncio.sleep(1.5)  # the drains try, fail (connection refused) and back off
    codes = [code(c) for c in claims]
    assert claims_in_openimis(cluster["openimis"], codes) == dict.fromkeys(codes, 0)
    assert [(await instances[0].status(loc)).status for loc in locations] == [202] * len(locations)
    await relay.open()
    await all_delivered(instances, locations, 40)
    assert claims_in_openimis(cluster["openimis"], codes) == dict.fromkeys(codes, 1)


async def _pending_of(redis_url: str, pid: int) -> int:
    store = aioredis.from_url(redis_url)
    try:
        total = 0
        async for stream in store.scan_iter("faults:async-q:*"):
            for consumer in await store.xinfo_consumers(stream, "drain"):
                name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
                if f"-{pid}-" in name:
                    total += int(consumer["pending"])
        return total
    finally:
        await store.aclose()


async def test_an_instance_killed_mid_drain_leaves_its_entries_to_the_other(cluster):
    relay, instances, redis = cluster["relay"], cluster["instances"], cluster["redis"]
    victim, survivor = instances
    await relay.refuse()  # a backlog builds
    claims = [_claim_for(FACILITY) for _ in range(12)]
    codes = [code(c) for c in claims]
    locations = await submit_all([victim], claims)
    # openIMIS receives (and saves) the claims being delivered, but its answers are held back: at most
    # drain_concurrency (2) per instance are in flight, so 3 claims in openIMIS mean the victim has sent
    # at least one whose answer it will never see.
    relay.hold_answers()
    await relay.open()
    deadline = time.monotonic() + 20
    while sum(claims_in_openimis(cluster["openimis"], codes).values()) < 3:
        assert time.monotonic() < deadline, "deliveries never reached openIMIS"
        await asyncio.sleep(0.1)
    assert await _pending_of(redis.url, victim.proc.pid) > 0
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    relay.release()
    await all_delivered([survivor], locations, 45)
    assert claims_in_openimis(cluster["openimis"], codes) == dict.fromkeys(codes, 1)
    # The victim's claims were taken over, looked up in openIMIS and found there (200), not sent again.
    finals = [(await survivor.status(loc)).status for loc in locations]
    assert 200 in finals, finals


async def test_redis_killed_and_restarted_loses_nothing_acknowledged(cluster):
    relay, instances, redis = cluster["relay"], cluster["instances"], cluster["redis"]
    await relay.refuse()  # keep everything queued while Redis dies
    claims = [_claim_for(FACILITY) for _ in range(8)]
    locations = await submit_all(instances, claims)
    redis.kill()
    refused, _ = await instances[0].submit(_claim_for(FACILITY))
    assert refused.status == 503  # not acknowledged: the caller knows to retry
    redis.start()
    await eventually(lambda: port_open(redis.port), 10, "redis-server to come back")
    await relay.open()
    await all_delivered(instances, locations, 45)
    codes = [code(c) for c in claims]
    assert claims_in_openimis(cluster["openimis"], codes) == dict.fromkeys(codes, 1)
    assert os.path.exists(redis.dir / "appendonlydir") or any(redis.dir.glob("appendonly*"))

