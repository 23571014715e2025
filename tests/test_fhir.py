import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediator.fhir import BaseUrlRewriter, MalformedRequest, operation_outcome, parse_fhir_path


@pytest.mark.parametrize(
    ("method", "path", "interaction", "rtype", "rid"),
    [
        ("GET", "Claim", "search-type", "Claim", None),
        ("GET", "Claim/", "search-type", "Claim", None),
        ("POST", "Claim/_search", "search-type", "Claim", None),
        ("POST", "Claim", "create", "Claim", None),
        ("GET", "Claim/0a1b-2c", "read", "Claim", "0a1b-2c"),
        ("PUT", "Claim/x", "update", "Claim", "x"),
        ("PATCH", "Claim/x", "patch", "Claim", "x"),
        ("DELETE", "CoverageEligibilityRequest/x", "delete", "CoverageEligibilityRequest", "x"),
        ("GET", "Claim/x/_history", "history-instance", "Claim", "x"),
        ("GET", "Claim/x/_history/2", "vread", "Claim", "x"),
        ("GET", "Claim/_history", "history-type", "Claim", None),
        ("POST", "Claim/$submit", "operation-type", "Claim", None),
        ("POST", "Claim/x/$validate", "operation-instance", "Claim", "x"),
        ("GET", "metadata", "capabilities", None, None),
        ("POST", "", "batch-or-transaction", None, None),
        ("GET", "", "search-system", None, None),
    ],
)
def test_interactions(method, path, interaction, rtype, rid):
    parsed = parse_fhir_path(method, path)
    assert (parsed.interaction, parsed.resource_type, parsed.resource_id) == (interaction, rtype, rid)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "claim"), ("DELETE", "Claim"), ("PUT", ""), ("POST", "Claim/x"), ("GET", "Claim/x/y"),
     ("GET", "Claim/" + "a" * 65), ("GET", "Claim/a b"), ("GET", "Claim/x/_history/2/3")],
)
def test_not_fhir_rest(method, path):
    with pytest.raises(MalformedRequest):
        parse_fhir_path(method, path)


def test_rewrites_raw_and_percent_encoded_openimis_urls():
    rewriter = BaseUrlRewriter("/api/api_fhir_r4/", "https://iol.example.org/fhir/")
    bundle = {
        "resourceType": "Bundle",
        "link": [
            {"relation": "self", "url": "http://backend:8000/api/api_fhir_r4/Claim/?page-offset=1"},
            {"relation": "next",
             "url": "http%3A%2F%2Fbackend%3A8000%2Fapi%2Fapi_fhir_r4%2FClaim%2F%3Fpage-offset%3D2"},
            {"relation": "other", "url": "https://elsewhere.org/not/ours"},
        ],
        "entry": [{"fullUrl": "https://public-host/api/api_fhir_r4/Claim/abc"}],
    }
    assert rewriter.rewrite_bundle(bundle)
    assert bundle["link"][0]["url"] == "https://iol.example.org/fhir/Claim/?page-offset=1"
    assert bundle["link"][1]["url"] == "https%3A%2F%2Fiol.example.org%2Ffhir%2FClaim%2F%3Fpage-offset%3D2"
    assert bundle["link"][2]["url"] == "https://elsewhere.org/not/ours"
    assert bundle["entry"][0]["fullUrl"] == "https://iol.example.org/fhir/Claim/abc"


def test_non_bundles_are_left_alone():
    rewriter = BaseUrlRewriter("/api/api_fhir_r4/", "https://iol.example.org/fhir/")
    claim = {"resourceType": "Claim", "link": [{"url": "http://b/api/api_fhir_r4/x"}]}
    assert not rewriter.rewrite_bundle(claim)
    assert claim["link"][0]["url"] == "http://b/api/api_fhir_r4/x"


@pytest.mark.parametrize(("body", "may"), [
    (b'{"resourceType":"Bundle","link":[{"url":"http://b:8000/api/api_fhir_r4/Claim/"}]}', True),
    (rb'{"resourceType":"Bundle","link":[{"url":"http:\/\/b\/api\/api_fhir_r4\/Claim\/"}]}', True),
    (b'{"resourceType":"Bundle","link":[{"url":"HTTP%3A%2F%2FB%2FAPI%2FAPI_FHIR_R4%2FClaim"}]}', True),
    (b'{"resourceType":"Bundle","total":0,"link":[{"url":"https://elsewhere.org/x"}]}', False),
])
def test_the_bundle_walk_is_skipped_only_when_no_upstream_url_can_be_in_the_body(body, may):
    rewriter = BaseUrlRewriter("/api/api_fhir_r4/", "https://iol.example.org/fhir/")
    assert rewriter.may_need_rewriting(body) is may
    assert rewriter.rewrite_bundle(json.loads(body)) is may


URL_PIECES = ["http://", "https://", "HTTP%3A%2F%2F", "host:8000", "/api/api_fhir_r4/", "%2Fapi%2Fapi_fhir_r4%2F",
              "%2FAPI%2FAPI_FHIR_R4%2F", "/api/", "Claim/", "?page=2", "é", "\"", "%2", "/"]


@given(st.lists(st.lists(st.sampled_from(URL_PIECES), max_size=6).map("".join), min_size=1, max_size=3),
       st.booleans())
def test_skipping_the_walk_never_skips_a_rewrite(urls, ascii_only):
    """Whatever the URLs and however the JSON is escaped: no marker in the bytes → the walk changes nothing."""
    rewriter = BaseUrlRewriter("/api/api_fhir_r4/", "https://iol.example.org/fhir/")
    bundle = {"resourceType": "Bundle", "link": [{"url": u} for u in urls], "entry": [{"fullUrl": u} for u in urls]}
    body = json.dumps(bundle, ensure_ascii=ascii_only).encode()
    if not rewriter.may_need_rewriting(body):
        assert not rewriter.rewrite_bundle(json.loads(body))


@pytest.mark.parametrize(("status", "code"), [(400, "invalid"), (403, "forbidden"), (404, "not-found"),
                                              (413, "too-costly"), (429, "throttled"), (504, "timeout")])
def test_operation_outcome_issue_codes(status, code):
    outcome = operation_outcome(status, "x.y", "msg")
    assert outcome["issue"][0]["code"] == code
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "x.y"
