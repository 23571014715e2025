"""The link_rewrite response step (mediator/link_rewrite.py): openIMIS's Bundle links and fullUrls on the
public base, in the document parsed on receipt, for answers from openIMIS only."""

from __future__ import annotations

import json
import re

from aiohttp import web

from mediator.app import Runtime
from mediator.chain import UPSTREAM_ROUTES, LinkRewriteStep
from mediator.fhir import FHIR_JSON, BaseUrlRewriter
from mediator.link_rewrite import rewrite_links
from mediator.metrics import Metrics
from mediator.pipeline import Exchange
from mediator.request_view import RequestView
from mediator.upstream import OpenImisUpstream, ParsedResponse, UpstreamReply, response_document
from tests.conftest import channels_yaml, loaded, upstream_url, write_config

INTERNAL = "http://openimis.internal:8000/api/api_fhir_r4/"
PUBLIC = "https://mediator.example.org/fhir/"


def _bundle() -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": 1,
            "link": [{"relation": "self", "url": f"{INTERNAL}Medication/?_count=1&page-offset=1"},
                     {"relation": "next", "url": f"{INTERNAL}Medication/?_count=1&page-offset=2"}],
            "entry": [{"fullUrl": f"{INTERNAL}Medication/m-1", "resource": {"resourceType": "Medication",
                                                                           "id": "m-1"}}]}


def _rewriter() -> BaseUrlRewriter:
    return BaseUrlRewriter("/api/api_fhir_r4/", PUBLIC)


def _upstream() -> OpenImisUpstream:
    from mediator.config.models import UpstreamConfig

    return OpenImisUpstream("openimis", UpstreamConfig.model_validate({"base_url": INTERNAL}), PUBLIC)


def _received(document: dict, status: int = 200) -> ParsedResponse:
    """An answer as OpenImisUpstream.answer makes it from openIMIS's bytes."""
    reply = UpstreamReply(status, {}, json.dumps(document).encode(), "application/json")
    response = _upstream().answer(reply, fhir_json=True)
    assert isinstance(response, ParsedResponse)
    return response


def test_the_upstream_answer_leaves_bundle_links_to_the_step_and_carries_the_parsed_document():
    response = _received(_bundle())
    assert INTERNAL.encode() in response.body and response.document == _bundle()


def test_openimis_links_and_full_urls_are_rewritten_in_the_document_parsed_on_receipt():
    response = _received(_bundle())
    document = response.document
    assert rewrite_links(_rewriter(), response) is response
    # The same document object, rewritten in place (not parsed again), and the body is that document.
    assert response.document is document and response_document(response) is document
    assert json.loads(response.body) == document
    assert [link["url"] for link in document["link"]] == [f"{PUBLIC}Medication/?_count=1&page-offset=1",
                                                          f"{PUBLIC}Medication/?_count=1&page-offset=2"]
    assert document["entry"][0]["fullUrl"] == f"{PUBLIC}Medication/m-1"
    assert b"openimis.internal" not in response.body
    assert response.content_type == FHIR_JSON and response.status == 200


def test_an_answer_without_a_parsed_document_is_parsed_here():
    # An idempotent replay is rebuilt from the stored bytes: a plain web.Response.
    replay = web.Response(status=201, body=json.dumps(_bundle()).encode(), content_type="application/json")
    assert rewrite_links(_rewriter(), replay) is replay
    assert json.loads(replay.body)["entry"][0]["fullUrl"] == f"{PUBLIC}Medication/m-1"


def test_nothing_is_parsed_or_serialised_when_the_bytes_cannot_hold_the_upstream_base():
    bundle = _bundle()
    bundle["link"] = [{"relation": "self", "url": f"{PUBLIC}Medication"}]
    bundle["entry"][0]["fullUrl"] = f"{PUBLIC}Medication/m-1"
    body = json.dumps(bundle, separators=(",", ":")).encode()
    response = web.Response(status=200, body=body, content_type="application/json")
    assert rewrite_links(_rewriter(), response) is response and response.body is body


def test_errors_resources_and_non_json_pass_unchanged():
    error = web.Response(status=404, body=json.dumps(_bundle()).encode(), content_type="application/json")
    text = web.Response(status=200, body=json.dumps(_bundle()).encode(), content_type="text/plain")
    resource = {"resourceType": "Medication", "id": "m-1", "text": {"div": f"<a href='{INTERNAL}x'>x</a>"}}
    single = _received(resource)
    for response in (error, text, single):
        before = response.body
        assert rewrite_links(_rewriter(), response) is response and response.body is before
    assert single.document == resource   # only a Bundle's link[].url and entry[].fullUrl are openIMIS's links


async def _exchange_on_a_channel(tmp_path, answered_by: str | None):
    root = write_config(tmp_path, channels_yaml(INTERNAL))
    runtime = Runtime.build(loaded(root), Metrics())
    step = next(s for s in runtime.chain.response if s.name == "link_rewrite")
    assert isinstance(step, LinkRewriteStep)
    exchange = Exchange(RequestView.described("GET", "/fhir/Medication/"), "rid-12345678")
    for stage in runtime.pipeline.stages[:2]:   # client_ip, channel: which upstream answers
        assert (await stage.run(exchange)).allow
    exchange.answered_by = answered_by
    return step, exchange


async def test_the_step_rewrites_answers_from_openimis_only(tmp_path):
    for answered_by in sorted(UPSTREAM_ROUTES):
        step, exchange = await _exchange_on_a_channel(tmp_path / answered_by, answered_by)
        response = await step.apply(exchange, _received(_bundle()))
        assert b"openimis.internal" not in response.body, answered_by
    for answered_by in ("capabilities", "async_claims", "replica"):
        step, exchange = await _exchange_on_a_channel(tmp_path / answered_by, answered_by)
        mine = web.Response(status=200, body=json.dumps(_bundle()).encode(), content_type="application/json")
        assert (await step.apply(exchange, mine)).body == mine.body, answered_by


async def test_through_the_mediator_paged_links_lead_back_to_it(make_mediator, sandbox_server):
    client = await make_mediator(channels_yaml(upstream_url(sandbox_server)))
    first = await client.get("/fhir/Organization/?_count=1")
    assert first.status == 200
    bundle = await first.json()
    assert bundle["entry"] and all(e["fullUrl"].startswith(PUBLIC) for e in bundle["entry"])
    next_url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert next_url.startswith(PUBLIC) and str(sandbox_server.port) not in json.dumps(bundle)
    second = await client.get(re.sub(r"^https://[^/]+", "", next_url))
    assert second.status == 200
    assert (await second.json())["entry"][0]["resource"]["id"] != bundle["entry"][0]["resource"]["id"]
