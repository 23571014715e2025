"""The pure parts of facility-scoped searches (mediator.stages.authorization_search) and of the claim
index's answers (mediator.claim_index). The round trips are in tests/stages/test_authorization.py
(stand-in) and tests/e2e/test_facility_searches.py (real openIMIS)."""

from __future__ import annotations

import json

import pytest

from mediator.claim_index import IndexedClaim, IndexPage, owners_query, parse_answer, parse_owner, parse_page
from mediator.facilities import LookupFailed
from mediator.pipeline import Decision
from mediator.stages.authorization_search import (
    SearchRequest,
    WindowCrowded,
    assemble_page,
    parse_search,
)

BASE = "https://mediator.example.org/fhir/"
PATIENT = "0539afeb-21a1-4b3f-9478-23e6f41b0024"


def _claim(n: int, facility: str = "hf-a") -> IndexedClaim:
    return IndexedClaim(f"00000000-0000-4000-8000-{n:012d}", f"C{n:04d}", f"2024-01-01T00:00:{n:02d}.000000",
                        facility)


def _window(*numbers: int, rtype: str = "ClaimResponse") -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": 999, "entry": [
        {"fullUrl": f"{BASE}{rtype}/{_claim(n).uuid}", "search": {"mode": "match"},
         "resource": {"resourceType": rtype, "id": _claim(n).uuid}} for n in numbers]}


def _ok(resource) -> bool:
    return True


def _links(bundle: dict) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle["link"]}


@pytest.mark.parametrize(("rtype", "query", "expected"), [
    ("ClaimResponse", [], SearchRequest("ClaimResponse", 10, 0)),
    ("ClaimResponse", [("_count", "5"), ("page-offset", "3")], SearchRequest("ClaimResponse", 5, 10)),
    ("ClaimResponse", [("_count", "5"), ("_offset", "7")], SearchRequest("ClaimResponse", 5, 7)),
    ("ClaimResponse", [("identifier", "https://x/ids|JADH0001")], SearchRequest("ClaimResponse", 10, 0,
                                                                                identifier="JADH0001")),
    ("Claim", [("patient", PATIENT), ("contained", "true")], SearchRequest("Claim", 10, 0, PATIENT, None, True)),
])
def test_searches_we_can_scope_are_understood(rtype, query, expected):
    assert parse_search(rtype, query, 100) == expected


@pytest.mark.parametrize(("rtype", "query", "reason", "status"), [
    ("ClaimResponse", [("status", "active")], "authorization.search_param_unsupported", 400),
    ("ClaimResponse", [("patient", PATIENT)], "authorization.search_param_unsupported", 400),  # openIMIS ignores it
    ("Claim", [("refDate", "2024-01-01")], "authorization.search_param_unsupported", 400),
    ("ClaimResponse", [("_count", "1"), ("_count", "2")], "authorization.search_param_unsupported", 400),
    ("ClaimResponse", [("_count", "101")], "authorization.search_param_invalid", 400),
    ("ClaimResponse", [("_count", "x")], "authorization.search_param_invalid", 400),
    ("ClaimResponse", [("page-offset", "0")], "authorization.search_param_invalid", 400),
    ("ClaimResponse", [("page-offset", "2"), ("_offset", "2")], "authorization.search_param_invalid", 400),
    ("Claim", [("patient", "not-a-uuid")], "authorization.search_param_invalid", 400),
    ("CommunicationRequest", [], "authorization.search_not_scopable", 403),
    ("ClaimResponse", None, "authorization.search_param_unsupported", 400),   # POST _search
])
def test_searches_we_cannot_scope_are_refused_with_a_reason(rtype, query, reason, status):
    refusal = parse_search(rtype, query, 100)
    assert isinstance(refusal, Decision) and (refusal.reason, refusal.status) == (reason, status)


def test_the_window_starts_at_the_first_named_claim():
    first = _claim(7)
    assert SearchRequest("ClaimResponse", 2, 0).window_query(first, 2, 100) == \
        "_count=10&_lastUpdated=ge2024-01-01T00%3A00%3A07"
    assert SearchRequest("ClaimResponse", 40, 0).window_query(first, 40, 100).startswith("_count=80&")
    assert SearchRequest("ClaimResponse", 80, 0).window_query(first, 80, 100).startswith("_count=100&")
    assert SearchRequest("Claim", 2, 0, PATIENT, None, True).window_query(first, 2, 50) == \
        f"_count=50&refDate=2024-01-01&patient={PATIENT}&contained=true"


def test_a_page_holds_only_the_named_claims_in_index_order_with_the_callers_total():
    search = SearchRequest("ClaimResponse", 3, 3)
    index = IndexPage(8, (_claim(4), _claim(6), _claim(9)))
    # the window interleaves other facilities' claims (5, 7, 8) and lists ours in another order
    result = assemble_page(search, index, _window(9, 5, 4, 7, 6, 8), BASE, _ok)
    bundle = result.bundle
    assert [e["resource"]["id"] for e in bundle["entry"]] == [_claim(n).uuid for n in (4, 6, 9)]
    assert bundle["total"] == 8 and result.served == 3
    assert set(bundle["entry"][0]) == {"fullUrl", "resource"}
    assert _links(bundle) == {"self": f"{BASE}ClaimResponse?_count=3&_offset=3",
                              "next": f"{BASE}ClaimResponse?_count=3&_offset=6",
                              "previous": f"{BASE}ClaimResponse?_count=3&_offset=0"}
    assert "999" not in json.dumps(bundle)   # openIMIS's scheme-wide total never passes


def test_a_crowded_window_gives_a_shorter_page_that_continues_where_it_stopped():
    search = SearchRequest("ClaimResponse", 3, 0)
    index = IndexPage(3, (_claim(1), _claim(50), _claim(51)))
    result = assemble_page(search, index, _window(1, 2, 3), BASE, _ok)   # 50 and 51 lie beyond the window
    assert [e["resource"]["id"] for e in result.bundle["entry"]] == [_claim(1).uuid]
    assert _links(result.bundle)["next"] == f"{BASE}ClaimResponse?_count=3&_offset=1"
    with pytest.raises(WindowCrowded):
        assemble_page(search, IndexPage(3, (_claim(50),)), _window(1, 2, 3), BASE, _ok)


def test_the_last_page_has_no_next_link_and_an_empty_search_no_entries():
    last = assemble_page(SearchRequest("ClaimResponse", 2, 2), IndexPage(3, (_claim(3),)), _window(3), BASE, _ok)
    assert "next" not in _links(last.bundle) and last.served == 1
    empty = assemble_page(SearchRequest("Claim", 2, 0, PATIENT), IndexPage(0, ()), None, BASE, _ok)
    assert empty.bundle == {"resourceType": "Bundle", "type": "searchset", "total": 0,
                            "link": [{"relation": "self", "url": f"{BASE}Claim?patient={PATIENT}&_count=2&_offset=0"}]}
    count_only = assemble_page(SearchRequest("ClaimResponse", 0, 0), IndexPage(5, ()), None, BASE, _ok)
    assert count_only.bundle["total"] == 5 and "entry" not in count_only.bundle
    assert "next" not in _links(count_only.bundle)


def test_a_served_entry_that_fails_the_last_check_fails_the_page():
    with pytest.raises(LookupFailed):
        assemble_page(SearchRequest("Claim", 2, 0), IndexPage(1, (_claim(1),)), _window(1, rtype="Claim"), BASE,
                      lambda resource: False)


def test_entries_of_another_type_in_the_window_are_never_served():
    window = _window(1, rtype="Claim")   # a ClaimResponse search whose window somehow holds a Claim
    with pytest.raises(WindowCrowded):
        assemble_page(SearchRequest("ClaimResponse", 2, 0), IndexPage(1, (_claim(1),)), window, BASE, _ok)


def _node(n: int) -> dict:
    c = _claim(n)
    return {"node": {"uuid": c.uuid, "code": c.code, "validityFrom": c.validity_from,
                     "healthFacility": {"uuid": c.facility_uuid, "code": "HF"}}}


def test_claim_index_answers_are_read_strictly():
    page = parse_page({"claims": {"totalCount": 4, "edges": [_node(1), _node(2)]}})
    assert page == IndexPage(4, (_claim(1), _claim(2)))
    assert parse_owner({"byUuid": {"edges": []}, "byCode": {"edges": [_node(3)]}}) == _claim(3)
    assert parse_owner({"byUuid": {"edges": [_node(1)]}, "byCode": {"edges": [_node(3)]}}) == _claim(1)
    assert parse_owner({"byUuid": {"edges": []}, "byCode": {"edges": []}}) is None
    assert _claim(3).owner_document()["provider"] == {"reference": "Organization/hf-a"}
    for broken in ({"claims": {"edges": [_node(1)]}},                                # no totalCount
                   {"claims": {"totalCount": 1, "edges": [{"node": {"uuid": "x"}}]}},  # no facility
                   {}):
        with pytest.raises(LookupFailed):
            parse_page(broken)
    with pytest.raises(LookupFailed):
        parse_owner({"byUuid": {"edges": [_node(1), _node(2)]}, "byCode": {"edges": []}})
    for status, body in ((200, b'{"errors":[{"message":"unauthorized"}],"data":{"claims":null}}'),
                         (500, b"{}"), (200, b"<html>")):
        with pytest.raises(LookupFailed):
            parse_answer(status, body)


def test_owners_of_a_page_are_asked_in_one_query():
    query = owners_query(["a-1", "b-2"])
    assert query.count("claims(uuid:") == 2 and 'c0: claims(uuid: "a-1"' in query and 'c1: claims(uuid: "b-2"' in query
