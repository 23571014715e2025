"""mediator.fhir_answers: searchset wrapping, create answers and zone-less dateTimes (with the stand-in)."""

from __future__ import annotations

import json
import time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.app import RUNTIME
from mediator.fhir_answers import add_zones, searchset, with_zone, zone_datetimes
from mediator.upstream import is_not_found
from tests.conftest import channels_yaml, config_problems, upstream_url, write_config

BASE = "https://mediator.example.org/fhir/"


@pytest.mark.parametrize(("value", "zone", "expected"), [
    ("2020-01-01T18:50:00", "UTC", "2020-01-01T18:50:00+00:00"),
    ("2020-01-01T18:50:00", "Africa/Dar_es_Salaam", "2020-01-01T18:50:00+03:00"),
    ("2020-01-01T18:50", "UTC", "2020-01-01T18:50:00+00:00"),            # seconds are required once a time is
    ("2024-07-01T08:00:00.250", "Europe/Brussels", "2024-07-01T08:00:00.250+02:00"),   # summer time
    ("2024-01-01T08:00:00", "Europe/Brussels", "2024-01-01T08:00:00+01:00"),
    ("2024-01-01T08:00:00", "America/Sao_Paulo", "2024-01-01T08:00:00-03:00"),
])
def test_a_zone_less_datetime_gets_the_offset_of_its_zone_then(value, zone, expected):
    assert with_zone(value, ZoneInfo(zone)) == expected


def test_only_zone_less_datetimes_change():
    document = {"date": "2020-01-01T18:50:00", "birthDate": "1990-05-04", "issued": "2020-01-01T18:50:00Z",
                "other": "2020-01-01T18:50:00+02:00", "text": "seen at 2020-01-01T18:50:00",
                "bad": "2020-13-01T18:50:00", "list": [{"when": "2021-02-03T04:05:06"}], "n": 3}
    expected = {**document, "date": "2020-01-01T18:50:00+00:00", "list": [{"when": "2021-02-03T04:05:06+00:00"}]}
    assert add_zones(document, ZoneInfo("UTC")) == expected
    assert document == expected   # in place
    assert add_zones("2020-01-01T18:50:00", ZoneInfo("UTC")) == "2020-01-01T18:50:00+00:00"


def test_not_found_is_openimis_404_or_its_failed_to_retrieve_500():
    outcome = {"resourceType": "OperationOutcome", "issue": [{"details": {"text": (
        "failed to retrieve Insuree with the filter {...}; details Insuree matching query does not exist.")}}]}
    assert is_not_found(500, outcome) and is_not_found(404, {"resourceType": "OperationOutcome", "issue": []})
    broken = {"resourceType": "OperationOutcome", "issue": [{"details": {"text": "Converter init need a valid user"}}]}
    assert not is_not_found(500, broken)
    assert not is_not_found(404, {"detail": "Not found."})       # not FHIR: passed on as it is


def test_searchset_has_a_total_only_where_the_facility_filter_does_not_decide():
    patient = searchset(BASE, "Patient", "identifier=1", [{"resourceType": "Patient", "id": "1"}])
    assert patient == {"resourceType": "Bundle", "type": "searchset", "total": 1,
                       "link": [{"relation": "self", "url": f"{BASE}Patient?identifier=1"}],
                       "entry": [{"fullUrl": f"{BASE}Patient/1", "resource": {"resourceType": "Patient", "id": "1"},
                                  "search": {"mode": "match"}}]}
    # Claim: "none" must read exactly like "another facility's, dropped by the filter" (which drops total).
    assert list(searchset(BASE, "Claim", "identifier=x", [])) == ["resourceType", "type", "link", "entry"]


async def test_not_found_searches_answer_an_empty_searchset(sandbox, mediator):
    response = await mediator.get("/fhir/Patient?identifier=999999999")
    assert response.status == 200
    bundle = await response.json()
    assert bundle["total"] == 0 and bundle["entry"] == []
    assert bundle["link"][0]["url"] == f"{BASE}Patient?identifier=999999999"


async def test_answers_from_openimis_get_the_zone(sandbox, mediator):
    bundle = await (await mediator.get("/fhir/ActivityDefinition")).json()
    dates = [e["resource"]["date"] for e in bundle["entry"] if "date" in e["resource"]]
    assert dates and all(d.endswith("+00:00") for d in dates)


async def test_the_upstream_time_zone_is_a_setting(sandbox_server, make_mediator):
    channels = channels_yaml(upstream_url(sandbox_server)).replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n    time_zone: Africa/Dar_es_Salaam\n")
    client = await make_mediator(channels)
    bundle = await (await client.get("/fhir/ActivityDefinition")).json()
    assert [e["resource"]["date"] for e in bundle["entry"] if "date" in e["resource"]][0].endswith("+03:00")


def test_an_unknown_time_zone_is_refused_where_it_is_written(tmp_path, sandbox_server):
    channels = channels_yaml("http://127.0.0.1:9/api/api_fhir_r4/").replace(
        "    connect_timeout_s: 1\n", "    connect_timeout_s: 1\n    time_zone: Mars/Olympus\n")
    problems = config_problems(write_config(tmp_path, channels))
    assert any("channels.yaml:" in p and "unknown time zone 'Mars/Olympus'" in p for p in problems)


CLAIM = {"resourceType": "Claim", "identifier": [{"value": "FA000001"}]}


async def _create(client, prefer: str | None = None) -> web.Response:  # type: ignore[no-untyped-def]
    headers = {"Content-Type": "application/fhir+json"}
    if prefer is not None:
        headers["Prefer"] = prefer
    claim = {**CLAIM, "identifier": [{"value": f"FA{abs(hash(prefer)) % 10**8:08d}"}]}
    return await client.post("/fhir/Claim", data=json.dumps(claim), headers=headers)


async def test_create_answers_the_created_claim_by_default(sandbox, mediator):
    response = await _create(mediator)
    assert response.status == 201
    claim = await response.json()
    assert claim["resourceType"] == "Claim"
    assert response.headers["Location"] == f"{BASE}Claim/{claim['id']}"
    reads = [r for r in sandbox.requests if r["method"] == "GET" and r["path"].endswith(f"/Claim/{claim['id']}/")]
    assert len(reads) == 1   # read back once, as the mediator's service user


@pytest.mark.parametrize("prefer", ["return=minimal", "handling=lenient; return=minimal"])
async def test_create_with_return_minimal_has_no_body(mediator, prefer):
    response = await _create(mediator, prefer)
    assert response.status == 201 and await response.read() == b""
    assert response.headers["Location"].startswith(f"{BASE}Claim/")


async def test_create_with_return_operation_outcome(mediator):
    response = await _create(mediator, "return=OperationOutcome")
    outcome = await response.json()
    assert response.status == 201 and outcome["resourceType"] == "OperationOutcome"
    claim_id = response.headers["Location"].rsplit("/", 1)[-1]
    assert outcome["issue"][0]["severity"] == "information"
    assert f"ClaimResponse/{claim_id}" in outcome["issue"][0]["details"]["text"]


async def test_a_channel_can_answer_creates_with_openimis_claim_response(sandbox_server, make_mediator):
    channels = """\
      - name: claims
        path: ^/fhir/(Claim|ClaimResponse)(/[^/]+)?/?$
        methods: [GET, POST]
        upstream: openimis
        ip_allowlist: [local]
        authentication: none
        fhir_answers: {create_return: upstream}
    """
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server), channels=channels))
    response = await _create(client)
    body = await response.json()
    assert response.status == 201 and body["resourceType"] == "ClaimResponse"
    assert response.headers["Content-Location"] == f"{BASE}ClaimResponse/{body['id']}"
    assert response.headers["Location"] == f"{BASE}Claim/{body['id']}"
    # Prefer still wins over the channel's default.
    minimal = await _create(client, "return=minimal")
    assert minimal.status == 201 and await minimal.read() == b""


async def test_a_refused_create_gets_no_location(mediator):
    response = await mediator.post("/fhir/Claim", data=b'{"resourceType": "Patient"}',
                                   headers={"Content-Type": "application/fhir+json"})
    assert response.status == 400   # resourceType mismatch: the mediator's own refusal, no Location
    assert "Location" not in response.headers


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=12), st.just("2020-01-01T18:50:00\n"),
    st.just("\u0662\u0660\u0662\u0660-01-01T18:50:00"),   # Arabic-Indic digits: not a FHIR dateTime
    st.from_regex(r"\A\d{4}-(0[1-9]|1[0-3])-[0-3]\d[T ]\d\d:\d\d(:\d\d(\.\d{1,3})?)?(Z|[+-]\d\d:\d\d)?\Z"),
)
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(document=_json, ascii_only=st.booleans())
def test_fixing_serialized_json_equals_fixing_the_parsed_document(document, ascii_only):
    # zone_datetimes (bytes, no parse: what answers use) and add_zones (parsed: what the replica stores).
    zone = ZoneInfo("Africa/Dar_es_Salaam")
    body = json.dumps(document, ensure_ascii=ascii_only, separators=(",", ":")).encode()
    assert json.loads(zone_datetimes(body, zone)) == add_zones(json.loads(body), zone)


async def test_openimis_500_failed_to_retrieve_is_an_empty_searchset_other_500s_stay(aiohttp_server, make_mediator):
    # The sanitised error answer (upstream.error) no longer carries openIMIS's words; the upstream marks
    # whether they said "does not exist" (OPENIMIS_NOT_FOUND) before dropping them.
    async def login(request):
        return web.json_response({"token": "t", "exp": 4_102_444_800})

    async def patients(request):
        text = ("failed to retrieve Insuree with the filter {'chf_id': '999'}; details Insuree matching query "
                "does not exist.") if request.query.get("identifier") == "999" else "database is on fire"
        return web.json_response({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "exception", "details": {"text": text}}]}, status=500)

    app = web.Application()
    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_get("/api/api_fhir_r4/Patient/", patients)
    client = await make_mediator(channels_yaml(upstream_url(await aiohttp_server(app))))
    none = await client.get("/fhir/Patient?identifier=999")
    assert none.status == 200 and (await none.json())["entry"] == []
    broken = await client.get("/fhir/Patient?identifier=123")
    assert broken.status == 500
    outcome = await broken.json()
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "upstream.error"
    assert "fire" not in json.dumps(outcome)


async def test_the_created_claim_read_back_gives_its_etag(aiohttp_server, make_mediator):
    async def login(request):
        return web.json_response({"token": "t", "exp": 4_102_444_800})

    async def create(request):
        return web.json_response({"resourceType": "ClaimResponse", "id": "c1", "outcome": "complete"}, status=201)

    async def read(request):
        return web.json_response({"resourceType": "Claim", "id": "c1", "meta": {"versionId": "3"},
                                  "created": "2026-11-20T10:00:00"})

    app = web.Application()
    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_post("/api/api_fhir_r4/Claim/", create)
    app.router.add_get("/api/api_fhir_r4/Claim/c1/", read)
    client = await make_mediator(channels_yaml(upstream_url(await aiohttp_server(app))))
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim"})
    assert response.status == 201 and response.headers["ETag"] == 'W/"3"'
    assert response.headers["Location"] == f"{BASE}Claim/c1"
    claim = await response.json()
    assert claim["created"] == "2026-11-20T10:00:00+00:00"   # the read-back gets the zone too


async def test_the_read_back_goes_through_the_upstreams_guard(aiohttp_server, make_mediator):
    """The read-back is a request to openIMIS like any other: it holds a bulkhead place while openIMIS answers
    it, and with the breaker open it is not sent; the create is still answered 201 then (an OperationOutcome
    naming the created claim), not failed."""
    in_flight_during_read: list[int] = []
    holder: dict[str, Any] = {}

    def guard():  # type: ignore[no-untyped-def]
        return holder["client"].app[RUNTIME].current.protection.guards["openimis"]

    async def login(request):
        return web.json_response({"token": "t", "exp": 4_102_444_800})

    async def create(request):
        return web.json_response({"resourceType": "ClaimResponse", "id": "c1", "outcome": "complete"}, status=201)

    async def read(request):
        in_flight_during_read.append(guard().bulkhead.in_flight)
        return web.json_response({"resourceType": "Claim", "id": "c1"})

    app = web.Application()
    app.router.add_post("/api/api_fhir_r4/login/", login)
    app.router.add_post("/api/api_fhir_r4/Claim/", create)
    app.router.add_get("/api/api_fhir_r4/Claim/c1/", read)
    client = holder["client"] = await make_mediator(channels_yaml(upstream_url(await aiohttp_server(app))))
    response = await client.post("/fhir/Claim", json={"resourceType": "Claim"})
    assert response.status == 201 and (await response.json())["resourceType"] == "Claim"
    assert in_flight_during_read == [1]   # the read-back held the one place it took
    # The breaker opens between the create's answer and its read-back (the create's own success would close
    # a breaker opened earlier, from openIMIS's create handler): right after the create's success is recorded.
    breaker = guard().breaker
    original_success = breaker.record_success

    def success_then_open() -> None:
        original_success()
        breaker.state, breaker.opened_at = "open", time.monotonic()

    breaker.record_success = success_then_open  # type: ignore[method-assign]
    refused_read_back = await client.post("/fhir/Claim", json={"resourceType": "Claim"})
    assert refused_read_back.status == 201 and refused_read_back.headers["Location"] == f"{BASE}Claim/c1"
    outcome = await refused_read_back.json()
    assert outcome["resourceType"] == "OperationOutcome" and "Claim/c1" in json.dumps(outcome)
    assert in_flight_during_read == [1]   # not sent
