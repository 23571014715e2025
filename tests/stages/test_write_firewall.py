"""The write firewall: profile evaluation (table tests), the policy file's schema, and the stage in the
pipeline. What openIMIS itself does with each refused variant is proven in tests/e2e/test_write_firewall.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mediator.config.write_profiles import WriteProfilesPolicy
from mediator.facilities import FacilitySnapshot
from mediator.stages.write_firewall import WriteFirewallStage
from mediator.write_profiles import WriteCheck, check_write
from tests.conftest import (
    DEFAULT_IP_POLICY,
    SHIPPED_WRITE_PROFILES,
    channels_yaml,
    config_problems,
    upstream_url,
    write_config,
)

FIXTURES = Path(__file__).parents[2] / "mediator" / "sandbox" / "fixtures"   # openIMIS's own examples
VERIFIED_CLAIM = Path(__file__).parents[1] / "openimis" / "data" / "payloads" / "claim-verified.json"
JM_UUID, JM_ADMIN_UUID = "026e088a-fbd5-474e-8d42-069958a34127", "4a3f1a0a-e13c-451a-9511-a4d0fe35d20b"
RA_UUID, RA_ADMIN_UUID = "d8a25f21-f36a-4d4d-9e58-1db8ffbe7036", "598e43ca-9977-4f4b-a678-992528ce3454"
CALLER = frozenset({"JMHOS001"})
SHIPPED = WriteProfilesPolicy.model_validate(yaml.safe_load(SHIPPED_WRITE_PROFILES))


def _org(uuid: str, code: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": uuid, "type": [{"coding": [{"code": "prov"}]}],
            "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": code},
                           {"type": {"coding": [{"code": "UUID"}]}, "value": uuid}]}


def _role(admin_uuid: str, admin_code: str, hf_uuid: str) -> dict[str, Any]:
    return {"resourceType": "PractitionerRole", "id": admin_uuid, "code": [{"coding": [{"code": "CA"}]}],
            "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": admin_code}],
            "practitioner": {"reference": f"Practitioner/{admin_uuid}"},
            "organization": {"reference": f"Organization/{hf_uuid}"}}


SNAPSHOT = FacilitySnapshot.from_resources(
    [_org(JM_UUID, "JMHOS001"), _org(RA_UUID, "RAHOS001")],
    [_role(JM_ADMIN_UUID, "JHOS0011", JM_UUID), _role(RA_ADMIN_UUID, "RHOS0011", RA_UUID)], 0.0)


def claim() -> dict[str, Any]:
    """The claim verified against the real openIMIS (Jambero's provider and claim administrator)."""
    return json.loads(VERIFIED_CLAIM.read_text())


def _uuid_ref(kind: str, value: str) -> dict[str, Any]:
    return {"reference": f"{kind}/{value}", "type": kind,
            "identifier": {"type": {"coding": [{"code": "UUID"}]}, "value": value}}


def _check(resource: Any, policy: WriteProfilesPolicy = SHIPPED, kind: str = "Claim",
           interaction: str = "create") -> WriteCheck:
    return check_write(policy, kind, interaction, resource, CALLER, SNAPSHOT)


def edited(**changes: Any) -> dict[str, Any]:
    """claim() with top-level elements replaced (None: removed)."""
    resource = claim()
    for key, value in changes.items():
        if value is None:
            resource.pop(key, None)
        else:
            resource[key] = value
    return resource


def with_item(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    resource = claim()
    target: Any = resource
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return resource


# --- (a) the shipped profiles keep legitimate claims -----------------------------------------------

def _repointed(resource: dict[str, Any]) -> dict[str, Any]:
    """An openIMIS example claim pointed at the caller's facility and claim administrator (their own
    facilities and admins are not in this directory); everything else as openIMIS wrote it."""
    resource = copy.deepcopy(resource)
    resource["provider"] = _uuid_ref("Organization", JM_UUID)
    resource["enterer"] = _uuid_ref("Practitioner", JM_ADMIN_UUID)
    return resource


@pytest.mark.parametrize("name", ["Claim-module-test.json", "Claim-code-references-module-test.json",
                                  "Claim-ig-Claim001.json", "Claim-demo-JMHOS001.json"])
def test_openimis_example_claims_pass(name: str) -> None:
    resource = _repointed(json.loads((FIXTURES / name).read_text()))
    assert _check(resource).decision.reason == "write.allowed"


@pytest.mark.parametrize("reference", [
    {"reference": f"Organization/{JM_UUID}"},                                       # by uuid
    {"reference": "Organization/JMHOS001"},                                           # by code
    {"type": "Organization", "identifier": {"type": {"coding": [{"code": "Code"}]}, "value": "JMHOS001"}},
    _uuid_ref("Organization", JM_UUID),                                               # every form, agreeing
], ids=["uuid", "code", "identifier", "all-forms"])
def test_provider_forms_of_the_callers_facility_pass(reference: dict[str, Any]) -> None:
    assert _check(edited(provider=reference)).decision.reason == "write.allowed"


@pytest.mark.parametrize("name", ["CoverageEligibilityRequest-module-test.json"])
def test_eligibility_requests_pass(name: str) -> None:
    resource = json.loads((FIXTURES / name).read_text())
    assert _check(resource, kind="CoverageEligibilityRequest").decision.reason == "write.allowed"
    resource["facility"] = {"reference": f"Location/{JM_UUID}"}
    resource["provider"] = {"reference": "Organization/JMHOS001"}
    assert _check(resource, kind="CoverageEligibilityRequest").decision.reason == "write.allowed"


# --- (b) each element, reference form and contained type -----------------------------------------

ORG_REF_RA = {"reference": f"Organization/{RA_UUID}"}
REFUSALS = [
    # (id, resource, reason, status, element)
    ("unknown-top-level", edited(modifierExtension=[{"url": "x"}]), "write.element_not_allowed", 422,
     "Claim.modifierExtension"),
    ("top-level-extension", edited(extension=[{"url": "x", "valueString": "y"}]), "write.element_not_allowed", 422,
     "Claim.extension"),
    ("primitive-extension", edited(_status={"extension": []}), "write.element_not_allowed", 422, "Claim._status"),
    ("item-element", with_item(("item", 1, "modifier"), [{"text": "x"}]), "write.element_not_allowed", 422,
     "Claim.item[1].modifier"),
    ("item-extension-element", with_item(("item", 0, "extension", 0, "valueString"), "x"),
     "write.element_not_allowed", 422, "Claim.item[0].extension[0].valueString"),
    ("diagnosis-element", with_item(("diagnosis", 0, "packageCode"), {"text": "x"}),
     "write.element_not_allowed", 422, "Claim.diagnosis[0].packageCode"),
    ("item-not-an-object", edited(item=["x"]), "write.element_not_allowed", 422, "Claim.item[0]"),
    ("provider-other-facility-uuid", edited(provider=ORG_REF_RA), "write.reference_other_facility", 403,
     "Claim.provider.reference"),
    ("provider-other-facility-code", edited(provider={"reference": "Organization/RAHOS001"}),
     "write.reference_other_facility", 403, "Claim.provider.reference"),
    ("provider-identifier-other-facility",
     edited(provider={"reference": f"Organization/{JM_UUID}", "type": "Organization",
                      "identifier": {"value": "RAHOS001"}}),
     "write.reference_other_facility", 403, "Claim.provider.identifier"),
    ("provider-unknown", edited(provider={"reference": "Organization/XXHOS999"}), "write.reference_unresolved", 403,
     "Claim.provider.reference"),
    ("provider-absolute-url", edited(provider={"reference": f"https://other.example/fhir/Organization/{JM_UUID}"}),
     "write.reference_not_allowed", 422, "Claim.provider.reference"),
    ("provider-urn", edited(provider={"reference": f"urn:uuid:{JM_UUID}"}), "write.reference_not_allowed", 422,
     "Claim.provider.reference"),
    ("provider-history", edited(provider={"reference": f"Organization/{JM_UUID}/_history/1"}),
     "write.reference_not_allowed", 422, "Claim.provider.reference"),
    ("provider-wrong-type", edited(provider={"reference": f"Location/{JM_UUID}"}), "write.reference_not_allowed", 422,
     "Claim.provider.reference"),
    ("provider-type-mismatch", edited(provider={"reference": f"Organization/{JM_UUID}", "type": "Patient"}),
     "write.reference_not_allowed", 422, "Claim.provider.type"),
    ("provider-extra-key", edited(provider={"reference": f"Organization/{JM_UUID}", "extension": []}),
     "write.element_not_allowed", 422, "Claim.provider.extension"),
    ("provider-identifier-extra-key",
     edited(provider={"type": "Organization", "identifier": {"value": "JMHOS001", "assigner": {}}}),
     "write.element_not_allowed", 422, "Claim.provider.identifier.assigner"),
    ("provider-empty", edited(provider={"display": "Jambero"}), "write.reference_not_allowed", 422,
     "Claim.provider"),
    ("provider-dangling-contained", edited(provider={"reference": f"#Organization/{JM_UUID}"}),
     "write.reference_not_allowed", 422, "Claim.provider.reference"),
    ("enterer-other-facility", edited(enterer={"reference": f"Practitioner/{RA_ADMIN_UUID}"}),
     "write.reference_other_facility", 403, "Claim.enterer.reference"),
    ("enterer-by-code-other-facility", edited(enterer={"reference": "Practitioner/RHOS0011"}),
     "write.reference_other_facility", 403, "Claim.enterer.reference"),
    ("patient-absolute-url", edited(patient={"reference": "http://evil.example/Patient/x"}),
     "write.reference_not_allowed", 422, "Claim.patient.reference"),
    ("item-reference-wrong-type",
     with_item(("item", 0, "extension", 0, "valueReference"), {"reference": "Patient/0001"}),
     "write.reference_not_allowed", 422, "Claim.item[0].extension[0].valueReference.reference"),
    ("item-reference-to-contained",
     with_item(("item", 0, "extension", 0, "valueReference"), {"reference": "#Medication/0001"}),
     "write.reference_not_allowed", 422, "Claim.item[0].extension[0].valueReference.reference"),
    ("contained-not-a-list", edited(contained={"resourceType": "Organization"}), "write.contained_not_allowed", 403,
     "Claim.contained"),
]


@pytest.mark.parametrize(("resource", "reason", "status", "element"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_element(resource: dict[str, Any], reason: str, status: int, element: str) -> None:
    check = _check(resource)
    assert (check.decision.reason, check.decision.status, check.element) == (reason, status, element)
    assert check.decision.message.startswith(f"{element}: ")


def contained_variant(kind: str) -> dict[str, Any]:
    """A claim that is Jambero's in every field the mediator used to check, carrying one contained resource
    of `kind` that openIMIS would create or update (the issue's attacks)."""
    resources = {
        "Organization": {**_org(RA_UUID, "JMHOS001"), "name": "Jambero District Hospital"},
        "Patient": {"resourceType": "Patient", "id": "0539afeb-21a1-4b3f-9478-23e6f41b0024",
                    "name": [{"family": "Renamed", "given": ["By"]}]},
        "Group": {"resourceType": "Group", "id": "8e33033a-9f60-43ad-be3e-3bfeb992aae5", "type": "person",
                  "actual": True, "quantity": 1},
        "Practitioner": {"resourceType": "Practitioner", "id": RA_ADMIN_UUID, "name": [{"family": "Moved"}]},
        "PractitionerRole": {"resourceType": "PractitionerRole", "id": RA_ADMIN_UUID,
                             "organization": {"reference": f"Organization/{JM_UUID}"}},
        "Medication": {"resourceType": "Medication", "id": "0001",
                       "extension": [{"url": "unitPrice", "valueMoney": {"value": 1, "currency": "$"}}]},
        "ActivityDefinition": {"resourceType": "ActivityDefinition", "id": "M1", "status": "active"},
    }
    resource = claim()
    resource["contained"] = [resources[kind]]
    return resource


CONTAINED_TYPES = ["Organization", "Patient", "Group", "Practitioner", "PractitionerRole", "Medication",
                   "ActivityDefinition"]


@pytest.mark.parametrize("kind", CONTAINED_TYPES)
def test_every_contained_type_is_refused_by_the_shipped_profiles(kind: str) -> None:
    check = _check(contained_variant(kind))
    assert (check.decision.reason, check.decision.status, check.element) == \
        ("write.contained_not_allowed", 403, "Claim.contained[0]")
    assert kind in check.decision.message and check.rule == "profiles.Claim.contained"


def test_the_contained_example_of_openimis_is_refused() -> None:
    resource = _repointed(json.loads((FIXTURES / "Claim-contained-module-test.json").read_text()))
    assert _check(resource).decision.reason == "write.contained_not_allowed"


def test_duplicate_contained_ids_are_refused() -> None:
    resource = claim()
    resource["contained"] = [_org(JM_UUID, "JMHOS001"), _org(JM_UUID, "JMHOS001")]
    check = _check(resource, TIED)
    assert (check.decision.reason, check.element) == ("write.contained_not_allowed", "Claim.contained[1].id")


# --- (c) a profile that lets a contained Organization in, tied to the caller's facility ---------------

TIED = WriteProfilesPolicy.model_validate({"version": 1, "profiles": {"Claim": {
    **yaml.safe_load(SHIPPED_WRITE_PROFILES)["profiles"]["Claim"],
    "contained": {"Organization": {"tie": "caller_facility",
                                   "elements": {"identifier": "any", "type": "any"}}}}}})


def _with_contained(org: dict[str, Any], provider: dict[str, Any] | None = None) -> dict[str, Any]:
    resource = claim()
    resource["contained"] = [org]
    if provider is not None:
        resource["provider"] = provider
    return resource


def _jm_org(**changes: Any) -> dict[str, Any]:
    org = _org(JM_UUID, "JMHOS001")
    for key, value in changes.items():
        if value is None:
            org.pop(key)
        else:
            org[key] = value
    return org


TIED_CASES = [
    ("own-facility-by-uuid", _with_contained(_jm_org(), {"reference": f"#Organization/{JM_UUID}"}),
     "write.allowed", None),
    ("own-facility-no-id", _with_contained(_jm_org(id=None)), "write.allowed", None),
    ("other-facilitys-id-own-identifiers",   # the attack: B's row overwritten with A's code
     _with_contained(_jm_org(id=RA_UUID), {"reference": f"#Organization/{RA_UUID}"}),
     "write.contained_not_allowed", "Claim.contained[0].id"),
    ("own-id-other-identifiers", _with_contained(_org(JM_UUID, "RAHOS001")), "write.contained_not_allowed",
     "Claim.contained[0].identifier"),
    ("mixed-identifiers", _with_contained(_jm_org(identifier=[{"value": "JMHOS001"}, {"value": RA_UUID}])),
     "write.contained_not_allowed", "Claim.contained[0].identifier"),
    ("no-identifier", _with_contained(_jm_org(identifier=None)), "write.contained_not_allowed",
     "Claim.contained[0].identifier"),
    ("id-is-a-code", _with_contained(_jm_org(id="JMHOS001")), "write.contained_not_allowed", "Claim.contained[0].id"),
    ("unknown-facility", _with_contained(_org("00000000-0000-4000-8000-000000000000", "XXHOS999")),
     "write.contained_not_allowed", "Claim.contained[0].identifier"),
    ("renames-own-facility", _with_contained(_jm_org(name="Renamed")), "write.element_not_allowed",
     "Claim.contained[0].name"),
    ("patient-still-refused", contained_variant("Patient"), "write.contained_not_allowed", "Claim.contained[0]"),
]


@pytest.mark.parametrize(("resource", "reason", "element"), [c[1:] for c in TIED_CASES],
                         ids=[c[0] for c in TIED_CASES])
def test_contained_organization_tied_to_the_callers_facility(resource: dict[str, Any], reason: str,
                                                             element: str | None) -> None:
    check = _check(resource, TIED)
    assert (check.decision.reason, check.element) == (reason, element)


# --- (d) types, interactions, Bundles ----------------------------------------------------------------

def test_a_type_without_profile_cannot_be_written() -> None:
    patient = {"resourceType": "Patient", "name": [{"family": "X"}]}
    check = _check(patient, kind="Patient")
    assert (check.decision.reason, check.decision.status, check.rule) == ("write.no_profile", 403, "profiles")
    assert _check(claim(), WriteProfilesPolicy(version=1)).decision.reason == "write.no_profile"


def test_an_interaction_the_profile_does_not_list_is_refused() -> None:
    check = _check(dict(claim(), id="x"), interaction="update")
    assert (check.decision.reason, check.rule) == ("write.interaction_not_allowed", "profiles.Claim.interactions")


def _entry(resource: dict[str, Any], method: str = "POST", url: str = "Claim") -> dict[str, Any]:
    return {"request": {"method": method, "url": url}, "resource": resource}


def _bundle_check(*entries: dict[str, Any]) -> WriteCheck:
    stage = WriteFirewallStage(SHIPPED, None)
    return stage.check_bundle({"resourceType": "Bundle", "type": "batch", "entry": list(entries)}, CALLER, SNAPSHOT)


def test_bundle_entries_are_each_checked() -> None:
    assert _bundle_check(_entry(claim()), _entry(claim()), {"request": {"method": "GET", "url": "Claim/1"}}
                         ).decision.reason == "write.allowed"
    check = _bundle_check(_entry(claim()), _entry(contained_variant("Medication")))
    assert (check.decision.reason, check.entry, check.element) == \
        ("write.contained_not_allowed", 1, "Bundle.entry[1].resource.Claim.contained[0]")
    assert check.decision.message.startswith("entry 1: ")
    check = _bundle_check(_entry({"resourceType": "Patient"}, url="Patient"))
    assert (check.decision.reason, check.entry) == ("write.no_profile", 0)
    check = _bundle_check(_entry(claim(), method="PATCH", url="Claim/1"))
    assert check.decision.reason == "write.interaction_not_allowed"
    check = _bundle_check(_entry(edited(provider=ORG_REF_RA)))
    assert check.decision.reason == "write.reference_other_facility"
    check = _bundle_check({"request": {"method": "POST", "url": "Claim"}, "resource": ["x"]})
    assert check.decision.reason == "write.not_a_resource"


# --- (e) the policy file -----------------------------------------------------------------------------

def test_the_shipped_file_is_valid_and_needs_the_directory() -> None:
    assert set(SHIPPED.profiles) == {"Claim", "CoverageEligibilityRequest"}
    assert SHIPPED.needs_directory()
    assert not SHIPPED.profiles["Claim"].contained


BAD_FILES = [
    ("profiles:\n  Claim:\n    elements:\n      status: some\n",
     "policies/write_profiles.yaml:5:7: profiles.Claim.elements.status: 'some': an element is `any` or a "
     "mapping with elements or reference"),
    ("profiles:\n  Claim:\n    elements:\n      patient: {reference: {types: [Patient], facility: caller}}\n",
     "policies/write_profiles.yaml:5:17: profiles.Claim.elements.patient.reference: facility: caller cannot be "
     "checked for Patient (the facility directory resolves only Location, Organization, Practitioner)"),
    ("profiles:\n  Claim:\n    elements: {status: any}\n    contained:\n      Medication: {tie: caller_facility, "
     "elements: {}}\n",
     "policies/write_profiles.yaml:5:5: profiles.Claim.contained: a contained Medication cannot be tied to the "
     "caller (openIMIS creates or updates it from the claim; only Organization with tie: caller_facility is "
     "possible)"),
    ("profiles:\n  Claim:\n    elements: {contained: any}\n",
     "policies/write_profiles.yaml:4:5: profiles.Claim.elements: contained is not listed: resourceType is always "
     "checked, contained has its own key"),
    ("profiles:\n  Claim:\n    elements: {status: any}\n    interactions: [delete]\n",
     "policies/write_profiles.yaml:5:20: profiles.Claim.interactions[0]: Input should be 'create' or 'update'"),
    ("profiles:\n  Bundle:\n    elements: {type: any}\n",
     "policies/write_profiles.yaml:2:1: profiles: 'Bundle' is not a writable FHIR resource type (Bundle entries "
     "are checked against the profile of their own type)"),
    ("profiles:\n  Claim:\n    elements: {status: any}\n    extra: 1\n",
     "policies/write_profiles.yaml:5:5: profiles.Claim.extra: Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_FILES)
def test_a_broken_file_is_refused_with_file_line_col(tmp_path: Path, body: str, expected: str) -> None:
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"), DEFAULT_IP_POLICY,
                        {"write_profiles.yaml": "version: 1\n" + body})
    assert config_problems(root) == [expected]


async def test_absent_write_profiles_refuse_every_write(make_mediator, sandbox, sandbox_server, caplog) -> None:
    with caplog.at_level("WARNING", logger="mediator.write_firewall"):
        client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=OPEN_CHANNELS),
                                     extra_policies={"write_profiles.yaml": None})
    assert {"event": "write.no_profile", "file": "policies/write_profiles.yaml",
            "effect": "every write is refused"} in [r.msg.fields for r in caplog.records
                                                    if r.name == "mediator.write_firewall"]
    seen = len(sandbox.requests)
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim", "status": "active"})
    assert response.status == 403
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "write.no_profile"
    assert len(sandbox.requests) == seen


def test_facility_bindings_without_authorization_are_refused(tmp_path: Path) -> None:
    root = write_config(tmp_path, channels_yaml("http://127.0.0.1:1/api/api_fhir_r4/"), DEFAULT_IP_POLICY,
                        {"authorization.yaml": None, "write_profiles.yaml": SHIPPED_WRITE_PROFILES})
    assert config_problems(root) == ["policies/write_profiles.yaml:9:1: profiles: facility: caller and contained "
                                     "rules need policies/authorization.yaml (its facility_directory)"]


# --- (f) the stage in the pipeline (the stand-in behind it; openIMIS itself: tests/e2e) --------------

OPEN_CHANNELS = """\
  - name: claims
    path: ^/fhir/(Claim|Patient)/?$
    methods: [POST]
    upstream: openimis
    ip_allowlist: [local]
    authentication: none
"""
NO_BINDINGS = """\
version: 1
profiles:
  Claim:
    elements: {status: any, use: any, patient: {reference: {types: [Patient], facility: any}}}
"""


async def test_refusals_are_operation_outcomes_and_nothing_is_forwarded(make_mediator, sandbox, sandbox_server):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=OPEN_CHANNELS),
                                 extra_policies={"write_profiles.yaml": NO_BINDINGS})
    seen = len(sandbox.requests)
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim", "status": "active",
                                                      "contained": [{"resourceType": "Organization", "id": "x"}]})
    assert response.status == 403
    outcome = await response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "write.contained_not_allowed"
    assert outcome["issue"][0]["details"]["text"].startswith("Claim.contained[0]: ")
    response = await client.post("/fhir/Patient", json={"resourceType": "Patient"})
    assert response.status == 403
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "write.no_profile"
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim", "status": "active", "total": {}})
    assert response.status == 422
    assert len(sandbox.requests) == seen   # nothing reached the stand-in
    allowed = await client.post("/fhir/Claim", json={"resourceType": "Claim", "status": "active"})
    assert allowed.status != 403 and len(sandbox.requests) > seen   # the control: an allowed body is forwarded


async def test_explain_names_the_rule_and_the_element(tmp_path: Path, sandbox_server) -> None:
    from mediator.config import load_config
    from mediator.explain import explain

    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), channels=OPEN_CHANNELS),
                        DEFAULT_IP_POLICY, {"write_profiles.yaml": NO_BINDINGS})
    body = json.dumps({"resourceType": "Claim", "status": "active",
                       "contained": [{"resourceType": "Medication", "id": "0001"}]}).encode()
    result = await explain(load_config(root), "POST", "/fhir/Claim", None, body=body)
    assert result.reasons[-4:] == [("request", "request.parsed"), ("search", "search.not_a_search"),
                                   ("authorization", "authorization.allowed"),
                                   ("write", "write.contained_not_allowed")]
    write_line = next(line for line in result.lines() if line.startswith("write "))
    assert "rule=profiles.Claim.contained  element=Claim.contained[0]" in write_line
    assert result.lines()[-1] == "result: 403 write.contained_not_allowed"


async def test_an_edited_profile_applies_on_reload_and_a_broken_one_keeps_the_old(tmp_path: Path, sandbox_server,
                                                                                 aiohttp_client) -> None:
    from mediator.app import METRICS, build_app
    from mediator.config import load_config
    from mediator.reload import attach_reloader
    from tests.operations.support import eventually

    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server), channels=OPEN_CHANNELS,
                                                extra_server="reload:\n  poll_interval_s: 0.05\n"),
                        DEFAULT_IP_POLICY, {"write_profiles.yaml": NO_BINDINGS})
    app = build_app(load_config(root))
    attach_reloader(app, root)
    client = await aiohttp_client(app)

    def reloads(outcome: str) -> float:
        return app[METRICS].registry.get_sample_value("mediator_config_reloads_total",
                                                      {"outcome": outcome, "trigger": "file"}) or 0.0

    total = {"resourceType": "Claim", "status": "active", "total": {"value": 1}}
    assert (await client.post("/fhir/Claim", json=total)).status == 422
    profiles = root / "policies" / "write_profiles.yaml"
    profiles.write_text(NO_BINDINGS.replace("status: any,", "status: any, total: any,"))
    await eventually(lambda: reloads("success") == 1, what="the edited profile to load")
    assert (await client.post("/fhir/Claim", json=total)).status != 422
    profiles.write_text(NO_BINDINGS.replace("status: any,", "status: anything,"))
    await eventually(lambda: reloads("failure") == 1, what="the broken profile to be refused")
    assert (await client.post("/fhir/Claim", json=total)).status != 422   # the last good profile serves


def test_the_audit_event_names_the_element_and_rule_never_a_value() -> None:
    from mediator.audit import audit_event
    from mediator.fhir import parse_fhir_path
    from mediator.pipeline import Exchange
    from mediator.request_view import RequestView

    exchange = Exchange(RequestView.described("POST", "/fhir/Claim"), "req-1")
    exchange.fhir = parse_fhir_path("POST", "/Claim")
    exchange.write_check = _check(contained_variant("Medication"))
    event = audit_event(exchange, 403, exchange.write_check.decision.reason, 0.0)
    details = [d for entity in event["entity"] for d in entity.get("detail", ())]
    assert details == [{"type": "write-firewall-element", "valueString": "Claim.contained[0]"},
                       {"type": "write-firewall-rule", "valueString": "profiles.Claim.contained"}]
    assert "unitPrice" not in json.dumps(event) and event["outcomeDesc"] == "403 write.contained_not_allowed"
