"""Idempotent claim submission: a repeated POST is answered from the first answer and reaches openIMIS
once, in memory and in Redis; concurrent duplicates; key scoping; what releases a key."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from mediator.app import METRICS
from mediator.config.models import ChannelConfig, IdempotencyConfig
from mediator.idempotency import Idempotency, InvalidKey, explicit_key, fingerprint, identifier_key
from mediator.pipeline import Exchange, Principal
from mediator.redis_store import RedisStore
from tests.conftest import channels_yaml
from tests.fault_injection import Faults, faulty_sandbox_app
from tests.load_helpers import SHARED_REDIS, redis_prefix, redis_server_section

__all__ = ["redis_prefix"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("abc-123", "header:abc-123"), ('"abc-123"', "header:abc-123"), (" k ", "header:k")],
)
def test_explicit_keys(header, expected):
    assert explicit_key(header) == expected


@pytest.mark.parametrize("header", ["", '""', "x" * 256, "caf\u00e9", "a\tb"])
def test_unusable_keys_are_refused(header):
    with pytest.raises(InvalidKey):
        explicit_key(header)


def test_identifier_keys_and_fingerprints():
    claim = {"resourceType": "Claim", "identifier": [{"system": "s2", "value": "B"}, {"value": "A"},
                                                      {"system": "s3"}]}
    assert identifier_key(claim) == "identifier:s2|B\n|A"
    assert identifier_key({"resourceType": "Claim"}) is None
    same = json.loads(json.dumps(claim, indent=4, sort_keys=True))
    assert fingerprint(same) == fingerprint(claim)
    assert fingerprint({**claim, "status": "active"}) != fingerprint(claim)


def claim(code: str, note: str = "") -> dict:
    resource = {"resourceType": "Claim", "status": "active",
                "identifier": [{"system": "https://openimis.org/claim-code", "value": code}]}
    if note:
        resource["note"] = note
    return resource


CLAIMS = """\
  - name: claims
    path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
    methods: [GET, POST]
    upstream: openimis
    timeout_s: {timeout}
    ip_allowlist: [local]
    authentication: none
    idempotency:
      in_flight: {in_flight}
"""


@pytest.fixture
async def faults_server(sandbox, aiohttp_server):
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    yield faults, f"http://{server.host}:{server.port}/api/api_fhir_r4/"
    faults.gate.set()


@pytest.fixture(params=["memory", "redis"])
def store_section(request) -> str:
    if request.param == "memory":
        return ""
    prefix = request.getfixturevalue("redis_prefix")
    return redis_server_section(SHARED_REDIS, prefix)


def _config(url: str, store_section: str, in_flight: str = "reject", timeout: float = 5) -> str:
    return channels_yaml(url, extra_server=store_section,
                         channels=CLAIMS.format(timeout=timeout, in_flight=in_flight))


def _posts(faults: Faults) -> int:
    return len([1 for method, path in faults.forwarded if method == "POST" and path.endswith("/Claim/")])


async def _post(client, resource, key=None):
    headers = {"Content-Type": "application/fhir+json"}
    if key:
        headers["Idempotency-Key"] = key
    return await client.post("/fhir/Claim", data=json.dumps(resource), headers=headers)


async def test_a_repeated_claim_is_submitted_once(faults_server, make_mediator, store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section))
    first = await _post(client, claim("C-1"))
    second = await _post(client, claim("C-1"))
    assert first.status == second.status == 201
    assert await first.read() == await second.read()
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert second.headers["Content-Type"].startswith("application/fhir+json")
    assert _posts(faults) == 1
    other = await _post(client, claim("C-2"))
    assert other.status == 201 and _posts(faults) == 2
    assert client.server.app[METRICS].registry.get_sample_value(
        "mediator_idempotent_replays_total", {"channel": "claims"}) == 1


async def test_the_header_key_wins_and_a_changed_body_is_422(faults_server, make_mediator, store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section))
    assert (await _post(client, claim("C-1"), key="k-1")).status == 201
    reused = await _post(client, claim("C-1", note="changed"), key="k-1")
    assert reused.status == 422
    assert (await reused.json())["issue"][0]["details"]["coding"][0]["code"] == "idempotency.key_reused"
    # the same identifier under a new explicit key is a new submission (the caller's escape hatch)
    assert (await _post(client, claim("C-1"), key="k-2")).status == 201
    assert _posts(faults) == 2


async def test_a_duplicate_while_the_first_is_in_flight_is_409(faults_server, make_mediator, store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section))
    faults.mode = "hold"
    first = asyncio.create_task(_post(client, claim("C-1")))
    await asyncio.wait_for(faults.arrived.wait(), 10)
    duplicate = await _post(client, claim("C-1"))
    assert duplicate.status == 409 and duplicate.headers["Retry-After"] == "1"
    assert (await duplicate.json())["issue"][0]["details"]["coding"][0]["code"] == "idempotency.in_flight"
    faults.gate.set()
    assert (await first).status == 201
    assert (await _post(client, claim("C-1"))).headers["Idempotent-Replayed"] == "true"
    assert _posts(faults) == 1


async def test_in_flight_wait_mode_answers_the_duplicate_with_the_first_answer(faults_server, make_mediator,
                                                                               store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section, in_flight="wait"))
    faults.mode = "hold"
    first = asyncio.create_task(_post(client, claim("C-1")))
    await asyncio.wait_for(faults.arrived.wait(), 10)
    duplicate = asyncio.create_task(_post(client, claim("C-1")))
    await asyncio.sleep(0.2)  # let the duplicate reach the store and start waiting
    faults.gate.set()
    a, b = await first, await duplicate
    assert (a.status, b.status) == (201, 201)
    assert await a.read() == await b.read()
    assert _posts(faults) == 1


async def test_an_error_answer_releases_the_key(faults_server, make_mediator, store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section))
    faults.mode = "fail502"
    assert (await _post(client, claim("C-1"))).status == 502
    faults.mode = "ok"
    assert (await _post(client, claim("C-1"))).status == 201
    assert _posts(faults) == 1


async def test_a_timed_out_first_attempt_blocks_resubmission(faults_server, make_mediator, store_section):
    faults, url = faults_server
    client = await make_mediator(_config(url, store_section, timeout=0.3))
    faults.mode = "hold"
    assert (await _post(client, claim("C-1"))).status == 504
    faults.mode = "ok"
    again = await _post(client, claim("C-1"))
    assert again.status == 409
    assert (await again.json())["issue"][0]["details"]["coding"][0]["code"] == "idempotency.outcome_unknown"
    faults.gate.set()


async def test_keys_are_scoped_per_client(redis_prefix):
    from mediator.config.models import RedisConfig
    redis = RedisStore(RedisConfig(url=SHARED_REDIS, key_prefix=redis_prefix))
    idempotency = Idempotency(redis)
    channel = ChannelConfig(name="claims", path="^/fhir/Claim/?$", methods=("POST",), upstream="openimis",
                            idempotency=IdempotencyConfig())
    sent: list[str] = []

    def exchange(principal):
        return Exchange(request=None, request_id="r", client_ip=ipaddress.ip_address("192.0.2.1"),  # type: ignore
                        principal=principal)

    def send_as(who):
        async def send():
            from aiohttp import web
            sent.append(who)
            return web.json_response({"resourceType": "ClaimResponse", "id": who}, status=201)
        return send

    try:
        for who in ("vendor-a", "vendor-b", "vendor-a"):
            answer = await idempotency.create(exchange(Principal(who, "mtls")), channel, "Claim", claim("C-1"),
                                              "same-key", send_as(who))
            assert json.loads(answer.body)["id"] == who   # never another vendor's answer
        assert sent == ["vendor-a", "vendor-b"]
    finally:
        await redis.close()
