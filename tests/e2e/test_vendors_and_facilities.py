"""Two HMS vendors, two health facilities, the whole pipeline, a REAL openIMIS behind it (tests/e2e/vendors.py)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import harness
from tests.e2e.vendors import BASE, _claim_for, _reason

# The first e2e test may install and start openIMIS (pip ~2 min on an empty machine): a longer bound.
pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]


async def test_no_credentials_no_entry(vendors):
    anonymous = await vendors["vendor-jm"].client.get("/fhir/Medication/")
    assert anonymous.status == 401
    assert "Bearer" in anonymous.headers["WWW-Authenticate"]


async def test_master_data_download_with_a_system_token(vendors):
    response = await vendors["vendor-jm"].request("GET", "/fhir/ActivityDefinition/?_count=5", user=False)
    assert response.status == 200, await response.text()
    bundle = await response.json()
    assert len(bundle["entry"]) == 5
    assert all(e["fullUrl"].startswith(BASE) for e in bundle["entry"])


async def test_eligibility_patient_by_insuree_number(vendors):
    ok = await vendors["vendor-jm"].request("GET", "/fhir/Patient/?identifier=070707070")
    assert ok.status == 200, await ok.text()
    assert [e["resource"]["resourceType"] for e in (await ok.json())["entry"]] == ["Patient"]
    # Listing every insuree is not a permission anyone has.
    listing = await vendors["vendor-jm"].request("GET", "/fhir/Patient/")
    assert listing.status == 403
    # A system token without a user cannot look up insurees (user/ permission).
    no_user = await vendors["vendor-jm"].request("GET", "/fhir/Patient/?identifier=070707070", user=False)
    assert no_user.status == 403


async def test_claim_submission_status_and_cross_facility_refusals(vendors):
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    submitted = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"))
    assert submitted.status == 201, await submitted.text()
    claim = await submitted.json()
    assert claim["resourceType"] == "Claim"
    claim_id = claim["id"]

    own = await jm.request("GET", f"/fhir/ClaimResponse/{claim_id}")
    assert own.status == 200 and (await own.json())["id"] == claim_id

    # Rapta's claim administrator may not read Jambero's claim status...
    foreign_read = await ra.request("GET", f"/fhir/ClaimResponse/{claim_id}")
    assert foreign_read.status == 403
    assert _reason(await foreign_read.json()) == "authorization.owner_other_facility"
    # ...nor submit a claim in Jambero's name (refused before openIMIS sees it)...
    foreign_submit = await ra.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"))
    assert foreign_submit.status == 403
    assert _reason(await foreign_submit.json()).startswith("authorization.")
    # ...nor claim, in its SSO token, a facility its vendor is not registered for.
    impersonation = await ra.client.get(f"/fhir/ClaimResponse/{claim_id}",
                                        headers=ra.headers(facility="JMHOS001"))
    assert impersonation.status == 403
    assert _reason(await impersonation.json()) == "authentication.facility_not_registered"


async def test_a_retried_claim_is_submitted_once(vendors):
    jm = vendors["vendor-jm"]
    claim = _claim_for("JMHOS001")
    first = await jm.request("POST", "/fhir/Claim", json=claim)
    assert first.status == 201, await first.text()
    again = await jm.request("POST", "/fhir/Claim", json=claim)
    # Without the mediator openIMIS answers a reused claim code with a 500; here the first answer is replayed.
    assert again.status == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (await again.json())["id"] == (await first.json())["id"]


async def test_status_polls_are_rate_limited_per_user(vendors):
    ra = vendors["vendor-ra"]
    statuses = []
    for _ in range(8):
        response = await ra.request("GET", "/fhir/ClaimResponse/?_count=1")
        statuses.append(response.status)
    # A facility-scoped search page costs 2 (its claim-index request + its list read): burst 5 admits 2.
    assert statuses[:2] == [200] * 2, statuses
    assert statuses[2:] == [429] * 6
    limited = await ra.request("GET", "/fhir/ClaimResponse/?_count=1")
    assert int(limited.headers["Retry-After"]) >= 1
    assert "RateLimit-Policy" in limited.headers


async def test_searches_only_show_the_callers_facility(vendors):
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    assert (await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"))).status == 201
    search = f"/fhir/Claim/?patient={harness.INSUREE_070707070_UUID}"
    hf_uuid = harness.HEALTH_FACILITIES["JMHOS001"][0]

    def jambero_entries(bundle: dict) -> int:
        return sum(hf_uuid in json.dumps(e["resource"].get("provider")) for e in bundle.get("entry", []))

    own = await jm.request("GET", search)
    assert own.status == 200, await own.text()
    own_bundle = await own.json()
    assert jambero_entries(own_bundle) >= 1  # openIMIS does return Jambero's claims for this patient
    # Answered by the mediator (local_answer) from openIMIS's window: its fullUrls are the mediator's.
    assert all(e["fullUrl"].startswith(BASE) for e in own_bundle["entry"])
    assert all(link["url"].startswith(BASE) for link in own_bundle["link"])
    foreign = await ra.request("GET", search)
    assert foreign.status == 200, await foreign.text()
    assert jambero_entries(await foreign.json()) == 0  # ...and the mediator drops them for Rapta
