"""mediator.search_parameters: one rule for unknown search parameters on every channel."""

from __future__ import annotations

import pytest

from mediator.app import RUNTIME
from mediator.pipeline import Decision
from mediator.search_parameters import OPENIMIS_SEARCH_PARAMETERS, SearchRequest, decide
from tests.conftest import channels_yaml, upstream_url

PATIENT = OPENIMIS_SEARCH_PARAMETERS["Patient"]


def test_lenient_drops_what_is_not_supported_and_keeps_the_callers_bytes():
    verdict = decide("identifier=07%2007&_sort=name&_elements=id&_format=json", PATIENT, "lenient", 200)
    assert isinstance(verdict, SearchRequest)
    assert verdict.used == (("identifier", "07 07"),)
    assert verdict.upstream_query == "identifier=07%2007"
    assert verdict.ignored == ("_sort", "_elements")     # _format is the mediator's, neither used nor ignored


def test_strict_refuses_the_first_unsupported_parameter():
    verdict = decide("identifier=1&_sort=name", PATIENT, "strict", 200)
    assert isinstance(verdict, Decision) and not verdict.allow
    assert (verdict.status, verdict.reason) == (400, "search.unsupported_parameter")
    assert "'_sort'" in verdict.message and "identifier" in verdict.message


def test_a_modifier_is_a_different_parameter():
    verdict = decide("identifier:exact=1", PATIENT, "lenient", 200)
    assert isinstance(verdict, SearchRequest) and verdict.used == () and verdict.ignored == ("identifier:exact",)


def test_count_is_capped_and_the_cap_is_what_is_forwarded():
    verdict = decide("_count=5000&page-offset=2", PATIENT, "lenient", 200)
    assert isinstance(verdict, SearchRequest)
    assert verdict.upstream_query == "_count=200&page-offset=2" and verdict.count_asked == 5000


@pytest.mark.parametrize("query", ["_count=ten", "_count=0", "_count=-1", "page-offset=0", "_count=99999999999"])
def test_malformed_paging_is_dropped_or_refused(query):
    lenient = decide(query, PATIENT, "lenient", 200)
    assert isinstance(lenient, SearchRequest) and lenient.used == ()
    strict = decide(query, PATIENT, "strict", 200)
    assert isinstance(strict, Decision) and strict.reason == "search.invalid_parameter"


def test_count_zero_where_the_answerer_can_give_the_total_only():
    verdict = decide("_count=0", PATIENT, "strict", 200, count_only=True)
    assert isinstance(verdict, SearchRequest) and verdict.used == (("_count", "0"),)


async def test_openimis_never_receives_an_ignored_parameter(sandbox, mediator):
    response = await mediator.get("/fhir/Medication?_sort=name&_count=5000&identifier:missing=true")
    assert response.status == 200
    sent = [r for r in sandbox.requests if r["path"].endswith("/Medication/")][-1]
    assert sent["query"] == "_count=200"


async def test_strict_handling_refuses_before_openimis(sandbox, mediator):
    before = len(sandbox.requests)
    response = await mediator.get("/fhir/Medication?_sort=name", headers={"Prefer": "handling=strict"})
    assert response.status == 400
    outcome = await response.json()
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "search.unsupported_parameter"
    assert len(sandbox.requests) == before


async def test_a_channel_can_be_strict_by_default(sandbox_server, make_mediator):
    channels = """\
      - name: master-data
        path: ^/fhir/Medication/?$
        methods: [GET]
        upstream: openimis
        ip_allowlist: [local]
        authentication: none
        fhir_answers: {handling: strict, max_count: 50}
    """
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=channels))
    assert (await client.get("/fhir/Medication?_sort=name")).status == 400
    lenient = await client.get("/fhir/Medication?_sort=name&_count=80", headers={"Prefer": "handling=lenient"})
    assert lenient.status == 200
    assert "_sort" not in (await lenient.json())["link"][0]["url"]


REPLICA_CHANNEL = """\
  - name: master-data
    path: ^/fhir/(Medication|Practitioner)(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    ip_allowlist: [local]
    authentication: none
    serve_from: replica
"""


async def test_the_replica_follows_the_same_rule(sandbox, sandbox_server, make_mediator):
    sandbox.generate_medications(10)
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=REPLICA_CHANNEL),
                                 extra_policies={"replica.yaml": "version: 1\nupstream: openimis\nschedule: false\n"})
    await client.server.app[RUNTIME].current.replica.sync()
    lenient = await client.get("/fhir/Medication?_sort=name&_elements=id&_id=x&_totalMethod=none&type=a&_count=3")
    assert lenient.status == 200
    bundle = await lenient.json()
    assert len(bundle["entry"]) == 3
    assert bundle["link"][0]["url"] == "https://mediator.example.org/fhir/Medication?_count=3&page-offset=1"
    strict = await client.get("/fhir/Medication?_sort=name", headers={"Prefer": "handling=strict"})
    assert strict.status == 400
    capped = await (await client.get("/fhir/Medication?_count=900")).json()
    assert "_count=200" in capped["link"][0]["url"]


def test_the_scoped_search_parameters_are_the_authorization_stages():
    from mediator.search_parameters import SCOPED_SEARCH_PARAMETERS
    from mediator.stages.authorization_search import PARAMS

    assert dict(SCOPED_SEARCH_PARAMETERS) == PARAMS
