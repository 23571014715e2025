"""Bulk submission: a batch Bundle becomes one create per entry, answered by a batch-response Bundle."""

from __future__ import annotations

import json

import pytest

from mediator.app import RUNTIME
from tests.conftest import channels_yaml
from tests.fault_injection import Faults, faulty_sandbox_app
from tests.test_idempotency import claim

CHANNELS = """\
  - name: claims-batch
    path: ^/fhir/?$
    methods: [POST]
    upstream: openimis
    priority: bulk
    ip_allowlist: [local]
    authentication: none
    idempotency: {}
    batch:
      max_entries: 4
  - name: claims
    path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
    methods: [GET, POST]
    upstream: openimis
    ip_allowlist: [local]
    authentication: none
    idempotency: {}
"""


def bundle(*entries, kind="batch"):
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource, url="Claim"):
    return {"request": {"method": "POST", "url": url}, "resource": resource}


@pytest.fixture
async def setup(sandbox, aiohttp_server, make_mediator):
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    url = f"http://{server.host}:{server.port}/api/api_fhir_r4/"
    rate = ("version: 1\nlimits:\n  - name: per-client\n    per: [client]\n    rate: 5\n    period_s: 60\n"
            "    on_store_error: deny\n    channels: [claims-batch]\n")
    client = await make_mediator(channels_yaml(url, channels=CHANNELS), extra_policies={"rate_limits.yaml": rate})
    yield client, faults
    faults.gate.set()


def _posts(faults: Faults) -> int:
    return len([1 for method, path in faults.forwarded if method == "POST" and path.endswith("/Claim/")])


async def _send(client, document):
    return await client.post("/fhir/", data=json.dumps(document), headers={"Content-Type": "application/fhir+json",
                                                                          "Accept": "application/fhir+json"})


def _statuses(answer):
    return [e["response"]["status"] for e in answer["entry"]]


def _reasons(answer):
    return [e["response"].get("outcome", {}).get("issue", [{}])[0].get("details", {}).get("coding", [{}])[0]
            .get("code") for e in answer["entry"]]


async def test_a_batch_is_split_and_answered_entry_by_entry(setup):
    client, faults = setup
    document = bundle(post(claim("B-1")), post({"resourceType": "Patient"}, "Patient"),
                      {"request": {"method": "GET", "url": "Claim/1"}}, post(claim("B-2")))
    response = await _send(client, document)
    assert response.status == 200 and response.content_type == "application/fhir+json"
    answer = await response.json()
    assert answer["resourceType"] == "Bundle" and answer["type"] == "batch-response"
    assert _statuses(answer) == ["201 Created", "400 Bad Request", "400 Bad Request", "201 Created"]
    assert _reasons(answer) == [None, "batch.entry_unsupported", "batch.entry_unsupported", None]
    assert answer["entry"][0]["resource"]["resourceType"] == "ClaimResponse"
    assert answer["entry"][0]["resource"]["id"] != answer["entry"][3]["resource"]["id"]
    assert [e["response"].get("location") for e in answer["entry"]] == \
        [f"Claim/{answer['entry'][0]['resource']['id']}", None, None, f"Claim/{answer['entry'][3]['resource']['id']}"]
    assert _posts(faults) == 2


async def test_a_repeated_batch_submits_nothing_twice(setup):
    client, faults = setup
    document = bundle(post(claim("B-1")), post(claim("B-2")))
    first = await (await _send(client, document)).json()
    # the single-POST channel shares the identifier, but not the channel: scoped separately
    again = await (await _send(client, document)).json()
    assert _statuses(again) == ["201 Created", "201 Created"]
    assert [e["resource"]["id"] for e in again["entry"]] == [e["resource"]["id"] for e in first["entry"]]
    assert _posts(faults) == 2


@pytest.mark.parametrize(
    ("document", "status", "reason"),
    [
        (bundle(post(claim("T-1")), kind="transaction"), 400, "batch.transaction_unsupported"),
        # Authorization reads every Bundle before the batch handler (it decides each entry) and refuses
        # what is not a batch or transaction itself.
        (bundle(post(claim("T-1")), kind="collection"), 400, "authorization.bundle_malformed"),
        (claim("T-1"), 400, "authorization.bundle_malformed"),
        (bundle(*[post(claim(f"T-{i}")) for i in range(5)]), 413, "batch.too_many_entries"),
    ],
)
async def test_what_is_not_a_batch_is_refused_whole(setup, document, status, reason):
    client, faults = setup
    response = await _send(client, document)
    assert response.status == status
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == reason
    assert _posts(faults) == 0


async def test_a_channel_without_batch_refuses_a_bundle(sandbox, aiohttp_server, make_mediator):
    faults = Faults()
    server = await aiohttp_server(faulty_sandbox_app(sandbox, faults))
    base_only = CHANNELS.split("  - name: claims\n")[0].replace("    batch:\n      max_entries: 4\n", "")
    client = await make_mediator(channels_yaml(f"http://{server.host}:{server.port}/api/api_fhir_r4/",
                                               channels=base_only))
    response = await _send(client, bundle(post(claim("N-1"))))
    assert response.status == 400
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "batch.not_enabled"
    assert faults.forwarded == []


async def test_a_batch_costs_one_rate_limit_unit_per_entry(setup):
    client, _ = setup
    first = await _send(client, bundle(*[post(claim(f"R-{i}")) for i in range(3)]))
    assert first.status == 200 and first.headers["RateLimit"] == '"per-client";r=2;t=36'
    second = await _send(client, bundle(*[post(claim(f"S-{i}")) for i in range(3)]))
    assert second.status == 429


async def test_entries_queue_in_the_bulkhead_and_report_503_when_refused(setup):
    client, faults = setup
    guard = client.server.app[RUNTIME].current.protection.guards["openimis"]
    for _ in range(5):  # the default failure_threshold
        guard.breaker.record_failure()
    answer = await (await _send(client, bundle(post(claim("O-1"))))).json()
    assert _statuses(answer) == ["503 Service Unavailable"]
    assert _reasons(answer) == ["upstream.circuit_open"]
    assert _posts(faults) == 0
