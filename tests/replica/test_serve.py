"""Serving master data from the replica through the whole mediator, over real sockets."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from mediator.app import METRICS, RUNTIME
from tests.conftest import DEFAULT_IP_POLICY, channels_yaml, upstream_url

MASTER_DATA = """\
  - name: master-data
    path: ^/fhir/(ActivityDefinition|Medication|Location|Organization|Practitioner|CodeSystem|Patient)(/[^/]+)?/?$
    methods: [GET, HEAD]
    upstream: openimis
    serve_from: replica
    ip_allowlist: [local]
    authentication: none
  - name: claims
    path: ^/fhir/Claim(/[^/]+)?/?$
    methods: [GET]
    upstream: openimis
    ip_allowlist: [local]
    authentication: none
"""


def _replica_policy(extra: str = "") -> dict[str, str]:
    return {"replica.yaml": f"version: 1\nupstream: openimis\nschedule: false\n{extra}"}


@pytest.fixture
async def served(sandbox, sandbox_server, make_mediator):
    """A mediator whose master-data channel is served from a synced replica (250 extra medications)."""
    sandbox.generate_medications(250)
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 extra_policies=_replica_policy())
    await client.server.app[RUNTIME].current.replica.sync()
    sandbox.requests.clear()
    return client


def _medication_list_requests(sandbox) -> list[dict]:
    return [r for r in sandbox.requests if "/Medication" in r["path"]]


async def test_read_by_id_and_by_code_never_reaches_openimis(sandbox, served):
    rid = next(iter(sandbox.store["Medication"]))
    by_id = await served.get(f"/fhir/Medication/{rid}")
    assert by_id.status == 200
    body = await by_id.json()
    assert body["id"] == rid and body["meta"]["lastUpdated"]
    assert by_id.headers["ETag"].startswith('W/"') and by_id.headers["Last-Modified"].endswith("GMT")
    assert by_id.headers["X-Replica-Age"] == "0" and "Warning" not in by_id.headers
    by_code = await served.get("/fhir/Medication/gen000007")
    assert (await by_code.json())["identifier"][0]["value"] == "GEN000007"
    missing = await served.get("/fhir/Medication/NOPE")
    assert missing.status == 404
    assert (await missing.json())["issue"][0]["details"]["coding"][0]["code"] == "replica.not_found"
    assert _medication_list_requests(sandbox) == []
    metrics = served.server.app[METRICS]
    assert metrics.replica_requests.labels("Medication", "hit")._value.get() == 2
    assert metrics.replica_requests.labels("Medication", "not_found")._value.get() == 1


async def test_search_pages_with_links_to_the_public_base(sandbox, served):
    seen: list[str] = []
    url = "/fhir/Medication?_count=100"
    pages = 0
    while url:
        response = await served.get(url, headers={"Accept": "application/fhir+json"})
        assert response.status == 200 and response.content_type == "application/fhir+json"
        bundle = await response.json()
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset" and bundle["total"] == 251
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"].startswith("https://mediator.example.org/fhir/Medication?")
        seen += [e["resource"]["id"] for e in bundle["entry"]]
        assert all(e["fullUrl"] == f"https://mediator.example.org/fhir/Medication/{e['resource']['id']}"
                   for e in bundle["entry"])
        pages += 1
        url = urlsplit(links["next"])._replace(scheme="", netloc="").geturl() if "next" in links else ""
    assert pages == 3
    assert sorted(seen) == sorted(sandbox.store["Medication"])
    assert "previous" in links and "page-offset=2" in links["previous"]
    assert _medication_list_requests(sandbox) == []


async def test_identifier_answers_a_searchset_by_default(served):
    response = await served.get("/fhir/Medication?identifier=GEN000042")
    body = await response.json()
    assert response.status == 200 and body["resourceType"] == "Bundle" and body["type"] == "searchset"
    assert body["total"] == 1 and body["entry"][0]["resource"]["resourceType"] == "Medication"
    assert body["entry"][0]["search"] == {"mode": "match"}
    none = await served.get("/fhir/Medication?code=none")
    assert none.status == 200 and (await none.json())["total"] == 0 and (await none.json())["entry"] == []


async def test_identifier_search_can_answer_the_bare_resource_like_openimis(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 extra_policies=_replica_policy("identifier_search: bare_resource\n"))
    await client.server.app[RUNTIME].current.replica.sync()
    response = await client.get("/fhir/Practitioner?identifier=JMDP0011")
    assert response.status == 200 and (await response.json())["resourceType"] == "Practitioner"
    assert (await client.get("/fhir/Practitioner?code=none")).status == 404


async def test_identifier_search_can_answer_a_bundle(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 extra_policies=_replica_policy("identifier_search: bundle\n"))
    await client.server.app[RUNTIME].current.replica.sync()
    bundle = await (await client.get("/fhir/Practitioner?identifier=JMDP0011")).json()
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 1
    assert "identifier=JMDP0011" in bundle["link"][0]["url"]


async def test_name_contains_is_case_insensitive(served):
    bundle = await (await served.get("/fhir/Medication?name=item 12 tabs&_count=5")).json()
    assert bundle["total"] == 1
    assert bundle["entry"][0]["resource"]["code"]["text"] == "GENERATED ITEM 12 TABS 112MG"
    bundle = await (await served.get("/fhir/Medication?name:contains=GENERATED ITEM 1&_count=0")).json()
    assert bundle["total"] == 111 and bundle["entry"] == []   # _count=0: the total only


async def test_last_updated_filters_let_an_hms_sync_incrementally(sandbox, served):
    replica = served.server.app[RUNTIME].current.replica
    cut = time.time() + 1
    changed = dict(sandbox.store["Medication"][next(iter(sandbox.store["Medication"]))])
    changed["code"] = {"text": "CHANGED LATER"}
    sandbox.upsert(changed, when=cut + 5)
    await replica.sync()
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cut))
    newer = await (await served.get(f"/fhir/Medication?_lastUpdated=gt{since}Z")).json()
    assert [e["resource"]["code"]["text"] for e in newer["entry"]] == ["CHANGED LATER"]
    older = await (await served.get(f"/fhir/Medication?_lastUpdated=lt{since}Z&_count=1")).json()
    assert older["total"] == 250
    both = await (await served.get(f"/fhir/Medication?_lastUpdated=ge2000-01-01&_lastUpdated=le{since}Z")).json()
    assert both["total"] == 250


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("_sort=name", "search.unsupported_parameter"),
        ("_count=ten", "search.invalid_parameter"),
        ("page-offset=0", "search.invalid_parameter"),
        ("_lastUpdated=2024-01-01", "replica.invalid_parameter"),
        ("_lastUpdated=ge2024-13-01", "replica.invalid_parameter"),
        ("identifier=a&identifier=b", "replica.invalid_parameter"),
    ],
)
async def test_searches_the_replica_cannot_answer_are_400(served, query, reason):
    # Unknown names and malformed paging are the search stage's (strict here); the rest the replica's own.
    response = await served.get(f"/fhir/Medication?{query}", headers={"Prefer": "handling=strict"})
    assert response.status == 400
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == reason


async def test_if_none_match_gives_304(served):
    first = await served.get("/fhir/Medication?_count=3")
    etag = first.headers["ETag"]
    again = await served.get("/fhir/Medication?_count=3", headers={"If-None-Match": etag})
    assert again.status == 304 and again.headers["ETag"] == etag and await again.read() == b""
    other = await served.get("/fhir/Medication?_count=4", headers={"If-None-Match": etag})
    assert other.status == 200
    read = await served.get("/fhir/Medication/GEN000001")
    assert (await served.get("/fhir/Medication/GEN000001",
                             headers={"If-None-Match": read.headers["ETag"]})).status == 304


async def test_gzip_when_the_client_accepts_it(served):
    zipped = await served.get("/fhir/Medication?_count=50", headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.headers["Vary"] == "Accept-Encoding"
    assert len((await zipped.json())["entry"]) == 50
    plain = await served.get("/fhir/Medication?_count=50", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers


async def test_stale_data_is_served_with_a_warning(served):
    reader = served.server.app[RUNTIME].current.replica.reader
    reader.clock = lambda: time.time() + 901   # max_lag_s defaults to 900
    response = await served.get("/fhir/Medication/GEN000001")
    assert response.status == 200
    assert response.headers["Warning"] == '110 - "Response is Stale"'
    assert int(response.headers["X-Replica-Age"]) >= 900


async def test_never_synced_falls_back_to_openimis_by_default(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 extra_policies=_replica_policy())
    response = await client.get("/fhir/Medication/")
    assert response.status == 200 and (await response.json())["total"] == 1
    assert len(_medication_list_requests(sandbox)) == 1


async def test_never_synced_can_be_503(sandbox, sandbox_server, make_mediator):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 extra_policies=_replica_policy("never_synced: unavailable\n"))
    response = await client.get("/fhir/Medication/")
    assert response.status == 503 and response.headers["Retry-After"] == "60"
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "replica.not_synced"
    assert _medication_list_requests(sandbox) == []


async def test_what_the_replica_does_not_hold_goes_upstream(sandbox, served):
    response = await served.get("/fhir/Patient?identifier=123456789")
    bundle = await response.json()
    assert response.status == 200 and bundle["entry"][0]["resource"]["resourceType"] == "Patient"
    assert any("/Patient/" in r["path"] for r in sandbox.requests)


async def test_the_pipeline_still_decides_before_the_replica(sandbox, sandbox_server, make_mediator):
    no_one = DEFAULT_IP_POLICY.replace('allow: ["127.0.0.0/8", "::1/128"]', "allow: []")
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=MASTER_DATA),
                                 ip_policy=no_one, extra_policies=_replica_policy())
    await client.server.app[RUNTIME].current.replica.sync()
    response = await client.get("/fhir/Medication/")
    assert response.status == 403
    assert (await response.json())["issue"][0]["details"]["coding"][0]["code"] == "ip.denied"


async def test_large_proxied_answers_arrive_whole(sandbox, sandbox_server, make_mediator):
    sandbox.generate_medications(250)
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)))
    bundle = await (await client.get("/fhir/Medication/?_count=100")).json()
    assert len(bundle["entry"]) == 100


async def test_head_answers_headers_only(served):
    response = await served.head("/fhir/Medication/GEN000001")
    assert response.status == 200 and response.headers["ETag"].startswith('W/"')
    assert await response.read() == b""


async def test_sync_metrics_are_exported(served):
    metrics = served.server.app[METRICS]
    assert metrics.replica_items.labels("Medication")._value.get() == 251
    assert metrics.replica_syncs.labels("full")._value.get() == 1
    assert abs(metrics.replica_last_sync._value.get() - time.time()) < 60
    lag = metrics.registry.get_sample_value("mediator_replica_sync_lag_seconds")
    assert lag is not None and 0 <= lag < 60
