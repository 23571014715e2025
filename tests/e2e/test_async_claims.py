"""Queued claim submission (FHIR `Prefer: respond-async`) through the whole pipeline, against the REAL
openIMIS: accepted → 202 + status URL → delivered once (checked in openIMIS's database); refusals stay
synchronous and are never queued; the status URL answers only the submitter."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from joserfc.jwk import ECKey

from mediator.app import METRICS
from tests.conftest import DEFAULT_IP_POLICY
from tests.e2e.async_kit import CHANNELS, POLICIES, PREFER_ASYNC, VENDORS, claims_in_openimis, wait_settled
from tests.e2e.conftest import e2e_channels, harness
from tests.e2e.vendors import Vendor, _claim_for, _reason, per_user_budget

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(300)]


@pytest.fixture
async def queued(request, openimis, tmp_path: Path, make_mediator):  # type: ignore[no-untyped-def]
    """(vendors, redis prefix); policies POLICIES plus the test's own (indirect param: file name -> text)."""
    policies = {**POLICIES, **getattr(request, "param", {})}
    keys = {name: ECKey.generate_key("P-256") for name in VENDORS}
    root = tmp_path / "config"
    (root / "keys").mkdir(parents=True)
    for name, key in keys.items():
        (root / "keys" / f"{name}.pem").write_bytes(key.as_pem(private=False))
    prefix = f"e2e-async-{uuid.uuid4().hex[:8]}:"
    redis = f"redis:\n  url: redis://127.0.0.1:6379/0\n  key_prefix: \"{prefix}\"\n  timeout_s: 2\n"
    client = await make_mediator(e2e_channels(openimis["fhir_base_url"], channels=CHANNELS, extra_server=redis),
                                 DEFAULT_IP_POLICY, policies)
    vendors = {name: Vendor(client, name, keys[name]) for name in VENDORS}
    for vendor in vendors.values():
        await vendor.login()
    yield vendors, prefix
    store = aioredis.from_url("redis://127.0.0.1:6379/0")
    left = [k async for k in store.scan_iter(f"{prefix}*")]
    if left:
        await store.delete(*left)
    await store.aclose()


def _code(claim: dict) -> str:
    return str(claim["identifier"][0]["value"])


async def test_a_queued_claim_is_accepted_then_delivered_once(queued, openimis):
    vendors, _ = queued
    jm = vendors["vendor-jm"]
    claim = _claim_for("JMHOS001")
    accepted = await jm.request("POST", "/fhir/Claim", json=claim, headers=PREFER_ASYNC)
    assert accepted.status == 202, await accepted.text()
    status_url = accepted.headers["Content-Location"]
    assert status_url.startswith("https://mediator.example.org/fhir/_async/claims/")
    assert _reason(await accepted.json()) == "async.accepted"
    path = status_url.removeprefix("https://mediator.example.org")

    final = await wait_settled(lambda url: jm.request("GET", url), path)
    assert final.status == 201, await final.text()
    claim_response = await final.json()
    assert claim_response["resourceType"] == "ClaimResponse"
    assert claims_in_openimis(openimis, [_code(claim)]) == {_code(claim): 1}

    # The same submission again: the first 202 (same status URL), not a second claim.
    again = await jm.request("POST", "/fhir/Claim", json=claim, headers=PREFER_ASYNC)
    assert again.status == 202
    assert again.headers["Content-Location"] == status_url
    assert again.headers.get("Idempotent-Replayed") == "true"
    # The ClaimResponse is readable as usual, and the status URL keeps answering the outcome.
    read = await jm.request("GET", f"/fhir/ClaimResponse/{claim_response['id']}")
    assert read.status == 200
    assert (await jm.request("GET", path)).status == 201
    assert claims_in_openimis(openimis, [_code(claim)]) == {_code(claim): 1}
    registry = jm.client.server.app[METRICS].registry
    labels = {"channel": "claims", "client": "vendor-jm"}
    assert registry.get_sample_value("mediator_async_accepted_total", labels) == 1
    assert registry.get_sample_value("mediator_async_outcomes_total", {**labels, "outcome": "delivered"}) == 1


async def test_the_status_url_answers_only_the_submitter(queued):
    vendors, _ = queued
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    accepted = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"), headers=PREFER_ASYNC)
    assert accepted.status == 202
    path = accepted.headers["Content-Location"].removeprefix("https://mediator.example.org")
    unknown = f"/fhir/_async/claims/{uuid.uuid4().hex}"
    # Another vendor: the same 404 as an unknown id.
    for response in (await ra.request("GET", path), await ra.request("GET", unknown)):
        assert response.status == 404
        assert _reason(await response.json()) == "async.not_found"
    # The vendor's user of a facility it does not serve is refused by authentication, for a real id
    # exactly as for an unknown one.
    other_user = {"X-User-Token": jm.user_token("RHOS0011", "RAHOS001")}
    foreign_user = await jm.request("GET", path, headers=other_user)
    foreign_unknown = await jm.request("GET", unknown, headers=other_user)
    assert foreign_user.status == foreign_unknown.status >= 403
    assert _reason(await foreign_user.json()) == _reason(await foreign_unknown.json())
    anonymous = await jm.client.get(path)
    assert anonymous.status == 401
    cancel = await jm.request("DELETE", path)  # cancelling is not offered
    assert cancel.status == 400 and _reason(await cancel.json()) == "channel.malformed_path"
    assert (await wait_settled(lambda url: jm.request("GET", url), path)).status == 201
    # The id under another async channel's name is not that URL's job; the earlier URL form (no channel)
    # still answers the submitter, and nobody else.
    job_id = path.rsplit("/", 1)[1]
    other_channel = await jm.request("GET", f"/fhir/_async/claim-batch/{job_id}")
    assert (other_channel.status, _reason(await other_channel.json())) == (404, "async.not_found")
    assert (await jm.request("GET", f"/fhir/_async/{job_id}")).status == 201
    assert (await ra.request("GET", f"/fhir/_async/{job_id}")).status == 404


POLL_LIMIT = {"rate_limits.yaml": per_user_budget(3, ("claims",))}


@pytest.mark.parametrize("queued", [POLL_LIMIT], indirect=True)
async def test_status_polls_count_in_the_channels_rate_limits(queued):
    vendors, _ = queued
    jm = vendors["vendor-jm"]
    unknown = f"/fhir/_async/claims/{uuid.uuid4().hex}"   # an unknown id is judged by its URL's channel's limits
    polls = [await jm.request("GET", unknown) for _ in range(3)]
    assert [p.status for p in polls] == [404, 404, 404]
    assert [int(p.headers["RateLimit"].split(";r=")[1].split(";")[0]) for p in polls] == [2, 1, 0]
    refused = await jm.request("GET", unknown)
    assert (refused.status, _reason(await refused.json())) == (429, "rate_limit.exceeded")
    assert refused.headers["Retry-After"].isdigit()
    # another vendor's user has its own budget
    assert (await vendors["vendor-ra"].request("GET", unknown)).status == 404


async def test_refusals_are_synchronous_and_never_queued(queued, openimis):
    vendors, prefix = queued
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    foreign = _claim_for("JMHOS001")
    refused = await ra.request("POST", "/fhir/Claim", json=foreign, headers=PREFER_ASYNC)
    assert refused.status == 403
    assert "Content-Location" not in refused.headers
    assert _reason(await refused.json()).startswith("authorization.")
    broken = await jm.request("POST", "/fhir/Claim", data=b"{", headers={**PREFER_ASYNC,
                                                                        "Content-Type": "application/json"})
    assert broken.status == 400
    store = aioredis.from_url("redis://127.0.0.1:6379/0")
    try:
        assert [k async for k in store.scan_iter(f"{prefix}async-job:*")] == []
    finally:
        await store.aclose()
    assert claims_in_openimis(openimis, [_code(foreign)]) == {_code(foreign): 0}
    # Without the header, submission stays synchronous.
    direct = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"))
    assert direct.status == 201


async def test_a_definitive_refusal_is_recorded_and_not_retried(queued, openimis):
    vendors, prefix = queued
    jm = vendors["vendor-jm"]
    first = _claim_for("JMHOS001")
    assert (await jm.request("POST", "/fhir/Claim", json=first)).status == 201
    # A different claim reusing that claim code: openIMIS refuses it (500 OperationOutcome), a refusal
    # the queue records as the outcome instead of retrying it.
    reused = dict(first, billablePeriod={"start": first["created"], "end": first["created"]})
    accepted = await jm.request("POST", "/fhir/Claim", json=reused,
                                headers={**PREFER_ASYNC, "Idempotency-Key": uuid.uuid4().hex})
    assert accepted.status == 202
    path = accepted.headers["Content-Location"].removeprefix("https://mediator.example.org")
    final = await wait_settled(lambda url: jm.request("GET", url), path)
    assert final.status >= 400
    assert (await final.json())["resourceType"] == "OperationOutcome"
    store = aioredis.from_url("redis://127.0.0.1:6379/0")
    try:
        job = await store.hgetall(f"{prefix}async-job:{path.rsplit('/', 1)[1]}")
    finally:
        await store.aclose()
    assert job[b"a:0"] == b"1"  # one attempt: never retried
    assert claims_in_openimis(openimis, [_code(first)]) == {_code(first): 1}


async def test_a_queued_batch_settles_into_a_batch_response(queued, openimis):
    vendors, _ = queued
    jm = vendors["vendor-jm"]
    claims = [_claim_for("JMHOS001") for _ in range(3)]
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Claim"}, "resource": c} for c in claims]}
    accepted = await jm.request("POST", "/fhir/", data=json.dumps(bundle),
                                headers={**PREFER_ASYNC, "Content-Type": "application/fhir+json"})
    assert accepted.status == 202, await accepted.text()
    path = accepted.headers["Content-Location"].removeprefix("https://mediator.example.org")
    final = await wait_settled(lambda url: jm.request("GET", url), path)
    assert final.status == 200
    answer = await final.json()
    assert answer["type"] == "batch-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 3
    assert all(e["resource"]["resourceType"] == "ClaimResponse" for e in answer["entry"])
    codes = [_code(c) for c in claims]
    assert claims_in_openimis(openimis, codes) == dict.fromkeys(codes, 1)
    assert harness.HEALTH_FACILITIES  # the demo facilities the claims were re-pointed at
