"""mediator.capabilities: the mediator's own CapabilityStatement, generated from channels and policies."""

from __future__ import annotations

from pathlib import Path

from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from mediator.capabilities import OAUTH_URIS, build_statement
from mediator.config import load_config
from tests.conftest import OPEN_CAPABILITIES_CHANNEL, channels_yaml, upstream_url

REPO = Path(__file__).parents[1]


def _resources(statement: dict) -> dict[str, dict]:
    return {r["type"]: r for r in statement["rest"][0]["resource"]}


def _interactions(resource: dict) -> set[str]:
    return {i["code"] for i in resource["interaction"]}


def test_the_shipped_configuration_states_what_it_really_allows():
    statement = build_statement(load_config(REPO), "https://localhost:8443/auth/token")
    CapabilityStatement.model_validate(statement)   # valid FHIR R4B
    resources = _resources(statement)
    assert _interactions(resources["Claim"]) == {"create", "read", "search-type"}
    assert _interactions(resources["ClaimResponse"]) == {"read", "search-type"}
    # Patient: search only, and only by insuree number (the eligibility rule's ?identifier=* constraint).
    assert _interactions(resources["Patient"]) == {"search-type"}
    assert "A search must give identifier." in resources["Patient"]["documentation"]
    # Master data is served from the replica: its search parameters, not openIMIS's.
    assert {p["name"] for p in resources["ActivityDefinition"]["searchParam"]} == \
        {"_lastUpdated", "code", "identifier", "name"}
    # Routed by a channel but granted by no rule: not listed (CodeSystem), nor is what no channel routes.
    assert "CodeSystem" not in resources and "Invoice" not in resources
    assert "CoverageEligibilityRequest" in resources and \
        _interactions(resources["CoverageEligibilityRequest"]) == {"create"}
    assert statement["rest"][0]["interaction"] == [{"code": "batch"}]
    oauth = statement["rest"][0]["security"]["extension"][0]
    assert oauth["url"] == OAUTH_URIS
    assert oauth["extension"] == [{"url": "token", "valueUri": "https://localhost:8443/auth/token"}]


def test_openimis_parameters_for_upstream_channels(tmp_path, sandbox_server):
    from tests.conftest import write_config

    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server)))
    statement = build_statement(load_config(root), "https://mediator.example.org/auth/token")
    resources = _resources(statement)
    # An allow-everything policy (tests/conftest.py): the channels decide. Claim and ClaimResponse searches are
    # the facility-scoped search's (authorization_search.PARAMS), the others openIMIS's.
    assert {p["name"] for p in resources["ClaimResponse"]["searchParam"]} == {"identifier"}
    assert {p["name"] for p in resources["Claim"]["searchParam"]} == {"identifier", "patient", "contained"}
    assert {p["name"] for p in resources["Patient"]["searchParam"]} == \
        {"_lastUpdated", "identifier", "refDate", "claimDateFrom"}
    assert "interaction" not in statement["rest"][0]   # no batch channel


async def test_metadata_is_answered_by_the_mediator_and_matches_smart_configuration(sandbox, make_mediator,
                                                                                      sandbox_server):
    channels = OPEN_CAPABILITIES_CHANNEL + """\
- name: claims
  path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
  methods: [GET, POST]
  upstream: openimis
  ip_allowlist: [local]
  authentication: none
"""
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=channels))
    response = await client.get("/fhir/metadata", headers={"Accept": "application/fhir+json"})
    assert response.status == 200 and response.content_type == "application/fhir+json"
    statement = await response.json()
    CapabilityStatement.model_validate(statement)
    assert statement["date"].endswith("Z") and statement["kind"] == "instance"
    assert not [r for r in sandbox.requests if "metadata" in r["path"]]   # openIMIS 1.10 has none
    smart = await (await client.get("/.well-known/smart-configuration")).json()
    token = statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
    assert token == smart["token_endpoint"] == "https://mediator.example.org/auth/token"
    assert set(_resources(statement)) == {"Claim", "ClaimResponse"}


def test_without_an_authorization_policy_nothing_is_listed(tmp_path, sandbox_server):
    from tests.conftest import write_config

    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server)),
                        extra_policies={"authorization.yaml": None})
    statement = build_statement(load_config(root), "https://mediator.example.org/auth/token")
    assert statement["rest"][0]["resource"] == []   # the absent policy denies everything
    CapabilityStatement.model_validate(statement)


def test_a_create_the_write_firewall_refuses_is_not_listed(tmp_path, sandbox_server):
    from tests.conftest import write_config

    root = write_config(tmp_path, channels_yaml(upstream_url(sandbox_server)),
                        extra_policies={"write_profiles.yaml": "version: 1\nprofiles: {}\n"})
    resources = _resources(build_statement(load_config(root), "https://mediator.example.org/auth/token"))
    assert _interactions(resources["Claim"]) == {"read", "search-type"}   # no profile: every write refused
