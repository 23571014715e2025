"""Authorization stage: (a) pure decide tables, (b) schema errors with file:line:col, (c) round trips.

The round trips run the real mediator and the openIMIS stand-in over sockets, through the whole real
pipeline: callers are proven by the authentication stage with credentials minted at test time (a
vendor client per facility, tokens from /auth/token, users' SSO tokens; one round trip over mTLS).
"""

from __future__ import annotations

import copy
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc.jwk import ECKey

from mediator.app import RUNTIME, build_app
from mediator.certs import make_dev_pki
from mediator.config import load_config
from mediator.config.authorization import AuthorizationPolicy, Permission, parse_token_scope
from mediator.facilities import FacilitySnapshot
from mediator.facility_scope import FacilityFacts, claim_facts, eligibility_facts, owner_facts
from mediator.identity.client import client_assertion
from mediator.pipeline import Decision, Pipeline, Principal
from mediator.sandbox import load_fixtures
from mediator.stages.authentication import AuthenticationStage
from mediator.stages.authorization_policy import Access, evaluate, token_permissions
from mediator.tls import server_context
from tests.conftest import (
    DEFAULT_IP_POLICY,
    OPEN_CAPABILITIES_CHANNEL,
    channels_yaml,
    config_problems,
    upstream_url,
    write_config,
)
from tests.identity.kit import (
    TLS_BLOCK,
    TOKEN_URL,
    VENDOR_SCOPES,
    facility_vendors_yaml,
    form,
    vendor_user_token,
    write_vendor_keys,
)

FIXTURES = Path(__file__).parents[1] / "config" / "fixtures"
SHIPPED_POLICY = (Path(__file__).parents[2] / "policies" / "authorization.yaml").read_text()

JM_UUID = "026e088a-fbd5-474e-8d42-069958a34127"      # JMHOS001, Jambero District Hospital
RA_UUID = "d8a25f21-f36a-4d4d-9e58-1db8ffbe7036"      # RAHOS001, Rapta District Hospital
JM_ADMIN = "4a3f1a0a-e13c-451a-9511-a4d0fe35d20b"     # claim admin JHOS0011
RA_ADMIN = "598e43ca-9977-4f4b-a678-992528ce3454"     # claim admin RHOS0011
JM_CLAIM = "9a1b2c3d-0000-4000-8000-00000000a001"
RA_CLAIM = "9a1b2c3d-0000-4000-8000-00000000b001"
UUID_TYPE = {"coding": [{"code": "UUID"}]}
CODE_TYPE = {"coding": [{"code": "Code"}]}

JM_CLERK = Principal("hms-a", "access_token", user_id="jm-clerk", roles=frozenset({"hms", "claim-admin"}),
                     scopes=frozenset({"user/*.cruds", "system/*.rs"}), health_facilities=frozenset({"JMHOS001"}))
HMS_ONLY = Principal("hms-a", "mtls", roles=frozenset({"hms"}))
NO_FACILITY = Principal("hms-a", "mtls", user_id="x", roles=frozenset({"claim-admin"}))


def _store() -> dict[str, dict[str, dict[str, Any]]]:
    return load_fixtures()


def _snapshot() -> FacilitySnapshot:
    store = _store()
    return FacilitySnapshot.from_resources(store["Organization"].values(), store["PractitionerRole"].values(), 0)


def _claim(**changes: Any) -> dict[str, Any]:
    claim = copy.deepcopy(_store()["Claim"][JM_CLAIM])
    claim.pop("id")
    claim.update(changes)
    return claim


def _policy(text: str = SHIPPED_POLICY) -> AuthorizationPolicy:
    import yaml
    return AuthorizationPolicy.model_validate(yaml.safe_load(text))


# --- (a) pure tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "rtype", "letter", "query", "has_user", "grants"),
    [
        ("user/Claim.cr", "Claim", "c", (), True, True),
        ("user/Claim.cr", "Claim", "c", (), False, False),          # user/ needs a user
        ("system/Claim.cr", "Claim", "c", (), False, True),
        ("user/Claim.cr", "Claim", "s", (), True, False),
        ("user/Claim.cr", "ClaimResponse", "r", (), True, False),
        ("system/*.rs", "Medication", "s", (), False, True),
        ("system/Medication.rs", "*", "s", (), False, False),       # system-wide search needs *.s
        ("user/Patient.s?identifier=*", "Patient", "s", (("identifier", "070707070"),), True, True),
        ("user/Patient.s?identifier=*", "Patient", "s", (("name", "Macintyre"),), True, False),
        ("user/Patient.s?identifier=*", "Patient", "s", (("identifier", ""),), True, False),
        ("user/Patient.s?identifier=*", "Patient", "s",
         (("identifier", "1"), ("identifier", "2")), True, False),  # repeated parameter
        ("user/Patient.s?identifier=*", "Patient", "s", None, True, False),   # POST _search
        ("user/Patient.s?identifier=*", "Patient", "s", (("identifier:missing", "true"),), True, False),
        ("user/Patient.s?gender=female", "Patient", "s", (("gender", "male"),), True, False),
    ],
)
def test_permission_grants(text, rtype, letter, query, has_user, grants):
    assert Permission.parse(text).grants(rtype, letter, query, has_user) is grants


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("user/Claim.rc", "'user/Claim.rc': letters must be a subset of 'cruds' in that order, each once"),
        ("user/Patient.rs?identifier=*", "'user/Patient.rs?identifier=*': a ?param=value constraint "
                                         "is only supported on search (.s)"),
        ("patient/Claim.r", "not a SMART v2 permission: 'patient/Claim.r' (expected e.g. user/Claim.cr, "
                            "system/Medication.rs or user/Patient.s?identifier=*)"),
    ],
)
def test_bad_permissions_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError) as info:
        Permission.parse(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("scope", "letters"),
    [("user/Claim.read", "rs"), ("user/Claim.write", "cud"), ("system/*.*", "cruds"), ("user/Claim.cr", "cr"),
     ("patient/Claim.read", None), ("openid", None), ("fhirUser", None)],
)
def test_token_scopes_v1_and_v2(scope, letters):
    permission = parse_token_scope(scope)
    assert (None if permission is None else "".join(c for c in "cruds" if c in permission.letters)) == letters


def test_scopes_limit_access_tokens_even_when_empty():
    assert token_permissions(Principal("c", "access_token")) == ()
    assert token_permissions(Principal("c", "mtls")) is None


def _access(rtype, letter, query=(), rid=None):
    return Access(rtype, letter, query, rid)


OWN = FacilityFacts((("provider", "JMHOS001"), ("enterer", "JMHOS001")))
FOREIGN = FacilityFacts((("provider", "RAHOS001"),))


@pytest.mark.parametrize(
    ("principal", "access", "facts", "reason", "rule"),
    [
        (HMS_ONLY, _access("Medication", "s"), None, "authorization.allowed", "master-data-read"),
        (HMS_ONLY, _access("Medication", "c"), None, "authorization.no_matching_rule", None),
        (HMS_ONLY, _access("Claim", "c"), OWN, "authorization.no_matching_rule", None),
        (None, _access("Medication", "s"), None, "authorization.no_matching_rule", None),
        (None, _access("CapabilityStatement", "r"), None, "authorization.allowed", "capabilities"),
        (JM_CLERK, _access("Claim", "c"), OWN, "authorization.allowed", "claim-submit"),
        (JM_CLERK, _access("Claim", "c"), FOREIGN, "authorization.provider_other_facility", "claim-submit"),
        (JM_CLERK, _access("Claim", "c"), None, "authorization.facility_unverifiable", "claim-submit"),
        (JM_CLERK, _access("Claim", "c"), FacilityFacts.failed("provider_unresolved", "x"),
         "authorization.provider_unresolved", "claim-submit"),
        (NO_FACILITY, _access("Claim", "c"), OWN, "authorization.no_facility", "claim-submit"),
        (JM_CLERK, _access("Claim", "r", rid=JM_CLAIM), OWN, "authorization.allowed", "claim-read"),
        (JM_CLERK, _access("Claim", "r", rid=RA_CLAIM), FOREIGN, "authorization.provider_other_facility",
         "claim-read"),
        (JM_CLERK, _access("Patient", "s", (("identifier", "070707070"),)), None, "authorization.allowed",
         "eligibility"),
        (JM_CLERK, _access("Patient", "s", (("name", "x"),)), None, "authorization.no_matching_rule", None),
        (JM_CLERK, _access("ClaimResponse", "s"), None, "authorization.allowed", "claim-status"),
        (JM_CLERK.__class__("hms-a", "access_token", user_id="u", roles=frozenset({"claim-admin"}),
                            scopes=frozenset({"user/Patient.rs"}), health_facilities=frozenset({"JMHOS001"})),
         _access("Claim", "c"), OWN, "authorization.scope_not_granted", "claim-submit"),
    ],
)
def test_decide_table(principal, access, facts, reason, rule):
    verdict = evaluate(_policy().rules, principal, access, facts)
    assert verdict.decision.reason == reason
    assert (verdict.rule.name if verdict.rule else None) == rule


def test_search_of_facility_bound_type_is_allowed_only_with_a_result_filter():
    verdict = evaluate(_policy().rules, JM_CLERK, _access("ClaimResponse", "s"), None)
    assert verdict.decision.allow and verdict.filter_search
    verdict = evaluate(_policy().rules, HMS_ONLY, _access("Medication", "s"), None)
    assert verdict.decision.allow and not verdict.filter_search


RULES_WITH_SHADOW = """\
version: 1
facility_directory: {upstream: openimis}
rules:
  - name: no-claims-on-sunday
    roles: [claim-admin]
    effect: deny
    permissions: [user/Claim.c]
    mode: shadow
  - name: claim-submit
    roles: [claim-admin]
    permissions: [user/Claim.c]
  - name: scheme-wide-read
    roles: [auditor]
    permissions: [user/Claim.r]
    facility_scope: any
  - name: deny-auditor-writes
    roles: [auditor]
    effect: deny
    permissions: [user/Claim.c]
"""


def test_shadow_rules_are_skipped_when_enforcing_and_decide_when_shadowed():
    rules = _policy(RULES_WITH_SHADOW).rules
    enforced = evaluate(rules, JM_CLERK, _access("Claim", "c"), OWN)
    shadow = evaluate(rules, JM_CLERK, _access("Claim", "c"), OWN, include_shadow=True)
    assert (enforced.decision.allow, enforced.rule.name) == (True, "claim-submit")
    assert (shadow.decision.reason, shadow.rule.name) == ("authorization.denied_by_rule", "no-claims-on-sunday")


def test_facility_scope_any_skips_the_facility_check_and_deny_rules_deny():
    auditor = Principal("x", "mtls", user_id="a", roles=frozenset({"auditor"}))
    rules = _policy(RULES_WITH_SHADOW).rules
    assert evaluate(rules, auditor, _access("Claim", "r", rid="x"), FOREIGN).decision.allow
    assert evaluate(rules, auditor, _access("Claim", "c"), OWN).decision.reason == "authorization.denied_by_rule"


def _org_ref(value, *, kind="reference"):
    if kind == "reference":
        return {"reference": f"Organization/{value}"}
    return {"identifier": {"type": CODE_TYPE if len(value) < 20 else UUID_TYPE, "value": value}}


CONTAINED_OURS = {"resourceType": "Organization", "id": "hf",
                  "identifier": [{"type": CODE_TYPE, "value": "JMHOS001"}]}


@pytest.mark.parametrize(
    ("changes", "bindings", "problem"),
    [
        ({}, {("provider", "JMHOS001"), ("enterer", "JMHOS001")}, None),
        ({"provider": _org_ref("JMHOS001")}, {("provider", "JMHOS001"), ("enterer", "JMHOS001")}, None),
        ({"provider": _org_ref("JMHOS001", kind="identifier")}, {("provider", "JMHOS001"),
                                                                 ("enterer", "JMHOS001")}, None),
        ({"provider": _org_ref(RA_UUID)}, {("provider", "RAHOS001"), ("enterer", "JMHOS001")}, None),
        ({"provider": _org_ref("RAHOS001", kind="identifier")}, {("provider", "RAHOS001"),
                                                                 ("enterer", "JMHOS001")}, None),
        ({"provider": _org_ref("NOSUCH01")}, None, "provider_unresolved"),
        ({"provider": {"reference": f"https://evil.example/Organization/{JM_UUID}"}}, None, "provider_unresolved"),
        ({"provider": {"reference": f"Practitioner/{JM_UUID}"}}, None, "provider_unresolved"),
        ({"provider": {"display": "JMHOS001"}}, None, "provider_unresolved"),
        ({"provider": None}, None, "provider_unresolved"),
        ({"provider": {"reference": f"Organization/{RA_UUID}",
                       "identifier": {"type": CODE_TYPE, "value": "JMHOS001"}}}, None, "provider_mismatch"),
        ({"provider": {"reference": "#hf"}, "contained": [CONTAINED_OURS]},
         {("provider", "JMHOS001"), ("enterer", "JMHOS001"), ("contained", "JMHOS001")}, None),
        ({"provider": {"reference": "#Organization/hf"}, "contained": [CONTAINED_OURS]},
         {("provider", "JMHOS001"), ("enterer", "JMHOS001"), ("contained", "JMHOS001")}, None),
        # contained org with our code, but the reference points elsewhere
        ({"provider": _org_ref(RA_UUID), "contained": [CONTAINED_OURS]},
         {("provider", "RAHOS001"), ("enterer", "JMHOS001"), ("contained", "JMHOS001")}, None),
        # contained org claims our code and another facility's uuid
        ({"provider": {"reference": "#hf"}, "contained": [
            {**CONTAINED_OURS, "identifier": [{"type": CODE_TYPE, "value": "JMHOS001"},
                                              {"type": UUID_TYPE, "value": RA_UUID}]}]}, None, "provider_mismatch"),
        # duplicate contained ids: openIMIS takes the first, a reviewer may read the second
        ({"provider": {"reference": "#hf"}, "contained": [
            {**CONTAINED_OURS, "identifier": [{"type": CODE_TYPE, "value": "RAHOS001"}]}, CONTAINED_OURS]},
         None, "duplicate_contained_id"),
        # an unreferenced contained organization of a new or unknown facility
        ({"contained": [{"resourceType": "Organization", "id": "x",
                         "identifier": [{"type": CODE_TYPE, "value": "NEWHF001"}]}]}, None, "contained_unresolved"),
        ({"provider": {"reference": "#nothing"}, "contained": [CONTAINED_OURS]}, None, "provider_unresolved"),
        ({"enterer": {"reference": f"Practitioner/{RA_ADMIN}"}}, {("provider", "JMHOS001"),
                                                                 ("enterer", "RAHOS001")}, None),
        ({"enterer": {"identifier": {"type": CODE_TYPE, "value": "JHOS0011"}}},
         {("provider", "JMHOS001"), ("enterer", "JMHOS001")}, None),
        ({"enterer": {"reference": "Practitioner/unknown"}}, None, "enterer_unresolved"),
        ({"enterer": None}, None, "enterer_unresolved"),
    ],
)
def test_claim_facts(changes, bindings, problem):
    facts = claim_facts(_claim(**changes), _snapshot())
    assert facts.problem == problem
    if bindings is not None:
        assert set(facts.bindings) == bindings


def test_owner_and_eligibility_facts():
    snapshot = _snapshot()
    assert owner_facts(None, snapshot).problem == "owner_not_found"
    assert owner_facts(_store()["Claim"]["Claim001"], snapshot).bindings == (("owner", "RAHOS001"),)
    assert eligibility_facts({"resourceType": "CoverageEligibilityRequest"}, snapshot).bindings == ()
    assert eligibility_facts({"provider": _org_ref(RA_UUID)}, snapshot).bindings == (("provider", "RAHOS001"),)
    assert eligibility_facts({"facility": {"reference": "Location/JMHOS001"}}, snapshot).bindings == \
        (("location", "JMHOS001"),)


@pytest.mark.parametrize(("access", "resource", "owner", "expected"), [
    # Claim: its owner on read/update/delete, its body on create/update (both on update).
    (Access("Claim", "r", None, "x"), None, "Claim001", ((("owner", "RAHOS001"),), None)),
    (Access("Claim", "c", None), "claim", None, (None, None)),
    (Access("Claim", "c", None), None, None, ((), "facility_unverifiable")),
    # ClaimResponse and CommunicationRequest: through their Claim only.
    (Access("ClaimResponse", "r", None, "x"), None, "Claim001", ((("owner", "RAHOS001"),), None)),
    (Access("CommunicationRequest", "d", None, "x"), None, None, ((), "owner_not_found")),
    # CoverageEligibilityRequest: its body on create; it cannot be read back through a claim.
    (Access("CoverageEligibilityRequest", "c", None), {"facility": {"reference": "Location/JMHOS001"}}, None,
     ((("location", "JMHOS001"),), None)),
    (Access("CoverageEligibilityRequest", "r", None, "x"), None, None, ((), "facility_unverifiable")),
])
def test_the_facility_binding_table(access, resource, owner, expected):
    from mediator.facility_scope import FACILITY_BINDINGS, FACILITY_BOUND, OWNED_BY_CLAIM
    from mediator.stages.authorization_facts import facts_from

    assert FACILITY_BOUND == set(FACILITY_BINDINGS) == {"Claim", "ClaimResponse", "CommunicationRequest",
                                                        "CoverageEligibilityRequest"}
    assert OWNED_BY_CLAIM == {"Claim", "ClaimResponse", "CommunicationRequest"}
    snapshot = _snapshot()
    body = _claim() if resource == "claim" else resource
    binding = FACILITY_BINDINGS[access.resource_type]
    owner_needed = binding.through_claim and access.letter in "rud"
    facts = facts_from(access, body, _store()["Claim"][owner] if owner else None, owner_needed, snapshot)
    bindings, problem = expected
    assert facts.problem == problem
    if bindings is not None:
        assert facts.bindings == bindings
    elif problem is None:
        assert facts.facilities == {"JMHOS001"}   # the shipped JM claim names JMHOS001 throughout


def test_directory_reads_only_health_facilities_and_claim_administrators():
    snapshot = _snapshot()
    assert snapshot.facility_of_organization("RaptaDistrictHospital") == "RAHOS001"
    assert snapshot.facility_of_organization("D8A25F21-F36A-4D4D-9E58-1DB8FFBE7036") == "RAHOS001"
    assert snapshot.facility_of_organization("JMHOS001") == "JMHOS001"
    policyholder = next(o for o in _store()["Organization"].values() if o["type"][0]["coding"][0]["code"] == "bus")
    assert snapshot.facility_of_organization(policyholder["id"]) is None
    assert snapshot.facility_of_practitioner("RHOS0011") == "RAHOS001"
    assert snapshot.facility_of_practitioner(JM_ADMIN.upper()) == "JMHOS001"


def test_a_key_naming_two_facilities_resolves_to_neither():
    org = {"resourceType": "Organization", "type": [{"coding": [{"code": "prov"}]}]}
    snapshot = FacilitySnapshot.from_resources([
        {**org, "id": "same", "identifier": [{"type": CODE_TYPE, "value": "A1"}]},
        {**org, "id": "same", "identifier": [{"type": CODE_TYPE, "value": "B1"}]}], [], 0)
    assert snapshot.facility_of_organization("same") is None
    assert snapshot.facility_of_organization("A1") == "A1"


# --- (b) schema --------------------------------------------------------------------------------------

GOOD_CHANNELS = channels_yaml("http://127.0.0.1:8000/api/api_fhir_r4/")


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("bad_authz_permission.yaml",
         ["policies/authorization.yaml:7:33: rules[0].permissions[1]: 'user/Claim.rc': letters must be a "
          "subset of 'cruds' in that order, each once"]),
        ("bad_authz_constraint.yaml",
         ["policies/authorization.yaml:6:19: rules[0].permissions[0]: 'user/Patient.rs?identifier=*': "
          "a ?param=value constraint is only supported on search (.s)"]),
        ("bad_authz_upstream.yaml",
         ["policies/authorization.yaml:3:3: facility_directory.upstream: unknown upstream 'openimis-prod' "
          "(not in channels.yaml upstreams)"]),
        ("bad_authz_duplicate_rule.yaml",
         ["policies/authorization.yaml:1:1: duplicate rule name 'claims'"]),
        ("bad_authz_deny_scope.yaml",
         ["policies/authorization.yaml:5:5: rules[0]: facility_scope applies to allow rules only"]),
        ("bad_authz_mode.yaml",
         ["policies/authorization.yaml:8:5: rules[0].mode: Input should be 'enforce' or 'shadow'"]),
        ("bad_authz_no_roles.yaml",
         ["policies/authorization.yaml:5:5: rules[0]: roles must not be empty (a rule for nobody is a mistake)"]),
        ("bad_authz_no_directory.yaml",
         ["policies/authorization.yaml:1:1: facility_directory: Field required"]),
    ],
)
def test_policy_errors_name_file_line_and_message(tmp_path, fixture, expected):
    root = write_config(tmp_path, GOOD_CHANNELS, DEFAULT_IP_POLICY,
                        {"authorization.yaml": (FIXTURES / fixture).read_text()})
    assert config_problems(root) == expected


async def test_absent_policy_denies_everything_and_empty_rules_deny_all(tmp_path, caplog):
    """No policies/authorization.yaml is not "no authorization": every request is denied (issue 13)."""
    from mediator.stages import build_stages
    from mediator.stages.authorization_absent import NoAuthorizationPolicyStage

    root = write_config(tmp_path, GOOD_CHANNELS, DEFAULT_IP_POLICY, {"authorization.yaml": None})
    assert not (root / "policies" / "authorization.yaml").exists()
    with caplog.at_level("WARNING", logger="mediator.authorization"):
        stages = build_stages(load_config(root))
    assert [r.msg.fields for r in caplog.records if r.name == "mediator.authorization"] == [
        {"event": "authorization.no_policy", "file": "policies/authorization.yaml",
         "effect": "every request is denied"}]
    assert [s.name for s in stages][-2:] == ["authorization", "write"]
    assert isinstance(stages[-2], NoAuthorizationPolicyStage)
    decision = await stages[-2].run(None)  # type: ignore[arg-type]  # it looks at nothing
    assert (decision.allow, decision.status, decision.reason) == (False, 403, "authorization.no_policy")
    empty = "version: 1\nfacility_directory: {upstream: openimis}\nrules: []\n"
    root = write_config(tmp_path, GOOD_CHANNELS, DEFAULT_IP_POLICY, {"authorization.yaml": empty})
    config = load_config(root)
    assert [s.name for s in build_stages(config)][-2:] == ["authorization", "write"]
    assert evaluate(config.policies["authorization"].rules, HMS_ONLY,  # type: ignore[attr-defined]
                    _access("Medication", "s"), None).decision.reason == "authorization.no_matching_rule"


async def test_absent_policy_refuses_even_open_channels_over_a_socket(sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)), DEFAULT_IP_POLICY,
                                 {"authorization.yaml": None})
    response = await client.get("/fhir/Medication/")
    assert response.status == 403
    outcome = await response.json()
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "authorization.no_policy"


# --- (c) round trips over real sockets ----------------------------------------------------------------
# Every principal below is proven by the real authentication stage: each facility's vendor is registered
# in clients.yaml (tests/identity/kit.py), gets an access token from POST /auth/token with a
# private_key_jwt assertion signed at test time, and vouches for its user with an SSO token in
# X-User-Token signed by the same vendor key. Roles: [hms] from the registry, plus the user's.

FACILITY_OF_VENDOR = {"vendor-jm": "JMHOS001", "vendor-ra": "RAHOS001"}
VENDOR_KEYS = {vendor: ECKey.generate_key("P-256") for vendor in FACILITY_OF_VENDOR}


@dataclass(frozen=True)
class Caller:
    """A vendor's HMS acting for one of its users, or for itself when `user` is None."""

    vendor: str
    user: str | None = None
    roles: tuple[str, ...] = ("claim-admin",)
    facility: str | None = None
    """The user token's `hf` claim; None: no claim (the user gets the client's registered facilities)."""
    scope: str = VENDOR_SCOPES
    """What the access token asks for."""


CALLERS = {
    "jm-clerk": Caller("vendor-jm", "jm-clerk", facility="JMHOS001"),
    "ra-clerk": Caller("vendor-ra", "ra-clerk", facility="RAHOS001"),
    "hms": Caller("vendor-jm"),
    "jm-reader": Caller("vendor-jm", "jm-clerk", facility="JMHOS001", scope="system/*.rs"),
}

CLAIM_CHANNELS = """\
- name: master-data
  path: ^/fhir/(Medication|Organization)(/[^/]+)?/?$
  methods: [GET]
  upstream: openimis
  ip_allowlist: [local]
- name: eligibility
  path: ^/fhir/(Patient(/[^/]+)?|CoverageEligibilityRequest)/?$
  methods: [GET, POST]
  upstream: openimis
  ip_allowlist: [local]
- name: claims
  path: ^/fhir/(Claim|ClaimResponse|CommunicationRequest)(/[^/]+)?/?$
  methods: [GET, POST]
  upstream: openimis
  ip_allowlist: [local]
- name: bulk
  path: ^/fhir/?$
  methods: [POST]
  upstream: openimis
  ip_allowlist: [local]
""" + OPEN_CAPABILITIES_CHANNEL


def write_authz_config(root: Path, sandbox_server: Any, policy: str = SHIPPED_POLICY,
                       extra_server: str = "") -> Path:
    channels = channels_yaml(upstream_url(sandbox_server), extra_server=extra_server, channels=CLAIM_CHANNELS)
    write_config(root, channels, DEFAULT_IP_POLICY,
                 {"authorization.yaml": policy, "clients.yaml": facility_vendors_yaml(FACILITY_OF_VENDOR)})
    write_vendor_keys(root, VENDOR_KEYS)
    return root


def user_token_of(caller: Caller, **changes: Any) -> str:
    return vendor_user_token(VENDOR_KEYS[caller.vendor], caller.vendor, caller.user or "", caller.roles,
                             caller.facility, **changes)


async def credentials(client: Any, who: str) -> dict[str, str]:
    """Real credentials for CALLERS[who]: an access token from /auth/token and the user's SSO token."""
    caller = CALLERS[who]
    assertion = client_assertion(caller.vendor, VENDOR_KEYS[caller.vendor], TOKEN_URL)
    response = await client.post("/auth/token", data=form(assertion, caller.scope))
    assert response.status == 200, await response.text()
    headers = {"Authorization": f"Bearer {(await response.json())['access_token']}"}
    if caller.user is not None:
        headers["X-User-Token"] = user_token_of(caller)
    return headers


def assert_real_authentication(app: web.Application) -> None:
    stages = app[RUNTIME].current.pipeline.stages
    assert [type(s) for s in stages if s.name == "authentication"] == [AuthenticationStage]


@pytest.fixture
def authz_mediator(tmp_path, sandbox_server, aiohttp_client):
    async def factory(policy: str = SHIPPED_POLICY):
        app = build_app(load_config(write_authz_config(tmp_path / "config", sandbox_server, policy)))
        assert_real_authentication(app)
        return await aiohttp_client(app)
    return factory


def _reason(document: dict[str, Any]) -> str:
    return document["issue"][0]["details"]["coding"][0]["code"]


async def _get(client, path, who="jm-clerk"):
    return await client.get(path, headers=await credentials(client, who))


async def _post(client, path, document, who="jm-clerk", content_type="application/fhir+json"):
    headers = {**await credentials(client, who), "Content-Type": content_type}
    return await client.post(path, data=json.dumps(document), headers=headers)


async def _post_claim(client, claim, who="jm-clerk"):
    return await _post(client, "/fhir/Claim/", claim, who)


def _claims_posted(sandbox) -> list[dict[str, Any]]:
    return [r for r in sandbox.requests if r["method"] == "POST" and r["path"].endswith("/Claim/")]


async def test_own_facility_claim_is_submitted(sandbox, authz_mediator):
    client = await authz_mediator()
    response = await _post_claim(client, _claim())
    assert response.status == 201, await response.text()
    assert _claims_posted(sandbox)


async def test_the_other_facilitys_clerk_submits_its_own_claim_but_not_ours(sandbox, authz_mediator):
    client = await authz_mediator()
    ra_claim = _claim(provider={"reference": f"Organization/{RA_UUID}"},
                      enterer={"reference": f"Practitioner/{RA_ADMIN}"})
    own = await _post_claim(client, ra_claim, "ra-clerk")
    assert own.status == 201, await own.text()
    ours = await _post_claim(client, _claim(), "ra-clerk")
    assert ours.status == 403 and _reason(await ours.json()) == "authorization.provider_other_facility"
    assert len(_claims_posted(sandbox)) == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"provider": {"reference": f"Organization/{RA_UUID}"}}, "authorization.provider_other_facility"),
        ({"provider": {"reference": "Organization/RAHOS001"}}, "authorization.provider_other_facility"),
        ({"provider": {"identifier": {"type": CODE_TYPE, "value": "RAHOS001"}}},
         "authorization.provider_other_facility"),
        ({"provider": {"reference": "#hf"}, "contained": [
            {**CONTAINED_OURS, "identifier": [{"type": CODE_TYPE, "value": "RAHOS001"}]}]},
         "authorization.provider_other_facility"),
        ({"enterer": {"reference": f"Practitioner/{RA_ADMIN}"}}, "authorization.enterer_other_facility"),
        ({"provider": {"reference": f"Organization/{RA_UUID}"}, "contained": [CONTAINED_OURS]},
         "authorization.provider_other_facility"),
        ({"provider": {"reference": "#hf"}, "contained": [
            {**CONTAINED_OURS, "identifier": [{"type": CODE_TYPE, "value": "RAHOS001"}]}, CONTAINED_OURS]},
         "authorization.duplicate_contained_id"),
        ({"provider": {"reference": f"Organization/{RA_UUID}",
                       "identifier": {"type": CODE_TYPE, "value": "JMHOS001"}}}, "authorization.provider_mismatch"),
        ({"provider": {"reference": "Organization/NOSUCH01"}}, "authorization.provider_unresolved"),
    ],
)
async def test_cross_facility_claim_writes_are_refused_before_openimis(sandbox, authz_mediator, changes, reason):
    client = await authz_mediator()
    response = await _post_claim(client, _claim(**changes))
    assert response.status == 403
    assert _reason(await response.json()) == reason
    assert not _claims_posted(sandbox)


async def test_a_vendor_cannot_vouch_for_a_user_of_another_facility(sandbox, authz_mediator):
    client = await authz_mediator()
    jm = await credentials(client, "hms")
    # vendor-jm claims its user works at RAHOS001: not a facility registered for vendor-jm
    foreign_user = user_token_of(CALLERS["jm-clerk"], hf="RAHOS001")
    ra_claim = _claim(provider={"reference": f"Organization/{RA_UUID}"})
    response = await client.post("/fhir/Claim/", data=json.dumps(ra_claim),
                                 headers={**jm, "X-User-Token": foreign_user, "Content-Type": "application/fhir+json"})
    assert response.status == 403 and _reason(await response.json()) == "authentication.facility_not_registered"
    # vendor-jm replays a token vendor-ra issued to its own clerk
    response = await client.post("/fhir/Claim/", data=json.dumps(_claim()),
                                 headers={**jm, "X-User-Token": user_token_of(CALLERS["ra-clerk"]),
                                          "Content-Type": "application/fhir+json"})
    assert response.status == 401 and _reason(await response.json()) == "authentication.user_token_bad_signature"
    assert not _claims_posted(sandbox)


async def test_the_access_tokens_scopes_limit_what_the_user_may_do(sandbox, authz_mediator):
    client = await authz_mediator()
    write = await _post_claim(client, _claim(), "jm-reader")
    assert write.status == 403 and _reason(await write.json()) == "authorization.scope_not_granted"
    read = await _get(client, f"/fhir/ClaimResponse/{JM_CLAIM}", "jm-reader")
    assert read.status == 200
    assert not _claims_posted(sandbox)


async def test_claim_response_of_another_facility_is_refused(authz_mediator):
    client = await authz_mediator()
    own = await _get(client, f"/fhir/ClaimResponse/{JM_CLAIM}")
    assert own.status == 200 and (await own.json())["id"] == JM_CLAIM
    other = await _get(client, f"/fhir/ClaimResponse/{RA_CLAIM}")
    assert other.status == 403
    assert _reason(await other.json()) == "authorization.owner_other_facility"
    theirs = await _get(client, f"/fhir/ClaimResponse/{RA_CLAIM}", "ra-clerk")
    assert theirs.status == 200 and (await theirs.json())["id"] == RA_CLAIM
    missing = await _get(client, "/fhir/ClaimResponse/00000000-0000-4000-8000-000000000000")
    assert missing.status == 404 and _reason(await missing.json()) == "authorization.owner_not_found"


async def test_status_polls_look_the_owner_up_once_and_stay_refused_for_others(sandbox, authz_mediator):
    client = await authz_mediator()

    def owner_lookups() -> int:   # the claim index (GraphQL) is asked; openIMIS's FHIR Claim read is not
        assert not [r for r in sandbox.requests if r["path"].endswith(f"/Claim/{JM_CLAIM}/")]
        return sum(1 for r in sandbox.requests if r["path"] == "/api/graphql")

    for _ in range(3):
        assert (await _get(client, f"/fhir/ClaimResponse/{JM_CLAIM}")).status == 200
    assert owner_lookups() == 1  # the owner is remembered; each poll still reaches openIMIS for the answer
    for _ in range(2):  # ...and the remembered owner still refuses the other facility
        other = await _get(client, f"/fhir/ClaimResponse/{JM_CLAIM}", "ra-clerk")
        assert (other.status, _reason(await other.json())) == (403, "authorization.owner_other_facility")
    assert owner_lookups() == 1
    missing = "00000000-0000-4000-8000-000000000000"
    for _ in range(2):  # an unknown claim is asked for every time (a claim may appear)
        assert (await _get(client, f"/fhir/ClaimResponse/{missing}")).status == 404
    assert owner_lookups() == 3


def test_owner_cache_is_bounded_expires_and_keeps_only_the_owner():
    from mediator.stages.authorization_facts import OwnerCache

    now = [0.0]
    cache = OwnerCache(2, ttl_s=10, clock=lambda: now[0])
    claim = {"resourceType": "Claim", "id": "c1", "provider": {"reference": "Organization/x"},
             "patient": {"reference": "Patient/p"}, "item": [{"sequence": 1}],
             "contained": [{"resourceType": "Organization", "id": "o"}, {"resourceType": "Patient", "id": "p"}]}
    kept = cache.put("openimis", "c1", claim)
    assert kept == {"resourceType": "Claim", "id": "c1", "provider": {"reference": "Organization/x"},
                    "contained": [{"resourceType": "Organization", "id": "o"}]}
    assert cache.get("openimis", "c1") == kept and cache.get("other-upstream", "c1") is None
    now[0] = 10.0
    assert cache.get("openimis", "c1") is None  # expired after ttl_s
    for cid in ("a", "b", "c"):
        cache.put("openimis", cid, {"id": cid})
    assert len(cache) == 2 and cache.get("openimis", "a") is None


@pytest.mark.parametrize("foreign_entries", ["drop", "deny"])
async def test_searches_show_only_the_callers_claims_with_its_own_total(sandbox, authz_mediator, foreign_entries):
    policy = SHIPPED_POLICY.replace("foreign_entries: drop", f"foreign_entries: {foreign_entries}")
    client = await authz_mediator(policy)
    response = await _get(client, "/fhir/ClaimResponse?_count=100")
    assert response.status == 200
    bundle = await response.json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [JM_CLAIM]
    assert bundle["total"] == 1   # Jambero's own count, not the stand-in's
    assert len(sandbox.store["ClaimResponse"]) > 1
    theirs = await (await _get(client, "/fhir/ClaimResponse?_count=100", "ra-clerk")).json()
    assert RA_CLAIM in [e["resource"]["id"] for e in theirs["entry"]]
    assert JM_CLAIM not in [e["resource"]["id"] for e in theirs["entry"]]
    assert theirs["total"] == len(theirs["entry"])
    registry = client.app[RUNTIME].current.pipeline._recorder.registry
    assert registry.get_sample_value("mediator_authorization_search_pages_total",
                                     {"resource_type": "ClaimResponse", "outcome": "full"}) == 2
    assert registry.get_sample_value("mediator_authorization_index_requests_total",
                                     {"kind": "page", "outcome": "ok"}) == 2


async def test_identifier_search_finds_only_the_callers_claim(authz_mediator):
    client = await authz_mediator()
    own = await _get(client, "/fhir/ClaimResponse?identifier=JADH0001")
    assert own.status == 200
    assert [(e["resource"]["id"]) for e in (await own.json())["entry"]] == [JM_CLAIM]
    other = await _get(client, "/fhir/ClaimResponse?identifier=RAD00001")
    assert other.status == 200   # not 403: that would tell Jambero that Rapta has a claim with this code
    answer = await other.json()
    assert answer["total"] == 0 and "entry" not in answer and [link["relation"] for link in answer["link"]] == ["self"]


@pytest.mark.parametrize(("prefer", "query", "reason"), [
    ("handling=strict", "?status=active", "search.unsupported_parameter"),   # the search stage, first
    ("handling=lenient", "?_count=1&_count=2", "authorization.search_param_unsupported"),
    ("handling=strict", "?_count=1&_count=2", "authorization.search_param_unsupported"),
])
async def test_search_parameters_openimis_would_ignore_are_refused(authz_mediator, prefer, query, reason):
    client = await authz_mediator()
    headers = {**await credentials(client, "jm-clerk"), "Prefer": prefer}
    response = await client.get(f"/fhir/ClaimResponse{query}", headers=headers)
    assert (response.status, _reason(await response.json())) == (400, reason)


async def test_ignored_search_parameters_are_never_used_and_the_count_is_capped(authz_mediator):
    # handling=lenient (the default): ?status is neither used nor forwarded, the self link says what was used.
    client = await authz_mediator()
    response = await _get(client, "/fhir/ClaimResponse?status=active&_count=101")
    assert response.status == 200
    bundle = await response.json()
    assert {e["resource"]["id"] for e in bundle["entry"]} == {JM_CLAIM}
    assert "status" not in bundle["link"][0]["url"] and "_count=100" in bundle["link"][0]["url"]


async def test_a_search_whose_index_cannot_be_read_is_a_502(sandbox, authz_mediator):
    client = await authz_mediator()
    headers = await credentials(client, "jm-clerk")

    def broken() -> list:
        raise RuntimeError("boom")

    sandbox._claim_nodes = broken  # type: ignore[method-assign]
    response = await client.get("/fhir/ClaimResponse", headers=headers)
    assert response.status == 502
    assert _reason(await response.json()) == "authorization.lookup_failed"


def _bundle(*entries):
    return {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": resource, "request": {"method": "POST", "url": "Claim"}} for resource in entries]}


async def test_batch_with_one_foreign_entry_is_refused_whole(sandbox, authz_mediator):
    client = await authz_mediator()
    body = _bundle(_claim(), _claim(provider={"reference": f"Organization/{RA_UUID}"}))
    response = await _post(client, "/fhir/", body)
    assert response.status == 403
    document = await response.json()
    assert _reason(document) == "authorization.provider_other_facility"
    assert document["issue"][0]["details"]["text"].startswith("entry 1:")
    assert not [r for r in sandbox.requests if r["method"] == "POST" and r["path"].endswith("/api_fhir_r4/")]


async def test_check_entry_is_the_per_entry_decision(authz_mediator):
    client = await authz_mediator()
    stage = next(s for s in client.app[RUNTIME].current.pipeline.stages if s.name == "authorization")
    ok = await stage.check_entry(JM_CLERK, "POST", "Claim", _claim())
    foreign = await stage.check_entry(JM_CLERK, "POST", "Claim",
                                      _claim(provider={"reference": f"Organization/{RA_UUID}"}))
    absolute = await stage.check_entry(JM_CLERK, "POST", "https://evil.example/Claim", _claim())
    assert (ok.allow, foreign.reason, absolute.reason) == (
        True, "authorization.provider_other_facility", "authorization.bundle_entry_malformed")


async def test_eligibility_and_master_data_round_trip(authz_mediator):
    client = await authz_mediator()
    by_number = await _get(client, "/fhir/Patient?identifier=070707070")
    assert by_number.status in (200, 404)   # the stand-in may not know the insuree; the mediator let it through
    listing = await _get(client, "/fhir/Patient")
    assert listing.status == 403 and _reason(await listing.json()) == "authorization.no_matching_rule"
    eligibility = await _post(
        client, "/fhir/CoverageEligibilityRequest/",
        {"resourceType": "CoverageEligibilityRequest", "patient": {"reference": "Patient/x"},
         "provider": {"reference": f"Organization/{RA_UUID}"}}, content_type="application/json")
    assert eligibility.status == 403 and _reason(await eligibility.json()) == "authorization.provider_other_facility"
    medication = await _get(client, "/fhir/Medication", "hms")
    assert medication.status == 200
    application_alone = await _get(client, "/fhir/Patient?identifier=070707070", "hms")
    assert application_alone.status == 403   # user/ permissions need a user
    assert _reason(await application_alone.json()) == "authorization.no_matching_rule"
    anonymous = await client.get("/fhir/Medication")
    assert anonymous.status == 401 and _reason(await anonymous.json()) == "authentication.missing_credentials"


async def test_shadow_rules_do_not_block_but_are_counted(sandbox, authz_mediator):
    policy = SHIPPED_POLICY.replace("rules:\n", """rules:
  - name: freeze-claims
    roles: [claim-admin]
    effect: deny
    permissions: [user/Claim.c]
    mode: shadow
""")
    client = await authz_mediator(policy)
    response = await _post_claim(client, _claim())
    assert response.status == 201
    metrics = client.app[RUNTIME].current.pipeline._recorder  # the app's Metrics
    value = metrics.registry.get_sample_value(
        "mediator_authorization_shadow_total", {"rule": "freeze-claims", "outcome": "deny", "enforced": "allow"})
    assert value == 1.0


async def test_shadow_facility_filter_counts_but_returns_everything(authz_mediator):
    policy = SHIPPED_POLICY.replace("""  - name: claim-status
    roles: [claim-admin]
    permissions: [user/ClaimResponse.rs]""", """  - name: claim-status-facility
    roles: [claim-admin]
    permissions: [user/ClaimResponse.rs]
    mode: shadow
  - name: claim-status
    roles: [claim-admin]
    permissions: [user/ClaimResponse.rs]
    facility_scope: any""")
    client = await authz_mediator(policy)
    response = await _get(client, "/fhir/ClaimResponse?_count=100")
    ids = {e["resource"]["id"] for e in (await response.json())["entry"]}
    assert {JM_CLAIM, RA_CLAIM} <= ids
    registry = client.app[RUNTIME].current.pipeline._recorder.registry
    assert registry.get_sample_value("mediator_authorization_dropped_entries_total",
                                     {"resource_type": "ClaimResponse", "shadow": "true"}) >= 1


async def test_audit_facts_are_on_the_exchange_without_secrets(authz_mediator):
    client = await authz_mediator()
    seen: list[dict[str, Any]] = []
    runtime = client.app[RUNTIME].current

    class Spy:
        name = "rate_limit"

        async def run(self, exchange):
            seen.append({**exchange.authorization_facts.as_dict(), "resolved_facility": exchange.facility})
            return Decision.allowed("rate_limit.spy")

    runtime.chain.pipeline = Pipeline([*runtime.pipeline.stages, Spy()], runtime.pipeline._recorder)
    headers = {**await credentials(client, "jm-clerk"), "Content-Type": "application/fhir+json"}
    response = await client.post("/fhir/Claim/", data=json.dumps(_claim()), headers=headers)
    assert response.status == 201
    record = seen[0]
    assert record["rule"] == "claim-submit" and record["client"] == "vendor-jm"
    assert record["caller_facilities"] == ["JMHOS001"] and record["target_facilities"] == ["JMHOS001"]
    assert record["resolved_facility"] == "JMHOS001"   # the rate limit's health_facility key part
    text = json.dumps(record)
    assert "76aca309" not in text and "scopes" not in text and "user/" not in text
    access_token = headers["Authorization"].removeprefix("Bearer ")
    assert access_token not in text and headers["X-User-Token"] not in text


# --- (c) claim submission over mutual TLS --------------------------------------------------------------

async def test_claim_submission_over_mtls_with_the_users_token(tmp_path, sandbox, sandbox_server, unused_tcp_port):
    """The vendor is proven by its client certificate in a real TLS handshake (no access token); its
    user by the SSO token. The facility checks apply exactly as for token clients."""
    root = write_authz_config(tmp_path / "config", sandbox_server, extra_server=TLS_BLOCK)
    certs = root / "certs"
    make_dev_pki(certs, tuple(FACILITY_OF_VENDOR))
    config = load_config(root)
    app = build_app(config)
    assert_real_authentication(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port,
                       ssl_context=server_context(config.channels.server.listen.tls, root))
    await site.start()
    url = f"https://localhost:{unused_tcp_port}/fhir/Claim/"

    def as_vendor(vendor: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        if vendor is not None:
            context.load_cert_chain(certs / f"{vendor}.crt", certs / f"{vendor}.key")
        return context

    async def submit(vendor: str | None, claim: dict[str, Any], who: str = "jm-clerk") -> tuple[int, str]:
        headers = {"Content-Type": "application/fhir+json", "X-User-Token": user_token_of(CALLERS[who])}
        async with session.post(url, data=json.dumps(claim), headers=headers, ssl=as_vendor(vendor)) as response:
            document = await response.json(content_type=None)
            reason = _reason(document) if document.get("resourceType") == "OperationOutcome" else ""
            return response.status, reason

    try:
        async with aiohttp.ClientSession() as session:
            assert await submit("vendor-jm", _claim()) == (201, "")
            assert len(_claims_posted(sandbox)) == 1
            assert await submit("vendor-jm", _claim(provider={"reference": f"Organization/{RA_UUID}"})) == \
                (403, "authorization.provider_other_facility")
            assert await submit("vendor-jm", _claim(enterer={"reference": f"Practitioner/{RA_ADMIN}"})) == \
                (403, "authorization.enterer_other_facility")
            # vendor-ra's certificate with vendor-jm's user: the user token does not verify for vendor-ra
            assert await submit("vendor-ra", _claim()) == (401, "authentication.user_token_bad_signature")
            assert await submit(None, _claim()) == (401, "authentication.missing_credentials")
            assert len(_claims_posted(sandbox)) == 1
    finally:
        await runner.cleanup()




@pytest.mark.parametrize("path", [f"/fhir/ClaimResponse/{JM_CLAIM}", "/fhir/ClaimResponse?_count=5"])
async def test_ownership_and_index_lookups_go_through_the_upstreams_guard(sandbox, authz_mediator, path):
    client = await authz_mediator()
    headers = await credentials(client, "jm-clerk")
    runtime = client.app[RUNTIME].current
    stage = next(s for s in runtime.pipeline.stages if s.name == "authorization")
    guard = runtime.protection.guards["openimis"]
    assert stage.guards["openimis"] is guard   # one bulkhead for forwarded requests and lookups alike
    await stage._snapshot()   # the facility directory is loaded (through the guard too) before the breaker opens
    guard.breaker.state, guard.breaker.opened_at = "open", time.monotonic()
    before = len(sandbox.requests)
    response = await client.get(path, headers=headers)
    assert (response.status, _reason(await response.json())) == (503, "upstream.circuit_open")
    assert sandbox.requests[before:] == []   # the lookup waited for the guard, which refused it


async def test_reads_and_searches_of_facility_bound_types_cost_two_in_the_rate_limit(authz_mediator, sandbox):
    from mediator.pipeline import Exchange

    client = await authz_mediator()
    seen: list[Exchange] = []
    runtime = client.app[RUNTIME].current
    stage = next(s for s in runtime.pipeline.stages if s.name == "authorization")
    original = stage.run

    async def spy(exchange):
        seen.append(exchange)
        return await original(exchange)

    stage.run = spy  # type: ignore[method-assign]
    for path in (f"/fhir/ClaimResponse/{JM_CLAIM}", "/fhir/ClaimResponse", "/fhir/Medication"):
        assert (await _get(client, path)).status in (200, 403)
    assert [e.upstream_cost for e in seen] == [2, 2, 1]


@pytest.mark.parametrize("path", ["/fhir/Claim/_history", "/fhir/CommunicationRequest"])
async def test_facility_bound_histories_and_unscopable_searches_are_refused(sandbox, authz_mediator, path):
    policy = SHIPPED_POLICY.replace("permissions: [user/ClaimResponse.rs]",
                                    "permissions: [user/ClaimResponse.rs, user/Claim.rs, user/CommunicationRequest.rs]")
    client = await authz_mediator(policy)
    before = len(sandbox.requests)
    response = await _get(client, path)
    assert (response.status, _reason(await response.json())) == (403, "authorization.search_not_scopable")
    assert [r for r in sandbox.requests[before:] if "/Claim" in r["path"] or "/Communication" in r["path"]] == []


async def test_a_window_missing_the_pages_claims_falls_back_to_reading_the_first(sandbox, authz_mediator):
    client = await authz_mediator()
    headers = await credentials(client, "ra-clerk")
    assert (await client.get("/fhir/ClaimResponse?_count=0", headers=headers)).status == 200   # warm up
    original = sandbox.search

    def stale_list(request, rtype):   # as openIMIS's hour-long count cache does: the list is cut short
        answer = original(request, rtype)
        document = json.loads(answer.body)
        document["entry"] = []
        return web.json_response(document)

    sandbox.search = stale_list  # type: ignore[method-assign]
    before = len(sandbox.requests)
    response = await client.get("/fhir/ClaimResponse?_count=2", headers=headers)
    assert response.status == 200
    bundle = await response.json()
    assert bundle["total"] == 2 and len(bundle["entry"]) == 1   # a short page, never an empty one
    assert [link["relation"] for link in bundle["link"]] == ["self", "next"]
    sent = [r["path"].rsplit("/api/", 1)[-1] for r in sandbox.requests[before:]]
    assert sent[0] == "graphql" and sent[1] == "api_fhir_r4/ClaimResponse/" and len(sent) == 3
    assert sent[2].startswith("api_fhir_r4/ClaimResponse/") and sent[2] != sent[1]
    registry = client.app[RUNTIME].current.pipeline._recorder.registry
    assert registry.get_sample_value("mediator_authorization_search_pages_total",
                                     {"resource_type": "ClaimResponse", "outcome": "fallback"}) == 1
    assert registry.get_sample_value("mediator_authorization_search_pages_total",
                                     {"resource_type": "ClaimResponse", "outcome": "short"}) is None
