"""The four HMS transactions through the mediator against a REAL openIMIS backend."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import e2e_channels, harness

pytestmark = pytest.mark.openimis


@pytest.fixture
async def through_mediator(openimis, make_mediator):
    return await make_mediator(e2e_channels(openimis["fhir_base_url"]))


async def test_master_data_download_pages_through_the_mediator(through_mediator):
    fhir_json = {"Accept": "application/fhir+json"}
    first = await through_mediator.get("/fhir/ActivityDefinition/?_count=10", headers=fhir_json)
    assert first.status == 200
    assert first.content_type == "application/fhir+json"
    bundle = await first.json()
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 10
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["next"].startswith("https://mediator.example.org/fhir/ActivityDefinition")
    assert all(e["fullUrl"].startswith("https://mediator.example.org/fhir/") for e in bundle["entry"])
    # Follow the rewritten next link back through the mediator.
    next_path = links["next"].removeprefix("https://mediator.example.org")
    second = await (await through_mediator.get(next_path)).json()
    assert {e["resource"]["id"] for e in second["entry"]}.isdisjoint({e["resource"]["id"] for e in bundle["entry"]})


async def test_patient_by_insuree_number(through_mediator):
    response = await through_mediator.get("/fhir/Patient/?identifier=070707070")
    assert response.status == 200
    patient = await response.json()
    assert patient["resourceType"] == "Patient"
    assert any(i.get("value") == "070707070" for i in patient["identifier"])


async def test_coverage_eligibility_error_is_passed_on_as_operation_outcome(through_mediator):
    # openIMIS 1.10 answers 500 to every CoverageEligibilityRequest on PostgreSQL (its converter bug);
    # what we assert is the mediator's behaviour: the error reaches the caller as an OperationOutcome.
    request = {"resourceType": "CoverageEligibilityRequest", "status": "active", "purpose": ["benefits"],
               "patient": {"reference": f"Patient/{harness.INSUREE_070707070_UUID}"},
               "created": "2026-11-21", "insurer": {"reference": "Organization/openIMIS-Implementation"}}
    response = await through_mediator.post("/fhir/CoverageEligibilityRequest", json=request)
    body = await response.json()
    assert response.status in (200, 201, 500)
    assert body["resourceType"] in ("CoverageEligibilityResponse", "OperationOutcome")


async def test_claim_submission_and_status_poll(through_mediator):
    claim = harness.claim_payload()
    response = await through_mediator.post("/fhir/Claim", data=json.dumps(claim),
                                           headers={"Content-Type": "application/fhir+json"})
    assert response.status == 201, await response.text()
    claim_response = await response.json()
    assert claim_response["resourceType"] == "ClaimResponse"
    poll = await through_mediator.get(f"/fhir/ClaimResponse/{claim_response['id']}")
    assert poll.status == 200
    assert (await poll.json())["id"] == claim_response["id"]


async def test_invalid_claims(through_mediator):
    claim = harness.claim_payload()
    first = await through_mediator.post("/fhir/Claim", json=claim)
    assert first.status == 201
    # A reused claim code: openIMIS refuses (with a 500); the caller gets an OperationOutcome.
    again = await through_mediator.post("/fhir/Claim", json=claim)
    assert again.status >= 400
    assert (await again.json())["resourceType"] == "OperationOutcome"
    # Not JSON at all: refused by the mediator, openIMIS never sees it.
    broken = await through_mediator.post("/fhir/Claim", data=b"{", headers={"Content-Type": "application/json"})
    assert broken.status == 400
    assert (await broken.json())["issue"][0]["details"]["coding"][0]["code"] == "request.malformed_json"
