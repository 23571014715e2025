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


def _master_ids() -> tuple[str, str, str]:
    item, service, family = _psql(
        "SELECT \"ItemUUID\" FROM \"tblItems\" WHERE \"ItemCode\"='0001' AND \"ValidityTo\" IS NULL; "
        "SELECT \"ServiceUUID\" FROM \"tblServices\" WHERE \"ServCode\"='M1' AND \"ValidityTo\" IS NULL; "
        "SELECT f.\"FamilyUUID\" FROM \"tblFamilies\" f JOIN \"tblInsuree\" i ON i.\"FamilyID\" = f.\"FamilyID\" "
        "WHERE i.\"CHFID\"='070707070' AND i.\"ValidityTo\" IS NULL").splitlines()
    return item, service, family


def _ident(code: str, value: str) -> dict:
    return {"type": {"coding": [{"system": IDENTIFIER_SYSTEM, "code": code}]}, "value": value}


def attack(kind: str) -> dict:
    item_uuid, service_uuid, family_uuid = _master_ids()
    claim = _claim_for("JMHOS001")
    contained = {
        # The issue's first attack: Jambero's identifiers, Rapta's id — openIMIS would overwrite Rapta's row.
        "Organization": {"resourceType": "Organization", "id": RA_UUID, "name": "Jambero District Hospital",
                         "type": [{"coding": [{"code": "prov"}]}],
                         "identifier": [_ident("Code", "JMHOS001"), _ident("UUID", JM_UUID)]},
        "Patient": {"resourceType": "Patient", "id": harness.INSUREE_070707070_UUID,
                    "identifier": [_ident("Code", "070707070")], "name": [{"family": "Renamed", "given": ["By"]}]},
        "Group": {"resourceType": "Group", "id": family_uuid, "type": "person", "actual": True, "quantity": 1,
                  "identifier": [_ident("UUID", family_uuid)]},
        "Practitioner": {"resourceType": "Practitioner", "id": RA_ADMIN_UUID,
                         "identifier": [_ident("Code", RA_ADMIN_CODE)], "name": [{"family": "Moved"}]},
        "PractitionerRole": {"resourceType": "PractitionerRole", "id": RA_ADMIN_UUID,
                             "identifier": [_ident("Code", RA_ADMIN_CODE)],
                             "practitioner": {"reference": f"Practitioner/{RA_ADMIN_UUID}"},
                             "organization": {"reference": f"Organization/{JM_UUID}"}},
        # The issue's price attack: the item's price for the whole scheme.
        "Medication": {"resourceType": "Medication", "id": item_uuid, "identifier": [_ident("Code", "0001")],
                       "code": {"text": "0001"},
                       "extension": [{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/"
                                             "unit-price", "valueMoney": {"value": 99999.0, "currency": "$"}}]},
        "ActivityDefinition": {"resourceType": "ActivityDefinition", "id": service_uuid, "status": "active",
                               "identifier": [_ident("Code", "M1")], "name": "M1", "title": "Renamed service"},
    }[kind]
    claim["contained"] = [contained]
    if kind == "Organization":
        claim["provider"] = {"reference": f"#Organization/{RA_UUID}", "type": "Organization"}
    return claim


CONTAINED_TYPES = ["Organization", "Patient", "Group", "Practitioner", "PractitionerRole", "Medication",
                   "ActivityDefinition"]


async def test_contained_attacks_are_refused_and_openimis_rows_are_unchanged(vendors):
    jm = vendors["vendor-jm"]
    before = snapshot()
    for kind in CONTAINED_TYPES:
        response = await jm.request("POST", "/fhir/Claim", json=attack(kind))
        outcome = await response.json()
        assert (response.status, _reason(outcome)) == (403, "write.contained_not_allowed"), (kind, outcome)
        assert outcome["issue"][0]["details"]["text"].startswith("Claim.contained[0]: ")
        assert snapshot() == before, f"openIMIS rows changed after the contained {kind} attack"
    # The same attacks inside a batch Bundle, next to a legitimate claim: the whole Bundle is refused.
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Claim"}, "resource": _claim_for("JMHOS001")},
        {"request": {"method": "POST", "url": "Claim"}, "resource": attack("Medication")}]}
    response = await jm.request("POST", "/fhir/", json=bundle)
    outcome = await response.json()
    assert (response.status, _reason(outcome)) == (403, "write.contained_not_allowed"), outcome
    assert outcome["issue"][0]["details"]["text"].startswith("entry 1: Bundle.entry[1].resource.Claim.contained[0]")
    # An element openIMIS would act on that no profile lists (here: a modifier extension on an item).
    claim = _claim_for("JMHOS001")
    claim["item"][0]["modifierExtension"] = [{"url": "x", "valueString": "y"}]
    response = await jm.request("POST", "/fhir/Claim", json=claim)
    assert (response.status, _reason(await response.json())) == (422, "write.element_not_allowed")
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
