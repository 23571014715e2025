"""The write firewall against a REAL openIMIS: every contained-resource attack of issue 12 is refused
by the mediator, and openIMIS's database rows are byte for byte what they were; legitimate claims (one
by one and in a batch) are still created.

Each attack is a claim that is Jambero's (JMHOS001) in every field authorization checks — provider,
enterer, identifiers — sent by Jambero's own claim administrator, carrying one contained resource that
openIMIS would create or update keyed by its id (api_fhir_r4 ContainedContentSerializerMixin), with no
transaction around it: Rapta's health facility, the insuree and their family, Rapta's claim
administrator, an item's price for the whole scheme, a service.
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.e2e.conftest import harness
from tests.e2e.vendors import _claim_for, _reason

pytestmark = [pytest.mark.openimis, pytest.mark.timeout(1800)]

TABLES = ("tblHF", "tblItems", "tblServices", "tblClaimAdmin", "tblInsuree", "tblFamilies", "tblClaim")
JM_UUID, _, JM_ADMIN_UUID = harness.HEALTH_FACILITIES["JMHOS001"]
RA_UUID, RA_ADMIN_CODE, RA_ADMIN_UUID = harness.HEALTH_FACILITIES["RAHOS001"]
IDENTIFIER_SYSTEM = "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers"


def _psql(sql: str) -> str:
    config = harness.Config()
    return str(harness._psql(config, sql, db=config.db_name))


def snapshot() -> dict[str, str]:
    """An md5 of every row (all columns) of each table, from openIMIS's own database."""
    query = " UNION ALL ".join(
        f"SELECT '{table}', md5(coalesce(string_agg(row_text, '|' ORDER BY row_text), '')) "
        f"FROM (SELECT t::text AS row_text FROM \"{table}\" t) rows" for table in TABLES)
    return dict(line.split("|") for line in _psql(query).splitlines())


def _master_ids() -> tuple[str, str, str, str]:
    """uuids of item 0001, service M1, the family of insuree 070707070 and Rapta's location."""
    item, service, family, location = _psql(
        "SELECT \"ItemUUID\" FROM \"tblItems\" WHERE \"ItemCode\"='0001' AND \"ValidityTo\" IS NULL; "
        "SELECT \"ServiceUUID\" FROM \"tblServices\" WHERE \"ServCode\"='M1' AND \"ValidityTo\" IS NULL; "
        "SELECT f.\"FamilyUUID\" FROM \"tblFamilies\" f JOIN \"tblInsuree\" i ON i.\"FamilyID\" = f.\"FamilyID\" "
        "WHERE i.\"CHFID\"='070707070' AND i.\"ValidityTo\" IS NULL; "
        "SELECT l.\"LocationUUID\" FROM \"tblHF\" h JOIN \"tblLocations\" l ON l.\"LocationId\" = h.\"LocationId\" "
        f"WHERE lower(h.\"HfUUID\"::text) = '{RA_UUID}' AND h.\"ValidityTo\" IS NULL").splitlines()
    return item.lower(), service.lower(), family.lower(), location.lower()


def _ident(code: str, value: str) -> dict:
    return {"type": {"coding": [{"system": IDENTIFIER_SYSTEM, "code": code}]}, "value": value}


async def _as_openimis_has_it(openimis: dict, path: str, wanted: str) -> dict:
    """A resource as openIMIS itself serves it (read directly, as Admin): what an attacker would start from."""
    token = harness.login(openimis["base_url"], *harness.ADMIN)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{openimis['fhir_base_url']}/{path}",
                               headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200, await response.text()
            document = await response.json()
    if document.get("resourceType") != "Bundle":
        return dict(document)
    return next(e["resource"] for e in document["entry"] if e["resource"]["id"].lower() == wanted)


def _set_unit_price(resource: dict, value: float) -> None:
    for extension in resource.get("extension", ()):
        if extension["url"].endswith("unit-price"):
            extension["valueMoney"]["value"] = value


async def attacks(openimis: dict) -> dict[str, dict]:
    """One claim per contained type. Each is Jambero's in every field authorization checks and carries
    openIMIS's own representation of a record with one change. Sent straight to openIMIS (on an isolated
    database, README "Write firewall"), the Organization, Patient, Practitioner, PractitionerRole,
    Medication and ActivityDefinition variants changed tblHF (Rapta's code became JMHOS001), tblInsuree,
    tblClaimAdmin, tblItems (price 99999) and tblServices, each with a 201; the Group variant was swallowed
    by openIMIS in this version (its update error is only a warning)."""
    item, service, family, location = _master_ids()
    current = {
        "Organization": await _as_openimis_has_it(openimis, f"Organization/{RA_UUID}", RA_UUID),
        "Patient": await _as_openimis_has_it(openimis, f"Patient/{harness.INSUREE_070707070_UUID}",
                                             harness.INSUREE_070707070_UUID),
        "Group": await _as_openimis_has_it(openimis, "Group?_count=200", family),
        "Practitioner": await _as_openimis_has_it(openimis, "Practitioner?resourceType=ca&_count=200",
                                                  RA_ADMIN_UUID),
        "PractitionerRole": await _as_openimis_has_it(openimis, "PractitionerRole?resourceType=ca&_count=200",
                                                      RA_ADMIN_UUID),
        "Medication": await _as_openimis_has_it(openimis, "Medication?_count=200", item),
        "ActivityDefinition": await _as_openimis_has_it(openimis, f"ActivityDefinition/{service}", service),
    }
    # Rapta's facility with Jambero's identifiers: openIMIS would rewrite Rapta's row (the issue's attack).
    current["Organization"]["identifier"] = [_ident("Code", "JMHOS001"), _ident("UUID", JM_UUID)]
    for address in current["Organization"].get("address", ()):
        for extension in address.get("extension", ()):
            if extension["url"].endswith("address-location-reference"):   # openIMIS serves itself here
                extension["valueReference"] = {"reference": f"Location/{location}", "type": "Location",
                                               "identifier": _ident("UUID", location)}
    current["Patient"]["name"][0]["family"] = "Renamed"
    current["Patient"]["extension"] = [e for e in current["Patient"]["extension"]
                                       if not e["url"].endswith("patient-is-head")]
    current["Group"]["extension"][0]["valueAddress"]["text"] = "Moved away"
    current["Practitioner"]["name"][0]["family"] = "Moved"
    current["PractitionerRole"]["organization"] = {"reference": f"Organization/{JM_UUID}", "type": "Organization",
                                                   "identifier": _ident("UUID", JM_UUID)}
    _set_unit_price(current["Medication"], 99999.0)       # the item's price for the whole scheme
    _set_unit_price(current["ActivityDefinition"], 99999.0)
    result = {}
    for kind, resource in current.items():
        claim = _claim_for("JMHOS001")
        claim["contained"] = [resource]
        result[kind] = claim
    return result


CONTAINED_TYPES = ["Organization", "Patient", "Group", "Practitioner", "PractitionerRole", "Medication",
                   "ActivityDefinition"]


async def test_contained_attacks_are_refused_and_openimis_rows_are_unchanged(vendors, openimis):
    jm = vendors["vendor-jm"]
    claims = await attacks(openimis)
    before = snapshot()
    for kind in CONTAINED_TYPES:
        response = await jm.request("POST", "/fhir/Claim", json=claims[kind])
        outcome = await response.json()
        assert response.status == 403, (kind, outcome)
        assert _reason(outcome) == "write.contained_not_allowed", (kind, outcome)
        assert outcome["issue"][0]["details"]["text"].startswith("Claim.contained[0]: ")
        assert snapshot() == before, f"openIMIS rows changed after the contained {kind} attack"
    # The same attacks inside a batch Bundle, next to a legitimate claim: the whole Bundle is refused.
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Claim"}, "resource": _claim_for("JMHOS001")},
        {"request": {"method": "POST", "url": "Claim"}, "resource": claims["Medication"]}]}
    response = await jm.request("POST", "/fhir/", json=bundle)
    outcome = await response.json()
    assert (response.status, _reason(outcome)) == (403, "write.contained_not_allowed"), outcome
    assert outcome["issue"][0]["details"]["text"].startswith("entry 1: Bundle.entry[1].resource.Claim.contained[0]")
    # An element openIMIS would act on that no profile lists (here: a modifier extension on an item).
    claim = _claim_for("JMHOS001")
    claim["item"][0]["modifierExtension"] = [{"url": "x", "valueString": "y"}]
    response = await jm.request("POST", "/fhir/Claim", json=claim)
    assert (response.status, _reason(await response.json())) == (422, "write.element_not_allowed")
    # An item reference by absolute URL (openIMIS would take its last segment as a local id).
    claim = _claim_for("JMHOS001")
    claim["item"][0]["extension"][0]["valueReference"] = {"reference": "https://other.example/fhir/Medication/0001"}
    response = await jm.request("POST", "/fhir/Claim", json=claim)
    assert (response.status, _reason(await response.json())) == (422, "write.reference_not_allowed")
    assert snapshot() == before   # tblClaim included: not even the legitimate entry of the refused Bundle


async def test_legitimate_claims_are_still_created(vendors):
    jm, ra = vendors["vendor-jm"], vendors["vendor-ra"]
    before = snapshot()
    one = await jm.request("POST", "/fhir/Claim", json=_claim_for("JMHOS001"))
    assert one.status == 201, await one.text()
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Claim"}, "resource": _claim_for("RAHOS001")} for _ in range(2)]}
    batch = await ra.request("POST", "/fhir/", json=bundle)
    assert batch.status == 200, await batch.text()
    answer = await batch.json()
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"], answer
    # Each created entry names where its Claim is (openIMIS sends no Location), and it reads back there.
    for entry in answer["entry"]:
        location = entry["response"]["location"]
        assert location == f"Claim/{entry['resource']['id']}"
        read = await ra.request("GET", f"/fhir/{location}")
        assert read.status == 200 and (await read.json())["id"] == entry["resource"]["id"]
    after = snapshot()
    # The control: the snapshot sees this database (three claims were stored) and nothing else moved.
    assert after["tblClaim"] != before["tblClaim"]
    assert {t: h for t, h in after.items() if t != "tblClaim"} == {t: h for t, h in before.items() if t != "tblClaim"}
    # CoverageEligibilityRequest passes the firewall and reaches openIMIS (which answers 500 on PostgreSQL:
    # tests/e2e/test_openimis_transactions.py).
    request = {"resourceType": "CoverageEligibilityRequest", "status": "active", "purpose": ["benefits"],
               "patient": {"reference": f"Patient/{harness.INSUREE_070707070_UUID}"}, "created": "2026-11-21",
               "insurer": {"reference": "Organization/openIMIS-Implementation"}}
    eligibility = await jm.request("POST", "/fhir/CoverageEligibilityRequest", json=request)
    body = await eligibility.json()
    assert eligibility.status in (200, 201, 500), body
    codes = [c.get("code", "") for issue in body.get("issue", ()) for c in issue.get("details", {}).get("coding", ())]
    assert not any(code.startswith(("write.", "request.", "authorization.")) for code in codes), body
