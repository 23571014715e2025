"""HMS developers' FHIR libraries, used through their normal APIs, against the REAL openIMIS (issue 19).

fhirpy 2.x (async and sync) and fhirclient 4.x (SMART on FHIR's Python client) do the four
transactions through the mediator with no workaround: master data with paging, eligibility lookup
(Patient?identifier=), claim create, claim status, and a foreign claim's refusal surfacing the
OperationOutcome. fhirclient finds the token endpoint in the mediator's own CapabilityStatement.

The mediator listens on a real port whose URL is its public base, so the absolute URLs it answers with
(next links, the token endpoint) are the ones the libraries then call.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from pathlib import Path

import pytest
from fhirclient import client as fhirclient_client
from fhirclient.models.activitydefinition import ActivityDefinition as FcActivityDefinition
from fhirclient.models.bundle import Bundle as FcBundle
from fhirclient.models.claim import Claim as FcClaim
from fhirclient.models.claimresponse import ClaimResponse as FcClaimResponse
from fhirclient.models.operationoutcome import OperationOutcome as FcOperationOutcome
from fhirclient.models.patient import Patient as FcPatient
from fhirclient.server import FHIRPermissionDeniedException
from fhirpy import AsyncFHIRClient, SyncFHIRClient
from fhirpy.base.exceptions import ForbiddenError

from tests.conftest import OPEN_CAPABILITIES_CHANNEL
from tests.e2e.test_facility_searches import _db_claims
from tests.e2e.vendors import CHANNELS, _claim_for, vendor_kit

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(600)]

INSUREE = "070707070"
# The policy of insuree 070707070 in the harness's demo database: a FHIR Claim needs insurance (1..*),
# which fhirclient's strict model enforces; openIMIS reads the insuree's policies itself.
COVERAGE = "Coverage/a3df066b-3e23-429a-92ad-cd1ef46daa2f"
SCOPE = "system/*.read system/Claim.write system/CoverageEligibilityRequest.write"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def kit(openimis, tmp_path, make_mediator):  # type: ignore[no-untyped-def]
    port = _free_port()
    origin = f"http://127.0.0.1:{port}"
    async for vendors in vendor_kit(openimis, tmp_path, make_mediator, origin=origin,
                                    channels=OPEN_CAPABILITIES_CHANNEL + CHANNELS, server_kwargs={"port": port}):
        yield vendors


def _fhirpy(vendor) -> AsyncFHIRClient:  # type: ignore[no-untyped-def]
    return AsyncFHIRClient(vendor.base, authorization=f"Bearer {vendor.access_token}",
                           extra_headers={"X-User-Token": vendor.user_token()})


def _reason(outcome: dict) -> str:
    return outcome["issue"][0]["details"]["coding"][0]["code"]


async def test_fhirpy_async_does_the_four_transactions(kit):
    jm, ra = kit["vendor-jm"], kit["vendor-ra"]
    client = _fhirpy(jm)
    # 1. master data, paged: fetch_all follows the (rewritten) next links through the mediator
    services = await client.resources("ActivityDefinition").limit(50).fetch_all()
    assert len(services) > 50 and len({s.id for s in services}) == len(services)
    assert all(s["date"].endswith(("Z", "+00:00")) for s in services if "date" in s)   # zone added
    # 2. eligibility: openIMIS's bare Patient arrives as a searchset
    patient = await client.resources("Patient").search(identifier=INSUREE).get()
    assert patient.resourceType == "Patient"
    assert INSUREE in [i["value"] for i in patient["identifier"]]
    assert await client.resources("Patient").search(identifier="999999999").first() is None
    # 3. claim create: Location + the created Claim (return=representation, the default)
    claim = client.resource("Claim", **_claim_for("JMHOS001"))
    await claim.save()
    assert claim.resourceType == "Claim" and claim.id
    # 4. claim status
    status = await client.reference("ClaimResponse", claim.id).to_resource()
    assert status.resourceType == "ClaimResponse" and status["outcome"] in ("complete", "partial", "queued")
    mine = await client.reference("Claim", claim.id).to_resource()
    assert mine.id == claim.id
    # 5. another facility's claim: refused, the OperationOutcome reaches the library's exception
    with pytest.raises(ForbiddenError) as refused:
        await _fhirpy(ra).reference("Claim", claim.id).to_resource()
    outcome = json.loads(str(refused.value))
    assert outcome["resourceType"] == "OperationOutcome"
    assert _reason(outcome) == "authorization.owner_other_facility"


async def test_fhirpy_sync_pages_and_looks_up_patients(kit):
    jm = kit["vendor-jm"]

    def as_hms() -> tuple[int, str, int]:
        client = SyncFHIRClient(jm.base, authorization=f"Bearer {jm.access_token}",
                                extra_headers={"X-User-Token": jm.user_token()})
        first_page = client.resources("ActivityDefinition").limit(10).fetch()
        everything = client.resources("ActivityDefinition").limit(40).fetch_all()
        patient = client.resources("Patient").search(identifier=INSUREE).get()
        return len(first_page), patient.resourceType, len(everything)

    # The library blocks; the mediator runs on this test's event loop.
    page, patient_type, total = await asyncio.to_thread(as_hms)
    assert page == 10 and patient_type == "Patient" and total > 40


def _fhirclient(vendor, assertion: str) -> fhirclient_client.FHIRClient:  # type: ignore[no-untyped-def]
    smart = fhirclient_client.FHIRClient(settings={"app_id": vendor.name, "api_base": vendor.base,
                                                   "jwt_token": assertion, "scope": SCOPE})
    # prepare() reads /fhir/metadata and finds the token endpoint in its SMART oauth-uris extension;
    # authorize() then does the SMART Backend Services client_credentials exchange there.
    smart.prepare()
    smart.authorize()
    # The user of the HMS: its SSO token, on every request of the session.
    smart.server.session.headers["X-User-Token"] = vendor.user_token()
    return smart


async def test_fhirclient_finds_the_token_endpoint_and_does_the_four_transactions(kit):
    jm, ra = kit["vendor-jm"], kit["vendor-ra"]
    jm_assertion, ra_assertion = jm.assertion(), ra.assertion()
    payload = {**_claim_for("JMHOS001"),
               "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": COVERAGE}}]}

    def as_hms() -> dict:
        smart = _fhirclient(jm, jm_assertion)
        server = smart.server
        token_uri = server.auth._token_uri
        first = FcActivityDefinition.where(struct={"_count": "10"}).perform(server)
        assert isinstance(first, FcBundle) and len(first.entry) == 10
        next_url = next(link.url for link in first.link if link.relation == "next")
        second = FcBundle(server.request_json(next_url))   # strict models: every dateTime must be valid
        patients = FcPatient.where(struct={"identifier": INSUREE}).perform_resources(server)
        created = FcClaim(payload).create(server)
        status = FcClaimResponse.read(created["id"], server)
        try:
            _fhirclient(ra, ra_assertion).server.request_json(f"Claim/{created['id']}")
            refusal = None
        except FHIRPermissionDeniedException as exc:
            refusal = FcOperationOutcome(exc.response.json())
        return {"token_uri": token_uri, "second": second, "patients": patients, "created": created,
                "status": status, "refusal": refusal}

    seen = await asyncio.to_thread(as_hms)
    assert seen["token_uri"] == f"{jm.origin}/auth/token"
    assert seen["second"].entry and seen["second"].type == "searchset"
    assert [p.resource_type for p in seen["patients"]] == ["Patient"]
    assert seen["created"]["resourceType"] == "Claim"
    assert seen["status"].id == seen["created"]["id"]
    refusal = seen["refusal"]
    assert refusal is not None
    assert refusal.issue[0].details.coding[0].code == "authorization.owner_other_facility"


async def test_a_foreign_claim_found_by_identifier_is_never_shown(kit):
    # openIMIS (logged in as the mediator's Admin) would answer Claim?identifier=<uuid> with the bare Claim of
    # any facility; the mediator answers a searchset from the caller's own claims: Rapta's answer for
    # Jambero's claim is the answer for a claim that does not exist.
    jm, ra = kit["vendor-jm"], kit["vendor-ra"]
    created = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"),
                               headers={"Prefer": "return=minimal"})
    assert created.status == 201 and await created.read() == b""
    claim_id = created.headers["Location"].rsplit("/", 1)[-1]
    own = await (await jm.request("GET", f"/fhir/Claim?identifier={claim_id}")).json()
    assert [e["resource"]["id"] for e in own["entry"]] == [claim_id]
    foreign = await ra.request("GET", f"/fhir/Claim?identifier={claim_id}")
    unknown_id = str(uuid.uuid4())
    unknown = await ra.request("GET", f"/fhir/Claim?identifier={unknown_id}")
    assert foreign.status == unknown.status == 200
    assert (await foreign.json()).get("entry", []) == [] and (await foreign.json())["type"] == "searchset"
    assert (await foreign.read()).replace(claim_id.encode(), unknown_id.encode()) == await unknown.read()


async def test_a_parameter_openimis_ignores_never_widens_the_answer(kit):
    # _id is supported neither by openIMIS (it would list every claim) nor by the scoped search: the mediator
    # drops it (lenient, the default), says so in the self link, and the answer is still the caller's own.
    jm, ra = kit["vendor-jm"], kit["vendor-ra"]
    created = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"),
                               headers={"Prefer": "return=OperationOutcome"})
    assert created.status == 201
    outcome = await created.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "information"
    claim_id = created.headers["Location"].rsplit("/", 1)[-1]
    answer = await ra.request("GET", f"/fhir/ClaimResponse?_id={claim_id}&_count=100")
    assert answer.status == 200
    bundle = await answer.json()
    assert claim_id not in [e["resource"]["id"] for e in bundle.get("entry", [])]
    assert "_id" not in bundle["link"][0]["url"] and "_count=100" in bundle["link"][0]["url"]
    strict = await ra.request("GET", f"/fhir/ClaimResponse?_id={claim_id}",
                              headers={"Prefer": "handling=strict"})
    assert strict.status == 400 and _reason(await strict.json()) == "search.unsupported_parameter"


README = Path(__file__).parents[2] / "README.md"


def _readme_snippet(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if b.startswith(f"# {marker}\n")]
    assert len(found) == 1, f"README has no single snippet {marker!r}"
    return found[0]


async def test_the_readme_snippets_work_as_written(kit):
    jm = kit["vendor-jm"]
    # Another facility's claim: one of Rapta's in the demo database (creating one here would give Rapta
    # claims for insuree 070707070, which test_facility_searches relies on Rapta not having).
    foreign_id = next(iter(_db_claims("RAHOS001")))
    given = {"BASE": jm.base, "CLIENT_ID": jm.name, "USER_TOKEN": jm.user_token()}

    fhirpy_snippet = dict(given, ACCESS_TOKEN=jm.access_token)
    exec(_readme_snippet("HMS developers: fhirpy"), fhirpy_snippet)  # noqa: S102 - the README's own code
    day = await fhirpy_snippet["hms_day"](_claim_for("JMHOS001"), foreign_id)
    assert day["services"] > 50 and day["patient"] == INSUREE and day["claim"]
    assert day["outcome"] in ("complete", "partial", "queued")
    assert day["refusal"] == "authorization.owner_other_facility"

    fhirclient_snippet = dict(given, CLIENT_ASSERTION=jm.assertion())
    exec(_readme_snippet("HMS developers: fhirclient"), fhirclient_snippet)  # noqa: S102
    claim = {**_claim_for("JMHOS001"),
             "insurance": [{"sequence": 1, "focal": True, "coverage": {"reference": COVERAGE}}]}
    day = await asyncio.to_thread(fhirclient_snippet["hms_day_with_fhirclient"], claim, foreign_id)
    assert day["services"] > 50 and day["patients"] == 1 and day["claim"]
    assert day["outcome"] in ("complete", "partial", "queued")
    assert day["refusal"] == "authorization.owner_other_facility"
