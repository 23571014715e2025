"""The four HMS transactions through the mediator against a REAL openIMIS backend."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import harness
from tests.e2e.vendors import _claim_for

# The first e2e test may install and start openIMIS (pip ~2 min on an empty machine): a longer bound.
pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]


class _AsVendor:
    """A vendor's authenticated view of the mediator (access token + its user's SSO token)."""

    def __init__(self, vendor) -> None:  # type: ignore[no-untyped-def]
        self.vendor = vendor

    async def get(self, path, headers=None, user=True):  # type: ignore[no-untyped-def]
        return await self.vendor.request("GET", path, user=user, headers=headers or {})

    async def post(self, path, **kwargs):  # type: ignore[no-untyped-def]
        return await self.vendor.request("POST", path, **kwargs)


@pytest.fixture
def through_mediator(vendors):  # type: ignore[no-untyped-def]
    return _AsVendor(vendors["vendor-jm"])


async def test_master_data_download_pages_through_the_mediator(through_mediator):
    fhir_json = {"Accept": "application/fhir+json"}
    first = await through_mediator.get("/fhir/ActivityDefinition/?_count=10", headers=fhir_json, user=False)
    assert first.status == 200
    assert first.content_type == "application/fhir+json"
    bundle = await first.json()
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 10
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["next"].startswith("https://mediator.example.org/fhir/ActivityDefinition")
    assert all(e["fullUrl"].startswith("https://mediator.example.org/fhir/") for e in bundle["entry"])
    # Follow the rewritten next link back through the mediator.
    next_path = links["next"].removeprefix("https://mediator.example.org")
    second = await (await through_mediator.get(next_path, user=False)).json()
    assert {e["resource"]["id"] for e in second["entry"]}.isdisjoint({e["resource"]["id"] for e in bundle["entry"]})


async def test_patient_by_insuree_number(through_mediator):
    response = await through_mediator.get("/fhir/Patient/?identifier=070707070")
    assert response.status == 200
    bundle = await response.json()   # openIMIS's bare Patient, wrapped in a searchset (mediator.fhir_answers)
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 1
    patient = bundle["entry"][0]["resource"]
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
    claim = _claim_for("JMHOS001")
    response = await through_mediator.post("/fhir/Claim", data=json.dumps(claim),
                                           headers={"Content-Type": "application/fhir+json"})
    assert response.status == 201, await response.text()
    created = await response.json()   # Prefer return=representation (the default): the Claim, read back
    assert created["resourceType"] == "Claim"
    assert response.headers["Location"].endswith(f"/fhir/Claim/{created['id']}")
    poll = await through_mediator.get(f"/fhir/ClaimResponse/{created['id']}")
    assert poll.status == 200
    assert (await poll.json())["id"] == created["id"]


async def test_invalid_claims(through_mediator):
    claim = _claim_for("JMHOS001")
    first = await through_mediator.post("/fhir/Claim", json=claim)
    assert first.status == 201
    # The same claim code for a different claim (a new Idempotency-Key, so it is not a retry): openIMIS
    # refuses the duplicate code (with a 500); the caller gets openIMIS's OperationOutcome.
    claim["billablePeriod"] = dict(claim.get("billablePeriod") or {}, end=claim.get("created"))
    again = await through_mediator.post("/fhir/Claim", json=claim, headers={"Idempotency-Key": "e2e-other-claim-1"})
    assert again.status >= 400
    assert (await again.json())["resourceType"] == "OperationOutcome"
    # Not JSON at all: refused by the mediator's request stage (it parses every body once, before
    # authorization), openIMIS never sees it.
    broken = await through_mediator.post("/fhir/Claim", data=b"{", headers={"Content-Type": "application/json"})
    assert broken.status == 400
    assert (await broken.json())["issue"][0]["details"]["coding"][0]["code"] == "request.malformed_json"
